//! The loss and reconciliation state machine behind a fake kernel: counters the test makes
//! grow, dumps that start when the test says, and, in the last test, the real tracker the
//! loop marks untrusted and trusted again.

use std::{net::IpAddr, time::Duration};

use super::*;
use crate::{
    decode::{Ending, Transition},
    socket::{Comm, Tuple},
    state::TcpState::{self, *},
    tracker::{Alive, Config, Fact, Found, RuleSettings, Tracker, rules::thresholds::Thresholds},
};

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;

/// What the loop sees of the kernel: counters that only grow. Each reconciliation's dump
/// starts a millisecond after the loop asks for it, as the workers' do.
#[derive(Default)]
struct FakeKernel {
    counters: KernelCounters,
}

impl FakeKernel {
    fn lose_transitions(&mut self, n: u64) {
        self.counters.ringbuf_full += n;
    }
}

/// The loop's part, as `run/mod.rs` and `run/jobs.rs` wire it: a tick that finds a new loss
/// marks the table and asks for a full reconciliation; a reconciliation's end is applied to
/// the table or asks for another.
struct Engine {
    recovery: Recovery,
    /// Reconciliations handed to the workers, with when each one's dump starts.
    asked: Vec<(Start, u64)>,
    untrusted_table: bool,
}

impl Engine {
    fn new(full_every: u64) -> Self {
        Self {
            recovery: Recovery::new(full_every),
            asked: Vec::new(),
            untrusted_table: false,
        }
    }

    fn tick(&mut self, kernel: &FakeKernel, now_ns: u64) {
        if self.recovery.tick(&kernel.counters, now_ns) {
            self.untrusted_table = true;
            self.start_reconcile(true, now_ns);
        }
    }

    fn start_reconcile(&mut self, full: bool, now_ns: u64) {
        if let Some(start) = self.recovery.begin(full) {
            self.asked.push((start, now_ns + MS));
        }
    }

    /// The last reconciliation asked for is over.
    fn reconciled(&mut self, now_ns: u64) -> Ended {
        let (_, started_ns) = *self.asked.last().expect("a reconciliation was asked for");
        let ended = self.recovery.end(started_ns);
        match ended {
            Ended::Trusted => self.untrusted_table = false,
            Ended::Again => self.start_reconcile(true, now_ns),
            Ended::Unchanged => {}
        }
        ended
    }
}

#[test]
fn a_scanners_resets_and_a_full_segment_ring_never_untrust_the_table() {
    let mut kernel = FakeKernel::default();
    let mut engine = Engine::new(10);
    // A port scan: a reset for no socket per probe, and retransmit events lost to a full ring.
    kernel.counters.resets_no_socket += 65_536;
    kernel.counters.segments_full += 900;
    for t in 1..=20 {
        engine.tick(&kernel, t * 50 * MS);
    }
    assert!(!engine.untrusted_table);
    assert!(!engine.recovery.untrusted());
    assert!(engine.asked.is_empty(), "{:?}", engine.asked);
}

#[test]
fn a_loss_untrusts_the_table_once_and_a_reconciliation_started_after_it_mends_it() {
    let mut kernel = FakeKernel::default();
    let mut engine = Engine::new(10);
    engine.tick(&kernel, 50 * MS);
    kernel.lose_transitions(3);
    engine.tick(&kernel, 100 * MS);
    assert!(engine.untrusted_table);
    assert_eq!(
        engine.asked,
        [(
            Start {
                timewait: true,
                everywhere: true
            },
            101 * MS
        )],
        "a full reconciliation of every namespace, at once"
    );
    // The same total on later ticks is the same loss.
    engine.tick(&kernel, 150 * MS);
    assert_eq!(engine.asked.len(), 1);
    assert_eq!(engine.reconciled(300 * MS), Ended::Trusted);
    assert!(!engine.untrusted_table);
    // Recursion misses are lost transitions too.
    kernel.counters.recursion_misses += 1;
    engine.tick(&kernel, 400 * MS);
    assert!(engine.untrusted_table);
    assert_eq!(engine.asked.len(), 2);
    assert_eq!(engine.reconciled(500 * MS), Ended::Trusted);
    assert!(!engine.untrusted_table);
}

#[test]
fn a_loss_while_the_reconciliation_runs_asks_for_another() {
    let mut kernel = FakeKernel::default();
    let mut engine = Engine::new(10);
    kernel.lose_transitions(1);
    engine.tick(&kernel, 100 * MS);
    // More is lost after its dump started (at 101 ms): that dump cannot vouch for it.
    kernel.lose_transitions(1);
    engine.tick(&kernel, 150 * MS);
    assert_eq!(engine.asked.len(), 1, "one reconciliation out at a time");
    assert_eq!(engine.reconciled(200 * MS), Ended::Again);
    assert!(engine.untrusted_table, "still untrusted");
    assert_eq!(engine.asked.len(), 2);
    assert!(engine.asked[1].0.timewait && engine.asked[1].0.everywhere);
    assert_eq!(engine.reconciled(300 * MS), Ended::Trusted);
    assert!(!engine.untrusted_table);
}

#[test]
fn a_loss_while_a_periodic_reconciliation_is_out_is_mended_by_the_next_one() {
    let mut kernel = FakeKernel::default();
    let mut engine = Engine::new(10);
    engine.start_reconcile(false, 0);
    assert_eq!(
        engine.asked[0].0,
        Start {
            timewait: false,
            everywhere: false
        }
    );
    kernel.lose_transitions(5);
    engine.tick(&kernel, 20 * MS);
    assert!(engine.untrusted_table);
    assert_eq!(engine.asked.len(), 1, "the periodic one is still out");
    // It started (at 1 ms) before the loss: it cannot clear it.
    assert_eq!(engine.reconciled(40 * MS), Ended::Again);
    assert!(engine.untrusted_table);
    assert_eq!(
        engine.asked[1].0,
        Start {
            timewait: true,
            everywhere: true
        }
    );
    assert_eq!(engine.reconciled(80 * MS), Ended::Trusted);
    assert!(!engine.untrusted_table);
}

#[test]
fn every_nth_periodic_reconciliation_lists_time_wait_and_a_refused_one_frees_the_slot() {
    let mut engine = Engine::new(3);
    let mut timewait = Vec::new();
    for t in 0..6 {
        engine.start_reconcile(false, t * S);
        timewait.push(engine.asked.last().expect("asked").0.timewait);
        assert_eq!(engine.reconciled(t * S + S / 2), Ended::Unchanged);
    }
    assert_eq!(timewait, [false, false, true, false, false, true]);
    // --full-reconcile-every 0 is taken as 1: every one lists TIME_WAIT.
    let mut every = Recovery::new(0);
    assert!(every.begin(false).is_some_and(|s| s.timewait));
    // Workers that would not take it: the next asks again.
    every.not_sent();
    assert!(every.begin(false).is_some());
    assert_eq!(every.begin(false), None, "one out at a time");
}

fn transition(ts_ns: u64, old: TcpState, new: TcpState) -> Transition {
    let lo: IpAddr = "127.0.0.1".parse().expect("addr");
    Transition {
        ts_ns,
        sk: 0xffff_0000_0000_1000,
        tuple: Tuple::new(lo, 8080, lo, 5000),
        old,
        new,
        ending: Ending::Closed { errno: 0 },
        pid: 42,
        comm: Comm::new("server"),
        netns: 7,
        cgroup: 0,
    }
}

fn raised(facts: &[Fact]) -> usize {
    facts
        .iter()
        .filter(|f| matches!(f, Fact::Raised(_)))
        .count()
}

/// A CLOSE_WAIT socket whose CLOSE was lost is a ghost: with the loss seen, it raises
/// nothing; the reconciliation asked for finds it gone, and the table is trusted again.
/// Without the loss counter the same ghost would be reported stuck.
#[test]
fn a_ghost_left_by_a_lost_close_is_never_reported_and_the_reconciliation_removes_it() {
    let new_tracker = || {
        let mut thresholds = Thresholds::none();
        thresholds.set(CloseWait, Some(Duration::from_secs(2)));
        Tracker::new(Config {
            capacity: 100,
            timewait_capacity: 100,
            thresholds,
            leak_threshold: 100,
            rules: RuleSettings::off(),
        })
    };
    let ghost = |t: &mut Tracker| {
        let mut facts = Vec::new();
        t.on_transition(&transition(0, SynRecv, Established), &mut facts);
        t.on_transition(&transition(S, Established, CloseWait), &mut facts);
        // Its CLOSE at 1.2 s is lost in the ring.
    };

    // The control: a loss the kernel never counted is a CLOSE_WAIT reported at 3 s.
    let mut blind = new_tracker();
    ghost(&mut blind);
    let mut facts = Vec::new();
    blind.expire(4 * S, &mut facts);
    assert_eq!(raised(&facts), 1, "{facts:?}");

    let mut kernel = FakeKernel::default();
    let mut engine = Engine::new(10);
    let mut tracker = new_tracker();
    ghost(&mut tracker);
    kernel.lose_transitions(1);
    engine.tick(&kernel, S + 250 * MS);
    tracker.set_incomplete(engine.untrusted_table);
    let mut facts = Vec::new();
    tracker.expire(4 * S, &mut facts);
    assert_eq!(raised(&facts), 0, "untrusted: {facts:?}");

    // The dump (started at 1.251 s) has no such socket; its exact lookup finds nothing.
    let (_, started_ns) = engine.asked[0];
    let suspects = tracker.reconcile(7, &Alive::default(), started_ns, 5 * S, &mut facts);
    assert_eq!(suspects.len(), 1);
    let found: Vec<_> = suspects
        .into_iter()
        .map(|(ns, t)| (ns, t, Found::Absent))
        .collect();
    assert_eq!(
        tracker.confirm_gone(&found, started_ns, 5 * S, &mut facts),
        1
    );
    assert_eq!(engine.reconciled(5 * S), Ended::Trusted);
    tracker.set_incomplete(engine.untrusted_table);
    tracker.expire(10 * S, &mut facts);
    assert_eq!(raised(&facts), 0, "{facts:?}");
    assert_eq!(tracker.tracked(), 0);
    assert!(!tracker.is_incomplete());
}
