//! The whole close, as `ss -tan` shows it: orphaned FIN_WAIT2 and TIME_WAIT mini-sockets, the
//! CLOSING path, resets, reuse, and `time_wait_pressure`, on real traffic in test-made
//! namespaces, checked against `ss` itself.

mod common;

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use common::{Daemon, Netns, port, require_bpf, ss_counts, status_counts, transitions};
use serde_json::Value;
use socket2::{Domain, Socket, Type};

/// A client bound to `local` (SO_REUSEADDR, so it may take a port a TIME_WAIT holds), connected
/// to `server`.
fn client_from(local: SocketAddr, server: SocketAddr) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&local.into())?;
    s.connect(&server.into())?;
    Ok(s.into())
}

fn listener(port: u16) -> TcpListener {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.set_reuse_address(true).expect("reuseaddr");
    s.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())
        .expect("bind");
    s.listen(128).expect("listen");
    s.into()
}

fn linger_zero(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and option buffer.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
}

fn pairs(ts: &[&Value], port: u16) -> Vec<(String, String, String)> {
    ts.iter()
        .filter(|t| t["sport"] == port)
        .map(|t| {
            (
                t["old"].as_str().unwrap_or("?").to_owned(),
                t["new"].as_str().unwrap_or("?").to_owned(),
                t["via"].as_str().unwrap_or("event").to_owned(),
            )
        })
        .collect()
}

fn p(old: &str, new: &str, via: &str) -> (String, String, String) {
    (old.to_owned(), new.to_owned(), via.to_owned())
}

/// Polls until `f` holds or `limit` passes.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

#[test]
fn orphan_fin_wait2_lasts_until_the_peer_closes_then_time_wait_ends_by_reuse() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let sp = port(25000);
    let cp = port(26000);
    let daemon = Daemon::watching(&ns).port(sp).start();
    let server_addr = SocketAddr::from(([127, 0, 0, 1], sp));
    let local = SocketAddr::from(([127, 0, 0, 1], cp));
    let held = ns.run(move || {
        let l = listener(sp);
        let c = client_from(local, server_addr).expect("connect");
        let (s, _) = l.accept().expect("accept");
        // The client closes first; the server holds CLOSE_WAIT 1.5 s.
        drop(c);
        std::thread::sleep(Duration::from_millis(1500));
        // TIME_WAIT begins when the server's FIN reaches the client, after
        // this close() is called: the reuse is timed from here.
        let closed = Instant::now();
        drop(s);
        std::thread::sleep(Duration::from_millis(200));
        (l, closed)
    });
    let (held, closed) = held;
    let ss = ss_counts(&ns);
    assert_eq!(ss.get("TIME_WAIT"), Some(&1), "ss: {ss:?}");
    // TIME_WAIT ends early when a new connection takes its tuple (tcp_tw_reuse, loopback);
    // the kernel lets it only a second after the last segment.
    std::thread::sleep(Duration::from_millis(1100));
    let again = ns.run(move || client_from(local, server_addr).expect("reuse the TIME_WAIT port"));
    let reused = closed.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let records = daemon.stop();
    drop((again, held));
    let ts = transitions(&records, ns.inode);
    let mut client = pairs(&ts, cp);
    client.retain(|(old, _, _)| old != "CLOSE");
    assert_eq!(
        client[..6],
        [
            p("SYN_SENT", "ESTABLISHED", "event"),
            p("ESTABLISHED", "FIN_WAIT1", "event"),
            p("FIN_WAIT1", "FIN_WAIT2", "event"),
            p("FIN_WAIT2", "TIME_WAIT", "peer"),
            p("TIME_WAIT", "CLOSE", "reuse"),
            p("SYN_SENT", "ESTABLISHED", "event"),
        ],
        "{ts:#?}"
    );
    let fw2 = ts
        .iter()
        .find(|t| t["sport"] == cp && t["old"] == "FIN_WAIT2")
        .and_then(|t| t["prev_state_ms"].as_f64())
        .expect("FIN_WAIT2 timed");
    // The server's CLOSE_WAIT less the delay of its ACK to our FIN (it is
    // in pingpong mode: up to 200 ms, later under emulation). CLOSE_WAIT
    // itself may start a little after the client's close() returned: the
    // kernel can defer the FIN's delivery to ksoftirqd.
    let cw = ts
        .iter()
        .find(|t| t["dport"] == cp && t["old"] == "CLOSE_WAIT")
        .and_then(|t| t["prev_state_ms"].as_f64())
        .expect("CLOSE_WAIT timed");
    assert!(
        cw >= 1450.0 && fw2 <= cw + 1.0 && cw - fw2 < 400.0,
        "ss showed FIN-WAIT-2 for the server's {cw} ms CLOSE_WAIT; we said {fw2} ms"
    );
    let tw = ts
        .iter()
        .find(|t| t["sport"] == cp && t["old"] == "TIME_WAIT")
        .and_then(|t| t["prev_state_ms"].as_f64())
        .expect("TIME_WAIT timed");
    let most = reused.as_secs_f64() * 1000.0;
    assert!(
        (1100.0..=most + 1.0).contains(&tw),
        "TIME_WAIT lasted {tw} ms; the reuse came {most} ms after the close"
    );
}

/// Every kind of socket at once, half of them from before the daemon: its counts are `ss`'s.
#[test]
fn counts_equal_ss_for_every_kind_of_socket() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let sp = port(27000);
    let mix = move |l: &TcpListener| -> Vec<TcpStream> {
        let addr = l.local_addr().expect("addr");
        let mut keep = Vec::new();
        let pair = || {
            let c = TcpStream::connect(addr).expect("connect");
            let (s, _) = l.accept().expect("accept");
            (c, s)
        };
        // Two established connections.
        for _ in 0..2 {
            let (c, s) = pair();
            keep.extend([c, s]);
        }
        // Two clients closed, servers holding CLOSE_WAIT: orphaned FIN_WAIT2 mini-sockets.
        for _ in 0..2 {
            let (c, s) = pair();
            drop(c);
            keep.push(s);
        }
        // One half-closed client: a full socket in FIN_WAIT2.
        let (c, s) = pair();
        c.shutdown(Shutdown::Write).expect("shutdown");
        keep.extend([c, s]);
        // Two connections closed client first: TIME_WAIT.
        for _ in 0..2 {
            let (c, s) = pair();
            drop(c);
            std::thread::sleep(Duration::from_millis(20));
            drop(s);
        }
        std::thread::sleep(Duration::from_millis(100));
        keep
    };
    let (l, before) = ns.run(move || {
        let l = listener(sp);
        let before = mix(&l);
        (l, before)
    });
    let daemon = Daemon::watching(&ns).metrics().start();
    let (l, after) = ns.run(move || {
        let after = mix(&l);
        (l, after)
    });
    // A quiet moment: nothing changes from here.
    let mut ours = Default::default();
    let mut theirs = Default::default();
    let same = eventually(Duration::from_secs(5), || {
        ours = status_counts(&daemon);
        theirs = ss_counts(&ns);
        ours == theirs
    });
    if !same {
        // What each side saw, to tell which socket and which path disagree.
        let ss = ns.command("ss").args(["-tanoe"]).output().expect("ss");
        let records = daemon.stop();
        let ours_records: Vec<String> = records
            .iter()
            .filter(|r| r["type"] != "transition" || r["netns"] == ns.inode)
            .map(ToString::to_string)
            .collect();
        panic!(
            "tcpstate {ours:?} vs ss {theirs:?}\nss -tanoe:\n{}\nrecords:\n{}",
            String::from_utf8_lossy(&ss.stdout),
            ours_records.join("\n")
        );
    }
    for (state, n) in [
        ("ESTABLISHED", 8),
        ("CLOSE_WAIT", 6),
        ("FIN_WAIT2", 6),
        ("TIME_WAIT", 4),
        ("LISTEN", 1),
    ] {
        assert_eq!(ours.get(state), Some(&n), "{state}: {ours:?}");
    }
    // The metrics say the same.
    let metrics = daemon.get("/metrics");
    assert!(
        metrics.contains("tcpstate_sockets{state=\"TIME_WAIT\"} 4"),
        "{metrics}"
    );
    drop((l, before, after));
    daemon.stop();
}

/// The CLOSING path: each end sends its FIN before it gets the other's. The client's FIN waits
/// behind data the server does not read yet, so the server's FIN reaches the client in
/// FIN_WAIT1.
#[test]
fn simultaneous_close_goes_through_closing_to_time_wait() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let sp = port(28000);
    let daemon = Daemon::watching(&ns).port(sp).start();
    let cport = ns.run(move || {
        let l = listener(sp);
        let mut c = TcpStream::connect(("127.0.0.1", sp)).expect("connect");
        let (mut s, _) = l.accept().expect("accept");
        let cport = c.local_addr().expect("addr").port();
        c.set_nonblocking(true).expect("nonblocking");
        let chunk = vec![7u8; 65536];
        loop {
            match c.write(&chunk) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("write: {e}"),
            }
        }
        c.shutdown(Shutdown::Write)
            .expect("client FIN, queued behind data");
        s.shutdown(Shutdown::Write).expect("server FIN");
        std::thread::sleep(Duration::from_millis(100));
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut sink = Vec::new();
        s.read_to_end(&mut sink).expect("drain");
        std::thread::sleep(Duration::from_millis(200));
        cport
    });
    let ss = ss_counts(&ns);
    let records = daemon.stop();
    let ts = transitions(&records, ns.inode);
    let closing: Vec<_> = pairs(&ts, cport).into_iter().skip(1).collect();
    assert_eq!(
        closing,
        [
            p("ESTABLISHED", "FIN_WAIT1", "event"),
            p("FIN_WAIT1", "CLOSING", "event"),
            p("CLOSING", "TIME_WAIT", "event"),
        ],
        "{ts:#?}"
    );
    let server: Vec<_> = pairs(&ts, sp)
        .into_iter()
        .filter(|(o, _, _)| o != "CLOSE" && o != "LISTEN" && o != "SYN_RECV")
        .collect();
    assert_eq!(
        server,
        [
            p("ESTABLISHED", "FIN_WAIT1", "event"),
            p("FIN_WAIT1", "FIN_WAIT2", "event"),
            p("FIN_WAIT2", "TIME_WAIT", "event"),
        ],
        "{ts:#?}"
    );
    assert_eq!(ss.get("TIME_WAIT"), Some(&2), "ss: {ss:?}");
}

/// An RST ends FIN_WAIT2 for good, for a half-closed full socket and for an orphan's
/// mini-socket alike: CLOSE, no TIME_WAIT, and `ss` shows nothing left.
#[test]
fn reset_in_fin_wait2_closes_without_time_wait() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let sp = port(29000);
    let daemon = Daemon::watching(&ns).metrics().start();
    let (half, orphan) = ns.run(move || {
        let l = listener(sp);
        // Half-closed, its application still holding it.
        let c = TcpStream::connect(("127.0.0.1", sp)).expect("connect");
        let (s, _) = l.accept().expect("accept");
        c.shutdown(Shutdown::Write).expect("shutdown");
        // Orphaned: closed by its application.
        let c2 = TcpStream::connect(("127.0.0.1", sp)).expect("connect");
        let (s2, _) = l.accept().expect("accept");
        let orphan = c2.local_addr().expect("addr").port();
        drop(c2);
        std::thread::sleep(Duration::from_millis(100));
        let half = c.local_addr().expect("addr").port();
        for s in [s, s2] {
            linger_zero(&s);
            drop(s);
        }
        std::thread::sleep(Duration::from_millis(100));
        drop((c, l));
        (half, orphan)
    });
    // The orphan's end no event shows: the sweep finds it within a second.
    let gone = eventually(Duration::from_secs(3), || {
        let c = status_counts(&daemon);
        !c.contains_key("FIN_WAIT2") && !c.contains_key("TIME_WAIT")
    });
    let ss = ss_counts(&ns);
    let records = daemon.stop();
    let ts = transitions(&records, ns.inode);
    assert!(
        gone,
        "tcpstate still counts FIN_WAIT2 or TIME_WAIT; ss: {ss:?} {ts:#?}"
    );
    assert!(
        !ss.contains_key("FIN_WAIT2") && !ss.contains_key("TIME_WAIT"),
        "{ss:?}"
    );
    let ts = transitions(&records, ns.inode);
    assert_eq!(
        pairs(&ts, half).last(),
        Some(&p("FIN_WAIT2", "CLOSE", "event")),
        "{ts:#?}"
    );
    assert_eq!(
        pairs(&ts, orphan).last(),
        Some(&p("FIN_WAIT2", "CLOSE", "sock_diag")),
        "{ts:#?}"
    );
    assert!(
        !ts.iter().any(|t| t["new"] == "TIME_WAIT"),
        "no TIME_WAIT after a reset: {ts:#?}"
    );
}

#[test]
fn orphan_fin_wait2_anomaly_names_who_closed_it() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let sp = port(30000);
    let mut daemon = Daemon::watching(&ns)
        .port(sp)
        .threshold("fin_wait2=1s")
        .start();
    let server = ns.run(move || {
        let l = listener(sp);
        let c = TcpStream::connect(("127.0.0.1", sp)).expect("connect");
        let (s, _) = l.accept().expect("accept");
        // The FIN is sent here, by this process, and the close makes the socket an orphan.
        // Not by close() alone: a child that another test of this binary forks at that moment
        // holds the fd until its exec, and the last close, the FIN with it, is then that
        // child's (seen on 6.1: `ip`, pid 327), which tcpstate rightly names.
        c.shutdown(Shutdown::Write).expect("shutdown");
        drop(c);
        (l, s)
    });
    let raised = daemon
        .wait_for(Duration::from_secs(5), |r| r["type"] == "anomaly")
        .expect("a fin_wait2 anomaly");
    drop(server);
    let resolved = daemon.wait_for(Duration::from_secs(5), |r| r["type"] == "anomaly_resolved");
    daemon.stop();
    assert_eq!(raised["kind"], "fin_wait2", "{raised}");
    assert_eq!(
        (&raised["pid"], &raised["owner_source"]),
        (&Value::Null, &"none".into()),
        "nobody holds an orphan: {raised}"
    );
    assert_eq!(
        raised["last_owner"]["pid"],
        std::process::id(),
        "the process that closed it: {raised}"
    );
    let age = raised["age_ms"].as_f64().expect("age");
    assert!((1000.0..1600.0).contains(&age), "{raised}");
    let resolved = resolved.expect("resolved when the peer closed");
    assert_eq!(resolved["resolution"], "left_state", "{resolved}");
}

#[test]
fn time_wait_pressure_is_raised_and_relieved() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let st = ns
        .command("sysctl")
        .args(["-qw", "net.ipv4.ip_local_port_range=40000 40009"])
        .status()
        .expect("sysctl");
    assert!(st.success());
    let sp = port(31000);
    let mut daemon = Daemon::watching(&ns).port(sp).metrics().start();
    let server = SocketAddr::from(([127, 0, 0, 1], sp));
    let l = ns.run(move || {
        let l = listener(sp);
        for cp in 40000..40006 {
            let c = client_from(SocketAddr::from(([127, 0, 0, 1], cp)), server).expect("connect");
            let (s, _) = l.accept().expect("accept");
            drop(c);
            std::thread::sleep(Duration::from_millis(10));
            drop(s);
        }
        l
    });
    let raised = daemon
        .wait_for(Duration::from_secs(5), |r| {
            r["type"] == "anomaly" && r["kind"] == "time_wait_pressure"
        })
        .expect("6 of 10 ports in TIME_WAIT to one destination");
    assert_eq!(
        (&raised["count"], &raised["port_range"], &raised["dport"]),
        (&6.into(), &10.into(), &sp.into()),
        "{raised}"
    );
    assert!(raised["tw_reuse"].is_u64(), "{raised}");
    let metrics = daemon.get("/metrics");
    assert!(
        metrics.contains("tcpstate_time_wait_pressure_ratio 0.6"),
        "{metrics}"
    );
    // Two new connections take over two TIME_WAIT ports: 4 of 10 left.
    std::thread::sleep(Duration::from_millis(1100));
    let kept = ns.run(move || {
        (40000..40002)
            .map(|cp| {
                let c = client_from(SocketAddr::from(([127, 0, 0, 1], cp)), server)
                    .expect("reuse a TIME_WAIT port");
                let (s, _) = l.accept().expect("accept");
                (c, s)
            })
            .collect::<Vec<_>>()
    });
    let relieved = daemon.wait_for(Duration::from_secs(5), |r| {
        r["type"] == "anomaly_resolved" && r["kind"] == "time_wait_pressure"
    });
    daemon.stop();
    drop(kept);
    let relieved = relieved.expect("resolved below the threshold");
    assert_eq!(
        (&relieved["resolution"], &relieved["count"]),
        (&"below_threshold".into(), &4.into()),
        "{relieved}"
    );
}

/// Issue 18.2: every connection's end record says which side began it. The side that sent
/// the first FIN says `local` (and keeps the TIME_WAIT), its peer says `peer`, and an abort
/// says `reset` on both ends. A failed connect closes no connection and says nothing.
#[test]
fn every_end_record_says_who_closed_first() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let sp = port(29100);
    let daemon = Daemon::watching(&ns).start();
    let (closer, aborter, refused) = ns.run(move || {
        let l = listener(sp);
        // The client closes first.
        let c = TcpStream::connect(("127.0.0.1", sp)).expect("connect");
        let (s, _) = l.accept().expect("accept");
        let closer = c.local_addr().expect("addr").port();
        drop(c);
        std::thread::sleep(Duration::from_millis(50));
        drop(s);
        // The client aborts (SO_LINGER 0: a reset, no FIN).
        let c = TcpStream::connect(("127.0.0.1", sp)).expect("connect");
        let (s, _) = l.accept().expect("accept");
        let aborter = c.local_addr().expect("addr").port();
        linger_zero(&c);
        drop(c);
        std::thread::sleep(Duration::from_millis(50));
        drop(s);
        // Nothing listens there: refused.
        let refused = port(29150);
        assert!(TcpStream::connect(("127.0.0.1", refused)).is_err());
        (closer, aborter, refused)
    });
    std::thread::sleep(Duration::from_millis(300));
    let records = daemon.stop();
    let ts = transitions(&records, ns.inode);
    let end = |local: u16, remote: u16| -> Option<(String, String, Option<String>)> {
        ts.iter()
            .filter(|t| t["sport"] == local && t["dport"] == remote)
            .filter(|t| t["new"] == "CLOSE" || t["new"] == "TIME_WAIT")
            .find(|t| t["old"] != "TIME_WAIT")
            .map(|t| {
                (
                    t["old"].as_str().unwrap_or("?").to_owned(),
                    t["new"].as_str().unwrap_or("?").to_owned(),
                    t["closed_first"].as_str().map(str::to_owned),
                )
            })
    };
    let said = |old: &str, new: &str, side: &str| {
        Some((old.to_owned(), new.to_owned(), Some(side.to_owned())))
    };
    assert_eq!(
        end(closer, sp),
        said("FIN_WAIT2", "TIME_WAIT", "local"),
        "{ts:#?}"
    );
    assert_eq!(
        end(sp, closer),
        said("LAST_ACK", "CLOSE", "peer"),
        "{ts:#?}"
    );
    assert_eq!(
        end(aborter, sp),
        said("ESTABLISHED", "CLOSE", "reset"),
        "{ts:#?}"
    );
    assert_eq!(
        end(sp, aborter),
        said("ESTABLISHED", "CLOSE", "reset"),
        "{ts:#?}"
    );
    let failed: Vec<&&Value> = ts.iter().filter(|t| t["dport"] == refused).collect();
    assert!(
        failed.iter().any(|t| t["new"] == "CLOSE"),
        "the failed connect's end is recorded: {ts:#?}"
    );
    assert!(
        failed.iter().all(|t| t["closed_first"].is_null()),
        "a failed connect closed no connection: {failed:#?}"
    );
}

/// Issue 18.3: port exhaustion realised. With 4 ephemeral ports and all 4 in TIME_WAIT to one
/// server (no tcp_tw_reuse), `connect()` fails with EADDRNOTAVAIL. The kernel entered
/// SYN_SENT before looking for a port and closes the socket with none: each failure is a
/// transition record with reason `no_local_port`, counted on /metrics, and the destination's
/// open `time_wait_pressure` names the process it failed for.
#[test]
fn a_connect_refused_a_local_port_is_no_local_port_and_named_by_the_pressure() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    for setting in [
        "net.ipv4.ip_local_port_range=40000 40003",
        "net.ipv4.tcp_tw_reuse=0",
    ] {
        let st = ns
            .command("sysctl")
            .args(["-qw", setting])
            .status()
            .expect("sysctl");
        assert!(st.success(), "{setting}");
    }
    let sp = port(31500);
    // No port filter: a bind to port 0 matches none.
    let mut daemon = Daemon::watching(&ns)
        .arg("--bind-failures=syscalls")
        .metrics()
        .start();
    let (failures, surprises, bind_refused) = ns.run(move || {
        let l = listener(sp);
        // The client closes first: the TIME_WAIT, and its port, stay here.
        let close_client_first = |c: TcpStream| {
            let (s, _) = l.accept().expect("accept");
            drop(c);
            std::thread::sleep(Duration::from_millis(10));
            drop(s);
        };
        for _ in 0..4 {
            close_client_first(TcpStream::connect(("127.0.0.1", sp)).expect("connect"));
        }
        std::thread::sleep(Duration::from_millis(100));
        // Four ports, four TIME_WAIT: the next connects are refused. A kernel that frees a
        // port anyway (seen once on 7.3 in CI) gets it filled again and asked again, so the
        // test counts what the kernel did rather than what it should have done, and says so.
        let (mut failures, mut surprises) = (Vec::new(), Vec::new());
        for _ in 0..8 {
            match TcpStream::connect(("127.0.0.1", sp)) {
                Err(e) => failures.push(e.kind()),
                Ok(c) => {
                    let ss = std::process::Command::new("ss")
                        .args(["-tan"])
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default();
                    surprises.push(format!("{c:?} was given a port; ss -tan:\n{ss}"));
                    close_client_first(c);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            if failures.len() == 2 {
                break;
            }
        }
        // A bind to port 0 meets the same four TIME_WAIT: the bind-before-connect client's
        // form of the exhaustion, where the kernel refuses it (EADDRINUSE).
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        let bound = s
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .map_err(|e| e.raw_os_error());
        (failures, surprises, bound.err())
    });
    for s in &surprises {
        eprintln!("closepath: {s}");
    }
    assert_eq!(
        failures,
        [std::io::ErrorKind::AddrNotAvailable; 2],
        "the kernel ran out of ports ({} connects given a port anyway)",
        surprises.len()
    );
    daemon
        .wait_for(Duration::from_secs(5), |r| {
            r["type"] == "anomaly" && r["kind"] == "time_wait_pressure"
        })
        .expect("4 of 4 ports in TIME_WAIT");
    // Read before the pressure or after it: the daemon writes them in its own order.
    let refused = daemon.wait_for_n(Duration::from_secs(5), 2, |r| {
        r["type"] == "transition" && r["reason"] == "no_local_port"
    });
    assert_eq!(
        refused.len(),
        2,
        "each refused connect is a record: {refused:?}"
    );
    for r in &refused {
        assert_eq!(
            (&r["old"], &r["new"], &r["dport"], &r["sport"]),
            (&"SYN_SENT".into(), &"CLOSE".into(), &sp.into(), &0.into()),
            "{r}"
        );
        assert_eq!(r["pid"], std::process::id(), "{r}");
    }
    let metrics = daemon.get("/metrics");
    assert!(
        metrics.contains(r#"tcpstate_failed_connects_total{reason="no_local_port"} 2"#),
        "{metrics}"
    );
    let status: serde_json::Value = daemon.status();
    let open = status["open_anomalies"]
        .as_array()
        .expect("open anomalies")
        .iter()
        .find(|a| a["kind"] == "time_wait_pressure" && a["dport"] == sp)
        .cloned()
        .expect("the pressure is open");
    assert_eq!(open["refused_connects"], 2, "{open}");
    // What the kernel did with the bind, the pressure says: refused, one; given a port, none.
    if bind_refused == Some(Some(libc::EADDRINUSE)) {
        assert_eq!(open["refused_binds"], 1, "{open}");
    } else {
        eprintln!(
            "closepath: this kernel gave bind(0) a port past four TIME_WAIT: {bind_refused:?}"
        );
        assert_eq!(open.get("refused_binds"), None, "{open}");
    }
    assert_eq!(open["pid"], std::process::id(), "{open}");
    drop(daemon.stop());
}
