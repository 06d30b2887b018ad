//! When each tracked socket's time in its state runs out.
//!
//! A min-heap with lazy deletion: a state change does not search the heap,
//! it gives the entry a new epoch (unique across every socket, so a
//! deadline can never match another socket that took the same address),
//! and stale deadlines are skipped when they surface. Checking costs O(log n) per deadline that expires, nothing
//! per event that does not set one. The heap is rebuilt from the table when
//! stale deadlines outnumber live sockets, so churn cannot grow it without
//! bound.

use std::{cmp::Reverse, collections::BinaryHeap};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline {
    pub at_ns: u64,
    pub key: u64,
    pub epoch: u64,
}

#[derive(Default, Debug)]
pub struct Deadlines {
    heap: BinaryHeap<Reverse<Deadline>>,
}

/// Rebuild once the heap exceeds twice the table plus this slack.
const SLACK: usize = 4096;

impl Deadlines {
    pub fn push(&mut self, d: Deadline) {
        self.heap.push(Reverse(d));
    }

    /// Pops the earliest deadline due at `now_ns`, stale or not.
    pub fn pop_due(&mut self, now_ns: u64) -> Option<Deadline> {
        match self.heap.peek() {
            Some(Reverse(d)) if d.at_ns <= now_ns => self.heap.pop().map(|Reverse(d)| d),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    pub fn needs_rebuild(&self, live: usize) -> bool {
        self.heap.len() > live.saturating_mul(2).saturating_add(SLACK)
    }

    pub fn rebuild(&mut self, live: impl Iterator<Item = Deadline>) {
        self.heap = live.map(Reverse).collect();
    }

    /// Heap bytes, for the memory accounting.
    pub fn bytes(&self) -> usize {
        self.heap.capacity() * size_of::<Deadline>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_in_deadline_order_and_only_when_due() {
        let mut d = Deadlines::default();
        for (at, key) in [(30, 3), (10, 1), (20, 2)] {
            d.push(Deadline {
                at_ns: at,
                key,
                epoch: 0,
            });
        }
        assert_eq!(d.pop_due(5), None);
        assert_eq!(d.pop_due(25).map(|d| d.key), Some(1));
        assert_eq!(d.pop_due(25).map(|d| d.key), Some(2));
        assert_eq!(d.pop_due(25), None);
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn rebuild_bounds_stale_entries() {
        let mut d = Deadlines::default();
        for i in 0..10_000 {
            d.push(Deadline {
                at_ns: i,
                key: i,
                epoch: 0,
            });
        }
        assert!(d.needs_rebuild(10));
        d.rebuild(std::iter::once(Deadline {
            at_ns: 1,
            key: 1,
            epoch: 1,
        }));
        assert_eq!(d.len(), 1);
    }
}
