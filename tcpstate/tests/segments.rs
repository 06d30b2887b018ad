//! Retransmits and resets on real traffic, joined to the socket's story: which side reset, in
//! which state, and how many retransmissions the socket had seen.

mod common;

use std::{
    io::Write as _,
    net::{TcpListener, TcpStream},
    time::Duration,
};

use common::{Daemon, Netns, free_port, http_get, port, require_bpf};
use serde_json::Value;

fn abort(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(s);
}

fn resets(records: &[Value], netns: u64) -> Vec<(String, String, u64, u64)> {
    records
        .iter()
        .filter(|r| r["type"] == "reset" && r["netns"] == netns)
        .map(|r| {
            (
                r["side"].as_str().unwrap_or("").to_owned(),
                r["state"].as_str().unwrap_or("").to_owned(),
                r["sport"].as_u64().unwrap_or(0),
                r["dport"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn a_reset_in_each_direction_says_which_side_and_state() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let p = port(31000);
    let daemon = Daemon::start(&["--port", &p.to_string()]);
    let (server_side, client_side) = ns.run(move || {
        let l = TcpListener::bind(("127.0.0.1", p)).expect("bind");
        // The server aborts the first connection, the client the second.
        let c1 = TcpStream::connect(("127.0.0.1", p)).expect("connect");
        let (s1, _) = l.accept().expect("accept");
        let c1_port = c1.local_addr().expect("addr").port();
        abort(s1);
        std::thread::sleep(Duration::from_millis(50));
        drop(c1);
        let c2 = TcpStream::connect(("127.0.0.1", p)).expect("connect");
        let (s2, _) = l.accept().expect("accept");
        let c2_port = c2.local_addr().expect("addr").port();
        abort(c2);
        std::thread::sleep(Duration::from_millis(50));
        drop(s2);
        (c1_port, c2_port)
    });
    std::thread::sleep(Duration::from_millis(300));
    let records = daemon.stop();
    let got = resets(&records, ns.inode);
    let p = u64::from(p);
    let (c1, c2) = (u64::from(server_side), u64::from(client_side));
    let est = "ESTABLISHED".to_owned();
    assert_eq!(
        got,
        [
            // The server's abort: the client's socket receives it (loopback delivers it
            // inside the send), then the hook on the sender fires.
            ("received".to_owned(), est.clone(), c1, p),
            ("sent".to_owned(), est.clone(), p, c1),
            ("received".to_owned(), est.clone(), p, c2),
            ("sent".to_owned(), est, c2, p),
        ],
        "{records:?}"
    );
    let by_us = records
        .iter()
        .filter(|r| r["type"] == "reset" && r["netns"] == ns.inode && r["side"] == "sent")
        .all(|r| r["pid"] == std::process::id());
    assert!(by_us, "the aborting socket's holder is named: {records:?}");
}

#[test]
fn retransmits_are_counted_per_state_and_carried_to_the_socket_end() {
    if !require_bpf() {
        return;
    }
    // Two namespaces joined by a veth pair; the server loses its address mid-connection, so
    // the client's data is sent again and again.
    let client = Netns::new();
    let server = Netns::new();
    common::veth_pair(&client, &server, "rt", "10.97.0");
    let p = port(31600);
    let mport = free_port();
    let daemon = Daemon::start(&[
        "--port",
        &p.to_string(),
        "--metrics-addr",
        &format!("127.0.0.1:{mport}"),
    ]);
    let listener = server.run(move || TcpListener::bind(("10.97.0.2", p)).expect("bind"));
    let mut c = client.run(move || TcpStream::connect(("10.97.0.2", p)).expect("connect"));
    let (s, _) = listener.accept().expect("accept");
    let cport = c.local_addr().expect("addr").port();
    // Its address goes: the client's segments still arrive (the neighbour is known) and are
    // dropped there, unanswered.
    common::ip(&[
        "-n",
        &server.name,
        "addr",
        "del",
        "10.97.0.2/24",
        "dev",
        "rt1",
    ]);
    c.write_all(b"hello?").expect("queued");
    // RTO 200 ms, then 400, 800: three retransmissions in 1.6 s.
    std::thread::sleep(Duration::from_millis(1700));
    let metrics = http_get(mport, "/metrics");
    abort(c);
    std::thread::sleep(Duration::from_millis(300));
    let records = daemon.stop();
    drop(s);

    let line = metrics
        .lines()
        .find(|l| l.starts_with("tcpstate_retransmits_total{state=\"ESTABLISHED\"}"))
        .unwrap_or_else(|| panic!("no ESTABLISHED retransmits in {metrics}"));
    let n: u64 = line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a count");
    assert!(n >= 3, "{line}");
    let end = records
        .iter()
        .find(|r| {
            r["type"] == "transition"
                && r["netns"] == client.inode
                && r["sport"] == cport
                && r["new"] == "CLOSE"
        })
        .unwrap_or_else(|| panic!("the client's close in {records:?}"));
    let seen = end["retransmits"]
        .as_u64()
        .expect("retransmits on the close");
    assert!(seen >= 3, "{end}");
    let reset = records
        .iter()
        .find(|r| r["type"] == "reset" && r["netns"] == client.inode)
        .unwrap_or_else(|| panic!("the abort's reset in {records:?}"));
    assert_eq!(
        (&reset["side"], &reset["state"], &reset["retransmits"]),
        (&"sent".into(), &"ESTABLISHED".into(), &seen.into()),
        "{reset}"
    );
}

/// The kernel's release as (major, minor).
fn kernel_release() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (v.next().unwrap_or(0), v.next().unwrap_or(0))
}

/// A classic BPF filter that keeps nothing (`ret #0`): every segment the socket receives is
/// dropped, reason SOCKET_FILTER, and counted in the socket's `sk_drops` (`ss -m`'s `d`).
fn drop_everything(s: &TcpStream) {
    use std::os::fd::AsRawFd as _;
    let code = [libc::sock_filter {
        code: 0x06, // BPF_RET | BPF_K
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let prog = libc::sock_fprog {
        len: 1,
        filter: code.as_ptr().cast_mut(),
    };
    // SAFETY: a valid socket fd and a filter program that outlives the call (the kernel
    // copies it).
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const prog).cast(),
            size_of::<libc::sock_fprog>() as u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "SO_ATTACH_FILTER: {}",
        std::io::Error::last_os_error()
    );
}

/// The `d` (sk_drops) of the one socket `ss -tmn` shows with local port `p` in `ns`.
fn ss_drops(ns: &Netns, p: u16) -> u64 {
    let out = ns
        .command("ss")
        .args(["-tmnH", "sport", "=", &format!(":{p}")])
        .output()
        .expect("ss");
    let text = String::from_utf8_lossy(&out.stdout);
    let skmem = text
        .split("skmem:(")
        .nth(1)
        .unwrap_or_else(|| panic!("no skmem for :{p}: {text}"));
    skmem
        .split([',', ')'])
        .find_map(|f| f.strip_prefix('d')?.parse().ok())
        .unwrap_or_else(|| panic!("no d in {skmem}"))
}

/// A connection on port `p` in `ns` whose client has sent its FIN: the server (first) is in
/// CLOSE_WAIT, the client in FIN_WAIT2.
fn close_wait_pair(ns: &Netns, p: u16) -> (TcpStream, TcpStream) {
    ns.run(move || {
        use std::io::Read as _;
        let l = TcpListener::bind(("127.0.0.1", p)).expect("bind");
        let c = TcpStream::connect(("127.0.0.1", p)).expect("connect");
        let (mut s, _) = l.accept().expect("accept");
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
        assert_eq!(s.read(&mut [0u8; 1]).expect("eof"), 0);
        (s, c)
    })
}

/// The sum of `tcpstate_drops_total` for `reason` (in `state`, or any) in a scrape.
fn drops_total(metrics: &str, reason: &str, state: Option<&str>) -> u64 {
    let head = format!("tcpstate_drops_total{{reason=\"{reason}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with(&head))
        .filter(|l| state.is_none_or(|s| l.contains(&format!("state=\"{s}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The kernel's count of a retransmitting socket's drops, and a scrape taken while it stood
/// still: each retransmission brings one more drop, and between two the daemon's counts must
/// be the kernel's.
fn quiet_count(daemon: &Daemon, kernel: impl Fn() -> u64) -> (u64, String) {
    for _ in 0..30 {
        let before = kernel();
        std::thread::sleep(Duration::from_millis(300));
        let metrics = daemon.get("/metrics");
        if kernel() == before {
            return (before, metrics);
        }
    }
    panic!("no quiet moment between retransmits in 9 s");
}

/// Issue 18.4: a socket whose peer's segments the kernel drops (here its own socket filter)
/// has them counted by reason and state, exactly as the kernel's own `sk_drops`, and its
/// anomaly says so. From 6.11 the tracepoint names the receiving socket; before, a received
/// drop has no socket yet and is counted by reason only (state `none`).
#[test]
fn drops_are_counted_by_reason_as_the_kernel_counts_them_and_ride_on_the_anomaly() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let p = port(30500);
    let mut daemon = Daemon::watching(&ns)
        .port(p)
        .arg("--drops")
        .threshold("close_wait=1s")
        .metrics()
        .start();
    let (mut server, client) = close_wait_pair(&ns, p);
    // From now on the server drops what comes: its data is acknowledged by the client, and
    // each ACK dropped, so the server sends it again, and again.
    drop_everything(&server);
    server.write_all(b"x").expect("write");
    let named = kernel_release() >= (6, 11);
    let anomaly = daemon
        .wait_for(Duration::from_secs(5), |r| {
            r["type"] == "anomaly" && r["kind"] == "close_wait"
        })
        .expect("close_wait raised");
    if named {
        assert_eq!(anomaly["drops"]["reason"], "SOCKET_FILTER", "{anomaly}");
        assert!(
            anomaly["drops"]["count"].as_u64().unwrap_or(0) >= 1,
            "{anomaly}"
        );
    }
    let (kernel, metrics) = quiet_count(&daemon, || ss_drops(&ns, p));
    assert!(kernel >= 2, "the kernel dropped {kernel}");
    assert_eq!(
        drops_total(&metrics, "SOCKET_FILTER", None),
        kernel,
        "{metrics}"
    );
    if named {
        assert_eq!(
            drops_total(&metrics, "SOCKET_FILTER", Some("CLOSE_WAIT")),
            kernel,
            "{metrics}"
        );
    } else {
        assert_eq!(
            drops_total(&metrics, "SOCKET_FILTER", Some("none")),
            kernel,
            "{metrics}"
        );
    }
    drop((server, client));
    drop(daemon.stop());
}

/// The packets an nftables rule's counter says it dropped, in `ns`'s table `tcpstate_test`.
fn nft_dropped(ns: &Netns) -> u64 {
    let out = ns
        .command("nft")
        .args(["list", "table", "inet", "tcpstate_test"])
        .output()
        .expect("nft (Debian package nftables; cargo xtask setup installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("counter packets ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no counter in nft's table: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// Issue 18.4: a firewall that drops a live connection's packets (here an nftables rule on
/// the output hook, in the test's namespace) is named on the socket whose packets it drops:
/// `NETFILTER_DROP` in that socket's state, as many as the rule's own counter says, and on
/// its anomaly. A packet on its way out carries its socket on every kernel of the matrix.
#[test]
fn a_firewall_drop_is_counted_on_the_socket_it_hits_as_the_rule_counts_it() {
    if !require_bpf() {
        return;
    }
    // nf_tables is a module on Debian's kernels, and loading it takes a while under
    // emulation: done before the clock of the CLOSE_WAIT starts.
    let _ = std::process::Command::new("modprobe")
        .args(["-q", "nf_tables"])
        .status();
    let ns = Netns::new();
    let p = port(30800);
    let mut daemon = Daemon::watching(&ns)
        .port(p)
        .threshold("close_wait=3s")
        .metrics()
        .start();
    // The connection is made before the rule is armed: the rule drops all that leaves port
    // p, the SYN-ACK too.
    let (mut server, client) = close_wait_pair(&ns, p);
    let rules = format!(
        "table inet tcpstate_test {{\n chain out {{\n  type filter hook output priority 0; \
         policy accept;\n  tcp sport {p} counter drop\n }}\n}}\n"
    );
    let file = std::env::temp_dir().join(format!("tcpstate-nft-{}-{p}", std::process::id()));
    std::fs::write(&file, &rules).expect("write the ruleset");
    let out = ns
        .command("nft")
        .arg("-f")
        .arg(&file)
        .output()
        .expect("nft (Debian package nftables; cargo xtask setup installs it)");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "nft {rules}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The server's data never leaves: each (re)transmission is dropped on the way out.
    server.write_all(b"x").expect("write");
    let anomaly = daemon
        .wait_for(Duration::from_secs(10), |r| {
            r["type"] == "anomaly" && r["kind"] == "close_wait" && r["sport"] == p
        })
        .expect("close_wait raised");
    // Raised 3 s after the FIN, by when the first transmission (at once) and the
    // retransmissions of the next 2 s or so (200 ms RTO, doubling) were dropped.
    assert_eq!(anomaly["drops"]["reason"], "NETFILTER_DROP", "{anomaly}");
    assert!(
        anomaly["drops"]["count"].as_u64().unwrap_or(0) >= 1,
        "{anomaly}"
    );
    // Between two retransmissions the counts stand still, and must be the rule's.
    let (dropped, metrics) = quiet_count(&daemon, || nft_dropped(&ns));
    assert!(dropped >= 2, "the rule dropped {dropped}");
    assert_eq!(
        drops_total(&metrics, "NETFILTER_DROP", Some("CLOSE_WAIT")),
        dropped,
        "{metrics}"
    );
    assert_eq!(
        drops_total(&metrics, "NETFILTER_DROP", None),
        dropped,
        "{metrics}"
    );
    drop((server, client));
    drop(daemon.stop());
}

/// Issue 18.3: a TCP socket's bind() refused with EADDRINUSE is a record naming the process,
/// the address asked for and why (a fixed port taken; port 0 with no free port in the range),
/// and a count by reason; no transition says it.
#[test]
fn a_refused_bind_names_the_process_and_why() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let st = ns
        .command("sysctl")
        .args(["-qw", "net.ipv4.ip_local_port_range=40000 40001"])
        .status()
        .expect("sysctl");
    assert!(st.success(), "{st}");
    let p = port(30600);
    // The syscall tracepoints work on every kernel and host (fexit, the default, is refused
    // where ftrace is locked down: the next test).
    let mut daemon = Daemon::watching(&ns)
        .arg("--bind-failures=syscalls")
        .metrics()
        .start();
    let errors = ns.run(move || {
        use socket2::{Domain, Socket, Type};
        let bind = |port: u16| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
            let r = s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into());
            (s, r.err().map(|e| e.raw_os_error()))
        };
        let l = TcpListener::bind(("127.0.0.1", p)).expect("bind");
        // A fixed port that is taken.
        let (_a, taken) = bind(p);
        // Two ports in the range, both bound: port 0 finds none.
        let (_b, first) = bind(0);
        let (_c, second) = bind(0);
        let (_d, none_left) = bind(0);
        drop(l);
        [taken, first, second, none_left]
    });
    assert_eq!(
        errors,
        [
            Some(Some(libc::EADDRINUSE)),
            None,
            None,
            Some(Some(libc::EADDRINUSE))
        ]
    );
    let mut refused = Vec::new();
    while refused.len() < 2 {
        let r = daemon
            .wait_for(Duration::from_secs(5), |r| r["type"] == "bind_refused")
            .expect("each refused bind is a record");
        refused.push(r);
    }
    let ours = std::process::id();
    let got: Vec<_> = refused
        .iter()
        .map(|r| {
            (
                r["addr"].as_str().unwrap_or("").to_owned(),
                r["port"].as_u64().unwrap_or(9),
                r["reason"].as_str().unwrap_or("").to_owned(),
                r["pid"] == ours && r["netns"] == ns.inode,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "127.0.0.1".to_owned(),
                u64::from(p),
                "port_taken".to_owned(),
                true
            ),
            ("127.0.0.1".to_owned(), 0, "no_free_port".to_owned(), true),
        ],
        "{refused:?}"
    );
    let metrics = daemon.get("/metrics");
    for line in [
        "tcpstate_binds_refused_total{reason=\"port_taken\"} 1",
        "tcpstate_binds_refused_total{reason=\"no_free_port\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    let records = daemon.stop();
    assert_eq!(
        records
            .iter()
            .filter(|r| r["type"] == "bind_refused")
            .count(),
        2,
        "one record per refusal"
    );
}

/// The default bind hook is fexit, which only a bind pays for. Where the kernel allows
/// trampolines (the kernel matrix) a refused bind is a record; where it refuses them (a host
/// with ftrace locked down) the feature report says so and how to get it anyway, and no
/// record is made up.
#[test]
fn the_default_bind_hook_is_fexit_or_says_why_not() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let p = port(30700);
    let mut daemon = Daemon::watching(&ns).start();
    let bind_hooks = daemon.feature("bind_hooks");
    let taken = ns.run(move || {
        let l = TcpListener::bind(("127.0.0.1", p)).expect("bind");
        let err = TcpListener::bind(("127.0.0.1", p)).expect_err("taken");
        drop(l);
        err.raw_os_error()
    });
    assert_eq!(taken, Some(libc::EADDRINUSE));
    let record = daemon.wait_for(Duration::from_secs(3), |r| r["type"] == "bind_refused");
    if bind_hooks["on"] == true {
        let r = record.expect("fexit saw the refused bind");
        assert_eq!(
            (&r["port"], &r["reason"], &r["pid"]),
            (&p.into(), &"port_taken".into(), &std::process::id().into()),
            "{r}"
        );
    } else {
        let why = bind_hooks["why_off"].as_str().unwrap_or("");
        // The matrix's stock kernels allow trampolines: there this branch is a failure.
        assert!(
            std::env::var_os("TCPSTATE_IN_VM").is_none(),
            "fexit refused on a stock kernel: {why}"
        );
        eprintln!("fexit refused here; the kernel matrix runs the other branch: {why}");
        assert!(
            why.contains("fexit") && why.contains("--bind-failures=syscalls"),
            "{bind_hooks}"
        );
        assert_eq!(record, None, "no hook, no record");
    }
    drop(daemon.stop());
}
