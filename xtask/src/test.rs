//! `cargo xtask test`: what CI runs (`.ci/run`). Steps run in order and the
//! first failure stops everything with one line naming the step.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::cmd::{NIGHTLY, probe, run, rustup_run, show, stable_cargo, workspace_root};
use crate::setup::{ensure_nightly_component, setup};
use crate::vmtest;

/// Each fuzz target's run in `cargo xtask test`.
const FUZZ_SMOKE: std::time::Duration = std::time::Duration::from_secs(10);

/// Opt-out of the kernel matrix, for developers: `TCPSTATE_VMTEST=0`.
const VMTEST_ENV: &str = "TCPSTATE_VMTEST";

/// One step of the run: a command, or a task of xtask's own.
enum Step {
    Command(Command),
    FuzzSmoke,
    Vmtest,
    VmtestManyCpus,
    VmtestSystemd,
}

/// vCPUs of the guest that runs the pipeline on many per-CPU rings: more than any machine
/// here has, so the merge of that many real rings is exercised on a real kernel.
const MANY_CPUS: u32 = 16;

pub fn test(no_lint: bool, cargo_test_args: &[String]) -> Result<()> {
    let started = Instant::now();
    setup()?;

    let mut steps: Vec<(&str, Step)> = if no_lint {
        Vec::new()
    } else {
        lints()?
            .into_iter()
            .map(|(name, cmd)| (name, Step::Command(cmd)))
            .collect()
    };

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
    steps.push(("cargo test", Step::Command(cargo_test)));
    // The busy-host soak, short form, alone (ignored by the workspace run above).
    if cargo_test_args.is_empty() {
        steps.push((
            "soak (short)",
            Step::Command(crate::soak::command(None, None)),
        ));
    }

    // The whole suite (what CI runs) ends with the fuzz smoke and the kernel
    // matrix; a narrowed run (`--no-lint`, or test arguments) leaves them out.
    let whole = !no_lint && cargo_test_args.is_empty();
    let vmtest_opted_out = std::env::var(VMTEST_ENV).as_deref() == Ok("0");
    if whole {
        // The fuzz targets, briefly, from the checked-in corpus: a parser that
        // regressed on a known input fails here.
        steps.push(("fuzz smoke", Step::FuzzSmoke));
        if !vmtest_opted_out {
            steps.push(("kernel matrix (vmtest)", Step::Vmtest));
            steps.push(("many CPUs (vmtest)", Step::VmtestManyCpus));
            steps.push((
                "the unit under systemd (vmtest-systemd)",
                Step::VmtestSystemd,
            ));
        }
    }

    let total = steps.len();
    let mut times: Vec<(&str, Duration)> = Vec::new();
    for (index, (name, step)) in steps.into_iter().enumerate() {
        let t = Instant::now();
        let result = match step {
            Step::Command(mut cmd) => {
                println!(
                    "\n==> xtask test [{}/{total}] {name}: {}",
                    index + 1,
                    show(&cmd)
                );
                run(&mut cmd)
            }
            Step::FuzzSmoke => {
                println!(
                    "\n==> xtask test [{}/{total}] {name}: every target for {}s",
                    index + 1,
                    FUZZ_SMOKE.as_secs()
                );
                crate::fuzz::fuzz(None, FUZZ_SMOKE)
            }
            Step::Vmtest => {
                println!(
                    "\n==> xtask test [{}/{total}] {name}: kernels {} ({VMTEST_ENV}=0 skips it)",
                    index + 1,
                    vmtest::DEFAULT_KERNELS.join(", ")
                );
                vmtest::vmtest(&vmtest::VmtestArgs::default(), false)
            }
            Step::VmtestManyCpus => {
                println!(
                    "\n==> xtask test [{}/{total}] {name}: `pipeline` on kernel 7 with {MANY_CPUS} \
                     vCPUs, so {MANY_CPUS} per-CPU rings ({VMTEST_ENV}=0 skips it)",
                    index + 1
                );
                vmtest::vmtest(
                    &vmtest::VmtestArgs {
                        kernels: vec!["7".to_owned()],
                        tests: vec!["pipeline".to_owned()],
                        cpus: MANY_CPUS,
                        ..vmtest::VmtestArgs::default()
                    },
                    false,
                )
            }
            Step::VmtestSystemd => {
                println!(
                    "\n==> xtask test [{}/{total}] {name}: packaging/tcpstate.service on Debian 12 \
                     ({VMTEST_ENV}=0 skips it)",
                    index + 1
                );
                crate::vmtest_systemd::vmtest_systemd(
                    &crate::vmtest_systemd::VmtestSystemdArgs::default(),
                )
            }
        };
        times.push((name, t.elapsed()));
        println!(
            "xtask test: step '{name}' took {:.0} s",
            t.elapsed().as_secs_f64()
        );
        if let Err(err) = result {
            print_times(&times, started);
            return Err(err).with_context(|| format!("test step '{name}' failed"));
        }
    }
    print_times(&times, started);
    if whole && vmtest_opted_out {
        println!(
            "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             !!! {VMTEST_ENV}=0: the kernel matrix (vmtest) and the unit under systemd\n\
             !!! (vmtest-systemd) were NOT run: this change\n\
             !!! is proven on the host's kernel only. CI runs it.\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
        );
    } else if !whole {
        println!("xtask test: a narrowed run; the fuzz smoke and the kernel matrix were not run");
    }
    println!("\nxtask: all {total} test steps passed");
    Ok(())
}

fn print_times(times: &[(&str, Duration)], started: Instant) {
    println!("\nxtask test: step times");
    for (name, took) in times {
        println!("  {:>6.0} s  {name}", took.as_secs_f64());
    }
    println!("  {:>6.0} s  total", started.elapsed().as_secs_f64());
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
