//! Developer tasks for the tcpstate workspace, run as `cargo xtask <task>`
//! (alias in .cargo/config.toml).

mod bench;
mod btf_fixtures;
mod cmd;
mod fuzz;
mod setup;
mod soak;
mod test;
mod vmtest;
mod vmtest_systemd;

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Parser, Subcommand};

use crate::cmd::{capture, euid, run, show, stable_cargo, which};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for tcpstate"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check for (and install if missing) the nightly toolchain, rust-src,
    /// bpf-linker, iproute2 and tracefs. Idempotent.
    Setup,
    /// Set up, then build target/release/tcpstate.
    Build,
    /// Build, then run `tcpstate run ARGS...` as root,
    /// e.g. `cargo xtask run -- --format json --port 8080`.
    Run {
        /// Arguments for `tcpstate run`, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, check formatting, run clippy (host and eBPF crates), then
    /// `cargo test --release`, the fuzz smoke and the kernel matrix (vmtest;
    /// TCPSTATE_VMTEST=0 leaves it out). What CI runs.
    Test {
        /// Skip rustfmt and clippy, for fast iteration.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test`, after `--`
        /// (e.g. `cargo xtask test -- --test pipeline`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, then measure tcpstate's overhead against no tracer and
    /// libbpf-tools tcpstates under TCP connection churn (needs root).
    Bench(bench::BenchArgs),
    /// Build, then write the man page and shell completions (generated from
    /// tcpstate's own clap definition) to <target>/dist.
    Dist,
    /// Boot Debian's kernels in QEMU (virtme-ng) and run the real-kernel
    /// integration tests in each; prints a kernel x test matrix. Fetches and
    /// caches kernels and tools under <target>/vmtest (needs root).
    Vmtest(vmtest::VmtestArgs),
    /// Build, then run packaging/tcpstate.service under a real systemd in a QEMU guest
    /// (Debian 12's kernel and a debootstrapped root, cached under <target>/vmtest) and
    /// check readiness, limits, hardening, tracing, owners, journald, reload, restart and
    /// stop; one line per check (needs root).
    VmtestSystemd(vmtest_systemd::VmtestSystemdArgs),
    /// Fetch Debian's 5.10, 6.1, 6.12 and newest 7.x amd64 kernels and arm64 6.1 (cached
    /// under <target>/vmtest) and write their BTF, gzipped, to tcpstate/src/btf/fixtures/
    /// for the offset resolver's unit tests (needs root).
    BtfFixtures,
    /// Set up, then run the fuzz targets (cargo-fuzz, nightly) from the
    /// checked-in corpus: every target, or the one named.
    Fuzz {
        /// One of: log_line, event, sock_diag, btf, cli_values.
        target: Option<String>,
        /// How long each target runs.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        time: std::time::Duration,
    },
    /// Set up, then the busy-host soak (tcpstate/tests/soak.rs, needs root): the daemons
    /// among noise, with stuck sockets planted; prints a summary table.
    Soak {
        /// How long the noise runs (default: the short form, 45 s).
        #[arg(long)]
        minutes: Option<u64>,
        /// Established sockets held (default 4000; 20000 with --minutes).
        #[arg(long)]
        established: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = cmd::prepend_cargo_bin_to_path().and_then(|()| match cli.task {
        Task::Setup => setup::setup(),
        Task::Build => build().map(drop),
        Task::Run { args } => Err(run_tcpstate(&args)),
        Task::Test { no_lint, args } => test::test(no_lint, &args),
        Task::Bench(args) => bench::bench(&args),
        Task::Vmtest(args) => vmtest::vmtest(&args, true),
        Task::VmtestSystemd(args) => vmtest_systemd::vmtest_systemd(&args),
        Task::Dist => dist(),
        Task::BtfFixtures => btf_fixtures::btf_fixtures(),
        Task::Soak {
            minutes,
            established,
        } => soak::soak(minutes, established),
        Task::Fuzz { target, time } => {
            setup::setup().and_then(|()| fuzz::fuzz(target.as_deref(), time))
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` joins the context chain on one line.
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `setup`, then a release build of tcpstate (tcpstate/build.rs compiles the eBPF
/// object from its build script). Returns the binary's path.
fn build() -> Result<PathBuf> {
    setup::setup()?;
    let mut cargo = stable_cargo();
    cargo.args(["build", "--release", "--package", "tcpstate"]);
    println!("\n==> xtask build: {}", show(&cargo));
    run(&mut cargo).context("building tcpstate failed")?;
    let binary = target_dir()?.join("release").join("tcpstate");
    if !binary.is_file() {
        bail!(
            "cargo build succeeded but {} does not exist",
            binary.display()
        );
    }
    println!("xtask: built {}", binary.display());
    Ok(binary)
}

/// The man page and completions come from the binary (`tcpstate generate`)
/// rather than from xtask linking the tcpstate crate: that would make xtask
/// need bpf-linker before `setup` could install it.
fn dist() -> Result<()> {
    let binary = build()?;
    let dist = target_dir()?.join("dist");
    let completions = dist.join("completions");
    std::fs::create_dir_all(&completions)
        .with_context(|| format!("cannot create {}", completions.display()))?;
    let generate = |args: &[&str], out: PathBuf| -> Result<()> {
        let text = capture(Command::new(&binary).arg("generate").args(args))?;
        std::fs::write(&out, text).with_context(|| format!("cannot write {}", out.display()))?;
        println!("xtask: wrote {}", out.display());
        Ok(())
    };
    generate(&["man"], dist.join("tcpstate.1"))?;
    for (shell, file) in [
        ("bash", "tcpstate.bash"),
        ("zsh", "_tcpstate"),
        ("fish", "tcpstate.fish"),
        ("elvish", "tcpstate.elv"),
        ("powershell", "_tcpstate.ps1"),
    ] {
        generate(&["completions", shell], completions.join(file))?;
    }
    Ok(())
}

/// Cargo's target directory as cargo itself resolves it (CARGO_TARGET_DIR,
/// config files), rather than assuming `target/`.
fn target_dir() -> Result<PathBuf> {
    let metadata =
        capture(stable_cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let json: serde_json::Value =
        serde_json::from_str(&metadata).context("cannot parse `cargo metadata` output")?;
    json.get("target_directory")
        .and_then(|dir| dir.as_str())
        .map(PathBuf::from)
        .context("`cargo metadata` output has no target_directory")
}

/// `build`, then replaces xtask with `tcpstate run ARGS...` (through
/// `sudo -E` when not root). Only returns on failure.
///
/// exec rather than spawn-and-wait: Ctrl-C goes to the terminal's foreground
/// process group, and after exec that holds tcpstate (cargo and the rustup
/// proxy exec too) but no xtask that could die first or swallow the signal;
/// tcpstate's exit status becomes ours without forwarding.
fn run_tcpstate(args: &[String]) -> anyhow::Error {
    let binary = match build() {
        Ok(binary) => binary,
        Err(err) => return err,
    };
    let mut cmd = match euid() {
        0 => Command::new(&binary),
        _ if which("sudo").is_some() => {
            println!(
                "xtask: tcpstate needs root (it loads eBPF programs); re-running through sudo -E"
            );
            let mut sudo = Command::new("sudo");
            sudo.arg("-E").arg(&binary);
            sudo
        }
        uid => {
            return anyhow!(
                "tcpstate needs root (it loads eBPF programs) but this is uid {uid} and sudo is \
                 not installed; run `cargo xtask run` as root"
            );
        }
    };
    cmd.arg("run").args(args);
    println!("xtask: exec {}", show(&cmd));
    let err = cmd.exec();
    anyhow!("could not exec `{}`: {err}", show(&cmd))
}
