//! `tcpstate kill` on real sockets: the dry run lists exactly the matching ones, the kill
//! destroys them (`ss` no longer shows them, their holder sees ECONNABORTED) and the log
//! records who did it.

mod common;

use std::{
    io::Write as _,
    net::{TcpListener, TcpStream},
    process::{Command, Output},
    time::Duration,
};

use common::{Daemon, Netns, free_port, port, require_bpf, ss_counts};
use serde_json::Value;

fn tcpstate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tcpstate"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("tcpstate {args:?}: {e}"))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn kill_destroys_exactly_the_old_close_wait_sockets_and_audits_it() {
    if !require_bpf() {
        return;
    }
    let ns = Netns::new();
    let p = port(30000);
    let mport = free_port();
    let dir = std::env::temp_dir().join(format!("tcpstate-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let log = dir.join("tcpstate.log");
    let log_s = log.to_str().expect("utf-8 path").to_owned();
    let addr = format!("127.0.0.1:{mport}");
    let daemon = Daemon::start(&[
        "--port",
        &p.to_string(),
        "--metrics-addr",
        &addr,
        "--log-file",
        &log_s,
    ]);
    // Three connections to our server; two clients close theirs: two server sockets in
    // CLOSE_WAIT, one ESTABLISHED.
    let (servers, mut clients) = ns.run(move || {
        let l = TcpListener::bind(("127.0.0.1", p)).expect("bind");
        let clients: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(("127.0.0.1", p)).expect("connect"))
            .collect();
        let servers: Vec<TcpStream> = (0..3).map(|_| l.accept().expect("accept").0).collect();
        (servers, clients)
    });
    let peers: Vec<u16> = servers
        .iter()
        .map(|s| s.peer_addr().expect("peer").port())
        .collect();
    let kept = clients.pop().expect("three clients");
    let closed: Vec<u16> = clients
        .iter()
        .map(|c| c.local_addr().expect("addr").port())
        .collect();
    drop(clients);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(ss_counts(&ns).get("CLOSE_WAIT"), Some(&2));

    let refused = tcpstate(&["kill", "--state", "close_wait"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.lines().count() == 1 && err.contains("refusing to kill every CLOSE_WAIT socket"),
        "{err}"
    );

    let ps = p.to_string();
    let filters = [
        "kill",
        "--state",
        "close_wait",
        "--older-than",
        "1s",
        "--port",
        &ps,
        "--addr",
        &addr,
    ];
    let young = tcpstate(&[
        "kill",
        "--state",
        "close_wait",
        "--older-than",
        "1h",
        "--port",
        &ps,
        "--addr",
        &addr,
        "--dry-run",
    ]);
    assert!(young.status.success(), "{young:?}");
    assert_eq!(stdout(&young), "no socket matches\n");

    let dry = tcpstate(&[&filters[..], &["--dry-run"]].concat());
    assert!(dry.status.success(), "{dry:?}");
    let listed = stdout(&dry);
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 2, "{listed}");
    for port in &closed {
        let want = format!(
            "would kill CLOSE_WAIT 127.0.0.1:{p} -> 127.0.0.1:{port} (netns {})",
            ns.inode
        );
        assert!(
            lines.iter().any(|l| l.starts_with(&want)
                && l.contains(&format!("held by pid {}", std::process::id()))),
            "{want:?} in {listed}"
        );
    }
    assert_eq!(
        ss_counts(&ns).get("CLOSE_WAIT"),
        Some(&2),
        "a dry run kills nothing"
    );

    let done = tcpstate(&filters);
    assert!(done.status.success(), "{done:?}");
    assert_eq!(
        stdout(&done).matches(" KILLED ").count(),
        2,
        "{}",
        stdout(&done)
    );
    let after = ss_counts(&ns);
    assert_eq!(after.get("CLOSE_WAIT"), None, "{after:?}");
    assert_eq!(
        after.get("ESTABLISHED"),
        Some(&2),
        "the live connection stays: {after:?}"
    );
    for (mut s, peer) in servers.into_iter().zip(peers) {
        if closed.contains(&peer) {
            // A read would see the peer's FIN first (EOF); a write sees the abort.
            let e = s.write(b"x").expect_err("a destroyed socket");
            assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
        }
    }
    drop(kept);

    let records = daemon.stop();
    drop(records);
    let text = std::fs::read_to_string(&log).expect("log");
    let killed: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["type"] == "killed")
        .collect();
    assert_eq!(killed.len(), 2, "{text}");
    for k in &killed {
        assert_eq!(k["state"], "CLOSE_WAIT", "{k}");
        assert_eq!(k["sport"], p, "{k}");
        assert_eq!(k["netns"], ns.inode, "{k}");
        assert_eq!(k["pid"], std::process::id(), "{k}");
        assert_eq!(k["by"]["uid"], 0, "{k}");
        assert!(k["age_ms"].as_f64().expect("age") >= 1000.0, "{k}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_dry_run_without_root_does_not_call_roots_sockets_unheld() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return; // needs root to make the sockets and to drop to another user
    }
    // A CLOSE_WAIT socket held by this (root) process, in the host namespace: nobody's own.
    let l = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
    let p = l.local_addr().expect("addr").port();
    let client = TcpStream::connect(("127.0.0.1", p)).expect("connect");
    let (server, _) = l.accept().expect("accept");
    drop(client);
    std::thread::sleep(Duration::from_millis(200));

    // The checkout may sit where `nobody` cannot traverse: run a copy from the temp dir.
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(format!("tcpstate-kill-nobody-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let bin = dir.join("tcpstate");
    std::fs::copy(env!("CARGO_BIN_EXE_tcpstate"), &bin).expect("copy binary");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod bin");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["kill", "--state", "close_wait", "--lport"])
        .arg(p.to_string())
        .args(["--addr", "127.0.0.1:1", "--dry-run"])
        .output()
        .expect("run as nobody");
    let _ = std::fs::remove_dir_all(&dir);
    drop(server);
    assert!(out.status.success(), "{out:?}");
    let listed = stdout(&out);
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert!(
        !listed.contains("held by no process") && listed.contains("without root"),
        "{listed}"
    );
}
