//! How old the live sockets in each state counted per destination are now: a distribution,
//! computed when asked (a scrape, the status page) from the tables, so the event path pays
//! nothing. A pile-up at one age is a timeout (envoy's FIN_WAIT2 sockets that all close
//! after exactly 1 h, its idle timeout), which no count and no mean shows.

use super::{Tracker, destinations::STATES};
use crate::state::TcpState;

/// Upper bounds (seconds) of the age buckets: up to 4 h, so the 1 h and 2 h timeouts show.
pub const BUCKETS: [f64; 11] = [
    1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0,
];

/// The current ages of the sockets in one state.
#[derive(Clone, Debug, PartialEq)]
pub struct Ages {
    pub state: TcpState,
    /// Sockets per bucket of [`BUCKETS`] (not cumulative); the last, past them all.
    pub counts: [u64; BUCKETS.len() + 1],
    pub sum_s: f64,
    /// Sockets that predate the daemon: their age is at least what is counted.
    pub lower_bound: u64,
}

impl Ages {
    fn new(state: TcpState) -> Self {
        Self {
            state,
            counts: [0; BUCKETS.len() + 1],
            sum_s: 0.0,
            lower_bound: 0,
        }
    }

    fn add(&mut self, age_ns: u64, lower_bound: bool) {
        let s = age_ns as f64 / 1e9;
        let i = BUCKETS
            .iter()
            .position(|&le| s <= le)
            .unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum_s += s;
        self.lower_bound += u64::from(lower_bound);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// (upper bound, sockets in the bucket it closes), not cumulative: prometheus-client
    /// sums them into a histogram's `le` buckets itself. The last is `+Inf`, which it does
    /// not add.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.counts)
            .collect()
    }
}

impl Tracker {
    /// The ages of the live sockets in each of [`STATES`] at `now_ns`, every state listed.
    /// A walk of both tables: call at a scrape, never per event.
    pub fn ages(&self, now_ns: u64) -> Vec<Ages> {
        let mut v: Vec<Ages> = STATES.iter().map(|&s| Ages::new(s)).collect();
        let slot = |st: TcpState| STATES.iter().position(|&s| s == st);
        for (_, e) in self.table.iter() {
            if let Some(i) = slot(e.state) {
                let lower = e.has(super::table::flag::SEEDED);
                v[i].add(now_ns.saturating_sub(e.since_ns), lower);
            }
        }
        if let Some(i) = slot(TcpState::TimeWait) {
            for s in self.timewait.iter() {
                v[i].add(now_ns.saturating_sub(s.since_ns), s.estimated);
            }
        }
        v
    }
}
