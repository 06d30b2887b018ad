//! The compact summary printed on SIGUSR1 and at exit: sockets per state (as `ss -tan` would
//! count them), time in state, transition counts, retransmits and resets (apart: the socket
//! did not change state).

use std::fmt::Write as _;

use crate::{state::TcpState, tracker::Tracker};

pub fn summary(t: &Tracker) -> String {
    let mut s = String::from("sockets by state:");
    for st in TcpState::ALL {
        let n = t.sockets(st);
        if n != 0 {
            let _ = write!(s, " {}={n}", st.name());
        }
    }
    let stats = t.stats();
    s.push_str("\ntime in state (p50 / p99 / max):");
    for st in TcpState::ALL {
        let h = &stats.durations[st as usize];
        if !h.is_empty() {
            let _ = write!(
                s,
                "\n  {:<12} n={:<8} {} / {} / {}",
                st.name(),
                h.len(),
                us(h.value_at_quantile(0.5)),
                us(h.value_at_quantile(0.99)),
                us(h.max())
            );
        }
    }
    let mut pairs: Vec<(u64, TcpState, TcpState)> = TcpState::ALL
        .into_iter()
        .flat_map(|a| TcpState::ALL.into_iter().map(move |b| (a, b)))
        .map(|(a, b)| (stats.transitions[a as usize][b as usize], a, b))
        .filter(|(n, _, _)| *n > 0)
        .collect();
    pairs.sort_by_key(|p| std::cmp::Reverse(p.0));
    s.push_str("\ntransitions:");
    for (n, a, b) in pairs {
        let _ = write!(s, "\n  {:<12} -> {:<12} {n}", a.name(), b.name());
    }
    let by_state = |counts: &[u64; TcpState::COUNT]| {
        let total: u64 = counts.iter().sum();
        let mut s = total.to_string();
        if total != 0 {
            let each: Vec<String> = TcpState::ALL
                .into_iter()
                .filter(|st| counts[*st as usize] != 0)
                .map(|st| format!("{} {}", st.name(), counts[st as usize]))
                .collect();
            let _ = write!(s, " ({})", each.join(", "));
        }
        s
    };
    let _ = write!(
        s,
        "\nretransmits and resets: retransmits {}, SYN-ACK retransmits {}, resets sent {}, resets received {}",
        by_state(&stats.retransmits),
        stats.synack_retransmits,
        by_state(&stats.resets_sent),
        by_state(&stats.resets_received),
    );
    let counts = t.anomaly_counts();
    let raised: u64 = counts.iter().map(|&(_, n, _)| n).sum();
    let open: u64 = counts.iter().map(|&(_, _, n)| n).sum();
    let _ = write!(
        s,
        "\nfailed connects {}, resets {}, anomalies raised {raised} (open {open}), leaks suspected {}, reconciled {}",
        stats.failed_connects, stats.resets, stats.leaks_suspected, stats.reconciled
    );
    s
}

fn us(v: u64) -> String {
    humantime::format_duration(std::time::Duration::from_micros(v)).to_string()
}
