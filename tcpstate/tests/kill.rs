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
    let control = daemon.control.to_str().expect("utf-8 path").to_owned();
    let control = control.as_str();
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
        "--control-socket",
        control,
    ];
    let young = tcpstate(&[
        "kill",
        "--state",
        "close_wait",
        "--older-than",
        "1h",
        "--port",
        &ps,
        "--control-socket",
        control,
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
        .args(["--control-socket", "/nonexistent/control.sock", "--dry-run"])
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

/// Issue 21.1: a local user who answers where root's kill asks for ages must not choose what
/// it destroys, nor where root writes. Here `nobody` serves the control-socket protocol in a
/// directory anyone can write, claims both CLOSE_WAIT sockets are 11 days old and names a log
/// of its choosing; kill refuses to trust it, in one line, and touches nothing.
#[test]
fn kill_takes_no_ages_from_a_process_that_is_not_root() {
    // SAFETY: no preconditions.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "needs root: to make the sockets and to drop to another user"
    );
    use std::os::unix::fs::PermissionsExt as _;
    let l = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
    let p = l.local_addr().expect("addr").port();
    let clients: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", p)).expect("connect"))
        .collect();
    let servers: Vec<TcpStream> = (0..2).map(|_| l.accept().expect("accept").0).collect();
    let netns = std::fs::read_link("/proc/self/ns/net")
        .ok()
        .and_then(|l| {
            l.to_str()?
                .trim_start_matches("net:[")
                .trim_end_matches(']')
                .parse::<u32>()
                .ok()
        })
        .expect("our netns inode");
    drop(clients);
    std::thread::sleep(Duration::from_millis(200));

    let dir = std::env::temp_dir().join(format!("tcpstate-kill-fake-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).expect("chmod dir");
    let sock = dir.join("control.sock");
    let planted = dir.join("planted.log");
    let sockets: Vec<Value> = servers
        .iter()
        .map(|s| {
            serde_json::json!({
                "netns": netns,
                "saddr": "127.0.0.1", "sport": p,
                "daddr": "127.0.0.1", "dport": s.peer_addr().expect("peer").port(),
                "age_ms": 1e9, "age_is_lower_bound": false,
            })
        })
        .collect();
    let body = serde_json::json!({"log_file": planted, "sockets": sockets}).to_string();
    let fake = r#"
import os, socket, sys
path, body = sys.argv[1], sys.argv[2].encode()
s = socket.socket(socket.AF_UNIX)
s.bind(path)
os.chmod(path, 0o666)
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.recv(65536)
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    c.close()
"#;
    // The system's python: one under root's home (pyenv) is out of nobody's reach.
    let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("python3");
    let mut server = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            python,
            "-c",
            fake,
        ])
        .arg(&sock)
        .arg(&body)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 as nobody");
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().expect("stdout")),
        &mut ready,
    )
    .expect("fake server");
    assert_eq!(ready, "ready\n");

    let out = tcpstate(&[
        "kill",
        "--state",
        "close_wait",
        "--older-than",
        "10m",
        "--lport",
        &p.to_string(),
        "--control-socket",
        sock.to_str().expect("utf-8 path"),
    ]);
    let _ = server.kill();
    let _ = server.wait();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let still = servers
        .iter()
        .filter(|s| {
            // A destroyed socket fails a write with ECONNABORTED; a live CLOSE_WAIT takes it.
            (&**s).write(b"x").is_ok()
        })
        .count();
    let planted_exists = planted.exists();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("served by uid 65534, not root"),
        "says why: {err}"
    );
    assert_eq!(still, 2, "nothing destroyed: {}", stdout(&out));
    assert!(!planted_exists, "root wrote where nobody chose");
}
