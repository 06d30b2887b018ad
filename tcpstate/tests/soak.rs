//! Issue 20's busy-host harness: the real daemons (one with the default scope, one each with
//! `--netns`, `--port` and `--cgroup`) on a host made busy on purpose, with stuck sockets
//! planted into the noise at known times, in known namespaces and cgroups, with known holders.
//!
//! The noise, all in namespaces this test makes: SYNs to closed ports, resets both ways
//! (SO_LINGER 0 aborts from either end), TIME_WAIT churn to many ports (in one namespace past
//! its `tcp_max_tw_buckets`), namespaces made and deleted with live sockets, an established
//! pool, a pre-fork server, an fd-passing server (SCM_RIGHTS), SO_REUSEPORT listeners, and the
//! default-scope daemon stopped (SIGSTOP) for 2.5 s once.
//!
//! The plants, every cycle: CLOSE_WAIT held, FIN_WAIT2 held (its client shut down writing) and
//! orphaned (its client closed), a never-accepted CLOSE_WAIT in an accept queue, SYN_SENT to a
//! black hole; and TIME_WAIT pressure on one destination in a namespace with a 100-port range.
//!
//! It checks: each plant raised within its threshold + 1 s, naming its holder, namespace and
//! cgroup, and resolved once released (TIME_WAIT pressure by the reconciliation after its
//! namespace went); nothing raised in the harness's namespaces that was not planted; at each
//! quiet point, per-namespace counts equal `ss` for every state; events lost are counted and
//! detection comes back within one reconciliation after the stall.
//!
//! `TCPSTATE_SOAK_SECS` (default 45) is how long the noise runs, `TCPSTATE_SOAK_ESTABLISHED`
//! (default 4000) how many established sockets are held; `cargo xtask soak --minutes N` sets
//! both. Every loop is bounded in time; everything stops by itself.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime},
};

use common::{Netns, cgroups::join, free_port, http_get, port, require_bpf};
use serde_json::Value;

/// The threshold of every planted state (close_wait, fin_wait2, syn_sent).
const THRESHOLD: Duration = Duration::from_secs(2);
/// How late past its threshold an anomaly may be.
const GRACE: Duration = Duration::from_secs(1);
/// The stalled daemon may raise a plant made while it was stopped this long after it resumed
/// (past the plant's threshold): the reconciliation a loss starts, then the grace.
const RECONCILE_BUDGET: Duration = Duration::from_secs(3);
/// How long the default-scope daemon is stopped.
const STALL: Duration = Duration::from_millis(2500);
/// How long after its release a socket plant's anomaly must be resolved: it leaves the state
/// at once (an event).
const RESOLVE_WITHIN: Duration = Duration::from_secs(3);
/// TIME_WAIT pressure is released by deleting its namespace, which no event reports: the
/// daemon lets the namespace go at its next reconciliation (a quiet moment's, else
/// `--reconcile-interval`'s 30 s), so the check counts reconciliations, not seconds. The one
/// out at the release dumped the namespace before it went; the one after must resolve it
/// (its record then has this long to reach the harness). A wall-clock bound failed CI once
/// (37.95 s against 36 s: a 30 s interval plus a dump of the busy host under load).
const PRESSURE_RECONCILIATIONS: u64 = 2;
const PRESSURE_RECORD_GRACE: Duration = Duration::from_secs(3);
/// Past this, a pressure plant is given up as never resolved (no reconciliation ran at all).
const PRESSURE_GIVE_UP: Duration = Duration::from_secs(150);
/// The pressure namespace's ephemeral range (100 ports) and how many TIME_WAIT go to one place.
const PRESSURE_RANGE: (u16, u16) = (40000, 40099);
const PRESSURE_TW: usize = 70;
/// Noise ports inside the harness's namespaces (below the ephemeral range).
const PREFORK: u16 = 7001;
const FDPASS: u16 = 7002;
const REUSEPORT: u16 = 7003;
const RST: u16 = 7004;
const CLOSED: u16 = 7999;
const TW_A: (u16, u16) = (7100, 16);
const TW_B: (u16, u16) = (7200, 64);
/// Established pairs per pool listener (each its own address, so ephemeral ports last).
const PAIRS_PER_LISTENER: usize = 8_000;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ts(v: &Value) -> SystemTime {
    humantime::parse_rfc3339(v["ts"].as_str().unwrap_or("?"))
        .unwrap_or_else(|e| panic!("ts of {v}: {e}"))
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

fn since(later: SystemTime, earlier: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// Puts the calling thread into `ns` for good (a noise thread's first act).
fn enter(ns_name: &str) {
    use std::os::fd::AsRawFd as _;
    let path = format!("/run/netns/{ns_name}");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: valid fd; setns affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

fn ip_n(ns: &Netns, argv: &str) {
    let mut args = vec!["-n", &ns.name];
    args.extend(argv.split(' '));
    common::ip(&args);
}

fn sysctl(ns: &Netns, kv: &str) {
    let st = ns
        .command("sysctl")
        .args(["-qw", kv])
        .status()
        .expect("sysctl");
    assert!(st.success(), "sysctl {kv} in {}", ns.name);
}

// ---------------------------------------------------------------------------------------
// The cgroup the plants and the noise services live in.

/// `/tcpstate-soak-PID` in the unified hierarchy, removed on drop; None without cgroup2.
struct Cgroup {
    dir: PathBuf,
    /// As the daemon reports it and `--cgroup` takes it.
    shown: String,
    procs: CString,
}

impl Cgroup {
    fn new() -> Option<Self> {
        let mount = tcpstate::workload::Hierarchy::find()?.mount().to_owned();
        let name = format!("tcpstate-soak-{}", std::process::id());
        let dir = mount.join(&name);
        std::fs::create_dir(&dir).ok()?;
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).ok()?;
        Some(Self {
            dir,
            shown: format!("/{name}"),
            procs,
        })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Its processes are gone by now (helpers are killed and reaped first); retry briefly
        // for the kernel to notice.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helper processes (python3): the plants' holders and the noise services.

const HELPER: &str = r"
import ctypes, os, signal, socket, sys, threading
def out(*a): print(*a, flush=True)
def die_with_parent():
    try: ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except Exception: pass
def listener(addr, port, backlog=128, reuseport=False):
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport: l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    l.bind((addr, port)); l.listen(backlog); return l
def drain(s):
    try:
        while s.recv(4096): pass
    except OSError: pass
    s.close()
def serve(l):
    while True:
        try: s, _ = l.accept()
        except OSError: continue
        drain(s)
def spawn(fn):
    pid = os.fork()
    if pid == 0:
        die_with_parent()
        try: fn()
        finally: os._exit(0)
    return pid
die_with_parent()
mode, args = sys.argv[1], sys.argv[2:]
if mode == 'server':
    l = listener(args[0], int(args[1]), 16)
    out('listening', os.getpid())
    held = []
    for _ in range(int(args[2])):
        s, peer = l.accept(); held.append(s); out('accepted', peer[1])
    l.close()
    sys.stdin.readline()
    for s in held: s.close()
    out('released')
elif mode == 'client':
    s = socket.create_connection((args[0], int(args[1])))
    la, lp = s.getsockname()[:2]
    if args[2] == 'shutdown': s.shutdown(socket.SHUT_WR)
    elif args[2] == 'close': s.close()
    out('ready', os.getpid(), la, lp)
    sys.stdin.readline(); s.close(); out('released')
elif mode == 'listen_only':
    l = listener(args[0], int(args[1]), 8)
    out('ready', os.getpid())
    sys.stdin.readline(); l.close(); out('released')
elif mode == 'synsent':
    s = socket.socket(); s.setblocking(False)
    s.connect_ex((args[0], int(args[1])))
    la, lp = s.getsockname()[:2]
    out('ready', os.getpid(), la, lp)
    sys.stdin.readline(); s.close(); out('released')
elif mode == 'tw':
    l = listener(args[0], int(args[1]))
    for _ in range(int(args[2])):
        c = socket.create_connection((args[0], int(args[1]))); s, _ = l.accept(); c.close(); drain(s)
    l.close()
    out('ready', os.getpid())
    sys.stdin.readline(); out('released')
elif mode == 'pool':
    l = listener(args[0], int(args[1]), 4096)
    held = []
    for _ in range(int(args[2])):
        c = socket.create_connection((args[0], int(args[1]))); s, _ = l.accept(); held += [c, s]
    out('ready', os.getpid())
    sys.stdin.read()
elif mode == 'prefork':
    l = listener(args[0], int(args[1]))
    workers = [spawn(lambda: serve(l)) for _ in range(int(args[2]))]
    l.close()
    out('ready', os.getpid(), *workers)
    sys.stdin.read()
elif mode == 'fdpass':
    l = listener(args[0], int(args[1]))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    def receive():
        a.close(); l.close()
        while True:
            _, fds, _, _ = socket.recv_fds(b, 1, 4)
            for fd in fds: drain(socket.socket(fileno=fd))
    receiver = spawn(receive)
    b.close()
    def send():
        while True:
            s, _ = l.accept(); socket.send_fds(a, [b'x'], [s.fileno()]); s.close()
    threading.Thread(target=send, daemon=True).start()
    out('ready', os.getpid(), receiver)
    sys.stdin.read()
elif mode == 'reuseport':
    ls = [listener(args[0], int(args[1]), reuseport=True) for _ in range(int(args[2]))]
    pids = [spawn(lambda l=l: serve(l)) for l in ls]
    for l in ls: l.close()
    out('ready', os.getpid(), *pids)
    sys.stdin.read()
";

fn python() -> &'static str {
    static PY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PY.get_or_init(|| {
        // The interpreter itself, not a version manager's shim: its pid is the holder's.
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 (the harness's helper processes)");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    })
}

/// A python3 helper in a namespace (and the cgroup), talking over stdin/stdout; killed on drop.
struct Helper {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl Helper {
    fn spawn(ns: &Netns, cg: Option<&Cgroup>, args: &[&str]) -> Self {
        let mut c = Command::new("ip");
        // `ip netns exec` execs: the helper's pid is the child's.
        c.args(["netns", "exec", &ns.name, python(), "-c", HELPER])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(cg) = cg {
            let procs = cg.procs.clone();
            // SAFETY: `join` makes raw syscalls only.
            unsafe { c.pre_exec(move || join(&procs)) };
        }
        let mut child = c.spawn().expect("spawn helper");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            stdin: child.stdin.take(),
            child,
            lines,
            what: args.join(" "),
        }
    }

    /// The next line's words after `word`.
    fn expect(&self, word: &str) -> Vec<String> {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("helper `{}`: no `{word}` line", self.what));
        let mut words = line.split_whitespace().map(str::to_owned);
        assert_eq!(
            words.next().as_deref(),
            Some(word),
            "helper `{}`: {line}",
            self.what
        );
        words.collect()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn release(&mut self) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(b"release\n");
            let _ = stdin.flush();
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// The daemons.

/// What a daemon is meant to see.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scope {
    All,
    Netns(u64),
    Port(u16),
    Cgroup,
}

/// `tcpstate run --format json` with its records, kept as they come: every record but
/// transitions and resets (too many to keep), and the transitions into a planted state on the
/// planted port (to date the plants' entries).
struct Daemon {
    name: &'static str,
    scope: Scope,
    child: Child,
    mport: u16,
    records: Arc<Mutex<Vec<Value>>>,
    transitions: Arc<AtomicU64>,
    resets: Arc<AtomicU64>,
    stderr: PathBuf,
}

impl Daemon {
    /// Reconciliations the daemon has ended (its counter on /metrics).
    fn reconciliations(&self) -> u64 {
        let body = http_get(self.mport, "/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix("tcpstate_reconciliations_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "{}: no tcpstate_reconciliations_total in /metrics",
                    self.name
                )
            })
    }

    fn start(name: &'static str, scope: Scope, plant_port: u16, extra: &[String]) -> Self {
        let mport = free_port();
        let stderr = std::env::temp_dir().join(format!(
            "tcpstate-soak-{}-{name}.stderr",
            std::process::id()
        ));
        let mut child = Command::new(env!("CARGO_BIN_EXE_tcpstate"))
            .args(["run", "--format", "json", "--metrics-addr"])
            .arg(format!("127.0.0.1:{mport}"))
            .arg("--control-socket")
            .arg(common::control_socket())
            .args([
                "--threshold",
                "close_wait=2s",
                "--threshold",
                "fin_wait2=2s",
                "--threshold",
                "syn_sent=2s",
                "--threshold",
                "time_wait_pressure=0.5",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start tcpstate: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let records = Arc::new(Mutex::new(Vec::new()));
        let transitions = Arc::new(AtomicU64::new(0));
        let resets = Arc::new(AtomicU64::new(0));
        let (r, t, x) = (records.clone(), transitions.clone(), resets.clone());
        let mark = format!(":{plant_port}");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let transition = line.contains("\"type\":\"transition\"");
                if transition {
                    t.fetch_add(1, Ordering::Relaxed);
                    if !line.contains(&mark) {
                        continue;
                    }
                } else if line.contains("\"type\":\"reset\"") {
                    x.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("daemon wrote a line that is not JSON ({e}): {line}")
                });
                if transition
                    && !(["CLOSE_WAIT", "FIN_WAIT2", "SYN_SENT"]
                        .contains(&v["new"].as_str().unwrap_or(""))
                        && (v["sport"] == plant_port || v["dport"] == plant_port))
                {
                    continue;
                }
                r.lock().expect("records").push(v);
            }
        });
        let d = Self {
            name,
            scope,
            child,
            mport,
            records,
            transitions,
            resets,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !d.any(|r| r["type"] == "started") {
            assert!(
                Instant::now() < deadline,
                "{name} did not start; see {}",
                d.stderr.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn any(&self, pred: impl Fn(&Value) -> bool) -> bool {
        self.records.lock().expect("records").iter().any(pred)
    }

    fn find(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.records
            .lock()
            .expect("records")
            .iter()
            .find(|r| pred(r))
            .cloned()
    }

    fn all(&self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.records
            .lock()
            .expect("records")
            .iter()
            .filter(|r| pred(r))
            .cloned()
            .collect()
    }

    fn status(&self) -> Value {
        let body = http_get(self.mport, "/status");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{}: /status {e}: {body}", self.name))
    }

    fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGTERM; the `stopped` record.
    fn stop(&mut self) -> Value {
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.find(|r| r["type"] == "stopped") {
                let _ = self.child.wait();
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Value::Null;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// The noise.

/// Shared by the noise threads: stop, and pause for a quiet point.
#[derive(Default)]
struct Noise {
    stop: AtomicBool,
    pause: AtomicBool,
    parked: AtomicUsize,
    threads: AtomicUsize,
    /// Namespaces the churn thread made (all deleted again).
    churned: Mutex<BTreeSet<u64>>,
    counts: Mutex<BTreeMap<&'static str, (u64, u64)>>,
}

impl Noise {
    /// Waits while paused; false once stopped (or past the hard deadline).
    fn gate(&self, hard: Instant) -> bool {
        if self.pause.load(Ordering::Relaxed) {
            self.parked.fetch_add(1, Ordering::SeqCst);
            while self.pause.load(Ordering::Relaxed) && !self.stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
            }
            self.parked.fetch_sub(1, Ordering::SeqCst);
        }
        !self.stop.load(Ordering::Relaxed) && Instant::now() < hard
    }

    fn quiet(&self) -> bool {
        self.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.parked.load(Ordering::SeqCst) < self.threads.load(Ordering::SeqCst) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }

    fn tally(&self, what: &'static str, ok: u64, err: u64) {
        let mut c = self.counts.lock().expect("counts");
        let e = c.entry(what).or_default();
        e.0 += ok;
        e.1 += err;
    }

    /// A noise thread in `ns`: `step` once per turn, `pause` between turns.
    fn spawn(
        self: &Arc<Self>,
        what: &'static str,
        ns: &str,
        hard: Instant,
        pause: Duration,
        mut step: impl FnMut(u64) -> bool + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let noise = self.clone();
        let ns = ns.to_owned();
        noise.threads.fetch_add(1, Ordering::SeqCst);
        std::thread::spawn(move || {
            enter(&ns);
            let (mut ok, mut err, mut i) = (0, 0, 0);
            while noise.gate(hard) {
                if step(i) {
                    ok += 1;
                } else {
                    err += 1;
                }
                i += 1;
                if i % 256 == 0 {
                    noise.tally(what, ok, err);
                    (ok, err) = (0, 0);
                }
                std::thread::sleep(pause);
            }
            noise.tally(what, ok, err);
            noise.threads.fetch_sub(1, Ordering::SeqCst);
        })
    }
}

fn listen(addr: &str, p: u16) -> TcpListener {
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    s.set_reuse_address(true).expect("reuseaddr");
    let a: std::net::SocketAddr = format!("{addr}:{p}").parse().expect("addr");
    s.bind(&a.into())
        .unwrap_or_else(|e| panic!("bind {a}: {e}"));
    s.listen(1024).expect("listen");
    s.into()
}

/// One connection to a listener of ours, closed by its client first (a client TIME_WAIT).
fn time_wait_once(l: &TcpListener, p: u16) -> bool {
    let Ok(c) = TcpStream::connect(("127.0.0.1", p)) else {
        return false;
    };
    let Ok((mut s, _)) = l.accept() else {
        return false;
    };
    drop(c);
    let mut buf = [0u8; 16];
    let r = s.read(&mut buf);
    matches!(r, Ok(0))
}

/// A reset from one end: SO_LINGER 0, then close.
fn abort(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

fn start_noise(
    noise: &Arc<Noise>,
    a: &Netns,
    b: &Netns,
    hard: Instant,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut threads = Vec::new();
    // SYNs to closed ports, answered by resets for no socket, in both namespaces.
    for ns in [a, b] {
        threads.push(noise.spawn(
            "syn to closed port",
            &ns.name,
            hard,
            Duration::from_millis(2),
            |_| TcpStream::connect(("127.0.0.1", CLOSED)).is_err(),
        ));
    }
    // Resets both ways.
    let rst = a.run(|| listen("127.0.0.1", RST));
    threads.push(noise.spawn(
        "reset (SO_LINGER 0)",
        &a.name,
        hard,
        Duration::from_millis(3),
        move |i| {
            let Ok(c) = TcpStream::connect(("127.0.0.1", RST)) else {
                return false;
            };
            let Ok((s, _)) = rst.accept() else {
                return false;
            };
            if i % 2 == 0 {
                abort(c);
                drop(s);
            } else {
                abort(s);
                drop(c);
            }
            true
        },
    ));
    // TIME_WAIT churn to many ports: moderate in A, fast in B, whose TIME_WAIT table overflows.
    for (ns, (base, n), pause) in [
        (a, TW_A, Duration::from_millis(3)),
        (b, TW_B, Duration::from_micros(500)),
    ] {
        let ls: Vec<TcpListener> =
            ns.run(move || (0..n).map(|k| listen("127.0.0.1", base + k)).collect());
        threads.push(
            noise.spawn("TIME_WAIT churn", &ns.name, hard, pause, move |i| {
                let k = (i % u64::from(n)) as usize;
                time_wait_once(&ls[k], base + k as u16)
            }),
        );
    }
    // Clients of the pre-fork, fd-passing and SO_REUSEPORT servers.
    threads.push(noise.spawn(
        "served (prefork/fdpass/reuseport)",
        &a.name,
        hard,
        Duration::from_millis(2),
        |i| {
            let p = [PREFORK, FDPASS, REUSEPORT][(i % 3) as usize];
            TcpStream::connect(("127.0.0.1", p))
                .and_then(|mut c| c.write_all(b"x"))
                .is_ok()
        },
    ));
    threads
}

/// Namespaces made and deleted, each with TIME_WAIT and live sockets when it goes.
fn netns_churn(noise: &Arc<Noise>, hard: Instant) -> std::thread::JoinHandle<()> {
    let noise = noise.clone();
    noise.threads.fetch_add(1, Ordering::SeqCst);
    std::thread::spawn(move || {
        let (mut ok, mut n) = (0, 0);
        while noise.gate(hard) && n < 10_000 {
            n += 1;
            let ns = Netns::new();
            noise.churned.lock().expect("churned").insert(ns.inode);
            let held = ns.run(|| {
                let l = listen("127.0.0.1", 7300);
                for _ in 0..10 {
                    time_wait_once(&l, 7300);
                }
                (0..2)
                    .filter_map(|_| {
                        let c = TcpStream::connect(("127.0.0.1", 7300)).ok()?;
                        let (s, _) = l.accept().ok()?;
                        Some((c, s))
                    })
                    .collect::<Vec<_>>()
            });
            ok += u64::from(held.len() == 2);
            // Deleted with its sockets alive; they go after.
            drop(ns);
            drop(held);
            std::thread::sleep(Duration::from_millis(300));
        }
        noise.tally("netns made and deleted", ok, n - ok);
        noise.threads.fetch_sub(1, Ordering::SeqCst);
    })
}

/// `n` established pairs to `p` in `ns`, held by helper processes (an fd limit each), each
/// with its listener on an address of its own (so ephemeral ports last).
fn pool(ns: &Netns, p: u16, first: usize, n: usize) -> Vec<Helper> {
    (0..n.div_ceil(PAIRS_PER_LISTENER))
        .map(|i| {
            let take = PAIRS_PER_LISTENER.min(n - i * PAIRS_PER_LISTENER);
            let addr = format!("127.0.1.{}", first + i + 1);
            let h = Helper::spawn(
                ns,
                None,
                &["pool", &addr, &p.to_string(), &take.to_string()],
            );
            h.expect("ready");
            h
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The plants.

#[derive(Clone, Debug)]
enum Holder {
    /// A process holding the fd (`owner_source` fd).
    Fd(u32),
    /// Nobody accepted it; its listener's holder (`owner_source` accept_queue).
    AcceptQueue(u32),
    /// Nobody holds it; who closed it (`owner_source` none, `last_owner`).
    Orphan(u32),
    /// A destination, not a socket (TIME_WAIT pressure).
    Destination,
}

/// One planted anomaly and what became of it in each daemon.
#[derive(Clone, Debug)]
struct Plant {
    round: usize,
    kind: &'static str,
    state: &'static str,
    label: &'static str,
    netns: u64,
    saddr: String,
    sport: u16,
    daddr: String,
    dport: u16,
    holder: Holder,
    /// When the harness saw the state reached (the helper said so).
    ready: SystemTime,
    released: Option<SystemTime>,
    /// The daemon that was stopped while this was planted, and when it resumed.
    stalled: Option<(&'static str, SystemTime)>,
    /// How long after entering its state it may be raised.
    threshold: Duration,
    /// The daemons meant to raise it.
    by: Vec<&'static str>,
    /// Daemons that ended [`PRESSURE_RECONCILIATIONS`] reconciliations after the release
    /// without resolving it (TIME_WAIT pressure only), with how many they ended.
    late: Vec<(&'static str, u64)>,
}

impl Plant {
    fn matches(&self, r: &Value) -> bool {
        r["kind"] == self.kind
            && r["netns"] == self.netns
            && r["dport"] == self.dport
            && r["daddr"] == self.daddr.as_str()
            && (self.kind == "time_wait_pressure" || r["sport"] == self.sport)
            && ts(r) >= self.ready - Duration::from_secs(5)
    }
}

/// What one daemon made of one plant.
struct Outcome {
    raised: Option<f64>,
    bound: f64,
    holder_ok: Result<(), String>,
    cgroup: Option<String>,
    resolved: Option<(f64, String)>,
}

fn outcome(p: &Plant, d: &Daemon, cg: Option<&Cgroup>) -> Outcome {
    let a = d.find(|r| r["type"] == "anomaly" && p.matches(r));
    // Entry: the daemon's own transition into the state if it printed one, else the
    // helper's word (a little after the entry).
    let entered = d
        .find(|r| {
            r["type"] == "transition"
                && r["new"] == p.state
                && r["netns"] == p.netns
                && r["sport"] == p.sport
                && r["dport"] == p.dport
                && ts(r) >= p.ready - Duration::from_secs(5)
        })
        .map_or(p.ready, |t| ts(&t).min(p.ready));
    let mut bound = p.threshold + GRACE;
    if let Some((who, resumed)) = p.stalled
        && who == d.name
    {
        // Raised once a reconciliation after the stall is in: from the later of the deadline
        // and the resume.
        let from_resume = resumed.duration_since(entered).unwrap_or_default() + RECONCILE_BUDGET;
        bound = bound.max(from_resume + GRACE);
    }
    let near = || {
        d.find(|r| {
            r["type"] == "anomaly"
                && r["kind"] == p.kind
                && r["netns"] == p.netns
                && r["dport"] == p.dport
                && r["daddr"] == p.daddr.as_str()
                && ts(r) >= p.ready - Duration::from_secs(5)
        })
    };
    let holder_ok = match &a {
        None => Err(match near() {
            Some(n) => format!(
                "not raised with its tuple; raised as {}:{} -> {}:{} owner_source {} pid {} after {:.2}s",
                n["saddr"],
                n["sport"],
                n["daddr"],
                n["dport"],
                n["owner_source"],
                n["pid"],
                n["age_ms"].as_f64().unwrap_or(0.0) / 1000.0
            ),
            None => "not raised".into(),
        }),
        Some(a) => match p.holder {
            Holder::Fd(pid) if a["owner_source"] == "fd" && a["pid"] == pid => Ok(()),
            Holder::AcceptQueue(pid) if a["owner_source"] == "accept_queue" && a["pid"] == pid => {
                Ok(())
            }
            Holder::Orphan(last)
                if a["owner_source"] == "none"
                    && a["pid"].is_null()
                    && a["last_owner"]["pid"] == last =>
            {
                Ok(())
            }
            Holder::Destination => Ok(()),
            ref h => Err(format!(
                "want {h:?}; got owner_source {} pid {} last_owner {}",
                a["owner_source"], a["pid"], a["last_owner"]
            )),
        },
    };
    let holder_ok = match (holder_ok, &a, cg) {
        // Sockets of the plants' processes carry their cgroup (as the socket's `cgroup`).
        (Ok(()), Some(a), Some(cg))
            if matches!(p.holder, Holder::Fd(_) | Holder::AcceptQueue(_)) =>
        {
            if a["cgroup"] == cg.shown.as_str() {
                Ok(())
            } else {
                Err(format!("cgroup {} (want {})", a["cgroup"], cg.shown))
            }
        }
        (r, _, _) => r,
    };
    let resolved = p.released.and_then(|rel| {
        d.find(|r| r["type"] == "anomaly_resolved" && p.matches(r))
            .map(|r| {
                (
                    since(ts(&r), rel),
                    r["resolution"].as_str().unwrap_or("?").to_owned(),
                )
            })
    });
    Outcome {
        raised: a.as_ref().map(|a| since(ts(a), entered)),
        bound: bound.as_secs_f64(),
        holder_ok,
        cgroup: a.and_then(|a| a["cgroup"].as_str().map(str::to_owned)),
        resolved,
    }
}

/// Everything a plant round made; dropped once released.
struct Round {
    helpers: Vec<Helper>,
    plants: Vec<Plant>,
}

/// The socket plants in `ns` (port `p`), all by processes in `cg`.
fn plant_sockets(
    round: usize,
    ns: &Netns,
    cg: Option<&Cgroup>,
    p: u16,
    by: &[&'static str],
) -> Round {
    let ps = p.to_string();
    let (srv_addr, nq_addr, hole) = ("127.0.0.2", "127.0.0.3", "10.96.0.2");
    let server = Helper::spawn(ns, cg, &["server", srv_addr, &ps, "2"]);
    server.expect("listening");
    let held = Helper::spawn(ns, cg, &["client", srv_addr, &ps, "shutdown"]);
    let h = held.expect("ready");
    let held_at = SystemTime::now();
    let closed = Helper::spawn(ns, cg, &["client", srv_addr, &ps, "close"]);
    let c = closed.expect("ready");
    let closed_at = SystemTime::now();
    for _ in 0..2 {
        server.expect("accepted");
    }
    let listener = Helper::spawn(ns, cg, &["listen_only", nq_addr, &ps]);
    listener.expect("ready");
    let queued = Helper::spawn(ns, cg, &["client", nq_addr, &ps, "shutdown"]);
    let q = queued.expect("ready");
    let queued_at = SystemTime::now();
    let syn = Helper::spawn(ns, cg, &["synsent", hole, &ps]);
    let s = syn.expect("ready");
    let syn_at = SystemTime::now();
    let port_of = |w: &[String]| -> u16 { w[2].parse().expect("port") };
    let base = Plant {
        round,
        kind: "",
        state: "",
        label: "",
        netns: ns.inode,
        saddr: String::new(),
        sport: 0,
        daddr: String::new(),
        dport: 0,
        holder: Holder::Destination,
        ready: SystemTime::now(),
        released: None,
        stalled: None,
        threshold: THRESHOLD,
        by: by.to_vec(),
        late: Vec::new(),
    };
    let pair =
        |kind, state, label, (sa, sp): (&str, u16), (da, dp): (&str, u16), holder, ready| Plant {
            kind,
            state,
            label,
            saddr: sa.to_owned(),
            sport: sp,
            daddr: da.to_owned(),
            dport: dp,
            holder,
            ready,
            ..base.clone()
        };
    let plants = vec![
        pair(
            "close_wait",
            "CLOSE_WAIT",
            "CLOSE_WAIT held",
            (srv_addr, p),
            (&h[1], port_of(&h)),
            Holder::Fd(server.pid()),
            held_at,
        ),
        pair(
            "fin_wait2",
            "FIN_WAIT2",
            "FIN_WAIT2 held (shutdown)",
            (&h[1], port_of(&h)),
            (srv_addr, p),
            Holder::Fd(held.pid()),
            held_at,
        ),
        pair(
            "close_wait",
            "CLOSE_WAIT",
            "CLOSE_WAIT held (peer gone)",
            (srv_addr, p),
            (&c[1], port_of(&c)),
            Holder::Fd(server.pid()),
            closed_at,
        ),
        pair(
            "fin_wait2",
            "FIN_WAIT2",
            "FIN_WAIT2 orphaned",
            (&c[1], port_of(&c)),
            (srv_addr, p),
            Holder::Orphan(closed.pid()),
            closed_at,
        ),
        pair(
            "close_wait",
            "CLOSE_WAIT",
            "CLOSE_WAIT never accepted",
            (nq_addr, p),
            (&q[1], port_of(&q)),
            Holder::AcceptQueue(listener.pid()),
            queued_at,
        ),
        pair(
            "fin_wait2",
            "FIN_WAIT2",
            "FIN_WAIT2 to the unaccepted",
            (&q[1], port_of(&q)),
            (nq_addr, p),
            Holder::Fd(queued.pid()),
            queued_at,
        ),
        pair(
            "syn_sent",
            "SYN_SENT",
            "SYN_SENT to a black hole",
            (&s[1], port_of(&s)),
            (hole, p),
            Holder::Fd(syn.pid()),
            syn_at,
        ),
    ];
    Round {
        helpers: vec![server, held, closed, listener, queued, syn],
        plants,
    }
}

/// Waits (bounded) until every plant is raised by each daemon meant to raise it; SIGCONTs
/// a stalled daemon when its time comes.
fn await_raised(
    daemons: &[Daemon],
    plants: &[Plant],
    mut resume: Option<(&Daemon, Instant)>,
) -> Option<SystemTime> {
    let mut resumed = None;
    let latest = plants
        .iter()
        .map(|p| p.ready)
        .max()
        .unwrap_or_else(SystemTime::now);
    let mut deadline = Instant::now()
        + latest.duration_since(SystemTime::now()).unwrap_or_default()
        + THRESHOLD
        + GRACE
        + Duration::from_millis(500);
    if let Some((_, at)) = resume {
        deadline =
            deadline.max(at + THRESHOLD + RECONCILE_BUDGET + GRACE + Duration::from_millis(500));
    }
    loop {
        if let Some((d, at)) = resume
            && Instant::now() >= at
        {
            d.signal(libc::SIGCONT);
            resumed = Some(SystemTime::now());
            resume = None;
        }
        let done = plants.iter().all(|p| {
            daemons
                .iter()
                .filter(|d| p.by.contains(&d.name))
                .all(|d| d.any(|r| r["type"] == "anomaly" && p.matches(r)))
        });
        if (done && resume.is_none()) || Instant::now() > deadline {
            if let Some((d, _)) = resume {
                d.signal(libc::SIGCONT);
                resumed = Some(SystemTime::now());
            }
            return resumed;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (bounded) until every released plant is resolved by each daemon meant to raise it.
fn await_resolved(daemons: &[Daemon], plants: &[Plant]) {
    let deadline = Instant::now() + RESOLVE_WITHIN + Duration::from_secs(1);
    while Instant::now() < deadline {
        let done = plants.iter().all(|p| {
            daemons
                .iter()
                .filter(|d| p.by.contains(&d.name))
                .all(|d| d.any(|r| r["type"] == "anomaly_resolved" && p.matches(r)))
        });
        if done {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until each daemon meant to raise the TIME_WAIT pressure plant resolves it, or ends
/// [`PRESSURE_RECONCILIATIONS`] reconciliations after `at_release` (its count then, per
/// daemon) and the record's grace passes without it: then it is `late`.
fn await_pressure_resolved(daemons: &[Daemon], at_release: &[u64], pl: &mut Plant) {
    let give_up = Instant::now() + PRESSURE_GIVE_UP;
    let mut waiting: Vec<(usize, Option<Instant>)> = daemons
        .iter()
        .enumerate()
        .filter(|(_, d)| pl.by.contains(&d.name))
        .map(|(i, _)| (i, None))
        .collect();
    while !waiting.is_empty() && Instant::now() < give_up {
        waiting.retain_mut(|(i, due)| {
            let d = &daemons[*i];
            if d.any(|r| r["type"] == "anomaly_resolved" && pl.matches(r)) {
                return false;
            }
            let ended = d.reconciliations().saturating_sub(at_release[*i]);
            if ended < PRESSURE_RECONCILIATIONS {
                return true;
            }
            let due = *due.get_or_insert_with(|| Instant::now() + PRESSURE_RECORD_GRACE);
            if Instant::now() < due {
                return true;
            }
            pl.late.push((d.name, ended));
            false
        });
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------
// Quiet points: counts against ss.

/// `ss -tanH [FILTER]` in `ns`, per state in the daemon's names.
fn ss(ns: &Netns, filter: Option<&str>) -> BTreeMap<String, i64> {
    let mut c = ns.command("ss");
    c.arg("-tanH");
    if let Some(f) = filter {
        c.arg(f);
    }
    let out = c.output().unwrap_or_else(|e| panic!("ss: {e}"));
    assert!(out.status.success(), "ss failed: {out:?}");
    let mut counts = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
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

fn add(into: &mut BTreeMap<String, i64>, from: &BTreeMap<String, i64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// Per state: the daemon's count within [ss before, ss after] (only TIME_WAIT and orphans
/// end on their own while the noise is stopped). Mismatches as text.
fn bracket(
    daemon: &BTreeMap<String, i64>,
    before: &BTreeMap<String, i64>,
    after: &BTreeMap<String, i64>,
) -> Vec<String> {
    let keys: BTreeSet<&String> = daemon
        .keys()
        .chain(before.keys())
        .chain(after.keys())
        .collect();
    keys.into_iter()
        .filter(|k| k.as_str() != "CLOSE")
        .filter_map(|k| {
            let d = daemon.get(k).copied().unwrap_or(0);
            let (b, a) = (
                before.get(k).copied().unwrap_or(0),
                after.get(k).copied().unwrap_or(0),
            );
            (d < b.min(a) || d > b.max(a)).then(|| {
                if a == b {
                    format!("{k} {d} (ss {a})")
                } else {
                    format!("{k} {d} (ss {b}..{a})")
                }
            })
        })
        .collect()
}

fn status_sockets(d: &Daemon) -> BTreeMap<String, i64> {
    let v = d.status();
    v["sockets"]
        .as_object()
        .unwrap_or_else(|| panic!("{}: no sockets in {v}", d.name))
        .iter()
        .map(|(k, n)| (k.clone(), n.as_i64().unwrap_or(i64::MIN)))
        .collect()
}

/// The states `/sockets` lists (request sockets are only counted).
const LISTED: [&str; 9] = [
    "ESTABLISHED",
    "SYN_SENT",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
];

/// The default-scope daemon's sockets in `netns`, per listed state, from `/sockets`.
fn listed_in(d: &Daemon, netns: &[u64]) -> Vec<BTreeMap<String, i64>> {
    let mut per: Vec<BTreeMap<String, i64>> = vec![BTreeMap::new(); netns.len()];
    for st in LISTED {
        let body = http_get(
            d.mport,
            &format!("/sockets?state={}", st.to_ascii_lowercase()),
        );
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("/sockets {e}: {body}"));
        for s in v["sockets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if let Some(i) = netns.iter().position(|n| s["netns"] == *n) {
                *per[i].entry(st.to_owned()).or_default() += 1;
            }
        }
    }
    per
}

/// One comparison at a quiet point.
struct Check {
    at: usize,
    what: String,
    attempts: usize,
    mismatches: Vec<String>,
    totals: String,
}

fn total(m: &BTreeMap<String, i64>) -> String {
    m.iter()
        .filter(|(_, n)| **n != 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Compares, retrying (3 attempts, 0.5 s apart) while counts settle.
fn compare(at: usize, what: String, mut once: impl FnMut() -> (Vec<String>, String)) -> Check {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (mismatches, totals) = once();
        if mismatches.is_empty() || attempts == 3 {
            return Check {
                at,
                what,
                attempts,
                mismatches,
                totals,
            };
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn quiet_point(
    at: usize,
    noise: &Noise,
    daemons: &[Daemon],
    a: &Netns,
    b: &Netns,
    p: u16,
    checks: &mut Vec<Check>,
) {
    let parked = noise.quiet();
    std::thread::sleep(Duration::from_millis(1500));
    if !parked {
        checks.push(Check {
            at,
            what: "noise threads parked".into(),
            attempts: 1,
            mismatches: vec!["a noise thread did not stop within 10 s".into()],
            totals: String::new(),
        });
    }
    for d in daemons {
        match d.scope {
            Scope::Netns(inode) => {
                assert_eq!(inode, a.inode);
                checks.push(compare(
                    at,
                    format!("{} /status vs ss in A", d.name),
                    || {
                        let before = ss(a, None);
                        let got = status_sockets(d);
                        let after = ss(a, None);
                        (bracket(&got, &before, &after), total(&got))
                    },
                ));
            }
            Scope::All => {
                for (i, ns) in [a, b].into_iter().enumerate() {
                    let name = ["A", "B"][i];
                    checks.push(compare(
                        at,
                        format!("{} /sockets in {name} vs ss in {name}", d.name),
                        || {
                            let keep = |m: BTreeMap<String, i64>| -> BTreeMap<String, i64> {
                                m.into_iter()
                                    .filter(|(k, _)| LISTED.contains(&k.as_str()))
                                    .collect()
                            };
                            let before = keep(ss(ns, None));
                            let got = listed_in(d, &[ns.inode]).remove(0);
                            let after = keep(ss(ns, None));
                            (bracket(&got, &before, &after), total(&got))
                        },
                    ));
                }
            }
            Scope::Port(port) => {
                let f = format!("( sport = :{port} or dport = :{port} )");
                checks.push(compare(
                    at,
                    format!("{} /status vs ss port {p} in A+B", d.name),
                    || {
                        let mut before = ss(a, Some(&f));
                        add(&mut before, &ss(b, Some(&f)));
                        let got = status_sockets(d);
                        let mut after = ss(a, Some(&f));
                        add(&mut after, &ss(b, Some(&f)));
                        (bracket(&got, &before, &after), total(&got))
                    },
                ));
            }
            Scope::Cgroup => {}
        }
    }
    noise.resume();
}

// ---------------------------------------------------------------------------------------

/// Ignored by a plain `cargo test` (the workspace run would take it twice): `cargo xtask test`
/// runs it as a step of its own, `cargo xtask soak --minutes N` for longer, or
/// `cargo test --release -p tcpstate --test soak -- --ignored --nocapture`.
#[test]
#[ignore = "the busy-host soak: run by `cargo xtask test` (short) and `cargo xtask soak`"]
fn busy_host_soak() {
    if !require_bpf() {
        return;
    }
    let soak = Duration::from_secs(env_num("TCPSTATE_SOAK_SECS", 45));
    let established = env_num("TCPSTATE_SOAK_ESTABLISHED", 4000) as usize;
    let pairs = established / 2;
    let hard = Instant::now() + soak + Duration::from_secs(300);
    let started = Instant::now();
    let p = port(12000);

    // A: the watched namespace (plants, pool, services, most noise); B: fast TIME_WAIT churn
    // past its table's size. A black hole in A: the peer address of a veth has a permanent
    // neighbour entry, so SYNs leave and the other end drops them.
    let a = Netns::new();
    let b = Netns::new();
    sysctl(&b, "net.ipv4.tcp_max_tw_buckets=2000");
    for argv in [
        "link add bh0 type veth peer name bh1",
        "addr add 10.96.0.1/24 dev bh0",
        "link set bh0 up",
        "link set bh1 up",
        "neigh add 10.96.0.2 lladdr 02:00:00:00:00:01 nud permanent dev bh0",
    ] {
        ip_n(&a, argv);
    }
    let cg = Cgroup::new();
    let services: Vec<Helper> = [
        vec!["prefork", "127.0.0.1", "7001", "3"],
        vec!["fdpass", "127.0.0.1", "7002"],
        vec!["reuseport", "127.0.0.1", "7003", "3"],
    ]
    .iter()
    .map(|args| {
        let h = Helper::spawn(&a, cg.as_ref(), args);
        h.expect("ready");
        h
    })
    .collect();
    assert_eq!((PREFORK, FDPASS, REUSEPORT), (7001, 7002, 7003));

    // Half the pool before the daemons start (seeded), half after (seen born).
    let mut held = pool(&a, p, 0, pairs / 2);

    let base = |extra: &[&str]| -> Vec<String> { extra.iter().map(|s| (*s).to_owned()).collect() };
    let mut specs: Vec<(&'static str, Scope, Vec<String>)> = vec![
        ("default", Scope::All, Vec::new()),
        (
            "netns A",
            Scope::Netns(a.inode),
            base(&["--netns", &a.inode.to_string()]),
        ),
        ("port P", Scope::Port(p), base(&["--port", &p.to_string()])),
    ];
    if let Some(cg) = &cg {
        specs.push(("cgroup", Scope::Cgroup, base(&["--cgroup", &cg.shown])));
    }
    let mut daemons: Vec<Daemon> = std::thread::scope(|s| {
        let hs: Vec<_> = specs
            .iter()
            .map(|(name, scope, extra)| s.spawn(move || Daemon::start(name, *scope, p, extra)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("daemon start"))
            .collect()
    });
    held.extend(pool(&a, p, 100, pairs - pairs / 2));
    let setup = started.elapsed();
    let names: Vec<&'static str> = daemons.iter().map(|d| d.name).collect();

    let noise = Arc::new(Noise::default());
    let mut threads = start_noise(&noise, &a, &b, hard);
    threads.push(netns_churn(&noise, hard));
    let noise_from = Instant::now();

    let mut plants: Vec<Plant> = Vec::new();
    let mut checks: Vec<Check> = Vec::new();
    let mut stall: Option<(Duration, Value)> = None;
    let mut pressure_ns: BTreeSet<u64> = BTreeSet::new();
    let mut round = 0;
    // Every cycle: a plant round, then a quiet point. The second is planted while the
    // default daemon is stopped; pressure every third from the first.
    while round == 0 || noise_from.elapsed() + Duration::from_secs(12) < soak {
        std::thread::sleep(Duration::from_secs(2));
        let stalled = round == 1;
        let by_socket: Vec<&'static str> = names.clone();
        let stop_at = Instant::now();
        if stalled {
            daemons[0].signal(libc::SIGSTOP);
            std::thread::sleep(Duration::from_millis(300));
        }
        let mut r = plant_sockets(round, &a, cg.as_ref(), p, &by_socket);
        let resumed = await_raised(
            &daemons,
            &r.plants,
            stalled.then(|| (&daemons[0], stop_at + STALL)),
        );
        if let Some(resumed) = resumed {
            for pl in &mut r.plants {
                pl.stalled = Some((daemons[0].name, resumed));
            }
            let st = daemons[0].status();
            stall = Some((STALL, st));
        }
        let released = SystemTime::now();
        for h in &mut r.helpers {
            h.release();
        }
        for pl in &mut r.plants {
            pl.released = Some(released);
        }
        await_resolved(&daemons, &r.plants);
        plants.extend(r.plants);
        drop(r.helpers);

        if round % 3 == 0 {
            // TIME_WAIT pressure: 70 to one destination in a namespace of 100 ephemeral ports;
            // released by deleting the namespace.
            let ns = Netns::new();
            pressure_ns.insert(ns.inode);
            sysctl(
                &ns,
                &format!(
                    "net.ipv4.ip_local_port_range={} {}",
                    PRESSURE_RANGE.0, PRESSURE_RANGE.1
                ),
            );
            let tw = Helper::spawn(
                &ns,
                cg.as_ref(),
                &["tw", "127.0.0.1", &p.to_string(), &PRESSURE_TW.to_string()],
            );
            tw.expect("ready");
            let mut pl = Plant {
                round,
                kind: "time_wait_pressure",
                state: "TIME_WAIT",
                label: "TIME_WAIT pressure",
                netns: ns.inode,
                saddr: "127.0.0.1".into(),
                sport: 0,
                daddr: "127.0.0.1".into(),
                dport: p,
                holder: Holder::Destination,
                ready: SystemTime::now(),
                released: None,
                stalled: None,
                threshold: Duration::ZERO,
                by: names.iter().copied().filter(|n| *n != "netns A").collect(),
                late: Vec::new(),
            };
            await_raised(&daemons, std::slice::from_ref(&pl), None);
            let at_release: Vec<u64> = daemons.iter().map(Daemon::reconciliations).collect();
            drop(tw);
            drop(ns);
            pl.released = Some(SystemTime::now());
            await_pressure_resolved(&daemons, &at_release, &mut pl);
            plants.push(pl);
        }
        round += 1;
        quiet_point(round, &noise, &daemons, &a, &b, p, &mut checks);
    }
    // Noise to the end, then a last look.
    while noise_from.elapsed() < soak {
        std::thread::sleep(Duration::from_millis(200));
    }
    quiet_point(round + 1, &noise, &daemons, &a, &b, p, &mut checks);
    noise.stop.store(true, Ordering::SeqCst);
    noise.resume();
    for t in threads {
        let _ = t.join();
    }
    let noise_time = noise_from.elapsed();
    let statuses: Vec<Value> = daemons.iter().map(Daemon::status).collect();
    let metrics: Vec<String> = daemons
        .iter()
        .map(|d| http_get(d.mport, "/metrics"))
        .collect();
    let stopped: Vec<Value> = daemons.iter_mut().map(Daemon::stop).collect();
    drop(services);
    drop(held);

    // ----- verdicts
    let mut failures: Vec<String> = Vec::new();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "\n==== tcpstate busy-host soak: noise {} (setup {}), {} established held, {} rounds, cgroup {}",
        secs(noise_time),
        secs(setup),
        pairs * 2,
        round,
        cg.as_ref()
            .map_or("NONE (no cgroup2: no --cgroup daemon)".to_owned(), |c| c
                .shown
                .clone())
    );
    let _ = writeln!(
        report,
        "\n-- planted anomalies (raised: seconds after entering the state; bound = threshold + 1 s, or after a stall: resume + reconciliation {} + 1 s)",
        secs(RECONCILE_BUDGET)
    );
    let _ = writeln!(
        report,
        "{:<3} {:<30} {:<8} {:>8} {:>6} {:<5} {:<14} note",
        "rnd", "plant", "daemon", "raised", "bound", "hold", "resolved"
    );
    for pl in &plants {
        for d in daemons.iter().filter(|d| pl.by.contains(&d.name)) {
            let o = outcome(pl, d, cg.as_ref());
            let raised = o.raised.map_or("NO".to_owned(), |s| format!("{s:.2}s"));
            let resolved = o
                .resolved
                .as_ref()
                .map_or("NO".to_owned(), |(s, how)| format!("{s:.2}s {how}"));
            let mut note = String::new();
            if let Some((who, _)) = pl.stalled
                && who == d.name
            {
                note.push_str("planted while stopped; ");
            }
            let ok_raised = o
                .raised
                .is_some_and(|s| s <= o.bound && s >= pl.threshold.as_secs_f64() - 0.05);
            let late = pl.late.iter().find(|(n, _)| *n == d.name);
            let ok_resolved = if matches!(pl.holder, Holder::Destination) {
                o.resolved.is_some() && late.is_none()
            } else {
                o.resolved
                    .as_ref()
                    .is_some_and(|(s, _)| *s <= RESOLVE_WITHIN.as_secs_f64())
            };
            let within = match late {
                Some((_, ended)) => {
                    format!("{PRESSURE_RECONCILIATIONS} reconciliations; {ended} ended without it")
                }
                None if matches!(pl.holder, Holder::Destination) => {
                    format!("{PRESSURE_RECONCILIATIONS} reconciliations")
                }
                None => secs(RESOLVE_WITHIN),
            };
            if !ok_raised {
                failures.push(format!(
                    "round {} {} ({}:{} -> {}:{} netns {}) in {}: raised {raised}, bound {:.2}s",
                    pl.round,
                    pl.label,
                    pl.saddr,
                    pl.sport,
                    pl.daddr,
                    pl.dport,
                    pl.netns,
                    d.name,
                    o.bound
                ));
            }
            if let Err(e) = &o.holder_ok {
                note.push_str(e);
                failures.push(format!(
                    "round {} {} in {}: {e}",
                    pl.round, pl.label, d.name
                ));
            }
            if !ok_resolved {
                failures.push(format!(
                    "round {} {} in {}: resolved {resolved} after release (within {within})",
                    pl.round, pl.label, d.name,
                ));
            }
            let _ = writeln!(
                report,
                "{:<3} {:<30} {:<8} {:>8} {:>5.1}s {:<5} {:<14} {}{}",
                pl.round,
                pl.label,
                d.name,
                raised,
                o.bound,
                if o.holder_ok.is_ok() { "ok" } else { "BAD" },
                resolved,
                note,
                o.cgroup.map(|c| format!(" cgroup {c}")).unwrap_or_default()
            );
        }
    }
    // Nothing raised that was not planted, in the harness's namespaces (the default daemon)
    // or at all (the filtered ones; host-wide orphan pressure aside).
    let ours: BTreeSet<u64> = [a.inode, b.inode]
        .into_iter()
        .chain(noise.churned.lock().expect("churned").iter().copied())
        .chain(pressure_ns.iter().copied())
        .collect();
    let _ = writeln!(
        report,
        "\n-- anomalies not planted (in the harness's namespaces; any, for the filtered daemons)"
    );
    // The harness's own client of the served ports opens a connection per request and
    // closes it first: connection_churn is right to name it (this process, in A, to one of
    // those ports), when the host is fast enough to pass the rate. Named any other way, or
    // anywhere else, it is an unplanted anomaly like the rest.
    let served_churn = |r: &Value| {
        r["kind"] == "connection_churn"
            && r["netns"] == a.inode
            && r["daddr"] == "127.0.0.1"
            && [PREFORK, FDPASS, REUSEPORT]
                .iter()
                .any(|&p| r["dport"] == p)
            && r["pid"] == std::process::id()
    };
    for d in &daemons {
        let churn = d.all(|r| r["type"] == "anomaly" && served_churn(r));
        let _ = writeln!(
            report,
            "{:<8} connection_churn of the served ports' client: {}",
            d.name,
            churn.len()
        );
        let extra = d.all(|r| {
            r["type"] == "anomaly"
                && r["kind"] != "orphan_pressure"
                && !served_churn(r)
                && (d.scope != Scope::All || ours.contains(&r["netns"].as_u64().unwrap_or(0)))
                && !plants.iter().any(|p| p.matches(r))
        });
        let leaks = d.all(|r| r["type"] == "leak_suspected");
        let _ = writeln!(
            report,
            "{:<8} {} unplanted, {} leak_suspected",
            d.name,
            extra.len(),
            leaks.len()
        );
        for r in extra.iter().take(10) {
            let _ = writeln!(report, "         {r}");
        }
        if !extra.is_empty() {
            failures.push(format!(
                "{}: {} anomalies not planted, first {}",
                d.name,
                extra.len(),
                extra[0]
            ));
        }
        for r in leaks.iter().take(3) {
            let _ = writeln!(report, "         {r}");
        }
    }
    let _ = writeln!(
        report,
        "\n-- counts at quiet points (daemon within ss before..after; 3 attempts, 0.5 s apart)"
    );
    for c in &checks {
        let verdict = if c.mismatches.is_empty() {
            "ok".to_owned()
        } else {
            format!("MISMATCH {}", c.mismatches.join("; "))
        };
        let _ = writeln!(
            report,
            "q{:<2} {:<42} try {} {verdict}\n      [{}]",
            c.at, c.what, c.attempts, c.totals
        );
        if !c.mismatches.is_empty() {
            failures.push(format!(
                "quiet point {}: {}: {}",
                c.at,
                c.what,
                c.mismatches.join("; ")
            ));
        }
    }
    let _ = writeln!(report, "\n-- events");
    let _ = writeln!(
        report,
        "{:<8} {:>10} {:>9} {:>9} {:>10} {:>9} {:>10} {:>12} {:>9} {:>10}",
        "daemon",
        "events",
        "dropped",
        "rec.miss",
        "filtered",
        "tw_full",
        "stdout_dr",
        "transitions",
        "sig_drop",
        "rst_nosock"
    );
    for (((d, s), st), m) in daemons.iter().zip(&stopped).zip(&statuses).zip(&metrics) {
        let metric = |name: &str| -> String {
            m.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
                .unwrap_or("?")
                .to_owned()
        };
        let _ = writeln!(
            report,
            "{:<8} {:>10} {:>9} {:>9} {:>10} {:>9} {:>10} {:>12} {:>9} {:>10}",
            d.name,
            s["events"],
            s["dropped"],
            s["recursion_misses"],
            s["filtered"],
            s["timewait_full"],
            st["stdout_dropped"],
            d.transitions.load(Ordering::Relaxed),
            metric("tcpstate_signals_dropped_total"),
            metric("tcpstate_resets_no_socket_total"),
        );
        if s.is_null() {
            failures.push(format!(
                "{}: no stopped record (see {})",
                d.name,
                d.stderr.display()
            ));
        } else if s["dropped"].as_u64() < st["dropped"].as_u64() {
            failures.push(format!(
                "{}: stopped.dropped {} < /status dropped {}",
                d.name, s["dropped"], st["dropped"]
            ));
        }
    }
    if let Some((how_long, st)) = &stall {
        let _ = writeln!(
            report,
            "stall: {} stopped {} in round 1; /status after: dropped {}",
            daemons[0].name,
            secs(*how_long),
            st["dropped"]
        );
    }
    let _ = writeln!(report, "\n-- noise (ok / failed)");
    for (what, (ok, err)) in noise.counts.lock().expect("counts").iter() {
        let _ = writeln!(report, "{what:<36} {ok:>9} / {err}");
    }
    let _ = writeln!(
        report,
        "resets seen (records): {}",
        daemons
            .iter()
            .map(|d| format!("{} {}", d.name, d.resets.load(Ordering::Relaxed)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        report,
        "daemon stderr: {}",
        std::env::temp_dir()
            .join(format!("tcpstate-soak-{}-*.stderr", std::process::id()))
            .display()
    );
    if failures.is_empty() {
        let _ = writeln!(report, "\nRESULT: ok");
    } else {
        let _ = writeln!(report, "\nRESULT: {} FAILED", failures.len());
        for f in &failures {
            let _ = writeln!(report, "FAILED {f}");
        }
    }
    println!("{report}");
    drop(daemons);
    drop(cg);
    assert!(
        failures.is_empty(),
        "{} soak checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
