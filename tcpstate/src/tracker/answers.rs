//! What the kernel's own socket table (sock_diag) says, applied to the
//! tracker: seeding at start-up, reconciliation after lost events, the
//! sweep that follows mini-sockets to their end, and namespace settings.
//! The sock_diag calls themselves run elsewhere (`workers`), off the
//! event path; here they are plain data.

use std::collections::{HashMap, HashSet};

use super::{
    Fact, MetTimeWait, PeerKeyHasher, Resolution, Tracker, Via,
    rules::backlog::Listening,
    rules::orphans::{HostTcp, closing_by_owner},
    rules::pressure::NetnsInfo,
    table::{Entry, OwnerRef, flag},
    timewait::TIMEWAIT_LEN_NS,
};
use crate::{
    socket::{Comm, Family, Tuple},
    state::TcpState,
};

/// One socket in a sock_diag answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSocket {
    pub netns: u32,
    /// For a mini-socket, its substate (FIN_WAIT2 or TIME_WAIT); a request
    /// socket says SYN_RECV.
    pub state: TcpState,
    pub tuple: Tuple,
    /// A timewait mini-socket (`idiag_timer` 3).
    pub mini: bool,
    /// A request socket (half-open connection, no full socket yet).
    pub request: bool,
    /// Time left on its timer, in milliseconds.
    pub expires_ms: u32,
    /// Who holds its fd, when someone does.
    pub owner: Option<(u32, Comm)>,
    /// Its cgroup id, from the dump (0: none).
    pub cgroup: u64,
}

/// What a reconciliation dump says is alive in one network namespace. The
/// sets hold every socket of a busy host (hundreds of thousands of
/// TIME_WAIT), keyed by tuples peers choose: [`PeerKeyHasher`].
#[derive(Debug, Default)]
pub struct Alive {
    /// Full sockets.
    pub tuples: HashSet<Tuple, PeerKeyHasher>,
    /// SYN_SENT sockets by remote end: the tracepoint shows local port 0
    /// when a connect starts, so those entries match on the remote only.
    pub connecting: HashMap<([u8; 16], u16), Vec<Tuple>, PeerKeyHasher>,
    /// Mini-sockets, their substate and timer.
    pub minis: Minis,
    /// Request sockets (SYN_RECV mini-sockets).
    pub requests: u64,
    /// The dump included TIME_WAIT mini-sockets (else they are not judged).
    pub timewait: bool,
    /// TIME_WAIT mini-sockets we never saw may be adopted (not when a filter cannot tell
    /// whether they are wanted).
    pub adopt_timewait: bool,
}

impl Alive {
    pub fn insert(&mut self, s: &KernelSocket) {
        if s.request {
            self.requests += 1;
        } else if s.mini {
            self.minis.push(s.tuple, s.state, s.expires_ms);
        } else {
            if s.state == TcpState::SynSent {
                self.connecting
                    .entry((s.tuple.daddr, s.tuple.dport))
                    .or_default()
                    .push(s.tuple);
            }
            self.tuples.insert(s.tuple);
        }
    }
}

/// A dump's mini-sockets as flat lists, sorted once complete: a million TIME_WAIT take 16 MB
/// here (IPv4), where a hash map took 100 MB and half again while it grew, and a list of whole
/// tuples 48 MB (issue 21.10).
#[derive(Clone, Debug, Default)]
pub struct Minis {
    v4: Vec<MiniV4>,
    v6: Vec<(Tuple, TcpState, u32)>,
    sorted: bool,
}

/// An IPv4 mini-socket: 16 bytes where a [`Tuple`] alone takes 38.
#[derive(Clone, Copy, Debug)]
struct MiniV4 {
    key: V4Key,
    /// The substate in the top 4 bits, the timer's milliseconds (at most 74 h; the kernel's
    /// longest, `tcp_fin_timeout`, is 18 h) in the rest.
    packed: u32,
}

impl MiniV4 {
    const EXPIRES: u32 = (1 << 28) - 1;

    fn new(key: V4Key, st: TcpState, expires_ms: u32) -> Self {
        Self {
            key,
            packed: (st as u32) << 28 | expires_ms.min(Self::EXPIRES),
        }
    }

    fn state(&self) -> TcpState {
        // Packed from a TcpState (1..=12), so always one.
        TcpState::from_kernel((self.packed >> 28) as u8).unwrap_or(TcpState::TimeWait)
    }

    fn expires_ms(&self) -> u32 {
        self.packed & Self::EXPIRES
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct V4Key {
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: u16,
    dport: u16,
}

const _: () = assert!(size_of::<MiniV4>() == 16);

impl V4Key {
    fn of(t: &Tuple) -> Self {
        let four = |a: &[u8; 16]| [a[0], a[1], a[2], a[3]];
        Self {
            saddr: four(&t.saddr),
            daddr: four(&t.daddr),
            sport: t.sport,
            dport: t.dport,
        }
    }

    fn tuple(&self) -> Tuple {
        Tuple::v4(self.saddr, self.sport, self.daddr, self.dport)
    }
}

impl Minis {
    pub fn push(&mut self, t: Tuple, st: TcpState, expires_ms: u32) {
        match t.family {
            Family::V4 => self.v4.push(MiniV4::new(V4Key::of(&t), st, expires_ms)),
            Family::V6 => self.v6.push((t, st, expires_ms)),
        }
        self.sorted = false;
    }

    /// Sorts by tuple, so lookups are binary searches. Of a tuple listed twice (a dump that
    /// met it again after the kernel re-hashed it), the one with the most time left wins: the
    /// newer. In place: a stable sort's buffer was half the list again, 10 MB at a million.
    pub fn seal(&mut self) {
        self.v4
            .sort_unstable_by_key(|e| (e.key, std::cmp::Reverse(e.expires_ms())));
        self.v4.dedup_by(|a, b| a.key == b.key);
        self.v4.shrink_to_fit();
        self.v6
            .sort_unstable_by_key(|e| (e.0, std::cmp::Reverse(e.2)));
        self.v6.dedup_by(|a, b| a.0 == b.0);
        self.v6.shrink_to_fit();
        self.sorted = true;
    }

    /// The substate and timer of the mini-socket at `t` (of duplicates, the one with the most
    /// time left, as [`Minis::seal`] keeps). Unsealed (a test's handful), a scan.
    pub fn get(&self, t: &Tuple) -> Option<(TcpState, u32)> {
        match t.family {
            Family::V4 => {
                let key = V4Key::of(t);
                let hit = if self.sorted {
                    self.v4
                        .binary_search_by(|e| e.key.cmp(&key))
                        .ok()
                        .and_then(|i| self.v4.get(i))
                } else {
                    self.v4
                        .iter()
                        .filter(|e| e.key == key)
                        .max_by_key(|e| e.expires_ms())
                };
                hit.map(|e| (e.state(), e.expires_ms()))
            }
            Family::V6 => {
                let hit = if self.sorted {
                    self.v6
                        .binary_search_by(|e| e.0.cmp(t))
                        .ok()
                        .and_then(|i| self.v6.get(i))
                } else {
                    self.v6.iter().filter(|e| e.0 == *t).max_by_key(|e| e.2)
                };
                hit.map(|&(_, st, expires)| (st, expires))
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (Tuple, TcpState, u32)> + '_ {
        self.v4
            .iter()
            .map(|e| (e.key.tuple(), e.state(), e.expires_ms()))
            .chain(self.v6.iter().copied())
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

/// The sweep of one namespace: its mini-sockets to check with exact lookups. (Not
/// `Probe`: that is the loaded eBPF program, `program::Probe`.)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub netns: u32,
    /// TIME_WAIT mini-sockets past their 2MSL, oldest first. Their timers
    /// fire in the order they were set, so the ones gone are a prefix: a
    /// binary search finds it with a handful of lookups.
    pub timewait: Vec<Tuple>,
    /// FIN_WAIT2 mini-sockets, each looked up.
    pub orphans: Vec<Tuple>,
}

/// A mini-socket's fate, as an exact lookup found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    Mini(TcpState),
    /// A full socket holds the tuple now (the mini-socket was reused).
    Full,
    Absent,
}

/// What a [`Sweep`]'s lookups found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Swept {
    pub netns: u32,
    /// When the lookups were done (monotonic ns): what they found is
    /// reported at that time, and applied only once every event before it
    /// has been.
    pub done_ns: u64,
    /// How many of `Sweep::timewait`, from the oldest, are gone.
    pub timewait_gone: usize,
    pub timewait: Vec<Tuple>,
    pub orphans: Vec<(Tuple, Found)>,
    /// The namespace no longer exists.
    pub netns_gone: bool,
}

/// TIME_WAIT mini-sockets listed for one sweep (all namespaces): 650 kB of tuples, and as
/// many records at most when they end. A burst that expires together is swept in parts of
/// this, one right after the other.
pub const MAX_SWEPT_TIMEWAIT: usize = 16_384;

/// TIME_WAIT mini-sockets a reconciliation of one namespace looks up one by one because its
/// dump lacked them.
const MAX_TIMEWAIT_SUSPECTS: usize = 16_384;

/// Exact lookups of FIN_WAIT2 mini-sockets per namespace per sweep, so one
/// sweep stays short whatever the host holds; the rest wait for the next.
const MAX_ORPHAN_LOOKUPS: usize = 256;

impl Tracker {
    /// Loads the start-up snapshot; returns how many sockets were tracked. What it raises
    /// (TIME_WAIT pressure already there) goes to `out`, to be said like any other fact.
    pub fn seed(
        &mut self,
        sockets: impl IntoIterator<Item = KernelSocket>,
        now_ns: u64,
        out: &mut Vec<Fact>,
    ) -> u64 {
        let sockets: Vec<KernelSocket> = sockets.into_iter().collect();
        // A mini-socket on a listening port is a server's: its port is not
        // ephemeral. The listeners may have come in an earlier part.
        self.seed_listening.extend(
            sockets
                .iter()
                .filter(|s| s.state == TcpState::Listen)
                .map(|s| (s.netns, s.tuple.sport)),
        );
        let listening = std::mem::take(&mut self.seed_listening);
        let n = self.seed_part(sockets, &listening, now_ns, out);
        self.seed_listening = listening;
        n
    }

    /// The start-up snapshot's TIME_WAIT count, as the kernel gives it before the dumps.
    pub fn seed_expects_timewait(&mut self, n: usize) {
        self.timewait.reserve(n);
    }

    /// The start-up snapshot is in: what it needed to remember goes.
    pub fn seed_done(&mut self) {
        self.seed_listening = HashSet::new();
    }

    fn seed_part(
        &mut self,
        sockets: Vec<KernelSocket>,
        listening: &HashSet<(u32, u16)>,
        now_ns: u64,
        out: &mut Vec<Fact>,
    ) -> u64 {
        let mut n = 0;
        for s in sockets {
            if s.request {
                // Half-open connections are counted, as `ss` shows them, until the first
                // reconciliation counts them again.
                *self.requests.entry(s.netns).or_default() += 1;
                continue;
            }
            if s.state == TcpState::Close {
                continue;
            }
            if s.mini && s.state == TcpState::TimeWait {
                let since = estimated_since(now_ns, s.expires_ms);
                let active = !listening.contains(&(s.netns, s.tuple.sport));
                let how = MetTimeWait::Seed { now_ns };
                self.enter_timewait(s.netns, &s.tuple, since, how, active, out);
                n += 1;
                continue;
            }
            let owner = s.owner.map(|(pid, comm)| OwnerRef {
                pid,
                comm: self.comms.intern(comm),
            });
            // A socket on a listening port was accepted; the rest were connected out (or
            // are listeners, which no destination counts).
            let accepted =
                s.state != TcpState::Listen && listening.contains(&(s.netns, s.tuple.sport));
            let flags = flag::SEEDED
                | if s.mini { flag::ORPHAN } else { 0 }
                | if accepted { flag::ACCEPTED } else { 0 };
            let mut e = Entry::new(s.tuple, s.netns, s.state, now_ns, flags).with_owner(owner);
            e.epoch = self.epoch();
            e.cgroup = s.cgroup;
            let key = self.synthetic_key();
            if self.table.insert(key, e).is_err() {
                self.refused += 1;
                continue;
            }
            if s.mini {
                self.orphans.insert((s.netns, s.tuple), key);
            } else {
                self.seeded.entry(s.tuple).or_default().push(key);
            }
            if s.state == TcpState::Listen
                && let Some(o) = owner
            {
                self.listeners.insert((s.netns, s.tuple.sport), o);
            }
            self.enter_deadline(key);
            n += 1;
        }
        n
    }

    /// Namespaces the full-socket table holds sockets in (0, unknown, excluded): where
    /// listeners can be. Not the TIME_WAIT table, which can be half a million entries.
    pub fn listener_namespaces(&self) -> Vec<u32> {
        let mut v: HashSet<u32> = self.table.iter().map(|(_, e)| e.netns).collect();
        v.remove(&0);
        let mut v: Vec<u32> = v.into_iter().collect();
        v.sort_unstable();
        v
    }

    /// Namespaces the tables hold sockets in, and whether some sockets' namespace is unknown
    /// (then only a dump of every namespace can place them: [`Self::place_unknown`]).
    pub fn namespaces(&self) -> (HashSet<u32>, bool) {
        let mut v: HashSet<u32> = self.table.iter().map(|(_, e)| e.netns).collect();
        v.extend(self.timewait.iter().map(|s| s.netns));
        let unknown = v.remove(&0);
        (v, unknown)
    }

    /// Places sockets first met mid-life, whose namespace is unknown: the tracepoint reads it
    /// only at a birth, and that event was lost (or the table was full then). Found in exactly
    /// one namespace's dump, the socket is that namespace's from now and is judged with it.
    /// Found in none, and `complete` (the dump covered every namespace on the host), it is a
    /// suspect, to be looked up in every namespace ([`Self::confirm_gone`] with namespace
    /// 0). Found in several (the same loopback tuple in two containers), it stays unknown:
    /// guessing would let another namespace's reconciliation delete a live socket. Returns
    /// the suspects.
    pub fn place_unknown(
        &mut self,
        alive: &[(u32, Alive)],
        complete: bool,
        dump_start_ns: u64,
    ) -> Vec<(u32, Tuple)> {
        let unknown: Vec<(u64, Tuple, bool)> = self
            .table
            .iter()
            .filter(|(_, e)| e.netns == 0 && e.since_ns < dump_start_ns)
            .map(|(k, e)| (k, e.tuple, e.has(flag::ORPHAN)))
            .collect();
        let mut suspects = Vec::new();
        for (key, t, orphan) in unknown {
            let holds = |a: &Alive| {
                if orphan {
                    a.minis.get(&t).is_some()
                } else if t.sport == 0 {
                    a.connecting.contains_key(&(t.daddr, t.dport))
                } else {
                    a.tuples.contains(&t)
                }
            };
            let mut homes = alive.iter().filter(|(_, a)| holds(a)).map(|(n, _)| *n);
            match (homes.next(), homes.next()) {
                (Some(netns), None) => self.rehome(key, netns),
                // An orphan gone on to TIME_WAIT is in no dump that leaves TIME_WAIT out.
                (None, _)
                    if complete
                        && t.sport != 0
                        && (!orphan || alive.iter().all(|(_, a)| a.timewait)) =>
                {
                    suspects.push((0, t));
                }
                _ => {}
            }
        }
        suspects
    }

    /// Gives a socket of unknown namespace its namespace, with the indexes keyed by it.
    fn rehome(&mut self, key: u64, netns: u32) {
        let Some(e) = self.table.update(key, |e| e.netns = netns) else {
            return;
        };
        if e.has(flag::ORPHAN) {
            if self.orphans.get(&(0, e.tuple)) == Some(&key) {
                self.orphans.remove(&(0, e.tuple));
                self.orphans.insert((netns, e.tuple), key);
            } else {
                // The kernel has one mini-socket per tuple: an entry the index does not
                // point at is an older one.
                self.forget(key);
            }
        }
        if e.state == TcpState::Listen
            && let Some(o) = self.listeners.remove(&(0, e.tuple.sport))
        {
            self.listeners.insert((netns, e.tuple.sport), o);
        }
    }

    /// Judges the sockets of `netns` against its dump: follows mini-sockets the dump shows in
    /// a new state and adopts TIME_WAIT mini-sockets we missed. Only sockets unchanged since
    /// before `dump_start_ns` are judged, so a socket born during the dump is not mistaken
    /// for a ghost. Returns the suspects: tracked sockets the dump lacks. A dump only
    /// nominates them: it is no atomic snapshot but several reads, each resumed by position
    /// in the kernel's hash, and a live socket can be skipped (seen under churn); an exact
    /// lookup of each ([`Self::confirm_gone`]) convicts them. A socket whose namespace is
    /// unknown is never judged against one namespace's dump.
    pub fn reconcile(
        &mut self,
        netns: u32,
        alive: &Alive,
        dump_start_ns: u64,
        now_ns: u64,
        out: &mut Vec<Fact>,
    ) -> Vec<(u32, Tuple)> {
        if netns == 0 {
            return Vec::new();
        }
        let mut suspects = self.reconcile_full(netns, alive, dump_start_ns, now_ns, out);
        self.reconcile_minis(netns, alive, dump_start_ns, now_ns, out, &mut suspects);
        self.requests.insert(netns, alive.requests);
        suspects
    }

    /// Full sockets the dump lacks. One still connecting shows local port 0 in its events
    /// and cannot be looked up: the dump's word is taken for it.
    fn reconcile_full(
        &mut self,
        netns: u32,
        alive: &Alive,
        dump_start_ns: u64,
        now_ns: u64,
        out: &mut Vec<Fact>,
    ) -> Vec<(u32, Tuple)> {
        let mut suspects = Vec::new();
        let mut ghosts = Vec::new();
        // Connecting sockets whose local port we never learnt (their SYN retransmit lost or
        // not hooked), by destination; and the ports already known there.
        let mut portless: HashMap<([u8; 16], u16), Vec<u64>> = HashMap::new();
        let mut known: HashSet<Tuple> = HashSet::new();
        for (k, e) in self.table.iter() {
            if e.netns != netns || e.has(flag::ORPHAN) {
                continue;
            }
            if e.state == TcpState::SynSent && e.tuple.sport != 0 {
                known.insert(e.tuple);
            }
            if e.since_ns >= dump_start_ns {
                continue;
            }
            if e.tuple.sport == 0 {
                if alive
                    .connecting
                    .contains_key(&(e.tuple.daddr, e.tuple.dport))
                {
                    portless
                        .entry((e.tuple.daddr, e.tuple.dport))
                        .or_default()
                        .push(k);
                } else {
                    ghosts.push(k);
                }
            } else if !alive.tuples.contains(&e.tuple) {
                suspects.push((netns, e.tuple));
            }
        }
        for key in ghosts {
            self.forget_ghost(key, now_ns, Resolution::Reconciled, out);
        }
        // The dump has the port: one socket to a destination and one the dump shows there
        // that no entry has is the same socket. More than one each would be a guess.
        for (dest, keys) in portless {
            let [key] = keys[..] else { continue };
            let Some(tuples) = alive.connecting.get(&dest) else {
                continue;
            };
            let mut free = tuples.iter().filter(|t| !known.contains(t));
            if let (Some(t), None) = (free.next(), free.next()) {
                let t = *t;
                self.table.update(key, |e| {
                    e.tuple.saddr = t.saddr;
                    e.tuple.sport = t.sport;
                });
            }
        }
        suspects
    }

    /// Applies the exact lookups of what a dump lacked (namespace 0: looked up in every
    /// namespace, found in none) to the sockets unchanged since before the dump: a full socket
    /// whose tuple no full socket holds is gone (a mini-socket in its place is what it became);
    /// a FIN_WAIT2 orphan follows its mini-socket; a TIME_WAIT mini-socket ends unless one is
    /// still there. Returns how many ended.
    pub fn confirm_gone(
        &mut self,
        found: &[(u32, Tuple, Found)],
        dump_start_ns: u64,
        now_ns: u64,
        out: &mut Vec<Fact>,
    ) -> u64 {
        if found.is_empty() {
            return 0;
        }
        let no_full: HashSet<(u32, Tuple)> = found
            .iter()
            .filter(|(_, _, f)| *f != Found::Full)
            .map(|&(n, t, _)| (n, t))
            .collect();
        let full: Vec<u64> = self
            .table
            .iter()
            .filter(|(_, e)| e.since_ns < dump_start_ns && !e.has(flag::ORPHAN))
            .filter(|(_, e)| no_full.contains(&(e.netns, e.tuple)))
            .map(|(k, _)| k)
            .collect();
        let mut ended = full.len() as u64;
        for key in full {
            self.forget_ghost(key, now_ns, Resolution::Reconciled, out);
        }
        for &(netns, t, f) in found {
            let orphan = self.orphans.get(&(netns, t)).copied();
            // An orphan of unknown namespace found as a mini-socket somewhere: which one is
            // not known, so it is left for a dump to place.
            let unplaced = netns == 0 && matches!(f, Found::Mini(_));
            if !unplaced
                && orphan
                    .and_then(|k| self.table.get(k))
                    .is_some_and(|e| e.since_ns < dump_start_ns)
            {
                ended += u64::from(self.apply_orphan(netns, &t, f, now_ns, out));
            }
            if f != Found::Mini(TcpState::TimeWait)
                && self
                    .timewait
                    .get(netns, &t)
                    .is_some_and(|s| s.since_ns < dump_start_ns)
            {
                self.end_timewait(netns, &t, now_ns, Via::SockDiag, out);
                ended += 1;
            }
        }
        self.timewait.shrink_if_sparse();
        ended
    }

    /// Forgets a full socket the kernel no longer has, ending its open anomaly as `why`.
    pub(super) fn forget_ghost(
        &mut self,
        key: u64,
        now_ns: u64,
        why: Resolution,
        out: &mut Vec<Fact>,
    ) {
        if let Some(e) = self.forget(key) {
            self.stats.reconciled();
            if e.has(flag::ANOMALY_OPEN) {
                self.resolve(out, key, &e, now_ns, why);
            }
        }
    }

    fn reconcile_minis(
        &mut self,
        netns: u32,
        alive: &Alive,
        dump_start_ns: u64,
        now_ns: u64,
        out: &mut Vec<Fact>,
        suspects: &mut Vec<(u32, Tuple)>,
    ) {
        if !alive.timewait {
            // A dump without TIME_WAIT cannot tell an orphan that went on to TIME_WAIT from
            // one that is gone: the sweep's exact lookups judge those.
            return;
        }
        let orphans: Vec<(Tuple, u64)> = self
            .orphans
            .iter()
            .filter(|((n, _), _)| *n == netns)
            .filter_map(|((_, t), &key)| Some((*t, self.table.get(key)?.since_ns)))
            .filter(|&(_, since)| since < dump_start_ns)
            .collect();
        for (t, _) in orphans {
            match alive.minis.get(&t) {
                Some((st, _)) => {
                    self.apply_orphan(netns, &t, Found::Mini(st), now_ns, out);
                }
                None => suspects.push((netns, t)),
            }
        }
        // Bounded: when a burst expires, every one of a million entries is missing from the
        // dump, and their sweep ends them with a handful of lookups where this would take one
        // each. The rest wait for the sweep or the next reconciliation.
        suspects.extend(
            self.timewait
                .iter()
                .filter(|s| s.netns == netns && s.since_ns < dump_start_ns)
                .filter(|s| !matches!(alive.minis.get(&s.tuple), Some((TcpState::TimeWait, _))))
                .map(|s| (netns, s.tuple))
                .take(MAX_TIMEWAIT_SUSPECTS),
        );
        for (t, st, expires) in alive.minis.iter() {
            if alive.adopt_timewait
                && st == TcpState::TimeWait
                && self.timewait.get(netns, &t).is_none()
                && !self.orphans.contains_key(&(netns, t))
            {
                let since = estimated_since(now_ns, expires);
                let active = !self.listeners.contains_key(&(netns, t.sport));
                let how = MetTimeWait::Dump { now_ns };
                self.enter_timewait(netns, &t, since, how, active, out);
            }
        }
    }

    /// Applies one exact lookup of a FIN_WAIT2 mini-socket. Returns true
    /// when it ended.
    fn apply_orphan(
        &mut self,
        netns: u32,
        t: &Tuple,
        found: Found,
        now_ns: u64,
        out: &mut Vec<Fact>,
    ) -> bool {
        match found {
            Found::Mini(TcpState::FinWait2) => false,
            Found::Mini(TcpState::TimeWait) => {
                self.orphan_to_timewait(netns, t, now_ns, Via::SockDiag, out);
                false
            }
            _ => self.end_orphan(netns, t, now_ns, Via::SockDiag, Resolution::Reconciled, out),
        }
    }

    /// The lookups a sweep at `now_ns` should make: TIME_WAIT mini-sockets
    /// past their 2MSL and FIN_WAIT2 mini-sockets, per namespace.
    pub fn sweep_lookups(&mut self, now_ns: u64) -> Vec<Sweep> {
        let mut by_ns: HashMap<u32, Sweep> = HashMap::new();
        for s in self.timewait.due(now_ns, MAX_SWEPT_TIMEWAIT) {
            by_ns
                .entry(s.netns)
                .or_insert_with(|| Sweep {
                    netns: s.netns,
                    ..Sweep::default()
                })
                .timewait
                .push(s.tuple);
        }
        let mut orphans: Vec<(u32, u64, Tuple)> = self
            .orphans
            .iter()
            .filter_map(|(&(n, t), &key)| Some((n, self.table.get(key)?.since_ns, t)))
            .collect();
        orphans.sort_unstable_by_key(|&(n, since, _)| (n, since));
        for (n, _, t) in orphans {
            let p = by_ns.entry(n).or_insert_with(|| Sweep {
                netns: n,
                ..Sweep::default()
            });
            if p.orphans.len() < MAX_ORPHAN_LOOKUPS {
                p.orphans.push(t);
            }
        }
        let mut v: Vec<Sweep> = by_ns.into_values().filter(|p| p.netns != 0).collect();
        v.sort_by_key(|p| p.netns);
        v
    }

    /// Applies what a sweep's lookups found.
    pub fn apply_sweep(&mut self, r: &Swept, out: &mut Vec<Fact>) {
        let now_ns = r.done_ns;
        if r.netns_gone {
            self.netns_gone(r.netns, now_ns, out);
            return;
        }
        for t in r.timewait.iter().take(r.timewait_gone) {
            self.end_timewait(r.netns, t, now_ns, Via::SockDiag, out);
        }
        for (t, found) in &r.orphans {
            self.apply_orphan(r.netns, t, *found, now_ns, out);
        }
        if r.timewait_gone > 0 {
            self.timewait.shrink_if_sparse();
        }
    }

    /// Sets a namespace's port range and `tcp_tw_reuse`, and counts its
    /// TIME_WAIT mini-sockets again under them.
    pub fn set_netns_info(
        &mut self,
        netns: u32,
        info: NetnsInfo,
        now_ns: u64,
        out: &mut Vec<Fact>,
    ) {
        // Settings are read again every few seconds: unchanged, nothing is recounted.
        if self.rules.pressure.known(netns) == Some(info) {
            return;
        }
        self.rules.pressure.set_info(netns, info);
        // A server's TIME_WAIT sockets hold its listening port, not an ephemeral one.
        let listeners = &self.listeners;
        let tuples = self
            .timewait
            .iter()
            .filter(|s| s.netns == netns && !listeners.contains_key(&(netns, s.tuple.sport)))
            .map(|s| s.tuple);
        self.rules.pressure.recount(netns, tuples, now_ns, out);
    }

    /// The host's settings, used until a namespace's own are known.
    pub fn set_default_netns_info(&mut self, info: NetnsInfo) {
        self.rules.pressure.set_default(info);
    }

    /// Namespaces with TIME_WAIT mini-sockets whose settings are unknown.
    pub fn netns_without_info(&mut self) -> Vec<u32> {
        let pressure = &self.rules.pressure;
        self.unknown_netns.retain(|&n| !pressure.knows(n));
        let mut v: Vec<u32> = self.unknown_netns.iter().copied().collect();
        v.sort_unstable();
        v
    }

    /// Namespaces whose settings were read: read again now and then, as an operator may change
    /// them, and a namespace destroyed unseen may have left its inode number to a new one.
    pub fn netns_with_info(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.rules.pressure.namespaces().collect();
        v.sort_unstable();
        v
    }

    /// Request sockets (half-open connections) per namespace, from the last
    /// dump: `ss -tan` counts them as SYN-RECV.
    pub fn requests(&self) -> u64 {
        self.requests.values().sum()
    }
}

/// When a mini-socket found by a dump entered TIME_WAIT, from the time
/// left on its 2MSL timer.
fn estimated_since(now_ns: u64, expires_ms: u32) -> u64 {
    let left = u64::from(expires_ms).saturating_mul(1_000_000);
    now_ns.saturating_sub(TIMEWAIT_LEN_NS.saturating_sub(left))
}

/// Listener polls and host readings: answers about the kernel that are not about one socket.
impl Tracker {
    /// Whether listeners' queues are to be polled.
    pub fn watches_backlogs(&self) -> bool {
        self.rules.each().iter().any(|r| r.polls_listeners())
    }

    /// A poll of listeners' accept queues in `namespaces`, taken at `at_ns`.
    pub fn listeners_polled(
        &mut self,
        at_ns: u64,
        namespaces: &[u32],
        listeners: &[Listening],
        out: &mut Vec<Fact>,
    ) {
        for r in self.rules.each_mut() {
            r.listeners_polled(at_ns, namespaces, listeners, out);
        }
    }

    /// Whether the host's orphan and TCP memory counts are to be read.
    pub fn watches_orphans(&self) -> bool {
        self.rules.each().iter().any(|r| r.reads_host())
    }

    /// A reading of the host's orphan and TCP memory counts.
    pub fn host_tcp_read(&mut self, now_ns: u64, host: HostTcp, out: &mut Vec<Fact>) {
        let table = &self.table;
        let comms = &self.comms;
        let by_owner = || closing_by_owner(table, comms);
        for r in self.rules.each_mut() {
            r.host_read(now_ns, host, &by_owner, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minis_keep_the_newest_of_duplicates_sealed_or_not() {
        use crate::socket::Family;
        let lo: std::net::IpAddr = "127.0.0.1".parse().expect("addr");
        let t = |p: u16| Tuple::new(lo, p, lo, 80);
        let mut m = Minis::default();
        for p in [9, 3, 7, 3] {
            m.push(t(p), TcpState::TimeWait, u32::from(p));
        }
        m.push(t(3), TcpState::FinWait2, 33);
        for sealed in [false, true] {
            if sealed {
                m.seal();
                assert_eq!(m.len(), 3);
                let order: Vec<u16> = m.iter().map(|e| e.0.sport).collect();
                assert_eq!(order, [3, 7, 9]);
            }
            assert_eq!(
                m.get(&t(3)),
                Some((TcpState::FinWait2, 33)),
                "sealed {sealed}"
            );
            assert_eq!(m.get(&t(9)), Some((TcpState::TimeWait, 9)));
            assert_eq!(m.get(&t(4)), None);
            assert_eq!(t(3).family, Family::V4);
        }
    }

    #[test]
    fn a_packed_mini_keeps_its_substate_and_timer() {
        let lo: std::net::IpAddr = "10.1.2.3".parse().expect("addr");
        let mut m = Minis::default();
        let long = 18 * 3600 * 1000;
        m.push(Tuple::new(lo, 1, lo, 80), TcpState::FinWait2, long);
        m.push(Tuple::new(lo, 2, lo, 80), TcpState::TimeWait, 59_999);
        m.push(Tuple::new(lo, 3, lo, 80), TcpState::TimeWait, u32::MAX);
        m.seal();
        assert_eq!(
            m.get(&Tuple::new(lo, 1, lo, 80)),
            Some((TcpState::FinWait2, long))
        );
        assert_eq!(
            m.get(&Tuple::new(lo, 2, lo, 80)),
            Some((TcpState::TimeWait, 59_999))
        );
        assert_eq!(
            m.get(&Tuple::new(lo, 3, lo, 80)),
            Some((TcpState::TimeWait, (1 << 28) - 1)),
            "a timer past 74 h is kept as 74 h"
        );
    }

    #[test]
    fn time_wait_age_comes_from_its_timer() {
        assert_eq!(
            estimated_since(100 * 1_000_000_000, 60_000),
            100_000_000_000
        );
        assert_eq!(estimated_since(100 * 1_000_000_000, 15_000), 55_000_000_000);
        assert_eq!(estimated_since(1, 0), 0);
    }
}
