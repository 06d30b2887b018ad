//! The socket table and its state machine: timing each socket in each
//! state, attributing owners, raising and resolving anomalies, counting.
//!
//! Pure: time comes from event timestamps and the `now_ns` callers pass
//! (kernel CLOCK_MONOTONIC), so tests drive it with a fake clock.

pub mod aggregates;
pub mod deadlines;
pub mod leak;
pub mod table;
pub mod thresholds;

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use self::{
    aggregates::Aggregates,
    deadlines::{Deadline, Deadlines},
    leak::LeakCounts,
    table::{Comms, Entry, NO_OWNER, OwnerRef, Table, Tuple, flag, from_ip},
    thresholds::Thresholds,
};
use crate::{
    clock::WallClock,
    decode::{Comm, Family, Transition},
    record::{AnomalyRecord, LeakRecord, OwnerSource, Record},
    state::TcpState,
};

#[derive(Clone, Debug)]
pub struct Config {
    /// Hard cap on tracked sockets.
    pub capacity: usize,
    pub thresholds: Thresholds,
    /// Leak rule: more than this many sockets in a lingering state.
    pub leak_threshold: u64,
    pub clock: WallClock,
}

/// A socket found by the start-up snapshot.
#[derive(Clone, Debug)]
pub struct SeedSocket {
    pub netns: u32,
    pub state: TcpState,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    pub owner: Option<(u32, Comm)>,
}

/// What a reconciliation dump says is alive in one network namespace.
#[derive(Debug, Default)]
pub struct Alive {
    pub tuples: HashSet<Tuple>,
    /// SYN_SENT sockets by remote end: the tracepoint shows local port 0
    /// when a connect starts, so those entries match on the remote only.
    pub connecting: HashSet<([u8; 16], u16)>,
}

impl Alive {
    pub fn insert(&mut self, netns: u32, st: TcpState, s: IpAddr, sp: u16, d: IpAddr, dp: u16) {
        // A timewait or request socket is a different kernel object from
        // the full socket we track: the tuple lives on in TIME_WAIT after
        // our socket is gone, so it must not keep a ghost alive.
        if matches!(st, TcpState::TimeWait | TcpState::NewSynRecv) {
            return;
        }
        let (saddr, daddr) = (from_ip(s), from_ip(d));
        if st == TcpState::SynSent {
            self.connecting.insert((daddr, dp));
        }
        self.tuples.insert(Tuple {
            netns,
            saddr,
            daddr,
            sport: sp,
            dport: dp,
        });
    }
}

/// An open anomaly, for the status page.
#[derive(Clone, Debug)]
pub struct OpenAnomaly {
    pub key: u64,
    pub since_ns: u64,
    pub entry: Entry,
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

pub struct Tracker {
    cfg: Config,
    table: Table,
    comms: Comms,
    deadlines: Deadlines,
    /// FxHash: looked up on every accepted socket; keyed by local ports,
    /// which only local processes choose (at most 64k per namespace).
    listeners: rustc_hash::FxHashMap<(u32, u16), OwnerRef>,
    /// Snapshot sockets not yet seen in an event, by tuple without the
    /// namespace (events only carry it when a socket is born). They are
    /// keyed by small synthetic numbers (kernel addresses are never that
    /// low) until their first event tells us their real address.
    seeded: HashMap<Tuple, Vec<u64>>,
    next_seed_key: u64,
    leaks: LeakCounts,
    pub agg: Aggregates,
}

impl Tracker {
    pub fn new(cfg: Config) -> Self {
        Self {
            table: Table::new(cfg.capacity),
            cfg,
            comms: Comms::default(),
            deadlines: Deadlines::default(),
            listeners: rustc_hash::FxHashMap::default(),
            seeded: HashMap::new(),
            next_seed_key: 1,
            leaks: LeakCounts::default(),
            agg: Aggregates::new(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn tracked(&self) -> usize {
        self.table.len()
    }

    pub fn refused(&self) -> u64 {
        self.table.refused
    }

    pub fn capacity(&self) -> usize {
        self.table.capacity
    }

    /// Heap bytes of the table and deadline heap.
    pub fn bytes(&self) -> usize {
        self.table.bytes() + self.deadlines.bytes()
    }

    pub fn comm(&self, id: u32) -> Comm {
        self.comms.get(id)
    }

    /// Applies one transition.
    pub fn on_transition(&mut self, t: &Transition, out: &mut Vec<Record>) -> Applied {
        let (old, new) = (t.old, t.new);
        self.agg.transitions[old as usize][new as usize] += 1;
        match (old, new) {
            (TcpState::SynSent, TcpState::Close) => self.agg.failed_connect(t.daddr, t.dport),
            (TcpState::Established | TcpState::CloseWait, TcpState::Close) => {
                self.agg.reset(t.daddr, t.dport)
            }
            _ => {}
        }

        let key = t.sk;
        let unknown = Applied {
            prev_state_ms: None,
            netns: t.netns,
        };
        if !self.table.map.contains_key(&key) && !self.adopt_seeded(t) {
            if new != TcpState::Close {
                self.create(t);
            }
            return unknown;
        }
        let Some(e) = self.table.map.get_mut(&key) else {
            return unknown;
        };
        if e.netns == 0 {
            e.netns = t.netns;
        }
        let netns = e.netns;

        // Leaving e.state.
        let left = e.state;
        let seen = left == old && e.has(flag::ENTRY_SEEN);
        let dt = t.ts_ns.saturating_sub(e.since_ns);
        self.agg.sockets[left as usize] -= 1;
        self.leaks.leave(e.owner(), left);
        if e.has(flag::ANOMALY_OPEN) {
            e.flags &= !flag::ANOMALY_OPEN;
            self.agg.anomalies_open[left as usize] -= 1;
            let rec = anomaly_record(
                &self.cfg.clock,
                &self.comms,
                key,
                e,
                t.ts_ns,
                Some("left_state"),
            );
            out.push(Record::AnomalyResolved(rec));
        }
        let prev_ms = seen.then(|| {
            self.agg.record_duration(old, dt);
            dt as f64 / 1e6
        });

        let applied = Applied {
            prev_state_ms: prev_ms,
            netns,
        };
        if new == TcpState::Close {
            let e = *e;
            self.forget(key, &e);
            return applied;
        }

        // Entering `new`.
        e.state = new;
        e.since_ns = t.ts_ns;
        e.flags = (e.flags | flag::ENTRY_SEEN) & !flag::SEEDED;
        e.generation = e.generation.wrapping_add(1);
        if t.sport != 0 {
            e.sport = t.sport;
            e.saddr = from_ip(t.saddr);
        }
        e.dport = t.dport;
        e.daddr = from_ip(t.daddr);
        let owner = attribute(&mut self.comms, &self.listeners, t, e.netns, e.owner());
        e.set_owner(owner);
        let e = *e;
        if old == TcpState::Close
            && new == TcpState::Listen
            && let Some(o) = owner
        {
            self.listeners.insert((e.netns, t.sport), o);
        }
        self.entered(key, &e);
        applied
    }

    /// A socket we have never seen: start tracking it, unless full.
    fn create(&mut self, t: &Transition) {
        let owner = attribute(&mut self.comms, &self.listeners, t, t.netns, None);
        let mut e = Entry {
            since_ns: t.ts_ns,
            born_ns: t.ts_ns,
            saddr: from_ip(t.saddr),
            daddr: from_ip(t.daddr),
            sport: t.sport,
            dport: t.dport,
            netns: t.netns,
            owner_pid: 0,
            owner_comm: NO_OWNER,
            generation: 0,
            state: t.new,
            v6: t.family == Family::V6,
            flags: flag::ENTRY_SEEN,
        };
        e.set_owner(owner);
        if t.old == TcpState::Close
            && t.new == TcpState::Listen
            && let Some(o) = owner
        {
            self.listeners.insert((t.netns, t.sport), o);
        }
        if self.table.insert(t.sk, e) {
            self.entered(t.sk, &e);
        }
    }

    /// Book-keeping for a socket now in `e.state` since `e.since_ns`.
    fn entered(&mut self, key: u64, e: &Entry) {
        self.agg.sockets[e.state as usize] += 1;
        self.leaks.enter(e.owner(), e.state);
        if let Some(d) = self.cfg.thresholds.get(e.state) {
            self.deadlines.push(Deadline {
                at_ns: e.since_ns.saturating_add(d.as_nanos() as u64),
                key,
                generation: e.generation,
            });
        }
    }

    /// Removes a socket that closed or vanished; its state's book-keeping
    /// was already undone by the caller.
    fn forget(&mut self, key: u64, e: &Entry) {
        self.table.map.remove(&key);
        if key < self.next_seed_key {
            let addrs = Tuple {
                netns: 0,
                ..e.tuple()
            };
            if let Some(keys) = self.seeded.get_mut(&addrs) {
                keys.retain(|&k| k != key);
                if keys.is_empty() {
                    self.seeded.remove(&addrs);
                }
            }
        }
        if e.state == TcpState::Listen
            && self.listeners.get(&(e.netns, e.sport)).copied() == e.owner()
        {
            self.listeners.remove(&(e.netns, e.sport));
        }
    }

    /// Moves a snapshot socket to its real kernel address on its first event.
    fn adopt_seeded(&mut self, t: &Transition) -> bool {
        if self.seeded.is_empty() {
            return false;
        }
        let addrs = Tuple {
            netns: 0,
            saddr: from_ip(t.saddr),
            daddr: from_ip(t.daddr),
            sport: t.sport,
            dport: t.dport,
        };
        let Some(keys) = self.seeded.get_mut(&addrs) else {
            return false;
        };
        // The same tuple can exist in several namespaces (containers).
        // Without the event's namespace, adopt only an unambiguous match;
        // an ambiguous one is left to reconciliation.
        let table = &self.table.map;
        let pick = if t.netns != 0 {
            keys.iter()
                .position(|k| table.get(k).is_some_and(|e| e.netns == t.netns))
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
            self.seeded.remove(&addrs);
        }
        let Some(e) = self.table.map.remove(&seed_key) else {
            return false;
        };
        self.table.map.insert(t.sk, e);
        true
    }

    /// Loads the start-up snapshot; returns how many sockets were tracked.
    pub fn seed(&mut self, sockets: impl IntoIterator<Item = SeedSocket>, now_ns: u64) -> u64 {
        let mut n = 0;
        for s in sockets {
            if matches!(
                s.state,
                TcpState::TimeWait | TcpState::NewSynRecv | TcpState::Close
            ) {
                continue;
            }
            let owner = s.owner.map(|(pid, comm)| OwnerRef {
                pid,
                comm: self.comms.intern(comm),
            });
            let mut e = Entry {
                since_ns: now_ns,
                born_ns: now_ns,
                saddr: from_ip(s.saddr),
                daddr: from_ip(s.daddr),
                sport: s.sport,
                dport: s.dport,
                netns: s.netns,
                owner_pid: 0,
                owner_comm: NO_OWNER,
                generation: 0,
                state: s.state,
                v6: s.saddr.is_ipv6(),
                flags: flag::SEEDED,
            };
            e.set_owner(owner);
            let key = self.next_seed_key;
            if !self.table.insert(key, e) {
                continue;
            }
            self.next_seed_key += 1;
            let addrs = Tuple {
                netns: 0,
                ..e.tuple()
            };
            self.seeded.entry(addrs).or_default().push(key);
            if s.state == TcpState::Listen
                && let Some(o) = owner
            {
                self.listeners.insert((s.netns, s.sport), o);
            }
            self.entered(key, &e);
            n += 1;
        }
        n
    }

    /// Raises an anomaly for every socket whose time in its state ran out.
    pub fn expire(&mut self, now_ns: u64, out: &mut Vec<Record>) {
        while let Some(d) = self.deadlines.pop_due(now_ns) {
            let Some(e) = self.table.map.get_mut(&d.key) else {
                continue;
            };
            if e.generation != d.generation || e.has(flag::ANOMALY_OPEN) {
                continue;
            }
            e.flags |= flag::ANOMALY_OPEN;
            self.agg.anomalies_raised[e.state as usize] += 1;
            self.agg.anomalies_open[e.state as usize] += 1;
            let rec = anomaly_record(&self.cfg.clock, &self.comms, d.key, e, now_ns, None);
            out.push(Record::Anomaly(rec));
        }
        if self.deadlines.needs_rebuild(self.table.len()) {
            let th = &self.cfg.thresholds;
            self.deadlines
                .rebuild(self.table.map.iter().filter_map(|(&key, e)| {
                    let d = th.get(e.state)?;
                    (!e.has(flag::ANOMALY_OPEN)).then_some(Deadline {
                        at_ns: e.since_ns.saturating_add(d.as_nanos() as u64),
                        key,
                        generation: e.generation,
                    })
                }));
        }
    }

    /// Applies the leak rule; call once per leak interval.
    pub fn check_leaks(&mut self, now_ns: u64, out: &mut Vec<Record>) {
        for s in self.leaks.check(self.cfg.leak_threshold) {
            self.agg.leaks_suspected += 1;
            out.push(Record::LeakSuspected(LeakRecord {
                ts: self.cfg.clock.to_system(now_ns),
                pid: s.owner.pid,
                comm: self.comms.get(s.owner.comm),
                state: s.state,
                count: s.count,
                previous: s.previous,
                threshold: self.cfg.leak_threshold,
            }));
        }
    }

    /// Removes sockets of `netns` that the kernel no longer has (an event
    /// was lost). Only sockets unchanged since before `dump_start_ns` are
    /// judged, so a socket born during the dump is not mistaken for a ghost.
    pub fn reconcile(
        &mut self,
        netns: u32,
        alive: &Alive,
        dump_start_ns: u64,
        now_ns: u64,
        out: &mut Vec<Record>,
    ) -> u64 {
        let ghosts: Vec<u64> = self
            .table
            .map
            .iter()
            .filter(|(_, e)| e.netns == netns && e.since_ns < dump_start_ns)
            .filter(|(_, e)| {
                if e.sport == 0 {
                    !alive.connecting.contains(&(e.daddr, e.dport))
                } else {
                    !alive.tuples.contains(&e.tuple())
                }
            })
            .map(|(&k, _)| k)
            .collect();
        for &key in &ghosts {
            let Some(e) = self.table.map.get(&key).copied() else {
                continue;
            };
            self.agg.sockets[e.state as usize] -= 1;
            self.leaks.leave(e.owner(), e.state);
            if e.has(flag::ANOMALY_OPEN) {
                self.agg.anomalies_open[e.state as usize] -= 1;
                let rec = anomaly_record(
                    &self.cfg.clock,
                    &self.comms,
                    key,
                    &e,
                    now_ns,
                    Some("reconciled"),
                );
                out.push(Record::AnomalyResolved(rec));
            }
            self.forget(key, &e);
            self.agg.reconciled += 1;
        }
        ghosts.len() as u64
    }

    /// The namespace remembered for a tracked socket (0 = unknown).
    pub fn netns_of(&self, sk: u64) -> u32 {
        self.table.map.get(&sk).map_or(0, |e| e.netns)
    }

    /// Network namespaces the table holds sockets in.
    pub fn namespaces(&self) -> HashSet<u32> {
        self.table.map.values().map(|e| e.netns).collect()
    }

    pub fn open_anomalies(&self) -> Vec<OpenAnomaly> {
        let mut v: Vec<OpenAnomaly> = self
            .table
            .map
            .iter()
            .filter(|(_, e)| e.has(flag::ANOMALY_OPEN))
            .map(|(&key, e)| OpenAnomaly {
                key,
                since_ns: e.since_ns,
                entry: *e,
            })
            .collect();
        v.sort_by_key(|a| a.since_ns);
        v
    }

    /// Top owners of lingering sockets: (pid, comm, state, count).
    pub fn top_owners(&self, n: usize) -> Vec<(u32, Comm, TcpState, u64)> {
        self.leaks
            .top(n)
            .into_iter()
            .map(|(o, st, c)| (o.pid, self.comms.get(o.comm), st, c))
            .collect()
    }

    /// Builds an anomaly record for an open anomaly (status page).
    pub fn describe(&self, a: &OpenAnomaly, now_ns: u64) -> AnomalyRecord {
        anomaly_record(&self.cfg.clock, &self.comms, a.key, &a.entry, now_ns, None)
    }
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
            listeners.get(&(netns, t.sport)).copied()
        }
        _ => known,
    }
}

fn anomaly_record(
    clock: &WallClock,
    comms: &Comms,
    key: u64,
    e: &Entry,
    now_ns: u64,
    resolution: Option<&str>,
) -> AnomalyRecord {
    let owner = e.owner();
    AnomalyRecord {
        ts: clock.to_system(now_ns),
        kind: e.state.kind().to_owned(),
        state: e.state,
        age_ms: now_ns.saturating_sub(e.since_ns) as f64 / 1e6,
        age_is_lower_bound: e.has(flag::SEEDED),
        // Snapshot sockets have no kernel address until their first event.
        sk: if e.has(flag::SEEDED) { 0 } else { key },
        family: e.family(),
        saddr: e.saddr(),
        sport: e.sport,
        daddr: e.daddr(),
        dport: e.dport,
        netns: e.netns,
        pid: owner.map(|o| o.pid),
        comm: owner.map(|o| comms.get(o.comm)),
        owner_source: if owner.is_some() {
            OwnerSource::Attributed
        } else {
            OwnerSource::None
        },
        last_owner: None,
        resolution: resolution.map(str::to_owned),
    }
}

#[cfg(test)]
mod tests;
