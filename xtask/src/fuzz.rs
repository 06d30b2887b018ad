//! `cargo xtask fuzz [TARGET] [--time 60s]`: the fuzz targets in `fuzz/` (every parser of bytes
//! from outside: log lines, ring events, sock_diag answers, BTF, command-line values), run with
//! cargo-fuzz (libFuzzer, nightly, AddressSanitizer) from the checked-in corpus.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{NIGHTLY, probe, run, rustup_run, show, step, workspace_root};

/// The cargo-fuzz release known to build with this machine's toolchains.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub const TARGETS: [&str; 5] = ["log_line", "event", "sock_diag", "btf", "cli_values"];

/// Runs `target` (every one when None) for `time` each.
pub fn fuzz(target: Option<&str>, time: Duration) -> Result<()> {
    let targets: Vec<&str> = match target {
        None => TARGETS.to_vec(),
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target {t:?}; there are {}", TARGETS.join(", ")),
    };
    ensure_cargo_fuzz()?;
    let root = workspace_root();
    let secs = time.as_secs().max(1);
    for t in targets {
        // New inputs go to a scratch corpus under target/; the checked-in one only seeds.
        let scratch = root.join("target").join("fuzz-corpus").join(t);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("cannot create {}", scratch.display()))?;
        let mut cmd = rustup_run(NIGHTLY, "cargo");
        cmd.current_dir(root)
            .args(["fuzz", "run", "--fuzz-dir", "fuzz", t])
            .arg(&scratch)
            .arg(Path::new("fuzz/corpus").join(t))
            .args([
                "--",
                &format!("-max_total_time={secs}"),
                "-rss_limit_mb=2048",
                "-print_final_stats=1",
            ]);
        println!("\n==> xtask fuzz {t} for {secs}s: {}", show(&cmd));
        run(&mut cmd).with_context(|| format!("fuzz target {t} failed"))?;
    }
    Ok(())
}

/// cargo-fuzz, installed with the stable toolchain when missing.
fn ensure_cargo_fuzz() -> Result<()> {
    const WHAT: &str = "cargo-fuzz";
    if let Some(v) = probe(rustup_run(NIGHTLY, "cargo").args(["fuzz", "--version"])) {
        step(WHAT, format_args!("present ({})", v.trim()));
        return Ok(());
    }
    step(
        WHAT,
        format_args!("missing; installing {CARGO_FUZZ_VERSION}"),
    );
    run(crate::cmd::stable_cargo().args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]))
    .context("installing cargo-fuzz failed")
}
