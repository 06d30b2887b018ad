//! Per-program run statistics from `bpftool prog show --json` (counted while
//! kernel.bpf_stats_enabled=1).

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result};
use serde::Deserialize;

use crate::cmd::capture;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Prog {
    pub id: u32,
    #[serde(rename = "type")]
    pub prog_type: String,
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
    /// Only present when nonzero.
    pub recursion_misses: u64,
}

/// Summed over a tracer's programs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals {
    pub run_time_ns: u64,
    pub run_cnt: u64,
    pub recursion_misses: u64,
}

impl Totals {
    pub fn since(self, earlier: Self) -> Self {
        Self {
            run_time_ns: self.run_time_ns.saturating_sub(earlier.run_time_ns),
            run_cnt: self.run_cnt.saturating_sub(earlier.run_cnt),
            recursion_misses: self
                .recursion_misses
                .saturating_sub(earlier.recursion_misses),
        }
    }
}

pub fn snapshot(bpftool: &Path) -> Result<Vec<Prog>> {
    let json = capture(Command::new(bpftool).args(["prog", "show", "--json"]))?;
    serde_json::from_str(&json).context("cannot parse `bpftool prog show --json`")
}

pub fn totals(progs: &[Prog], ids: &[u32]) -> Totals {
    progs
        .iter()
        .filter(|p| ids.contains(&p.id))
        .fold(Totals::default(), |acc, p| Totals {
            run_time_ns: acc.run_time_ns + p.run_time_ns,
            run_cnt: acc.run_cnt + p.run_cnt,
            recursion_misses: acc.recursion_misses + p.recursion_misses,
        })
}

/// Tracepoint programs (classic, raw or BTF: bpftool calls the last
/// "tracing") in `after` but not in `before`. Other processes may
/// load some meanwhile (e.g. a concurrent test run), so callers narrow this
/// down to the programs the tracer holds (`procstat::bpf_prog_ids`).
pub fn fresh_tracepoint_progs(before: &[Prog], after: &[Prog]) -> Vec<Prog> {
    after
        .iter()
        .filter(|p| {
            matches!(
                p.prog_type.as_str(),
                "tracepoint" | "raw_tracepoint" | "tracing"
            ) && !before.iter().any(|b| b.id == p.id)
        })
        .cloned()
        .collect()
}
