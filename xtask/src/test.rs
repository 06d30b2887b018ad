//! `cargo xtask test`: what CI runs (`.ci/run`). Steps run in order and the
//! first failure stops everything with one line naming the step.

use std::process::Command;

use anyhow::{Context as _, Result};

use crate::cmd::{NIGHTLY, probe, run, rustup_run, show, stable_cargo, workspace_root};
use crate::setup::{ensure_nightly_component, setup};

/// Each fuzz target's run in `cargo xtask test`.
const FUZZ_SMOKE: std::time::Duration = std::time::Duration::from_secs(10);

pub fn test(no_lint: bool, cargo_test_args: &[String]) -> Result<()> {
    setup()?;

    let mut steps: Vec<(&str, Command)> = if no_lint { Vec::new() } else { lints()? };

    // --release so the integration tests' CARGO_BIN_EXE_tcpstate is the same
    // target/release/tcpstate that `cargo xtask build` produces.
    let mut cargo_test = stable_cargo();
    cargo_test
        .args([
            "test",
            "--release",
            "--workspace",
            "--exclude",
            "tcpstate-ebpf",
        ])
        .args(cargo_test_args);
    steps.push(("cargo test", cargo_test));
    // The busy-host soak, short form, alone (ignored by the workspace run above).
    if cargo_test_args.is_empty() {
        steps.push(("soak (short)", crate::soak::command(None, None)));
    }

    // The whole suite (what CI runs) ends with the fuzz smoke; a narrowed
    // run (`--no-lint`, or test arguments) leaves it out.
    let fuzz_smoke = !no_lint && cargo_test_args.is_empty();
    let total = steps.len() + usize::from(fuzz_smoke);
    for (index, (name, mut cmd)) in steps.into_iter().enumerate() {
        println!(
            "\n==> xtask test [{}/{total}] {name}: {}",
            index + 1,
            show(&cmd)
        );
        run(&mut cmd).with_context(|| format!("test step '{name}' failed"))?;
    }
    // The fuzz targets, briefly, from the checked-in corpus: a parser that
    // regressed on a known input fails here.
    if fuzz_smoke {
        println!(
            "\n==> xtask test [{total}/{total}] fuzz smoke: every target for {}s",
            FUZZ_SMOKE.as_secs()
        );
        crate::fuzz::fuzz(None, FUZZ_SMOKE).context("test step 'fuzz smoke' failed")?;
    }
    println!("\nxtask: all {total} test steps passed");
    Ok(())
}

/// fmt and clippy (the host crates, then the eBPF crate on its own).
fn lints() -> Result<Vec<(&'static str, Command)>> {
    let mut steps: Vec<(&str, Command)> = Vec::new();
    if probe(stable_cargo().args(["fmt", "--version"])).is_some() {
        let mut fmt = stable_cargo();
        fmt.args(["fmt", "--all", "--check"]);
        steps.push(("rustfmt", fmt));
    } else {
        println!("xtask: rustfmt is not installed; skipping the format check");
    }

    let mut clippy = stable_cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--exclude",
        "tcpstate-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    steps.push(("clippy (host crates)", clippy));

    // The eBPF crate only compiles for bpfel-unknown-none with nightly and
    // build-std, so it gets its own clippy run, the way tcpstate/build.rs builds it
    // (`rustup run nightly`, which also works when RUSTUP_TOOLCHAIN is set).
    // A nightly installed by `setup` has the minimal profile: add clippy.
    ensure_nightly_component("clippy")?;
    let mut ebpf_clippy = rustup_run(NIGHTLY, "cargo");
    ebpf_clippy
        .current_dir(workspace_root().join("tcpstate-ebpf"))
        // The cfg tcpstate/build.rs sets, so the lint sees the code
        // that ships for this machine.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        )
        .args([
            "clippy",
            "--package",
            "tcpstate-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]);
    steps.push(("clippy (eBPF crate)", ebpf_clippy));
    Ok(steps)
}
