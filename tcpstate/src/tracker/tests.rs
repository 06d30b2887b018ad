//! The state machine, thresholds, deadlines, attribution, seeding,
//! reconciliation and the leak rule, driven by a fake clock.

use std::{net::IpAddr, time::Duration};

use super::*;
use crate::{
    clock::WallClock,
    decode::{Ending, SegmentEvent, SegmentKind},
    record::{OwnerSource, Record},
    socket::Comm,
    state::TcpState::*,
};

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const SERVER_SK: u64 = 0xffff_0000_0000_1000;
const CLIENT_SK: u64 = 0xffff_0000_0000_2000;
const LISTEN_SK: u64 = 0xffff_0000_0000_3000;

fn tracker(capacity: usize) -> Tracker {
    let mut th = Thresholds::none();
    th.set(CloseWait, Some(Duration::from_secs(2)));
    th.set(FinWait2, Some(Duration::from_secs(5)));
    Tracker::new(Config {
        capacity,
        timewait_capacity: capacity,
        thresholds: th,
        leak_threshold: 2,
        rules: crate::tracker::RuleSettings {
            pressure: Some(0.5),
            ..crate::tracker::RuleSettings::off()
        },
    })
}

/// A transition, built in steps that name what they set:
/// `at(SK, ts).go(Established, CloseWait).ports(8080, 5000).by(42, "server")`.
/// Loopback IPv4 in namespace 7 unless a step says otherwise.
fn at(sk: u64, ts: u64) -> Transition {
    let lo: IpAddr = "127.0.0.1".parse().expect("addr");
    Transition {
        cgroup: 0,
        ts_ns: ts,
        sk,
        tuple: Tuple::new(lo, 0, lo, 0),
        old: Close,
        new: Close,
        ending: Ending::Closed { errno: 0 },
        pid: 0,
        comm: Comm::default(),
        netns: 7,
    }
}

trait Step {
    fn go(self, old: TcpState, new: TcpState) -> Transition;
    fn ports(self, sport: u16, dport: u16) -> Transition;
    fn by(self, pid: u32, comm: &str) -> Transition;
}

impl Step for Transition {
    fn go(mut self, old: TcpState, new: TcpState) -> Transition {
        (self.old, self.new) = (old, new);
        self
    }

    fn ports(mut self, sport: u16, dport: u16) -> Transition {
        (self.tuple.sport, self.tuple.dport) = (sport, dport);
        self
    }

    fn by(mut self, pid: u32, comm: &str) -> Transition {
        (self.pid, self.comm) = (pid, Comm::new(comm));
        self
    }
}

/// Records for the facts that are not transitions (those are what these tests look at).
fn records(facts: &[Fact]) -> Vec<Record> {
    facts
        .iter()
        .filter(|f| !matches!(f, Fact::Moved(_)))
        .map(|f| Record::from_fact(f, WallClock::with_offset(0)))
        .collect()
}

fn run(t: &mut Tracker, events: &[Transition]) -> (Vec<Option<f64>>, Vec<Record>) {
    let mut out = Vec::new();
    let prev = events
        .iter()
        .map(|e| t.on_transition(e, &mut out).prev_state_ms)
        .collect();
    (prev, records(&out))
}

fn expire(t: &mut Tracker, now: u64, out: &mut Vec<Record>) {
    let mut facts = Vec::new();
    t.expire(now, &mut facts);
    out.extend(records(&facts));
}

fn check_leaks(t: &mut Tracker, now: u64, out: &mut Vec<Record>) {
    let mut facts = Vec::new();
    t.check_leaks(now, &mut facts);
    out.extend(records(&facts));
}

fn reconcile(
    t: &mut Tracker,
    ns: u32,
    alive: &Alive,
    start: u64,
    now: u64,
    out: &mut Vec<Record>,
) -> u64 {
    let mut facts = Vec::new();
    let suspects = absent(t.reconcile(ns, alive, start, now, &mut facts));
    // The exact lookups find every suspect gone.
    let n = t.confirm_gone(&suspects, start, now, &mut facts);
    out.extend(records(&facts));
    n
}

/// Exact lookups that find nothing for each suspect.
fn absent(suspects: Vec<(u32, Tuple)>) -> Vec<(u32, Tuple, Found)> {
    suspects
        .into_iter()
        .map(|(n, t)| (n, t, Found::Absent))
        .collect()
}

fn kernel_socket(netns: u32, state: TcpState, sport: u16, dport: u16) -> KernelSocket {
    let lo: IpAddr = "127.0.0.1".parse().expect("addr");
    KernelSocket {
        cgroup: 0,
        netns,
        state,
        tuple: Tuple::new(lo, sport, lo, dport),
        mini: state == TimeWait,
        request: false,
        expires_ms: 30_000,
        owner: None,
    }
}

#[test]
fn times_each_state_and_forgets_closed_sockets() {
    let mut t = tracker(100);
    let (prev, out) = run(
        &mut t,
        &[
            at(CLIENT_SK, S)
                .go(Close, SynSent)
                .ports(0, 80)
                .by(10, "curl"),
            at(CLIENT_SK, S + 3 * MS)
                .go(SynSent, Established)
                .ports(5000, 80)
                .by(0, "swapper/0"),
            at(CLIENT_SK, 2 * S)
                .go(Established, FinWait1)
                .ports(5000, 80)
                .by(10, "curl"),
            at(CLIENT_SK, 2 * S + MS)
                .go(FinWait1, FinWait2)
                .ports(5000, 80)
                .by(0, "swapper/0"),
            at(CLIENT_SK, 2 * S + 2 * MS)
                .go(FinWait2, Close)
                .ports(5000, 80)
                .by(0, "swapper/0"),
        ],
    );
    assert!(out.is_empty());
    assert_eq!(prev[0], None, "CLOSE was never entered under our eyes");
    assert_eq!(prev[1], Some(3.0));
    assert_eq!(prev[2], Some(1000.0 - 3.0));
    assert_eq!(prev[3], Some(1.0));
    assert_eq!(prev[4], Some(1.0));
    assert_eq!(t.tracked(), 0);
    assert!(TcpState::ALL.iter().all(|&s| t.sockets(s) == 0));
    assert_eq!(
        t.stats().transitions[SynSent as usize][Established as usize],
        1
    );
    assert_eq!(t.stats().durations[Established as usize].len(), 1);
}

#[test]
fn close_wait_anomaly_fires_at_threshold_once_and_resolves_with_age() {
    let mut t = tracker(100);
    run(
        &mut t,
        &[
            at(LISTEN_SK, 0)
                .go(Close, Listen)
                .ports(8080, 0)
                .by(42, "server"),
            // Accept and peer close run in softirq / the client's context.
            at(SERVER_SK, S)
                .go(Listen, SynRecv)
                .ports(8080, 5000)
                .by(10, "client"),
            at(SERVER_SK, S)
                .go(SynRecv, Established)
                .ports(8080, 5000)
                .by(10, "client"),
            at(SERVER_SK, 3 * S)
                .go(Established, CloseWait)
                .ports(8080, 5000)
                .by(0, "swapper/1"),
        ],
    );
    let mut out = Vec::new();
    expire(&mut t, 5 * S - 1, &mut out);
    assert!(out.is_empty(), "not before the threshold");
    expire(&mut t, 5 * S, &mut out);
    expire(&mut t, 9 * S, &mut out);
    assert_eq!(out.len(), 1, "raised once: {out:?}");
    let Record::Anomaly(a) = &out[0] else {
        panic!("expected an anomaly, got {out:?}");
    };
    assert_eq!(
        (a.kind, a.state, a.age_ms),
        (Kind::Lingering(CloseWait), CloseWait, 2000.0)
    );
    assert_eq!((a.sport, a.dport, a.sk), (8080, 5000, SERVER_SK));
    assert_eq!(
        (a.pid, a.comm),
        (Some(42), Some(Comm::new("server"))),
        "listener's owner, not the softirq task"
    );
    assert_eq!(a.owner_source, OwnerSource::Attributed);
    assert!(!a.age_is_lower_bound);
    assert_eq!(t.anomalies_open(CloseWait), 1);

    let (_, out) = run(
        &mut t,
        &[at(SERVER_SK, 10 * S)
            .go(CloseWait, LastAck)
            .ports(8080, 5000)
            .by(42, "server")],
    );
    let Record::AnomalyResolved(r) = &out[0] else {
        panic!("expected a resolution, got {out:?}");
    };
    assert_eq!(
        (r.age_ms, r.resolution.as_deref()),
        (7000.0, Some("left_state"))
    );
    assert_eq!(t.anomalies_open(CloseWait), 0);
    assert_eq!(t.stats().anomalies_raised[CloseWait as usize], 1);
}

#[test]
fn leaving_before_the_threshold_raises_nothing() {
    let mut t = tracker(100);
    run(
        &mut t,
        &[
            at(SERVER_SK, 0)
                .go(SynRecv, Established)
                .ports(8080, 5000)
                .by(1, "x"),
            at(SERVER_SK, S)
                .go(Established, CloseWait)
                .ports(8080, 5000)
                .by(1, "x"),
            at(SERVER_SK, 2 * S)
                .go(CloseWait, LastAck)
                .ports(8080, 5000)
                .by(1, "x"),
            // Same address reused by a new socket entering CLOSE_WAIT later.
            at(SERVER_SK, 2 * S + 1)
                .go(LastAck, Close)
                .ports(8080, 5000)
                .by(1, "x"),
        ],
    );
    let mut out = Vec::new();
    expire(&mut t, 100 * S, &mut out);
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn client_owner_comes_from_connect_not_softirq() {
    let mut t = tracker(100);
    run(
        &mut t,
        &[
            at(CLIENT_SK, 0)
                .go(Close, SynSent)
                .ports(0, 80)
                .by(99, "client"),
            at(CLIENT_SK, MS)
                .go(SynSent, Established)
                .ports(5000, 80)
                .by(0, "swapper/0"),
            at(CLIENT_SK, S)
                .go(Established, FinWait1)
                .ports(5000, 80)
                .by(99, "client"),
            at(CLIENT_SK, S + MS)
                .go(FinWait1, FinWait2)
                .ports(5000, 80)
                .by(0, "ksoftirqd/1"),
        ],
    );
    let mut out = Vec::new();
    expire(&mut t, S + MS + 5 * S, &mut out);
    let Record::Anomaly(a) = &out[0] else {
        panic!("{out:?}");
    };
    assert_eq!(
        (a.kind, a.pid, a.sport),
        (Kind::Lingering(FinWait2), Some(99), 5000)
    );
}

#[test]
fn unknown_owner_is_said_to_be_unknown() {
    let mut t = tracker(100);
    run(
        &mut t,
        &[at(SERVER_SK, 0)
            .go(Established, CloseWait)
            .ports(1, 2)
            .by(0, "swapper/0")],
    );
    let mut out = Vec::new();
    expire(&mut t, 2 * S, &mut out);
    let Record::Anomaly(a) = &out[0] else {
        panic!("{out:?}");
    };
    assert_eq!(
        (a.pid, a.comm, a.owner_source),
        (None, None, OwnerSource::None)
    );
}

/// A snapshot socket's first event carries no namespace or cgroup: a `--netns` or `--cgroup`
/// filter asks the tracker, which knows it by its tuple until it is met by address. Found
/// by a test that ran the daemon with --netns: the close of a socket that predated it was
/// dropped as another namespace's, and its anomaly never resolved.
#[test]
fn a_snapshot_socket_is_known_by_its_tuple_until_met_by_address() {
    let mut t = tracker(100);
    let lo: IpAddr = "127.0.0.1".parse().expect("addr");
    t.seed(
        [
            KernelSocket {
                cgroup: 99,
                ..kernel_socket(7, CloseWait, 8080, 5000)
            },
            // The same tuple in two containers: neither is the answer.
            kernel_socket(7, CloseWait, 8081, 5000),
            kernel_socket(8, CloseWait, 8081, 5000),
        ],
        10 * S,
        &mut Vec::new(),
    );
    let ours = Tuple::new(lo, 8080, lo, 5000);
    assert_eq!(t.netns_of(SERVER_SK), 0, "not met by address yet");
    assert_eq!(t.netns_of_event(SERVER_SK, &ours), 7);
    assert_eq!(t.cgroup_of_event(SERVER_SK, &ours), 99);
    let twice = Tuple::new(lo, 8081, lo, 5000);
    assert_eq!(t.netns_of_event(CLIENT_SK, &twice), 0);
    assert_eq!(
        t.netns_of_event(CLIENT_SK, &Tuple::new(lo, 1, lo, 2)),
        0,
        "no such socket"
    );
    run(
        &mut t,
        &[at(SERVER_SK, 11 * S)
            .go(CloseWait, LastAck)
            .ports(8080, 5000)
            .by(42, "server")],
    );
    assert_eq!(t.netns_of(SERVER_SK), 7, "adopted: known by address");
    assert_eq!(t.netns_of_event(SERVER_SK, &ours), 7);
}

#[test]
fn seeded_sockets_age_from_start_and_adopt_their_address() {
    let mut t = tracker(100);
    let n = t.seed(
        [
            KernelSocket {
                owner: Some((42, Comm::new("server"))),
                ..kernel_socket(7, CloseWait, 8080, 5000)
            },
            kernel_socket(7, TimeWait, 1, 2),
        ],
        10 * S,
        &mut Vec::new(),
    );
    // Issue 9: TIME_WAIT mini-sockets are tracked now, in their own table.
    assert_eq!(n, 2);
    assert_eq!((t.tracked(), t.timewait()), (1, 1));
    assert_eq!(t.sockets(CloseWait), 1);
    let mut out = Vec::new();
    expire(&mut t, 12 * S, &mut out);
    let Record::Anomaly(a) = &out[0] else {
        panic!("{out:?}");
    };
    assert!(a.age_is_lower_bound);
    assert_eq!((a.age_ms, a.pid, a.sk), (2000.0, Some(42), 0));

    let (prev, out) = run(
        &mut t,
        &[at(SERVER_SK, 13 * S)
            .go(CloseWait, LastAck)
            .ports(8080, 5000)
            .by(42, "server")],
    );
    assert_eq!(prev[0], None, "entry into CLOSE_WAIT was not seen");
    let Record::AnomalyResolved(r) = &out[0] else {
        panic!("{out:?}");
    };
    assert_eq!((r.sk, r.age_ms, r.age_is_lower_bound), (0, 3000.0, true));
    assert_eq!(t.tracked(), 1, "adopted under its kernel address");
    run(
        &mut t,
        &[at(SERVER_SK, 14 * S)
            .go(LastAck, Close)
            .ports(8080, 5000)
            .by(0, "swapper/0")],
    );
    assert_eq!(t.tracked(), 0);
}

#[test]
fn reconciliation_removes_sockets_whose_close_was_lost() {
    let mut t = tracker(100);
    run(
        &mut t,
        &[
            at(SERVER_SK, 0)
                .go(SynRecv, Established)
                .ports(8080, 5000)
                .by(1, "x"),
            at(SERVER_SK, S)
                .go(Established, CloseWait)
                .ports(8080, 5000)
                .by(1, "x"),
            // Its CLOSE is lost. This one is alive:
            at(CLIENT_SK, 0)
                .go(SynSent, Established)
                .ports(5001, 80)
                .by(1, "x"),
            // And this one still connecting, with local port 0 in the event:
            at(LISTEN_SK, 0).go(Close, SynSent).ports(0, 443).by(1, "x"),
        ],
    );
    let mut out = Vec::new();
    expire(&mut t, 4 * S, &mut out);
    assert_eq!(out.len(), 1);
    let mut alive = Alive::default();
    alive.insert(&kernel_socket(7, Established, 5001, 80));
    alive.insert(&kernel_socket(7, SynSent, 40000, 443));
    // The lost socket's tuple lives on as a timewait socket: still a ghost.
    alive.insert(&kernel_socket(7, TimeWait, 8080, 5000));
    out.clear();
    // Another namespace's dump does not touch netns 7.
    assert_eq!(
        reconcile(&mut t, 8, &Alive::default(), 5 * S, 5 * S, &mut out),
        0
    );
    // A dump only nominates: a live socket it skipped (the kernel's hash walk can) is kept
    // when its lookup finds it.
    let mut facts = Vec::new();
    let suspects = t.reconcile(7, &Alive::default(), 5 * S, 5 * S, &mut facts);
    assert_eq!(suspects.len(), 2, "{suspects:?}");
    assert_eq!(t.confirm_gone(&[], 5 * S, 5 * S, &mut facts), 0);
    assert_eq!(
        t.tracked(),
        2,
        "the connecting one is judged by the dump alone"
    );
    run(
        &mut t,
        &[at(LISTEN_SK, 0).go(Close, SynSent).ports(0, 443).by(1, "x")],
    );
    assert_eq!(reconcile(&mut t, 7, &alive, 5 * S, 5 * S, &mut out), 1);
    assert_eq!(t.tracked(), 2);
    // The connecting one the first dump lacked, and the ghost.
    assert_eq!(t.stats().reconciled, 2);
    assert_eq!(t.sockets(CloseWait), 0);
    let Record::AnomalyResolved(r) = &out[0] else {
        panic!("{out:?}");
    };
    assert_eq!(r.resolution.as_deref(), Some("reconciled"));
}

#[test]
fn sockets_changed_during_the_dump_are_not_judged() {
    let mut t = tracker(100);
    run(
        &mut t,
        &[at(SERVER_SK, 10 * S)
            .go(SynRecv, Established)
            .ports(1, 2)
            .by(1, "x")],
    );
    let mut out = Vec::new();
    assert_eq!(
        reconcile(&mut t, 7, &Alive::default(), 9 * S, 11 * S, &mut out),
        0
    );
    assert_eq!(t.tracked(), 1);
}

#[test]
fn table_is_bounded_and_counts_refusals() {
    let mut t = tracker(3);
    let events: Vec<_> = (0..10)
        .map(|i| {
            at(0xffff_0000_0001_0000 + i, i)
                .go(Close, SynSent)
                .ports(0, 80)
                .by(1, "x")
        })
        .collect();
    run(&mut t, &events);
    assert_eq!((t.tracked(), t.refused()), (3, 7));
    assert_eq!(
        t.stats().transitions[Close as usize][SynSent as usize],
        10,
        "counts stay exact"
    );
}

#[test]
fn failed_connects_and_resets_are_counted_per_endpoint() {
    let mut t = tracker(100);
    run(
        &mut t,
        &[
            at(CLIENT_SK, 0).go(Close, SynSent).ports(0, 81).by(1, "x"),
            at(CLIENT_SK, 1).go(SynSent, Close).ports(0, 81).by(0, "x"),
            at(SERVER_SK, 0)
                .go(SynRecv, Established)
                .ports(80, 5000)
                .by(1, "x"),
            at(SERVER_SK, 1)
                .go(Established, Close)
                .ports(80, 5000)
                .by(0, "x"),
        ],
    );
    assert_eq!((t.stats().failed_connects, t.stats().resets), (1, 1));
    let lo: IpAddr = "127.0.0.1".parse().expect("addr");
    assert_eq!(t.stats().by_endpoint[&(lo, 81)].failed_connects, 1);
    assert_eq!(t.stats().by_endpoint[&(lo, 5000)].resets, 1);
    assert_eq!(t.tracked(), 0);
}

#[test]
fn leak_rule_names_the_growing_owner() {
    let mut t = tracker(100);
    run(
        &mut t,
        &[at(LISTEN_SK, 0)
            .go(Close, Listen)
            .ports(8080, 0)
            .by(42, "server")],
    );
    let mut out = Vec::new();
    let accept_and_strand = |t: &mut Tracker, i: u64| {
        let sk = 0xffff_0000_0010_0000 + i;
        run(
            t,
            &[
                at(sk, i)
                    .go(Listen, SynRecv)
                    .ports(8080, 6000 + i as u16)
                    .by(0, "c"),
                at(sk, i)
                    .go(SynRecv, Established)
                    .ports(8080, 6000 + i as u16)
                    .by(0, "c"),
                at(sk, i + 1)
                    .go(Established, CloseWait)
                    .ports(8080, 6000 + i as u16)
                    .by(0, "c"),
            ],
        );
    };
    for i in 0..3 {
        accept_and_strand(&mut t, i);
    }
    check_leaks(&mut t, S, &mut out);
    let Record::LeakSuspected(l) = &out[0] else {
        panic!("{out:?}");
    };
    assert_eq!((l.pid, l.count, l.previous, l.state), (42, 3, 0, CloseWait));
    out.clear();
    check_leaks(&mut t, 2 * S, &mut out);
    assert!(out.is_empty(), "no growth");
    accept_and_strand(&mut t, 10);
    check_leaks(&mut t, 3 * S, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(t.top_owners(1)[0].2, 4);
}

#[test]
fn deadline_heap_stays_bounded_under_churn() {
    let mut t = tracker(1000);
    let mut out = Vec::new();
    for i in 0..50_000u64 {
        let sk = 0xffff_0000_1000_0000 + (i % 10);
        run(
            &mut t,
            &[
                at(sk, i * 10)
                    .go(Established, CloseWait)
                    .ports(1, 2)
                    .by(1, "x"),
                at(sk, i * 10 + 1)
                    .go(CloseWait, LastAck)
                    .ports(1, 2)
                    .by(1, "x"),
                at(sk, i * 10 + 2).go(LastAck, Close).ports(1, 2).by(1, "x"),
            ],
        );
        if i % 1000 == 0 {
            expire(&mut t, i * 10, &mut out);
        }
    }
    expire(&mut t, 500_000, &mut out);
    assert!(
        t.deadlines.len() <= 2 * 1000 + 4096 + 1000,
        "{}",
        t.deadlines.len()
    );
    assert!(out.is_empty());
}

fn seed_close_wait(t: &mut Tracker, netns: u32, now: u64) {
    t.seed(
        [kernel_socket(netns, CloseWait, 8080, 5000)],
        now,
        &mut Vec::new(),
    );
}

#[test]
fn namespace_is_remembered_from_birth() {
    let mut t = tracker(100);
    let mut out = Vec::new();
    let born = at(CLIENT_SK, 0).go(Close, SynSent).ports(0, 80).by(1, "x");
    assert_eq!(t.on_transition(&born, &mut out).netns, 7);
    let mut later = at(CLIENT_SK, 1)
        .go(SynSent, Established)
        .ports(5000, 80)
        .by(0, "x");
    later.netns = 0;
    assert_eq!(t.on_transition(&later, &mut out).netns, 7);
}

#[test]
fn snapshot_sockets_are_adopted_without_the_namespace_only_when_unambiguous() {
    let mut e = at(SERVER_SK, S)
        .go(CloseWait, LastAck)
        .ports(8080, 5000)
        .by(1, "x");
    e.netns = 0;
    let mut out = Vec::new();

    let mut t = tracker(100);
    seed_close_wait(&mut t, 7, 0);
    assert_eq!(t.on_transition(&e, &mut out).netns, 7, "unique: adopted");
    assert_eq!(t.tracked(), 1);

    let mut t = tracker(100);
    seed_close_wait(&mut t, 7, 0);
    seed_close_wait(&mut t, 8, 0);
    assert_eq!(t.tracked(), 2);
    assert_eq!(
        t.on_transition(&e, &mut out).netns,
        0,
        "ambiguous: not adopted"
    );
    assert_eq!(t.tracked(), 3, "tracked apart until reconciliation");

    // With the namespace in the event, the right one is adopted.
    let mut t = tracker(100);
    seed_close_wait(&mut t, 7, 0);
    seed_close_wait(&mut t, 8, 0);
    e.netns = 8;
    assert_eq!(t.on_transition(&e, &mut out).netns, 8);
    assert_eq!(t.tracked(), 2);
}

mod model {
    //! Model-based: random interleavings of births, transitions, closes and
    //! address reuse. Whatever happens, an anomaly is raised only for a
    //! state with a threshold, never before it, for a socket really in that
    //! state since then; and every count the table keeps equals a recount.

    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        /// A transition of the socket at address slot `slot`.
        Move {
            slot: u8,
            new: TcpState,
            ending: u8,
            dt_ms: u16,
        },
        /// Time passes and deadlines are checked.
        Expire { dt_ms: u16 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..6, 0usize..12, 0u8..3, 0u16..3000).prop_map(|(slot, st, ending, dt_ms)| {
                Op::Move {
                    slot,
                    new: TcpState::ALL[st],
                    ending,
                    dt_ms,
                }
            }),
            1 => (0u16..20_000).prop_map(|dt_ms| Op::Expire { dt_ms }),
        ]
    }

    fn thresholds() -> Thresholds {
        let mut th = Thresholds::none();
        th.set(CloseWait, Some(Duration::from_secs(2)));
        th.set(FinWait2, Some(Duration::from_secs(5)));
        th.set(FinWait1, Some(Duration::from_secs(3)));
        th.set(SynSent, Some(Duration::from_secs(1)));
        th
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn no_anomaly_before_its_threshold_or_for_a_state_without_one(
            ops in proptest::collection::vec(op(), 1..200)
        ) {
            let th = thresholds();
            let mut t = Tracker::new(Config {
                capacity: 4,
                timewait_capacity: 4,
                thresholds: th.clone(),
                leak_threshold: 1,
                rules: crate::tracker::RuleSettings {
                    pressure: Some(0.5),
                    ..crate::tracker::RuleSettings::off()
                },
            });
            // What the kernel would say each address holds now: (state, since).
            let mut model: HashMap<u64, (TcpState, u64)> = HashMap::new();
            let mut now = 1_000 * S;
            let mut facts = Vec::new();
            for op in ops {
                match op {
                    Op::Move { slot, new, ending, dt_ms } => {
                        now += u64::from(dt_ms) * MS;
                        let sk = 0xffff_0000_0000_0000 + u64::from(slot) * 0x100;
                        let old = model.get(&sk).map_or(Close, |m| m.0);
                        if old == new {
                            continue;
                        }
                        let mut e = at(sk, now).go(old, new).ports(1000 + u16::from(slot), 80).by(1, "p");
                        e.ending = match ending {
                            0 => Ending::Closed { errno: 0 },
                            1 => Ending::TimeWait,
                            _ => Ending::FinWait2,
                        };
                        t.on_transition(&e, &mut facts);
                        if new == Close {
                            model.remove(&sk);
                        } else {
                            model.insert(sk, (new, now));
                        }
                    }
                    Op::Expire { dt_ms } => {
                        now += u64::from(dt_ms) * MS;
                        facts.clear();
                        t.expire(now, &mut facts);
                        for f in &facts {
                            let Fact::Raised(a) = f else { continue };
                            let Kind::Lingering(st) = a.kind() else { continue };
                            let limit = th.get(st);
                            prop_assert!(limit.is_some(), "anomaly for {st} without a threshold");
                            let age = a.ts_ns - a.since_ns;
                            prop_assert!(
                                age >= u64::try_from(limit.map_or(0, |d| d.as_nanos())).unwrap_or(u64::MAX),
                                "{st} raised at {age} ns"
                            );
                            if a.sk != 0 {
                                let m = model.get(&a.sk);
                                prop_assert_eq!(m.map(|m| m.0), Some(st), "not in that state now");
                                prop_assert!(m.is_some_and(|m| m.1 <= a.since_ns));
                            }
                        }
                    }
                }
                prop_assert_eq!(t.table.counts(), t.table.recount());
                prop_assert_eq!(t.destinations().sum(), super::dest_recount(&t));
            }
        }
    }

    #[test]
    fn counts_survive_thousands_of_random_operations() {
        // The same walk, long and unchecked but for the recount at its end.
        let mut t = tracker(64);
        let mut state: HashMap<u64, TcpState> = HashMap::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut facts = Vec::new();
        for i in 0..20_000u64 {
            let sk = 0xffff_0000_0000_0000 + (next() % 80) * 0x40;
            let new = TcpState::ALL[(next() % 12) as usize];
            let old = state.get(&sk).copied().unwrap_or(Close);
            if old == new {
                continue;
            }
            let e = at(sk, i * MS)
                .go(old, new)
                .ports((next() % 50) as u16 + 1, 80)
                .by(1, "x");
            t.on_transition(&e, &mut facts);
            if new == Close {
                state.remove(&sk);
            } else {
                state.insert(sk, new);
            }
            if i % 97 == 0 {
                t.expire(i * MS, &mut facts);
            }
            facts.clear();
        }
        assert_eq!(t.table.counts(), t.table.recount());
        assert_eq!(t.destinations().sum(), super::dest_recount(&t));
    }
}

/// A retransmit or reset on socket `sk` in `state`, on loopback ports 5000 -> 80.
fn segment(sk: u64, ts: u64, state: TcpState, kind: SegmentKind) -> SegmentEvent {
    SegmentEvent {
        ts_ns: ts,
        sk,
        tuple: at(sk, ts).ports(5000, 80).tuple,
        state,
        kind,
    }
}

/// A refused bind is said at once, with who asked and for what, and counted by whether a
/// fixed port was taken or no port of the range was free.
#[test]
fn a_refused_bind_is_a_fact_of_its_own_counted_by_why() {
    let mut t = tracker(100);
    let mut facts = Vec::new();
    for port in [0, 8080, 0] {
        let mut e = segment(
            SERVER_SK,
            S,
            Close,
            SegmentKind::BindInUse {
                pid: 42,
                comm: Comm::new("server"),
                netns: 7,
            },
        );
        e.tuple.sport = port;
        t.on_segment(&e, &mut facts);
    }
    assert_eq!(t.stats().binds_refused, [1, 2]);
    let Fact::BindRefused(b) = &facts[1] else {
        panic!("{facts:?}");
    };
    assert_eq!(
        (b.task.pid, b.task.comm, b.netns, b.port),
        (42, Comm::new("server"), 7, 8080)
    );
    assert_eq!(t.tracked(), 0, "a socket that never bound is not tracked");
}

/// A tracked socket's drops ride on it into its anomaly; every drop is counted by reason and
/// state, a socket the table does not hold by those alone.
#[test]
fn drops_are_counted_by_reason_and_state_and_ride_on_a_tracked_socket() {
    let mut t = tracker(100);
    run(
        &mut t,
        &[
            at(SERVER_SK, 0)
                .go(SynRecv, Established)
                .ports(8080, 5000)
                .by(1, "x"),
            at(SERVER_SK, S)
                .go(Established, CloseWait)
                .ports(8080, 5000)
                .by(1, "x"),
        ],
    );
    let mut facts = Vec::new();
    for (reason, ts) in [(5, S + 1), (5, S + 2), (12, S + 3)] {
        t.on_segment(
            &segment(SERVER_SK, ts, CloseWait, SegmentKind::Drop { reason }),
            &mut facts,
        );
    }
    t.on_segment(
        &segment(
            CLIENT_SK,
            S + 4,
            Established,
            SegmentKind::Drop { reason: 5 },
        ),
        &mut facts,
    );
    assert!(facts.is_empty(), "a drop is no transition: {facts:?}");
    assert_eq!(
        t.stats()
            .drops
            .iter()
            .map(|(&k, &n)| (k, n))
            .collect::<Vec<_>>(),
        [
            ((5, Established), 1),
            ((5, CloseWait), 2),
            ((12, CloseWait), 1)
        ]
    );
    let mut out = Vec::new();
    expire(&mut t, 4 * S, &mut out);
    let [Record::Anomaly(a)] = &out[..] else {
        panic!("{out:?}");
    };
    assert_eq!(
        a.drops,
        Some(crate::record::Drops {
            count: 3,
            reason: crate::drops::name_of(12)
        })
    );
}

#[test]
fn retransmits_ride_on_the_socket_and_a_late_reset_names_it_as_it_was() {
    let mut t = tracker(16);
    let mut out = Vec::new();
    let sk = 0xffff_0001;
    t.on_transition(&at(sk, 1).go(Close, SynSent).by(42, "client"), &mut out);
    t.on_transition(
        &at(sk, 2).go(SynSent, Established).ports(5000, 80),
        &mut out,
    );
    for ts in [3, 4] {
        t.on_segment(
            &segment(sk, ts, Established, SegmentKind::Retransmit),
            &mut out,
        );
    }
    out.clear();
    // An abortive close: CLOSE first, the reset after it.
    t.on_transition(&at(sk, 5).go(Established, Close).ports(5000, 80), &mut out);
    let [Fact::Moved(m)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(m.retransmits, 2);
    out.clear();
    t.on_segment(&segment(sk, 6, Close, SegmentKind::ResetSent), &mut out);
    let [Fact::Reset(r)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(
        (r.state, r.side, r.retransmits, r.netns),
        (Established, Side::Sent, 2, 7)
    );
    assert_eq!(r.owner.map(|o| o.pid), Some(42));
    let s = t.stats();
    assert_eq!(
        (
            s.retransmits[Established as usize],
            s.resets_sent[Established as usize],
            s.resets_received.iter().sum::<u64>()
        ),
        (2, 1, 0)
    );
    assert_eq!(
        t.tracked(),
        0,
        "a retransmit or reset never creates a socket"
    );
}

/// Retransmits and resets are counted apart from transitions: a socket that retransmits in
/// FIN_WAIT1 did not move from FIN_WAIT1 to FIN_WAIT1.
#[test]
fn the_summary_counts_retransmits_and_resets_apart_from_transitions() {
    let mut t = tracker(16);
    let mut out = Vec::new();
    let sk = 0xffff_0002;
    t.on_transition(&at(sk, 1).go(Close, SynSent).by(42, "client"), &mut out);
    t.on_transition(
        &at(sk, 2).go(SynSent, Established).ports(5000, 80),
        &mut out,
    );
    t.on_transition(
        &at(sk, 3).go(Established, FinWait1).ports(5000, 80),
        &mut out,
    );
    for ts in 4..7 {
        t.on_segment(
            &segment(sk, ts, FinWait1, SegmentKind::Retransmit),
            &mut out,
        );
    }
    t.on_segment(
        &segment(sk, 7, FinWait1, SegmentKind::ResetReceived),
        &mut out,
    );
    let s = t.stats();
    let moves: u64 = s.transitions.iter().flatten().sum();
    assert_eq!(moves, 3, "only the three moves: {:?}", s.transitions);
    let text = crate::output::summary::summary(&t);
    assert!(!text.contains("FIN_WAIT1    -> FIN_WAIT1"), "{text}");
    assert!(
        text.contains(
            "\nretransmits and resets: retransmits 3 (FIN_WAIT1 3), SYN-ACK retransmits 0, \
             resets sent 0, resets received 1 (FIN_WAIT1 1)\n"
        ),
        "{text}"
    );
}

/// Sockets met mid-life carry no namespace: a dump of every namespace places each in the one
/// that has it, removes one that none has only when the dump covered them all, and leaves a
/// tuple that two namespaces have unknown.
#[test]
fn sockets_of_unknown_namespace_are_placed_by_a_dump_of_every_namespace() {
    let mut t = tracker(100);
    let mid_life = |sk, sport| {
        let mut e = at(sk, 0).go(Established, CloseWait).ports(sport, 5000);
        e.netns = 0;
        e
    };
    run(
        &mut t,
        &[
            mid_life(SERVER_SK, 8080),
            mid_life(CLIENT_SK, 8081),
            mid_life(LISTEN_SK, 8082),
        ],
    );
    let mut seven = Alive::default();
    seven.insert(&kernel_socket(7, CloseWait, 8080, 5000));
    seven.insert(&kernel_socket(7, CloseWait, 8082, 5000));
    let mut eight = Alive::default();
    eight.insert(&kernel_socket(8, CloseWait, 8082, 5000));
    let dump = [(7, seven), (8, eight)];
    let place = |t: &mut Tracker, complete: bool, start: u64| {
        let suspects = absent(t.place_unknown(&dump, complete, start));
        let mut facts = Vec::new();
        let n = t.confirm_gone(&suspects, start, start, &mut facts);
        (n, records(&facts))
    };
    // A socket met during the dump is not judged.
    assert_eq!(place(&mut t, true, 0).0, 0);
    assert_eq!(t.netns_of(SERVER_SK), 0);
    // Without every namespace, one in none may be in a namespace not dumped.
    assert_eq!(place(&mut t, false, S).0, 0);
    assert_eq!(t.netns_of(SERVER_SK), 7, "found in one namespace: placed");
    assert_eq!(t.netns_of(CLIENT_SK), 0);
    assert_eq!(t.netns_of(LISTEN_SK), 0, "in two: unknown still");
    // Every namespace dumped: the one in none is a ghost; its anomaly ends as reconciled.
    let mut out = Vec::new();
    expire(&mut t, 3 * S, &mut out);
    assert_eq!(out.len(), 3);
    let (removed, out) = place(&mut t, true, 4 * S);
    assert_eq!(removed, 1);
    assert_eq!(t.tracked(), 2);
    assert_eq!(t.netns_of(LISTEN_SK), 0);
    let [Record::AnomalyResolved(r)] = &out[..] else {
        panic!("{out:?}");
    };
    assert_eq!(r.resolution.as_deref(), Some("reconciled"));
    // Placed, the socket is judged with its namespace from now on.
    assert_eq!(
        reconcile(&mut t, 7, &Alive::default(), 5 * S, 5 * S, &mut Vec::new()),
        1
    );
    assert_eq!(t.tracked(), 1);
}

/// An orphan met only as it became a FIN_WAIT2 mini-socket is placed by the mini-socket a
/// dump shows, and follows it on to TIME_WAIT.
#[test]
fn an_orphan_of_unknown_namespace_is_placed_and_followed() {
    let mut t = tracker(100);
    let mut handoff = at(CLIENT_SK, 0).go(FinWait2, Close).ports(5001, 80);
    handoff.ending = Ending::FinWait2;
    handoff.netns = 0;
    run(&mut t, &[handoff]);
    assert_eq!(t.sockets(FinWait2), 1);
    let mut seven = Alive {
        timewait: true,
        adopt_timewait: true,
        ..Alive::default()
    };
    seven.insert(&kernel_socket(7, TimeWait, 5001, 80));
    let dump = [(7, seven)];
    let mut facts = Vec::new();
    assert_eq!(t.place_unknown(&dump, true, S), vec![]);
    assert_eq!(t.reconcile(7, &dump[0].1, S, S, &mut facts), vec![]);
    assert_eq!(t.sockets(FinWait2), 0);
    let tw = t.sockets_in(TimeWait);
    assert_eq!(tw.len(), 1, "followed into TIME_WAIT");
    assert_eq!(tw[0].0, 7, "in its namespace");
}

/// What an exact lookup finds decides a suspect: a full socket still there keeps it; a
/// TIME_WAIT mini-socket in its place (what it became when its events were lost) does not.
#[test]
fn a_lookup_convicts_only_what_no_full_socket_holds() {
    let mut t = tracker(100);
    run(
        &mut t,
        &[
            at(SERVER_SK, 0).go(SynRecv, Established).ports(8080, 5000),
            at(CLIENT_SK, 0).go(SynSent, Established).ports(5000, 8080),
        ],
    );
    let mut facts = Vec::new();
    let suspects = t.reconcile(7, &Alive::default(), S, S, &mut facts);
    assert_eq!(suspects.len(), 2);
    let found: Vec<(u32, Tuple, Found)> = suspects
        .iter()
        .map(|&(n, tu)| {
            let f = if tu.sport == 8080 {
                Found::Full
            } else {
                Found::Mini(TimeWait)
            };
            (n, tu, f)
        })
        .collect();
    assert_eq!(t.confirm_gone(&found, S, S, &mut facts), 1);
    assert_eq!(t.tracked(), 1);
    assert_eq!(t.netns_of(SERVER_SK), 7, "the live one stays");
}

/// A birth at an address the table still holds (its socket's end was lost, and the kernel
/// gave the address to a new socket) starts afresh: the new socket's namespace and owner,
/// nothing of the old one's, and the old one's open anomaly ends as reconciled.
#[test]
fn a_birth_at_a_stale_address_starts_a_new_socket() {
    let mut t = tracker(100);
    run(
        &mut t,
        &[at(SERVER_SK, 0)
            .go(Established, CloseWait)
            .ports(8080, 5000)
            .by(1, "old")],
    );
    let mut out = Vec::new();
    expire(&mut t, 3 * S, &mut out);
    assert_eq!(out.len(), 1, "{out:?}");
    let mut born = at(SERVER_SK, 4 * S)
        .go(Close, SynSent)
        .ports(0, 443)
        .by(2, "new");
    born.netns = 8;
    let (_, out) = run(&mut t, &[born]);
    let [Record::AnomalyResolved(r)] = &out[..] else {
        panic!("{out:?}");
    };
    assert_eq!(r.resolution.as_deref(), Some("reconciled"));
    assert_eq!(t.tracked(), 1);
    assert_eq!(t.netns_of(SERVER_SK), 8);
    assert_eq!(t.sockets(CloseWait), 0);
    assert_eq!(t.sockets(SynSent), 1);
}

/// Issue 20.7 and 20.12: request sockets at start-up are counted as `ss` counts them, and
/// they die with their namespace.
#[test]
fn request_sockets_are_seeded_and_go_with_their_namespace() {
    let mut t = tracker(100);
    let request = |sport| KernelSocket {
        request: true,
        ..kernel_socket(7, SynRecv, 8080, sport)
    };
    let n = t.seed(
        [
            request(5000),
            request(5001),
            kernel_socket(7, Listen, 8080, 0),
        ],
        10 * S,
        &mut Vec::new(),
    );
    assert_eq!(n, 1, "the listener is tracked; request sockets are counted");
    assert_eq!(t.requests(), 2);
    let mut out = Vec::new();
    t.netns_gone(7, 11 * S, &mut out);
    assert_eq!(t.requests(), 0, "a deleted namespace keeps no SYN_RECV");
    assert_eq!(t.tracked(), 0);
}

/// `n` TIME_WAIT mini-sockets from 127.0.0.1 ports 40000.. to 127.0.0.1:80 in `netns`.
fn timewaits(netns: u32, n: u16) -> Vec<KernelSocket> {
    (0..n)
        .map(|i| kernel_socket(netns, TimeWait, 40_000 + i, 80))
        .collect()
}

/// Issue 20.13 and 20.8: TIME_WAIT pressure already there at start-up is said, dated when it
/// is said (not at the mini-sockets' estimated start, which can predate the daemon).
#[test]
fn pressure_present_at_start_up_is_raised_and_dated_now() {
    let mut t = tracker(1000);
    t.set_default_netns_info(NetnsInfo {
        ports: (40_000, 40_099),
        tw_reuse: 0,
    });
    let mut facts = Vec::new();
    let n = t.seed(timewaits(7, 60), 100 * S, &mut facts);
    assert_eq!(n, 60);
    let raised: Vec<&Anomaly> = facts
        .iter()
        .filter_map(|f| match f {
            Fact::Raised(a) => Some(a),
            _ => None,
        })
        .collect();
    assert_eq!(raised.len(), 1, "{facts:?}");
    assert_eq!(
        raised[0].kind(),
        Kind::Rule(crate::tracker::RuleId::TimeWaitPressure)
    );
    assert_eq!(
        raised[0].ts_ns,
        100 * S,
        "said at the snapshot, not 30 s before"
    );
}

/// Issue 20 (soak): the kernel gives a destroyed namespace's inode number to the next one
/// made. Its settings go with it, so the next namespace's own are asked for and judged by.
#[test]
fn a_destroyed_namespaces_settings_are_not_the_next_ones() {
    let mut t = tracker(1000);
    let mut facts = Vec::new();
    t.seed(timewaits(7, 2), 10 * S, &mut facts);
    assert_eq!(t.netns_without_info(), [7]);
    t.set_netns_info(7, NetnsInfo::DEFAULT, 10 * S, &mut facts);
    assert_eq!(t.netns_without_info(), Vec::<u32>::new());
    assert_eq!(t.netns_with_info(), [7]);
    t.netns_gone(7, 11 * S, &mut facts);
    assert_eq!(t.netns_with_info(), Vec::<u32>::new());
    // The new namespace 7 has 100 ports: 60 TIME_WAIT to one place is pressure.
    facts.clear();
    t.seed(timewaits(7, 60), 12 * S, &mut facts);
    assert_eq!(t.netns_without_info(), [7], "asked again");
    assert!(facts.iter().all(|f| !matches!(f, Fact::Raised(_))));
    t.set_netns_info(
        7,
        NetnsInfo {
            ports: (40_000, 40_099),
            tw_reuse: 0,
        },
        12 * S,
        &mut facts,
    );
    let raised = facts
        .iter()
        .filter(|f| matches!(f, Fact::Raised(a) if a.kind() == Kind::Rule(crate::tracker::RuleId::TimeWaitPressure)))
        .count();
    assert_eq!(raised, 1, "{facts:?}");
    // Read again unchanged: nothing is recounted, nothing raised twice.
    facts.clear();
    t.set_netns_info(
        7,
        NetnsInfo {
            ports: (40_000, 40_099),
            tw_reuse: 0,
        },
        13 * S,
        &mut facts,
    );
    assert!(facts.is_empty(), "{facts:?}");
}

/// A verdict that a namespace is gone, taken at 15 s, reaches the engine after the next
/// namespace given its inode number (7) has sockets: what entered its state after the verdict
/// is that namespace's, kept, and its settings are asked for; only the dead one's go (the
/// soak's TIME_WAIT pressure plant was wiped this way and never said).
#[test]
fn a_late_verdict_on_a_dead_namespace_spares_the_next_one_with_its_number() {
    let mut t = tracker(1000);
    let mut facts = Vec::new();
    // The dead namespace's: two TIME_WAIT (estimated since 0) and a listener.
    t.seed(timewaits(7, 2), 10 * S, &mut facts);
    t.seed([kernel_socket(7, Listen, 8080, 0)], 10 * S, &mut facts);
    t.set_netns_info(7, NetnsInfo::DEFAULT, 10 * S, &mut facts);
    // The new namespace 7's: a connection in SYN_SENT and one in TIME_WAIT, after 15 s.
    run(
        &mut t,
        &[
            at(CLIENT_SK, 20 * S).go(Close, SynSent).ports(41_000, 80),
            at(SERVER_SK, 21 * S).go(Close, SynSent).ports(41_001, 80),
            at(SERVER_SK, 22 * S)
                .go(SynSent, Established)
                .ports(41_001, 80),
            at(SERVER_SK, 23 * S)
                .go(Established, FinWait1)
                .ports(41_001, 80),
            at(SERVER_SK, 24 * S)
                .go(FinWait1, FinWait2)
                .ports(41_001, 80),
            at(SERVER_SK, 25 * S)
                .go(FinWait2, TimeWait)
                .ports(41_001, 80),
        ],
    );
    facts.clear();
    t.netns_gone(7, 15 * S, &mut facts);
    let ports = |st| {
        let mut v: Vec<u16> = t.sockets_in(st).iter().map(|s| s.1.sport).collect();
        v.sort_unstable();
        v
    };
    assert_eq!(
        ports(TimeWait),
        [41_001],
        "the dead one's TIME_WAIT go, the new one's stay"
    );
    assert_eq!(ports(SynSent), [41_000]);
    assert!(ports(Listen).is_empty(), "the dead one's listener goes");
    assert_eq!(
        t.netns_without_info(),
        [7],
        "the new one's settings are asked for"
    );
}

/// Issue 20.14: a full TIME_WAIT table refuses a socket once; every later dump meets the same
/// untracked sockets and must not count them again.
#[test]
fn time_wait_refusals_count_sockets_not_dumps() {
    let mut t = tracker(10);
    t.seed(timewaits(7, 15), 10 * S, &mut Vec::new());
    assert_eq!((t.timewait(), t.timewait_refused()), (10, 5));
    for round in 1..=3u64 {
        let mut alive = Alive {
            timewait: true,
            adopt_timewait: true,
            ..Alive::default()
        };
        for s in timewaits(7, 15) {
            alive.insert(&s);
        }
        let now = (10 + round) * S;
        reconcile(&mut t, 7, &alive, now, now, &mut Vec::new());
    }
    assert_eq!(
        (t.timewait(), t.timewait_refused()),
        (10, 5),
        "three dumps of the same sockets"
    );
    // A socket seen entering TIME_WAIT while the table is full is one more.
    let mut out = Vec::new();
    let closed = at(CLIENT_SK, 20 * S).go(FinWait2, Close).ports(50_000, 80);
    let closed = Transition {
        ending: Ending::TimeWait,
        ..closed
    };
    t.on_transition(&closed, &mut out);
    assert_eq!(t.timewait_refused(), 6);
}

/// Issue 22: on 6.1 and 6.12 the kernel reports LISTEN -> SYN_RECV with the listener's tuple
/// (`inet_csk_clone_lock()` sets the state before the addresses). A listener from the
/// snapshot must not be taken over by its child, and the child's birth is said with its own
/// tuple, taken from its next event.
#[test]
fn a_child_reported_with_its_listeners_tuple_takes_the_next_events() {
    let mut t = tracker(100);
    let any: IpAddr = "0.0.0.0".parse().expect("addr");
    let lo: IpAddr = "127.0.0.1".parse().expect("addr");
    t.seed(
        [KernelSocket {
            tuple: Tuple::new(any, 8080, any, 0),
            owner: Some((42, Comm::new("server"))),
            ..kernel_socket(7, Listen, 8080, 0)
        }],
        S,
        &mut Vec::new(),
    );
    let mut out = Vec::new();
    let mut born = at(SERVER_SK, 2 * S).go(Listen, SynRecv);
    born.tuple = Tuple::new(any, 8080, any, 0);
    t.on_transition(&born, &mut out);
    assert!(
        !out.iter().any(|f| matches!(f, Fact::Moved(_))),
        "the birth waits for its tuple: {out:?}"
    );
    let mut up = at(SERVER_SK, 2 * S + 1000).go(SynRecv, Established);
    up.tuple = Tuple::new(lo, 8080, lo, 43818);
    up.netns = 0;
    t.on_transition(&up, &mut out);
    let moved: Vec<&Moved> = out
        .iter()
        .filter_map(|f| match f {
            Fact::Moved(m) => Some(m),
            _ => None,
        })
        .collect();
    assert_eq!(moved.len(), 2, "{out:?}");
    assert_eq!((moved[0].old, moved[0].new), (Listen, SynRecv));
    assert_eq!(
        moved[0].tuple, up.tuple,
        "the birth carries the child's tuple"
    );
    assert_eq!(moved[0].ts_ns, 2 * S, "at the time it happened");
    assert_eq!((moved[1].old, moved[1].new), (SynRecv, Established));
    assert_eq!(moved[1].netns, 7, "the namespace from the birth");
    assert_eq!(t.sockets(Listen), 1, "the seeded listener is still there");
    assert_eq!(t.sockets(Established), 1);
    let owner = moved[1].task;
    assert!(owner.is_some());

    // A child whose next event is lost is said as it was seen, a second later.
    let mut out = Vec::new();
    let mut lone = at(CLIENT_SK, 3 * S).go(Listen, SynRecv);
    lone.tuple = Tuple::new(any, 8080, any, 0);
    t.on_transition(&lone, &mut out);
    t.expire(3 * S + 500 * MS, &mut out);
    assert!(out.is_empty(), "{out:?}");
    t.expire(4 * S, &mut out);
    assert!(
        matches!(&out[..], [Fact::Moved(m)] if m.sk == CLIENT_SK && m.tuple.dport == 0),
        "{out:?}"
    );
}

/// Issue 20.9: a failed connect ends in softirq or in whatever task is on the CPU; its record
/// names the process that called connect().
#[test]
fn a_failed_connect_names_its_caller_not_the_cpu() {
    let mut t = tracker(100);
    let mut out = Vec::new();
    t.on_transition(
        &at(CLIENT_SK, S)
            .go(Close, SynSent)
            .ports(0, 80)
            .by(42, "curl"),
        &mut out,
    );
    out.clear();
    t.on_transition(
        &at(CLIENT_SK, 2 * S)
            .go(SynSent, Close)
            .ports(40000, 80)
            .by(7753, "apt-cache"),
        &mut out,
    );
    let Some(Fact::Moved(m)) = out.first() else {
        panic!("{out:?}");
    };
    let task = m.task.expect("task");
    assert_eq!((task.pid, task.comm.as_str().as_ref()), (42, "curl"));
}

/// A connect whose SYN retransmit (which carries the local port) was lost takes its port from
/// the dump, when only one socket to that destination lacks one (soak: `sport 0` after a
/// stalled reader).
#[test]
fn a_portless_connect_takes_its_port_from_the_dump() {
    let mut t = tracker(100);
    let mut out = Vec::new();
    t.on_transition(
        &at(CLIENT_SK, S)
            .go(Close, SynSent)
            .ports(0, 80)
            .by(42, "curl"),
        &mut out,
    );
    let mut alive = Alive::default();
    alive.insert(&kernel_socket(7, SynSent, 45_000, 80));
    let suspects = t.reconcile(7, &alive, 2 * S, 2 * S, &mut out);
    assert!(suspects.is_empty(), "{suspects:?}");
    assert_eq!(t.table.get(CLIENT_SK).map(|e| e.tuple.sport), Some(45_000));
    // Two to the same place, one port unknown: not guessed.
    let mut t = tracker(100);
    for (sk, sport) in [(CLIENT_SK, 0), (SERVER_SK, 45_001)] {
        t.on_transition(
            &at(sk, S).go(Close, SynSent).ports(sport, 80).by(42, "curl"),
            &mut out,
        );
    }
    let mut alive = Alive::default();
    for sport in [45_000, 45_001, 45_002] {
        alive.insert(&kernel_socket(7, SynSent, sport, 80));
    }
    t.reconcile(7, &alive, 2 * S, 2 * S, &mut out);
    assert_eq!(t.table.get(CLIENT_SK).map(|e| e.tuple.sport), Some(0));
}

/// The per-destination counts recomputed from both tables: what the incremental ones must
/// sum to, whatever the cap folded.
fn dest_recount(t: &Tracker) -> destinations::Counts {
    destinations::STATES.map(|st| {
        let full = t.table.iter().filter(|(_, e)| e.state == st).count();
        let mini = if st == TimeWait { t.timewait.len() } else { 0 };
        (full + mini) as u32
    })
}

/// `n` connections by `comm` from ports `first..` to 127.0.0.1:`dport`, whose peer closed.
fn close_waits(t: &mut Tracker, (first, n): (u16, u16), dport: u16, comm: &str) {
    let mut out = Vec::new();
    for i in 0..n {
        let sk = 0xffff_0000_1000_0000 + u64::from(dport) * 0x10_0000 + u64::from(i) * 0x40;
        let sport = first + i;
        for e in [
            at(sk, 0)
                .go(Close, SynSent)
                .ports(sport, dport)
                .by(42, comm),
            at(sk, MS).go(SynSent, Established).ports(sport, dport),
            at(sk, 2 * MS)
                .go(Established, CloseWait)
                .ports(sport, dport),
        ] {
            t.on_transition(&e, &mut out);
        }
    }
}

#[test]
fn destinations_name_the_upstream_and_its_holder() {
    let mut t = tracker(1000);
    close_waits(&mut t, (40000, 3), 6379, "worker");
    close_waits(&mut t, (41000, 40), 5432, "payments");
    let top: Vec<(String, String, TcpState, u32)> = t
        .destinations()
        .top_holders(10)
        .into_iter()
        .map(|(d, h, st, n)| (d.describe(), t.comm(h.comm).as_str().into_owned(), st, n))
        .collect();
    assert_eq!(
        top,
        [
            (
                "127.0.0.1:5432".to_owned(),
                "payments".to_owned(),
                CloseWait,
                40
            ),
            (
                "127.0.0.1:6379".to_owned(),
                "worker".to_owned(),
                CloseWait,
                3
            ),
        ]
    );
    // The anomalies each carry their destination's count.
    let mut out = Vec::new();
    expire(&mut t, 3 * S, &mut out);
    assert_eq!(out.len(), 43);
    let mut seen: Vec<(String, u32)> = out
        .iter()
        .filter_map(|r| match r {
            Record::Anomaly(a) => a
                .destination
                .as_ref()
                .map(|d| (d.addr.clone(), d.same_state)),
            _ => None,
        })
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen,
        [
            ("127.0.0.1:5432".to_owned(), 40),
            ("127.0.0.1:6379".to_owned(), 3)
        ]
    );
    // The holder closes them: LAST_ACK, then gone; nothing stays behind.
    for i in 0..40u64 {
        let sk = 0xffff_0000_1000_0000 + 5432 * 0x10_0000 + i * 0x40;
        let sport = 41000 + i as u16;
        let mut facts = Vec::new();
        t.on_transition(
            &at(sk, 4 * S)
                .go(CloseWait, LastAck)
                .ports(sport, 5432)
                .by(42, "payments"),
            &mut facts,
        );
        t.on_transition(
            &at(sk, 5 * S).go(LastAck, Close).ports(sport, 5432),
            &mut facts,
        );
    }
    let top = t.destinations().top_holders(10);
    assert_eq!(top.len(), 1, "{top:?}");
    assert_eq!(t.destinations().len(), 1);
    assert_eq!(t.destinations().sum(), dest_recount(&t));
}

#[test]
fn accepted_sockets_count_under_their_listening_port_and_time_wait_under_its_peer() {
    let mut t = tracker(100);
    let (_, _) = run(
        &mut t,
        &[
            at(LISTEN_SK, 0)
                .go(Close, Listen)
                .ports(8080, 0)
                .by(7, "server"),
            at(SERVER_SK, MS).go(Listen, SynRecv).ports(8080, 5000),
            at(SERVER_SK, 2 * MS)
                .go(SynRecv, Established)
                .ports(8080, 5000),
            at(SERVER_SK, 3 * MS)
                .go(Established, CloseWait)
                .ports(8080, 5000),
            // A client of ours closes first: its TIME_WAIT counts under where it went.
            at(CLIENT_SK, 0)
                .go(Close, SynSent)
                .ports(40000, 443)
                .by(9, "curl"),
            at(CLIENT_SK, MS).go(SynSent, Established).ports(40000, 443),
            at(CLIENT_SK, 2 * MS)
                .go(Established, FinWait1)
                .ports(40000, 443)
                .by(9, "curl"),
            at(CLIENT_SK, 3 * MS)
                .go(FinWait1, FinWait2)
                .ports(40000, 443),
        ],
    );
    let mut end = at(CLIENT_SK, 4 * MS).go(FinWait2, Close).ports(40000, 443);
    end.ending = Ending::TimeWait;
    t.on_transition(&end, &mut Vec::new());
    let top: Vec<(String, TcpState, u32)> = t
        .destinations()
        .top_holders(10)
        .into_iter()
        .map(|(d, _, st, n)| (d.describe(), st, n))
        .collect();
    // Equal counts: outbound destinations first.
    assert_eq!(
        top,
        [
            ("127.0.0.1:443".to_owned(), TimeWait, 1),
            ("inbound to :8080".to_owned(), CloseWait, 1),
        ]
    );
    assert_eq!(t.destinations().sum(), dest_recount(&t));
}

#[test]
fn a_scan_of_thousands_of_destinations_stays_within_the_cap() {
    let n = destinations::MAX_DESTINATIONS + 2000;
    let mut t = tracker(n + 10);
    let mut out = Vec::new();
    for i in 0..n as u64 {
        let port = (i % 60_000) as u16 + 1;
        let e = at(0xffff_0000_2000_0000 + i * 0x40, i)
            .go(Close, SynSent)
            .ports(40000, port)
            .by(3, "scanner");
        t.on_transition(&e, &mut out);
    }
    assert_eq!(t.destinations().len(), destinations::MAX_DESTINATIONS);
    let (top, rest) = t.destinations().top(20);
    assert_eq!(top.len(), 20);
    assert_eq!(rest[0] as usize, n - 20, "SYN_SENT past the top 20 summed");
    assert_eq!(t.destinations().sum(), dest_recount(&t));
    for i in 0..n as u64 {
        let port = (i % 60_000) as u16 + 1;
        let e = at(0xffff_0000_2000_0000 + i * 0x40, S)
            .go(SynSent, Close)
            .ports(40000, port);
        t.on_transition(&e, &mut out);
    }
    assert!(t.destinations().is_empty());
    assert_eq!(t.destinations().other(), &destinations::Counts::default());
}

#[test]
fn ages_are_bucketed_per_state_at_the_time_asked() {
    let mut t = tracker(100);
    close_waits(&mut t, (40000, 3), 5432, "app");
    let ages = t.ages(3601 * S);
    let cw = ages.iter().find(|a| a.state == CloseWait).expect("listed");
    // 3601 s old: past the 1 h bucket, within 2 h.
    let i = ages::BUCKETS
        .iter()
        .position(|&le| le == 7200.0)
        .expect("bucket");
    assert_eq!(cw.counts[i], 3);
    assert_eq!(cw.count(), 3);
    let buckets = cw.buckets();
    assert_eq!(buckets[i - 1], (3600.0, 0));
    assert_eq!(buckets[i], (7200.0, 3));
    assert_eq!(buckets[ages::BUCKETS.len() - 1], (14400.0, 0));
    assert_eq!(buckets.last(), Some(&(f64::INFINITY, 0)));
    assert!((cw.sum_s - 3.0 * 3600.998).abs() < 0.01, "{}", cw.sum_s);
    let sw = ages.iter().find(|a| a.state == SynSent).expect("listed");
    assert_eq!(sw.count(), 0);
}

#[test]
fn snapshot_sockets_on_a_listening_port_count_as_inbound() {
    let mut t = tracker(100);
    t.seed(
        [
            kernel_socket(7, Listen, 8080, 0),
            kernel_socket(7, CloseWait, 8080, 5000),
            kernel_socket(7, CloseWait, 40000, 443),
            // A server's TIME_WAIT holds its listening port; a client's, an ephemeral one.
            kernel_socket(7, TimeWait, 8080, 5001),
            kernel_socket(7, TimeWait, 40001, 443),
        ],
        10 * S,
        &mut Vec::new(),
    );
    let mut top: Vec<(String, TcpState, u32)> = t
        .destinations()
        .top_holders(10)
        .into_iter()
        .map(|(d, _, st, n)| (d.describe(), st, n))
        .collect();
    top.sort_by_key(|(d, st, _)| (d.clone(), *st as u8));
    assert_eq!(
        top,
        [
            ("127.0.0.1:443".to_owned(), TimeWait, 1),
            ("127.0.0.1:443".to_owned(), CloseWait, 1),
            ("inbound to :8080".to_owned(), TimeWait, 1),
            ("inbound to :8080".to_owned(), CloseWait, 1),
        ]
    );
    assert_eq!(t.destinations().sum(), dest_recount(&t));
}

#[test]
fn connections_opened_and_closed_per_destination_are_a_rate() {
    let w = destinations::FLOW_WINDOW_NS;
    let mut t = tracker(1000);
    let mut out = Vec::new();
    // 200 short connections to :5432 in one window, closed first by us: 20/s each way.
    for i in 0..200u64 {
        let sk = 0xffff_0000_3000_0000 + i * 0x40;
        let ts = w + i * 10 * MS;
        let sport = 40000 + i as u16;
        let mut end = at(sk, ts + 3 * MS).go(FinWait2, Close).ports(sport, 5432);
        end.ending = Ending::TimeWait;
        for e in [
            at(sk, ts)
                .go(Close, SynSent)
                .ports(sport, 5432)
                .by(5, "proxy"),
            at(sk, ts + MS).go(SynSent, Established).ports(sport, 5432),
            at(sk, ts + 2 * MS)
                .go(Established, FinWait1)
                .ports(sport, 5432)
                .by(5, "proxy"),
            at(sk, ts + 2 * MS)
                .go(FinWait1, FinWait2)
                .ports(sport, 5432),
            end,
        ] {
            t.on_transition(&e, &mut out);
        }
    }
    let lo = "127.0.0.1".parse().expect("addr");
    let dest = destinations::Dest::of(&Tuple::new(lo, 1, lo, 5432), 7, false);
    let r = t.flow_rate(&dest, 2 * w + MS);
    assert_eq!(
        (r.opened, r.closed, r.local_first, r.peer_first, r.reset),
        (20.0, 20.0, 20.0, 0.0, 0.0),
        "the proxy closed each first"
    );
    assert_eq!(t.destinations().count(&dest, TimeWait), 200);
}

/// Issue 17: one list of every kind the configuration can raise, lingering states and host
/// rules alike, with its raised and open counts: metrics and the summary count from it.
#[test]
fn anomaly_counts_list_every_configured_kind_once() {
    let mut t = tracker(100);
    run(
        &mut t,
        &[at(SERVER_SK, 0)
            .go(Established, CloseWait)
            .ports(8080, 5000)
            .by(1, "x")],
    );
    let mut out = Vec::new();
    expire(&mut t, 3 * S, &mut out);
    let counts = t.anomaly_counts();
    let names: Vec<&str> = counts.iter().map(|(k, _, _)| k.name()).collect();
    assert_eq!(names, ["fin_wait2", "close_wait", "time_wait_pressure"]);
    assert_eq!(counts[1].1, 1, "close_wait raised");
    assert_eq!(counts[1].2, 1, "close_wait open");
    let others = [counts[0], counts[2]];
    assert!(
        others.iter().all(|&(_, r, o)| r == 0 && o == 0),
        "{counts:?}"
    );
}

/// Issue 17: an orphan whose end was missed is stale once a new orphan takes its tuple (the
/// kernel holds one mini-socket per tuple): its open FIN_WAIT2 anomaly is resolved with it,
/// never left open on a socket no longer tracked.
#[test]
fn a_stale_orphan_replaced_by_a_new_one_resolves_its_anomaly() {
    let mut t = tracker(100);
    let orphan = |sk: u64, ts: u64| {
        let mut h = at(sk, ts).go(FinWait2, Close).ports(5001, 80).by(1, "x");
        h.ending = Ending::FinWait2;
        h
    };
    run(
        &mut t,
        &[
            at(CLIENT_SK, 0)
                .go(Established, FinWait1)
                .ports(5001, 80)
                .by(1, "x"),
            at(CLIENT_SK, 0)
                .go(FinWait1, FinWait2)
                .ports(5001, 80)
                .by(1, "x"),
            orphan(CLIENT_SK, S),
        ],
    );
    let mut out = Vec::new();
    expire(&mut t, 6 * S, &mut out);
    assert!(
        matches!(&out[..], [Record::Anomaly(a)] if a.state == FinWait2),
        "{out:?}"
    );
    // Its mini-socket's end was missed; a new connection on the same tuple is orphaned too.
    let (_, recs) = run(
        &mut t,
        &[
            at(SERVER_SK, 10 * S)
                .go(Established, FinWait1)
                .ports(5001, 80)
                .by(1, "x"),
            at(SERVER_SK, 10 * S)
                .go(FinWait1, FinWait2)
                .ports(5001, 80)
                .by(1, "x"),
            orphan(SERVER_SK, 11 * S),
        ],
    );
    let resolved: Vec<&Record> = recs
        .iter()
        .filter(|r| matches!(r, Record::AnomalyResolved(_)))
        .collect();
    let [Record::AnomalyResolved(r)] = &resolved[..] else {
        panic!("the stale orphan's anomaly is resolved: {recs:?}");
    };
    assert_eq!(r.resolution.as_deref(), Some("reconciled"));
    assert_eq!(t.sockets(FinWait2), 1, "one orphan per tuple");
}

/// A client that opens a connection per request to one upstream and closes each first is
/// `connection_churn` once a whole flow window shows it, with its TIME_WAIT counted; a quiet
/// window resolves it. A server closing its accepted connections first is not.
#[test]
fn connection_churn_names_the_client_that_opens_a_connection_per_request() {
    use crate::tracker::destinations::FLOW_WINDOW_NS as W;
    let mut t = Tracker::new(Config {
        capacity: 10_000,
        timewait_capacity: 10_000,
        thresholds: Thresholds::none(),
        leak_threshold: 1_000_000,
        rules: crate::tracker::RuleSettings {
            churn: Some(crate::tracker::rules::churn::Limits {
                rate: 50.0,
                max_life: Duration::from_secs(1),
            }),
            ..crate::tracker::RuleSettings::off()
        },
    });
    let mut out = Vec::new();
    // 60/s for one window: 600 connections to :5432 living 5 ms, each closed here first.
    for i in 0..600u64 {
        let (sk, ts, port) = (
            0xffff_8000_0000_0000 + i,
            W + i * (W / 600),
            40_000 + i as u16,
        );
        let conn = |e: Transition| e.ports(port, 5432).by(77, "nginx");
        run(
            &mut t,
            &[
                conn(at(sk, ts).go(Close, SynSent)),
                conn(at(sk, ts + 1_000_000).go(SynSent, Established)),
                conn(at(sk, ts + 5_000_000).go(Established, FinWait1)),
                conn(at(sk, ts + 5_100_000).go(FinWait1, FinWait2)),
            ],
        );
        let mut tw = at(sk, ts + 5_200_000).go(FinWait2, Close).ports(port, 5432);
        tw.ending = Ending::TimeWait;
        run(&mut t, &[tw]);
    }
    expire(&mut t, 2 * W - 1, &mut out);
    assert!(
        out.is_empty(),
        "judged only once the window is whole: {out:?}"
    );
    expire(&mut t, 2 * W + 1, &mut out);
    let [Record::Anomaly(a)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(
        (a.kind, a.dport, a.pid),
        (
            Kind::Rule(crate::tracker::RuleId::ConnectionChurn),
            5432,
            Some(77)
        )
    );
    let c = a.churn.expect("churn");
    assert_eq!(
        (c.opened_per_s, c.median_life_ms, c.closed_here),
        (60.0, 8, 1.0)
    );
    assert_eq!(c.time_wait, 600, "the TIME_WAIT to the destination");
    // Nothing in the next window: resolved.
    out.clear();
    expire(&mut t, 3 * W + 1, &mut out);
    let [Record::AnomalyResolved(a)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(a.resolution.as_deref(), Some("below_threshold"));
}

/// A late event (its CPU stalled past the merge's holdback) is said, but never moves a socket
/// back: the client stays in FIN_WAIT2, as `ss` shows it, and a late close of an address's
/// old socket leaves the new one there tracked.
#[test]
fn a_late_event_is_said_but_never_moves_a_socket_back() {
    let mut t = tracker(100);
    let (_, out) = run(
        &mut t,
        &[
            at(CLIENT_SK, S)
                .go(Close, SynSent)
                .ports(0, 80)
                .by(10, "curl"),
            at(CLIENT_SK, S + MS)
                .go(SynSent, Established)
                .ports(5000, 80),
            // ESTABLISHED -> FIN_WAIT1 at 2 s reaches the daemon after the ACK's FIN_WAIT2.
            at(CLIENT_SK, 2 * S + MS)
                .go(FinWait1, FinWait2)
                .ports(5000, 80),
        ],
    );
    assert!(out.is_empty());
    let mut facts = Vec::new();
    let applied = t.on_transition(
        &at(CLIENT_SK, 2 * S)
            .go(Established, FinWait1)
            .ports(5000, 80)
            .by(10, "curl"),
        &mut facts,
    );
    assert_eq!(
        applied.prev_state_ms, None,
        "its time in ESTABLISHED is not known"
    );
    assert!(
        matches!(&facts[..], [Fact::Moved(m)] if (m.old, m.new) == (Established, FinWait1)),
        "said: {facts:?}"
    );
    assert_eq!((t.sockets(FinWait2), t.sockets(FinWait1)), (1, 0));
    assert_eq!(
        t.stats().transitions[Established as usize][FinWait1 as usize],
        1
    );

    // The address is freed and a new socket born there; the old one's close comes late.
    let (_, out) = run(
        &mut t,
        &[
            at(CLIENT_SK, 3 * S).go(FinWait2, Close).ports(5000, 80),
            at(CLIENT_SK, 4 * S + MS)
                .go(Close, SynSent)
                .ports(0, 443)
                .by(11, "wget"),
            at(CLIENT_SK, 4 * S).go(Established, Close).ports(6000, 80),
        ],
    );
    assert!(out.is_empty());
    assert_eq!((t.tracked(), t.sockets(SynSent)), (1, 1));
    // And the late birth of a socket already seen further on does not restart it.
    let (prev, _) = run(
        &mut t,
        &[
            at(SERVER_SK, 5 * S + MS)
                .go(SynSent, Established)
                .ports(7000, 80),
            at(SERVER_SK, 5 * S).go(Close, SynSent).ports(0, 80),
        ],
    );
    assert_eq!(prev, [None, None]);
    assert_eq!((t.sockets(Established), t.sockets(SynSent)), (1, 1));
}
