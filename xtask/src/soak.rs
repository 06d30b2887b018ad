//! `cargo xtask soak [--minutes N]`: issue 20's busy-host harness (tcpstate/tests/soak.rs),
//! the real daemons on a host made busy on purpose with stuck sockets planted into the noise.
//! `cargo xtask test` runs its short form (45 s of noise) as a step of its own.

use std::process::Command;

use anyhow::{Context as _, Result};

use crate::cmd::{run, show, stable_cargo};

/// Established sockets held in a long run: two fds each, spread over helper processes (each
/// with its own fd limit); 100k is possible but heavy on a 2-core machine shared with others.
const LONG_ESTABLISHED: u64 = 20_000;

/// The soak test binary, run alone with its summary printed; `secs` of noise (None: the
/// short form's default).
pub fn command(secs: Option<u64>, established: Option<u64>) -> Command {
    let mut cargo = stable_cargo();
    cargo.args([
        "test",
        "--release",
        "--package",
        "tcpstate",
        "--test",
        "soak",
        "--",
        "--ignored",
        "--nocapture",
    ]);
    if let Some(secs) = secs {
        cargo.env("TCPSTATE_SOAK_SECS", secs.to_string());
    }
    if let Some(n) = established {
        cargo.env("TCPSTATE_SOAK_ESTABLISHED", n.to_string());
    }
    cargo
}

pub fn soak(minutes: Option<u64>, established: Option<u64>) -> Result<()> {
    crate::setup::setup()?;
    let secs = minutes.map(|m| m * 60);
    let established = established.or(minutes.map(|_| LONG_ESTABLISHED));
    let mut cmd = command(secs, established);
    println!(
        "\n==> xtask soak: {}{}",
        secs.map_or(String::new(), |s| format!("TCPSTATE_SOAK_SECS={s} ")),
        show(&cmd)
    );
    run(&mut cmd).context("the busy-host soak failed")
}
