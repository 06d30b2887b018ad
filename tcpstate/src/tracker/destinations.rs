//! Sockets per destination and holder in the states where connections pile up ("which
//! upstream?"), kept incrementally as sockets enter and leave states, like the per-cgroup
//! counts: a status page or a scrape walks destinations, never sockets.
//!
//! A destination is the remote end (address:port) of a connection this host opened, or the
//! local listening port of one it accepted: a server's clients are many, its port is one.
//! Remote peers and local scanners choose destinations, so the map is capped
//! ([`MAX_DESTINATIONS`], and [`MAX_HOLDERS`] per destination): past a cap a socket is
//! counted in an `other` bucket, so memory stays bounded whatever is scanned and the totals
//! stay exact. Removal takes a socket off its own slot while that slot counts one in its
//! state, else off the bucket it overflowed into; so a slot freed and taken again while an
//! overflowed socket lived may show one socket under another's name, and the sum never drifts.

use std::collections::HashMap;

use super::PeerKeyHasher;
use crate::{
    socket::{Family, Tuple},
    state::TcpState,
};

/// The states counted per destination: a connection waiting to be made, and the close
/// handshake's, where sockets wait on an application or a peer.
pub const STATES: [TcpState; 7] = [
    TcpState::SynSent,
    TcpState::CloseWait,
    TcpState::FinWait1,
    TcpState::FinWait2,
    TcpState::LastAck,
    TcpState::Closing,
    TcpState::TimeWait,
];

/// Destinations counted by name. A scan of 65,536 ports stays within 4096 slots of a few
/// hundred bytes each; what does not fit is summed under `other`.
pub const MAX_DESTINATIONS: usize = 4096;

/// Holders counted by name per destination: a destination many workloads share (a DNS
/// server, a database) keeps its heaviest-first holders, the rest summed under one slot.
pub const MAX_HOLDERS: usize = 16;

pub type Counts = [u32; STATES.len()];

/// Where sockets go, within one network namespace: two containers' `127.0.0.1:5432` (or
/// two pods' `:8080`) are two upstreams, never one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dest {
    /// To a remote address and port (this host connected).
    Outbound {
        netns: u32,
        family: Family,
        addr: [u8; 16],
        port: u16,
    },
    /// To a local listening port (this host accepted).
    Inbound { netns: u32, port: u16 },
}

impl Dest {
    /// The destination of a socket in `netns` whose tuple is `t`; `accepted`: it came from
    /// a listener.
    pub fn of(t: &Tuple, netns: u32, accepted: bool) -> Self {
        if accepted {
            Self::Inbound {
                netns,
                port: t.sport,
            }
        } else {
            Self::Outbound {
                netns,
                family: t.family,
                addr: t.daddr,
                port: t.dport,
            }
        }
    }

    /// The namespace the sockets are in (their inode).
    pub fn netns(&self) -> u32 {
        match *self {
            Self::Outbound { netns, .. } | Self::Inbound { netns, .. } => netns,
        }
    }

    /// As operators write it: `10.0.3.7:5432`, `[fd00::1]:443`, `:8080` (inbound).
    pub fn addr(&self) -> String {
        match *self {
            Self::Outbound {
                family, addr, port, ..
            } => {
                let t = Tuple {
                    family,
                    saddr: addr,
                    daddr: addr,
                    sport: port,
                    dport: port,
                };
                match t.daddr() {
                    std::net::IpAddr::V4(a) => format!("{a}:{port}"),
                    std::net::IpAddr::V6(a) => format!("[{a}]:{port}"),
                }
            }
            Self::Inbound { port, .. } => format!(":{port}"),
        }
    }

    /// In a sentence: `10.0.3.7:5432`, `inbound to :8080`.
    pub fn describe(&self) -> String {
        match self {
            Self::Outbound { .. } => self.addr(),
            Self::Inbound { .. } => format!("inbound to {}", self.addr()),
        }
    }

    pub fn direction(&self) -> &'static str {
        match self {
            Self::Outbound { .. } => "outbound",
            Self::Inbound { .. } => "inbound",
        }
    }
}

/// Who holds the sockets: the cgroup (0: unknown) and the interned comm of the owner the
/// table has ([`Holder::NONE`]: none, as for TIME_WAIT, which no process holds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Holder {
    pub cgroup: u64,
    pub comm: u32,
}

impl Holder {
    pub const NONE: u32 = u32::MAX;
    /// The slot of a destination's holders past [`MAX_HOLDERS`].
    pub const OTHERS: Holder = Holder {
        cgroup: u64::MAX,
        comm: u32::MAX,
    };
}

#[derive(Clone, Debug, Default)]
pub struct Slot {
    /// Every holder's sockets, per [`STATES`].
    pub total: Counts,
    pub holders: Vec<(Holder, Counts)>,
}

#[derive(Debug, Default)]
pub struct Destinations {
    /// Peers and scanners choose destinations: a keyed hasher.
    map: HashMap<Dest, Slot, PeerKeyHasher>,
    /// Sockets of destinations past the cap.
    other: Counts,
}

fn index(st: TcpState) -> Option<usize> {
    STATES.iter().position(|&s| s == st)
}

fn bump(n: &mut u32, add: bool) {
    *n = if add {
        n.saturating_add(1)
    } else {
        n.saturating_sub(1)
    };
}

impl Destinations {
    /// Books (`add`) or unbooks a socket in `st` to `dest`, held by `holder`. O(1): one
    /// hash, and a scan of at most [`MAX_HOLDERS`].
    pub fn account(&mut self, dest: Dest, holder: Holder, st: TcpState, add: bool) {
        let Some(i) = index(st) else {
            return;
        };
        let full = self.map.len() >= MAX_DESTINATIONS;
        let slot = match self.map.get_mut(&dest) {
            Some(s) if add || s.total[i] > 0 => s,
            None if add && !full => self.map.entry(dest).or_default(),
            _ => {
                bump(&mut self.other[i], add);
                return;
            }
        };
        bump(&mut slot.total[i], add);
        let pos = slot
            .holders
            .iter()
            .position(|(h, c)| *h == holder && (add || c[i] > 0));
        let pos = match pos {
            Some(p) => p,
            None if add && slot.holders.len() < MAX_HOLDERS => {
                slot.holders.push((holder, Counts::default()));
                slot.holders.len() - 1
            }
            None => match slot
                .holders
                .iter()
                .position(|(h, c)| *h == Holder::OTHERS && (add || c[i] > 0))
            {
                Some(p) => p,
                None if add => {
                    slot.holders.push((Holder::OTHERS, Counts::default()));
                    slot.holders.len() - 1
                }
                // The socket was counted under a holder whose slot it shares now: take it
                // from any holder that has one, so the destination's total and its
                // holders' sum stay equal.
                None => match slot.holders.iter().position(|(_, c)| c[i] > 0) {
                    Some(p) => p,
                    None => return,
                },
            },
        };
        bump(&mut slot.holders[pos].1[i], add);
        if slot.holders[pos].1 == Counts::default() {
            slot.holders.swap_remove(pos);
        }
        if slot.total == Counts::default() {
            self.map.remove(&dest);
        }
    }

    /// Sockets to `dest` in `st`, every holder's (0 when the destination is not counted by
    /// name).
    pub fn count(&self, dest: &Dest, st: TcpState) -> u32 {
        match (self.map.get(dest), index(st)) {
            (Some(s), Some(i)) => s.total[i],
            _ => 0,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Dest, &Slot)> {
        self.map.iter()
    }

    /// Sockets of destinations past the cap.
    pub fn other(&self) -> &Counts {
        &self.other
    }

    /// Destinations counted by name (at most [`MAX_DESTINATIONS`]).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The `k` destinations with the most sockets (ties by destination, so the choice is
    /// stable), and the rest summed: what a bounded metric exports.
    pub fn top(&self, k: usize) -> (Vec<(Dest, Counts)>, Counts) {
        let mut v: Vec<(Dest, Counts)> = self.map.iter().map(|(d, s)| (*d, s.total)).collect();
        let weight = |c: &Counts| c.iter().map(|&n| u64::from(n)).sum::<u64>();
        v.sort_unstable_by(|a, b| weight(&b.1).cmp(&weight(&a.1)).then(a.0.cmp(&b.0)));
        let mut rest = self.other;
        for (_, c) in v.iter().skip(k) {
            for (r, n) in rest.iter_mut().zip(c) {
                *r = r.saturating_add(*n);
            }
        }
        v.truncate(k);
        (v, rest)
    }

    /// Every (destination, holder, state, count) with a socket, most first: the status
    /// page's "top destinations". Ties by destination, holder and state.
    pub fn top_holders(&self, n: usize) -> Vec<(Dest, Holder, TcpState, u32)> {
        let mut v: Vec<(Dest, Holder, TcpState, u32)> = self
            .map
            .iter()
            .flat_map(|(d, s)| {
                s.holders.iter().flat_map(move |(h, c)| {
                    STATES
                        .iter()
                        .zip(c)
                        .filter(|&(_, &n)| n > 0)
                        .map(move |(&st, &n)| (*d, *h, st, n))
                })
            })
            .collect();
        v.sort_unstable_by(|a, b| {
            b.3.cmp(&a.3)
                .then(a.0.cmp(&b.0))
                .then(a.1.cmp(&b.1))
                .then((a.2 as u8).cmp(&(b.2 as u8)))
        });
        v.truncate(n);
        v
    }

    /// Every socket counted, named or not: tests compare it with the table.
    #[cfg(test)]
    pub fn sum(&self) -> Counts {
        let mut sum = self.other;
        for s in self.map.values() {
            let mut held = Counts::default();
            for (_, c) in &s.holders {
                for (h, n) in held.iter_mut().zip(c) {
                    *h += n;
                }
            }
            assert_eq!(held, s.total, "a destination's holders sum to its total");
            for (x, n) in sum.iter_mut().zip(s.total) {
                *x += n;
            }
        }
        sum
    }
}

/// How long a window of [`Flows`] lasts: rates are over the last whole one.
pub const FLOW_WINDOW_NS: u64 = 10_000_000_000;

/// Connections opened and closed to one destination in a window, and who began each close.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub opened: u32,
    pub closed: u32,
    /// Closes begun here: we sent the first FIN (ESTABLISHED -> FIN_WAIT1). The side that
    /// closes first keeps the TIME_WAIT.
    pub local_first: u32,
    /// Closes begun by the peer's FIN (ESTABLISHED -> CLOSE_WAIT).
    pub peer_first: u32,
    /// Connections ended by a reset or an abort before any FIN (ESTABLISHED -> CLOSE).
    pub reset: u32,
    /// The lives of the connections closed here first, from birth to our FIN: bucket `i`
    /// holds lives under 2^i ms, the last one the rest (`connection_churn` reads the median).
    pub lives: [u32; LIFE_BUCKETS],
    /// Who closed the last of those: the process that opens and drops them.
    pub closer: Option<super::facts::Task>,
}

/// Buckets of [`Flow::lives`]: 1 ms to 16 s, then the rest.
pub const LIFE_BUCKETS: usize = 15;

impl Flow {
    /// The upper bound of the bucket holding the median life of the connections closed here
    /// first, in ms (None when none was).
    pub fn median_life_ms(&self) -> Option<u64> {
        let n: u64 = self.lives.iter().map(|&c| u64::from(c)).sum();
        let mut seen = 0;
        for (i, &c) in self.lives.iter().enumerate() {
            seen += u64::from(c);
            if n > 0 && seen * 2 >= n {
                return Some(if i + 1 == LIFE_BUCKETS {
                    u64::MAX
                } else {
                    1 << i
                });
            }
        }
        None
    }
}

/// What [`Flows`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEvent {
    Opened,
    Closed,
    /// A connection left ESTABLISHED: who began its end.
    Ending(FirstClose),
}

/// Which side began a connection's end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstClose {
    Local,
    Peer,
    Reset,
}

impl FirstClose {
    /// From the transition that left ESTABLISHED (or a child's SYN_RECV, closed before its
    /// handshake was accepted); None for any other.
    pub fn of(old: TcpState, new: TcpState) -> Option<Self> {
        match (old, new) {
            (TcpState::Established | TcpState::SynRecv, TcpState::FinWait1) => Some(Self::Local),
            (TcpState::Established, TcpState::CloseWait) => Some(Self::Peer),
            (TcpState::Established, TcpState::Close) => Some(Self::Reset),
            _ => None,
        }
    }

    /// At a connection's end (CLOSE, or TIME_WAIT for the full socket), from the state it
    /// ends in: a FIN_WAIT or CLOSING socket sent the first FIN, a CLOSE_WAIT or LAST_ACK one
    /// got it, one still ESTABLISHED (or SYN_RECV) ended by a reset or an abort. None for the
    /// ends that close no connection (a failed connect, a listener) and for a TIME_WAIT
    /// mini-socket's own end (its connection's end was told when it entered TIME_WAIT).
    pub fn at_end(old: TcpState, new: TcpState) -> Option<Self> {
        if !matches!(new, TcpState::Close | TcpState::TimeWait) {
            return None;
        }
        match old {
            TcpState::FinWait1 | TcpState::FinWait2 | TcpState::Closing => Some(Self::Local),
            TcpState::CloseWait | TcpState::LastAck => Some(Self::Peer),
            TcpState::Established | TcpState::SynRecv => Some(Self::Reset),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Peer => "peer",
            Self::Reset => "reset",
        }
    }
}

/// A destination's [`Flow`] per second.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FlowRate {
    pub opened: f64,
    pub closed: f64,
    pub local_first: f64,
    pub peer_first: f64,
    pub reset: f64,
}

/// Connections opened (connect(), or a listener's new child) and closed per destination, in
/// fixed windows of [`FLOW_WINDOW_NS`]: a status page reads the last whole window as a rate
/// without counting anything itself. Two windows of at most [`MAX_DESTINATIONS`] each, the
/// rest summed apart, so churn to ever-new destinations stays bounded.
#[derive(Debug, Default)]
pub struct Flows {
    current: HashMap<Dest, Flow, PeerKeyHasher>,
    current_other: Flow,
    previous: HashMap<Dest, Flow, PeerKeyHasher>,
    previous_other: Flow,
    /// When `current` began (a multiple of the window).
    start_ns: u64,
}

impl Flows {
    /// Counts a connection to `dest` opened, closed or ending at `ts_ns`. O(1); once a window,
    /// a swap and a clear of the older map.
    pub fn count(&mut self, dest: Dest, ts_ns: u64, what: FlowEvent) {
        self.roll(ts_ns);
        let full = self.current.len() >= MAX_DESTINATIONS;
        let f = match self.current.get_mut(&dest) {
            Some(f) => f,
            None if !full => self.current.entry(dest).or_default(),
            None => &mut self.current_other,
        };
        let n = match what {
            FlowEvent::Opened => &mut f.opened,
            FlowEvent::Closed => &mut f.closed,
            FlowEvent::Ending(FirstClose::Local) => &mut f.local_first,
            FlowEvent::Ending(FirstClose::Peer) => &mut f.peer_first,
            FlowEvent::Ending(FirstClose::Reset) => &mut f.reset,
        };
        *n = n.saturating_add(1);
    }

    /// A connection to `dest` closed here first at `ts_ns` after `life_ns`, by `closer`.
    pub fn closed_here(
        &mut self,
        dest: Dest,
        ts_ns: u64,
        life_ns: u64,
        closer: Option<super::facts::Task>,
    ) {
        self.count(dest, ts_ns, FlowEvent::Ending(FirstClose::Local));
        let f = match self.current.get_mut(&dest) {
            Some(f) => f,
            None => &mut self.current_other,
        };
        let ms = life_ns / 1_000_000;
        // Bucket i: under 2^i ms.
        let i = (u64::BITS - ms.leading_zeros()) as usize;
        let n = &mut f.lives[i.min(LIFE_BUCKETS - 1)];
        *n = n.saturating_add(1);
        if closer.is_some() {
            f.closer = closer;
        }
    }

    /// The last whole window before `now_ns`: when it began, and its flows per destination.
    pub fn last_whole(&self, now_ns: u64) -> Option<(u64, &HashMap<Dest, Flow, PeerKeyHasher>)> {
        let start = now_ns - now_ns % FLOW_WINDOW_NS;
        self.last_window(now_ns)
            .map(|(m, _)| (start.saturating_sub(FLOW_WINDOW_NS), m))
    }

    fn roll(&mut self, now_ns: u64) {
        let start = now_ns - now_ns % FLOW_WINDOW_NS;
        if start <= self.start_ns {
            return;
        }
        if start == self.start_ns + FLOW_WINDOW_NS {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.previous_other = self.current_other;
        } else {
            // Whole windows passed without a connection: the last of them was empty.
            self.previous.clear();
            self.previous_other = Flow::default();
        }
        self.current.clear();
        self.current_other = Flow::default();
        self.start_ns = start;
    }

    /// The last whole window before `now_ns`: its flows per destination and the rest's.
    fn last_window(&self, now_ns: u64) -> Option<(&HashMap<Dest, Flow, PeerKeyHasher>, Flow)> {
        let start = now_ns - now_ns % FLOW_WINDOW_NS;
        if start == self.start_ns {
            Some((&self.previous, self.previous_other))
        } else if start == self.start_ns + FLOW_WINDOW_NS {
            Some((&self.current, self.current_other))
        } else {
            None
        }
    }

    /// Connections to `dest` opened, closed and ending per second over the last whole window
    /// before `now_ns` (0 for a destination past the cap, counted in the rest).
    pub fn rate(&self, dest: &Dest, now_ns: u64) -> FlowRate {
        let f = self
            .last_window(now_ns)
            .and_then(|(m, _)| m.get(dest).copied())
            .unwrap_or_default();
        let per_s = |n: u32| f64::from(n) * 1e9 / FLOW_WINDOW_NS as f64;
        FlowRate {
            opened: per_s(f.opened),
            closed: per_s(f.closed),
            local_first: per_s(f.local_first),
            peer_first: per_s(f.peer_first),
            reset: per_s(f.reset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(port: u16) -> Dest {
        Dest::of(
            &Tuple::new(
                "10.0.0.1".parse().expect("addr"),
                40000,
                "10.0.3.7".parse().expect("addr"),
                port,
            ),
            0,
            false,
        )
    }

    fn holder(comm: u32) -> Holder {
        Holder { cgroup: 7, comm }
    }

    #[test]
    fn names_read_as_operators_write_them() {
        assert_eq!(to(5432).addr(), "10.0.3.7:5432");
        assert_eq!(to(5432).direction(), "outbound");
        let t = Tuple::new(
            "fd00::1".parse().expect("addr"),
            8080,
            "fd00::2".parse().expect("addr"),
            40000,
        );
        assert_eq!(Dest::of(&t, 0, true).addr(), ":8080");
        assert_eq!(Dest::of(&t, 0, true).direction(), "inbound");
        assert_eq!(Dest::of(&t, 0, true).describe(), "inbound to :8080");
        assert_eq!(to(5432).describe(), "10.0.3.7:5432");
        assert_eq!(Dest::of(&t, 0, false).addr(), "[fd00::2]:40000");
    }

    #[test]
    fn counts_come_and_go_with_their_sockets() {
        let mut d = Destinations::default();
        for _ in 0..3 {
            d.account(to(5432), holder(1), TcpState::CloseWait, true);
        }
        d.account(to(5432), holder(2), TcpState::CloseWait, true);
        d.account(to(5432), holder(1), TcpState::Established, true);
        assert_eq!(d.count(&to(5432), TcpState::CloseWait), 4);
        assert_eq!(d.count(&to(5432), TcpState::Established), 0, "not counted");
        let top = d.top_holders(10);
        assert_eq!(top[0], (to(5432), holder(1), TcpState::CloseWait, 3));
        assert_eq!(top[1], (to(5432), holder(2), TcpState::CloseWait, 1));
        for _ in 0..3 {
            d.account(to(5432), holder(1), TcpState::CloseWait, false);
        }
        d.account(to(5432), holder(2), TcpState::CloseWait, false);
        assert!(d.is_empty(), "nothing left behind");
        assert_eq!(d.sum(), Counts::default());
    }

    #[test]
    fn a_scan_of_every_port_stays_within_the_cap() {
        let mut d = Destinations::default();
        for port in 0..=u16::MAX {
            d.account(to(port), holder(1), TcpState::SynSent, true);
        }
        assert_eq!(d.len(), MAX_DESTINATIONS);
        let i = index(TcpState::SynSent).expect("counted");
        assert_eq!(d.other()[i] as usize, 65_536 - MAX_DESTINATIONS);
        assert_eq!(d.sum()[i], 65_536);
        let (top, rest) = d.top(20);
        assert_eq!(top.len(), 20);
        assert_eq!(rest[i], 65_536 - 20);
        for port in 0..=u16::MAX {
            d.account(to(port), holder(1), TcpState::SynSent, false);
        }
        assert!(d.is_empty());
        assert_eq!(d.other(), &Counts::default(), "the overflow drains too");
    }

    #[test]
    fn a_freed_slot_taken_again_keeps_the_sum() {
        let mut d = Destinations::default();
        for port in 0..MAX_DESTINATIONS as u16 {
            d.account(to(port), holder(1), TcpState::CloseWait, true);
        }
        let late = to(60000);
        d.account(late, holder(1), TcpState::CloseWait, true);
        // A slot frees and the late destination takes it with a second socket.
        d.account(to(0), holder(1), TcpState::CloseWait, false);
        d.account(late, holder(1), TcpState::CloseWait, true);
        assert_eq!(d.count(&late, TcpState::CloseWait), 1);
        d.account(late, holder(1), TcpState::CloseWait, false);
        d.account(late, holder(1), TcpState::CloseWait, false);
        let i = index(TcpState::CloseWait).expect("counted");
        assert_eq!(d.sum()[i] as usize, MAX_DESTINATIONS - 1);
        assert_eq!(d.count(&late, TcpState::CloseWait), 0);
        assert_eq!(d.other()[i], 0, "neither bucket goes below zero");
    }

    #[test]
    fn holders_past_the_cap_share_one_slot() {
        let mut d = Destinations::default();
        for comm in 0..(MAX_HOLDERS as u32 + 5) {
            d.account(to(53), holder(comm), TcpState::TimeWait, true);
        }
        let slot = d.iter().next().map(|(_, s)| s.clone()).expect("one");
        assert_eq!(slot.holders.len(), MAX_HOLDERS + 1);
        assert!(
            slot.holders
                .iter()
                .any(|(h, c)| *h == Holder::OTHERS && c[6] == 5)
        );
        for comm in (0..(MAX_HOLDERS as u32 + 5)).rev() {
            d.account(to(53), holder(comm), TcpState::TimeWait, false);
        }
        assert!(d.is_empty());
    }

    #[test]
    fn top_k_keeps_the_heaviest_and_sums_the_rest() {
        let mut d = Destinations::default();
        for (port, n) in [(1, 5), (2, 40), (3, 3), (4, 1)] {
            for _ in 0..n {
                d.account(to(port), holder(1), TcpState::CloseWait, true);
            }
        }
        let (top, rest) = d.top(2);
        assert_eq!(
            top.iter()
                .map(|(d, c)| (d.addr(), c[1]))
                .collect::<Vec<_>>(),
            [("10.0.3.7:2".to_owned(), 40), ("10.0.3.7:1".to_owned(), 5)]
        );
        assert_eq!(rest[1], 4);
    }

    #[test]
    fn flows_are_rates_over_the_last_whole_window() {
        let w = FLOW_WINDOW_NS;
        let mut f = Flows::default();
        let oc = |r: FlowRate| (r.opened, r.closed);
        for i in 0..100 {
            f.count(to(80), w + i * 1_000_000, FlowEvent::Opened);
        }
        for i in 0..50 {
            f.count(to(80), w + i * 1_000_000, FlowEvent::Closed);
        }
        for (i, first) in [FirstClose::Local, FirstClose::Peer, FirstClose::Reset]
            .into_iter()
            .enumerate()
        {
            for _ in 0..=i * 10 {
                f.count(to(80), w + 7, FlowEvent::Ending(first));
            }
        }
        assert_eq!(
            oc(f.rate(&to(80), w + 5)),
            (0.0, 0.0),
            "the window is not whole yet"
        );
        let r = f.rate(&to(80), 2 * w + 5);
        assert_eq!(oc(r), (10.0, 5.0));
        assert_eq!((r.local_first, r.peer_first, r.reset), (0.1, 1.1, 2.1));
        f.count(to(443), 2 * w + 7, FlowEvent::Opened);
        assert_eq!(oc(f.rate(&to(80), 2 * w + 9)), (10.0, 5.0));
        assert_eq!(f.rate(&to(80), 3 * w), FlowRate::default(), "nothing since");
        f.count(to(443), 5 * w, FlowEvent::Opened);
        assert_eq!(
            f.rate(&to(443), 5 * w + 1),
            FlowRate::default(),
            "the windows between were empty"
        );
    }

    #[test]
    fn the_end_record_says_who_closed_first() {
        use TcpState::*;
        let end = |old, new| FirstClose::at_end(old, new).map(FirstClose::name);
        assert_eq!(end(FinWait2, TimeWait), Some("local"));
        assert_eq!(end(Closing, TimeWait), Some("local"));
        assert_eq!(end(FinWait1, Close), Some("local"));
        assert_eq!(end(LastAck, Close), Some("peer"));
        assert_eq!(end(CloseWait, Close), Some("peer"));
        assert_eq!(end(Established, Close), Some("reset"));
        assert_eq!(end(SynRecv, Close), Some("reset"));
        assert_eq!(
            end(SynSent, Close),
            None,
            "a failed connect closed no connection"
        );
        assert_eq!(end(Listen, Close), None);
        assert_eq!(end(TimeWait, Close), None, "told when it entered TIME_WAIT");
        assert_eq!(end(Established, FinWait1), None, "not an end");
    }

    #[test]
    fn who_began_the_end_is_told_by_the_state_left() {
        use TcpState::*;
        assert_eq!(
            FirstClose::of(Established, FinWait1),
            Some(FirstClose::Local)
        );
        assert_eq!(FirstClose::of(SynRecv, FinWait1), Some(FirstClose::Local));
        assert_eq!(
            FirstClose::of(Established, CloseWait),
            Some(FirstClose::Peer)
        );
        assert_eq!(FirstClose::of(Established, Close), Some(FirstClose::Reset));
        for (old, new) in [
            (SynSent, Close),
            (FinWait1, FinWait2),
            (CloseWait, LastAck),
            (FinWait1, Closing),
            (SynSent, Established),
        ] {
            assert_eq!(FirstClose::of(old, new), None, "{old:?} -> {new:?}");
        }
    }

    #[test]
    fn flows_to_ever_new_destinations_stay_within_the_cap() {
        let mut f = Flows::default();
        for port in 0..=u16::MAX {
            f.count(to(port), 1, FlowEvent::Opened);
        }
        assert_eq!(f.current.len(), MAX_DESTINATIONS);
        assert_eq!(f.current_other.opened as usize, 65_536 - MAX_DESTINATIONS);
    }
}
