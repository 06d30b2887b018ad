//! Thin entry point: parse, dispatch, and turn every error into one line.

use std::process::ExitCode;

use clap::Parser as _;
use tcpstate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            eprintln!(
                "tcpstate: error: {} (see tcpstate --help)",
                tcpstate::cli::error_line(e)
            );
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Run(args) => tcpstate::run::run(args),
        Command::Tail(args) => tcpstate::tail::tail(args),
        Command::Status(args) => tcpstate::status::status(args),
        Command::Kill(args) => tcpstate::kill::kill(args),
        Command::Generate(args) => generate(args.what),
        Command::Replay(args) => tcpstate::replay::replay(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Errors may quote names and paths anyone chose: one safe line.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!(
                "tcpstate: error: {}",
                tcpstate::output::escape::escape(&msg)
            );
            ExitCode::FAILURE
        }
    }
}

fn generate(what: tcpstate::cli::Generate) -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    match what {
        tcpstate::cli::Generate::Completions { shell } => {
            clap_complete::generate(shell, &mut cmd, "tcpstate", &mut out);
        }
        tcpstate::cli::Generate::Man => clap_mangen::Man::new(cmd).render(&mut out)?,
    }
    tcpstate::write_stdout(&out)
}
