//! The socket table and its state machine: timing each socket in each
//! state (TIME_WAIT and orphaned FIN_WAIT2 mini-sockets included),
//! attributing owners, raising and resolving anomalies, counting.
//!
//! Pure: time comes from event timestamps and the `now_ns` callers pass
//! (kernel CLOCK_MONOTONIC), and what the kernel's socket table says comes
//! in as plain data, so tests drive it with a fake clock. It speaks in
//! [`Fact`]s; the outputs turn them into records.
//!
//! - `mod.rs`: the event path (a transition in, facts out);
//! - `segments.rs`: retransmits and resets (segment events) (`recent.rs`: the last closes, for late resets);
//! - `minisock.rs`: the second half of the close, after `tcp_time_wait()`;
//! - `answers.rs`: seeding, reconciliation, sock_diag answers, listener polls, host readings;
//! - `table.rs`, `timewait.rs`: the two tables and their counts (`cgroups.rs`,
//!   `destinations.rs`: per workload and per destination);
//! - `rules/`: the anomaly rules, one per file, and the `Rule` trait the host rules share;
//! - `view.rs`: what the outputs read (`ages.rs`: the ages of live sockets, when asked);
//!   `stats.rs`: counters for the life of the daemon.

pub mod ages;
mod answers;
pub mod cgroups;
pub mod destinations;
pub mod facts;
mod minisock;
mod recent;
pub mod rules;
mod segments;
pub mod stats;
pub mod table;
pub mod timewait;
mod view;

use std::collections::{HashMap, HashSet};

pub use self::{
    answers::{Alive, Found, KernelSocket, MAX_SWEPT_TIMEWAIT, Sweep, Swept},
    destinations::FirstClose,
    facts::{
        AcceptQueue, Anomaly, BindRefused, DestCount, Detail, Fact, Kind, Leak, Moved, Owner,
        Reset, Resolution, Side, SocketDrops, Task, Via,
    },
    rules::backlog::Listening,
    rules::orphans::HostTcp,
    rules::pressure::NetnsInfo,
    rules::{RuleDetail, RuleId, RuleSettings},
};
use self::{
    recent::{Closed, RecentCloses},
    rules::HostRules,
    rules::deadlines::{Deadline, Deadlines},
    rules::thresholds::Thresholds,
    stats::Stats,
    table::{Comms, Entry, OwnerRef, Table, flag},
    timewait::TimeWaitTable,
};
use crate::{
    decode::{Ending, Transition},
    socket::Tuple,
    state::TcpState,
};

#[derive(Clone, Debug)]
pub struct Config {
    /// Hard cap on tracked full sockets (and FIN_WAIT2 mini-sockets).
    pub capacity: usize,
    /// Hard cap on tracked TIME_WAIT mini-sockets.
    pub timewait_capacity: usize,
    pub thresholds: Thresholds,
    /// Leak rule: more than this many sockets in a lingering state.
    pub leak_threshold: u64,
    /// Each host rule's setting (None: off), by `--threshold NAME=VALUE` or its default.
    pub rules: RuleSettings,
}

/// How a TIME_WAIT mini-socket came to be tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MetTimeWait {
    /// Its socket's close was seen: the time it entered is exact.
    Event,
    /// The start-up snapshot, at `now_ns`: its entry time is estimated from its timer.
    Seed { now_ns: u64 },
    /// A reconciliation's dump, at `now_ns`: estimated too, and met again by every dump.
    Dump { now_ns: u64 },
}

/// What applying one transition told us.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Applied {
    /// Milliseconds spent in the old state, when we saw it entered.
    pub prev_state_ms: Option<f64>,
    /// The socket's network namespace: from the event when it carries it,
    /// else remembered from the socket's birth (0 = unknown).
    pub netns: u32,
}

/// Births whose record may wait for their tuple at once; past this they are said as seen.
const MAX_HALF_BORN: usize = 65_536;
/// How long a birth's record waits for the child's next event.
const HALF_BORN_WAIT_NS: u64 = 1_000_000_000;

/// The hasher of maps keyed by what peers choose (tuples, destinations): keyed at random
/// per map, so a peer cannot aim its ports at one bucket, and several times cheaper than
/// SipHash, which showed in the profile (foldhash's quality variant). Not "seeded": that
/// word means the start-up snapshot here (`flag::SEEDED`).
pub(crate) type PeerKeyHasher = foldhash::quality::RandomState;

/// Sockets whose drops are kept one by one; past this (a drop storm over a million sockets)
/// they are still counted by reason and state.
pub const MAX_SOCKET_DROPS: usize = 65_536;

/// Keys below this are ours, not kernel addresses (which live in the top
/// half of the address space): snapshot sockets and mini-sockets.
const SYNTHETIC_LIMIT: u64 = 1 << 48;

pub struct Tracker {
    cfg: Config,
    table: Table,
    timewait: TimeWaitTable,
    comms: Comms,
    deadlines: Deadlines,
    next_epoch: u64,
    /// FxHash: looked up on every accepted socket; keyed by local ports,
    /// which only local processes choose (at most 64k per namespace).
    listeners: rustc_hash::FxHashMap<(u32, u16), OwnerRef>,
    /// Snapshot sockets not yet seen in an event, by tuple without the
    /// namespace (events only carry it when a socket is born).
    seeded: HashMap<Tuple, Vec<u64>, PeerKeyHasher>,
    /// Namespaces whose port range and `tcp_tw_reuse` the pressure rule
    /// wants and does not have yet.
    unknown_netns: std::collections::HashSet<u32>,
    /// FIN_WAIT2 mini-sockets (orphans) by namespace and tuple: their
    /// (synthetic) keys in the table. Peers choose half of each tuple, so a
    /// seeded hasher (foldhash: every server that closes first passes
    /// through here, and SipHash showed in the profile).
    orphans: HashMap<(u32, Tuple), u64, PeerKeyHasher>,
    next_key: u64,
    /// The rules that keep their own anomalies.
    rules: HostRules,
    /// The last closes, for the resets sent after them.
    recent: RecentCloses,
    /// Request sockets per namespace, from the last dump.
    requests: HashMap<u32, u64>,
    /// Listening ports (namespace, port) of the start-up snapshot so far: the snapshot comes
    /// in parts, listeners first, and a TIME_WAIT mini-socket on one is a server's.
    seed_listening: HashSet<(u32, u16)>,
    /// Births reported with their listener's tuple, whose record waits for the child's next
    /// event (see `on_unknown`). Keyed by kernel address, which no peer chooses.
    half_born: rustc_hash::FxHashMap<u64, Moved>,
    /// Connections opened and closed per destination, for their rates.
    flows: destinations::Flows,
    /// Packets of tracked sockets the drop hook saw dropped, by kernel address (which no
    /// peer chooses); at most [`MAX_SOCKET_DROPS`] sockets, pruned of the closed ones.
    socket_drops: rustc_hash::FxHashMap<u64, SocketDrops>,
    /// Sockets refused at birth because the table was full.
    refused: u64,
    /// An event was lost and no reconciliation has run since: the table
    /// may hold ghosts, so no anomaly is raised from it.
    incomplete: bool,
    stats: Stats,
}

impl Tracker {
    pub fn new(cfg: Config) -> Self {
        Self {
            table: Table::new(cfg.capacity),
            timewait: TimeWaitTable::new(cfg.timewait_capacity),
            rules: HostRules::new(&cfg.rules),
            recent: RecentCloses::default(),
            requests: HashMap::new(),
            seed_listening: HashSet::new(),
            half_born: rustc_hash::FxHashMap::default(),
            cfg,
            comms: Comms::default(),
            deadlines: Deadlines::default(),
            next_epoch: 1,
            listeners: rustc_hash::FxHashMap::default(),
            seeded: HashMap::default(),
            unknown_netns: std::collections::HashSet::new(),
            orphans: HashMap::default(),
            next_key: 1,
            flows: destinations::Flows::default(),
            socket_drops: rustc_hash::FxHashMap::default(),
            refused: 0,
            incomplete: false,
            stats: Stats::new(),
        }
    }

    fn task(&self, o: OwnerRef) -> Task {
        Task {
            pid: o.pid,
            comm: self.comms.get(o.comm),
        }
    }

    fn synthetic_key(&mut self) -> u64 {
        let k = self.next_key;
        self.next_key = (self.next_key + 1) % SYNTHETIC_LIMIT;
        if self.next_key == 0 {
            self.next_key = 1;
        }
        k
    }

    /// Applies one transition.
    pub fn on_transition(&mut self, t: &Transition, out: &mut Vec<Fact>) -> Applied {
        if !self.half_born.is_empty()
            && let Some(mut m) = self.half_born.remove(&t.sk)
        {
            // The child's next event, microseconds later, carries the tuple its birth lacked.
            if t.tuple.dport != 0 {
                m.tuple = t.tuple;
            }
            out.push(Fact::Moved(m));
        }
        let e = match self.table.get(t.sk) {
            Some(e) if e.has(flag::ENTRY_SEEN) && t.ts_ns < e.since_ns => {
                let e = *e;
                return self.late(t, &e, out);
            }
            Some(_) if is_birth(t) => {
                // The kernel freed the socket this address held and made a new one there:
                // the old one's end was lost. It is gone; nothing of it carries over.
                self.forget_ghost(t.sk, t.ts_ns, Resolution::Reconciled, out);
                return self.on_unknown(t, out);
            }
            Some(e) => *e,
            // A birth is a new socket, never one of the snapshot's: on kernels that report a
            // child with its listener's tuple, a seeded listener would otherwise be taken over.
            None if is_birth(t) => return self.on_unknown(t, out),
            None => match self.adopt_seeded(t).then(|| self.table.get(t.sk).copied()) {
                Some(Some(e)) => e,
                _ => return self.on_unknown(t, out),
            },
        };
        if t.new == TcpState::Close {
            self.flows
                .count(e.dest(), t.ts_ns, destinations::FlowEvent::Closed);
        }
        match destinations::FirstClose::of(t.old, t.new) {
            Some(destinations::FirstClose::Local) => {
                let closer = e.owner().map(|o| self.task(o));
                let life = t.ts_ns.saturating_sub(e.born_ns);
                self.flows.closed_here(e.dest(), t.ts_ns, life, closer);
            }
            Some(first) => {
                self.flows
                    .count(e.dest(), t.ts_ns, destinations::FlowEvent::Ending(first));
            }
            None => {}
        }
        let netns = if e.netns == 0 { t.netns } else { e.netns };
        let cgroup = if e.cgroup == 0 { t.cgroup } else { e.cgroup };
        let seen = e.state == t.old && e.has(flag::ENTRY_SEEN);
        let prev_ns = seen.then(|| t.ts_ns.saturating_sub(e.since_ns));
        let applied = Applied {
            prev_state_ms: prev_ns.map(|ns| ns as f64 / 1e6),
            netns,
        };
        if t.new == TcpState::Close && t.ending == Ending::FinWait2 {
            // The orphan lives on as a mini-socket, still in FIN_WAIT2:
            // nothing to report, and its clock keeps running.
            self.detach_orphan(t.sk, netns, t.ts_ns, out);
            return applied;
        }
        let new = reported_state(t);
        self.before_move(t, netns, out);
        // A failed connect ends in softirq or in whatever task is on the CPU: the record names
        // the process that called connect().
        let caller = ((t.old, t.new) == (TcpState::SynSent, TcpState::Close))
            .then(|| e.owner().map(|o| self.task(o)))
            .flatten();
        self.report(out, t, (netns, cgroup, new, prev_ns), (e.retrans, caller));
        if e.has(flag::ANOMALY_OPEN) {
            self.resolve(out, t.sk, &e, t.ts_ns, Resolution::LeftState);
        }
        match new {
            TcpState::Close => {
                let closed = Closed {
                    state: t.old,
                    netns,
                    tuple: tuple_of(&t.tuple, &e),
                    owner: e.owner().map(|o| self.task(o)),
                    retrans: e.retrans,
                };
                self.recent.push(t.sk, closed);
                self.forget(t.sk);
            }
            TcpState::TimeWait => {
                self.forget(t.sk);
                let active = e.has(flag::ACTIVE);
                self.enter_timewait(
                    netns,
                    &tuple_of(&t.tuple, &e),
                    t.ts_ns,
                    MetTimeWait::Event,
                    active,
                    out,
                );
            }
            _ => self.advance(t, (netns, cgroup), &e),
        }
        self.after_move(t, netns, out);
        applied
    }

    /// An event older than the last one applied at its address: its CPU was held between
    /// reading the clock and publishing for longer than the merge's holdback (a busy host, a
    /// VM's stolen time), and a newer one went first. It happened, so it is said and counted;
    /// the table keeps the newer state, or the socket that has taken the address since.
    /// Applied in arrival order instead, a late ESTABLISHED -> FIN_WAIT1 would put a socket
    /// back in FIN_WAIT1 from FIN_WAIT2, and a late close would forget its successor.
    fn late(&mut self, t: &Transition, e: &Entry, out: &mut Vec<Fact>) -> Applied {
        let netns = if t.netns == 0 { e.netns } else { t.netns };
        let cgroup = if t.cgroup == 0 { e.cgroup } else { t.cgroup };
        self.report(out, t, (netns, cgroup, reported_state(t), None), (0, None));
        Applied {
            prev_state_ms: None,
            netns,
        }
    }

    /// A socket we have never seen: track it unless it is closing.
    fn on_unknown(&mut self, t: &Transition, out: &mut Vec<Fact>) -> Applied {
        let new = reported_state(t);
        if t.new == TcpState::Close && t.ending == Ending::FinWait2 {
            // An orphan we never saw: track the mini-socket from now.
            let mut e = Entry::new(t.tuple, t.netns, TcpState::FinWait2, t.ts_ns, flag::SEEDED);
            e.cgroup = t.cgroup;
            if self.table.insert(t.sk, e).is_ok() {
                self.enter_deadline(t.sk);
                self.detach_orphan(t.sk, t.netns, t.ts_ns, out);
            }
            return Applied {
                prev_state_ms: None,
                netns: t.netns,
            };
        }
        self.before_move(t, t.netns, out);
        self.report(out, t, (t.netns, t.cgroup, new, None), (0, None));
        if (t.old, t.new) == (TcpState::Listen, TcpState::SynRecv)
            && t.tuple.dport == 0
            && self.half_born.len() < MAX_HALF_BORN
            && let Some(Fact::Moved(m)) = out.pop()
        {
            // Before 6.13 or so the kernel sets a child's state before copying its addresses
            // from the request (`inet_csk_clone_lock()`), so this event shows the listener's
            // tuple: its record waits for the next event, which has the real one.
            self.half_born.insert(t.sk, m);
        }
        match new {
            TcpState::Close => {}
            TcpState::TimeWait => {
                // Unknown socket: a listener's port is not ephemeral.
                let active = !self.listeners.contains_key(&(t.netns, t.tuple.sport));
                self.enter_timewait(t.netns, &t.tuple, t.ts_ns, MetTimeWait::Event, active, out);
            }
            _ => self.create(t),
        }
        self.after_move(t, t.netns, out);
        Applied {
            prev_state_ms: None,
            netns: t.netns,
        }
    }

    /// Pushes the transition fact and counts it.
    /// Reports `t` as a move to `new` (the state the kernel shows), timed `prev_ns` in the old
    /// state; `retransmits` is what the socket saw, carried on its end; `task`, the process
    /// to name instead of the one on the CPU.
    fn report(
        &mut self,
        out: &mut Vec<Fact>,
        t: &Transition,
        (netns, cgroup, new, prev_ns): (u32, u64, TcpState, Option<u64>),
        (retransmits, task): (u16, Option<Task>),
    ) {
        self.stats.transition(t.old, new, prev_ns);
        if new == TcpState::Close {
            let reason = t.close_reason();
            self.stats.closed(t.old, &t.tuple, reason);
            if reason == Some(crate::decode::NO_LOCAL_PORT) {
                let by = task.or(Some(Task {
                    pid: t.pid,
                    comm: t.comm,
                }));
                for r in self.rules.each_mut() {
                    r.refused_port(netns, &t.tuple, by);
                }
            }
        }
        out.push(Fact::Moved(Moved {
            ts_ns: t.ts_ns,
            sk: t.sk,
            netns,
            cgroup,
            tuple: t.tuple,
            old: t.old,
            new,
            prev_ns,
            task: task.or(Some(Task {
                pid: t.pid,
                comm: t.comm,
            })),
            via: Via::Event,
            reason: if new == TcpState::Close {
                t.close_reason()
            } else {
                None
            },
            retransmits: if matches!(new, TcpState::Close | TcpState::TimeWait) {
                retransmits
            } else {
                0
            },
        }));
    }

    /// Moves a tracked full socket (`e`, as it was) into `t.new`.
    fn advance(&mut self, t: &Transition, (netns, cgroup): (u32, u64), e: &Entry) {
        let owner = attribute(&mut self.comms, &self.listeners, t, netns, e.owner());
        let epoch = self.epoch();
        let updated = self.table.update(t.sk, |e| {
            e.state = t.new;
            e.since_ns = t.ts_ns;
            e.epoch = epoch;
            e.netns = netns;
            e.cgroup = cgroup;
            // A new state wants a fresh owner check: after close() no fd holds it.
            e.flags = (e.flags | flag::ENTRY_SEEN)
                & !(flag::SEEDED | flag::ANOMALY_OPEN | flag::VERIFIED);
            if t.tuple.sport != 0 {
                e.tuple.saddr = t.tuple.saddr;
                e.tuple.sport = t.tuple.sport;
            }
            e.tuple.daddr = t.tuple.daddr;
            e.tuple.dport = t.tuple.dport;
            *e = e.with_owner(owner);
        });
        if let Some(e) = updated {
            if let Some(o) = owner {
                self.register_listener(t, &e, o);
            }
            self.schedule(t.sk, &e);
        }
    }

    /// A socket born under our eyes: start tracking it, unless full.
    fn create(&mut self, t: &Transition) {
        let owner = attribute(&mut self.comms, &self.listeners, t, t.netns, None);
        // Opened by connect(): its local port is an ephemeral one.
        let active = match (t.old, t.new) {
            (TcpState::Close, TcpState::SynSent) => flag::ACTIVE,
            // A listener's child, at its birth or first seen completing its handshake.
            (TcpState::Listen | TcpState::SynRecv, _) => flag::ACCEPTED,
            _ => 0,
        };
        if matches!(t.old, TcpState::Close | TcpState::Listen) && active != 0 {
            // Counted whether or not the table has room: a rate of births, not of entries.
            let dest = destinations::Dest::of(&t.tuple, t.netns, active == flag::ACCEPTED);
            self.flows
                .count(dest, t.ts_ns, destinations::FlowEvent::Opened);
        }
        let mut e = Entry::new(t.tuple, t.netns, t.new, t.ts_ns, flag::ENTRY_SEEN | active)
            .with_owner(owner);
        e.cgroup = t.cgroup;
        e.epoch = self.epoch();
        if self.table.insert(t.sk, e).is_err() {
            // Counted once per socket: only at its birth.
            if matches!(t.old, TcpState::Close | TcpState::Listen) {
                self.refused += 1;
            }
            return;
        }
        if let Some(o) = owner {
            self.register_listener(t, &e, o);
        }
        self.schedule(t.sk, &e);
    }

    fn register_listener(&mut self, t: &Transition, e: &Entry, o: OwnerRef) {
        if t.old == TcpState::Close && t.new == TcpState::Listen {
            self.listeners.insert((e.netns, e.tuple.sport), o);
        }
    }

    fn epoch(&mut self) -> u64 {
        self.next_epoch += 1;
        self.next_epoch
    }

    /// Schedules the anomaly check for the state entry `key` is in now.
    fn enter_deadline(&mut self, key: u64) {
        if let Some(e) = self.table.get(key).copied() {
            self.schedule(key, &e);
        }
    }

    /// Schedules the anomaly check for entry `e` (at `key`).
    fn schedule(&mut self, key: u64, e: &Entry) {
        if let Some(d) = self.cfg.thresholds.get(e.state) {
            self.deadlines.push(Deadline {
                at_ns: e.since_ns.saturating_add(saturating_ns(d)),
                key,
                epoch: e.epoch,
            });
        }
    }

    /// Removes a socket that closed or vanished, and what refers to it.
    fn forget(&mut self, key: u64) -> Option<Entry> {
        let e = self.table.remove(key)?;
        if key < SYNTHETIC_LIMIT {
            let addrs = e.tuple;
            if let Some(keys) = self.seeded.get_mut(&addrs) {
                keys.retain(|&k| k != key);
                if keys.is_empty() {
                    self.seeded.remove(&addrs);
                }
            }
            if self.orphans.get(&(e.netns, e.tuple)) == Some(&key) {
                self.orphans.remove(&(e.netns, e.tuple));
            }
        }
        if e.state == TcpState::Listen
            && self.listeners.get(&(e.netns, e.tuple.sport)).copied() == e.owner()
        {
            self.listeners.remove(&(e.netns, e.tuple.sport));
        }
        Some(e)
    }

    /// Moves a snapshot socket to its real kernel address on its first event.
    fn adopt_seeded(&mut self, t: &Transition) -> bool {
        if self.seeded.is_empty() {
            return false;
        }
        let Some(keys) = self.seeded.get_mut(&t.tuple) else {
            return false;
        };
        // The same tuple can exist in several namespaces (containers).
        // Without the event's namespace, adopt only an unambiguous match;
        // an ambiguous one is left to reconciliation.
        let table = &self.table;
        let pick = if t.netns != 0 {
            keys.iter()
                .position(|&k| table.get(k).is_some_and(|e| e.netns == t.netns))
        } else if keys.len() == 1 {
            Some(0)
        } else {
            None
        };
        let Some(i) = pick else {
            return false;
        };
        let seed_key = keys.swap_remove(i);
        if keys.is_empty() {
            self.seeded.remove(&t.tuple);
        }
        self.table.rekey(seed_key, t.sk)
    }

    /// Raises an anomaly for every socket whose time in its state ran out.
    pub fn expire(&mut self, now_ns: u64, out: &mut Vec<Fact>) {
        if !self.half_born.is_empty() {
            // A child whose next event never came (lost): its birth is said as it was seen.
            let late: Vec<u64> = self
                .half_born
                .iter()
                .filter(|(_, m)| m.ts_ns.saturating_add(HALF_BORN_WAIT_NS) <= now_ns)
                .map(|(&k, _)| k)
                .collect();
            for k in late {
                if let Some(m) = self.half_born.remove(&k) {
                    out.push(Fact::Moved(m));
                }
            }
        }
        let dests = self.table.destinations();
        let tw = |d: &destinations::Dest| dests.count(d, TcpState::TimeWait);
        let window = match self.flows.last_whole(now_ns) {
            Some((start_ns, flows)) => rules::FlowWindow {
                start_ns,
                flows: Some(flows),
                time_wait: &tw,
                now_ns,
            },
            None => rules::FlowWindow {
                start_ns: (now_ns - now_ns % destinations::FLOW_WINDOW_NS)
                    .saturating_sub(destinations::FLOW_WINDOW_NS),
                flows: None,
                time_wait: &|_| 0,
                now_ns,
            },
        };
        for r in self.rules.each_mut() {
            r.flow_window(&window, out);
            r.tick(now_ns, out);
        }
        if self.incomplete {
            // Deadlines wait in the heap until reconciliation says which
            // sockets are real.
            return;
        }
        while let Some(d) = self.deadlines.pop_due(now_ns) {
            let Some(e) = self.table.get(d.key).copied() else {
                continue;
            };
            if e.epoch != d.epoch || e.has(flag::ANOMALY_OPEN) {
                continue;
            }
            self.table.update(d.key, |e| e.flags |= flag::ANOMALY_OPEN);
            self.stats.raised(e.state);
            out.push(Fact::Raised(self.anomaly(d.key, &e, now_ns)));
        }
        if self.deadlines.needs_rebuild(self.table.len()) {
            let th = &self.cfg.thresholds;
            self.deadlines
                .rebuild(self.table.iter().filter_map(|(key, e)| {
                    let d = th.get(e.state)?;
                    (!e.has(flag::ANOMALY_OPEN)).then_some(Deadline {
                        at_ns: e.since_ns.saturating_add(saturating_ns(d)),
                        key,
                        epoch: e.epoch,
                    })
                }));
        }
    }

    /// An owner check found the process holding the fd of `a`'s socket: from now on it is
    /// the owner everywhere (the leak rule, top owners, resolutions, resets), until a
    /// transition in a process's own context or a later check says otherwise. Ignored when
    /// the socket has moved on since the anomaly was raised.
    pub fn holder_verified(&mut self, a: &Anomaly, task: Task) {
        let same = |e: &Entry| {
            e.netns == a.netns && e.state == a.state && e.tuple == a.tuple && !e.has(flag::ORPHAN)
        };
        let key = if a.sk != 0 {
            self.table.get(a.sk).is_some_and(same).then_some(a.sk)
        } else {
            // A snapshot socket, under a key of ours.
            self.table.iter().find(|(_, e)| same(e)).map(|(k, _)| k)
        };
        let Some(key) = key else {
            return;
        };
        let o = OwnerRef {
            pid: task.pid,
            comm: self.comms.intern(task.comm),
        };
        self.table.update(key, |e| {
            *e = e.with_owner(Some(o));
            e.flags |= flag::VERIFIED;
        });
    }

    /// Says every birth still waiting for its tuple, as it was seen: the daemon is stopping.
    pub fn flush_births(&mut self, out: &mut Vec<Fact>) {
        let mut waiting: Vec<Moved> = self.half_born.drain().map(|(_, m)| m).collect();
        waiting.sort_unstable_by_key(|m| m.ts_ns);
        out.extend(waiting.into_iter().map(Fact::Moved));
    }

    /// Says whether the table can be trusted: false after a lost event,
    /// until the next reconciliation.
    pub fn set_incomplete(&mut self, incomplete: bool) {
        self.incomplete = incomplete;
    }

    pub fn is_incomplete(&self) -> bool {
        self.incomplete
    }

    fn resolve(&mut self, out: &mut Vec<Fact>, key: u64, e: &Entry, now_ns: u64, why: Resolution) {
        out.push(Fact::Resolved(self.anomaly(key, e, now_ns), why));
    }

    /// Applies the leak rule; call once per leak interval.
    pub fn check_leaks(&mut self, now_ns: u64, out: &mut Vec<Fact>) {
        let threshold = self.cfg.leak_threshold;
        for s in self.table.leaks_mut().check(threshold) {
            self.stats.leak();
            out.push(Fact::Leak(Leak {
                ts_ns: now_ns,
                task: self.task(s.owner),
                state: s.state,
                count: s.count,
                previous: s.previous,
                threshold,
            }));
        }
    }

    /// The anomaly a tracked socket stands for, as of `now_ns`.
    fn anomaly(&self, key: u64, e: &Entry, now_ns: u64) -> Anomaly {
        let last = e.owner().map(|o| self.task(o));
        let (sk, owner) = if e.has(flag::ORPHAN) {
            (0, Owner::Orphan { last })
        } else {
            // Snapshot sockets have no kernel address until their first event
            // (and keep reporting 0 while their age is a lower bound).
            let sk = if key < SYNTHETIC_LIMIT || e.has(flag::SEEDED) {
                0
            } else {
                key
            };
            let source = if e.has(flag::VERIFIED) {
                Owner::Verified
            } else {
                Owner::Attributed
            };
            (sk, last.map_or(Owner::Unknown, source))
        };
        Anomaly {
            state: e.state,
            ts_ns: now_ns,
            since_ns: e.since_ns,
            lower_bound: e.has(flag::SEEDED),
            sk,
            netns: e.netns,
            cgroup: e.cgroup,
            tuple: e.tuple,
            owner,
            vitals: None,
            holder_cgroup: None,
            other_holders: Vec::new(),
            drops: self.socket_drops.get(&key).copied(),
            detail: Detail::Lingering {
                listener_queue: None,
                destination: destinations::STATES
                    .contains(&e.state)
                    .then(|| {
                        let dest = e.dest();
                        let same_state = self.table.destinations().count(&dest, e.state);
                        DestCount { dest, same_state }
                    })
                    .filter(|d| d.same_state > 0),
            },
        }
    }
}

/// The state a transition really enters: `-> CLOSE` is TIME_WAIT when a
/// timewait mini-socket took the socket's place.
fn reported_state(t: &Transition) -> TcpState {
    match (t.new, t.ending) {
        (TcpState::Close, Ending::TimeWait) => TcpState::TimeWait,
        (new, _) => new,
    }
}

/// A transition only a new socket makes: `connect()` or `listen()` on a closed one, or a
/// listener's child created by a handshake.
fn is_birth(t: &Transition) -> bool {
    t.old == TcpState::Close || (t.old, t.new) == (TcpState::Listen, TcpState::SynRecv)
}

/// The socket's tuple: the event's, or the entry's when the event lacks the local end.
fn tuple_of(event: &Tuple, e: &Entry) -> Tuple {
    if event.sport == 0 { e.tuple } else { *event }
}

/// A threshold as nanoseconds, saturating: `--threshold` accepts huge
/// values, which must mean "never", not wrap into "soon".
fn saturating_ns(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Who owns the socket after transition `t`, given what we knew before.
/// Only transitions that run in the owning process's syscall are trusted;
/// everything else (softirq, the peer's context on loopback) keeps the
/// previous answer.
fn attribute(
    comms: &mut Comms,
    listeners: &rustc_hash::FxHashMap<(u32, u16), OwnerRef>,
    t: &Transition,
    netns: u32,
    known: Option<OwnerRef>,
) -> Option<OwnerRef> {
    use TcpState::*;
    match (t.old, t.new) {
        // connect(), listen(), close()/shutdown()
        (Close, SynSent) | (Close, Listen) | (CloseWait, LastAck) | (Established, FinWait1) => {
            Some(OwnerRef {
                pid: t.pid,
                comm: comms.intern(t.comm),
            })
        }
        // An accepted socket: its listener's owner is the best first guess
        // (wrong for pre-fork servers; anomalies check the fd holder).
        (Listen, SynRecv) | (SynRecv, Established) if known.is_none() => {
            listeners.get(&(netns, t.tuple.sport)).copied()
        }
        _ => known,
    }
}

#[cfg(test)]
mod tests;
