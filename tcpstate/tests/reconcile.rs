//! Real event loss (a ring buffer too small for a burst) leaves sockets the
//! kernel closed in the table; reconciliation must remove them.

mod common;

use std::{
    io::Read as _,
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use common::{Daemon, Netns, port, reconciled_away, require_bpf};
use serde_json::Value;

fn status(mport: u16) -> Value {
    let mut s = TcpStream::connect(("127.0.0.1", mport)).expect("connect");
    use std::io::Write as _;
    write!(
        s,
        "GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {resp}"))
}

/// Moves the calling thread to `cpu`; a machine with one CPU cannot split the burst, which
/// the test needs (it fails loudly rather than test less).
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it for cpu < 1024.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(
        rc,
        0,
        "pin to CPU {cpu} (this test needs 2 CPUs): {}",
        std::io::Error::last_os_error()
    );
}

/// A daemon with a 4 KiB ring (about 46 events per CPU) that reconciles every second, and
/// the port its `/status` answers on.
fn small_ring_daemon(p: u16, extra: &[&str]) -> (Daemon, u16) {
    let mport = common::free_port();
    let addr = format!("127.0.0.1:{mport}");
    let p = p.to_string();
    let mut args = vec![
        "--port",
        &p,
        "--ring-size",
        "4K",
        "--reconcile-interval",
        "1s",
        "--metrics-addr",
        &addr,
    ];
    args.extend(extra);
    (Daemon::start(&args), mport)
}

/// 300 connections to port `p`, made on CPU 0 (run inside the test's namespace). Loopback
/// handles both ends on the sending CPU, so with the daemon frozen these births overflow CPU
/// 0's ring and leave the others' rings empty: what the caller then does on CPU 1 reaches
/// the daemon about sockets whose births it never saw. It meets them mid-life, with no
/// namespace known (CI once met this by chance).
fn births_on_cpu0(p: u16) -> (TcpListener, Vec<(TcpStream, TcpStream)>) {
    pin_to_cpu(0);
    let l = TcpListener::bind(("127.0.0.1", p)).expect("bind");
    let mut pairs = Vec::new();
    for _ in 0..300 {
        let c = TcpStream::connect(("127.0.0.1", p)).expect("connect");
        let (s, _) = l.accept().expect("accept");
        pairs.push((c, s));
    }
    pin_to_cpu(1);
    (l, pairs)
}

#[test]
fn lost_events_are_reconciled_away() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let p = port(31000);
    let (daemon, mport) = small_ring_daemon(p, &[]);
    // Frozen, so the burst overflows the rings: real loss, counted by the kernel side.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.pid(), libc::SIGSTOP) };
    ns.run(move || {
        let (l, mut held) = births_on_cpu0(p);
        // Last born, first closed: the closes the second ring keeps are of sockets whose
        // births the first ring lost.
        while let Some(pair) = held.pop() {
            drop(pair);
        }
        drop(l);
    });
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: as above.
    unsafe { libc::kill(daemon.pid(), libc::SIGCONT) };
    // Every socket of the burst is closed now; only the table may think
    // otherwise until a reconciliation pass.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = status(mport);
    while last["tracked"] != 0 {
        assert!(Instant::now() < deadline, "ghosts remain: {last}");
        std::thread::sleep(Duration::from_millis(200));
        last = status(mport);
    }
    let records = daemon.stop();
    let stopped = records
        .iter()
        .find(|r| r["type"] == "stopped")
        .expect("stopped");
    assert!(
        stopped["dropped"].as_u64().unwrap_or(0) > 0,
        "the burst overflowed the ring: {stopped}"
    );
    assert!(
        records.iter().filter(|r| r["type"] == "transition").count() as u64
            == stopped["events"].as_u64().unwrap_or(0),
        "every received event was printed"
    );
}

/// Live sockets met mid-life (their births lost) in another namespace are placed in it: their
/// anomalies name it, and no reconciliation takes them for ghosts of the daemon's own.
#[test]
fn sockets_met_mid_life_are_placed_in_their_namespace() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let p = port(31100);
    let (mut daemon, mport) = small_ring_daemon(p, &["--threshold", "close_wait=1s"]);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.pid(), libc::SIGSTOP) };
    let (l, held) = ns.run(move || {
        let (l, mut pairs) = births_on_cpu0(p);
        // The last ten clients close on the other CPU: their servers' ESTABLISHED ->
        // CLOSE_WAIT reach the daemon, their births did not. The servers are kept: a leak.
        let servers: Vec<TcpStream> = pairs.split_off(290).into_iter().map(|(_, s)| s).collect();
        (l, (pairs, servers))
    });
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: as above.
    unsafe { libc::kill(daemon.pid(), libc::SIGCONT) };
    let mut raised = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while raised.len() < 10 && Instant::now() < deadline {
        if let Some(r) = daemon.wait_for(Duration::from_millis(500), |r| {
            r["type"] == "anomaly" && r["kind"] == "close_wait"
        }) {
            raised.push(r);
        }
    }
    // Several reconciliations later, still there.
    std::thread::sleep(Duration::from_secs(3));
    let last = status(mport);
    // Stopped first: closing 300 pairs would overflow the 4 KiB ring again.
    let records = daemon.stop();
    drop(held);
    drop(l);
    assert_eq!(
        raised.len(),
        10,
        "one close_wait per leaked server: {raised:?}"
    );
    for r in &raised {
        assert_eq!(r["netns"], ns.inode, "placed in its namespace: {r}");
    }
    assert_eq!(last["sockets"]["CLOSE_WAIT"], 10, "still tracked: {last}");
    let reconciled = reconciled_away(&records);
    assert!(
        reconciled.is_empty(),
        "a live socket is never reconciled away: {reconciled:?}"
    );
}

/// A namespace's TIME_WAIT count, as the kernel keeps it (`tw` in its sockstat).
fn kernel_timewait(ns: &Netns) -> u64 {
    let text = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/sockstat"));
    let text = text.unwrap_or_else(|e| panic!("sockstat: {e}"));
    text.lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let mut w = l.split_whitespace();
            w.find(|w| *w == "tw")?;
            w.next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no tw in sockstat: {text}"))
}

/// 20,000 TIME_WAIT made within seconds expire together 60 s later: more than one sweep may
/// list (16,384), so they end in parts, one asked right after the other. The daemon's count
/// follows the kernel's to 0 within seconds, none is ended early or left behind, and the
/// emptied table gives its memory back (issue 21.10: the whole burst was listed at once,
/// three times over, and its buckets kept for good).
#[test]
fn a_burst_of_time_wait_expiring_together_ends_in_parts_and_gives_memory_back() {
    if !require_bpf() {
        return;
    }
    const N: u64 = 20_000;
    let ns = Netns::new();
    // A small guest's default TIME_WAIT limit is 16,384 (half its hash table's buckets): the
    // kernel would destroy the rest at once ("time wait bucket table overflow").
    for setting in [
        "net.ipv4.tcp_tw_reuse=0",
        "net.ipv4.tcp_max_tw_buckets=100000",
    ] {
        let out = ns
            .command("sysctl")
            .args(["-qw", setting])
            .status()
            .expect("sysctl");
        assert!(out.success(), "sysctl {setting}");
    }
    let mport = common::free_port();
    // Quiet: 200,000 transition records on stdout would only be read to be thrown away (and
    // under emulation not within the stop's wait); /status says all the test needs.
    let mut daemon = QuietDaemon::start(&[
        "--netns",
        &format!("/run/netns/{}", ns.name),
        "--metrics-addr",
        &format!("127.0.0.1:{mport}"),
    ]);
    let p = port(31200);
    ns.run(move || {
        let l = TcpListener::bind(("0.0.0.0", p)).expect("listen");
        for i in 0..N {
            // Two destinations: 10,000 ports each, inside the default ephemeral range.
            let to = if i % 2 == 0 { "127.0.0.1" } else { "127.0.0.2" };
            let c = TcpStream::connect((to, p)).expect("connect");
            let (s, _) = l.accept().expect("accept");
            drop(c);
            drop(s);
        }
    });
    let kernel = kernel_timewait(&ns);
    assert!(
        kernel > 16_384,
        "more than one sweep's worth in TIME_WAIT: {kernel}"
    );
    let counted_all = Instant::now() + Duration::from_secs(30);
    let full = loop {
        let s = status(mport);
        if s["sockets"]["TIME_WAIT"].as_u64() >= Some(kernel_timewait(&ns))
            || Instant::now() > counted_all
        {
            break s;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let tracked = full["sockets"]["TIME_WAIT"].as_u64().unwrap_or(0);
    assert!(tracked > 16_384, "all tracked: {full}");
    let full_bytes = full["table_bytes"].as_u64().expect("table_bytes");
    // Until the kernel's timer wheel has ended the last (60 s after they were made, and a
    // few seconds of slack), the daemon never counts fewer than the kernel.
    let expired_by = Instant::now() + Duration::from_secs(100);
    let kernel_empty = loop {
        // Ours first: the kernel's can only fall after it. A state with no socket is left
        // out of the page.
        let ours = status(mport)["sockets"]["TIME_WAIT"].as_u64().unwrap_or(0);
        let kernel = kernel_timewait(&ns);
        assert!(
            ours >= kernel,
            "the daemon ended some early: {ours} < {kernel}"
        );
        if kernel == 0 {
            break Instant::now();
        }
        assert!(
            Instant::now() < expired_by,
            "the kernel still holds {kernel} TIME_WAIT"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let last = loop {
        let s = status(mport);
        if s["sockets"]["TIME_WAIT"].is_null() || kernel_empty.elapsed() > Duration::from_secs(10) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    daemon.stop();
    assert!(
        last["sockets"]["TIME_WAIT"].is_null(),
        "the daemon followed the kernel to 0 within 10 s: {last}"
    );
    let bytes = last["table_bytes"].as_u64().expect("table_bytes");
    assert!(
        bytes * 4 < full_bytes,
        "the emptied table gave its buckets back: {bytes} of {full_bytes} bytes kept"
    );
}

/// A daemon that writes nothing to stdout (`--quiet`), ready once `/status` answers.
struct QuietDaemon {
    child: std::process::Child,
    control: std::path::PathBuf,
}

impl QuietDaemon {
    fn start(args: &[&str]) -> Self {
        let control = common::control_socket();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_tcpstate"))
            .args(["run", "--quiet", "--control-socket"])
            .arg(&control)
            .args(args)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start tcpstate: {e}"));
        let mut d = Self { child, control };
        let port = args
            .iter()
            .position(|a| *a == "--metrics-addr")
            .and_then(|i| args.get(i + 1))
            .and_then(|a| a.rsplit(':').next()?.parse::<u16>().ok())
            .expect("a --metrics-addr");
        let ready = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < ready, "tcpstate did not serve /status");
            assert!(
                d.child.try_wait().ok().flatten().is_none(),
                "tcpstate exited at start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        d
    }

    /// SIGTERM, and a clean exit within 30 s.
    fn stop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                assert!(st.success(), "tcpstate exited with {st}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "tcpstate did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for QuietDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.control);
    }
}
