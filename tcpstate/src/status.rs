//! `tcpstate status`: what an operator wants at 3 a.m., from the running
//! daemon's `/status` endpoint.

pub mod destinations;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::{
    cli::StatusArgs,
    clock::WallClock,
    output::{
        escape::{escape, escape_controls},
        metrics::Counters,
        text,
    },
    record::{AnomalyRecord, Record},
    tracker::{Anomaly, Tracker, cgroups::CLOSING},
    workload::{Workloads, top},
};

/// `/sockets?state=STATE`: the tracked sockets in one state and how long each has been in
/// it (what `tcpstate kill --older-than` needs), and where the daemon logs.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SocketList {
    pub log_file: Option<std::path::PathBuf>,
    pub sockets: Vec<AgedSocket>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct AgedSocket {
    pub netns: u32,
    pub saddr: std::net::IpAddr,
    pub sport: u16,
    pub daddr: std::net::IpAddr,
    pub dport: u16,
    pub age_ms: f64,
    /// The socket predates the daemon: it is at least this old.
    pub age_is_lower_bound: bool,
}

impl SocketList {
    pub fn build(
        tracker: &Tracker,
        st: crate::state::TcpState,
        now_ns: u64,
        log_file: Option<std::path::PathBuf>,
    ) -> Self {
        let sockets = tracker
            .sockets_in(st)
            .into_iter()
            .map(|(netns, t, since, lower)| AgedSocket {
                netns,
                saddr: t.saddr(),
                sport: t.sport,
                daddr: t.daddr(),
                dport: t.dport,
                age_ms: now_ns.saturating_sub(since) as f64 / 1e6,
                age_is_lower_bound: lower,
            })
            .collect();
        Self { log_file, sockets }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TopOwner {
    pub pid: u32,
    pub comm: String,
    pub state: String,
    pub count: u64,
}

/// A workload's closing sockets and open anomalies (`unit` "other": the rest summed).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TopWorkload {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unit: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_uid: String,
    /// Sockets per closing state (states with none left out).
    pub sockets: BTreeMap<String, u32>,
    pub anomalies_open: u32,
}

/// How many workloads `status` lists.
const STATUS_WORKLOADS: usize = 10;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Report {
    pub version: String,
    pub uptime_s: f64,
    pub sockets: BTreeMap<String, i64>,
    /// Oldest first.
    pub open_anomalies: Vec<AnomalyRecord>,
    pub top_owners: Vec<TopOwner>,
    /// Closing sockets and open anomalies by unit, container and pod, most first.
    #[serde(default)]
    pub top_workloads: Vec<TopWorkload>,
    /// Sockets in SYN_SENT or a closing state by destination and holder, most first.
    #[serde(default)]
    pub top_destinations: Vec<destinations::TopDestination>,
    #[serde(default)]
    pub destinations: destinations::DestinationTotals,
    /// The current ages of the sockets in SYN_SENT and each closing state.
    #[serde(default)]
    pub socket_ages: Vec<destinations::AgeHistogram>,
    pub tracked: u64,
    pub capacity: u64,
    pub refused: u64,
    /// Heap bytes of the socket table and its deadline heap.
    #[serde(default)]
    pub table_bytes: u64,
    pub events: u64,
    pub dropped: u64,
    pub recursion_misses: u64,
    pub failed_connects: u64,
    pub resets: u64,
    /// TIME_WAIT mini-sockets not tracked (their table was full).
    #[serde(default)]
    pub timewait_refused: u64,
    /// Records the log could not write.
    #[serde(default)]
    pub log_dropped: u64,
    /// Records stdout's reader did not take in time.
    #[serde(default)]
    pub stdout_dropped: u64,
    /// Each optional capability, on or off with the reason.
    #[serde(default)]
    pub features: Vec<crate::features::Feature>,
    /// kernel.bpf_stats_enabled: whether the kernel counts what tcpstate's programs cost
    /// (None: unknown).
    #[serde(default)]
    pub bpf_stats_enabled: Option<bool>,
    /// Each program's runs and time since load, while bpf_stats is on.
    #[serde(default)]
    pub bpf_programs: Vec<BpfProgram>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct BpfProgram {
    pub program: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

impl Report {
    /// The programs' costs; the per-program figures only while the kernel counts them.
    pub fn set_bpf(&mut self, costs: &crate::program::BpfCosts) {
        self.bpf_stats_enabled = costs.stats_enabled;
        self.bpf_programs = if costs.stats_enabled == Some(true) {
            costs
                .programs
                .iter()
                .map(|p| BpfProgram {
                    program: p.program.to_owned(),
                    run_cnt: p.run_cnt,
                    run_time_ns: p.run_time_ns,
                })
                .collect()
        } else {
            Vec::new()
        };
    }
}

impl TopWorkload {
    /// The pod and container, else the unit; the sockets of neither are "unattributed".
    pub fn label(&self) -> String {
        fn given(s: &str) -> Option<&str> {
            (!s.is_empty()).then_some(s)
        }
        crate::workload::label(
            given(&self.unit),
            given(&self.container_id),
            given(&self.pod_uid),
        )
        .unwrap_or_else(|| "(no unit or container)".to_owned())
    }
}

impl Report {
    /// The report as of `now_ns`; `open` are the open anomalies (owners checked by the
    /// caller), their cgroups named through `names`.
    pub fn build(
        tracker: &Tracker,
        c: Counters,
        (open, names): (&[Anomaly], &mut Workloads),
        (clock, now_ns): (WallClock, u64),
        uptime_s: f64,
    ) -> Self {
        let agg = tracker.stats();
        let (top_destinations, destinations) = destinations::top(tracker, names, now_ns);
        Self {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_s,
            sockets: crate::state::TcpState::ALL
                .into_iter()
                .filter(|&s| s != crate::state::TcpState::Close && tracker.sockets(s) != 0)
                .map(|s| (s.name().to_owned(), tracker.sockets(s) as i64))
                .collect(),
            open_anomalies: open
                .iter()
                .map(|a| {
                    let mut r = AnomalyRecord::new(a, None, clock);
                    r.workload = names.get(a.cgroup);
                    r
                })
                .collect(),
            top_workloads: top::top_of(tracker.by_cgroup(), names, STATUS_WORKLOADS)
                .into_iter()
                .map(|(l, c)| TopWorkload {
                    unit: l.unit,
                    container_id: l.container_id,
                    pod_uid: l.pod_uid,
                    sockets: CLOSING
                        .iter()
                        .zip(c.closing)
                        .filter(|&(_, n)| n > 0)
                        .map(|(s, n)| (s.name().to_owned(), n))
                        .collect(),
                    anomalies_open: c.anomalies_open,
                })
                .collect(),
            top_destinations,
            destinations,
            socket_ages: destinations::ages(tracker, now_ns),
            top_owners: tracker
                .top_owners(10)
                .into_iter()
                .map(|(task, st, count)| TopOwner {
                    pid: task.pid,
                    comm: task.comm.as_str().into_owned(),
                    state: st.name().to_owned(),
                    count,
                })
                .collect(),
            tracked: tracker.tracked() as u64,
            capacity: tracker.capacity() as u64,
            refused: tracker.refused(),
            table_bytes: tracker.bytes() as u64,
            events: c.events,
            dropped: c.dropped,
            recursion_misses: c.recursion_misses,
            failed_connects: agg.failed_connects,
            resets: agg.resets,
            timewait_refused: tracker.timewait_refused(),
            log_dropped: c.log_dropped,
            stdout_dropped: c.stdout_dropped,
            features: Vec::new(),
            bpf_stats_enabled: None,
            bpf_programs: Vec::new(),
        }
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "tcpstate {} up {}, tracking {} of {} sockets",
            escape(&self.version),
            humantime::format_duration(Duration::from_secs(self.uptime_s as u64)),
            self.tracked,
            self.capacity
        );
        let states: Vec<String> = self
            .sockets
            .iter()
            .map(|(k, v)| format!("{}={v}", escape(k)))
            .collect();
        let _ = writeln!(s, "sockets: {}", states.join(" "));
        let _ = writeln!(
            s,
            "lost: {} dropped (ring buffer full), {} recursion misses, {} not tracked (table full)",
            self.dropped, self.recursion_misses, self.refused
        );
        let _ = writeln!(
            s,
            "failed connects {}, resets {}",
            self.failed_connects, self.resets
        );
        match self.bpf_stats_enabled {
            Some(true) => {
                let programs: Vec<String> = self
                    .bpf_programs
                    .iter()
                    .map(|p| {
                        let per_run = p
                            .run_time_ns
                            .checked_div(p.run_cnt)
                            .map_or_else(|| "not run".to_owned(), |ns| format!("{ns} ns/run"));
                        format!("{} {per_run} ({} runs)", escape(&p.program), p.run_cnt)
                    })
                    .collect();
                let _ = writeln!(
                    s,
                    "bpf_stats: on (tcpstate_bpf_* on /metrics): {}",
                    programs.join(", ")
                );
            }
            Some(false) => s.push_str(
                "bpf_stats: off (sysctl -w kernel.bpf_stats_enabled=1 to measure what tcpstate's programs cost)\n",
            ),
            None => {}
        }
        let off: Vec<&crate::features::Feature> = self.features.iter().filter(|f| !f.on).collect();
        if off.is_empty() {
            if !self.features.is_empty() {
                s.push_str("features: all on\n");
            }
        } else {
            s.push_str("features off:\n");
            for f in off {
                let _ = writeln!(
                    s,
                    "  {}: {}",
                    escape(&f.name),
                    escape(f.why_off.as_deref().unwrap_or("no reason given"))
                );
            }
        }
        if self.open_anomalies.is_empty() {
            s.push_str("open anomalies: none\n");
        } else {
            let _ = writeln!(
                s,
                "open anomalies ({}), oldest first:",
                self.open_anomalies.len()
            );
            for a in &self.open_anomalies {
                text::write_record(&mut s, &Record::Anomaly(a.clone()), false);
            }
        }
        if !self.top_workloads.is_empty() {
            s.push_str("closing sockets by unit / container:\n");
            for w in &self.top_workloads {
                let states: Vec<String> = w
                    .sockets
                    .iter()
                    .map(|(k, v)| format!("{}={v}", escape(k)))
                    .collect();
                let _ = writeln!(
                    s,
                    "  {:<40} {} anomalies open {}",
                    escape(&w.label()),
                    states.join(" "),
                    w.anomalies_open
                );
            }
        }
        destinations::write_text(
            &mut s,
            &self.top_destinations,
            &self.destinations,
            &self.socket_ages,
        );
        if !self.top_owners.is_empty() {
            s.push_str("top owners of lingering sockets:\n");
            for o in &self.top_owners {
                let _ = writeln!(
                    s,
                    "  pid {:<7} {:<16} {:<11} {}",
                    o.pid,
                    escape(&o.comm),
                    escape(&o.state),
                    o.count
                );
            }
        }
        s
    }
}

// Whatever answers on --addr is trusted for nothing: it may be another program, or a local
// user's listener on a port the daemon left free. What it says is printed escaped (text) or
// checked and neutralised (JSON), and it gets one deadline for the whole answer.

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let body = fetch(args.addr, "/status").with_context(|| {
        format!(
            "no tcpstate daemon answering on {} (is it running with --metrics-addr {}?)",
            args.addr, args.addr
        )
    })?;
    let text = if args.json {
        safe_json(&body).context("the daemon's /status is not JSON")?
    } else {
        let report: Report =
            serde_json::from_str(&body).context("the daemon's /status is not a status report")?;
        // Every field is escaped where it is written; this pass keeps a field added later
        // from reaching the terminal raw.
        let mut text = String::new();
        for line in report.to_text().lines() {
            text.push_str(&escape_controls(line));
            text.push('\n');
        }
        text
    };
    crate::write_stdout(text.as_bytes())
}

/// `body`, which must be one JSON document, made safe for a terminal with its meaning kept.
/// Valid JSON holds no raw C0 control but whitespace; DEL and the C1 controls (U+0080 to
/// U+009F, which some terminals obey as escape sequences) may stand raw inside its strings,
/// and become `\u` escapes, which a JSON reader decodes to the same string. A carriage
/// return, only ever whitespace between tokens, becomes a space.
fn safe_json(body: &str) -> anyhow::Result<String> {
    serde_json::from_str::<serde::de::IgnoredAny>(body)?;
    let mut out = String::with_capacity(body.len() + 1);
    for c in body.trim_end().chars() {
        match c {
            '\r' => out.push(' '),
            '\x7f'..='\u{9f}' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('\n');
    Ok(out)
}

/// Largest /status answer read: a daemon tracking a million anomalies writes far less; past
/// it the other end is not a tcpstate daemon.
const MAX_RESPONSE: usize = 256 << 20;

/// Longest a whole request may take, connect to last byte. A per-read timeout alone lets a
/// peer that sends a byte now and then hold the command for ever; the daemon answers from
/// memory in milliseconds, and a list of a million sockets in well under this.
const DEADLINE: Duration = Duration::from_secs(10);

/// GET `path` from the daemon; the body of a 200 answer.
pub fn fetch(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    fetch_within(addr, path, DEADLINE)
}

/// GET `path` from the daemon on its control socket, once the kernel has said it runs as
/// root (see [`crate::control`]); the body of a 200 answer.
pub fn fetch_control(socket: &std::path::Path, path: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + DEADLINE;
    let s = crate::control::connect(socket)?;
    exchange(s, "localhost", path, deadline, DEADLINE)
}

fn fetch_within(addr: std::net::SocketAddr, path: &str, limit: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + limit;
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2).min(limit))?;
    exchange(s, &addr.to_string(), path, deadline, limit)
}

/// A stream whose reads and writes can be given timeouts (TCP or Unix).
trait Timed: std::io::Read + std::io::Write {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()>;
}

impl Timed for TcpStream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl Timed for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

/// One request and its whole answer, all by `deadline` (`limit` is how it is said).
fn exchange(
    mut s: impl Timed,
    host: &str,
    path: &str,
    deadline: Instant,
    limit: Duration,
) -> anyhow::Result<String> {
    let timed_out = || {
        anyhow!(
            "no whole answer within {}",
            humantime::format_duration(limit)
        )
    };
    // Never None: a None timeout would block for ever.
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    };
    s.set_timeouts(left().ok_or_else(timed_out)?)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        s.set_timeouts(left().ok_or_else(timed_out)?)?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => resp.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out());
            }
            Err(e) => return Err(e.into()),
        }
        if resp.len() > MAX_RESPONSE {
            bail!(
                "the answer is larger than {} MiB: not a tcpstate daemon",
                MAX_RESPONSE >> 20
            );
        }
    }
    let resp = String::from_utf8(resp).map_err(|_| anyhow!("the answer is not UTF-8 text"))?;
    let Some((head, body)) = resp.split_once("\r\n\r\n") else {
        bail!("malformed HTTP response");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{}", escape(head.lines().next().unwrap_or("bad response")));
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        net::TcpListener,
    };

    use super::*;

    /// A fake endpoint on loopback: reads one request, then `answer` writes on the stream.
    fn serve(answer: impl FnOnce(&mut TcpStream) + Send + 'static) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
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

    fn report(version: &str, state: &str) -> Report {
        Report {
            version: version.into(),
            uptime_s: 1.0,
            sockets: [(state.to_owned(), 1)].into(),
            open_anomalies: Vec::new(),
            top_owners: Vec::new(),
            top_destinations: Vec::new(),
            destinations: destinations::DestinationTotals::default(),
            socket_ages: Vec::new(),
            top_workloads: vec![TopWorkload {
                unit: "x.service".into(),
                container_id: String::new(),
                pod_uid: String::new(),
                sockets: [(state.to_owned(), 2)].into(),
                anomalies_open: 0,
            }],
            tracked: 1,
            capacity: 1,
            refused: 0,
            table_bytes: 0,
            events: 0,
            dropped: 0,
            recursion_misses: 0,
            failed_connects: 0,
            resets: 0,
            timewait_refused: 0,
            log_dropped: 0,
            stdout_dropped: 0,
            features: Vec::new(),
            bpf_stats_enabled: None,
            bpf_programs: Vec::new(),
        }
    }

    #[test]
    fn the_text_report_escapes_what_the_endpoint_chose() {
        let text = report("1.0\x1b]0;owned\x07", "CLOSE_WAIT\x1b[2J").to_text();
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        assert!(
            text.starts_with("tcpstate 1.0\\e]0;owned\\x07 up"),
            "{text:?}"
        );
        assert!(text.contains("sockets: CLOSE_WAIT\\e[2J=1"), "{text:?}");
        assert!(text.contains("CLOSE_WAIT\\e[2J=2"), "{text:?}");
    }

    #[test]
    fn json_is_checked_and_made_terminal_safe() {
        assert!(safe_json("not json").is_err());
        assert!(safe_json("{\"a\": 1} trailing").is_err());
        // A raw ESC inside a string is not JSON.
        assert!(safe_json("{\"v\": \"\x1b[31m\"}").is_err());
        let out = safe_json("{\"v\": \"a\u{9b}b\x7f\"}\r\n").expect("valid JSON");
        assert_eq!(out, "{\"v\": \"a\\u009bb\\u007f\"}\n");
        let back: serde_json::Value = serde_json::from_str(&out).expect("still JSON");
        assert_eq!(back["v"], "a\u{9b}b\x7f");
    }

    #[test]
    fn a_dribbling_endpoint_meets_one_deadline() {
        let addr = serve(|s| {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n");
            for _ in 0..30 {
                std::thread::sleep(Duration::from_millis(100));
                if s.write_all(b" ").is_err() {
                    return;
                }
            }
        });
        let t = Instant::now();
        let e = fetch_within(addr, "/status", Duration::from_secs(1)).expect_err("too slow");
        assert!(e.to_string().contains("no whole answer within 1s"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn a_prompt_endpoint_is_read_whole() {
        let addr = serve(|s| {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
        });
        assert_eq!(fetch(addr, "/status").expect("answer"), "{}");
    }
}
