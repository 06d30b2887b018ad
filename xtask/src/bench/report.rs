//! Results: per-round samples, medians, and their Markdown / JSON forms.

use std::fmt::Write as _;

use serde::Serialize;

use super::memory::MemoryResult;
use super::timewait::TimewaitResult;
use super::twmem::TwMemResult;

#[derive(Debug, Serialize)]
pub struct Report {
    pub header: Header,
    pub tracers: Vec<TracerResult>,
    pub memory: Option<MemoryResult>,
    pub timewait: Option<TimewaitResult>,
    pub timewait_memory: Option<TwMemResult>,
    pub replay: Option<super::replay::ReplayResult>,
    /// tcpstate's program against the floor row, and against the committed baseline.
    pub floor: Option<FloorSummary>,
    pub notes: Vec<String>,
}

/// "ns/event, floor ns/event, ratio" for tcpstate with defaults: the figure no feature may
/// move unseen.
#[derive(Debug, Serialize)]
pub struct FloorSummary {
    pub tracer: &'static str,
    pub ns_per_event: Option<f64>,
    pub floor_ns_per_event: Option<f64>,
    /// Median over rounds of this round's ns/event over the same round's floor.
    pub ratio: Option<f64>,
    /// The committed figure (`xtask/bench-baseline.json`), when it could be read.
    pub baseline_ratio: Option<f64>,
    /// Set when `ratio` exceeds the baseline by more than the tolerance.
    pub warning: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Header {
    pub date: String,
    pub nproc: usize,
    pub kernel: String,
    pub command: String,
    pub duration_s: f64,
    pub rounds: u32,
    pub threads: usize,
    pub ipv6: bool,
    pub total_runtime_s: f64,
}

/// One tracer in one round.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    pub round: u32,
    pub conns: u64,
    pub elapsed_s: f64,
    pub conns_per_s: f64,
    pub client_errors: u64,
    pub probe_connections: u64,
    /// BPF program runs (transitions seen) between readiness and stop.
    pub bpf_events: Option<u64>,
    pub bpf_run_time_ns: Option<u64>,
    pub bpf_ns_per_event: Option<f64>,
    pub events_per_s: Option<f64>,
    /// From bpftool, over the same window.
    pub bpf_recursion_misses: Option<u64>,
    /// From tcpstate's "stopped" record (whole lifetime).
    pub daemon_recursion_misses: Option<u64>,
    pub daemon_events: Option<u64>,
    /// Ring-buffer drops (tcpstate "dropped"; tcpstates' "lost" warnings).
    pub dropped: Option<u64>,
    pub cpu_s: Option<f64>,
    pub cpu_us_per_event: Option<f64>,
    pub peak_rss_kib: Option<u64>,
    pub latency_samples: Option<usize>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    /// CPU used by the bench's own log-tail thread during the run.
    pub log_tail_cpu_s: Option<f64>,
    /// TIME_WAIT run: mini-sockets in the namespace when the sample started
    /// (/proc/net/sockstat `tw`).
    pub timewait_present: Option<u64>,
    /// TIME_WAIT run, this build: its TIME_WAIT table's heap bytes and
    /// entries (from /metrics just before stopping).
    pub timewait_bytes: Option<f64>,
    pub timewait_tracked: Option<f64>,
    /// Daemon CPU over the sample, in % of one core.
    pub cpu_pct: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub conns_per_s: Option<f64>,
    pub ratio_to_untraced: Option<f64>,
    /// Median over rounds of (this round's rate / the same round's
    /// untraced rate): the pairing is what the interleaving is for, and it
    /// cancels the machine's drift between rounds.
    pub paired_ratio: Option<f64>,
    pub events_per_s: Option<f64>,
    pub bpf_ns_per_event: Option<f64>,
    /// Median over rounds of BPF ns/event over the same round's floor row.
    pub floor_ratio: Option<f64>,
    pub cpu_us_per_event: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    /// Sums over rounds.
    pub dropped: Option<u64>,
    pub recursion_misses: Option<u64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_samples: Option<usize>,
    pub timewait_present: Option<f64>,
    pub bytes_per_timewait: Option<f64>,
    pub cpu_pct: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct TracerResult {
    pub name: &'static str,
    pub label: &'static str,
    pub command: Option<String>,
    pub skipped: Option<String>,
    pub rounds: Vec<Sample>,
    /// Medians over rounds (counts: sums).
    pub median: Summary,
}

fn median(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().flatten().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        f64::midpoint(v[mid - 1], v[mid])
    })
}

fn percent(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "n/a".to_owned(), |r| format!("{:.1} %", r * 100.0))
}

fn sum<T: std::iter::Sum<T>>(values: impl IntoIterator<Item = Option<T>>) -> Option<T> {
    let v: Vec<T> = values.into_iter().flatten().collect();
    if v.is_empty() {
        None
    } else {
        Some(v.into_iter().sum())
    }
}

impl TracerResult {
    /// Fills `median` from `rounds`; `untraced` holds the untraced run's
    /// rounds, `floor` the floor row's (empty where there is none).
    pub fn summarize(&mut self, untraced: &[Sample], floor: &[Sample]) {
        let r = &self.rounds;
        let conns_per_s = median(r.iter().map(|s| Some(s.conns_per_s)));
        let untraced_median = median(untraced.iter().map(|s| Some(s.conns_per_s)));
        let paired = r.iter().map(|s| {
            untraced
                .iter()
                .find(|u| u.round == s.round && u.conns_per_s > 0.0)
                .map(|u| s.conns_per_s / u.conns_per_s)
        });
        self.median = Summary {
            conns_per_s,
            ratio_to_untraced: conns_per_s.zip(untraced_median).map(|(a, b)| a / b),
            paired_ratio: median(paired),
            events_per_s: median(r.iter().map(|s| s.events_per_s)),
            bpf_ns_per_event: median(r.iter().map(|s| s.bpf_ns_per_event)),
            floor_ratio: median(r.iter().map(|s| {
                let f = floor
                    .iter()
                    .find(|f| f.round == s.round)?
                    .bpf_ns_per_event?;
                let ns = s.bpf_ns_per_event?;
                (f > 0.0).then(|| ns / f)
            })),
            cpu_us_per_event: median(r.iter().map(|s| s.cpu_us_per_event)),
            peak_rss_mib: median(r.iter().map(|s| s.peak_rss_kib.map(|k| k as f64 / 1024.0))),
            dropped: sum(r.iter().map(|s| s.dropped)),
            recursion_misses: sum(r.iter().map(|s| {
                match (s.bpf_recursion_misses, s.daemon_recursion_misses) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                }
            })),
            latency_p50_ms: median(r.iter().map(|s| s.latency_p50_ms)),
            latency_p99_ms: median(r.iter().map(|s| s.latency_p99_ms)),
            latency_samples: sum(r.iter().map(|s| s.latency_samples)),
            timewait_present: median(r.iter().map(|s| s.timewait_present.map(|n| n as f64))),
            bytes_per_timewait: median(r.iter().map(|s| {
                let (b, n) = (s.timewait_bytes?, s.timewait_tracked?);
                (n > 0.0).then(|| b / n)
            })),
            cpu_pct: median(r.iter().map(|s| s.cpu_pct)),
        };
    }
}

fn num(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.decimals$}"))
}

fn count<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| v.to_string())
}

pub fn markdown(report: &Report) -> String {
    let h = &report.header;
    let mut md = String::new();
    let _ = writeln!(md, "# tcpstate bench\n");
    let _ = writeln!(
        md,
        "{} · nproc {} · Linux {} · `{}` · total runtime {:.0} s\n",
        h.date, h.nproc, h.kernel, h.command, h.total_runtime_s
    );
    let _ = writeln!(
        md,
        "Churn: {} client threads × connect / write 1 B / read 1 B echo / close for {} s, \
         alternating {}, in a private network namespace. {} round(s), tracers interleaved \
         per round; medians over rounds (drops and recursion misses: sums).\n",
        h.threads,
        h.duration_s,
        if h.ipv6 {
            "127.0.0.1 and [::1]"
        } else {
            "127.0.0.1 (no IPv6)"
        },
        h.rounds
    );
    md.push_str(
        "| tracer | conn/s | vs untraced | vs untraced, paired | events/s | BPF ns/event \
         | × floor | daemon CPU µs/event | peak RSS MiB | ring drops | recursion misses \
         | log latency p50 / p99 ms (n) |\n",
    );
    md.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for t in &report.tracers {
        if let Some(reason) = &t.skipped {
            let _ = writeln!(md, "| {} | skipped: {reason} |||||||||||", t.label);
            continue;
        }
        let m = &t.median;
        let latency = match (m.latency_p50_ms, m.latency_p99_ms) {
            (Some(p50), Some(p99)) => format!(
                "{p50:.1} / {p99:.1} ({})",
                m.latency_samples.unwrap_or_default()
            ),
            _ => "n/a".to_owned(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            t.label,
            num(m.conns_per_s, 0),
            percent(m.ratio_to_untraced),
            percent(m.paired_ratio),
            num(m.events_per_s, 0),
            num(m.bpf_ns_per_event, 0),
            m.floor_ratio
                .map_or_else(|| "n/a".to_owned(), |r| format!("{r:.2}x")),
            num(m.cpu_us_per_event, 2),
            num(m.peak_rss_mib, 1),
            count(m.dropped),
            count(m.recursion_misses),
            latency,
        );
    }
    if let Some(f) = &report.floor {
        let _ = writeln!(md, "\n{}", floor_line(f));
    }
    if !report.notes.is_empty() {
        md.push('\n');
        for note in &report.notes {
            let _ = writeln!(md, "- {note}");
        }
    }
    if let Some(mem) = &report.memory {
        memory_markdown(&mut md, mem);
    }
    if let Some(tw) = &report.timewait {
        timewait_markdown(&mut md, tw);
    }
    if let Some(twm) = &report.timewait_memory {
        md.push_str(&twm.markdown());
    }
    if let Some(r) = &report.replay {
        md.push_str(&r.markdown());
    }
    md
}

/// "tcpstate (default log): 180 ns/event, floor 57 ns/event, ratio 3.16x (baseline 2.00x)".
pub fn floor_line(f: &FloorSummary) -> String {
    format!(
        "**{}: {} ns/event, floor {} ns/event, ratio {}** (baseline {})",
        f.tracer,
        num(f.ns_per_event, 0),
        num(f.floor_ns_per_event, 0),
        f.ratio
            .map_or_else(|| "n/a".to_owned(), |r| format!("{r:.2}x")),
        f.baseline_ratio
            .map_or_else(|| "n/a".to_owned(), |r| format!("{r:.2}x")),
    )
}

fn memory_markdown(md: &mut String, mem: &MemoryResult) {
    let _ = writeln!(md, "\n## Memory\n");
    let _ = writeln!(
        md,
        "`{}` with {} sockets held open ({} loopback connections; both ends \
         ESTABLISHED and tracked; held by {} thread(s) at RLIMIT_NOFILE {}). \
         \"tracked\" settled {:.1} s after the last connect; ring drops {}.\n",
        mem.command,
        mem.sockets_opened,
        mem.connections,
        mem.holder_threads,
        mem.fd_limit,
        mem.settle_s,
        mem.dropped
    );
    md.push_str("| | tracked | table_bytes | VmRSS MiB |\n|---|--:|--:|--:|\n");
    let mib = |kib: u64| kib as f64 / 1024.0;
    let _ = writeln!(
        md,
        "| before | {} | {} | {:.1} |",
        mem.tracked_before,
        mem.table_bytes_before,
        mib(mem.rss_kib_before)
    );
    let _ = writeln!(
        md,
        "| after | {} | {} | {:.1} |",
        mem.tracked_after,
        mem.table_bytes_after,
        mib(mem.rss_kib_after)
    );
    let _ = writeln!(
        md,
        "| per tracked socket | | {:.0} B | {:.0} B |",
        mem.table_bytes_per_socket, mem.rss_bytes_per_socket
    );
}

fn timewait_markdown(md: &mut String, tw: &TimewaitResult) {
    let _ = writeln!(md, "\n## TIME_WAIT run\n");
    let _ = writeln!(
        md,
        "The churn with IPv4 clients on 127.0.0.1-16 in a namespace with \
         `tcp_max_tw_buckets` 2,000,000, warmed up untraced so half a million \
         TIME_WAIT sockets are present; every connection leaves one more (new TIME_WAIT/s = \
         conn/s). The default rows run with default flags; the `--reconcile-interval 2s` rows \
         also dump every socket in the namespace (TIME_WAIT included) every 2 s while the \
         churn runs, which must not cost ring drops. All tcpstate rows serve /metrics. \
         Previous release: {}.\n",
        tw.baseline.as_deref().unwrap_or("not built")
    );
    md.push_str(
        "| tracer | conn/s = new TIME_WAIT/s | vs untraced | paired | TIME_WAIT present \
         | daemon CPU % of a core | daemon CPU µs/event | ring drops | bytes per TIME_WAIT |\n",
    );
    md.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    let percent =
        |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |r| format!("{:.1} %", r * 100.0));
    for t in &tw.rows {
        let m = &t.median;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            t.label,
            num(m.conns_per_s, 0),
            percent(m.ratio_to_untraced),
            percent(m.paired_ratio),
            num(m.timewait_present, 0),
            num(m.cpu_pct, 1),
            num(m.cpu_us_per_event, 2),
            count(m.dropped),
            num(m.bytes_per_timewait, 0),
        );
    }
    let paired = |slug: &str| {
        tw.rows
            .iter()
            .find(|r| r.name == slug)
            .and_then(|r| r.median.paired_ratio)
    };
    if let (Some(now), Some(before)) = (paired("tcpstate-timewait"), paired("tcpstate-baseline")) {
        let _ = writeln!(
            md,
            "\nThis build against the previous release, default flags, paired churn ratio: \
             {:+.1} points.",
            (now - before) * 100.0
        );
    }
}
