//! Counters kept for the life of the daemon: every (old, new) pair, time
//! spent per state, failed connects and resets, anomalies raised. The live
//! gauges (sockets per state, open anomalies) belong to the tables, which
//! keep them exact.

use std::{collections::HashMap, net::IpAddr};

use hdrhistogram::Histogram;

use crate::{socket::Tuple, state::TcpState};

const N: usize = TcpState::COUNT;

/// Remote endpoints tracked individually for failed connects and resets;
/// beyond this they share the `other` bucket, because the network chooses
/// these keys and must not grow our memory.
pub const MAX_ENDPOINTS: usize = 1024;

#[derive(Debug)]
pub struct Stats {
    pub transitions: [[u64; N]; N],
    /// Microseconds spent in each state, recorded when the socket leaves it
    /// and we saw it enter.
    pub durations: Vec<Histogram<u64>>,
    pub failed_connects: u64,
    pub resets: u64,
    pub by_endpoint: HashMap<(IpAddr, u16), EndpointCounts>,
    pub other_endpoints: EndpointCounts,
    pub anomalies_raised: [u64; N],
    /// Failed connects by reason (`refused`, `timed_out`, `unreachable`,
    /// ..., `closed` when the socket had no error: closed before it connected).
    pub connect_failures: std::collections::BTreeMap<&'static str, u64>,
    pub leaks_suspected: u64,
    pub reconciled: u64,
    /// From the retransmit and reset hooks, by the socket's state.
    pub retransmits: [u64; N],
    pub synack_retransmits: u64,
    pub resets_sent: [u64; N],
    pub resets_received: [u64; N],
    /// Packets of tracked sockets dropped, by reason (the kernel's number) and the socket's
    /// state: at most 256 reasons times the states.
    pub drops: std::collections::BTreeMap<(u16, TcpState), u64>,
    /// `bind()` refused with EADDRINUSE: [a fixed port, port 0 (no free port in the range)].
    pub binds_refused: [u64; 2],
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounts {
    pub failed_connects: u64,
    pub resets: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    pub fn new() -> Self {
        // 1 us .. 30 days at 2 significant digits: a few KiB per state.
        let durations = (0..N)
            .map(|_| {
                Histogram::new_with_bounds(1, 30 * 86_400 * 1_000_000, 2)
                    .expect("constant histogram bounds are valid")
            })
            .collect();
        Self {
            transitions: [[0; N]; N],
            durations,
            failed_connects: 0,
            resets: 0,
            by_endpoint: HashMap::new(),
            other_endpoints: EndpointCounts::default(),
            anomalies_raised: [0; N],
            connect_failures: std::collections::BTreeMap::new(),
            leaks_suspected: 0,
            reconciled: 0,
            retransmits: [0; N],
            synack_retransmits: 0,
            resets_sent: [0; N],
            resets_received: [0; N],
            drops: std::collections::BTreeMap::new(),
            binds_refused: [0; 2],
        }
    }

    /// A transition reported; `prev_ns` is the time spent in `old` when we
    /// saw it entered.
    pub fn transition(&mut self, old: TcpState, new: TcpState, prev_ns: Option<u64>) {
        self.transitions[old as usize][new as usize] += 1;
        if let Some(ns) = prev_ns {
            self.record_duration(old, ns);
        }
    }

    /// A full socket really closed, from `old`.
    pub fn closed(&mut self, old: TcpState, t: &Tuple, reason: Option<&'static str>) {
        match old {
            TcpState::SynSent => {
                self.failed_connect(t.daddr(), t.dport);
                let reason = reason.unwrap_or("closed");
                *self.connect_failures.entry(reason).or_default() += 1;
            }
            TcpState::Established | TcpState::CloseWait => self.reset(t.daddr(), t.dport),
            _ => {}
        }
    }

    /// A lingering socket's anomaly (the other rules count their own).
    pub fn raised(&mut self, st: TcpState) {
        self.anomalies_raised[st as usize] += 1;
    }

    pub fn leak(&mut self) {
        self.leaks_suspected += 1;
    }

    pub fn reconciled(&mut self) {
        self.reconciled += 1;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_bounded() {
        let mut a = Stats::new();
        for port in 0..(MAX_ENDPOINTS as u16 + 100) {
            a.failed_connect("10.0.0.1".parse().expect("addr"), port);
        }
        assert_eq!(a.by_endpoint.len(), MAX_ENDPOINTS);
        assert_eq!(a.other_endpoints.failed_connects, 100);
        assert_eq!(a.failed_connects, MAX_ENDPOINTS as u64 + 100);
    }
}
