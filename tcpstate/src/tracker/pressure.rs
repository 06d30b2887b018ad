//! `time_wait_pressure`: a client host runs out of ephemeral ports to one
//! destination when its TIME_WAIT mini-sockets to it hold most of
//! `net.ipv4.ip_local_port_range` (each holds its local port for 2MSL
//! unless `tcp_tw_reuse` lets a new connect take it over). Counted per
//! (namespace, local address, remote address, remote port), for mini-
//! sockets whose local port is in that namespace's ephemeral range (a
//! server's TIME_WAIT sockets hold its listening port, not ephemeral ones).

use std::collections::HashMap;

use super::{
    PeerKeyHasher,
    facts::{Anomaly, Fact, Kind, Owner, Pressure, Resolution},
};
use crate::{
    socket::{Family, Tuple},
    state::TcpState,
};

/// What the tracker needs to know about a network namespace's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetnsInfo {
    /// `net.ipv4.ip_local_port_range`, inclusive.
    pub ports: (u16, u16),
    /// `net.ipv4.tcp_tw_reuse`.
    pub tw_reuse: u8,
}

impl NetnsInfo {
    /// The kernel's defaults, until a namespace's own are read.
    pub const DEFAULT: NetnsInfo = NetnsInfo {
        ports: (32768, 60999),
        tw_reuse: 2,
    };

    pub fn range(&self) -> u32 {
        u32::from(self.ports.1.saturating_sub(self.ports.0)) + 1
    }
}

/// Destinations counted individually: the remote ends are chosen by local
/// processes, but a hostile one could invent many; past this, new ones are
/// not counted (and say so in `untracked`).
const MAX_DESTINATIONS: usize = 65_536;

/// The default: one destination holding half of the ephemeral port range in TIME_WAIT, from
/// one local address, is half way to `EADDRNOTAVAIL` at `connect()`.
pub const DEFAULT_FRACTION: f64 = 0.5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Dest {
    netns: u32,
    family: Family,
    saddr: [u8; 16],
    daddr: [u8; 16],
    dport: u16,
}

#[derive(Clone, Copy, Debug, Default)]
struct Count {
    n: u64,
    /// Raised and not yet resolved: since when.
    raised: Option<u64>,
}

#[derive(Debug)]
pub struct PressureRule {
    fraction: Option<f64>,
    info: HashMap<u32, NetnsInfo>,
    default: NetnsInfo,
    /// Looked up for every TIME_WAIT that ends; peers choose half of each destination.
    counts: HashMap<Dest, Count, PeerKeyHasher>,
    untracked: u64,
    raised_total: u64,
}

impl PressureRule {
    pub fn new(fraction: Option<f64>) -> Self {
        Self {
            fraction,
            info: HashMap::new(),
            default: NetnsInfo::DEFAULT,
            counts: HashMap::default(),
            untracked: 0,
            raised_total: 0,
        }
    }

    pub fn set_default(&mut self, info: NetnsInfo) {
        self.default = info;
    }

    pub fn set_info(&mut self, netns: u32, info: NetnsInfo) {
        self.info.insert(netns, info);
    }

    pub fn knows(&self, netns: u32) -> bool {
        self.info.contains_key(&netns)
    }

    /// The settings read of `netns`, if any.
    pub fn known(&self, netns: u32) -> Option<NetnsInfo> {
        self.info.get(&netns).copied()
    }

    /// Namespaces whose own settings were read.
    pub fn namespaces(&self) -> impl Iterator<Item = u32> + '_ {
        self.info.keys().copied()
    }

    /// Drops a destroyed namespace's settings: the kernel reuses its inode number for the
    /// next namespace, which has settings of its own.
    pub fn forget(&mut self, netns: u32) {
        self.info.remove(&netns);
    }

    fn info(&self, netns: u32) -> NetnsInfo {
        self.info.get(&netns).copied().unwrap_or(self.default)
    }

    fn dest(netns: u32, t: &Tuple) -> Dest {
        Dest {
            netns,
            family: t.family,
            saddr: t.saddr,
            daddr: t.daddr,
            dport: t.dport,
        }
    }

    /// The count above which a destination is under pressure.
    fn limit(&self, info: &NetnsInfo) -> Option<f64> {
        Some(self.fraction? * f64::from(info.range()))
    }

    pub fn add(&mut self, netns: u32, t: &Tuple, ts_ns: u64, out: &mut Vec<Fact>) {
        let info = self.info(netns);
        if self.fraction.is_none() || t.sport < info.ports.0 || t.sport > info.ports.1 {
            return;
        }
        let dest = Self::dest(netns, t);
        if self.counts.len() >= MAX_DESTINATIONS && !self.counts.contains_key(&dest) {
            self.untracked += 1;
            return;
        }
        let limit = self.limit(&info);
        let c = self.counts.entry(dest).or_default();
        c.n += 1;
        if c.raised.is_none() && limit.is_some_and(|l| c.n as f64 > l) {
            c.raised = Some(ts_ns);
            let c = *c;
            self.raised_total += 1;
            out.push(Fact::Raised(anomaly(&dest, &c, &info, ts_ns)));
        }
    }

    pub fn remove(&mut self, netns: u32, t: &Tuple, ts_ns: u64, out: &mut Vec<Fact>) {
        if self.counts.is_empty() {
            return;
        }
        let info = self.info(netns);
        let dest = Self::dest(netns, t);
        let limit = self.limit(&info);
        let Some(c) = self.counts.get_mut(&dest) else {
            return;
        };
        c.n = c.n.saturating_sub(1);
        if c.raised.is_some() && limit.is_none_or(|l| (c.n as f64) < l) {
            let mut a = anomaly(&dest, c, &info, ts_ns);
            a.since_ns = c.raised.unwrap_or(ts_ns);
            c.raised = None;
            out.push(Fact::Resolved(a, Resolution::Relieved));
        }
        if c.n == 0 {
            self.counts.remove(&dest);
        }
    }

    /// Counts a namespace's destinations again from its TIME_WAIT
    /// mini-sockets (its settings changed): raises and resolves as the new
    /// counts say. Taken as they are met: a list of a million took 40 MB.
    pub fn recount(
        &mut self,
        netns: u32,
        tuples: impl IntoIterator<Item = Tuple>,
        now_ns: u64,
        out: &mut Vec<Fact>,
    ) {
        let raised: Vec<(Dest, u64)> = self
            .counts
            .iter()
            .filter(|(d, _)| d.netns == netns)
            .filter_map(|(d, c)| Some((*d, c.raised?)))
            .collect();
        self.counts.retain(|d, _| d.netns != netns);
        let info = self.info(netns);
        let limit = self.limit(&info);
        for t in tuples {
            if t.sport < info.ports.0 || t.sport > info.ports.1 {
                continue;
            }
            let dest = Self::dest(netns, &t);
            if self.counts.len() >= MAX_DESTINATIONS && !self.counts.contains_key(&dest) {
                self.untracked += 1;
                continue;
            }
            self.counts.entry(dest).or_default().n += 1;
        }
        for (dest, since) in &raised {
            let c = self.counts.entry(*dest).or_default();
            if limit.is_some_and(|l| (c.n as f64) >= l) {
                c.raised = Some(*since);
            } else {
                let mut a = anomaly(dest, c, &info, now_ns);
                a.since_ns = *since;
                out.push(Fact::Resolved(a, Resolution::Relieved));
            }
        }
        for (dest, c) in self.counts.iter_mut().filter(|(d, _)| d.netns == netns) {
            if c.raised.is_none() && limit.is_some_and(|l| c.n as f64 > l) {
                c.raised = Some(now_ns);
                self.raised_total += 1;
                out.push(Fact::Raised(anomaly(dest, c, &info, now_ns)));
            }
        }
        self.counts.retain(|_, c| c.n > 0 || c.raised.is_some());
    }

    pub fn raised_total(&self) -> u64 {
        self.raised_total
    }

    pub fn open(&self) -> u64 {
        self.counts.values().filter(|c| c.raised.is_some()).count() as u64
    }

    /// The fullest destination's share of its port range (0 when none).
    pub fn worst(&self) -> f64 {
        self.counts
            .iter()
            .map(|(d, c)| c.n as f64 / f64::from(self.info(d.netns).range()))
            .fold(0.0, f64::max)
    }

    pub fn open_anomalies(&self, now_ns: u64) -> Vec<Anomaly> {
        self.counts
            .iter()
            .filter_map(|(d, c)| {
                let mut a = anomaly(d, c, &self.info(d.netns), now_ns);
                a.since_ns = c.raised?;
                Some(a)
            })
            .collect()
    }
}

fn anomaly(d: &Dest, c: &Count, info: &NetnsInfo, ts_ns: u64) -> Anomaly {
    Anomaly {
        kind: Kind::TimeWaitPressure,
        state: TcpState::TimeWait,
        ts_ns,
        since_ns: c.raised.unwrap_or(ts_ns),
        lower_bound: false,
        sk: 0,
        netns: d.netns,
        cgroup: 0,
        tuple: Tuple {
            family: d.family,
            saddr: d.saddr,
            daddr: d.daddr,
            sport: 0,
            dport: d.dport,
        },
        owner: Owner::Unknown,
        pressure: Some(Pressure {
            count: c.n,
            range: info.range(),
            tw_reuse: info.tw_reuse,
        }),
        accept_queue: None,
        vitals: None,
        orphans: None,
        holder_cgroup: None,
        other_holders: Vec::new(),
        destination: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(sport: u16) -> Tuple {
        let lo = "10.0.0.1".parse().expect("addr");
        let srv = "10.0.0.2".parse().expect("addr");
        Tuple::new(lo, sport, srv, 80)
    }

    #[test]
    fn raises_past_the_fraction_and_resolves_below_it() {
        let mut p = PressureRule::new(Some(0.5));
        p.set_info(
            7,
            NetnsInfo {
                ports: (40000, 40009),
                tw_reuse: 0,
            },
        );
        let mut out = Vec::new();
        for port in 40000..40005 {
            p.add(7, &tuple(port), 1, &mut out);
        }
        assert!(out.is_empty(), "5 of 10 is not more than half");
        p.add(7, &tuple(8080), 1, &mut out);
        assert!(out.is_empty(), "ports outside the range do not count");
        p.add(7, &tuple(40005), 2, &mut out);
        let [Fact::Raised(a)] = &out[..] else {
            panic!("{out:?}");
        };
        assert_eq!(a.kind, Kind::TimeWaitPressure);
        let pr = a.pressure.expect("pressure");
        assert_eq!((pr.count, pr.range, pr.tw_reuse), (6, 10, 0));
        assert_eq!(p.open(), 1);
        assert!((p.worst() - 0.6).abs() < 1e-9);
        out.clear();
        p.remove(7, &tuple(40005), 3, &mut out);
        assert!(out.is_empty(), "5 is not below half");
        p.remove(7, &tuple(40004), 4, &mut out);
        let [Fact::Resolved(a, Resolution::Relieved)] = &out[..] else {
            panic!("{out:?}");
        };
        assert_eq!(a.since_ns, 2);
        assert_eq!(p.open(), 0);
    }

    #[test]
    fn off_counts_nothing() {
        let mut p = PressureRule::new(None);
        let mut out = Vec::new();
        for port in 32768..33768 {
            p.add(7, &tuple(port), 1, &mut out);
        }
        assert!(out.is_empty());
        assert_eq!(p.worst(), 0.0);
    }
}
