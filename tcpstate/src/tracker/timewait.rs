//! TIME_WAIT mini-sockets: what `tcp_time_wait()` leaves behind a closed
//! connection for 2MSL (60 s), invisible to the tracepoint. A busy client
//! host holds hundreds of thousands, so an entry is a namespace, a 4-tuple
//! and the time it entered TIME_WAIT, no more: IPv4 and IPv6 keys are kept
//! apart so an IPv4 entry costs 24 bytes plus the hash table's overhead.
//!
//! The peer chooses half of every tuple, so the maps use [`PeerKeyHasher`]
//! (HashDoS-resistant enough for keys an attacker only partly controls, and
//! several times cheaper than SipHash at 10k+ connections a second).

use std::{collections::BinaryHeap, hash::BuildHasher as _};

use hashbrown::HashMap;

use super::PeerKeyHasher;
use crate::socket::{Family, Tuple};

/// How long a TIME_WAIT mini-socket lives (`TCP_TIMEWAIT_LEN`, a kernel
/// constant): its predicted end. The kernel's timer wheel fires it up to a
/// few seconds later (2 s at HZ=250), and an ACK in TIME_WAIT restarts it,
/// so the end itself is checked with sock_diag (`sweep`).
pub const TIMEWAIT_LEN_NS: u64 = 60_000_000_000;

/// The top bit of the stored time: the entry predates the daemon, its
/// time is an estimate from the kernel's timer.
const ESTIMATED: u64 = 1 << 63;

/// The next bit: the connection was opened by connect() (its destination is the remote end;
/// else the local listening port). Kept from the first insert of a tuple, so the socket
/// leaves the destination it was counted under.
const ACTIVE: u64 = 1 << 62;

const FLAGS: u64 = ESTIMATED | ACTIVE;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct V4 {
    netns: u32,
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: u16,
    dport: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct V6 {
    netns: u32,
    sport: u16,
    dport: u16,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

const _: () = assert!(size_of::<(V4, u64)>() == 24);

fn v4(netns: u32, t: &Tuple) -> V4 {
    let four = |a: &[u8; 16]| [a[0], a[1], a[2], a[3]];
    V4 {
        netns,
        saddr: four(&t.saddr),
        daddr: four(&t.daddr),
        sport: t.sport,
        dport: t.dport,
    }
}

fn v6(netns: u32, t: &Tuple) -> V6 {
    V6 {
        netns,
        sport: t.sport,
        dport: t.dport,
        saddr: t.saddr,
        daddr: t.daddr,
    }
}

impl V4 {
    fn tuple(&self) -> (u32, Tuple) {
        (
            self.netns,
            Tuple::v4(self.saddr, self.sport, self.daddr, self.dport),
        )
    }
}

impl V6 {
    fn tuple(&self) -> (u32, Tuple) {
        (
            self.netns,
            Tuple {
                family: Family::V6,
                saddr: self.saddr,
                daddr: self.daddr,
                sport: self.sport,
                dport: self.dport,
            },
        )
    }
}

/// A due entry while the oldest are chosen (ordered by the age beside it, and by key only
/// to break ties).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    V4(V4, u64),
    V6(V6, u64),
}

/// One mini-socket as the tracker hands it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeWaitSocket {
    pub netns: u32,
    pub tuple: Tuple,
    pub since_ns: u64,
    /// `since_ns` is estimated (a socket that predates the daemon).
    pub estimated: bool,
    /// Opened by connect().
    pub active: bool,
}

/// Which keys may be in the table: one bit per hash, set on insert and cleared only by a
/// rebuild. Every connect and every accepted handshake asks whether it takes over a
/// TIME_WAIT; almost none does, and asking the table was a cache miss into megabytes each
/// time: 16% of the daemon's CPU under churn (`perf`, 2026-12-06). The bits, 8 to 16 per
/// entry, stay in cache, and a clear one says "not here" without touching the table.
#[derive(Debug)]
struct Filter {
    bits: Vec<u64>,
    /// Removals since the last rebuild: their bits may still be set.
    stale: usize,
    hasher: foldhash::fast::RandomState,
}

/// The smallest filter: 64k bits, 8 KB.
const MIN_FILTER_WORDS: usize = 1024;

impl Filter {
    fn new() -> Self {
        Self {
            bits: vec![0; MIN_FILTER_WORDS],
            stale: 0,
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Words for `len` entries: at least 8 bits each (a false "maybe" under 12%).
    fn words_for(len: usize) -> usize {
        (len.saturating_mul(8) / 64)
            .next_power_of_two()
            .max(MIN_FILTER_WORDS)
    }

    fn slot(&self, h: u64) -> (usize, u64) {
        // The length is a power of two.
        let bit = h & (self.bits.len() as u64 * 64 - 1);
        ((bit / 64) as usize, 1 << (bit % 64))
    }

    fn set(&mut self, h: u64) {
        let (w, b) = self.slot(h);
        self.bits[w] |= b;
    }

    fn may_hold(&self, h: u64) -> bool {
        let (w, b) = self.slot(h);
        self.bits[w] & b != 0
    }
}

#[derive(Debug)]
pub struct TimeWaitTable {
    v4: HashMap<V4, u64, PeerKeyHasher>,
    v6: HashMap<V6, u64, PeerKeyHasher>,
    filter: Filter,
    capacity: usize,
    refused: u64,
    /// No entry entered TIME_WAIT before this: a sweep skips the scan until
    /// it can find one due. Lowered on insert, raised by each scan.
    oldest: u64,
}

impl TimeWaitTable {
    pub fn new(capacity: usize) -> Self {
        Self {
            v4: HashMap::default(),
            v6: HashMap::default(),
            filter: Filter::new(),
            capacity,
            refused: 0,
            oldest: u64::MAX,
        }
    }

    /// Makes room for `n` more IPv4 entries at once (capped at the table's capacity): at a
    /// million, growing by doubling held the old and the new bucket arrays together, 25 MB
    /// more than the table at its peak.
    pub fn reserve(&mut self, n: usize) {
        let room = self.capacity.saturating_sub(self.v4.len() + self.v6.len());
        self.v4.reserve(n.min(room));
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Adds a mini-socket; `active`: opened by connect(). Re-adding the same tuple replaces
    /// it (the kernel has one per tuple).
    pub fn insert(
        &mut self,
        netns: u32,
        t: &Tuple,
        since_ns: u64,
        (estimated, active): (bool, bool),
    ) -> Insert {
        let stamp = (since_ns & !FLAGS)
            | if estimated { ESTIMATED } else { 0 }
            | if active { ACTIVE } else { 0 };
        let full = self.len() >= self.capacity;
        let (r, h) = match t.family {
            Family::V4 => {
                let k = v4(netns, t);
                let h = self.filter.hasher.hash_one(k);
                (put(&mut self.v4, k, stamp, full), h)
            }
            Family::V6 => {
                let k = v6(netns, t);
                let h = self.filter.hasher.hash_one(k);
                (put(&mut self.v6, k, stamp, full), h)
            }
        };
        if r != Insert::Full {
            self.oldest = self.oldest.min(since_ns);
            self.filter.set(h);
            if Filter::words_for(self.len()) > self.filter.bits.len() {
                self.rebuild_filter();
            }
        }
        r
    }

    /// The filter again from the entries: sized to them, without the bits of those removed.
    /// O(entries), after as many removals or growth: O(1) per change.
    fn rebuild_filter(&mut self) {
        let mut f = Filter {
            bits: vec![0; Filter::words_for(self.len())],
            stale: 0,
            hasher: self.filter.hasher.clone(),
        };
        for k in self.v4.keys() {
            f.set(f.hasher.hash_one(k));
        }
        for k in self.v6.keys() {
            f.set(f.hasher.hash_one(k));
        }
        self.filter = f;
    }

    /// Counts a socket refused because the table is full. The caller counts, since only it
    /// knows whether this socket was refused before.
    pub fn count_refused(&mut self) {
        self.refused += 1;
    }

    pub fn get(&self, netns: u32, t: &Tuple) -> Option<TimeWaitSocket> {
        let f = &self.filter;
        let stamp = match t.family {
            Family::V4 => {
                let k = v4(netns, t);
                f.may_hold(f.hasher.hash_one(k)).then(|| self.v4.get(&k))?
            }
            Family::V6 => {
                let k = v6(netns, t);
                f.may_hold(f.hasher.hash_one(k)).then(|| self.v6.get(&k))?
            }
        }?;
        Some(socket(netns, *t, *stamp))
    }

    pub fn remove(&mut self, netns: u32, t: &Tuple) -> Option<TimeWaitSocket> {
        let f = &self.filter;
        let stamp = match t.family {
            Family::V4 => {
                let k = v4(netns, t);
                if !f.may_hold(f.hasher.hash_one(k)) {
                    return None;
                }
                self.v4.remove(&k)
            }
            Family::V6 => {
                let k = v6(netns, t);
                if !f.may_hold(f.hasher.hash_one(k)) {
                    return None;
                }
                self.v6.remove(&k)
            }
        }?;
        self.filter.stale += 1;
        if self.filter.stale > self.len().max(MIN_FILTER_WORDS * 8) {
            self.rebuild_filter();
        }
        Some(socket(netns, *t, stamp))
    }

    pub fn iter(&self) -> impl Iterator<Item = TimeWaitSocket> + '_ {
        let a = self.v4.iter().map(|(k, &s)| {
            let (n, t) = k.tuple();
            socket(n, t, s)
        });
        let b = self.v6.iter().map(|(k, &s)| {
            let (n, t) = k.tuple();
            socket(n, t, s)
        });
        a.chain(b)
    }

    /// At most `max` of the mini-sockets whose 2MSL has run out by `now_ns`, the oldest,
    /// sorted by namespace and age: the ones to check with the kernel. A scan of the raw
    /// entries (no conversion unless due), once per sweep, never per event. Bounded because
    /// a burst's expiry makes them all due at once: a million, listed whole three times over
    /// on their way to the worker, peaked at 200 MB (issue 21.10).
    pub fn due(&mut self, now_ns: u64, max: usize) -> Vec<TimeWaitSocket> {
        let limit = now_ns.saturating_sub(TIMEWAIT_LEN_NS);
        if self.oldest > limit || max == 0 {
            return Vec::new();
        }
        let stamps = self.v4.values().chain(self.v6.values());
        self.oldest = stamps.map(|s| s & !FLAGS).min().unwrap_or(u64::MAX);
        let is_due = |stamp: u64| stamp & !FLAGS <= limit;
        // The `max` oldest: a max-heap by age that drops its youngest when over. Each
        // namespace's share is then a prefix of its own oldest-first order, which is what
        // the sweep's binary search needs.
        let mut oldest: BinaryHeap<(u64, Due)> = BinaryHeap::with_capacity(max.min(1024));
        let mut keep = |stamp: u64, e: Due| {
            let age = stamp & !FLAGS;
            if oldest.len() < max {
                oldest.push((age, e));
            } else if oldest.peek().is_some_and(|&(young, _)| age < young) {
                oldest.pop();
                oldest.push((age, e));
            }
        };
        for (k, &s) in self.v4.iter().filter(|&(_, &s)| is_due(s)) {
            keep(s, Due::V4(*k, s));
        }
        for (k, &s) in self.v6.iter().filter(|&(_, &s)| is_due(s)) {
            keep(s, Due::V6(*k, s));
        }
        let mut v: Vec<TimeWaitSocket> = oldest
            .into_iter()
            .map(|(_, e)| {
                let ((n, t), s) = match e {
                    Due::V4(k, s) => (k.tuple(), s),
                    Due::V6(k, s) => (k.tuple(), s),
                };
                socket(n, t, s)
            })
            .collect();
        v.sort_unstable_by_key(|s| (s.netns, s.since_ns));
        v
    }

    /// Gives back the bucket arrays of a table that emptied after a burst: a hash map never
    /// shrinks by itself, and a million TIME_WAIT gone left 50 MB held for nothing.
    pub fn shrink_if_sparse(&mut self) {
        fn shrink<K: Eq + std::hash::Hash, V>(m: &mut HashMap<K, V, PeerKeyHasher>) {
            if m.capacity() > 4096 && m.len() < m.capacity() / 8 {
                m.shrink_to(m.len() * 2);
            }
        }
        shrink(&mut self.v4);
        shrink(&mut self.v6);
        if Filter::words_for(self.len()) < self.filter.bits.len() {
            self.rebuild_filter();
        }
    }

    /// Heap bytes (hashbrown: buckets of key + value, one control byte each).
    pub fn bytes(&self) -> usize {
        self.v4.allocation_size() + self.v6.allocation_size() + self.filter.bits.len() * 8
    }
}

/// What an insert did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insert {
    New,
    Replaced,
    /// Refused (and counted): the table is full.
    Full,
}

/// One hash of the key whatever happens.
fn put<K: std::hash::Hash + Eq>(
    m: &mut HashMap<K, u64, PeerKeyHasher>,
    k: K,
    stamp: u64,
    full: bool,
) -> Insert {
    use hashbrown::hash_map::Entry;
    match m.entry(k) {
        Entry::Occupied(mut o) => {
            let active = *o.get() & ACTIVE;
            o.insert((stamp & !ACTIVE) | active);
            Insert::Replaced
        }
        Entry::Vacant(_) if full => Insert::Full,
        Entry::Vacant(v) => {
            v.insert(stamp);
            Insert::New
        }
    }
}

fn socket(netns: u32, tuple: Tuple, stamp: u64) -> TimeWaitSocket {
    TimeWaitSocket {
        netns,
        tuple,
        since_ns: stamp & !FLAGS,
        estimated: stamp & ESTIMATED != 0,
        active: stamp & ACTIVE != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(a: &str, sport: u16) -> Tuple {
        let ip = a.parse().expect("addr");
        Tuple::new(ip, sport, ip, 80)
    }

    #[test]
    fn both_families_round_trip_and_are_bounded() {
        let mut tw = TimeWaitTable::new(2);
        assert_eq!(
            tw.insert(7, &tuple("10.0.0.1", 1), 5, (false, true)),
            Insert::New
        );
        assert_eq!(
            tw.insert(7, &tuple("fd00::1", 2), 6, (true, false)),
            Insert::New
        );
        assert_eq!(
            tw.insert(7, &tuple("10.0.0.1", 3), 7, (false, false)),
            Insert::Full
        );
        assert_eq!(
            tw.insert(7, &tuple("10.0.0.1", 1), 8, (false, false)),
            Insert::Replaced
        );
        assert_eq!(tw.len(), 2);
        let s = tw.get(7, &tuple("fd00::1", 2)).expect("v6");
        assert_eq!((s.since_ns, s.estimated), (6, true));
        assert_eq!(tw.get(8, &tuple("fd00::1", 2)), None, "other netns");
        let s = tw.remove(7, &tuple("10.0.0.1", 1)).expect("v4");
        assert_eq!(s.since_ns, 8);
        assert!(s.active, "a replacement keeps the first insert's direction");
        assert_eq!(s.tuple, tuple("10.0.0.1", 1));
    }

    #[test]
    fn due_lists_expired_oldest_first() {
        let mut tw = TimeWaitTable::new(10);
        tw.insert(7, &tuple("10.0.0.1", 2), 20, (false, false));
        tw.insert(7, &tuple("10.0.0.1", 1), 10, (false, false));
        tw.insert(7, &tuple("10.0.0.1", 3), 30, (false, false));
        let due = tw.due(TIMEWAIT_LEN_NS + 25, 100);
        assert_eq!(
            due.iter().map(|s| s.tuple.sport).collect::<Vec<_>>(),
            [1, 2]
        );
    }

    #[test]
    fn due_is_bounded_to_the_oldest_per_namespace_prefix() {
        let mut tw = TimeWaitTable::new(100_000);
        // Two namespaces interleaved in age, and an IPv6 one among the oldest.
        for i in 0..10_000u16 {
            tw.insert(
                u32::from(i % 2),
                &tuple("10.0.0.1", i),
                u64::from(i) + 1,
                (false, false),
            );
        }
        tw.insert(1, &tuple("fd00::1", 9), 0, (false, false));
        let due = tw.due(TIMEWAIT_LEN_NS + 100_000, 101);
        assert_eq!(due.len(), 101);
        assert_eq!(
            due.iter().filter(|s| s.tuple.family == Family::V6).count(),
            1
        );
        let v4: Vec<(u32, u64)> = due
            .iter()
            .filter(|s| s.tuple.family == Family::V4)
            .map(|s| (s.netns, s.since_ns))
            .collect();
        let want: Vec<(u32, u64)> = (0..100u64)
            .map(|i| ((i % 2) as u32, i + 1))
            .filter(|&(n, _)| n == 0)
            .chain(
                (0..100u64)
                    .map(|i| ((i % 2) as u32, i + 1))
                    .filter(|&(n, _)| n == 1),
            )
            .collect();
        assert_eq!(v4, want, "sorted by namespace, then the oldest first");
        assert_eq!(tw.len(), 10_001, "listing takes nothing out");
    }

    #[test]
    fn an_emptied_table_gives_its_buckets_back() {
        let mut tw = TimeWaitTable::new(100_000);
        for i in 0..50_000u32 {
            let t = Tuple::v4([10, 0, (i >> 8) as u8, i as u8], 1000, [10, 1, 0, 1], 80);
            tw.insert(1, &t, 1, (false, false));
        }
        let full = tw.bytes();
        let buckets = tw.v4.allocation_size();
        for i in 0..49_990u32 {
            let t = Tuple::v4([10, 0, (i >> 8) as u8, i as u8], 1000, [10, 1, 0, 1], 80);
            tw.remove(1, &t);
        }
        assert_eq!(
            tw.v4.allocation_size(),
            buckets,
            "removing alone keeps the buckets (the filter is rebuilt smaller)"
        );
        tw.shrink_if_sparse();
        assert!(
            tw.bytes() < full / 100,
            "{} of {full} bytes kept",
            tw.bytes()
        );
        assert_eq!(tw.len(), 10);
    }

    /// The filter in front of the table never hides an entry: through growth, removals and
    /// the rebuilds they cause, every lookup agrees with a plain map.
    #[test]
    fn the_filter_never_hides_an_entry() {
        let mut t = TimeWaitTable::new(1 << 20);
        let mut model = std::collections::HashMap::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..200_000u64 {
            // xorshift: a reproducible mix of inserts, removals and lookups.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let port = 1024 + (x % 30_000) as u16;
            let netns = 1 + (x >> 40) as u32 % 3;
            let tup = tuple(if x & 1 == 0 { "10.0.0.1" } else { "::1" }, port);
            match (x >> 20) % 4 {
                0 | 1 => {
                    t.insert(netns, &tup, i, (false, false));
                    model.insert((netns, tup), i);
                }
                2 => assert_eq!(
                    t.remove(netns, &tup).map(|s| s.since_ns),
                    model.remove(&(netns, tup)),
                    "remove {netns} {tup:?}"
                ),
                _ => assert_eq!(
                    t.get(netns, &tup).map(|s| s.since_ns),
                    model.get(&(netns, tup)).copied(),
                    "get {netns} {tup:?}"
                ),
            }
        }
        assert_eq!(t.len(), model.len());
        for (&(netns, tup), &since) in &model {
            assert_eq!(t.get(netns, &tup).map(|s| s.since_ns), Some(since));
        }
    }
}
