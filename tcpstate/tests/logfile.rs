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

/// A disk that stops writing: an ext4 image on a loop device, frozen with `fsfreeze` (every
/// write to it waits until it is thawed), as a stuck or throttled disk holds a writer.
struct FrozenDisk {
    mnt: PathBuf,
    image: PathBuf,
    frozen: bool,
}

impl FrozenDisk {
    fn new(name: &str) -> Self {
        let d = dir(name);
        let (image, mnt) = (d.join("disk.img"), d.join("mnt"));
        std::fs::create_dir_all(&mnt).expect("mnt");
        let f = std::fs::File::create(&image).expect("image");
        f.set_len(32 << 20).expect("size the image");
        let run = |argv: &[&str]| {
            let st = Command::new(argv[0])
                .args(&argv[1..])
                .stdout(Stdio::null())
                .status()
                .unwrap_or_else(|e| panic!("{}: {e}", argv[0]));
            assert!(st.success(), "{argv:?}");
        };
        run(&["mkfs.ext4", "-q", "-F", image.to_str().expect("utf-8")]);
        run(&[
            "mount",
            "-o",
            "loop",
            image.to_str().expect("utf-8"),
            mnt.to_str().expect("utf-8"),
        ]);
        Self {
            mnt,
            image,
            frozen: false,
        }
    }

    fn freeze(&mut self, on: bool) {
        let flag = if on { "-f" } else { "-u" };
        let st = Command::new("fsfreeze")
            .args([flag, self.mnt.to_str().expect("utf-8")])
            .status()
            .expect("fsfreeze");
        assert!(st.success(), "fsfreeze {flag}");
        self.frozen = on;
    }
}

impl Drop for FrozenDisk {
    fn drop(&mut self) {
        // Thawed first, or the unmount (and a writer blocked on it) would wait for ever.
        if self.frozen {
            let _ = Command::new("fsfreeze").arg("-u").arg(&self.mnt).status();
        }
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Issue 17.2: the log is written by its own thread. With the disk under it frozen, the daemon
/// goes on: every scrape answers within a second and counts the events as they happen. Once
/// thawed, the log holds every record, whole, and nothing was dropped (16 MiB queue).
#[test]
fn a_frozen_disk_under_the_log_stalls_only_the_log_writer() {
    if !require_bpf() {
        return;
    }
    let ns = common::Netns::new();
    let mport = common::free_port();
    // Declared before the disk, so the disk is thawed before the daemon is stopped or killed.
    let daemon;
    let mut disk = FrozenDisk::new("frozen");
    let log = disk.mnt.join("log.jsonl");
    let path = format!("/run/netns/{}", ns.name);
    daemon = Daemon::start(&[
        "--netns",
        &path,
        "--log-file",
        log.to_str().expect("utf-8"),
        "--log-rate",
        "0",
        "--metrics-addr",
        &format!("127.0.0.1:{mport}"),
    ]);
    disk.freeze(true);
    const N: u64 = 500;
    let p = common::port(27600);
    ns.run(move || {
        let l = std::net::TcpListener::bind(("127.0.0.1", p)).expect("listen");
        for _ in 0..N {
            let c = std::net::TcpStream::connect(("127.0.0.1", p)).expect("connect");
            let (s, _) = l.accept().expect("accept");
            drop(c);
            drop(s);
        }
    });
    // Each transition of those connections is a log record waiting on the frozen disk; the
    // engine has applied them all the same.
    let events = |page: &str| -> u64 {
        page.lines()
            .find_map(|l| l.strip_prefix("tcpstate_events_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let mut slowest = Duration::ZERO;
    let mut seen = 0;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let asked = Instant::now();
        let page = common::http_get(mport, "/metrics");
        slowest = slowest.max(asked.elapsed());
        seen = events(&page);
        std::thread::sleep(Duration::from_millis(200));
    }
    let written_while_frozen = std::fs::read_to_string(&log).map_or(0, |t| t.lines().count());
    disk.freeze(false);
    let records = daemon.stop();
    let text = std::fs::read_to_string(&log).expect("the log");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a torn line ({e}): {l}")))
        .collect();
    assert!(
        slowest < Duration::from_secs(1),
        "a scrape took {slowest:?} while the log's disk was frozen"
    );
    assert!(
        seen >= 10 * N,
        "the engine applied the events while the disk was frozen: {seen} counted"
    );
    assert!(written_while_frozen <= 1, "nothing reached a frozen disk");
    let births = lines
        .iter()
        .filter(|r| r["new"] == "SYN_SENT" && r["dport"] == p)
        .count() as u64;
    assert_eq!(births, N, "every record was written once thawed");
    let stopped = records
        .iter()
        .find(|r| r["type"] == "stopped")
        .expect("stopped");
    assert_eq!(stopped["log_dropped"], 0, "{stopped}");
    assert!(lines.iter().any(|r| r["type"] == "stopped"));
}
