//! The classic leak: one process's count of sockets in a lingering state
//! keeps growing. Counts are kept incrementally per (owner, state) as
//! sockets enter and leave; the rule compares them once per interval.

use rustc_hash::FxHashMap;

use crate::state::TcpState;
use crate::tracker::table::OwnerRef;

/// States where a growing count per process means the process is at fault:
/// CLOSE_WAIT (never called close()) and FIN_WAIT2 (holds a half-closed
/// socket).
pub const LINGERING: [TcpState; 2] = [TcpState::CloseWait, TcpState::FinWait2];

pub fn is_lingering(st: TcpState) -> bool {
    LINGERING.contains(&st)
}

/// FxHash: updated on every transition, and keyed by our own owner ids,
/// which nobody outside chooses.
#[derive(Debug, Default)]
pub struct LeakCounts {
    now: FxHashMap<(OwnerRef, TcpState), u64>,
    previous: FxHashMap<(OwnerRef, TcpState), u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Suspect {
    pub owner: OwnerRef,
    pub state: TcpState,
    pub count: u64,
    pub previous: u64,
}

impl LeakCounts {
    pub fn enter(&mut self, owner: Option<OwnerRef>, st: TcpState) {
        if let Some(o) = owner
            && is_lingering(st)
        {
            *self.now.entry((o, st)).or_default() += 1;
        }
    }

    pub fn leave(&mut self, owner: Option<OwnerRef>, st: TcpState) {
        if let Some(o) = owner
            && is_lingering(st)
            && let Some(n) = self.now.get_mut(&(o, st))
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.now.remove(&(o, st));
            }
        }
    }

    /// Owners holding more than `threshold` sockets in a lingering state
    /// whose count rose since the previous check. Rolls the interval.
    pub fn check(&mut self, threshold: u64) -> Vec<Suspect> {
        let mut out: Vec<Suspect> = self
            .now
            .iter()
            .filter_map(|(&(owner, state), &count)| {
                let previous = self.previous.get(&(owner, state)).copied().unwrap_or(0);
                (count > threshold && count > previous).then_some(Suspect {
                    owner,
                    state,
                    count,
                    previous,
                })
            })
            .collect();
        out.sort_by_key(|s| std::cmp::Reverse(s.count));
        self.previous.clone_from(&self.now);
        out
    }

    /// Current counts, largest first: the status page's "top owners".
    pub fn top(&self, n: usize) -> Vec<(OwnerRef, TcpState, u64)> {
        let mut v: Vec<_> = self.now.iter().map(|(&(o, s), &c)| (o, s, c)).collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.2));
        v.truncate(n);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: OwnerRef = OwnerRef { pid: 7, comm: 0 };

    #[test]
    fn fires_on_growth_above_threshold_only() {
        let mut l = LeakCounts::default();
        for _ in 0..11 {
            l.enter(Some(P), TcpState::CloseWait);
        }
        l.enter(Some(P), TcpState::Established);
        let s = l.check(10);
        assert_eq!(
            s,
            vec![Suspect {
                owner: P,
                state: TcpState::CloseWait,
                count: 11,
                previous: 0
            }]
        );
        assert!(l.check(10).is_empty(), "no growth, no alert");
        l.enter(Some(P), TcpState::CloseWait);
        assert_eq!(l.check(10)[0].count, 12);
        for _ in 0..12 {
            l.leave(Some(P), TcpState::CloseWait);
        }
        assert!(l.check(10).is_empty());
        assert!(l.top(5).is_empty(), "drained counts are removed");
    }

    #[test]
    fn unknown_owners_are_not_counted() {
        let mut l = LeakCounts::default();
        for _ in 0..20 {
            l.enter(None, TcpState::CloseWait);
        }
        assert!(l.check(1).is_empty());
    }
}
