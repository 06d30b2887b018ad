//! `tcpstate tail` on real files: columns, filters, -n, corrupt lines, and
//! -f across rename rotation and truncation. No BPF needed.

use std::{
    fs::OpenOptions,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tcpstate-tail-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmpdir");
    d
}

fn transition(i: u32, port: u16, old: &str, new: &str, pid: u32, comm: &str) -> String {
    format!(
        r#"{{"type":"transition","ts":"2026-11-23T22:47:00.{i:09}Z","sk":"0xffff888105db8000","family":"ipv4","saddr":"127.0.0.1","sport":{port},"daddr":"127.0.0.1","dport":80,"old":"{old}","new":"{new}","pid":{pid},"comm":"{comm}","prev_state_ms":0.5,"netns":1}}"#
    )
}

fn anomaly(port: u16) -> String {
    format!(
        r#"{{"type":"anomaly","ts":"2026-11-23T22:48:00.000000000Z","kind":"close_wait","state":"CLOSE_WAIT","age_ms":2000.0,"age_is_lower_bound":false,"sk":"0x1","family":"ipv4","saddr":"127.0.0.1","sport":{port},"daddr":"127.0.0.1","dport":5000,"netns":1,"pid":42,"comm":"server","owner_source":"fd","last_owner":null}}"#
    )
}

fn tail(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tcpstate"))
        .arg("tail")
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run tail");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(path: &Path, lines: &[String]) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open");
    for l in lines {
        writeln!(f, "{l}").expect("write");
    }
}

#[test]
fn columns_filters_and_last_n() {
    let dir = tmpdir("cols");
    let log = dir.join("t.jsonl");
    write(
        &log,
        &[
            transition(1, 1111, "CLOSE", "SYN_SENT", 10, "curl"),
            transition(2, 1111, "SYN_SENT", "ESTABLISHED", 0, "swapper/0"),
            transition(3, 2222, "ESTABLISHED", "CLOSE_WAIT", 0, "swapper/1"),
            anomaly(2222),
        ],
    );
    let p = log.to_str().expect("utf8");
    let (code, out, err) = tail(&[p]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "header + 4 records: {out}");
    assert!(lines[0].starts_with("TIME(UTC)"));
    assert!(
        lines[1].contains("127.0.0.1:1111") && lines[1].contains("CLOSE        -> SYN_SENT"),
        "{}",
        lines[1]
    );
    assert!(
        lines[4].contains("ANOMALY") && lines[4].contains("held by pid 42 (server)"),
        "{}",
        lines[4]
    );
    assert!(!out.contains('\x1b'), "no colour when not a terminal");

    let count = |args: &[&str]| {
        let (code, out, err) = tail(args);
        assert_eq!(code, 0, "{args:?}: {err}");
        out.lines().skip(1).count()
    };
    assert_eq!(count(&[p, "--state", "SYN_SENT"]), 2);
    assert_eq!(
        count(&[p, "--state", "close_wait"]),
        2,
        "transition into it and the anomaly"
    );
    assert_eq!(count(&[p, "--port", "2222"]), 2);
    assert_eq!(count(&[p, "--anomalies"]), 1);
    assert_eq!(count(&[p, "--pid", "10"]), 1);
    assert_eq!(count(&[p, "--comm", "swapper/1"]), 1);
    assert_eq!(count(&[p, "--port", "1111", "--state", "ESTABLISHED"]), 1);
    let (_, out, _) = tail(&[p, "-n", "2", "--json"]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            transition(3, 2222, "ESTABLISHED", "CLOSE_WAIT", 0, "swapper/1"),
            anomaly(2222)
        ]
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn corrupt_lines_are_reported_and_skipped() {
    let dir = tmpdir("corrupt");
    let log = dir.join("t.jsonl");
    write(
        &log,
        &[
            transition(1, 1, "CLOSE", "SYN_SENT", 1, "a"),
            "{\"type\":\"transition\",\"ts\":".to_owned(),
            "garbage".to_owned(),
            transition(2, 1, "SYN_SENT", "CLOSE", 1, "a"),
        ],
    );
    let (code, out, err) = tail(&[log.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().count(),
        3,
        "header + the two good records: {out}"
    );
    let errs: Vec<&str> = err.lines().collect();
    assert_eq!(errs.len(), 2, "{err}");
    assert!(errs[0].contains("t.jsonl:2:"), "{err}");
    assert!(errs[1].contains("t.jsonl:3:"), "{err}");
    assert!(!err.contains("panicked"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn missing_file_is_one_clear_error() {
    let (code, _, err) = tail(&["/nonexistent/tcpstate.jsonl"]);
    assert_ne!(code, 0);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot open /nonexistent/tcpstate.jsonl"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[test]
fn follow_survives_rename_rotation_and_truncation() {
    let dir = tmpdir("follow");
    let log = dir.join("t.jsonl");
    let mut n = 0u32;
    let mut next = |count: usize| -> Vec<String> {
        (0..count)
            .map(|_| {
                n += 1;
                transition(n, 7, "CLOSE", "SYN_SENT", n, "x")
            })
            .collect()
    };
    let mut expected = next(3);
    write(&log, &expected);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tcpstate"))
        .args([
            "tail",
            "-f",
            "-n",
            "100",
            "--json",
            log.to_str().expect("utf8"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tail -f");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut got: Vec<String> = Vec::new();
    let mut collect = |until: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < until {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => got.push(l),
                Err(_) => break,
            }
        }
        got.clone()
    };
    assert_eq!(collect(3), expected, "initial content");

    // Growth.
    let more = next(2);
    write(&log, &more);
    expected.extend(more);
    assert_eq!(collect(5), expected, "appends");

    // Rename rotation: the writer appends a little to the old file, then a
    // new file appears at the path.
    std::fs::rename(&log, dir.join("t.jsonl.1")).expect("rename");
    let late = next(1);
    write(&dir.join("t.jsonl.1"), &late);
    expected.extend(late);
    let fresh = next(2);
    write(&log, &fresh);
    expected.extend(fresh);
    assert_eq!(collect(8), expected, "across rename");

    // copytruncate: truncate in place, then append.
    std::thread::sleep(Duration::from_millis(500));
    OpenOptions::new()
        .write(true)
        .open(&log)
        .expect("open")
        .set_len(0)
        .expect("truncate");
    std::thread::sleep(Duration::from_millis(500));
    let after = next(2);
    write(&log, &after);
    expected.extend(after);
    assert_eq!(collect(10), expected, "across truncation");

    let _ = child.kill();
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(collect(11).len(), 10, "nothing printed twice");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn reads_standard_input_and_pipes_with_last_n() {
    let lines: Vec<String> = (0..5)
        .map(|i| transition(i, 8000 + i as u16, "SYN_SENT", "ESTABLISHED", 7, "curl"))
        .collect();
    let input = lines.join("\n") + "\n";
    for path in ["-", "/dev/stdin"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tcpstate"))
            .args(["tail", path, "-n", "2", "--json"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tail");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("feed");
        let out = child.wait_with_output().expect("tail");
        assert!(out.status.success(), "{path}: {out:?}");
        let got = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            got.lines().collect::<Vec<_>>(),
            [lines[3].as_str(), lines[4].as_str()],
            "{path}"
        );
    }
}

#[test]
fn a_last_line_without_newline_is_printed_or_reported() {
    let dir = tmpdir("partial");
    let log = dir.join("t.jsonl");
    let done = transition(1, 8001, "SYN_SENT", "ESTABLISHED", 7, "curl");
    std::fs::write(&log, format!("{done}\n{done}")).expect("write");
    let (code, out, err) = tail(&[log.to_str().expect("utf8"), "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 2, "the unterminated record too: {out}");
    std::fs::write(&log, format!("{done}\n{{\"type\":\"transi")).expect("write");
    let (code, out, err) = tail(&[log.to_str().expect("utf8"), "--json"]);
    assert_eq!((code, out.lines().count()), (0, 1), "{out}");
    assert!(err.contains(":2: not a tcpstate record"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn follow_does_not_hang_on_a_fifo_put_in_the_logs_place() {
    let dir = tmpdir("fifo");
    let log = dir.join("t.jsonl");
    write(
        &log,
        &[transition(1, 8001, "SYN_SENT", "ESTABLISHED", 7, "curl")],
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_tcpstate"))
        .args(["tail", "-f", "--json", log.to_str().expect("utf8")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tail");
    let (tx, rx) = mpsc::channel();
    for pipe in [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("stderr")),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let first = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the first record");
    assert!(first.contains("8001"), "{first}");
    // Rotated away, and a FIFO put in its place: opening it would wait for a writer forever.
    std::fs::rename(&log, dir.join("old")).expect("rename");
    let c = std::ffi::CString::new(log.to_str().expect("utf8")).expect("cstr");
    // SAFETY: a valid path string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let said = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("a note about the FIFO");
    assert!(said.contains("FIFO"), "{said}");
    // Replaced by a log again: tail was not stuck, it reads it.
    std::fs::remove_file(&log).expect("rm fifo");
    write(
        &log,
        &[transition(2, 8002, "SYN_SENT", "ESTABLISHED", 7, "curl")],
    );
    let next = rx.recv_timeout(Duration::from_secs(5));
    let _ = child.kill();
    let _ = child.wait();
    assert!(next.expect("the new log's record").contains("8002"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn control_characters_in_names_are_escaped() {
    let dir = tmpdir("escape");
    let log = dir.join("t.jsonl");
    // A comm with ESC, BEL and a newline, as JSON carries it exactly.
    write(
        &log,
        &[transition(
            1,
            8001,
            "SYN_SENT",
            "ESTABLISHED",
            7,
            "\\u001b[31mEVIL\\u0007\\n",
        )],
    );
    let (code, out, err) = tail(&[log.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.bytes().any(|b| b == 0x1b || b == 0x07), "{out:?}");
    assert!(out.contains("\\e[31mEVIL\\x07\\n"), "{out}");
    assert_eq!(out.lines().count(), 2, "header and one line: {out}");
    let _ = std::fs::remove_dir_all(dir);
}
