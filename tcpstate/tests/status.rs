//! `tcpstate status` against endpoints that are not the daemon: whatever answers on --addr
//! is trusted for nothing.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    process::{Command, Output},
    time::{Duration, Instant},
};

/// A fake endpoint on 127.0.0.1:0 for one request: reads it, then `answer` writes.
fn serve(answer: impl FnOnce(&mut TcpStream) + Send + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else { return };
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut line = String::new();
        while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
            line.clear();
        }
        answer(&mut s);
    });
    addr
}

fn respond(body: &'static str) -> impl FnOnce(&mut TcpStream) + Send + 'static {
    move |s| {
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

fn status(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tcpstate"))
        .arg("status")
        .args(args)
        .output()
        .expect("run tcpstate status")
}

fn one_error_line(o: &Output, mentions: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(
        err.starts_with("tcpstate: error: ") && err.contains(mentions),
        "{err:?} should mention {mentions:?}"
    );
    assert!(!err.contains("panicked"), "{err:?}");
}

const REPORT: &str = r#"{"version":"1.0\u001b[31m\u0007","uptime_s":5,"sockets":{"CLOSE_WAIT\u001b]0;x\u0007":3},"open_anomalies":[],"top_owners":[],"tracked":3,"capacity":10,"refused":0,"events":1,"dropped":0,"recursion_misses":0,"failed_connects":0,"resets":0}"#;

#[test]
fn status_escapes_what_the_endpoint_says() {
    let addr = serve(respond(REPORT));
    let o = status(&["--addr", &addr]);
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains('\x1b') && !out.contains('\x07'), "{out:?}");
    assert!(out.starts_with("tcpstate 1.0\\e[31m\\x07 up 5s"), "{out:?}");
    assert!(out.contains("sockets: CLOSE_WAIT\\e]0;x\\x07=3"), "{out:?}");
}

#[test]
fn status_json_must_be_json() {
    let addr = serve(respond("<html>\x1b[2Jnot a daemon</html>"));
    let o = status(&["--addr", &addr, "--json"]);
    assert!(o.stdout.is_empty(), "nothing printed: {o:?}");
    one_error_line(&o, "is not JSON");

    // JSON passes, with what a terminal would obey made inert and its meaning kept.
    let addr = serve(respond("{\"version\":\"1.0\u{9b}2J\"}"));
    let o = status(&["--addr", &addr, "--json"]);
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8(o.stdout).expect("utf-8");
    assert_eq!(out, "{\"version\":\"1.0\\u009b2J\"}\n");
}

#[test]
fn status_gives_up_on_a_dribbling_endpoint_within_its_deadline() {
    let addr = serve(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n");
        // A byte a second, for longer than anyone should wait: each read succeeds well within
        // any per-read timeout.
        for _ in 0..60 {
            std::thread::sleep(Duration::from_secs(1));
            if s.write_all(b" ").is_err() {
                return;
            }
        }
    });
    let t = Instant::now();
    let o = status(&["--addr", &addr]);
    let took = t.elapsed();
    one_error_line(&o, "no whole answer within 10s");
    assert!(took < Duration::from_secs(15), "waited {took:?}");
}
