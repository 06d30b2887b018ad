//! What goes wrong around the daemon: a full disk, a stopped daemon with a tiny ring, a reader
//! that stops reading, a descriptor limit, a planted symlink, hostile process names, a pipe
//! that closes. The real daemon, real traffic, exact outcomes.

mod common;

use std::{
    ffi::CString,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::{fs::OpenOptionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Daemon, Netns, free_port, http_get, port, reconciled_away, require_bpf};
use serde_json::Value;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tcpstate-faults-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).expect("tmpdir");
    d
}

/// `n` connect/close pairs on `p` inside the namespace.
fn churn(ns: &Netns, p: u16, n: usize) {
    ns.run(move || {
        // The last round's server sockets can still hold the port (LAST_ACK, CLOSING) for a
        // moment: wait for them rather than fail on a slow machine.
        let deadline = Instant::now() + Duration::from_secs(10);
        let l = loop {
            match TcpListener::bind(("127.0.0.1", p)) {
                Ok(l) => break l,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("bind {p}: {e}"),
            }
        };
        for _ in 0..n {
            let c = TcpStream::connect(("127.0.0.1", p)).expect("connect");
            let (s, _) = l.accept().expect("accept");
            drop(c);
            drop(s);
        }
    });
}

fn rss_kib(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn cpu_ticks(pid: i32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), 11 and 12 after the comm.
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// Mounts a tmpfs of `size`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(dir: &Path, size: &str) -> Self {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mount tmpfs on {}", dir.display());
        Self(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A full disk: the daemon runs on, memory stays flat, the log holds whole lines written
/// once, and the loss is counted and warned about once per interval.
#[test]
fn a_full_log_disk_loses_records_counted_never_memory_or_whole_lines() {
    if !require_bpf() {
        return;
    }
    let dir = tmpdir("diskfull");
    let _fs = Tmpfs::new(&dir, "256k");
    let log = dir.join("t.jsonl");
    let ns = Netns::new();
    let p = port(32000);
    let mport = free_port();
    let mut daemon = Daemon::start(&[
        "--port",
        &p.to_string(),
        "--log-file",
        log.to_str().expect("utf8"),
        "--log-rate",
        "0",
        "--stats-interval",
        "1s",
        "--metrics-addr",
        &format!("127.0.0.1:{mport}"),
    ]);
    churn(&ns, p, 600);
    let rss_full = rss_kib(daemon.pid());
    churn(&ns, p, 1500);
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = rss_kib(daemon.pid());
    let metrics = http_get(mport, "/metrics");
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tcpstate_log_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    // Stdout (JSON) still got every transition.
    let seen = daemon.wait_for(Duration::from_secs(2), |_| false);
    assert!(seen.is_none());
    let transitions = daemon
        .records
        .iter()
        .filter(|r| r["type"] == "transition")
        .count();
    let records = daemon.stop();
    let stopped = records.last().expect("stopped").clone();
    assert!(dropped > 0, "the loss is counted: {metrics}");
    assert!(transitions >= 2100 * 4, "stdout carried on: {transitions}");
    assert!(
        rss_after < rss_full + 8 * 1024,
        "memory flat while the disk is full: {rss_full} -> {rss_after} KiB"
    );
    assert!(
        stopped["log_dropped"].as_u64().unwrap_or(0) >= dropped,
        "{stopped}"
    );
    let text = fs::read_to_string(&log).expect("log");
    let mut seen = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("line {}: a spliced record ({e}): {line}", i + 1));
        assert!(
            seen.insert(line.to_owned()),
            "line {} written twice: {v}",
            i + 1
        );
    }
    assert!(text.ends_with('\n') || text.is_empty());
}

/// A stopped daemon and a ring of 64 events per CPU: the rings wrap and drop, the drops are
/// counted, the ghosts that lost their close are reconciled before any anomaly is raised, and
/// a real anomaly afterwards is still raised.
#[test]
fn a_stopped_daemon_drops_counted_and_raises_no_false_anomaly() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let p = port(13000);
    let mut daemon = Daemon::start(&[
        "--port",
        &p.to_string(),
        "--ring-size",
        "4K",
        "--threshold",
        "close_wait=1s",
    ]);
    // Twenty servers in CLOSE_WAIT, seen by the daemon.
    let (l, held) = ns.run(move || {
        let l = TcpListener::bind(("127.0.0.1", p)).expect("bind");
        let held: Vec<TcpStream> = (0..20)
            .map(|_| {
                let c = TcpStream::connect(("127.0.0.1", p)).expect("connect");
                let (s, _) = l.accept().expect("accept");
                drop(c);
                s
            })
            .collect();
        (l, held)
    });
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.pid(), libc::SIGSTOP) };
    let l = ns.run(move || {
        // Fill the rings, then close the CLOSE_WAIT servers: those closes are lost.
        for _ in 0..300 {
            let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
            let (s, _) = l.accept().expect("accept");
            drop((c, s));
        }
        drop(held);
        l
    });
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: as above.
    unsafe { libc::kill(daemon.pid(), libc::SIGCONT) };
    // The ghosts are older than the threshold now; none may be raised.
    let false_alarm = daemon.wait_for(Duration::from_secs(3), |r| r["type"] == "anomaly");
    assert!(
        false_alarm.is_none(),
        "raised from a ghost: {false_alarm:?}"
    );
    // A real CLOSE_WAIT is still raised.
    let real = ns.run(move || {
        let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        drop(c);
        (l, s)
    });
    let raised = daemon.wait_for(Duration::from_secs(5), |r| r["type"] == "anomaly");
    drop(real);
    let records = daemon.stop();
    assert!(raised.is_some(), "a real anomaly after the loss");
    let stopped = records.last().expect("stopped");
    assert!(
        stopped["dropped"].as_u64().unwrap_or(0) > 0,
        "the wrap dropped events, counted: {stopped}"
    );
    let reconciled = reconciled_away(&records);
    assert!(
        reconciled.is_empty(),
        "no ghost was ever raised, so none is resolved: {reconciled:?}"
    );
}

/// A reader that stops reading stdout stalls nothing: metrics answer, the log goes on, and the
/// records stdout could not take are counted.
#[test]
fn a_stopped_stdout_reader_stalls_nothing() {
    if !require_bpf() {
        return;
    }
    let dir = tmpdir("fifo");
    let fifo = dir.join("out");
    let c = CString::new(fifo.to_str().expect("utf8")).expect("cstr");
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // Opened for reading first (non-blocking), and never read.
    let reader = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("reader");
    let writer = fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .expect("writer");
    let log = dir.join("t.jsonl");
    let ns = Netns::new();
    let p = port(14000);
    let mport = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tcpstate"))
        .args([
            "run",
            "--format",
            "json",
            "--port",
            &p.to_string(),
            "--log-file",
            log.to_str().expect("utf8"),
            "--log-rate",
            "0",
            "--metrics-addr",
            &format!("127.0.0.1:{mport}"),
        ])
        .stdout(writer)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tcpstate");
    let started = Instant::now();
    while !fs::read_to_string(&log).is_ok_and(|t| t.contains("\"started\"")) {
        assert!(started.elapsed() < Duration::from_secs(30), "no start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Twenty thousand records: far more than a pipe holds, more than the 4 MiB queue.
    churn(&ns, p, 2000);
    let asked = Instant::now();
    let metrics = http_get(mport, "/metrics");
    let took = asked.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let logged = fs::read_to_string(&log)
        .expect("log")
        .lines()
        .filter(|l| l.contains("\"transition\""))
        .count();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    drop(reader);
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(1), "/metrics took {took:?}");
    assert!(logged >= 8000, "the log went on: {logged}");
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tcpstate_stdout_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        dropped > 0,
        "what stdout could not take is counted: {metrics}"
    );
    let _ = fs::remove_dir_all(dir);
}

/// Out of descriptors, the accept loop backs off instead of spinning, and serves again once
/// they come back.
#[test]
fn accept_errors_back_off_instead_of_spinning() {
    if !require_bpf() {
        return;
    }
    let mport = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tcpstate"));
    child
        .args([
            "run",
            "--format",
            "json",
            "--port",
            "1",
            "--no-seed",
            "--metrics-addr",
            &format!("127.0.0.1:{mport}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: setrlimit in the child before exec, async-signal-safe.
    unsafe {
        child.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 40,
                rlim_max: 40,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = child.spawn().expect("start tcpstate");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    assert!(first.contains("\"started\""), "{first}");
    let pid = child.id() as i32;
    // Idle connections until its descriptors run out.
    let idle: Vec<TcpStream> = (0..200)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", mport)).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_ticks(pid) - before;
    drop(idle);
    // Served again (idle clients are cut off after the head timeout at the latest).
    let served = (0..40).any(|_| {
        std::thread::sleep(Duration::from_millis(250));
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", mport)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = write!(s, "GET /metrics HTTP/1.1\r\n\r\n");
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("tcpstate_events_total")
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let _ = child.wait();
    // 2 s of a spinning loop is 200 ticks; backing off is a handful.
    assert!(spent < 40, "{spent} clock ticks in 2 s out of descriptors");
    assert!(served, "/metrics answers again once descriptors are back");
}

#[test]
fn a_log_path_that_is_a_symlink_is_refused() {
    if !require_bpf() {
        return;
    }
    let dir = tmpdir("symlink");
    let link = dir.join("t.jsonl");
    std::os::unix::fs::symlink("/etc/hostname", &link).expect("symlink");
    let out = Command::new(env!("CARGO_BIN_EXE_tcpstate"))
        .args(["run", "--log-file", link.to_str().expect("utf8")])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("symbolic link"), "{err}");
    let _ = fs::remove_dir_all(dir);
}

/// A process named with terminal control sequences makes connections: text output escapes
/// them, JSON keeps the exact name.
#[test]
fn hostile_process_names_reach_no_terminal() {
    if !require_bpf() {
        return;
    }
    const NAME: &[u8] = b"\x1b[31mEVIL\x1b]0;x\x07";
    let ns = Netns::new();
    let p = port(15000);
    let run = |format: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tcpstate"))
            .args(["run", "--format", format, "--port", &p.to_string()])
            .arg("--control-socket")
            .arg(common::control_socket())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tcpstate");
        let mut out = child.stdout.take().expect("stdout");
        let mut first = [0u8; 64];
        let _ = out.read(&mut first);
        std::thread::sleep(Duration::from_millis(300));
        ns.run(move || {
            let name = CString::new(NAME).expect("cstr");
            // SAFETY: PR_SET_NAME with a NUL-terminated name (truncated to 15 bytes).
            unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
            let l = TcpListener::bind(("127.0.0.1", p)).expect("bind");
            let c = TcpStream::connect(("127.0.0.1", p)).expect("connect");
            let (s, _) = l.accept().expect("accept");
            drop((c, s));
        });
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let mut rest = Vec::new();
        let _ = out.read_to_end(&mut rest);
        let _ = child.wait();
        [&first[..], &rest[..]].concat()
    };
    let text = run("text");
    assert!(
        !text.contains(&0x1b) && !text.contains(&0x07),
        "{:?}",
        String::from_utf8_lossy(&text)
    );
    let shown = String::from_utf8_lossy(&text);
    assert!(shown.contains("\\e[31mEVIL\\e]0;x"), "{shown}");
    let json = run("json");
    let exact = String::from_utf8_lossy(&json)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .any(|r| {
            r["comm"]
                .as_str()
                .is_some_and(|c| c.as_bytes() == &NAME[..15])
        });
    assert!(exact, "JSON keeps the exact (15-byte) name");
}

/// A namespace deleted with TIME_WAIT sockets in it: they end with it (no tracepoint says so;
/// the next reconciliation finds the namespace gone).
#[test]
fn a_deleted_namespace_takes_its_mini_sockets_with_it() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let p = port(16000);
    let mport = free_port();
    let mut daemon = Daemon::start(&[
        "--port",
        &p.to_string(),
        "--reconcile-interval",
        "1s",
        "--metrics-addr",
        &format!("127.0.0.1:{mport}"),
    ]);
    ns.run(move || {
        let l = TcpListener::bind(("127.0.0.1", p)).expect("bind");
        for _ in 0..3 {
            let c = TcpStream::connect(("127.0.0.1", p)).expect("connect");
            let (s, _) = l.accept().expect("accept");
            drop(c);
            std::thread::sleep(Duration::from_millis(20));
            drop(s);
        }
    });
    let tw = daemon.wait_for(Duration::from_secs(3), |r| r["new"] == "TIME_WAIT");
    assert!(tw.is_some(), "TIME_WAIT entered");
    let inode = ns.inode;
    drop(ns);
    let gone = daemon.wait_for(Duration::from_secs(5), |r| {
        r["old"] == "TIME_WAIT" && r["via"] == "netns_gone"
    });
    let metrics = http_get(mport, "/metrics");
    let records = daemon.stop();
    assert!(gone.is_some(), "ended with the namespace: {records:#?}");
    let ended = records
        .iter()
        .filter(|r| r["old"] == "TIME_WAIT" && r["netns"] == inode)
        .count();
    assert_eq!(ended, 3, "{records:#?}");
    assert!(
        metrics.contains("tcpstate_sockets{state=\"TIME_WAIT\"} 0"),
        "{metrics}"
    );
}

/// Two daemons at once: each has its own program and rings, and both see every transition.
#[test]
fn two_daemons_see_the_same_transitions() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let p = port(17000);
    let a = Daemon::start(&["--port", &p.to_string()]);
    let b = Daemon::start(&["--port", &p.to_string()]);
    churn(&ns, p, 50);
    std::thread::sleep(Duration::from_millis(300));
    let (ra, rb) = (a.stop(), b.stop());
    let pairs = |rs: &[Value]| -> Vec<(String, String, u64)> {
        let mut v: Vec<_> = rs
            .iter()
            .filter(|r| r["type"] == "transition" && r["netns"] == ns.inode)
            .map(|r| {
                (
                    r["old"].as_str().unwrap_or("").to_owned(),
                    r["new"].as_str().unwrap_or("").to_owned(),
                    r["sport"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        v.sort();
        v
    };
    let (pa, pb) = (pairs(&ra), pairs(&rb));
    assert!(pa.len() >= 50 * 9, "{}", pa.len());
    assert_eq!(pa, pb, "both daemons saw the same transitions");
}
