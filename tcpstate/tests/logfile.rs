//! The log path is not always a file: a FIFO put there (by mistake or by a user who can write
//! the directory) must neither stop the daemon at start-up nor hang it at a reopen.

mod common;

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Daemon, require_bpf};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tcpstate-logfile-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    d
}

fn mkfifo(path: &Path) {
    let st = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(st.success(), "mkfifo {}", path.display());
}

#[test]
fn a_fifo_as_the_log_file_is_one_error_line_at_start() {
    if !require_bpf() {
        return;
    }
    let d = dir("start");
    let log = d.join("log.jsonl");
    mkfifo(&log);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tcpstate"))
        .args(["run", "--log-file"])
        .arg(&log)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tcpstate");
    // Opening a FIFO for writing with no reader blocks: a daemon still running by then is
    // stuck in that open.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let _ = std::fs::remove_dir_all(&d);
    let status = status.unwrap_or_else(|| panic!("tcpstate hung opening a FIFO: {err}"));
    assert!(!status.success(), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(
        err.starts_with("tcpstate: error: ") && err.matches("it is a FIFO").count() == 1,
        "{err:?}"
    );
}

#[test]
fn a_fifo_put_at_the_log_path_is_warned_about_and_the_daemon_runs_on() {
    if !require_bpf() {
        return;
    }
    let d = dir("reopen");
    let log = d.join("log.jsonl");
    let stderr_path = d.join("stderr");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let daemon = Daemon::start_with_stderr(
        &["--log-file", log.to_str().expect("utf-8 path")],
        Stdio::from(stderr),
    );
    std::fs::remove_file(&log).expect("rm the log");
    mkfifo(&log);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.pid(), libc::SIGHUP) };
    // The reopen, then a path check or two, all meet the FIFO.
    std::thread::sleep(Duration::from_millis(2500));
    // A daemon stuck in open() would not answer SIGTERM: stop() would find no `stopped`.
    let records = daemon.stop();
    assert!(records.iter().any(|r| r["type"] == "stopped"));
    let err = std::fs::read_to_string(&stderr_path).expect("stderr");
    let _ = std::fs::remove_dir_all(&d);
    assert!(
        err.lines().any(
            |l| l.starts_with("tcpstate: warning: cannot reopen") && l.contains("it is a FIFO")
        ),
        "{err}"
    );
}
