//! How far one engine thread goes (issue 19.4): a capture of the churn, taken by
//! `tcpstate run --capture-events`, pushed through `tcpstate replay` with each output
//! configuration, with no kernel. CPU per event, and so events per second per core: what a
//! host's transition rate may be before one daemon's engine is the limit.

use std::{
    fmt::Write as _,
    fs,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{churn::Churn, interrupt, tracer::ChildGuard};
use crate::cmd::show;

/// Replays per configuration; the median is reported (a replay of a few seconds of churn
/// takes a fraction of a second, so single runs are noisy).
const RUNS: usize = 5;

#[derive(serde::Serialize, Debug)]
pub struct ReplayResult {
    pub capture_events: u64,
    pub capture_s: f64,
    pub rows: Vec<ReplayRow>,
}

#[derive(serde::Serialize, Debug)]
pub struct ReplayRow {
    pub label: &'static str,
    pub command: String,
    pub ns_per_event: f64,
    pub events_per_cpu_s: f64,
}

#[derive(serde::Deserialize)]
struct Cost {
    events: u64,
    ns_per_event: f64,
}

pub fn run(tcpstate: &Path, dir: &Path, churn: &Churn, duration: Duration) -> Result<ReplayResult> {
    let capture = dir.join("replay.capture");
    let log = dir.join("replay-capture.jsonl");
    let mut cmd = Command::new(tcpstate);
    cmd.args(["run", "--quiet", "--log-file"])
        .arg(&log)
        .arg("--capture-events")
        .arg(&capture)
        .arg("--control-socket")
        .arg(dir.join("replay.sock"))
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("replay-capture.stderr"))?);
    eprintln!("bench: replay: capturing with {}", show(&cmd));
    let mut child = ChildGuard::spawn(&mut cmd)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fs::read_to_string(&log).is_ok_and(|l| l.contains("\"type\":\"started\"")) {
        interrupt::check()?;
        if child.exited()?.is_some() {
            bail!("tcpstate exited before it was ready (see replay-capture.stderr)");
        }
        if Instant::now() > deadline {
            bail!("tcpstate was not ready within 60 s");
        }
        thread::sleep(Duration::from_millis(50));
    }
    churn.run(duration)?;
    let status = child.terminate()?;
    if !status.success() {
        bail!("the capturing tcpstate exited with {status}");
    }
    let configs: [(&'static str, Vec<String>); 5] = [
        ("anomalies only (--quiet)", vec!["--quiet".into()]),
        (
            "default log (--log-file, 10000 records/s)",
            vec![
                "--quiet".into(),
                "--log-file".into(),
                "<dir>/replay.jsonl".into(),
            ],
        ),
        (
            "every transition logged (--log-rate 0)",
            vec![
                "--quiet".into(),
                "--log-file".into(),
                "<dir>/replay.jsonl".into(),
                "--log-rate".into(),
                "0".into(),
            ],
        ),
        ("JSON on stdout", vec!["--format".into(), "json".into()]),
        ("text on stdout", vec!["--format".into(), "text".into()]),
    ];
    let mut rows = Vec::new();
    let mut events = 0;
    for (label, args) in configs {
        let mut costs = Vec::new();
        let mut shown = String::new();
        for _ in 0..RUNS {
            interrupt::check()?;
            let out_log = dir.join("replay.jsonl");
            let _ = fs::remove_file(&out_log);
            let mut cmd = Command::new(tcpstate);
            cmd.arg("replay").arg(&capture);
            for a in &args {
                match a.as_str() {
                    "<dir>/replay.jsonl" => cmd.arg(&out_log),
                    a => cmd.arg(a),
                };
            }
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
            shown = show(&cmd);
            let out = cmd
                .output()
                .with_context(|| format!("cannot run `{shown}`"))?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() {
                bail!("`{shown}` failed: {}", stderr.trim());
            }
            let line = stderr.lines().last().unwrap_or_default();
            let cost: Cost = serde_json::from_str(line)
                .with_context(|| format!("`{shown}` printed no cost line: {line}"))?;
            events = cost.events;
            costs.push(cost.ns_per_event);
        }
        costs.sort_by(f64::total_cmp);
        let ns = costs[costs.len() / 2];
        rows.push(ReplayRow {
            label,
            command: shown.replace(&dir.display().to_string(), "<tmp>"),
            ns_per_event: ns,
            events_per_cpu_s: 1e9 / ns.max(1e-9),
        });
    }
    let _ = fs::remove_file(&capture);
    Ok(ReplayResult {
        capture_events: events,
        capture_s: duration.as_secs_f64(),
        rows,
    })
}

impl ReplayResult {
    pub fn markdown(&self) -> String {
        let mut md = format!(
            "\n## How far one engine thread goes (replay, no kernel)\n\n\
             {} events captured from {:.0} s of the churn above (`tcpstate run \
             --capture-events`), replayed by `tcpstate replay` through merge, decode, tracker \
             and outputs as fast as they take them; CPU of the whole process (the log writer's \
             thread included), median of {RUNS} replays. Not replayed: sock_diag answers \
             (seed, reconciliation, owner checks) and cgroup names.\n\n\
             | outputs | ns/event | events/s per core |\n|---|--:|--:|\n",
            self.capture_events, self.capture_s
        );
        for r in &self.rows {
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.2} M |",
                r.label,
                r.ns_per_event,
                r.events_per_cpu_s / 1e6
            );
        }
        md.push_str("\nCommands:\n");
        for r in &self.rows {
            let _ = writeln!(md, "- {}: `{}`", r.label, r.command);
        }
        md
    }
}
