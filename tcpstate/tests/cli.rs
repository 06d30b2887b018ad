//! Bad input gets one clear line and a non-zero exit, never a panic.

use std::{os::unix::process::CommandExt as _, process::Command};

fn tcpstate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tcpstate"))
        .args(args)
        .output()
        .expect("run tcpstate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn one_clear_line(stderr: &str, mentions: &str) {
    assert_eq!(stderr.lines().count(), 1, "exactly one line: {stderr:?}");
    assert!(stderr.starts_with("tcpstate: error: "), "{stderr:?}");
    assert!(
        stderr.contains(mentions),
        "{stderr:?} should mention {mentions:?}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr:?}"
    );
}

#[test]
fn bad_flags_are_one_line_and_exit_2() {
    for (args, mentions) in [
        (&["run", "--bogus"][..], "--bogus"),
        (&["run", "--port", "0"], "port"),
        (&["run", "--port", "70000"], "port"),
        (&["run", "-4", "-6"], "cannot be used"),
        (&["run", "--threshold", "close_wait"], "STATE=DURATION"),
        (&["run", "--threshold", "nonsense=1s"], "unknown TCP state"),
        (&["run", "--ring-size", "3M"], "power of two"),
        (&["run", "--format", "xml"], "xml"),
        (&["tail", "--state", "NOPE"], "NOPE"),
        (&["frobnicate"], "frobnicate"),
    ] {
        let (code, _, err) = tcpstate(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        one_clear_line(&err, mentions);
    }
}

#[test]
fn help_and_version_succeed() {
    let (code, out, _) = tcpstate(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("run") && out.contains("tail") && out.contains("status"));
    let (code, out, _) = tcpstate(&["--version"]);
    assert_eq!(
        (code, out.trim()),
        (0, concat!("tcpstate ", env!("CARGO_PKG_VERSION")))
    );
}

#[test]
fn not_root_is_one_clear_line() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let (code, _, err) = tcpstate(&["run"]);
        assert_eq!(code, 1);
        one_clear_line(&err, "root");
        return;
    }
    // The checkout may sit where `nobody` cannot traverse: run a copy from
    // the world-readable temp dir.
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(format!("tcpstate-nobody-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let bin = dir.join("tcpstate");
    std::fs::copy(env!("CARGO_BIN_EXE_tcpstate"), &bin).expect("copy binary");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod bin");
    let out = Command::new(&bin)
        .arg("run")
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run as nobody");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1));
    one_clear_line(&String::from_utf8_lossy(&out.stderr), "needs root");
}

#[test]
fn unwritable_log_path_is_one_clear_line() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return; // the root check comes first; covered by not_root_is_one_clear_line
    }
    let (code, _, err) = tcpstate(&["run", "--log-file", "/proc/no/such/dir/log.jsonl"]);
    assert_eq!(code, 1, "{err}");
    one_clear_line(&err, "/proc/no/such/dir");
}

#[test]
fn status_without_a_daemon_says_so() {
    let (code, _, err) = tcpstate(&["status", "--addr", "127.0.0.1:1"]);
    assert_eq!(code, 1);
    one_clear_line(&err, "no tcpstate daemon answering on 127.0.0.1:1");
}

#[test]
fn netns_must_be_a_network_namespace() {
    for (arg, mentions) in [
        ("/etc/passwd", "not a network namespace"),
        ("0", "not a network namespace inode"),
        ("/nonexistent/ns", "/nonexistent/ns"),
    ] {
        let (code, _, err) = tcpstate(&["run", "--netns", arg]);
        assert_eq!(code, 2, "{arg}: {err}");
        one_clear_line(&err, mentions);
    }
}

#[test]
fn a_threshold_that_would_wrap_is_refused() {
    let (code, _, err) = tcpstate(&["run", "--threshold", "close_wait=18446744075s 709551616ns"]);
    assert_eq!(code, 2, "{err}");
    one_clear_line(&err, "ten years");
    let (code, _, err) = tcpstate(&["run", "--threshold", "time_wait_pressure=7"]);
    assert_eq!(code, 2, "{err}");
    one_clear_line(&err, "fraction");
}
