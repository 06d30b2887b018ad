//! What /proc says about a tracer process: CPU time, memory, BPF programs.

use std::fs;

use anyhow::{Context as _, Result};

/// utime + stime of all the process's threads, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // Fields after "(comm)", which may itself contain spaces: field 3 (state)
    // is index 0, so utime (14) and stime (15) are indexes 11 and 12.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("{path} has no \"(comm)\""))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |idx: usize| -> Result<u64> {
        fields
            .get(idx)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: no field {}", idx + 3))
    };
    let ticks = field(11)? + field(12)?;
    Ok(ticks as f64 / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// A "Vm…:" line of /proc/PID/status (e.g. "VmHWM:"), in KiB.
pub fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .with_context(|| format!("{path} has no parsable {key} line"))
}

/// Ids of the BPF programs the process holds open (program and link fds
/// both show "prog_id:" in their fdinfo). Unreadable fds are skipped: they
/// may close while we look.
pub fn bpf_prog_ids(pid: u32) -> Result<Vec<u32>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
        let Ok(entry) = entry else { continue };
        let Ok(info) = fs::read_to_string(entry.path()) else {
            continue;
        };
        if let Some(id) = info
            .lines()
            .find_map(|line| line.strip_prefix("prog_id:"))
            .and_then(|id| id.trim().parse().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}
