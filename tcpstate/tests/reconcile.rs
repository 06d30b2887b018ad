//! Real event loss (a ring buffer too small for a burst) leaves sockets the
//! kernel closed in the table; reconciliation must remove them.

mod common;

use std::{
    io::Read as _,
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use common::{Daemon, Netns, port, require_bpf};
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

#[test]
fn lost_events_are_reconciled_away() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let p = port(31000);
    let mport = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let daemon = Daemon::start(&[
        "--port",
        &p.to_string(),
        "--ring-size",
        "4K",
        "--reconcile-interval",
        "1s",
        "--metrics-addr",
        &format!("127.0.0.1:{mport}"),
    ]);
    // Freeze the daemon so a burst far larger than a 4 KiB ring (about 46
    // events) overflows it: real loss, counted by the kernel side.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.pid(), libc::SIGSTOP) };
    ns.run(move || {
        let l = TcpListener::bind(("127.0.0.1", p)).expect("bind");
        let mut held = Vec::new();
        for _ in 0..300 {
            let c = TcpStream::connect(("127.0.0.1", p)).expect("connect");
            let (s, _) = l.accept().expect("accept");
            held.push((c, s));
        }
        drop(held);
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
