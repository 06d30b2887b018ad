//! The TIME_WAIT run: the churn in a namespace whose timewait table may hold two million
//! mini-sockets, with IPv4 clients on sixteen loopback addresses so that half a million
//! distinct 4-tuples sit in TIME_WAIT (the server closes first, so each connection leaves
//! one). tcpstate (this build) and the previous release, with the same flags, interleaved with
//! untraced rounds: with default flags (the cost of following TIME_WAIT), and reconciling every
//! 2 s, a dump of every socket in the namespace while the churn runs (the rings must not drop
//! for it).

use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};

use super::churn::{Churn, in_netns};
use super::netns::Netns;
use super::report::{Sample, TracerResult};
use super::tracer::{Tools, Tracer};

/// Untraced churn before the first round, so the namespace holds its TIME_WAIT load.
const WARM_UP: Duration = Duration::from_secs(45);

#[derive(Debug, serde::Serialize)]
pub struct TimewaitResult {
    pub rows: Vec<TracerResult>,
    /// The revision the previous release was built from.
    pub baseline: Option<String>,
}

pub fn run(
    tools: &Tools,
    baseline: Option<&str>,
    dir: &Path,
    threads: usize,
    duration: Duration,
    rounds: u32,
) -> Result<TimewaitResult> {
    let netns = Netns::create_named("bench-tw")?;
    netns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    netns.sysctl("net.ipv4.tcp_max_tw_buckets", "2000000")?;
    let sources: Vec<Ipv4Addr> = (1..=16).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let churn = Churn::start(&netns, threads)?.with_sources(sources);
    eprintln!("bench: TIME_WAIT run: warming up for {WARM_UP:?}");
    churn.run(WARM_UP)?;
    let tracers: Vec<Tracer> = [
        Tracer::Untraced,
        Tracer::TcpstateTimewait,
        Tracer::TcpstateBaseline,
        Tracer::TcpstateTimewaitReconcile,
        Tracer::TcpstateBaselineReconcile,
    ]
    .into_iter()
    .filter(|t| !t.is_baseline() || tools.baseline.is_some())
    .collect();
    let mut rows: Vec<TracerResult> = tracers
        .iter()
        .map(|&t| TracerResult {
            name: t.slug(),
            label: t.label(),
            command: t
                .command(tools, Path::new("<tmp>/tcpstate.jsonl"))
                .map(|c| crate::cmd::show(&c)),
            skipped: None,
            rounds: Vec::new(),
            median: Default::default(),
        })
        .collect();
    for round in 1..=rounds {
        for (&tracer, row) in tracers.iter().zip(&mut rows) {
            super::interrupt::check()?;
            let present = timewait_present(&netns)?;
            eprintln!(
                "bench: TIME_WAIT run, round {round}/{rounds}: {} with {present} TIME_WAIT sockets",
                tracer.label()
            );
            let mut sample: Sample = super::measure(tracer, round, tools, dir, &churn, duration)
                .with_context(|| format!("TIME_WAIT run, round {round}, {}", tracer.label()))?;
            sample.timewait_present = Some(present);
            row.rounds.push(sample);
        }
    }
    let untraced = rows[0].rounds.clone();
    for row in &mut rows {
        row.summarize(&untraced, &[]);
    }
    Ok(TimewaitResult {
        rows,
        baseline: baseline.map(str::to_owned),
    })
}

/// TIME_WAIT mini-sockets in the namespace (`tw` in its /proc/net/sockstat).
fn timewait_present(netns: &Netns) -> Result<u64> {
    let text = in_netns(netns, || {
        fs::read_to_string("/proc/thread-self/net/sockstat").context("cannot read sockstat")
    })?;
    let tw = text
        .lines()
        .find_map(|l| l.strip_prefix("TCP: "))
        .and_then(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "tw")?;
            words.get(at + 1)?.parse().ok()
        })
        .context("no tw count in sockstat")?;
    Ok(tw)
}

/// The daemon's TIME_WAIT table size and entries, from its /metrics.
pub fn scrape_timewait(port: u16) -> Option<(f64, f64)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let value = |prefix: &str| -> Option<f64> {
        body.lines()
            .find_map(|l| l.strip_prefix(prefix))?
            .trim()
            .parse()
            .ok()
    };
    Some((
        value("tcpstate_timewait_bytes ")?,
        value("tcpstate_sockets{state=\"TIME_WAIT\"} ")?,
    ))
}
