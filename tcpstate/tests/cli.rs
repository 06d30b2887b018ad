//! Bad input gets one clear line and a non-zero exit, never a panic.

use std::{
    io::Read as _,
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

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

/// `tcpstate ARGS`, killed after `limit`: a value the parser wrongly accepts starts the daemon
/// (the tests run as root), which would otherwise run forever. Exit code -1 when killed.
fn tcpstate_within(args: &[&str], limit: Duration) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tcpstate"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tcpstate");
    let deadline = Instant::now() + limit;
    let code = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break -1;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (code, err)
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
fn a_metrics_port_in_use_is_said_once() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return; // the root check comes first; covered by not_root_is_one_clear_line
    }
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr").to_string();
    let sock = std::env::temp_dir().join(format!("tcpstate-cli-{}.sock", std::process::id()));
    let (code, _, err) = tcpstate(&[
        "run",
        "--metrics-addr",
        &addr,
        "--control-socket",
        sock.to_str().expect("utf-8 path"),
    ]);
    let _ = std::fs::remove_file(&sock);
    assert_eq!(code, 1, "{err}");
    one_clear_line(&err, &format!("cannot listen on --metrics-addr {addr}"));
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
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
        // The whole value, escaped, on the one line: not cut at its newline.
        ("/a\nb\x1b[2J", "'/a\\nb\\e[2J' for '--netns"),
        (
            "/a\nb",
            "/a\\nb: No such file or directory (os error 2) (want",
        ),
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

#[test]
fn out_of_range_durations_and_counts_are_one_line_and_exit_2() {
    const HUGE: &str = "18446744073709551615";
    let huge_s = format!("{HUGE}s");
    let cases: Vec<Vec<&str>> = vec![
        vec!["run", "--stats-interval", &huge_s],
        vec!["run", "--leak-interval", &huge_s],
        vec!["run", "--reconcile-interval", &huge_s],
        vec!["run", "--stats-interval", "2days"],
        vec!["run", "--leak-threshold", HUGE],
        vec!["run", "--full-reconcile-every", HUGE],
        vec!["run", "--log-rate", "4294967295"],
        vec!["run", "--log-keep", "4294967295"],
        vec!["run", "--log-max-size", "9999999999G"],
        vec!["run", "--threshold", "close_wait=60d"],
        vec!["run", "--threshold", "accept_queue_full=60d"],
        vec!["kill", "--state", "close_wait", "--older-than", &huge_s],
    ];
    for args in &cases {
        let (code, err) = tcpstate_within(args, Duration::from_secs(5));
        assert_eq!(code, 2, "{args:?}: {err}");
        one_clear_line(&err, args[args.len() - 2]);
    }
}

#[test]
fn a_listen_threshold_is_refused() {
    // Accepted, it would raise an anomaly for every listener on the host.
    let (code, err) = tcpstate_within(&["run", "--threshold", "listen=1s"], Duration::from_secs(5));
    assert_eq!(code, 2, "{err}");
    one_clear_line(&err, "LISTEN cannot have a threshold");
}

#[test]
fn replay_of_a_missing_or_foreign_file_is_one_clear_line() {
    let (code, _, err) = tcpstate(&["replay", "/nonexistent/capture"]);
    assert_eq!(code, 1, "{err}");
    one_clear_line(&err, "cannot open /nonexistent/capture");
    let foreign = std::env::temp_dir().join(format!("not-a-capture-{}", std::process::id()));
    std::fs::write(&foreign, b"{\"type\":\"transition\"}\n").expect("write");
    let path = foreign.display().to_string();
    let (code, _, err) = tcpstate(&["replay", &path]);
    let _ = std::fs::remove_file(&foreign);
    assert_eq!(code, 1, "{err}");
    one_clear_line(&err, "not a tcpstate capture");
}
