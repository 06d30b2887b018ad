//! The live-socket table: one compact entry per socket, bounded, and the
//! counts derived from it (sockets per state, open anomalies, lingering
//! sockets per owner).
//!
//! Every count is a pure function of the entries, and the table is the only
//! code that can change an entry: each mutation subtracts the entry's
//! contribution, changes it, and adds it back (`account`). Nothing outside
//! holds a `&mut Entry`, so no path can forget a decrement.

use std::collections::HashMap;

use super::{
    cgroups::ByCgroup,
    destinations::{Dest, Destinations, Holder},
    rules::leak::LeakCounts,
};
use crate::{
    socket::{Comm, Tuple},
    state::TcpState,
};

/// Who we believe owns a socket: a pid and an interned comm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OwnerRef {
    pub pid: u32,
    pub comm: u32,
}

pub mod flag {
    /// Predates the daemon: `since_ns` is the start-up time, a lower bound.
    pub const SEEDED: u8 = 1;
    /// An anomaly was raised for the current state and not yet resolved.
    pub const ANOMALY_OPEN: u8 = 2;
    /// We saw the socket enter its current state, so `since_ns` is exact.
    pub const ENTRY_SEEN: u8 = 4;
    /// A timewait mini-socket in FIN_WAIT2 replaced the full socket: no
    /// process holds it, `owner` is the last one that did, and it has no
    /// kernel address we know (keyed by a synthetic key).
    pub const ORPHAN: u8 = 8;
    /// Opened by connect() (CLOSE -> SYN_SENT): its local port came from the
    /// ephemeral range, which `time_wait_pressure` watches.
    pub const ACTIVE: u8 = 16;
    /// The owner is the process an owner check found holding the fd, in the current state.
    pub const VERIFIED: u8 = 32;
    /// Came from a listener (or shares a listener's port, in the start-up snapshot): its
    /// destination is the local port, not the remote end.
    pub const ACCEPTED: u8 = 64;
}

const NO_OWNER: u32 = u32::MAX;

/// 88 bytes: addresses raw, the comm interned, because at 10^6 sockets
/// every byte here is a megabyte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub since_ns: u64,
    pub born_ns: u64,
    /// Unique for every state any socket entered (a tracker-wide counter):
    /// a deadline matches its entry by key *and* epoch, so a deadline left
    /// by an old socket can never match a new one at a reused address.
    pub epoch: u64,
    pub tuple: Tuple,
    /// 0 until known (a socket first seen mid-life carries none).
    pub netns: u32,
    /// The socket's cgroup id, from its birth; 0 until known.
    pub cgroup: u64,
    owner_pid: u32,
    owner_comm: u32,
    pub state: TcpState,
    pub flags: u8,
    /// Retransmissions the hooks saw (saturating): what a close record carries, when the
    /// kernel's own count is gone with the socket.
    pub retrans: u16,
}

const _: () = assert!(size_of::<Entry>() == 88);

impl Entry {
    pub fn new(tuple: Tuple, netns: u32, state: TcpState, since_ns: u64, flags: u8) -> Self {
        Self {
            since_ns,
            born_ns: since_ns,
            epoch: 0,
            tuple,
            netns,
            cgroup: 0,
            owner_pid: 0,
            owner_comm: NO_OWNER,
            state,
            flags,
            retrans: 0,
        }
    }

    pub fn owner(&self) -> Option<OwnerRef> {
        (self.owner_comm != NO_OWNER).then_some(OwnerRef {
            pid: self.owner_pid,
            comm: self.owner_comm,
        })
    }

    pub fn with_owner(mut self, o: Option<OwnerRef>) -> Self {
        (self.owner_pid, self.owner_comm) = o.map_or((0, NO_OWNER), |o| (o.pid, o.comm));
        self
    }

    pub fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }

    /// Where the socket goes, as the per-destination counts name it.
    pub fn dest(&self) -> Dest {
        Dest::of(&self.tuple, self.netns, self.has(flag::ACCEPTED))
    }

    /// Who the per-destination counts say holds it: an orphan's last owner, since that is
    /// whom an operator asks about.
    pub fn dest_holder(&self) -> Holder {
        Holder {
            cgroup: self.cgroup,
            comm: self.owner().map_or(Holder::NONE, |o| o.comm),
        }
    }

    /// The owner the leak rule counts: a process that still holds it.
    fn holder(&self) -> Option<OwnerRef> {
        if self.has(flag::ORPHAN) {
            None
        } else {
            self.owner()
        }
    }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Full;

/// The table. `capacity` is a hard cap: inserts past it are refused, never
/// allowed to grow memory.
#[derive(Debug)]
pub struct Table {
    /// FxHash: the keys are kernel addresses (or our synthetic keys), which
    /// no remote peer chooses, and SipHash showed in the profile.
    map: hashbrown::HashMap<u64, Entry, rustc_hash::FxBuildHasher>,
    capacity: usize,
    sockets: [u64; TcpState::COUNT],
    anomalies_open: [u64; TcpState::COUNT],
    leaks: LeakCounts,
    by_cgroup: ByCgroup,
    /// Of the full sockets and FIN_WAIT2 mini-sockets here, and of the TIME_WAIT
    /// mini-sockets the tracker books in (see `Tracker::enter_timewait`).
    destinations: Destinations,
}

impl Table {
    pub fn new(capacity: usize) -> Self {
        Self {
            map: hashbrown::HashMap::default(),
            capacity,
            sockets: [0; TcpState::COUNT],
            anomalies_open: [0; TcpState::COUNT],
            leaks: LeakCounts::default(),
            by_cgroup: ByCgroup::default(),
            destinations: Destinations::default(),
        }
    }

    fn account(&mut self, e: &Entry, add: bool) {
        let st = e.state as usize;
        let bump = |n: &mut u64| *n = if add { *n + 1 } else { n.saturating_sub(1) };
        bump(&mut self.sockets[st]);
        if e.has(flag::ANOMALY_OPEN) {
            bump(&mut self.anomalies_open[st]);
        }
        self.by_cgroup
            .account(e.cgroup, e.state, e.has(flag::ANOMALY_OPEN), add);
        self.destinations
            .account(e.dest(), e.dest_holder(), e.state, add);
        if add {
            self.leaks.enter(e.holder(), e.state);
        } else {
            self.leaks.leave(e.holder(), e.state);
        }
    }

    pub fn get(&self, key: u64) -> Option<&Entry> {
        self.map.get(&key)
    }

    pub fn contains(&self, key: u64) -> bool {
        self.map.contains_key(&key)
    }

    /// Inserts (or replaces) unless full.
    pub fn insert(&mut self, key: u64, e: Entry) -> Result<(), Full> {
        if self.map.len() >= self.capacity && !self.map.contains_key(&key) {
            return Err(Full);
        }
        self.account(&e, true);
        if let Some(old) = self.map.insert(key, e) {
            self.account(&old, false);
        }
        Ok(())
    }

    pub fn remove(&mut self, key: u64) -> Option<Entry> {
        let e = self.map.remove(&key)?;
        self.account(&e, false);
        Some(e)
    }

    /// Changes an entry through `f`, keeping every count right. Returns the
    /// entry as it is afterwards.
    pub fn update(&mut self, key: u64, f: impl FnOnce(&mut Entry)) -> Option<Entry> {
        let e = self.map.get_mut(&key)?;
        let before = *e;
        f(e);
        let after = *e;
        if after != before {
            self.account(&before, false);
            self.account(&after, true);
        }
        Some(after)
    }

    /// Moves an entry to another key (a snapshot socket learning its kernel
    /// address, an orphan losing it).
    pub fn rekey(&mut self, from: u64, to: u64) -> bool {
        let Some(e) = self.map.remove(&from) else {
            return false;
        };
        if let Some(old) = self.map.insert(to, e) {
            self.account(&old, false);
        }
        true
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &Entry)> {
        self.map.iter().map(|(&k, e)| (k, e))
    }

    pub fn sockets(&self, st: TcpState) -> u64 {
        self.sockets[st as usize]
    }

    pub fn anomalies_open(&self, st: TcpState) -> u64 {
        self.anomalies_open[st as usize]
    }

    pub fn leaks(&self) -> &LeakCounts {
        &self.leaks
    }

    pub fn by_cgroup(&self) -> &ByCgroup {
        &self.by_cgroup
    }

    pub fn destinations(&self) -> &Destinations {
        &self.destinations
    }

    /// For the TIME_WAIT mini-sockets, which live in their own table.
    pub fn destinations_mut(&mut self) -> &mut Destinations {
        &mut self.destinations
    }

    pub fn leaks_mut(&mut self) -> &mut LeakCounts {
        &mut self.leaks
    }

    /// Heap bytes held by the table (hashbrown: buckets of key + value plus
    /// one control byte each).
    pub fn bytes(&self) -> usize {
        self.map.allocation_size()
    }

    /// Recomputes every count from the entries; tests compare it with the
    /// incremental ones.
    #[cfg(test)]
    pub fn recount(&self) -> ([u64; TcpState::COUNT], [u64; TcpState::COUNT]) {
        let mut s = [0; TcpState::COUNT];
        let mut a = [0; TcpState::COUNT];
        for e in self.map.values() {
            s[e.state as usize] += 1;
            if e.has(flag::ANOMALY_OPEN) {
                a[e.state as usize] += 1;
            }
        }
        (s, a)
    }

    #[cfg(test)]
    pub fn counts(&self) -> ([u64; TcpState::COUNT], [u64; TcpState::COUNT]) {
        (self.sockets, self.anomalies_open)
    }
}

/// Interns task names so entries carry 4 bytes instead of 16. Bounded: a
/// local user can invent names with prctl, so past the cap new names share
/// one "?" slot rather than growing memory.
#[derive(Debug, Default)]
pub struct Comms {
    ids: HashMap<Comm, u32>,
    names: Vec<Comm>,
    /// The last name interned: bursts of transitions come from one task,
    /// and a 16-byte compare is cheaper than hashing (SipHash here: the
    /// names are chosen by whoever runs a process).
    last: Option<(Comm, u32)>,
}

const MAX_COMMS: usize = 65_536;

impl Comms {
    pub fn intern(&mut self, c: Comm) -> u32 {
        if let Some((last, id)) = self.last
            && last == c
        {
            return id;
        }
        let id = self.intern_slow(c);
        self.last = Some((c, id));
        id
    }

    fn intern_slow(&mut self, c: Comm) -> u32 {
        if let Some(&id) = self.ids.get(&c) {
            return id;
        }
        if self.names.len() >= MAX_COMMS {
            return self.intern_overflow();
        }
        let id = self.names.len() as u32;
        self.names.push(c);
        self.ids.insert(c, id);
        id
    }

    fn intern_overflow(&mut self) -> u32 {
        let q = Comm::new("?");
        if let Some(&id) = self.ids.get(&q) {
            return id;
        }
        // The overflow slot itself may exceed the cap by one.
        let id = self.names.len() as u32;
        self.names.push(q);
        self.ids.insert(q, id);
        id
    }

    pub fn get(&self, id: u32) -> Comm {
        self.names.get(id as usize).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(state: TcpState) -> Entry {
        Entry::new(
            Tuple::new(
                "127.0.0.1".parse().expect("addr"),
                1,
                "127.0.0.1".parse().expect("addr"),
                2,
            ),
            7,
            state,
            0,
            0,
        )
    }

    #[test]
    fn table_refuses_past_capacity() {
        let mut t = Table::new(2);
        let e = entry(TcpState::Established);
        assert_eq!(t.insert(1, e), Ok(()));
        assert_eq!(t.insert(2, e), Ok(()));
        assert_eq!(t.insert(3, e), Err(Full));
        assert_eq!(
            t.insert(2, e),
            Ok(()),
            "updating an existing key is not growth"
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t.sockets(TcpState::Established), 2);
    }

    #[test]
    fn counts_follow_every_mutation() {
        let mut t = Table::new(10);
        let o = Some(OwnerRef { pid: 1, comm: 0 });
        t.insert(1, entry(TcpState::CloseWait).with_owner(o))
            .expect("room");
        assert_eq!(t.leaks().top(1)[0].2, 1);
        t.update(1, |e| e.flags |= flag::ANOMALY_OPEN);
        assert_eq!(t.anomalies_open(TcpState::CloseWait), 1);
        t.update(1, |e| e.state = TcpState::LastAck);
        assert_eq!(t.anomalies_open(TcpState::CloseWait), 0);
        assert_eq!(t.anomalies_open(TcpState::LastAck), 1);
        assert!(t.leaks().top(1).is_empty());
        assert!(t.rekey(1, 9));
        t.remove(9);
        assert_eq!(t.counts(), t.recount());
        assert_eq!(t.sockets(TcpState::LastAck), 0);
    }

    #[test]
    fn comms_are_bounded() {
        let mut c = Comms::default();
        let a = c.intern(Comm::new("nginx"));
        assert_eq!(c.intern(Comm::new("nginx")), a);
        for i in 0..(MAX_COMMS + 10) {
            c.intern(Comm::new(&format!("p{i}")));
        }
        assert!(c.names.len() <= MAX_COMMS + 1);
        assert_eq!(c.get(a).as_str(), "nginx");
    }
}
