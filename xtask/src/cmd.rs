//! Helpers around `std::process::Command` and the environment, shared by all
//! tasks. Every failure becomes a one-line `anyhow` error naming the command.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, anyhow, bail};

/// Toolchain name tcpstate/build.rs uses (`rustup run nightly`
/// runs `rustup run nightly cargo build -Z build-std=core ...`).
pub const NIGHTLY: &str = "nightly";

/// Root of the workspace. xtask only ever runs from this checkout (through the
/// `cargo xtask` alias), so the compile-time manifest directory is reliable.
pub fn workspace_root() -> &'static Path {
    let xtask_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask_dir.parent().unwrap_or(xtask_dir)
}

/// `$CARGO_HOME`, defaulting to `~/.cargo` like cargo and rustup do.
pub fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    let home = env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("neither CARGO_HOME nor HOME is set; cannot locate cargo's install directory")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// Puts `$CARGO_HOME/bin` first on our own PATH so that every child (and the
/// eBPF step of tcpstate/build.rs) finds the bpf-linker that `setup`
/// installs there, rather than some other one earlier on PATH.
pub fn prepend_cargo_bin_to_path() -> Result<()> {
    let bin = cargo_home()?.join("bin");
    let old = env::var_os("PATH").unwrap_or_default();
    if env::split_paths(&old).next().as_deref() == Some(bin.as_path()) {
        return Ok(());
    }
    let new: OsString = env::join_paths(std::iter::once(bin).chain(env::split_paths(&old)))
        .context("cannot add $CARGO_HOME/bin to PATH")?;
    // SAFETY: called first thing in `main`, before xtask starts any thread, so
    // nothing can be reading the environment concurrently.
    unsafe { env::set_var("PATH", new) };
    Ok(())
}

/// The executable `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    which::which(name).ok()
}

/// Effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A `cargo` command for the stable (workspace) toolchain, run from the
/// workspace root. Plain `cargo` from PATH is the rustup proxy, which honours
/// RUSTUP_TOOLCHAIN; `cargo +nightly xtask ...` would leave that set to
/// nightly, but the host crates must build with the workspace toolchain
/// (tcpstate/build.rs picks nightly itself for the eBPF crate).
pub fn stable_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    if env::var("RUSTUP_TOOLCHAIN").is_ok_and(|t| t.starts_with(NIGHTLY)) {
        cmd.env_remove("RUSTUP_TOOLCHAIN");
    }
    cmd.current_dir(workspace_root());
    cmd
}

/// `rustup run <toolchain> <program>`: the same way tcpstate/build.rs reaches nightly.
pub fn rustup_run(toolchain: &str, program: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", toolchain, program]);
    cmd
}

/// The command as a shell-like string for messages.
pub fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs with inherited stdio; a non-zero exit is an error.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = show(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs with stdout captured and returns it; on failure the error carries the
/// last line the command printed on stderr (usually the reason).
pub fn capture(cmd: &mut Command) -> Result<String> {
    let shown = show(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // rustup prints a stack trace under RUST_BACKTRACE=1; the reason is
        // the first `error:` line, otherwise take the last non-empty one.
        let reason = stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()))
            .unwrap_or("no error output")
            .trim();
        return Err(anyhow!("`{shown}` failed ({}): {reason}", out.status));
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{shown}` printed non-UTF-8 output"))
}

/// Like [`capture`] for presence checks: `None` if it cannot run or fails.
pub fn probe(cmd: &mut Command) -> Option<String> {
    capture(cmd).ok()
}

/// One line of `setup`-style progress: "xtask: <what>: <status>".
pub fn step(what: &str, status: impl std::fmt::Display) {
    println!("xtask: {what}: {status}");
}
