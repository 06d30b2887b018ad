//! Merges the per-CPU rings into one stream in timestamp order.
//!
//! One socket's transitions can run on different CPUs (the close on the
//! application's CPU, the FIN's arrival in softirq on another), so each
//! ring alone is ordered but their concatenation is not. Events are
//! sorted by `ts_ns` (stable, so ties keep ring order) and released only
//! when older than a cutoff: a CPU may still be writing an event that
//! predates ones another CPU already published, and holding the newest
//! millisecond back gives it time to land.

use tcpstate_common::Event;

#[derive(Default)]
pub struct Reorder {
    held: Vec<Event>,
    /// The newest timestamp released so far.
    released_ns: u64,
    /// Events that came after the cutoff had passed them (a CPU stalled between reading the
    /// clock and publishing for longer than the holdback): released, but after newer ones.
    late: u64,
}

impl Reorder {
    /// Takes the freshly drained events; returns every event with
    /// `ts_ns < cutoff_ns`, oldest first, and holds the rest.
    pub fn release(&mut self, fresh: &mut Vec<Event>, cutoff_ns: u64) -> Vec<Event> {
        let released = self.released_ns;
        self.late += fresh.iter().filter(|e| e.ts_ns < released).count() as u64;
        // Moves rather than copies where it can: an event is
        // `size_of::<Event>()` bytes and this runs for every one of them.
        if self.held.is_empty() {
            std::mem::swap(&mut self.held, fresh);
        } else {
            self.held.append(fresh);
        }
        // Runs of already sorted events (one per CPU) make this close to a
        // linear merge.
        self.held.sort_by_key(|e| e.ts_ns);
        let n = self.held.partition_point(|e| e.ts_ns < cutoff_ns);
        let newer = self.held.split_off(n);
        let out = std::mem::replace(&mut self.held, newer);
        if let Some(last) = out.last() {
            self.released_ns = self.released_ns.max(last.ts_ns);
        }
        out
    }

    /// Events released after newer ones, since the start.
    pub fn late(&self) -> u64 {
        self.late
    }

    /// Events waiting for the cutoff to pass them.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::event_at as ev;

    fn keys(v: &[Event]) -> Vec<(u64, u64)> {
        v.iter().map(|e| (e.ts_ns, e.skaddr)).collect()
    }

    #[test]
    fn merges_cpus_by_timestamp_and_holds_the_newest() {
        let mut r = Reorder::default();
        // CPU 0 then CPU 1, each in order, interleaved in time.
        let mut fresh = vec![ev(10, 1), ev(30, 1), ev(50, 1), ev(20, 2), ev(40, 2)];
        let out = r.release(&mut fresh, 45);
        assert!(fresh.is_empty());
        assert_eq!(keys(&out), [(10, 1), (20, 2), (30, 1), (40, 2)]);
        assert_eq!(r.held(), 1);

        // A late event older than the held one is still put before it.
        let mut fresh = vec![ev(48, 2), ev(70, 2)];
        let out = r.release(&mut fresh, 60);
        assert_eq!(keys(&out), [(48, 2), (50, 1)]);
        assert_eq!(r.held(), 1);

        // Shutdown: everything goes.
        let out = r.release(&mut Vec::new(), u64::MAX);
        assert_eq!(keys(&out), [(70, 2)]);
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn an_event_older_than_what_was_released_is_counted_late_not_lost() {
        let mut r = Reorder::default();
        let out = r.release(&mut vec![ev(10, 1), ev(20, 1)], 25);
        assert_eq!(keys(&out), [(10, 1), (20, 1)]);
        let out = r.release(&mut vec![ev(15, 2), ev(30, 1)], 35);
        assert_eq!(keys(&out), [(15, 2), (30, 1)]);
        assert_eq!(r.late(), 1);
    }

    #[test]
    fn equal_timestamps_keep_ring_order() {
        let mut r = Reorder::default();
        let mut fresh = vec![ev(5, 1), ev(5, 2), ev(5, 3)];
        let out = r.release(&mut fresh, 6);
        assert_eq!(keys(&out), [(5, 1), (5, 2), (5, 3)]);
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::fixtures::event_at as ev;

    proptest! {
        /// Per-CPU streams, each in order, drained in random chunks with a
        /// cutoff that only moves forward: everything comes out once, in
        /// timestamp order.
        #[test]
        fn any_interleaving_comes_out_sorted_and_whole(
            gaps in proptest::collection::vec(proptest::collection::vec(0u64..50, 0..60), 1..5),
            takes in proptest::collection::vec(1usize..20, 1..40),
            lag in 0u64..100,
        ) {
            // CPU i's events: increasing timestamps, skaddr tags who wrote it.
            let mut cpus: Vec<Vec<Event>> = gaps
                .iter()
                .enumerate()
                .map(|(cpu, g)| {
                    let mut ts = 0;
                    g.iter()
                        .enumerate()
                        .map(|(i, d)| {
                            ts += d;
                            ev(ts, (cpu as u64) << 32 | i as u64)
                        })
                        .collect()
                })
                .collect();
            let total: usize = cpus.iter().map(Vec::len).sum();
            let mut r = Reorder::default();
            let mut out = Vec::new();
            let mut step = 0;
            while cpus.iter().any(|c| !c.is_empty()) {
                let mut fresh = Vec::new();
                for c in &mut cpus {
                    let n = takes[step % takes.len()].min(c.len());
                    fresh.extend(c.drain(..n));
                    step += 1;
                }
                // Nothing still unwritten is older than the cutoff: the
                // oldest event left anywhere bounds it.
                let oldest = cpus.iter().filter_map(|c| c.first()).map(|e| e.ts_ns).min();
                let cutoff = oldest.map_or(u64::MAX, |o| o.saturating_sub(lag));
                out.extend(r.release(&mut fresh, cutoff));
            }
            out.extend(r.release(&mut Vec::new(), u64::MAX));
            prop_assert_eq!(out.len(), total);
            prop_assert!(out.windows(2).all(|w| w[0].ts_ns <= w[1].ts_ns));
            let mut tags: Vec<u64> = out.iter().map(|e| e.skaddr).collect();
            tags.sort_unstable();
            tags.dedup();
            prop_assert_eq!(tags.len(), total, "nothing duplicated");
        }
    }
}
