//! The real program on real traffic: exact transitions per socket.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use common::{Daemon, Netns, pairs_of, port, require_bpf, transitions};
use serde_json::Value;

fn at(v: &Value) -> std::time::SystemTime {
    humantime::parse_rfc3339(v["ts"].as_str().expect("ts")).expect("rfc3339")
}

/// Client connects, writes, closes; server reads, closes after a pause.
/// Returns the pause and how long the close actually took from the client's
/// close() to the server's: CLOSE_WAIT lies between the two.
fn lifecycle(addr: &str) -> (SocketAddr, SocketAddr, (Duration, Duration)) {
    let pause = Duration::from_millis(300);
    let listener = TcpListener::bind(addr).expect("bind");
    let server_addr = listener.local_addr().expect("addr");
    let mut client = TcpStream::connect(server_addr).expect("connect");
    let client_addr = client.local_addr().expect("addr");
    let (mut server, _) = listener.accept().expect("accept");
    client.write_all(b"ping").expect("write");
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).expect("read");
    let closing = std::time::Instant::now();
    drop(client);
    std::thread::sleep(pause);
    drop(server);
    let took = closing.elapsed();
    std::thread::sleep(Duration::from_millis(50));
    drop(listener);
    (server_addr, client_addr, (pause, took))
}

fn check_lifecycle(family: &str, bind: &'static str) {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let p = port(20000 + if family == "ipv6" { 1000 } else { 0 });
    let mut daemon = Daemon::start(&["--port", &p.to_string()]);
    let (server, client, (pause, took)) = ns.run(move || lifecycle(&format!("{bind}:{p}")));
    // The last close may be a forked child's: another test's fork between its fork and exec
    // holds our fds (seen on 7.3 in CI: the listener's close came after the SIGTERM). All
    // twelve are waited for, then the daemon stops; a lost one still fails below.
    let _ = daemon.wait_for_n(Duration::from_secs(10), 12, |r| {
        r["type"] == "transition" && r["netns"] == ns.inode
    });
    let records = daemon.stop();
    let ts = transitions(&records, ns.inode);
    let sk_of = |pred: &dyn Fn(&Value) -> bool| -> Value {
        ts.iter()
            .find(|t| pred(t))
            .map(|t| t["sk"].clone())
            .unwrap_or_else(|| panic!("no such socket in {ts:#?}"))
    };
    let listener = sk_of(&|t| t["old"] == "CLOSE" && t["new"] == "LISTEN");
    let client_sk = sk_of(&|t| t["old"] == "CLOSE" && t["new"] == "SYN_SENT");
    let server_sk = sk_of(&|t| t["old"] == "LISTEN" && t["new"] == "SYN_RECV");
    assert_eq!(
        pairs_of(&ts, &listener),
        [("CLOSE", "LISTEN"), ("LISTEN", "CLOSE")]
    );
    // The client closed first: once the server's ACK came, the kernel
    // handed the orphan to a FIN_WAIT2 mini-socket (no transition: it is
    // still in FIN_WAIT2), which entered TIME_WAIT when the server's FIN
    // came. That last one no tracepoint shows: it is inferred from the
    // server's close (`via: peer`) and names the socket by tuple (sk 0).
    assert_eq!(
        pairs_of(&ts, &client_sk),
        [
            ("CLOSE", "SYN_SENT"),
            ("SYN_SENT", "ESTABLISHED"),
            ("ESTABLISHED", "FIN_WAIT1"),
            ("FIN_WAIT1", "FIN_WAIT2"),
        ]
    );
    let tw: Vec<_> = ts.iter().filter(|t| t["via"] == "peer").collect();
    assert_eq!(tw.len(), 1, "{ts:#?}");
    assert_eq!(
        (&tw[0]["old"], &tw[0]["new"], &tw[0]["sk"]),
        (&"FIN_WAIT2".into(), &"TIME_WAIT".into(), &"0x0".into())
    );
    assert_eq!(
        (&tw[0]["sport"], &tw[0]["dport"]),
        (&client.port().into(), &server.port().into())
    );
    // It sat in FIN_WAIT2 from the server's ACK of our FIN to the server's
    // FIN: exactly the gap between those two records' kernel timestamps.
    // The server entered CLOSE_WAIT at the FIN but may delay that ACK (it
    // is in pingpong mode; up to 200 ms, later under emulation), so FIN_WAIT2
    // is the server's CLOSE_WAIT less that delay, never more.
    let fw2 = tw[0]["prev_state_ms"].as_f64().expect("timed");
    let entered = ts
        .iter()
        .find(|t| t["sk"] == client_sk && t["new"] == "FIN_WAIT2")
        .expect("FIN_WAIT2 entered");
    let gap = at(tw[0]).duration_since(at(entered)).expect("in order");
    assert!(
        (gap.as_secs_f64() * 1000.0 - fw2).abs() < 1.0,
        "FIN_WAIT2 lasted {fw2} ms, its records are {gap:?} apart"
    );
    let server_cw = ts
        .iter()
        .find(|t| t["sk"] == server_sk && t["old"] == "CLOSE_WAIT")
        .and_then(|t| t["prev_state_ms"].as_f64())
        .expect("CLOSE_WAIT timed");
    assert!(
        fw2 > 0.0 && fw2 <= server_cw + 1.0 && server_cw - fw2 < 400.0,
        "FIN_WAIT2 lasted {fw2} ms, the server held CLOSE_WAIT {server_cw} ms"
    );
    assert_eq!(
        pairs_of(&ts, &server_sk),
        [
            ("LISTEN", "SYN_RECV"),
            ("SYN_RECV", "ESTABLISHED"),
            ("ESTABLISHED", "CLOSE_WAIT"),
            ("CLOSE_WAIT", "LAST_ACK"),
            ("LAST_ACK", "CLOSE"),
        ]
    );
    assert_eq!(ts.len(), 12, "nothing else in this namespace: {ts:#?}");
    let ip = |a: SocketAddr| Value::from(a.ip().to_string());
    for t in &ts {
        assert_eq!(t["family"], family, "{t}");
        if (t["sk"] == client_sk && t["new"] != "SYN_SENT") || t["via"] == "peer" {
            assert_eq!(
                (&t["saddr"], &t["sport"]),
                (&ip(client), &client.port().into()),
                "{t}"
            );
            assert_eq!(
                (&t["daddr"], &t["dport"]),
                (&ip(server), &server.port().into()),
                "{t}"
            );
        }
        if t["sk"] == server_sk {
            assert_eq!(
                (&t["saddr"], &t["sport"]),
                (&ip(server), &server.port().into()),
                "{t}"
            );
            assert_eq!(
                (&t["daddr"], &t["dport"]),
                (&ip(client), &client.port().into()),
                "{t}"
            );
        }
    }
    // The connect starts before a local port is chosen.
    let first = ts.iter().find(|t| t["sk"] == client_sk).expect("client");
    assert_eq!(
        (&first["sport"], &first["dport"]),
        (&0.into(), &server.port().into())
    );
    assert_eq!(
        first["prev_state_ms"],
        Value::Null,
        "CLOSE was not seen being entered"
    );
    // CLOSE_WAIT lasted the server's pause.
    let cw = ts
        .iter()
        .find(|t| t["sk"] == server_sk && t["old"] == "CLOSE_WAIT")
        .expect("CLOSE_WAIT exit");
    let ms = cw["prev_state_ms"].as_f64().expect("timed");
    // It is exactly the gap between the kernel's two records of that socket.
    let entered = ts
        .iter()
        .find(|t| t["sk"] == server_sk && t["new"] == "CLOSE_WAIT")
        .expect("CLOSE_WAIT entry");
    let gap = at(cw).duration_since(at(entered)).expect("in order");
    assert!(
        (gap.as_secs_f64() * 1000.0 - ms).abs() < 1.0,
        "CLOSE_WAIT lasted {ms} ms, its records are {gap:?} apart"
    );
    // It began when the client's FIN arrived, after the client's close() was
    // called, and ended in the server's close(): never longer than the two
    // calls apart. It is shorter than the pause only by the FIN's delivery,
    // which the kernel may defer to ksoftirqd after close() returns (seen:
    // 7.5 ms under emulation), never by much.
    let (want, most) = (pause.as_secs_f64() * 1000.0, took.as_secs_f64() * 1000.0);
    assert!(
        ms >= want - 50.0 && ms <= most + 1.0,
        "CLOSE_WAIT lasted {ms} ms, slept {want} ms, closed after {most} ms"
    );
    let stopped = records.last().expect("records");
    assert_eq!(
        (&stopped["dropped"], &stopped["undecodable"]),
        (&0.into(), &0.into()),
        "{stopped}"
    );
    assert_eq!(stopped["recursion_misses"], 0, "{stopped}");
}

#[test]
fn ipv4_connect_close_exact_transitions() {
    check_lifecycle("ipv4", "127.0.0.1");
}

#[test]
fn ipv6_connect_close_exact_transitions() {
    check_lifecycle("ipv6", "[::1]");
}

#[test]
fn refused_connect_is_syn_sent_to_close() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let p = port(22000);
    let daemon = Daemon::start(&["--port", &p.to_string()]);
    let err = ns.run(move || TcpStream::connect(("127.0.0.1", p)).expect_err("nobody listens"));
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let records = daemon.stop();
    let ts = transitions(&records, ns.inode);
    let got: Vec<_> = ts
        .iter()
        .map(|t| (t["old"].as_str(), t["new"].as_str(), t["dport"].as_u64()))
        .collect();
    assert_eq!(
        got,
        [
            (Some("CLOSE"), Some("SYN_SENT"), Some(u64::from(p))),
            (Some("SYN_SENT"), Some("CLOSE"), Some(u64::from(p)))
        ]
    );
}

#[test]
fn reset_goes_straight_to_close_on_both_ends() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let p = port(23000);
    let daemon = Daemon::start(&["--port", &p.to_string()]);
    ns.run(move || {
        let listener = TcpListener::bind(("127.0.0.1", p)).expect("bind");
        let mut client = TcpStream::connect(("127.0.0.1", p)).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        // SO_LINGER 0: close() sends RST instead of FIN.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        use std::os::fd::AsRawFd as _;
        // SAFETY: valid socket and option buffer.
        let rc = unsafe {
            libc::setsockopt(
                server.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                size_of::<libc::linger>() as u32,
            )
        };
        assert_eq!(rc, 0);
        drop(server);
        let mut buf = [0u8; 1];
        let err = client.read(&mut buf).expect_err("reset");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
        let _ = client.shutdown(Shutdown::Both);
    });
    let records = daemon.stop();
    let ts = transitions(&records, ns.inode);
    let resets: Vec<_> = ts
        .iter()
        .filter(|t| t["old"] == "ESTABLISHED" && t["new"] == "CLOSE")
        .map(|t| t["sport"].as_u64())
        .collect();
    assert_eq!(resets.len(), 2, "both ends reset: {ts:#?}");
    assert!(resets.contains(&Some(u64::from(p))), "{resets:?}");
}

#[test]
fn port_and_family_filters_apply_in_the_kernel() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let p = port(24000);
    let daemon = Daemon::start(&["--port", &p.to_string(), "-6"]);
    ns.run(move || {
        for addr in [
            format!("127.0.0.1:{p}"),
            format!("[::1]:{p}"),
            format!("[::1]:{}", p + 1),
        ] {
            let l = TcpListener::bind(&addr).expect("bind");
            let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
            drop(c);
        }
    });
    let records = daemon.stop();
    let ts = transitions(&records, ns.inode);
    assert!(!ts.is_empty());
    for t in &ts {
        assert_eq!(t["family"], "ipv6", "{t}");
        assert!(t["sport"] == p || t["dport"] == p, "{t}");
    }
}

#[test]
fn netns_filter_keeps_one_namespace() {
    if !require_bpf() {
        return;
    }
    let (a, b) = (Netns::new(), Netns::new());
    let p = port(24500);
    let path = format!("/run/netns/{}", a.name);
    let daemon = Daemon::start(&["--port", &p.to_string(), "--netns", &path]);
    for ns in [&a, &b] {
        ns.run(move || {
            let l = TcpListener::bind(("127.0.0.1", p)).expect("bind");
            let c = TcpStream::connect(("127.0.0.1", p)).expect("connect");
            let (s, _) = l.accept().expect("accept");
            drop(c);
            drop(s);
        });
    }
    let records = daemon.stop();
    let ts: Vec<_> = records
        .iter()
        .filter(|r| r["type"] == "transition")
        .collect();
    assert_eq!(
        transitions(&records, a.inode).len(),
        ts.len(),
        "only namespace A: {ts:#?}"
    );
    assert!(ts.len() >= 10, "A's full lifecycle is there: {ts:#?}");
    let stopped = records.last().expect("stopped");
    assert!(
        stopped["filtered"].as_u64().unwrap_or(0) >= 10,
        "B's events were filtered: {stopped}"
    );
}

/// Pins the calling thread to one CPU.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays inside it for any
    // cpu < CPU_SETSIZE, and sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity({cpu}): {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The client on the first CPU, the server on the last: each end's
/// transitions run on both CPUs (its own syscalls on one, the peer's
/// packets in softirq on the other), so the program writes one socket's
/// transitions into two per-CPU rings and the daemon must merge them back
/// into order. Every socket's transitions must form one unbroken chain.
#[test]
fn sockets_whose_ends_run_on_two_cpus_come_out_in_order() {
    if !require_bpf() {
        return;
    }
    const CONNS: usize = 300;
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let ns = Netns::new();
    let p = port(23000);
    let daemon = Daemon::start(&["--port", &p.to_string()]);
    ns.run(move || {
        let listener = TcpListener::bind(("127.0.0.1", p)).expect("bind");
        let server = std::thread::spawn(move || {
            pin_to(cpus - 1);
            for i in 0..CONNS {
                let (mut s, _) = listener.accept().expect("accept");
                let mut b = [0u8; 1];
                s.read_exact(&mut b).expect("read");
                s.write_all(&b).expect("write");
                // Half the time the server closes first.
                if i % 2 == 0 {
                    drop(s);
                } else {
                    let _ = s.read(&mut b);
                }
            }
        });
        pin_to(0);
        for i in 0..CONNS {
            let mut c = TcpStream::connect(("127.0.0.1", p)).expect("connect");
            c.write_all(b"x").expect("write");
            let mut b = [0u8; 1];
            c.read_exact(&mut b).expect("read");
            if i % 2 == 0 {
                let _ = c.read(&mut b);
            }
        }
        server.join().expect("server thread");
    });
    std::thread::sleep(Duration::from_millis(200));
    let records = daemon.stop();
    let ts = transitions(&records, ns.inode);

    // Kernel addresses are reused once a socket is freed, so one address
    // can carry several lifetimes: each starts from CLOSE (or LISTEN, for
    // an accepted socket) after the previous one reached CLOSE.
    // A full socket's life ends at CLOSE, at TIME_WAIT (a mini-socket took
    // its place) or, for an orphan, silently in FIN_WAIT2 (handed to a
    // FIN_WAIT2 mini-socket); mini-sockets' own records (`via`) name them
    // by tuple and are checked apart.
    let mut open: std::collections::HashMap<&Value, &str> = std::collections::HashMap::new();
    let mut lifetimes = 0;
    let mut minis = 0;
    for t in &ts {
        let (old, new) = (
            t["old"].as_str().unwrap_or("?"),
            t["new"].as_str().unwrap_or("?"),
        );
        if !t["via"].is_null() {
            assert_eq!(
                (old, new, &t["sk"]),
                ("FIN_WAIT2", "TIME_WAIT", &"0x0".into()),
                "{t}"
            );
            minis += 1;
            continue;
        }
        let born = old == "CLOSE" || old == "LISTEN";
        match open.get(&t["sk"]) {
            Some(&"FIN_WAIT2") if born => lifetimes += 1,
            Some(&prev) => assert_eq!(old, prev, "broken chain at {t}"),
            None => {
                assert!(born, "a socket born mid-life: {t}");
                lifetimes += 1;
            }
        }
        if new == "CLOSE" || new == "TIME_WAIT" {
            open.remove(&t["sk"]);
        } else {
            open.insert(&t["sk"], new);
        }
    }
    // The listener is closed when `listener` drops inside the server thread.
    assert!(
        open.values().all(|&s| s == "FIN_WAIT2"),
        "sockets never closed: {open:?}"
    );
    // Every connection leaves its first closer in TIME_WAIT: straight from the kernel's
    // handoff, or through a FIN_WAIT2 mini-socket when the peer's FIN came apart.
    let handoffs = ts
        .iter()
        .filter(|t| t["via"].is_null() && t["new"] == "TIME_WAIT")
        .count();
    assert_eq!(
        handoffs + minis,
        CONNS,
        "{handoffs} handoffs, {minis} via mini-sockets"
    );
    assert_eq!(
        lifetimes,
        2 * CONNS + 1,
        "client + server per connection, and the listener"
    );
}

/// A failed connect says why: refused (an RST from a closed port), timed out (SYNs nobody
/// answers), from the socket's error as the program read it at SYN_SENT -> CLOSE.
#[test]
fn failed_connects_say_why() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let ip = |args: &[&str]| {
        let st = std::process::Command::new("ip")
            .args(["-n", &ns.name])
            .args(args)
            .status()
            .expect("ip");
        assert!(st.success(), "ip {args:?}");
    };
    // A subnet where SYNs go nowhere.
    ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    ip(&["addr", "add", "10.98.0.1/24", "dev", "v0"]);
    ip(&["link", "set", "v0", "up"]);
    ip(&["link", "set", "v1", "up"]);
    // A permanent neighbour entry: the SYNs leave for a MAC nobody has, so the connect can
    // only time out. Left to ARP, the neighbour's failure (EHOSTUNREACH, about 3 s) raced the
    // SYN timeout, and under emulation it sometimes won.
    ip(&[
        "neigh",
        "add",
        "10.98.0.77",
        "lladdr",
        "02:00:00:00:00:77",
        "dev",
        "v0",
        "nud",
        "permanent",
    ]);
    let st = ns
        .command("sysctl")
        .args(["-qw", "net.ipv4.tcp_syn_retries=1"])
        .status()
        .expect("sysctl");
    assert!(st.success());
    let p = port(22500);
    let mport = common::free_port();
    let daemon = Daemon::start(&[
        "--rport",
        &p.to_string(),
        "--metrics-addr",
        &format!("127.0.0.1:{mport}"),
    ]);
    let errs = ns.run(move || {
        let refused = TcpStream::connect(("127.0.0.1", p)).expect_err("nobody listens");
        let timed_out = TcpStream::connect(("10.98.0.77", p)).expect_err("nobody answers");
        (refused.kind(), timed_out.kind())
    });
    assert_eq!(
        errs,
        (
            std::io::ErrorKind::ConnectionRefused,
            std::io::ErrorKind::TimedOut
        )
    );
    // The last event takes up to a drain period to be applied.
    std::thread::sleep(Duration::from_millis(300));
    let metrics = common::http_get(mport, "/metrics");
    let records = daemon.stop();
    let ts = transitions(&records, ns.inode);
    let failed: Vec<_> = ts
        .iter()
        .filter(|t| t["old"] == "SYN_SENT" && t["new"] == "CLOSE")
        .map(|t| {
            (
                t["daddr"].as_str().unwrap_or(""),
                t["reason"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        failed,
        [("127.0.0.1", "refused"), ("10.98.0.77", "timed_out")],
        "{ts:#?}"
    );
    // Issue 18.7: the timed-out connect says how often its SYN was sent again, the refused
    // one has none. With tcp_syn_retries=1 the kernel gives up after 3 s; 6.18 sends the SYN
    // again at 1 s and at 3 s (the tracepoint fires twice), so the count is not pinned.
    let retransmits: Vec<_> = ts
        .iter()
        .filter(|t| t["old"] == "SYN_SENT" && t["new"] == "CLOSE")
        .map(|t| t["retransmits"].as_u64())
        .collect();
    assert!(
        matches!(retransmits[..], [None, Some(1..=2)]),
        "{retransmits:?}: {ts:#?}"
    );
    for reason in ["refused", "timed_out"] {
        assert!(
            metrics.contains(&format!(
                "tcpstate_failed_connects_total{{reason=\"{reason}\"}} 1"
            )),
            "{metrics}"
        );
    }
}
