//! The live-socket table: one compact entry per kernel socket, bounded.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{
    decode::{Comm, Family},
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
}

/// 72 bytes: addresses are raw 16-byte arrays (IPv4 in the first 4) and
/// the comm is an index into a shared interner, because at 10^6 sockets
/// every byte here is a megabyte.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub since_ns: u64,
    pub born_ns: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub netns: u32,
    pub owner_pid: u32,
    /// Interned comm; `NO_OWNER` when unknown.
    pub owner_comm: u32,
    pub generation: u32,
    pub state: TcpState,
    pub v6: bool,
    pub flags: u8,
}

pub const NO_OWNER: u32 = u32::MAX;

const _: () = assert!(size_of::<Entry>() == 72);

impl Entry {
    pub fn owner(&self) -> Option<OwnerRef> {
        (self.owner_comm != NO_OWNER).then_some(OwnerRef {
            pid: self.owner_pid,
            comm: self.owner_comm,
        })
    }

    pub fn set_owner(&mut self, o: Option<OwnerRef>) {
        match o {
            Some(o) => {
                self.owner_pid = o.pid;
                self.owner_comm = o.comm;
            }
            None => {
                self.owner_pid = 0;
                self.owner_comm = NO_OWNER;
            }
        }
    }

    pub fn family(&self) -> Family {
        if self.v6 { Family::V6 } else { Family::V4 }
    }

    pub fn saddr(&self) -> IpAddr {
        to_ip(self.v6, &self.saddr)
    }

    pub fn daddr(&self) -> IpAddr {
        to_ip(self.v6, &self.daddr)
    }

    pub fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }

    pub fn tuple(&self) -> Tuple {
        Tuple {
            netns: self.netns,
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
        }
    }
}

pub fn to_ip(v6: bool, b: &[u8; 16]) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(*b))
    } else {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    }
}

pub fn from_ip(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// A socket's identity as sock_diag sees it: what seeding and reconciling
/// match on, since sock_diag does not expose kernel socket addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub netns: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
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

/// The table itself. `capacity` is a hard cap: inserts past it are refused
/// and counted, never allowed to grow memory.
#[derive(Debug)]
pub struct Table {
    /// FxHash: the keys are kernel addresses, which no remote peer chooses,
    /// and SipHash showed in the profile. Maps keyed by network-chosen
    /// values keep std's DoS-resistant hasher.
    pub map: rustc_hash::FxHashMap<u64, Entry>,
    pub capacity: usize,
    pub refused: u64,
}

impl Table {
    pub fn new(capacity: usize) -> Self {
        Self {
            map: rustc_hash::FxHashMap::default(),
            capacity,
            refused: 0,
        }
    }

    /// Inserts unless full; returns false (and counts) when refused.
    pub fn insert(&mut self, key: u64, e: Entry) -> bool {
        if self.map.len() >= self.capacity && !self.map.contains_key(&key) {
            self.refused += 1;
            return false;
        }
        self.map.insert(key, e);
        true
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Heap bytes held by the table (hashbrown: buckets of key + value plus
    /// one control byte each).
    pub fn bytes(&self) -> usize {
        self.map.capacity() * (size_of::<(u64, Entry)>() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_refuses_past_capacity() {
        let mut t = Table::new(2);
        let e = Entry {
            since_ns: 0,
            born_ns: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            sport: 0,
            dport: 0,
            netns: 0,
            owner_pid: 0,
            owner_comm: NO_OWNER,
            generation: 0,
            state: TcpState::Established,
            v6: false,
            flags: 0,
        };
        assert!(t.insert(1, e));
        assert!(t.insert(2, e));
        assert!(!t.insert(3, e));
        assert!(t.insert(2, e), "updating an existing key is not growth");
        assert_eq!((t.len(), t.refused), (2, 1));
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

    #[test]
    fn addresses_round_trip() {
        for a in ["10.1.2.3", "::1", "fe80::1"] {
            let ip: IpAddr = a.parse().expect("addr");
            assert_eq!(to_ip(ip.is_ipv6(), &from_ip(ip)), ip);
        }
    }
}
