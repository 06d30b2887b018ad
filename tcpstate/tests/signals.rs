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
