//! What a busy host does to the daemon that a quiet loopback never shows: scanners, other
//! ports' and other namespaces' TIME_WAIT churn, request sockets at start-up.

mod common;

use std::{
    io::Read as _,
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use common::{Daemon, Netns, port, require_bpf, status_counts};
use serde_json::Value;

fn ts(v: &Value) -> SystemTime {
    humantime::parse_rfc3339(v["ts"].as_str().expect("ts")).expect("rfc3339")
}

/// A server socket in CLOSE_WAIT on port `p` in `ns`: its client closed, it never does.
fn close_wait(ns: &Netns, p: u16) -> (TcpStream, TcpListener) {
    ns.run(move || {
        let l = TcpListener::bind(("127.0.0.1", p)).expect("bind");
        let c = TcpStream::connect(("127.0.0.1", p)).expect("connect");
        let (mut s, _) = l.accept().expect("accept");
        drop(c);
        let mut buf = [0u8; 1];
        assert_eq!(s.read(&mut buf).expect("eof"), 0, "peer closed");
        (s, l)
    })
}

/// Connects to a closed port in `ns` until `stop`: each SYN is answered by a reset for no
/// socket, as a scanner's are. Returns how many were sent.
fn scanner(ns: &Netns, closed: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd as _;
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: valid fd; setns affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let r = TcpStream::connect(("127.0.0.1", closed));
            assert!(r.is_err(), "port {closed} was meant to be closed");
            n += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        n
    })
}

/// Issue 20.1: every reset for no socket (a scanner's SYN to a closed port) looked like a
/// lost event, so the table stayed "incomplete" and no anomaly was ever raised.
#[test]
fn scanner_resets_do_not_turn_detection_off() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let p = port(21000);
    let closed = port(21500);
    let mut daemon = Daemon::start(&["--port", &p.to_string(), "--threshold", "close_wait=2s"]);
    let stop = Arc::new(AtomicBool::new(false));
    let scan = scanner(&ns, closed, stop.clone());
    // Let the resets start before the stuck socket does.
    std::thread::sleep(Duration::from_millis(500));
    let (server, _listener) = close_wait(&ns, p);
    let entered = daemon
        .wait_for(Duration::from_secs(5), |r| {
            r["type"] == "transition" && r["new"] == "CLOSE_WAIT" && r["netns"] == ns.inode
        })
        .expect("the server socket entered CLOSE_WAIT");
    let anomaly = daemon.wait_for(Duration::from_secs(6), |r| {
        r["type"] == "anomaly" && r["netns"] == ns.inode
    });
    stop.store(true, Ordering::Relaxed);
    let scans = scan.join().expect("scanner");
    let anomaly = anomaly.unwrap_or_else(|| {
        panic!("no anomaly in 6 s under {scans} resets for no socket: {entered}")
    });
    let late = ts(&anomaly)
        .duration_since(ts(&entered))
        .expect("after entry");
    assert!(
        late >= Duration::from_secs(2) && late < Duration::from_secs(3),
        "raised {late:?} after entering CLOSE_WAIT, under {scans} resets for no socket"
    );
    assert_eq!(anomaly["kind"], "close_wait");
    assert!(scans > 500, "the scanner sent only {scans} SYNs");
    drop(server);
    let records = daemon.stop();
    let stopped = records.last().expect("stopped");
    assert_eq!(stopped["dropped"], 0, "{stopped}");
}

/// `n` connections to `p` (run inside a namespace), each closed by its client first, so each
/// leaves a TIME_WAIT mini-socket on the client's side.
fn time_waits_to(p: u16, n: usize) {
    let l = TcpListener::bind(("127.0.0.1", p)).expect("bind");
    for _ in 0..n {
        let c = TcpStream::connect(("127.0.0.1", p)).expect("connect");
        let (mut s, _) = l.accept().expect("accept");
        drop(c);
        let mut buf = [0u8; 1];
        assert_eq!(s.read(&mut buf).expect("eof"), 0, "client closed");
    }
}

/// TIME_WAIT sockets to or from port `p` in `ns`, as `ss` counts them.
fn ss_time_wait(ns: &Netns, p: u16) -> u64 {
    let filter = format!("( sport = :{p} or dport = :{p} )");
    let out = ns
        .command("ss")
        .args(["-tanH", "state", "time-wait", &filter])
        .output()
        .expect("ss");
    assert!(out.status.success(), "ss: {out:?}");
    String::from_utf8_lossy(&out.stdout).lines().count() as u64
}

/// Issue 20.2: a reconciliation adopted every TIME_WAIT of each namespace it dumped, whatever
/// `--port` and `--netns` said, and after a loss it dumped every namespace on the host.
#[test]
fn port_and_netns_filters_hold_for_what_reconciliation_adopts() {
    if !require_bpf() {
        return;
    }
    let (ours, other) = (Netns::new(), Netns::new());
    let (p, q) = (port(21100), port(21200));
    let daemon = Daemon::watching(&ours)
        .port(p)
        .args(["--ring-size", "4K", "--reconcile-interval", "1s"])
        .metrics()
        .start();
    // Ours: 5 on the port the daemon watches, 20 on another one it must not count.
    ours.run(move || {
        time_waits_to(p, 5);
        time_waits_to(q, 20);
    });
    // Another namespace: its churn on the watched port overflows the frozen daemon's small
    // ring, so a reconciliation that looks everywhere follows.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.pid(), libc::SIGSTOP) };
    other.run(move || time_waits_to(p, 300));
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: as above.
    unsafe { libc::kill(daemon.pid(), libc::SIGCONT) };
    // Several reconciliations, a full one among them (the first after a loss is).
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut samples = Vec::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        samples.push(
            status_counts(&daemon)
                .get("TIME_WAIT")
                .copied()
                .unwrap_or(0),
        );
    }
    let want = ss_time_wait(&ours, p);
    let records = daemon.stop();
    let stopped = records.last().expect("stopped");
    assert!(
        stopped["dropped"].as_u64().unwrap_or(0) > 0,
        "the other namespace's churn overflowed the ring: {stopped}"
    );
    assert_eq!(want, 5, "ss in our namespace");
    assert!(
        samples.iter().all(|&n| n == want),
        "TIME_WAIT per /status, every 0.5 s: {samples:?}; ss says {want}"
    );
    let foreign: Vec<&Value> = records
        .iter()
        .filter(|r| r["type"] == "transition" && r["netns"] != ours.inode && r["netns"] != 0)
        .collect();
    assert!(
        foreign.is_empty(),
        "another namespace's records: {foreign:?}"
    );
    let other_ports: Vec<&Value> = records
        .iter()
        .filter(|r| r["type"] == "transition" && r["sport"] != p && r["dport"] != p)
        .collect();
    assert!(
        other_ports.is_empty(),
        "other ports' records: {other_ports:?}"
    );
}

/// Issue 20.3: a connect's birth event comes before the kernel picks its local port, so a
/// stuck SYN_SENT was reported with local port 0, could not be looked up, and its owner was
/// only guessed. The SYN retransmits carry the port.
#[test]
fn a_stuck_syn_sent_has_its_local_port_and_verified_owner() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    // A veth pair inside the namespace; the peer address has a permanent neighbour entry, so
    // the SYNs leave at once and the other end drops them (not its address): a black hole.
    for argv in [
        "link add bh0 type veth peer name bh1",
        "addr add 10.96.0.1/24 dev bh0",
        "link set bh0 up",
        "link set bh1 up",
        "neigh add 10.96.0.2 lladdr 02:00:00:00:00:01 nud permanent dev bh0",
    ] {
        let mut args = vec!["-n", &ns.name];
        args.extend(argv.split(' '));
        common::ip(&args);
    }
    let p = port(21300);
    let mut daemon = Daemon::start(&["--port", &p.to_string(), "--threshold", "syn_sent=2s"]);
    let (sock, local) = ns.run(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        s.set_nonblocking(true).expect("nonblocking");
        let to = std::net::SocketAddr::from(([10, 96, 0, 2], p));
        let r = s.connect(&to.into());
        assert!(
            r.as_ref()
                .is_err_and(|e| e.raw_os_error() == Some(libc::EINPROGRESS)),
            "connect: {r:?}"
        );
        let local = s
            .local_addr()
            .expect("local")
            .as_socket()
            .expect("inet")
            .port();
        (s, local)
    });
    assert_ne!(local, 0);
    let anomaly = daemon
        .wait_for(Duration::from_secs(6), |r| {
            r["type"] == "anomaly" && r["netns"] == ns.inode
        })
        .expect("syn_sent anomaly");
    assert_eq!(anomaly["kind"], "syn_sent", "{anomaly}");
    assert_eq!(
        (&anomaly["saddr"], &anomaly["sport"], &anomaly["dport"]),
        (&"10.96.0.1".into(), &local.into(), &p.into()),
        "{anomaly}"
    );
    assert_eq!(anomaly["owner_source"], "fd", "{anomaly}");
    assert_eq!(anomaly["pid"], std::process::id(), "{anomaly}");
    drop(sock);
    drop(daemon.stop());
}

/// A pre-fork server in `ns`: the parent listens on `p` then forks a worker that accepts
/// `n` connections and holds them; both sleep. Prints "parent PID" and "worker PID".
fn pre_fork_server(ns: &Netns, p: u16, n: usize) -> (std::process::Child, u32, u32) {
    use std::io::BufRead as _;
    let script = format!(
        "import os, socket, sys, time\n\
         l = socket.socket()\n\
         l.bind(('127.0.0.1', {p}))\n\
         l.listen(64)\n\
         if os.fork() == 0:\n\
         \x20   held = [l.accept()[0] for _ in range({n})]\n\
         \x20   os.write(1, b'worker %d\\n' % os.getpid())\n\
         \x20   time.sleep(60)\n\
         else:\n\
         \x20   os.write(1, b'parent %d\\n' % os.getpid())\n\
         \x20   time.sleep(60)\n"
    );
    let mut child = ns
        .command("python3")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let parent = rx.recv_timeout(Duration::from_secs(30)).expect("parent");
    let pid = |line: &str, who: &str| -> u32 {
        line.strip_prefix(who)
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("expected {who} PID, got {line:?}"))
    };
    let parent = pid(&parent, "parent");
    // The worker prints once it holds every connection: the clients come first.
    for _ in 0..n {
        let ready = ns.run(move || TcpStream::connect(("127.0.0.1", p)).map(drop));
        ready.expect("client");
    }
    let worker = rx.recv_timeout(Duration::from_secs(30)).expect("worker");
    (child, parent, pid(&worker, "worker"))
}

/// Issue 20.5: once an owner check finds a socket's holder, that process is its owner
/// everywhere. The leak rule named the pre-fork server's parent (whose listen() made the first
/// guess) for the CLOSE_WAIT sockets its worker holds.
#[test]
fn a_verified_holder_is_the_owner_everywhere() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let p = port(21400);
    let mut daemon = Daemon::start(&[
        "--port",
        &p.to_string(),
        "--threshold",
        "close_wait=1s",
        "--leak-threshold",
        "2",
        "--leak-interval",
        "1s",
    ]);
    let (mut server, parent, worker) = pre_fork_server(&ns, p, 3);
    let mut raised = Vec::new();
    while raised.len() < 3 {
        let a = daemon
            .wait_for(Duration::from_secs(5), |r| {
                r["type"] == "anomaly" && r["netns"] == ns.inode
            })
            .unwrap_or_else(|| panic!("3 close_wait anomalies, got {raised:?}"));
        raised.push(a);
    }
    for a in &raised {
        assert_eq!(
            (&a["pid"], &a["owner_source"]),
            (&worker.into(), &"fd".into()),
            "parent {parent}: {a}"
        );
    }
    // A leak check between the entry into CLOSE_WAIT and the owner check can still name the
    // first guess; every check after it must name the worker.
    let leak = daemon.wait_for(Duration::from_secs(5), |r| {
        r["type"] == "leak_suspected" && r["pid"] == worker
    });
    // SAFETY: signalling the worker this test started.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    let _ = server.kill();
    let _ = server.wait();
    for _ in 0..3 {
        daemon.wait_for(Duration::from_secs(5), |r| {
            r["type"] == "anomaly_resolved" && r["netns"] == ns.inode
        });
    }
    let records = daemon.stop();
    let leaks: Vec<&Value> = records
        .iter()
        .filter(|r| r["type"] == "leak_suspected")
        .collect();
    assert!(
        leak.is_some(),
        "parent {parent}, worker {worker}: {leaks:?}"
    );
    let checked = ts(&raised[2]);
    let late_guess: Vec<&&Value> = leaks
        .iter()
        .filter(|r| r["pid"] == parent && ts(r) > checked)
        .collect();
    assert!(late_guess.is_empty(), "worker {worker}: {late_guess:?}");
    let resolved: Vec<&Value> = records
        .iter()
        .filter(|r| r["type"] == "anomaly_resolved" && r["netns"] == ns.inode)
        .collect();
    assert_eq!(resolved.len(), 3, "{resolved:?}");
    for r in resolved {
        assert_eq!(r["pid"], worker, "parent {parent}: {r}");
    }
}

/// Issue 20.11: a child makes `n` CLOSE_WAIT sockets on port `p` in a namespace of its own
/// (unshare), passes their fds to its parent over SCM_RIGHTS and exits: the namespace has no
/// process and no name, yet lives on. Returns the parent (holding the fds) and its pid.
fn sockets_outliving_their_namespace(p: u16, n: usize) -> (std::process::Child, u32) {
    use std::io::BufRead as _;
    let script = format!(
        "import ctypes, os, socket, subprocess, time\n\
         parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         if os.fork() == 0:\n\
         \x20   assert ctypes.CDLL(None, use_errno=True).unshare(0x40000000) == 0\n\
         \x20   subprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=True)\n\
         \x20   l = socket.socket()\n\
         \x20   l.bind(('127.0.0.1', {p}))\n\
         \x20   l.listen(16)\n\
         \x20   servers = []\n\
         \x20   for _ in range({n}):\n\
         \x20       c = socket.create_connection(('127.0.0.1', {p}))\n\
         \x20       s, _ = l.accept()\n\
         \x20       c.close()\n\
         \x20       assert s.recv(1) == b''\n\
         \x20       servers.append(s)\n\
         \x20   socket.send_fds(child, [b'x'], [s.fileno() for s in servers])\n\
         \x20   os._exit(0)\n\
         msg, fds, _, _ = socket.recv_fds(parent, 1, {n})\n\
         os.wait()\n\
         print('holder', os.getpid(), len(fds), flush=True)\n\
         time.sleep(60)\n"
    );
    let mut child = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let out = child.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(out)
        .read_line(&mut line)
        .expect("holder line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "{line:?}");
    assert_eq!(fields[2], n.to_string(), "{line:?}");
    (child, fields[1].parse().expect("pid"))
}

/// Issue 20.11: live sockets in a namespace no process is in were dropped as if the namespace
/// were gone (and their anomalies never raised).
#[test]
fn sockets_in_a_namespace_no_process_is_in_are_kept() {
    if !require_bpf() {
        return;
    }
    let p = port(21500);
    // Host-wide: the namespace is made after the daemon starts, and outlives every process.
    let mut daemon = Daemon::host_wide()
        .port(p)
        .threshold("close_wait=2s")
        .args(["--reconcile-interval", "1s"])
        .metrics()
        .start();
    let (mut holder, pid) = sockets_outliving_their_namespace(p, 5);
    let mut raised = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(8);
    while raised.len() < 5 && Instant::now() < deadline {
        if let Some(a) = daemon.wait_for(Duration::from_millis(500), |r| {
            r["type"] == "anomaly" && r["kind"] == "close_wait" && r["sport"] == p
        }) {
            raised.push(a);
        }
    }
    // Several reconciliations later, still tracked.
    std::thread::sleep(Duration::from_secs(3));
    let counts = status_counts(&daemon);
    let _ = holder.kill();
    let _ = holder.wait();
    let records = daemon.stop();
    let gone: Vec<&Value> = records
        .iter()
        .filter(|r| r["type"] == "anomaly_resolved" && r["resolution"] == "netns_gone")
        .filter(|r| r["sport"] == p)
        .collect();
    assert_eq!(raised.len(), 5, "{raised:?}; resolved as gone: {gone:?}");
    for a in &raised {
        assert_eq!(
            (&a["pid"], &a["owner_source"]),
            (&pid.into(), &"fd".into()),
            "{a}"
        );
    }
    assert!(gone.is_empty(), "{gone:?}");
    assert_eq!(counts.get("CLOSE_WAIT").copied(), Some(5), "{counts:?}");
}

/// Issue 20.6: a socket held by two processes (inherited across a fork) names both, as
/// `ss -p` does, the lowest pid first.
#[test]
fn a_socket_held_by_two_processes_names_both() {
    if !require_bpf() {
        return;
    }
    use std::io::BufRead as _;
    let ns = Netns::new();
    let p = port(21600);
    let mut daemon = Daemon::start(&["--port", &p.to_string(), "--threshold", "close_wait=1s"]);
    let script = format!(
        "import os, socket, time\n\
         l = socket.socket()\n\
         l.bind(('127.0.0.1', {p}))\n\
         l.listen(4)\n\
         c = socket.create_connection(('127.0.0.1', {p}))\n\
         s, _ = l.accept()\n\
         c.close()\n\
         assert s.recv(1) == b''\n\
         if os.fork() == 0:\n\
         \x20   os.write(1, b'child %d\\n' % os.getpid())\n\
         \x20   time.sleep(30)\n\
         else:\n\
         \x20   os.write(1, b'parent %d\\n' % os.getpid())\n\
         \x20   time.sleep(30)\n"
    );
    let mut py = ns
        .command("python3")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let out = py.stdout.take().expect("stdout");
    let mut pids: Vec<u32> = std::io::BufReader::new(out)
        .lines()
        .take(2)
        .map(|l| {
            let l = l.expect("line");
            l.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("{l:?}"))
        })
        .collect();
    pids.sort_unstable();
    let anomaly = daemon.wait_for(Duration::from_secs(5), |r| {
        r["type"] == "anomaly" && r["netns"] == ns.inode
    });
    // `kill --pid` matches the second holder too.
    let dry = std::process::Command::new(env!("CARGO_BIN_EXE_tcpstate"))
        .args(["kill", "--state", "close_wait", "--lport", &p.to_string()])
        .args([
            "--pid",
            &pids[1].to_string(),
            "--control-socket",
            "/nonexistent/control.sock",
            "--dry-run",
        ])
        .output()
        .expect("tcpstate kill");
    for &pid in &pids {
        // SAFETY: signalling processes this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let _ = py.wait();
    drop(daemon.stop());
    let anomaly = anomaly.expect("close_wait anomaly");
    let holders: Vec<u64> = anomaly["holders"]
        .as_array()
        .unwrap_or_else(|| panic!("no holders: {anomaly}"))
        .iter()
        .filter_map(|h| h["pid"].as_u64())
        .collect();
    assert_eq!(
        holders,
        pids.iter().map(|&p| u64::from(p)).collect::<Vec<_>>(),
        "{anomaly}"
    );
    assert_eq!(anomaly["pid"], pids[0], "{anomaly}");
    assert_eq!(anomaly["owner_source"], "fd", "{anomaly}");
    let listed = String::from_utf8_lossy(&dry.stdout);
    assert!(dry.status.success(), "{dry:?}");
    assert_eq!(
        listed
            .lines()
            .filter(|l| l.starts_with("would kill"))
            .count(),
        1,
        "{listed}"
    );
}

/// Issue 21.6: namespaces that no process is in, pinned only by listeners' fds, are reached
/// through those fds (our fd of each). When their sockets close, only our fds keep them
/// alive: every worker lets them go within seconds, so the daemon's fd count is back to its
/// baseline. Before, namespaces whose sockets closed by their events were never asked about
/// again, and up to 64 stayed held for good (with a netlink socket each).
#[test]
fn namespaces_held_only_by_our_fds_are_let_go_when_their_sockets_close() {
    if !require_bpf() {
        return;
    }
    let p = port(28700);
    let daemon = Daemon::start(&["--port", &p.to_string()]);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
            .map(Iterator::count)
            .unwrap_or(0)
    };
    std::thread::sleep(Duration::from_secs(2));
    let baseline = fds();
    // 20 namespaces made by one thread, each left with nothing but a listener in it.
    let listeners: Vec<TcpListener> = std::thread::spawn(move || {
        (0..20)
            .map(|_| {
                // SAFETY: unshare affects only this thread's network namespace.
                let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
                TcpListener::bind(("0.0.0.0", p)).expect("listen")
            })
            .collect()
    })
    .join()
    .expect("the namespace maker");
    let until = Instant::now() + Duration::from_secs(15);
    let mut most = baseline;
    while Instant::now() < until && most < baseline + 20 {
        most = most.max(fds());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        most >= baseline + 20,
        "the daemon reached the namespaces through the listeners' fds: {most} fds, {baseline} before"
    );
    drop(listeners);
    let until = Instant::now() + Duration::from_secs(20);
    let mut now = fds();
    while Instant::now() < until && now > baseline {
        std::thread::sleep(Duration::from_millis(250));
        now = fds();
    }
    daemon.stop();
    assert!(
        now <= baseline,
        "{now} fds 20 s after the sockets closed, {baseline} before the namespaces came"
    );
}
