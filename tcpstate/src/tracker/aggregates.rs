//! Counts kept for the life of the daemon: sockets per state now, every
//! (old, new) pair, time spent per state, failed connects and resets.

use std::{collections::HashMap, fmt::Write as _, net::IpAddr};

use hdrhistogram::Histogram;

use crate::state::TcpState;

const N: usize = TcpState::COUNT;

/// Remote endpoints tracked individually for failed connects and resets;
/// beyond this they share the `other` bucket, because the network chooses
/// these keys and must not grow our memory.
pub const MAX_ENDPOINTS: usize = 1024;

#[derive(Debug)]
pub struct Aggregates {
    /// Tracked sockets per state now (TIME_WAIT excluded: the kernel's
    /// timewait sockets never fire the tracepoint).
    pub sockets: [i64; N],
    pub transitions: [[u64; N]; N],
    /// Microseconds spent in each state, recorded when the socket leaves it
    /// and we saw it enter.
    pub durations: Vec<Histogram<u64>>,
    pub failed_connects: u64,
    pub resets: u64,
    pub by_endpoint: HashMap<(IpAddr, u16), EndpointCounts>,
    pub other_endpoints: EndpointCounts,
    pub anomalies_raised: [u64; N],
    pub anomalies_open: [i64; N],
    pub leaks_suspected: u64,
    pub reconciled: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounts {
    pub failed_connects: u64,
    pub resets: u64,
}

impl Default for Aggregates {
    fn default() -> Self {
        Self::new()
    }
}

impl Aggregates {
    pub fn new() -> Self {
        // 1 us .. 30 days at 2 significant digits: a few KiB per state.
        let durations = (0..N)
            .map(|_| {
                Histogram::new_with_bounds(1, 30 * 86_400 * 1_000_000, 2)
                    .expect("constant histogram bounds are valid")
            })
            .collect();
        Self {
            sockets: [0; N],
            transitions: [[0; N]; N],
            durations,
            failed_connects: 0,
            resets: 0,
            by_endpoint: HashMap::new(),
            other_endpoints: EndpointCounts::default(),
            anomalies_raised: [0; N],
            anomalies_open: [0; N],
            leaks_suspected: 0,
            reconciled: 0,
        }
    }

    pub fn record_duration(&mut self, st: TcpState, ns: u64) {
        let us = (ns / 1000).max(1);
        self.durations[st as usize].saturating_record(us);
    }

    fn endpoint(&mut self, addr: IpAddr, port: u16) -> &mut EndpointCounts {
        let key = (addr, port);
        if self.by_endpoint.len() >= MAX_ENDPOINTS && !self.by_endpoint.contains_key(&key) {
            return &mut self.other_endpoints;
        }
        self.by_endpoint.entry(key).or_default()
    }

    pub fn failed_connect(&mut self, addr: IpAddr, port: u16) {
        self.failed_connects += 1;
        self.endpoint(addr, port).failed_connects += 1;
    }

    pub fn reset(&mut self, addr: IpAddr, port: u16) {
        self.resets += 1;
        self.endpoint(addr, port).resets += 1;
    }

    /// The compact summary printed on SIGUSR1 and at exit.
    pub fn summary(&self) -> String {
        let mut s = String::from("sockets by state:");
        for st in TcpState::ALL {
            let n = self.sockets[st as usize];
            if n != 0 {
                let _ = write!(s, " {}={n}", st.name());
            }
        }
        s.push_str("\ntime in state (p50 / p99 / max):");
        for st in TcpState::ALL {
            let h = &self.durations[st as usize];
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
            .map(|(a, b)| (self.transitions[a as usize][b as usize], a, b))
            .filter(|(n, _, _)| *n > 0)
            .collect();
        pairs.sort_by_key(|p| std::cmp::Reverse(p.0));
        s.push_str("\ntransitions:");
        for (n, a, b) in pairs {
            let _ = write!(s, "\n  {:<12} -> {:<12} {n}", a.name(), b.name());
        }
        let raised: u64 = self.anomalies_raised.iter().sum();
        let open: i64 = self.anomalies_open.iter().sum();
        let _ = write!(
            s,
            "\nfailed connects {}, resets {}, anomalies raised {raised} (open {open}), leaks suspected {}, reconciled {}",
            self.failed_connects, self.resets, self.leaks_suspected, self.reconciled
        );
        s
    }
}

fn us(v: u64) -> String {
    humantime::format_duration(std::time::Duration::from_micros(v)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_bounded() {
        let mut a = Aggregates::new();
        for port in 0..(MAX_ENDPOINTS as u16 + 100) {
            a.failed_connect("10.0.0.1".parse().expect("addr"), port);
        }
        assert_eq!(a.by_endpoint.len(), MAX_ENDPOINTS);
        assert_eq!(a.other_endpoints.failed_connects, 100);
        assert_eq!(a.failed_connects, MAX_ENDPOINTS as u64 + 100);
    }

    #[test]
    fn summary_mentions_what_happened() {
        let mut a = Aggregates::new();
        a.sockets[TcpState::CloseWait as usize] = 3;
        a.transitions[TcpState::Established as usize][TcpState::CloseWait as usize] = 3;
        a.record_duration(TcpState::Established, 2_000_000);
        let s = a.summary();
        assert!(s.contains("CLOSE_WAIT=3"), "{s}");
        assert!(s.contains("ESTABLISHED  -> CLOSE_WAIT"), "{s}");
        assert!(s.contains("n=1"), "{s}");
    }
}
