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
    output::{metrics::Counters, text},
    record::{AnomalyRecord, Record},
    tracker::Tracker,
};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TopOwner {
    pub pid: u32,
    pub comm: String,
    pub state: String,
    pub count: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Report {
    pub version: String,
    pub uptime_s: f64,
    pub sockets: BTreeMap<String, i64>,
    /// Oldest first.
    pub open_anomalies: Vec<AnomalyRecord>,
    pub top_owners: Vec<TopOwner>,
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
}

impl Report {
    pub fn build(tracker: &Tracker, c: Counters, now_ns: u64, uptime_s: f64) -> Self {
        let agg = &tracker.agg;
        Self {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_s,
            sockets: crate::state::TcpState::ALL
                .into_iter()
                .filter(|s| agg.sockets[*s as usize] != 0)
                .map(|s| (s.name().to_owned(), agg.sockets[s as usize]))
                .collect(),
            open_anomalies: tracker
                .open_anomalies()
                .iter()
                .map(|a| tracker.describe(a, now_ns))
                .collect(),
            top_owners: tracker
                .top_owners(10)
                .into_iter()
                .map(|(pid, comm, st, count)| TopOwner {
                    pid,
                    comm: comm.as_str().into_owned(),
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
        if !self.top_owners.is_empty() {
            s.push_str("top owners of lingering sockets:\n");
            for o in &self.top_owners {
                let _ = writeln!(
                    s,
                    "  pid {:<7} {:<16} {:<11} {}",
                    o.pid, o.comm, o.state, o.count
                );
            }
        }
        s
    }
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let body = fetch(args.addr).with_context(|| {
        format!(
            "no tcpstate daemon answering on {} (is it running with --metrics-addr {}?)",
            args.addr, args.addr
        )
    })?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let report: Report =
        serde_json::from_str(&body).context("the daemon's /status is not a status report")?;
    print!("{}", report.to_text());
    Ok(())
}

fn fetch(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let Some((head, body)) = resp.split_once("\r\n\r\n") else {
        bail!("malformed HTTP response");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{}", head.lines().next().unwrap_or("bad response"));
    }
    Ok(body.to_owned())
}
