//! `accept_queue_full`: a listener whose accept queue stays at its backlog. The kernel then
//! drops the handshakes that would complete (`ListenOverflows`), clients see their connects
//! time out, and the server looks idle. The queues come from a sock_diag dump of each
//! namespace's listeners (cheap: the kernel walks only its listening hash); this rule keeps
//! only the full ones, so its memory is bounded by how many listeners can be full at once.
//! A queue can also fill and drain between two polls while handshakes are being dropped: a
//! listener whose drop count (`SK_MEMINFO_DROPS`) grew since the last poll counts as full.

use std::collections::{HashMap, HashSet};

use super::{HostRule, Rule, RuleDetail, RuleId};
use crate::record::AnomalyRecord;
use crate::tracker::{
    facts::{AcceptQueue, Anomaly, Detail, Fact, Kind, Owner, Resolution},
    table::{Comms, Table},
};
use crate::{socket::Tuple, state::TcpState};

/// A listener as a poll saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listening {
    pub netns: u32,
    /// Local address and port; the remote end is a wildcard.
    pub tuple: Tuple,
    pub queue: AcceptQueue,
}

impl Listening {
    /// The kernel refuses a completed handshake once the queue is over the backlog
    /// (`sk_acceptq_is_full`); at the backlog the next one is the last to get in.
    pub fn is_full(&self) -> bool {
        self.queue.queue > 0 && self.queue.queue >= self.queue.backlog
    }
}

/// Full listeners followed at once; past this (a local user can open many listeners and fill
/// them), new ones are not followed.
const MAX_FULL: usize = 65_536;

/// The default: a listener whose accept queue stays at its backlog for 5 s is dropping
/// handshakes (SYNs, or ACKs completing them), not riding out a burst.
pub const DEFAULT_HOLD: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Clone, Copy, Debug)]
struct Full {
    since_ns: u64,
    raised: bool,
    queue: AcceptQueue,
}

#[derive(Debug, Default)]
pub struct BacklogRule {
    after_ns: Option<u64>,
    full: HashMap<(u32, Tuple), Full>,
    /// Drop counts at the last poll, of listeners that ever dropped (bounded like `full`).
    drops: HashMap<(u32, Tuple), u32>,
    raised_total: u64,
}

impl BacklogRule {
    /// A poll of `namespaces` taken at `at_ns` found `listeners` (all of them, full or not).
    /// A listener full at every poll for the threshold is raised; one that drained, or is
    /// gone, is resolved.
    pub fn observe(
        &mut self,
        at_ns: u64,
        namespaces: &[u32],
        listeners: &[Listening],
        out: &mut Vec<Fact>,
    ) {
        let Some(after) = self.after_ns else { return };
        let mut seen = HashSet::new();
        let mut dropping = HashSet::new();
        for l in listeners.iter().filter(|l| l.queue.drops > 0) {
            let key = (l.netns, l.tuple);
            if self.drops.len() >= MAX_FULL && !self.drops.contains_key(&key) {
                continue;
            }
            if let Some(before) = self.drops.insert(key, l.queue.drops)
                && l.queue.drops > before
            {
                dropping.insert(key);
            }
        }
        self.drops.retain(|k, _| {
            !namespaces.contains(&k.0) || listeners.iter().any(|l| (l.netns, l.tuple) == *k)
        });
        let full = listeners
            .iter()
            .filter(|l| l.is_full() || dropping.contains(&(l.netns, l.tuple)));
        for l in full {
            let key = (l.netns, l.tuple);
            if self.full.len() >= MAX_FULL && !self.full.contains_key(&key) {
                continue;
            }
            seen.insert(key);
            let f = self.full.entry(key).or_insert(Full {
                since_ns: at_ns,
                raised: false,
                queue: l.queue,
            });
            f.queue = l.queue;
            if !f.raised && at_ns.saturating_sub(f.since_ns) >= after {
                f.raised = true;
                self.raised_total += 1;
                out.push(Fact::Raised(anomaly(key, f, at_ns)));
            }
        }
        self.full.retain(|key, f| {
            if !namespaces.contains(&key.0) || seen.contains(key) {
                return true;
            }
            if f.raised {
                out.push(Fact::Resolved(
                    anomaly(*key, f, at_ns),
                    Resolution::Relieved,
                ));
            }
            false
        });
    }
}

impl HostRule for BacklogRule {
    const NAME: &'static str = "accept_queue_full";
    /// How long a listener's queue may stay at its backlog.
    type Setting = std::time::Duration;
    type Detail = AcceptQueue;
    const DEFAULT: Option<Self::Setting> = Some(DEFAULT_HOLD);

    fn parse(value: &str) -> Result<Option<Self::Setting>, String> {
        super::thresholds::duration(value)
    }

    fn new(after: Option<std::time::Duration>) -> Self {
        Self {
            after_ns: after.map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            ..Self::default()
        }
    }

    fn longest(after: &std::time::Duration) -> Option<std::time::Duration> {
        Some(*after)
    }

    fn record(q: &AcceptQueue, rec: &mut AnomalyRecord) {
        rec.accept_queue = Some(crate::record::AcceptQueue::from(*q));
    }
}

impl Rule for BacklogRule {
    fn kind(&self) -> Kind {
        Kind::Rule(RuleId::AcceptQueueFull)
    }

    fn polls_listeners(&self) -> bool {
        self.enabled()
    }

    fn listeners_polled(
        &mut self,
        at_ns: u64,
        namespaces: &[u32],
        listeners: &[Listening],
        out: &mut Vec<Fact>,
    ) {
        self.observe(at_ns, namespaces, listeners, out);
    }

    fn enabled(&self) -> bool {
        self.after_ns.is_some()
    }

    fn open(&self) -> u64 {
        self.full.values().filter(|f| f.raised).count() as u64
    }

    fn raised_total(&self) -> u64 {
        self.raised_total
    }

    fn open_anomalies(&self, now_ns: u64, _: &Table, _: &Comms) -> Vec<Anomaly> {
        self.full
            .iter()
            .filter(|(_, f)| f.raised)
            .map(|(key, f)| anomaly(*key, f, now_ns))
            .collect()
    }
}

fn anomaly((netns, tuple): (u32, Tuple), f: &Full, ts_ns: u64) -> Anomaly {
    Anomaly {
        state: TcpState::Listen,
        ts_ns,
        since_ns: f.since_ns,
        lower_bound: false,
        sk: 0,
        netns,
        cgroup: 0,
        tuple,
        // The listener's holder is looked up like any socket's owner.
        owner: Owner::Unknown,
        vitals: None,
        holder_cgroup: None,
        other_holders: Vec::new(),
        drops: None,
        detail: Detail::Rule(RuleDetail::AcceptQueueFull(f.queue)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::Kind;

    const S: u64 = 1_000_000_000;

    fn listening(port: u16, queue: u32, backlog: u32) -> Listening {
        let lo = "127.0.0.1".parse().expect("addr");
        let any = "0.0.0.0".parse().expect("addr");
        Listening {
            netns: 7,
            tuple: Tuple::new(lo, port, any, 0),
            queue: AcceptQueue {
                queue,
                backlog,
                drops: 0,
            },
        }
    }

    #[test]
    fn raised_when_full_for_the_threshold_and_resolved_when_drained() {
        let mut r = BacklogRule::new(Some(std::time::Duration::from_secs(2)));
        let mut out = Vec::new();
        let idle = listening(81, 0, 4);
        r.observe(0, &[7], &[listening(80, 4, 4), idle], &mut out);
        r.observe(S, &[7], &[listening(80, 5, 4), idle], &mut out);
        assert!(out.is_empty(), "full for 1 s only: {out:?}");
        r.observe(2 * S, &[7], &[listening(80, 5, 4), idle], &mut out);
        let [Fact::Raised(a)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(
            (a.kind(), a.state, a.tuple.sport),
            (Kind::Rule(RuleId::AcceptQueueFull), TcpState::Listen, 80)
        );
        assert_eq!(a.since_ns, 0);
        assert_eq!(
            a.detail,
            Detail::Rule(RuleDetail::AcceptQueueFull(AcceptQueue {
                queue: 5,
                backlog: 4,
                drops: 0,
            }))
        );
        assert_eq!((r.open(), r.raised_total()), (1, 1));
        out.clear();
        r.observe(3 * S, &[7], &[listening(80, 5, 4)], &mut out);
        assert!(out.is_empty(), "raised once: {out:?}");
        // Another namespace's poll says nothing about this one.
        r.observe(4 * S, &[8], &[], &mut out);
        assert!(out.is_empty(), "{out:?}");
        r.observe(5 * S, &[7], &[listening(80, 1, 4)], &mut out);
        let [Fact::Resolved(a, Resolution::Relieved)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(a.since_ns, 0);
        assert_eq!(r.open(), 0);
    }

    #[test]
    fn a_queue_that_drains_between_polls_starts_over() {
        let mut r = BacklogRule::new(Some(std::time::Duration::from_secs(2)));
        let mut out = Vec::new();
        r.observe(0, &[7], &[listening(80, 4, 4)], &mut out);
        r.observe(S, &[7], &[listening(80, 0, 4)], &mut out);
        r.observe(2 * S, &[7], &[listening(80, 4, 4)], &mut out);
        r.observe(3 * S, &[7], &[listening(80, 4, 4)], &mut out);
        assert!(out.is_empty(), "{out:?}");
        r.observe(4 * S, &[7], &[listening(80, 4, 4)], &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn a_listener_that_keeps_dropping_is_full_even_when_its_queue_is_not() {
        let mut r = BacklogRule::new(Some(std::time::Duration::from_secs(2)));
        let mut out = Vec::new();
        let with = |queue, drops| {
            let mut l = listening(80, queue, 4);
            l.queue.drops = drops;
            l
        };
        r.observe(0, &[7], &[with(1, 10)], &mut out);
        r.observe(S, &[7], &[with(2, 15)], &mut out);
        r.observe(2 * S, &[7], &[with(0, 30)], &mut out);
        r.observe(3 * S, &[7], &[with(1, 42)], &mut out);
        let [Fact::Raised(a)] = &out[..] else {
            panic!("{out:?}")
        };
        assert!(
            matches!(a.detail, Detail::Rule(RuleDetail::AcceptQueueFull(q)) if q.drops == 42),
            "{a:?}"
        );
        out.clear();
        // It stopped dropping: relieved.
        r.observe(4 * S, &[7], &[with(1, 42)], &mut out);
        assert!(
            matches!(&out[..], [Fact::Resolved(_, Resolution::Relieved)]),
            "{out:?}"
        );
        // A listener that dropped long ago and no more is not full.
        out.clear();
        r.observe(5 * S, &[7], &[with(0, 42)], &mut out);
        r.observe(9 * S, &[7], &[with(0, 42)], &mut out);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn off_keeps_nothing() {
        let mut r = BacklogRule::new(None);
        let mut out = Vec::new();
        r.observe(0, &[7], &[listening(80, 9, 4)], &mut out);
        r.observe(9 * S, &[7], &[listening(80, 9, 4)], &mut out);
        assert!(out.is_empty() && r.full.is_empty() && !r.enabled());
    }

    #[test]
    fn a_listen_backlog_of_zero_is_full_with_one_waiting() {
        assert!(listening(80, 1, 0).is_full());
        assert!(!listening(80, 0, 0).is_full());
        assert!(!listening(80, 3, 4).is_full());
    }
}
