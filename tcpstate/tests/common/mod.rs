//! Test harness: a network namespace per test, the real daemon, its JSON.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    io::{BufRead as _, BufReader},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod cgroups;

/// BPF tests need root. They fail loudly rather than pass by skipping,
/// unless TCPSTATE_SKIP_BPF_TESTS=1 opts out on purpose.
pub fn require_bpf() -> bool {
    if std::env::var("TCPSTATE_SKIP_BPF_TESTS").as_deref() == Ok("1") {
        eprintln!("TCPSTATE_SKIP_BPF_TESTS=1: NOT running this BPF test");
        return false;
    }
    // SAFETY: no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "BPF tests need root (set TCPSTATE_SKIP_BPF_TESTS=1 to opt out on purpose)"
    );
    true
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace made for one test, deleted on drop.
pub struct Netns {
    pub name: String,
    pub inode: u64,
}

impl Netns {
    pub fn new() -> Self {
        let name = format!(
            "tcpstate-t{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        let inode = std::fs::metadata(Self::path_of(&name))
            .unwrap_or_else(|e| panic!("stat netns {name}: {e}"))
            .ino();
        Self { name, inode }
    }

    fn path_of(name: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(name)
    }

    /// Runs `f` on a thread inside the namespace. Sockets it creates stay
    /// in the namespace whichever thread uses them afterwards.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = Self::path_of(&self.name);
        std::thread::spawn(move || {
            let file =
                std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // SAFETY: valid fd; setns affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// A command run inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) {
    let mut argv = vec!["ip"];
    argv.extend_from_slice(args);
    run(&argv);
}

/// Joins two namespaces with a veth pair `{name}0` (in `a`, address `{net}.1/24`) and
/// `{name}1` (in `b`, `{net}.2/24`), both up.
pub fn veth_pair(a: &Netns, b: &Netns, name: &str, net: &str) {
    let (ea, eb) = (format!("{name}0"), format!("{name}1"));
    ip(&[
        "-n", &a.name, "link", "add", &ea, "type", "veth", "peer", "name", &eb, "netns", &b.name,
    ]);
    ip(&[
        "-n",
        &a.name,
        "addr",
        "add",
        &format!("{net}.1/24"),
        "dev",
        &ea,
    ]);
    ip(&[
        "-n",
        &b.name,
        "addr",
        "add",
        &format!("{net}.2/24"),
        "dev",
        &eb,
    ]);
    ip(&["-n", &a.name, "link", "set", &ea, "up"]);
    ip(&["-n", &b.name, "link", "set", &eb, "up"]);
}

fn run(argv: &[&str]) {
    let st = Command::new(argv[0])
        .args(&argv[1..])
        .status()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(st.success(), "{argv:?} failed: {st}");
}

/// The real daemon, `tcpstate run --format json`, as a child process.
pub struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub records: Vec<Value>,
    /// Its control socket (`tcpstate kill --control-socket`).
    pub control: std::path::PathBuf,
    /// Its HTTP port, when [`Builder::metrics`] asked for one.
    pub metrics: Option<u16>,
}

/// A daemon for one test, built in steps that name what they set:
/// `Daemon::watching(&ns).threshold("close_wait=1s").metrics().start()`.
/// Whatever it is given, it has its own control socket; with `metrics`, its own HTTP port.
pub struct Builder {
    args: Vec<String>,
    metrics: Option<u16>,
    stderr: Option<Stdio>,
}

impl Builder {
    /// One more flag or value, as on the command line.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// `--threshold NAME=VALUE`.
    pub fn threshold(self, setting: &str) -> Self {
        self.args(["--threshold", setting])
    }

    /// `--port PORT`.
    pub fn port(self, port: u16) -> Self {
        self.args(["--port".to_owned(), port.to_string()])
    }

    /// An HTTP endpoint on a loopback port no other daemon of this test binary is given.
    pub fn metrics(mut self) -> Self {
        let port = free_port();
        self.metrics = Some(port);
        self.args(["--metrics-addr".to_owned(), format!("127.0.0.1:{port}")])
    }

    /// Its stderr sent to `stderr` (a file the test reads), not the test's.
    pub fn stderr(mut self, stderr: Stdio) -> Self {
        self.stderr = Some(stderr);
        self
    }

    /// Starts it and waits for its `started` record.
    pub fn start(self) -> Daemon {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut d = Daemon::start_with_stderr(&args, self.stderr.unwrap_or_else(Stdio::inherit));
        d.metrics = self.metrics;
        d
    }
}

/// A control-socket path no other daemon of any test uses.
pub fn control_socket() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "tcpstate-test-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

impl Daemon {
    /// A daemon that sees only `ns` (`--netns`): the sockets of tests running beside this
    /// one, in their own namespaces or the host's, never reach it, whatever ports they use.
    pub fn watching(ns: &Netns) -> Builder {
        Self::host_wide().args(["--netns".to_owned(), ns.inode.to_string()])
    }

    /// A daemon that sees every namespace: for tests of several namespaces, which narrow it
    /// themselves (`port`, `--cgroup`) and tell their records apart by `netns`.
    pub fn host_wide() -> Builder {
        Builder {
            args: Vec::new(),
            metrics: None,
            stderr: None,
        }
    }

    /// Its `started` record.
    pub fn started(&self) -> Value {
        self.records
            .iter()
            .find(|r| r["type"] == "started")
            .cloned()
            .expect("a started record")
    }

    /// One capability from its `started` record (`name`, `on`, `why_off`).
    pub fn feature(&self, name: &str) -> Value {
        let started = self.started();
        started["features"]
            .as_array()
            .and_then(|f| f.iter().find(|f| f["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no feature {name}: {started}"))
    }

    /// `GET path` from its HTTP endpoint (see [`Builder::metrics`]); the body.
    pub fn get(&self, path: &str) -> String {
        http_get(
            self.metrics.expect("the daemon was built with .metrics()"),
            path,
        )
    }

    /// Its `/status` page, parsed.
    pub fn status(&self) -> Value {
        let body = self.get("/status");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"))
    }

    /// `tcpstate status --addr` against it: what an operator reads.
    pub fn status_text(&self) -> String {
        let port = self.metrics.expect("the daemon was built with .metrics()");
        let out = Command::new(env!("CARGO_BIN_EXE_tcpstate"))
            .args(["status", "--addr", &format!("127.0.0.1:{port}")])
            .output()
            .unwrap_or_else(|e| panic!("tcpstate status: {e}"));
        assert!(out.status.success(), "tcpstate status: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn start(args: &[&str]) -> Self {
        Self::start_with_stderr(args, Stdio::inherit())
    }

    /// As [`start`](Self::start), its stderr sent to `stderr` (a file the test reads).
    pub fn start_with_stderr(args: &[&str], stderr: Stdio) -> Self {
        // Each daemon its own control socket: tests run side by side.
        let control = control_socket();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tcpstate"));
        cmd.args(["run", "--format", "json"]).args(args);
        if !args.contains(&"--control-socket") {
            cmd.arg("--control-socket").arg(&control);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start tcpstate: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Self {
            child,
            lines,
            records: Vec::new(),
            control,
            metrics: None,
        };
        d.wait_for(Duration::from_secs(30), |r| r["type"] == "started")
            .unwrap_or_else(|| panic!("tcpstate did not start: {:?}", d.records));
        d
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Reads records until one matches `pred` or the time runs out.
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("daemon wrote a line that is not JSON ({e}): {line}"));
            self.records.push(v.clone());
            if pred(&v) {
                return Some(v);
            }
        }
    }

    /// The records matching `pred`, those already read by an earlier wait included, once
    /// there are `n` of them or the time runs out (then fewer). Two waits in a row must not
    /// depend on the order the daemon wrote their records in.
    pub fn wait_for_n(
        &mut self,
        timeout: Duration,
        n: usize,
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut seen: Vec<Value> = self.records.iter().filter(|r| pred(r)).cloned().collect();
        while seen.len() < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match self.wait_for(left, &pred) {
                Some(r) => seen.push(r),
                None => break,
            }
        }
        seen
    }

    /// SIGTERM, then every record up to `stopped`.
    pub fn stop(mut self) -> Vec<Value> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        // Long, for emulation: a daemon with 10,000 cgroups' records still to write took
        // more than 20 s on 6.1 under TCG. One that never stops still fails.
        let stopped = self.wait_for(Duration::from_secs(60), |r| r["type"] == "stopped");
        let status = self.child.wait().expect("wait for tcpstate");
        assert!(
            stopped.is_some(),
            "no stopped record; got {:?}",
            self.records
        );
        assert!(status.success(), "tcpstate exited with {status}");
        std::mem::take(&mut self.records)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.control);
    }
}

/// Anomalies ended because a reconciliation found their socket gone.
pub fn reconciled_away(records: &[Value]) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| r["type"] == "anomaly_resolved" && r["resolution"] == "reconciled")
        .collect()
}

/// Transitions of one namespace, in order.
pub fn transitions(records: &[Value], netns: u64) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| r["type"] == "transition" && r["netns"] == netns)
        .collect()
}

/// (old, new) pairs of one socket, in order.
pub fn pairs_of<'a>(ts: &[&'a Value], sk: &Value) -> Vec<(&'a str, &'a str)> {
    ts.iter()
        .filter(|t| &t["sk"] == sk)
        .map(|t| {
            (
                t["old"].as_str().unwrap_or("?"),
                t["new"].as_str().unwrap_or("?"),
            )
        })
        .collect()
}

/// A port unlikely to collide across concurrently running tests. Bases stay below
/// 32268 so the result is never in the kernel's ephemeral range (32768-60999): a
/// daemon filtering on it would otherwise also see some other test's client socket.
pub fn port(base: u16) -> u16 {
    debug_assert!(base < 32268, "port base {base} reaches the ephemeral range");
    base + (std::process::id() % 500) as u16
}

/// A free port on the host's loopback (for --metrics-addr).
pub fn free_port() -> u16 {
    // The port is free only until the listener closes: two tests of one binary asking at
    // once could be handed the same one (the kernel may reuse a port just released), and one
    // daemon then cannot listen (seen in CI on 6.12). No port is handed out twice.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// GET a page from the daemon's HTTP endpoint; the body.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    resp.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// Sockets per state as `ss -tan` shows them in a namespace, in the daemon's state names.
pub fn ss_counts(ns: &Netns) -> std::collections::BTreeMap<String, u64> {
    let out = ns
        .command("ss")
        .args(["-tan"])
        .output()
        .unwrap_or_else(|e| panic!("ss: {e}"));
    assert!(out.status.success(), "ss failed: {out:?}");
    let mut counts = std::collections::BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        let Some(state) = line.split_whitespace().next() else {
            continue;
        };
        let name = match state {
            "ESTAB" => "ESTABLISHED".to_owned(),
            "UNCONN" => "CLOSE".to_owned(),
            "FIN-WAIT-1" => "FIN_WAIT1".to_owned(),
            "FIN-WAIT-2" => "FIN_WAIT2".to_owned(),
            other => other.replace('-', "_"),
        };
        *counts.entry(name).or_default() += 1;
    }
    counts
}

/// The daemon's per-state counts from /status.
pub fn status_counts(daemon: &Daemon) -> std::collections::BTreeMap<String, u64> {
    let v = daemon.status();
    v["sockets"]
        .as_object()
        .unwrap_or_else(|| panic!("no sockets in {v}"))
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
        .collect()
}
