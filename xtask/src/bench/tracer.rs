//! The tracers under test: how to start one, know it is ready, find its BPF
//! programs, and stop it.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::bpfstats::{self, Prog};
use super::churn::Churn;
use super::interrupt;
use super::procstat;
use crate::cmd::show;

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracer {
    Untraced,
    /// An empty program on the same tracepoint, loaded by xtask (`floor.rs`): the kernel's
    /// own cost per event, which tcpstate's is reported against.
    Floor,
    TcpstateDefault,
    /// Default flags without the retransmit and reset hooks.
    TcpstateNoHooks,
    /// Default flags without the drop hook (`skb:kfree_skb`): what the hook adds.
    TcpstateNoDrops,
    TcpstateFullLog,
    TcpstateAnomalies,
    Tcpstates,
    /// The cheapest thing a tracer of this tracepoint can do: count.
    Bpftrace,
    /// The TIME_WAIT run: this build, default flags, metrics on.
    TcpstateTimewait,
    /// The same flags on the previous release's build (`--baseline`).
    TcpstateBaseline,
    /// The TIME_WAIT run with a reconciliation (a dump of every socket)
    /// every 2 s: this build, then the previous release.
    TcpstateTimewaitReconcile,
    TcpstateBaselineReconcile,
}

/// Where the TIME_WAIT run's tcpstate serves /metrics (in the host namespace).
pub const TIMEWAIT_METRICS_PORT: u16 = 19464;

impl Tracer {
    /// In the order each round runs them.
    pub const ALL: [Self; 9] = [
        Self::Untraced,
        Self::Floor,
        Self::TcpstateDefault,
        Self::TcpstateNoHooks,
        Self::TcpstateNoDrops,
        Self::TcpstateFullLog,
        Self::TcpstateAnomalies,
        Self::Tcpstates,
        Self::Bpftrace,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Untraced => "untraced",
            Self::Floor => "floor: empty tp_btf program (reference)",
            Self::TcpstateDefault => "tcpstate (default log)",
            Self::TcpstateNoHooks => "tcpstate --retransmits=false --resets=false",
            Self::TcpstateNoDrops => "tcpstate --drops=false",
            Self::TcpstateFullLog => "tcpstate --log-rate 0",
            Self::TcpstateAnomalies => "tcpstate --log-transitions=false",
            Self::Tcpstates => "libbpf-tools tcpstates",
            Self::Bpftrace => "bpftrace count() one-liner (reference)",
            Self::TcpstateTimewait => "tcpstate (this build)",
            Self::TcpstateBaseline => "tcpstate (previous release)",
            Self::TcpstateTimewaitReconcile => "tcpstate --reconcile-interval 2s (this build)",
            Self::TcpstateBaselineReconcile => {
                "tcpstate --reconcile-interval 2s (previous release)"
            }
        }
    }

    /// File names and JSON keys.
    pub fn slug(self) -> &'static str {
        match self {
            Self::Untraced => "untraced",
            Self::Floor => "floor",
            Self::TcpstateDefault => "tcpstate-default",
            Self::TcpstateNoHooks => "tcpstate-no-hooks",
            Self::TcpstateNoDrops => "tcpstate-no-drops",
            Self::TcpstateFullLog => "tcpstate-full-log",
            Self::TcpstateAnomalies => "tcpstate-anomalies-only",
            Self::Tcpstates => "tcpstates",
            Self::Bpftrace => "bpftrace-count",
            Self::TcpstateTimewait => "tcpstate-timewait",
            Self::TcpstateBaseline => "tcpstate-baseline",
            Self::TcpstateTimewaitReconcile => "tcpstate-timewait-reconcile",
            Self::TcpstateBaselineReconcile => "tcpstate-baseline-reconcile",
        }
    }

    pub fn is_tcpstate(self) -> bool {
        matches!(
            self,
            Self::TcpstateDefault
                | Self::TcpstateNoHooks
                | Self::TcpstateNoDrops
                | Self::TcpstateFullLog
                | Self::TcpstateAnomalies
                | Self::TcpstateTimewait
                | Self::TcpstateBaseline
                | Self::TcpstateTimewaitReconcile
                | Self::TcpstateBaselineReconcile
        )
    }

    /// Runs the previous release's binary.
    pub fn is_baseline(self) -> bool {
        matches!(
            self,
            Self::TcpstateBaseline | Self::TcpstateBaselineReconcile
        )
    }

    /// Whether its log carries transition records to time.
    pub fn logs_transitions(self) -> bool {
        matches!(self, Self::TcpstateDefault | Self::TcpstateFullLog)
    }

    /// The command line, as reported; None for `Untraced` and `Floor` (no process).
    pub fn command(self, tools: &Tools, log: &Path) -> Option<Command> {
        let mut cmd = match self {
            Self::Untraced | Self::Floor => return None,
            Self::Tcpstates => {
                let tcpstates = tools.tcpstates.as_ref()?;
                match &tools.stdbuf {
                    Some(stdbuf) => {
                        let mut cmd = Command::new(stdbuf);
                        cmd.arg("-oL").arg(tcpstates);
                        cmd
                    }
                    None => Command::new(tcpstates),
                }
            }
            Self::Bpftrace => {
                let mut cmd = Command::new(tools.bpftrace.as_ref()?);
                cmd.args(["-e", BPFTRACE_PROGRAM]);
                cmd
            }
            _ => {
                let binary = if self.is_baseline() {
                    tools.baseline.as_ref()?
                } else {
                    &tools.tcpstate
                };
                let mut cmd = Command::new(binary);
                let log: OsString = log.into();
                cmd.args(["run".into(), "--quiet".into(), "--log-file".into(), log]);
                if !self.is_baseline() {
                    cmd.args(&tools.extra_args);
                }
                cmd
            }
        };
        match self {
            Self::TcpstateFullLog => {
                cmd.args(["--log-rate", "0"]);
            }
            Self::TcpstateAnomalies => {
                cmd.arg("--log-transitions=false");
            }
            Self::TcpstateNoHooks => {
                cmd.args(["--retransmits=false", "--resets=false"]);
            }
            Self::TcpstateNoDrops => {
                cmd.arg("--drops=false");
            }
            Self::TcpstateTimewait | Self::TcpstateBaseline => {
                let addr = format!("127.0.0.1:{TIMEWAIT_METRICS_PORT}");
                cmd.args(["--metrics-addr", &addr]);
            }
            Self::TcpstateTimewaitReconcile | Self::TcpstateBaselineReconcile => {
                let addr = format!("127.0.0.1:{TIMEWAIT_METRICS_PORT}");
                cmd.args(["--reconcile-interval", "2s", "--metrics-addr", &addr]);
                if self == Self::TcpstateTimewaitReconcile {
                    // Every one of them a full dump, TIME_WAIT included.
                    cmd.args(["--full-reconcile-every", "1"]);
                }
            }
            _ => {}
        }
        Some(cmd)
    }
}

/// The bpftrace reference: count transitions by new state, nothing else.
pub const BPFTRACE_PROGRAM: &str =
    "tracepoint:sock:inet_sock_set_state { @[args->newstate] = count(); }";

pub struct Tools {
    pub tcpstate: PathBuf,
    pub bpftool: PathBuf,
    /// None when libbpf-tools could not be installed.
    pub tcpstates: Option<PathBuf>,
    pub stdbuf: Option<PathBuf>,
    /// None when bpftrace could not be installed.
    pub bpftrace: Option<PathBuf>,
    /// The previous release's tcpstate (`--baseline`), when it was built.
    pub baseline: Option<PathBuf>,
    /// `--tcpstate-args`: more arguments for this build's rows.
    pub extra_args: Vec<String>,
    /// Its binary has libbpf-tools' "lost %llu events on CPU" warning, so
    /// silence on stderr means nothing was lost.
    pub tcpstates_reports_lost: bool,
}

/// A child that is killed (SIGKILL) and reaped if still running on drop.
pub struct ChildGuard {
    child: Option<Child>,
    shown: String,
}

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        let shown = show(cmd);
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("could not start `{shown}`"))?;
        Ok(Self {
            child: Some(child),
            shown,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Some(status) once it has exited.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            bail!("`{}` was already reaped", self.shown)
        };
        child
            .try_wait()
            .with_context(|| format!("cannot wait for `{}`", self.shown))
    }

    /// SIGTERM, then waits (SIGKILL after 60 s, which is an error).
    pub fn terminate(mut self) -> Result<ExitStatus> {
        let pid = libc::pid_t::try_from(self.pid()).context("pid out of range")?;
        // SAFETY: plain kill(2) of our own, not yet reaped, child.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot SIGTERM `{}`", self.shown));
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.exited()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "`{}` did not exit within {}s of SIGTERM; killed it",
                    self.shown,
                    STOP_TIMEOUT.as_secs()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub struct Running {
    pub tracer: Tracer,
    pub pid: u32,
    pub log: PathBuf,
    pub progs: Vec<Prog>,
    child: ChildGuard,
    stderr: PathBuf,
}

/// What a tracer said when it stopped.
#[derive(Debug, Default)]
pub struct Stopped {
    /// tcpstate's `{"type":"stopped",...}` record.
    pub record: Option<serde_json::Value>,
    /// tcpstates: events it reported lost on stderr.
    pub lost: Option<u64>,
}

/// Starts `tracer` (not `Untraced`) with its files in `dir`, and returns once
/// it is ready: tcpstate has written its "started" record, its new
/// tracepoint program(s) show in bpftool, and they ran for a probe connection.
pub fn start(tracer: Tracer, tools: &Tools, dir: &Path, churn: &Churn) -> Result<Running> {
    let log = dir.join(format!("{}.jsonl", tracer.slug()));
    let stderr = dir.join(format!("{}.stderr", tracer.slug()));
    let mut cmd = tracer
        .command(tools, &log)
        .with_context(|| format!("{} is not available", tracer.label()))?;
    let stdout: Stdio = if tracer.is_tcpstate() {
        // A file, not a terminal: tcpstate's default --log-rate applies.
        File::create(dir.join(format!("{}.stdout", tracer.slug())))?.into()
    } else {
        Stdio::null()
    };
    cmd.stdout(stdout).stderr(File::create(&stderr)?);

    let before = bpfstats::snapshot(&tools.bpftool)?;
    eprintln!("bench: starting {}", show(&cmd));
    let mut child = ChildGuard::spawn(&mut cmd)?;
    let pid = child.pid();
    let deadline = Instant::now() + READY_TIMEOUT;
    let progs = loop {
        interrupt::check()?;
        if let Some(status) = child.exited()? {
            bail!(
                "{} exited ({status}) before it was ready: {}",
                tracer.label(),
                last_line(&stderr)
            );
        }
        let logged = !tracer.is_tcpstate()
            || fs::read_to_string(&log).is_ok_and(|l| l.contains("\"type\":\"started\""));
        let fresh = bpfstats::fresh_tracepoint_progs(&before, &bpfstats::snapshot(&tools.bpftool)?);
        let held = procstat::bpf_prog_ids(pid)?;
        let owned: Vec<Prog> = fresh
            .iter()
            .filter(|p| held.contains(&p.id))
            .cloned()
            .collect();
        if logged && !owned.is_empty() {
            break owned;
        }
        if Instant::now() > deadline {
            if logged && !fresh.is_empty() {
                eprintln!(
                    "bench: warning: none of the new tracepoint programs is open in pid {pid}; \
                     counting all new ones"
                );
                break fresh;
            }
            bail!(
                "{} was not ready after {}s (started record: {logged}, new tracepoint programs: \
                 {}); its stderr: {}",
                tracer.label(),
                READY_TIMEOUT.as_secs(),
                fresh.len(),
                last_line(&stderr)
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    let ids: Vec<u32> = progs.iter().map(|p| p.id).collect();
    confirm_attached(tools, churn, &ids)?;
    eprintln!(
        "bench: {} ready (pid {pid}, BPF programs: {})",
        tracer.label(),
        progs
            .iter()
            .map(|p| format!("{} {}", p.id, p.name))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(Running {
        tracer,
        pid,
        log,
        progs,
        child,
        stderr,
    })
}

/// A program can show in bpftool before it is attached: make probe
/// connections until its run count moves.
pub(super) fn confirm_attached(tools: &Tools, churn: &Churn, ids: &[u32]) -> Result<()> {
    let base = bpfstats::totals(&bpfstats::snapshot(&tools.bpftool)?, ids).run_cnt;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        churn.trigger()?;
        thread::sleep(Duration::from_millis(20));
        if bpfstats::totals(&bpfstats::snapshot(&tools.bpftool)?, ids).run_cnt > base {
            return Ok(());
        }
    }
    bail!(
        "BPF programs {ids:?} did not run for a probe connection within 5s \
         (is kernel.bpf_stats_enabled 1?)"
    )
}

impl Running {
    pub fn ids(&self) -> Vec<u32> {
        self.progs.iter().map(|p| p.id).collect()
    }

    /// SIGTERM, wait, and collect what it reported.
    pub fn stop(self, tools: &Tools) -> Result<Stopped> {
        let label = self.tracer.label();
        let status = self.child.terminate()?;
        let killed_by_term = {
            use std::os::unix::process::ExitStatusExt as _;
            status.signal() == Some(libc::SIGTERM)
        };
        if !status.success() && !killed_by_term {
            bail!("{label} exited with {status}: {}", last_line(&self.stderr));
        }
        let mut stopped = Stopped::default();
        if self.tracer.is_tcpstate() {
            stopped.record = Some(stopped_record(&self.log).with_context(|| {
                format!(
                    "{label}: no \"stopped\" record at the end of {}",
                    self.log.display()
                )
            })?);
        } else if self.tracer == Tracer::Tcpstates && tools.tcpstates_reports_lost {
            let stderr = fs::read_to_string(&self.stderr).unwrap_or_default();
            stopped.lost = Some(lost_events(&stderr));
        }
        Ok(stopped)
    }
}

/// The last `{"type":"stopped",...}` line in the last 64 KiB of the log.
fn stopped_record(log: &Path) -> Option<serde_json::Value> {
    let mut file = File::open(log).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(64 << 10)))
        .ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .filter(|line| line.contains("\"stopped\""))
        .find_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|record| record.get("type").and_then(|t| t.as_str()) == Some("stopped"))
}

/// Sum of libbpf-tools' "lost N events on CPU #C" warnings.
fn lost_events(stderr: &str) -> u64 {
    stderr
        .lines()
        .filter_map(|line| line.split_once("lost ").map(|(_, rest)| rest))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn last_line(path: &Path) -> String {
    fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "(nothing on stderr)".to_owned())
}
