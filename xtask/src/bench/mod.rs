//! `cargo xtask bench`: tcpstate's cost under TCP connection churn, next to
//! no tracer, libbpf-tools `tcpstates` and a bpftrace one-liner that only
//! counts states (the floor for any tracer of this tracepoint), plus its
//! memory per tracked socket.
//!
//! Orchestration only; the pieces are: `netns` (the namespace the traffic
//! runs in), `churn` (the load), `tracer` (start / ready / stop),
//! `bpfstats` and `procstat` (what we measure), `latency` (log tailing),
//! `memory` (the memory run), `report` (Markdown and JSON).

mod bpfstats;
mod churn;
mod clock;
mod floor;
mod interrupt;
mod latency;
mod memory;
mod netns;
mod procstat;
mod replay;
mod report;
mod sysctl;
mod timewait;
mod tracer;
mod twmem;

use std::fs;
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use self::churn::{Churn, ChurnResult, PROBE_PORT};
use self::latency::{LogTail, percentile};
use self::netns::Netns;
use self::report::{FloorSummary, Header, Report, Sample, Summary, TracerResult};
use self::sysctl::SysctlGuard;
use self::tracer::{Tools, Tracer};
use crate::cmd::{euid, show, which};
use crate::setup::ensure_apt_package;

/// After the churn, before sampling CPU and stopping: lets the daemon drain
/// what the churn queued and the log tail read the last probe records.
const SETTLE: Duration = Duration::from_millis(300);

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Churn time per tracer and round (e.g. 5s, 500ms, 1m).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Rounds; each runs every tracer once, interleaved. Medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Client threads making connections.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Sockets held open in the memory run (conns/2 loopback connections).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(2..=2_000_000))]
    conns: u64,
    /// Skip the memory run.
    #[arg(long)]
    skip_memory: bool,
    /// TIME_WAIT sockets made for the TIME_WAIT memory run (peak RSS while the daemon seeds
    /// them and reconciles with full dumps, against its table's size); 0 skips it.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(0..=4_000_000))]
    timewait_memory: u64,
    /// Skip the TIME_WAIT run (hundreds of thousands of TIME_WAIT sockets, this build
    /// against --baseline).
    #[arg(long)]
    skip_timewait: bool,
    /// Skip the main comparison (untraced, tcpstate, tcpstates, bpftrace).
    #[arg(long)]
    skip_main: bool,
    /// Skip the replay (a capture of the churn pushed through the daemon's userspace with no
    /// kernel: events per second per core for each output configuration).
    #[arg(long)]
    skip_replay: bool,
    /// Only these rows of the main comparison, by slug (untraced always runs), e.g.
    /// `--only floor,tcpstate-default` to iterate on the program's cost quickly.
    #[arg(long, value_delimiter = ',', value_name = "SLUGS")]
    only: Vec<String>,
    /// Extra arguments for this build's tcpstate in every row (experiments).
    #[arg(long, allow_hyphen_values = true, value_name = "ARGS")]
    tcpstate_args: Option<String>,
    /// The previous release, as a git revision, built for the TIME_WAIT run's comparison
    /// (default: the commit before the close-path work, tagged v0.1.0 where tags are kept; a
    /// clone of main alone has no tags).
    #[arg(long, default_value = "490564cdf81a499c4de4e5a6f63fe16852db261f")]
    baseline: String,
    /// Where bench.md and bench.json go [default: <target dir>/bench].
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    if !(0.1..=3600.0).contains(&secs) {
        return Err(format!("{s:?}: must be between 100ms and 1h"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    let started = Instant::now();
    if let Some(unknown) = args
        .only
        .iter()
        .find(|o| !Tracer::ALL.iter().any(|t| t.slug() == o.as_str()))
    {
        let slugs: Vec<&str> = Tracer::ALL.iter().map(|t| t.slug()).collect();
        bail!(
            "--only {unknown}: no such row (one of {})",
            slugs.join(", ")
        );
    }
    let uid = euid();
    if uid != 0 {
        bail!(
            "the bench loads eBPF programs and creates network namespaces, so it needs root \
             (this is uid {uid}): `sudo -E cargo xtask bench`"
        );
    }
    interrupt::install();
    let tools = {
        // setup and build report on stdout; stdout is for the results here.
        let _redirect = StdoutToStderr::new()?;
        tools_for(args)?
    };
    let out = match &args.out {
        Some(out) => out.clone(),
        None => crate::target_dir()?.join("bench"),
    };
    let work = WorkDir::create(out.join(format!("run-{}", std::process::id())))?;

    let _stats = SysctlGuard::set("kernel.bpf_stats_enabled", "1")?;
    let netns = Netns::create()?;
    netns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    let churn = Churn::start(&netns, usize::from(args.threads))?;

    let results = main_rounds(args, &tools, &work.path, &churn)?;
    interrupt::check()?;
    let replay = if args.skip_replay {
        None
    } else {
        Some(replay::run(
            &tools.tcpstate,
            &work.path,
            &churn,
            args.duration,
        )?)
    };
    let server_errors = churn.server_errors();
    let ipv6 = churn.ipv6();
    drop(churn);

    interrupt::check()?;
    let memory = if args.skip_memory {
        None
    } else {
        Some(memory::run(
            &tools.tcpstate,
            &netns,
            &work.path,
            args.conns,
        )?)
    };

    interrupt::check()?;
    let timewait_memory = if args.timewait_memory == 0 {
        None
    } else {
        Some(twmem::run(
            &tools.tcpstate,
            &work.path,
            args.timewait_memory,
        )?)
    };

    interrupt::check()?;
    let timewait = if args.skip_timewait {
        None
    } else {
        Some(timewait::run(
            &tools,
            tools.baseline.is_some().then_some(args.baseline.as_str()),
            &work.path,
            usize::from(args.threads),
            args.duration,
            args.rounds,
        )?)
    };

    let report = Report {
        header: Header {
            date: clock::now_utc_string(),
            nproc: thread::available_parallelism().map_or(0, usize::from),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|r| r.trim().to_owned())
                .unwrap_or_else(|_| "unknown".to_owned()),
            command: command_line(),
            duration_s: args.duration.as_secs_f64(),
            rounds: args.rounds,
            threads: usize::from(args.threads),
            ipv6,
            total_runtime_s: started.elapsed().as_secs_f64(),
        },
        notes: notes(&tools, &results, server_errors),
        floor: (!args.skip_main).then(|| floor_summary(&results)),
        tracers: results,
        memory,
        timewait,
        timewait_memory,
        replay,
    };
    let markdown = report::markdown(&report);
    let json = serde_json::to_string_pretty(&report).context("cannot serialise the report")?;
    for (name, text) in [("bench.md", &markdown), ("bench.json", &json)] {
        let path = out.join(name);
        fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    print!("{markdown}");
    io::stdout().flush().context("cannot write to stdout")?;
    if let Some(warning) = report.floor.as_ref().and_then(|f| f.warning.as_ref()) {
        eprintln!("\nbench: warning: {warning}");
    }
    Ok(())
}

/// Where the committed floor ratio lives; update it with a bench run's figure when a
/// change moves the program's cost on purpose.
const BASELINE_FILE: &str = "xtask/bench-baseline.json";
/// A ratio this much over the baseline is a warning, not a failure: these VMs are noisy.
const REGRESSION_TOLERANCE: f64 = 0.10;

#[derive(serde::Deserialize)]
struct Baseline {
    floor_ratio: f64,
}

fn floor_summary(results: &[TracerResult]) -> FloorSummary {
    let median_of = |t: Tracer| {
        results
            .iter()
            .find(|r| r.name == t.slug())
            .map(|r| &r.median)
    };
    let tcpstate = median_of(Tracer::TcpstateDefault);
    let ratio = tcpstate.and_then(|m| m.floor_ratio);
    let path = crate::cmd::workspace_root().join(BASELINE_FILE);
    let baseline = fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
        .and_then(|text| {
            serde_json::from_str::<Baseline>(&text)
                .map_err(|e| format!("cannot parse {}: {e}", path.display()))
        });
    let (baseline_ratio, warning) = match (baseline, ratio) {
        (Err(e), _) => (None, Some(format!("no baseline to compare with: {e}"))),
        (Ok(b), Some(r)) if r > b.floor_ratio * (1.0 + REGRESSION_TOLERANCE) => (
            Some(b.floor_ratio),
            Some(format!(
                "tcpstate's program costs {r:.2}x the floor, more than {:.0}% over the \
                 baseline {:.2}x ({BASELINE_FILE}): a regression, or this VM's noise (run \
                 again with more --rounds)",
                REGRESSION_TOLERANCE * 100.0,
                b.floor_ratio
            )),
        ),
        (Ok(b), _) => (Some(b.floor_ratio), None),
    };
    FloorSummary {
        tracer: Tracer::TcpstateDefault.label(),
        ns_per_event: tcpstate.and_then(|m| m.bpf_ns_per_event),
        floor_ns_per_event: median_of(Tracer::Floor).and_then(|m| m.bpf_ns_per_event),
        ratio,
        baseline_ratio,
        warning,
    }
}

/// The tracers this run compares, built and installed as needed.
fn tools_for(args: &BenchArgs) -> Result<Tools> {
    let mut tools = prepare_tools()?;
    tools.extra_args = args
        .tcpstate_args
        .as_deref()
        .map(|a| a.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    if !args.skip_timewait {
        tools.baseline = build_baseline(&args.baseline)
            .map_err(|e| eprintln!("bench: no previous-release row: {e:#}"))
            .ok();
    }
    Ok(tools)
}

/// The main comparison: every tracer once per round, interleaved; medians over rounds.
fn main_rounds(
    args: &BenchArgs,
    tools: &Tools,
    dir: &Path,
    churn: &Churn,
) -> Result<Vec<TracerResult>> {
    let mut results: Vec<TracerResult> = Tracer::ALL
        .iter()
        .map(|&t| TracerResult {
            name: t.slug(),
            label: t.label(),
            command: match t {
                Tracer::Floor => Some(format!(
                    "(xtask) {}: r0 = 0; exit, tp_btf/inet_sock_set_state",
                    floor::PROG_NAME
                )),
                _ => t
                    .command(tools, Path::new("<tmp>/tcpstate.jsonl"))
                    .map(|c| match t {
                        Tracer::Tcpstates | Tracer::Bpftrace => {
                            format!("{} > /dev/null", show(&c))
                        }
                        _ => show(&c),
                    }),
            },
            skipped: match t {
                Tracer::Tcpstates if tools.tcpstates.is_none() => {
                    Some("libbpf-tools is not installed".to_owned())
                }
                Tracer::Bpftrace if tools.bpftrace.is_none() => {
                    Some("bpftrace is not installed".to_owned())
                }
                _ if t != Tracer::Untraced
                    && !args.only.is_empty()
                    && !args.only.iter().any(|o| o == t.slug()) =>
                {
                    Some("not in --only".to_owned())
                }
                _ => None,
            },
            rounds: Vec::new(),
            median: Summary::default(),
        })
        .collect();
    let main_rounds = if args.skip_main { 0 } else { args.rounds };
    for round in 1..=main_rounds {
        for (tracer, result) in Tracer::ALL.iter().zip(&mut results) {
            if result.skipped.is_some() {
                continue;
            }
            eprintln!(
                "bench: round {round}/{}: {} for {:?}",
                args.rounds,
                tracer.label(),
                args.duration
            );
            interrupt::check()?;
            let sample = measure(*tracer, round, tools, dir, churn, args.duration)
                .with_context(|| format!("round {round}, {}", tracer.label()))?;
            eprintln!(
                "bench: round {round}/{}: {}: {:.0} conn/s{}{}",
                args.rounds,
                tracer.label(),
                sample.conns_per_s,
                sample
                    .bpf_ns_per_event
                    .map(|ns| format!(", {ns:.0} BPF ns/event"))
                    .unwrap_or_default(),
                sample
                    .cpu_us_per_event
                    .map(|us| format!(", {us:.2} daemon CPU µs/event"))
                    .unwrap_or_default(),
            );
            result.rounds.push(sample);
        }
    }
    let untraced = results[0].rounds.clone();
    let floor: Vec<Sample> = results
        .iter()
        .find(|r| r.name == Tracer::Floor.slug())
        .map(|r| r.rounds.clone())
        .unwrap_or_default();
    for result in &mut results {
        result.summarize(&untraced, &floor);
    }
    Ok(results)
}

fn prepare_tools() -> Result<Tools> {
    let tcpstate = crate::build()?;
    let bpftool = ensure_apt_package("bpftool", "bpftool")?;
    let tcpstates = optional_apt_tool("tcpstates", "libbpf-tools");
    let bpftrace = optional_apt_tool("bpftrace", "bpftrace");
    let stdbuf = which("stdbuf");
    if tcpstates.is_some() && stdbuf.is_none() {
        eprintln!("bench: stdbuf (coreutils) not found; running tcpstates without -oL");
    }
    let tcpstates_reports_lost = tcpstates.as_ref().is_some_and(|path| {
        fs::read(path).is_ok_and(|bin| memchr::memmem::find(&bin, b"lost %llu events").is_some())
    });
    Ok(Tools {
        tcpstate,
        bpftool,
        tcpstates,
        stdbuf,
        bpftrace,
        baseline: None,
        extra_args: Vec::new(),
        tcpstates_reports_lost,
    })
}

/// Builds tcpstate at git revision `rev` (in a worktree of its own, kept under the target
/// directory so a second bench reuses it) and returns its binary.
fn build_baseline(rev: &str) -> Result<PathBuf> {
    let root = crate::cmd::workspace_root();
    let commit = crate::cmd::capture(std::process::Command::new("git").current_dir(root).args([
        "rev-parse",
        "--verify",
        &format!("{rev}^{{commit}}"),
    ]))
    .with_context(|| format!("{rev} is not a revision of this repository"))?;
    let commit = commit.trim().to_owned();
    let dir = crate::target_dir()?.join("bench-baseline").join(&commit);
    let binary = dir.join("tcpstate");
    if binary.is_file() {
        return Ok(binary);
    }
    let src = dir.join("src");
    let _ = fs::remove_dir_all(&src);
    let _ = crate::cmd::capture(
        std::process::Command::new("git")
            .current_dir(root)
            .args(["worktree", "prune"]),
    );
    crate::cmd::capture(std::process::Command::new("git").current_dir(root).args([
        "worktree",
        "add",
        "--detach",
        &src.to_string_lossy(),
        &commit,
    ]))?;
    eprintln!(
        "bench: building the previous release ({rev}, {commit}) in {}",
        src.display()
    );
    let mut cargo = crate::cmd::stable_cargo();
    cargo
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .args(["build", "--release", "--package", "tcpstate"]);
    crate::cmd::run(&mut cargo).context("building the previous release failed")?;
    fs::copy(dir.join("target/release/tcpstate"), &binary)
        .context("cannot copy the previous release's binary")?;
    let _ = crate::cmd::capture(std::process::Command::new("git").current_dir(root).args([
        "worktree",
        "remove",
        "--force",
        &src.to_string_lossy(),
    ]));
    Ok(binary)
}

/// A peer the bench compares against: installed with apt when absent, or
/// skipped with one line saying why.
fn optional_apt_tool(binary: &str, package: &str) -> Option<PathBuf> {
    if which(binary).is_none() && which("apt-get").is_none() {
        eprintln!("bench: skipping {binary}: it is not installed and apt-get is unavailable");
        return None;
    }
    ensure_apt_package(binary, package)
        .map_err(|err| eprintln!("bench: skipping {binary}: {err:#}"))
        .ok()
}

/// One tracer, one round: start it, churn, sample, stop it.
pub(super) fn measure(
    tracer: Tracer,
    round: u32,
    tools: &Tools,
    dir: &Path,
    churn: &Churn,
    duration: Duration,
) -> Result<Sample> {
    if tracer == Tracer::Untraced {
        let load = churn_checked(churn, duration)?;
        return Ok(churn_sample(round, &load));
    }
    if tracer == Tracer::Floor {
        return measure_floor(round, tools, churn, duration);
    }
    let running = tracer::start(tracer, tools, dir, churn)?;
    let (pid, ids) = (running.pid, running.ids());
    let cpu_before = procstat::cpu_seconds(pid)?;
    let bpf_before = bpfstats::totals(&bpfstats::snapshot(&tools.bpftool)?, &ids);
    let tail = if tracer.logs_transitions() {
        Some(LogTail::start(&running.log, PROBE_PORT)?)
    } else {
        None
    };

    let load = churn_checked(churn, duration)?;
    thread::sleep(SETTLE);

    let tailed = tail.map(LogTail::finish).transpose()?;
    let cpu = procstat::cpu_seconds(pid)? - cpu_before;
    let peak_rss_kib = procstat::status_kib(pid, "VmHWM:")?;
    let bpf = bpfstats::totals(&bpfstats::snapshot(&tools.bpftool)?, &ids).since(bpf_before);
    let log = running.log.clone();
    let timewait = matches!(
        tracer,
        Tracer::TcpstateTimewait | Tracer::TcpstateTimewaitReconcile
    )
    .then(|| timewait::scrape_timewait(tracer::TIMEWAIT_METRICS_PORT))
    .flatten();
    let stopped = running.stop(tools)?;
    // At --log-rate 0 the log grows by tens of MB per second.
    let _ = fs::remove_file(&log);

    let mut sample = churn_sample(round, &load);
    let events = bpf.run_cnt;
    let per_event = |total: f64| (events > 0).then(|| total / events as f64);
    sample.bpf_events = Some(events);
    sample.bpf_run_time_ns = Some(bpf.run_time_ns);
    sample.bpf_ns_per_event = per_event(bpf.run_time_ns as f64);
    sample.events_per_s = Some(events as f64 / load.elapsed.as_secs_f64());
    sample.bpf_recursion_misses = Some(bpf.recursion_misses);
    sample.cpu_s = Some(cpu);
    sample.cpu_pct = Some(cpu * 100.0 / load.elapsed.as_secs_f64().max(1e-9));
    sample.cpu_us_per_event = per_event(cpu * 1e6);
    if let Some((bytes, tracked)) = timewait {
        sample.timewait_bytes = Some(bytes);
        sample.timewait_tracked = Some(tracked);
    }
    sample.peak_rss_kib = Some(peak_rss_kib);
    if let Some(record) = &stopped.record {
        let get = |key: &str| record.get(key).and_then(serde_json::Value::as_u64);
        sample.dropped = get("dropped");
        sample.daemon_recursion_misses = get("recursion_misses");
        sample.daemon_events = get("events");
    } else {
        sample.dropped = stopped.lost;
    }
    if let Some(tailed) = tailed {
        let latencies = &tailed.latencies_ms;
        sample.latency_samples = Some(latencies.len());
        sample.latency_p50_ms = percentile(latencies, 50.0);
        sample.latency_p99_ms = percentile(latencies, 99.0);
        sample.log_tail_cpu_s = Some(tailed.cpu_s);
    }
    Ok(sample)
}

/// The floor row: the same window as a tracer's, around xtask's own empty program.
fn measure_floor(round: u32, tools: &Tools, churn: &Churn, duration: Duration) -> Result<Sample> {
    let floor = floor::attach()?;
    let ids = [floor.id];
    tracer::confirm_attached(tools, churn, &ids)?;
    let before = bpfstats::totals(&bpfstats::snapshot(&tools.bpftool)?, &ids);
    let load = churn_checked(churn, duration)?;
    thread::sleep(SETTLE);
    let bpf = bpfstats::totals(&bpfstats::snapshot(&tools.bpftool)?, &ids).since(before);
    drop(floor);
    let mut sample = churn_sample(round, &load);
    sample.bpf_events = Some(bpf.run_cnt);
    sample.bpf_run_time_ns = Some(bpf.run_time_ns);
    sample.bpf_ns_per_event =
        (bpf.run_cnt > 0).then(|| bpf.run_time_ns as f64 / bpf.run_cnt as f64);
    sample.events_per_s = Some(bpf.run_cnt as f64 / load.elapsed.as_secs_f64());
    sample.bpf_recursion_misses = Some(bpf.recursion_misses);
    Ok(sample)
}

fn churn_checked(churn: &Churn, duration: Duration) -> Result<ChurnResult> {
    let load = churn.run(duration)?;
    interrupt::check()?;
    if load.conns == 0 {
        bail!(
            "the churn completed no connection: {}",
            load.first_error.as_deref().unwrap_or("no error reported")
        );
    }
    if load.errors > 0 {
        eprintln!(
            "bench: warning: {} failed connections (first: {})",
            load.errors,
            load.first_error.as_deref().unwrap_or("?")
        );
    }
    Ok(load)
}

fn churn_sample(round: u32, load: &ChurnResult) -> Sample {
    Sample {
        round,
        conns: load.conns,
        elapsed_s: load.elapsed.as_secs_f64(),
        conns_per_s: load.rate(),
        client_errors: load.errors,
        probe_connections: load.probes,
        ..Sample::default()
    }
}

fn notes(tools: &Tools, results: &[TracerResult], server_errors: u64) -> Vec<String> {
    let commands: Vec<String> = results
        .iter()
        .filter_map(|r| Some(format!("{}: `{}`", r.label, r.command.as_ref()?)))
        .collect();
    let mut notes = vec![
        format!("Commands: {}.", commands.join("; ")),
        "vs untraced: median conn/s over the untraced median. Paired: the median over rounds \
         of conn/s over the same round's untraced conn/s, which cancels the drift between \
         rounds (this VM's untraced rate moves by 10-20% from one round to the next)."
            .to_owned(),
        "events/s and BPF ns/event: run_cnt and run_time_ns of the tracer's own tracepoint \
         program(s) in `bpftool prog show --json` (kernel.bpf_stats_enabled=1), from readiness \
         to stop. The tracepoint is global: other TCP activity on the host counts too."
            .to_owned(),
        format!(
            "× floor: the program's ns/event over the floor row's in the same round (an empty \
             tp_btf program on the same tracepoint, loaded by xtask), median over rounds; \
             the ratio cancels most of this VM's drift. A ratio more than {:.0}% over \
             {BASELINE_FILE} prints a warning at the end.",
            REGRESSION_TOLERANCE * 100.0
        ),
        "daemon CPU µs/event: utime+stime of the tracer process over the same window (clock-tick \
         resolution) divided by those events. Peak RSS: VmHWM just before stopping."
            .to_owned(),
        format!(
            "log latency: a probe connection to port {PROBE_PORT} every 50 ms; the log is polled \
             every 5 ms (adds up to 5 ms) and each transition record on that port gives (time \
             read) - \"ts\". Median over rounds of per-round p50/p99; n = records seen in all \
             rounds. The default --log-rate (10000/s when stdout is not a terminal) suppresses \
             most records under churn, probe records included. The tail thread itself used \
             {} s of CPU per round (log_tail_cpu_s in bench.json), part of the load in those \
             rows.",
            tail_cpu_range(results)
        ),
        "The server closes each connection first, so TIME_WAIT stays on the server side and \
         client ports never run out (see xtask/src/bench/churn.rs)."
            .to_owned(),
    ];
    notes.push(if tools.tcpstates_reports_lost {
        "tcpstates ring drops: the sum of its \"lost N events on CPU\" warnings on stderr (none \
         printed = 0)."
            .to_owned()
    } else {
        "tcpstates ring drops: n/a (this build prints no lost-event count).".to_owned()
    });
    notes.push(format!(
        "bpftrace reference: `{}` (an in-kernel count, no event leaves the kernel: the least \
         any tracer of this tracepoint can do; ring drops n/a).",
        tracer::BPFTRACE_PROGRAM
    ));
    let client_errors: u64 = results
        .iter()
        .flat_map(|r| &r.rounds)
        .map(|s| s.client_errors)
        .sum();
    if client_errors > 0 || server_errors > 0 {
        notes.push(format!(
            "Failed connections: {client_errors} on the client side, {server_errors} on the \
             server side (in bench.json per round)."
        ));
    }
    notes
}

/// "0.05-0.17": the log-tail thread's CPU seconds per round, min-max.
fn tail_cpu_range(results: &[TracerResult]) -> String {
    let cpu: Vec<f64> = results
        .iter()
        .flat_map(|r| &r.rounds)
        .filter_map(|s| s.log_tail_cpu_s)
        .collect();
    let min = cpu.iter().copied().reduce(f64::min);
    let max = cpu.iter().copied().reduce(f64::max);
    match min.zip(max) {
        Some((min, max)) => format!("{min:.2}-{max:.2}"),
        None => "n/a".to_owned(),
    }
}

/// "cargo xtask bench --duration 3s ..." as typed (as far as argv tells).
fn command_line() -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .map(|a| {
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                a
            }
        })
        .collect();
    format!("cargo xtask {}", args.join(" "))
}

/// Points fd 1 at stderr until dropped, so that what setup, the build and
/// apt print (on stdout) does not mix with the results on stdout.
struct StdoutToStderr {
    saved: OwnedFd,
}

impl StdoutToStderr {
    fn new() -> Result<Self> {
        io::stdout().flush().context("cannot flush stdout")?;
        // SAFETY: dup/dup2 on the process's standard fds; `saved` takes
        // ownership of the new fd only when dup succeeded.
        unsafe {
            let saved = libc::dup(1);
            if saved < 0 {
                return Err(io::Error::last_os_error()).context("dup(1)");
            }
            let saved = OwnedFd::from_raw_fd(saved);
            if libc::dup2(2, 1) < 0 {
                return Err(io::Error::last_os_error()).context("dup2(2, 1)");
            }
            Ok(Self { saved })
        }
    }
}

impl Drop for StdoutToStderr {
    fn drop(&mut self) {
        let _ = io::stdout().flush();
        // SAFETY: `saved` is an open fd we own; dup2 onto fd 1.
        unsafe { libc::dup2(self.saved.as_raw_fd(), 1) };
    }
}

/// The tracers' logs and outputs for this run; removed on drop.
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn create(path: PathBuf) -> Result<Self> {
        fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}
