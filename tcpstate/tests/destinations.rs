//! "Which upstream?": sockets counted per destination and holder, from real connections in a
//! namespace this test makes, as `status` (JSON and text), `/metrics` and the anomaly records
//! say them; and a scan of 65,536 destinations, which must not grow the series or the
//! daemon's map past their caps.

mod common;

use std::{
    net::TcpListener,
    process::Child,
    time::{Duration, Instant},
};

use common::{
    Daemon, Netns,
    cgroups::{Cgroups, holder_in},
    ip, port, require_bpf, veth_pair,
};
use serde_json::Value;

/// A process in cgroup `unit` (under the test's own subtree) and namespace `ns` that opens
/// `n` connections to each 127.0.0.1:port of `to` and holds them all.
fn holder(cgs: &mut Cgroups, unit: &str, ns: &Netns, to: &[(u16, u32)]) -> Child {
    let (dir, _) = cgs.make(unit);
    let opens: Vec<String> = to
        .iter()
        .map(|(p, n)| {
            format!("for i in $(seq {n}); do exec {{fd}}<>/dev/tcp/127.0.0.1/{p} || exit 1; done")
        })
        .collect();
    holder_in(&dir, ns, &opens.join(" && "))
}

/// Polls `/status` until `done` says yes; the last answer.
fn status_until(daemon: &Daemon, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    status_within(daemon, Duration::from_secs(15), what, done)
}

/// [`status_until`] with its own patience.
fn status_within(
    daemon: &Daemon,
    patience: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + patience;
    loop {
        let v = daemon.status();
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "never {what}: {v:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `/metrics` lines of one family's samples.
fn samples<'a>(metrics: &'a str, family: &str) -> Vec<&'a str> {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .collect()
}

/// 400 CLOSE_WAIT sockets to one upstream and 3 to another, all held by one process in
/// `payments-api.service`: status puts them in that order with exact counts, in those words,
/// `/metrics` has both series, and each anomaly says how many share its destination.
#[test]
fn close_wait_piles_are_named_by_destination_and_holder() {
    if !require_bpf() {
        return;
    }
    let mut cgs = Cgroups::new();
    let ns = Netns::new();
    let (big, small) = (port(19000), port(19600));
    let mut daemon = Daemon::watching(&ns)
        .threshold("close_wait=1s")
        .metrics()
        .start();
    // std's listen() backlog is 128: the 400 handshakes are queued before any accept.
    let listeners = ns.run(move || {
        [big, small].map(|p| {
            let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            l.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], p)).into())
                .expect("bind");
            l.listen(1024).expect("listen");
            TcpListener::from(l)
        })
    });
    let client = holder(
        &mut cgs,
        "system.slice/payments-api.service",
        &ns,
        &[(big, 400), (small, 3)],
    );
    // The server closes its ends: the client, which never will, sits in CLOSE_WAIT.
    for (l, n) in listeners.iter().zip([400, 3]) {
        for _ in 0..n {
            drop(l.accept().expect("accept"));
        }
    }
    let close_waits = |v: &Value| -> Vec<(String, String, String, u64)> {
        v["top_destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["state"] == "CLOSE_WAIT")
            .map(|d| {
                (
                    d["holder"].as_str().unwrap_or("?").to_owned(),
                    d["destination"].as_str().unwrap_or("?").to_owned(),
                    d["direction"].as_str().unwrap_or("?").to_owned(),
                    d["count"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    let status = status_until(&daemon, "403 CLOSE_WAIT", |v| {
        close_waits(v).iter().map(|d| d.3).sum::<u64>() == 403
    });
    let unit = "payments-api.service".to_owned();
    assert_eq!(
        close_waits(&status),
        [
            (
                unit.clone(),
                format!("127.0.0.1:{big}"),
                "outbound".to_owned(),
                400
            ),
            (unit, format!("127.0.0.1:{small}"), "outbound".to_owned(), 3),
        ],
        "{status:#}"
    );
    let metrics = daemon.get("/metrics");
    let text = daemon.status_text();
    let raised = daemon.wait_for(Duration::from_secs(10), |r| {
        r["type"] == "anomaly" && r["kind"] == "close_wait" && r["dport"] == big
    });
    let mut c = client;
    let _ = c.kill();
    let _ = c.wait();
    daemon.stop();

    for (p, n) in [(big, 400), (small, 3)] {
        let line = format!(
            r#"tcpstate_destination_sockets{{state="CLOSE_WAIT",destination="127.0.0.1:{p}",direction="outbound",netns="{}"}} {n}"#,
            ns.inode
        );
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
    assert!(
        samples(&metrics, "tcpstate_socket_age_seconds_count")
            .iter()
            .any(
                |l| l.starts_with(r#"tcpstate_socket_age_seconds_count{state="CLOSE_WAIT"}"#)
                    && l.ends_with(" 403")
            ),
        "{metrics}"
    );
    eprintln!("tcpstate status:\n{text}");
    eprintln!(
        "/metrics:\n{}",
        samples(&metrics, "tcpstate_destination_sockets").join("\n")
    );
    let said = format!("payments-api.service holds 400 CLOSE_WAIT to 127.0.0.1:{big}");
    assert!(text.contains(&said), "{said} in {text}");
    let raised = raised.expect("a close_wait anomaly to the big upstream");
    eprintln!("anomaly: {raised}");
    assert_eq!(
        raised["destination"],
        serde_json::json!({
            "addr": format!("127.0.0.1:{big}"),
            "direction": "outbound",
            "same_state": 400,
        }),
        "{raised:#}"
    );
}

/// The same `127.0.0.1:P` in two namespaces is two upstreams (two containers' sidecars, two
/// pods' databases): 5 CLOSE_WAIT held in one and 2 in the other are counted apart, each
/// with its holder and namespace, in `status` and as two `/metrics` series.
#[test]
fn one_address_in_two_namespaces_is_two_destinations() {
    if !require_bpf() {
        return;
    }
    let mut cgs = Cgroups::new();
    let (one, two) = (Netns::new(), Netns::new());
    let p = port(19300);
    // Both namespaces, narrowed to the test's port.
    let daemon = Daemon::host_wide().port(p).metrics().start();
    let mut clients = Vec::new();
    for (ns, unit, n) in [(&one, "alpha.service", 5), (&two, "beta.service", 2)] {
        let l = ns.run(move || TcpListener::bind(("127.0.0.1", p)).expect("bind"));
        clients.push(holder(
            &mut cgs,
            &format!("system.slice/{unit}"),
            ns,
            &[(p, n)],
        ));
        for _ in 0..n {
            drop(l.accept().expect("accept"));
        }
    }
    let rows = |v: &Value| -> Vec<(String, String, u64, u64)> {
        let mut r: Vec<_> = v["top_destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["state"] == "CLOSE_WAIT")
            .map(|d| {
                (
                    d["holder"].as_str().unwrap_or("?").to_owned(),
                    d["destination"].as_str().unwrap_or("?").to_owned(),
                    d["netns"].as_u64().unwrap_or(0),
                    d["count"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        r.sort_by_key(|x| std::cmp::Reverse(x.3));
        r
    };
    let status = status_until(&daemon, "7 CLOSE_WAIT", |v| {
        rows(v).iter().map(|d| d.3).sum::<u64>() == 7
    });
    let metrics = daemon.get("/metrics");
    for mut c in clients {
        let _ = c.kill();
        let _ = c.wait();
    }
    daemon.stop();
    let to = format!("127.0.0.1:{p}");
    assert_eq!(
        rows(&status),
        [
            ("alpha.service".to_owned(), to.clone(), one.inode, 5),
            ("beta.service".to_owned(), to.clone(), two.inode, 2),
        ],
        "{status:#}"
    );
    for (ns, n) in [(&one, 5), (&two, 2)] {
        let line = format!(
            r#"tcpstate_destination_sockets{{state="CLOSE_WAIT",destination="{to}",direction="outbound",netns="{}"}} {n}"#,
            ns.inode
        );
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
}

/// Scanners per scan: one process holds at most 20,000 fds on hosts that cap the hard limit
/// there (and a container without CAP_SYS_RESOURCE cannot raise it).
const SCANNERS: u32 = 4;

/// A process in `ns` that opens non-blocking connects to 10.9.x.y:80 for the scan's
/// indexes `from..to` (each index a distinct address, in a scrambled order: an odd
/// multiplier permutes 0..2^16) and holds them, left in SYN_SENT (their SYNs are dropped).
/// A fork, making raw syscalls only, so that 65,536 connects take seconds under emulation,
/// not the minutes an interpreter takes (by then the first SYNs time out). Returns its pid
/// once every connect is in progress.
fn scanner(ns: &Netns, from: u32, to: u32) -> libc::pid_t {
    ns.run(move || {
        let mut ready = [0i32; 2];
        // SAFETY: a valid out-array of two fds.
        assert_eq!(
            unsafe { libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC) },
            0
        );
        // SAFETY: the child makes only async-signal-safe syscalls, allocates nothing, and
        // ends in _exit or pause.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // The fork holds a copy of every fd the test binary had open, other tests'
            // sockets too, and never execs: it keeps the pipe only (as fd 3), or a socket
            // another test closes would stay open here for the whole scan.
            // SAFETY: fd syscalls on this child's own table.
            unsafe {
                if libc::dup2(ready[1], 3) != 3
                    || libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) != 0
                {
                    libc::_exit(4);
                }
            }
            for i in from..to {
                let [_, _, a, b] =
                    (i.wrapping_mul(40_503).wrapping_add(12_345) % 65_536).to_be_bytes();
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 80u16.to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_be_bytes([10, 9, a, b]).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: plain syscalls on our own fds and a valid sockaddr_in.
                unsafe {
                    let fd =
                        libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
                    if fd < 0 {
                        libc::_exit(2);
                    }
                    let rc = libc::connect(
                        fd,
                        (&raw const sin).cast(),
                        size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    );
                    if rc != -1 || *libc::__errno_location() != libc::EINPROGRESS {
                        libc::_exit(3);
                    }
                }
            }
            // SAFETY: a write to our pipe, then wait to be killed.
            unsafe {
                libc::write(3, b"k".as_ptr().cast(), 1);
                loop {
                    libc::pause();
                }
            }
        }
        // SAFETY: our own fds.
        unsafe { libc::close(ready[1]) };
        let mut byte = 0u8;
        // SAFETY: a one-byte read into a local.
        let n = unsafe { libc::read(ready[0], (&raw mut byte).cast(), 1) };
        // SAFETY: our own fd.
        unsafe { libc::close(ready[0]) };
        if n != 1 {
            let mut status = 0;
            // SAFETY: our own child.
            unsafe { libc::waitpid(pid, &raw mut status, 0) };
            panic!(
                "scanner {from}..{to} ended with status {status:#x} (exit 2: socket, 3: connect, \
                 4: its fds)"
            );
        }
        pid
    })
}

/// A scan of 65,536 destinations, every address of 10.9/16 in a scrambled order:
/// /metrics keeps --metrics-top-destinations of them plus `other`, whose sum is every socket,
/// and the daemon names at most 4096.
#[test]
fn a_scan_of_65536_destinations_stays_within_the_caps() {
    if !require_bpf() {
        return;
    }
    const N: u32 = 65_536;
    const K: usize = 20;
    let ns = Netns::new();
    // The peer routes 10.9/16 into a blackhole, which drops without a word (no ICMP): every
    // SYN is lost and every connect stays in SYN_SENT.
    let peer = Netns::new();
    veth_pair(&ns, &peer, "sc", "10.8.0");
    ip(&[
        "-n",
        &ns.name,
        "route",
        "add",
        "10.9.0.0/16",
        "via",
        "10.8.0.2",
    ]);
    ip(&["-n", &peer.name, "route", "add", "blackhole", "10.9.0.0/16"]);
    let st = peer
        .command("sysctl")
        .args(["-qw", "net.ipv4.ip_forward=1"])
        .status()
        .expect("sysctl");
    assert!(st.success(), "sysctl ip_forward: {st}");
    // A scan is not 65,536 stuck connects: no syn_sent anomaly (each would name its holder,
    // a walk of a scanner's 16,384 fds) while the test counts.
    let daemon = Daemon::watching(&ns)
        .metrics()
        .threshold("syn_sent=10m")
        .args(["--metrics-top-destinations".to_owned(), K.to_string()])
        .start();
    // Their SYNs are retransmitted for hours, not the default 127 s: the count must be met
    // while every one of them is still trying.
    let st = ns
        .command("sysctl")
        .args(["-qw", "net.ipv4.tcp_syn_retries=12"])
        .status()
        .expect("sysctl");
    assert!(st.success(), "sysctl tcp_syn_retries: {st}");
    let scanners: Vec<libc::pid_t> = (0..SCANNERS)
        .map(|k| scanner(&ns, k * N / SCANNERS, (k + 1) * N / SCANNERS))
        .collect();
    // 65,536 births, and a retransmitted SYN each at 1, 3, 7 s...: a minute's work for the
    // daemon under emulation.
    let status = status_within(&daemon, Duration::from_secs(120), "65536 SYN_SENT", |v| {
        v["sockets"]["SYN_SENT"].as_u64() == Some(u64::from(N))
    });
    let metrics = daemon.get("/metrics");
    for pid in scanners {
        // SAFETY: our own children.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }

    let series = samples(&metrics, "tcpstate_destination_sockets");
    let destinations: std::collections::BTreeSet<&str> = series
        .iter()
        .filter_map(|l| l.split("destination=\"").nth(1)?.split('"').next())
        .collect();
    assert!(
        destinations.len() <= K + 1,
        "{} series: {series:#?}",
        series.len()
    );
    assert!(destinations.contains("other"), "{series:#?}");
    let sum: u64 = series
        .iter()
        .filter(|l| l.contains(r#"state="SYN_SENT""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(sum, u64::from(N), "{series:#?}");
    assert!(
        metrics.lines().any(|l| l == "tcpstate_destinations 4096"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("tcpstate_destinations "))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(status["destinations"]["tracked"], 4096, "{status:#}");
    assert_eq!(status["destinations"]["cap"], 4096);
    assert_eq!(
        status["destinations"]["other"]["SYN_SENT"],
        u64::from(N) - 4096,
        "{status:#}"
    );
}

/// CLOCK_MONOTONIC, the clock of the kernel's timestamps that the daemon's windows follow.
fn monotonic() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Sleeps until `into` past the start of the next 10 s window of the daemon's flows.
fn next_window(into: Duration) {
    let w = Duration::from_secs(10);
    let now = monotonic();
    let into_now = Duration::from_nanos((now.as_nanos() % w.as_nanos()) as u64);
    std::thread::sleep(w.saturating_sub(into_now) + into);
}

/// Issue 18.2: who began each close, per destination. 30 connections to one port whose
/// client closes first (it keeps the TIME_WAIT) and 20 to another whose server closes first
/// (the server keeps it), all inside one 10 s window: the next window's status says, on each
/// TIME_WAIT line, exactly those rates, and nothing for the side that did not begin.
#[test]
fn who_closed_first_is_told_per_destination() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let (client_first, server_first) = (port(19800), port(19850));
    let daemon = Daemon::watching(&ns).metrics().start();
    // Leave 1 s of the window behind: the daemon's start-up is done and the traffic (well
    // under a second) stays inside one window.
    next_window(Duration::from_secs(1));
    ns.run(move || {
        use std::io::Read as _;
        let a = TcpListener::bind(("127.0.0.1", client_first)).expect("bind");
        let b = TcpListener::bind(("127.0.0.1", server_first)).expect("bind");
        for _ in 0..30 {
            let c = std::net::TcpStream::connect(("127.0.0.1", client_first)).expect("connect");
            let (mut s, _) = a.accept().expect("accept");
            drop(c);
            // The client's FIN came first: read it, then close.
            let mut buf = [0u8; 1];
            assert_eq!(s.read(&mut buf).expect("read"), 0);
        }
        for _ in 0..20 {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", server_first)).expect("connect");
            drop(b.accept().expect("accept"));
            let mut buf = [0u8; 1];
            assert_eq!(c.read(&mut buf).expect("read"), 0);
        }
    });
    next_window(Duration::from_millis(500));
    let status = daemon.status();
    let line = |dest: String, direction: &str| -> (f64, f64, f64, f64) {
        let d = status["top_destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| {
                d["state"] == "TIME_WAIT" && d["destination"] == dest && d["direction"] == direction
            })
            .unwrap_or_else(|| panic!("no TIME_WAIT line for {dest}: {status:#}"));
        let f = |k: &str| d[k].as_f64().unwrap_or(f64::NAN);
        (
            f("opened_per_s"),
            f("local_first_per_s"),
            f("peer_first_per_s"),
            f("reset_per_s"),
        )
    };
    // 30 connects there: this host began every end (its client closed first).
    assert_eq!(
        line(format!("127.0.0.1:{client_first}"), "outbound"),
        (3.0, 3.0, 0.0, 0.0),
        "{status:#}"
    );
    // 20 accepted on :port: this host began every end (its server closed first).
    assert_eq!(
        line(format!(":{server_first}"), "inbound"),
        (2.0, 2.0, 0.0, 0.0),
        "{status:#}"
    );
    let text = daemon.status_text();
    eprintln!("tcpstate status:\n{text}");
    assert!(
        text.contains(&format!(
            "30 TIME_WAIT to 127.0.0.1:{client_first} [netns {}] (3.0 new/s, ",
            ns.inode
        )) && text.contains("this host closed first 3.0/s)"),
        "{text}"
    );
    let records = daemon.stop();
    assert!(!records.is_empty());
}
