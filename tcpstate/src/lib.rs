//! tcpstate: every TCP state transition the kernel makes, which sockets are
//! stuck, for how long, and which process must fix them.
//!
//! Data flows one way: kernel (`tcpstate-ebpf`, loaded by [`program`]) ->
//! per-CPU rings ([`ring`]) -> [`collector`] (merge in time order with
//! [`reorder`], [`decode`]) -> [`tracker`] -> [`output`]. The kernel's own
//! socket table is read by the [`workers`] (through [`sockdiag`]
//! and [`procfs`]) to seed, reconcile, follow mini-sockets and name owners,
//! and their answers come back to the tracker as messages.

pub mod btf;
pub mod capture;
pub mod cli;
pub mod clock;
pub mod collector;
pub mod control;
pub mod decode;
pub mod drops;
pub mod features;
#[cfg(test)]
mod fixtures;
pub mod kill;
pub mod memory;
pub mod output;
pub mod procfs;
pub mod program;
pub mod record;
pub mod reorder;
pub mod replay;
pub mod ring;
pub mod run;
pub mod sockdiag;
pub mod socket;
pub mod state;
pub mod status;
pub mod tail;
pub mod tracker;
pub mod verify;
pub mod workers;
pub mod workload;

/// One warning line on stderr, made safe for a terminal (it may quote names any local user
/// chose).
pub fn warn(msg: std::fmt::Arguments<'_>) {
    eprintln!(
        "tcpstate: warning: {}",
        output::escape::escape(&msg.to_string())
    );
}

/// Writes to stdout; a reader that went away (`| head`) ends the output quietly.
pub fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
