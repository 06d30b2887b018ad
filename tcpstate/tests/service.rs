//! What a systemd service relies on: READY=1 once attached (Type=notify),
//! SIGHUP reopens rather than kills, SIGUSR1 prints the summary.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    os::unix::net::UnixDatagram,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use common::require_bpf;

#[test]
fn notifies_systemd_survives_sighup_and_summarises_on_sigusr1() {
    if !require_bpf() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tcpstate-svc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let sock_path = dir.join("notify");
    let notify = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");

    let mut child = Command::new(env!("CARGO_BIN_EXE_tcpstate"))
        .args(["run", "--quiet", "--log-file"])
        .arg(dir.join("t.jsonl"))
        .arg("--control-socket")
        .arg(dir.join("control.sock"))
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tcpstate");
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).expect("READY=1 from the daemon");
    assert_eq!(&buf[..n], b"READY=1");

    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let pid = child.id() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "SIGHUP must not stop the daemon"
    );
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    let line = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("summary on stderr");
    assert!(line.starts_with("sockets by state:"), "{line}");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string(dir.join("t.jsonl")).expect("log");
    assert!(
        log.lines()
            .next()
            .is_some_and(|l| l.contains("\"type\":\"started\""))
    );
    assert!(
        log.lines()
            .last()
            .is_some_and(|l| l.contains("\"type\":\"stopped\""))
    );
    let _ = std::fs::remove_dir_all(dir);
}
