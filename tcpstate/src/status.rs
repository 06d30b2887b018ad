//! `tcpstate status`: what an operator wants at 3 a.m., from the running
//! daemon's `/status` endpoint.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::{
    cli::StatusArgs,
    clock::WallClock,
    output::{escape::escape, metrics::Counters, text},
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
    /// The report; `open` are the open anomalies (owners checked by the caller), their
    /// cgroups named through `names`.
    pub fn build(
        tracker: &Tracker,
        c: Counters,
        (open, names): (&[Anomaly], &mut Workloads),
        clock: WallClock,
        uptime_s: f64,
    ) -> Self {
        let agg = tracker.stats();
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
        }
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "tcpstate {} up {}, tracking {} of {} sockets",
            self.version,
            humantime::format_duration(Duration::from_secs(self.uptime_s as u64)),
            self.tracked,
            self.capacity
        );
        let states: Vec<String> = self
            .sockets
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
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
                let states: Vec<String> =
                    w.sockets.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let _ = writeln!(
                    s,
                    "  {:<40} {} anomalies open {}",
                    escape(&w.label()),
                    states.join(" "),
                    w.anomalies_open
                );
            }
        }
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

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let body = fetch(args.addr, "/status").with_context(|| {
        format!(
            "no tcpstate daemon answering on {} (is it running with --metrics-addr {}?)",
            args.addr, args.addr
        )
    })?;
    let text = if args.json {
        body + "\n"
    } else {
        let report: Report =
            serde_json::from_str(&body).context("the daemon's /status is not a status report")?;
        report.to_text()
    };
    crate::write_stdout(text.as_bytes())
}

/// Largest /status answer read: a daemon tracking a million anomalies writes far less; past
/// it the other end is not a tcpstate daemon.
const MAX_RESPONSE: u64 = 256 << 20;

/// GET `path` from the daemon; the body of a 200 answer.
pub fn fetch(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    let n = (&mut s).take(MAX_RESPONSE + 1).read_to_string(&mut resp)?;
    if n as u64 > MAX_RESPONSE {
        bail!(
            "the answer is larger than {} MiB: not a tcpstate daemon",
            MAX_RESPONSE >> 20
        );
    }
    let Some((head, body)) = resp.split_once("\r\n\r\n") else {
        bail!("malformed HTTP response");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{}", escape(head.lines().next().unwrap_or("bad response")));
    }
    Ok(body.to_owned())
}
