//! `time_wait_pressure`: a client host runs out of ephemeral ports to one
//! destination when its TIME_WAIT mini-sockets to it hold most of
//! `net.ipv4.ip_local_port_range` (each holds its local port for 2MSL
//! unless `tcp_tw_reuse` lets a new connect take it over). Counted per
//! (namespace, local address, remote address, remote port), for mini-
//! sockets whose local port is in that namespace's ephemeral range (a
//! server's TIME_WAIT sockets hold its listening port, not ephemeral ones).

use std::collections::HashMap;

use super::{HostRule, Rule, RuleDetail, RuleId};
use crate::record::AnomalyRecord;
use crate::tracker::{
    PeerKeyHasher,
    facts::{Anomaly, Detail, Fact, Kind, Owner, Pressure, Resolution, Task},
    table::{Comms, Table},
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
    /// Connects to the destination refused a local port (EADDRNOTAVAIL), and who made the
    /// last: the pressure realised.
    refused: u32,
    refused_by: Option<Task>,
}

#[derive(Debug)]
pub struct PressureRule {
    fraction: Option<f64>,
    info: HashMap<u32, NetnsInfo>,
    default: NetnsInfo,
    /// Looked up for every TIME_WAIT that ends; peers choose half of each destination.
    counts: HashMap<Dest, Count, PeerKeyHasher>,
    /// Binds to port 0 refused (EADDRINUSE: no port of the range free) per namespace, and who
    /// made the last: every destination's pressure there realised at once.
    binds_refused: HashMap<u32, (u32, Task)>,
    untracked: u64,
    raised_total: u64,
}

impl PressureRule {
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
        self.binds_refused.remove(&netns);
    }

    /// A bind to port 0 in `netns` found no free port: each pressure record there names it.
    pub fn bind_refused(&mut self, netns: u32, by: Task) {
        let e = self.binds_refused.entry(netns).or_insert((0, by));
        *e = (e.0.saturating_add(1), by);
    }

    /// The anomaly of destination `d`, with what was refused in its namespace.
    fn anomaly_of(&self, d: &Dest, c: &Count, ts_ns: u64) -> Anomaly {
        anomaly(d, c, &self.info(d.netns), self.binds_refused.get(&d.netns), ts_ns)
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
            out.push(Fact::Raised(anomaly(
                &dest,
                &c,
                &info,
                self.binds_refused.get(&netns),
                ts_ns,
            )));
        }
    }

    /// A connect from `t`'s local address to its destination found no free local port: the
    /// destination's record names who it failed for. Only destinations already counted.
    pub fn refused_port(&mut self, netns: u32, t: &Tuple, by: Option<Task>) {
        if let Some(c) = self.counts.get_mut(&Self::dest(netns, t)) {
            c.refused = c.refused.saturating_add(1);
            c.refused_by = by.or(c.refused_by);
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
            let mut a = anomaly(&dest, c, &info, self.binds_refused.get(&netns), ts_ns);
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
                let mut a = anomaly(dest, c, &info, self.binds_refused.get(&netns), now_ns);
                a.since_ns = *since;
                out.push(Fact::Resolved(a, Resolution::Relieved));
            }
        }
        for (dest, c) in self.counts.iter_mut().filter(|(d, _)| d.netns == netns) {
            if c.raised.is_none() && limit.is_some_and(|l| c.n as f64 > l) {
                c.raised = Some(now_ns);
                self.raised_total += 1;
                out.push(Fact::Raised(anomaly(
                    dest,
                    c,
                    &info,
                    self.binds_refused.get(&netns),
                    now_ns,
                )));
            }
        }
        self.counts.retain(|_, c| c.n > 0 || c.raised.is_some());
    }

    /// The fullest destination's share of its port range (0 when none).
    pub fn worst(&self) -> f64 {
        self.counts
            .iter()
            .map(|(d, c)| c.n as f64 / f64::from(self.info(d.netns).range()))
            .fold(0.0, f64::max)
    }
}

impl HostRule for PressureRule {
    const NAME: &'static str = "time_wait_pressure";
    /// The share of the ephemeral port range one destination may hold.
    type Setting = f64;
    type Detail = Pressure;
    const DEFAULT: Option<f64> = Some(DEFAULT_FRACTION);
    /// A destination: no process holds its TIME_WAIT.
    const CHECKS_OWNER: bool = false;

    fn parse(value: &str) -> Result<Option<f64>, String> {
        super::thresholds::fraction(
            value,
            "time_wait_pressure wants a fraction of the port range",
        )
    }

    fn new(fraction: Option<f64>) -> Self {
        Self {
            fraction,
            info: HashMap::new(),
            default: NetnsInfo::DEFAULT,
            counts: HashMap::default(),
            binds_refused: HashMap::new(),
            untracked: 0,
            raised_total: 0,
        }
    }

    fn record(p: &Pressure, rec: &mut AnomalyRecord) {
        rec.count = Some(p.count);
        rec.port_range = Some(p.range);
        rec.tw_reuse = Some(p.tw_reuse);
        rec.refused_connects = Some(p.refused_connects).filter(|&n| n > 0);
        rec.refused_binds = Some(p.refused_binds).filter(|&n| n > 0);
    }
}

impl Rule for PressureRule {
    fn kind(&self) -> Kind {
        Kind::Rule(RuleId::TimeWaitPressure)
    }

    fn time_wait_added(
        &mut self,
        netns: u32,
        tuple: &Tuple,
        active: bool,
        now_ns: u64,
        out: &mut Vec<Fact>,
    ) {
        // Only a socket this host closed first holds one of its ephemeral ports.
        if active {
            self.add(netns, tuple, now_ns, out);
        }
    }

    fn time_wait_removed(&mut self, netns: u32, tuple: &Tuple, ts_ns: u64, out: &mut Vec<Fact>) {
        self.remove(netns, tuple, ts_ns, out);
    }

    fn refused_port(&mut self, netns: u32, tuple: &Tuple, by: Option<Task>) {
        PressureRule::refused_port(self, netns, tuple, by);
    }

    fn bind_refused(&mut self, netns: u32, by: Task) {
        PressureRule::bind_refused(self, netns, by);
    }

    fn enabled(&self) -> bool {
        self.fraction.is_some()
    }

    fn raised_total(&self) -> u64 {
        self.raised_total
    }

    fn open(&self) -> u64 {
        self.counts.values().filter(|c| c.raised.is_some()).count() as u64
    }

    fn open_anomalies(&self, now_ns: u64, _: &Table, _: &Comms) -> Vec<Anomaly> {
        self.counts
            .iter()
            .filter_map(|(d, c)| {
                let mut a = self.anomaly_of(d, c, now_ns);
                a.since_ns = c.raised?;
                Some(a)
            })
            .collect()
    }
}

fn anomaly(
    d: &Dest,
    c: &Count,
    info: &NetnsInfo,
    binds: Option<&(u32, Task)>,
    ts_ns: u64,
) -> Anomaly {
    Anomaly {
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
        // Nobody holds a TIME_WAIT: the process refused a port to there, or any port in the
        // namespace, when one was.
        owner: c
            .refused_by
            .or(binds.map(|b| b.1))
            .map_or(Owner::Unknown, Owner::Attributed),
        vitals: None,
        holder_cgroup: None,
        other_holders: Vec::new(),
        drops: None,
        detail: Detail::Rule(RuleDetail::TimeWaitPressure(Pressure {
            count: c.n,
            range: info.range(),
            tw_reuse: info.tw_reuse,
            refused_connects: c.refused,
            refused_binds: binds.map_or(0, |b| b.0),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::Kind;

    fn tuple(sport: u16) -> Tuple {
        let lo = "10.0.0.1".parse().expect("addr");
        let srv = "10.0.0.2".parse().expect("addr");
        Tuple::new(lo, sport, srv, 80)
    }

    /// Namespace 7's four-port range full of TIME_WAIT to one destination: its pressure open.
    fn four_of_four() -> PressureRule {
        let mut p = PressureRule::new(Some(0.5));
        p.set_info(
            7,
            NetnsInfo {
                ports: (40000, 40003),
                tw_reuse: 0,
            },
        );
        let mut out = Vec::new();
        for port in 40000..40004 {
            p.add(7, &tuple(port), 1, &mut out);
        }
        p
    }

    /// The one open pressure anomaly at `now_ns`, and its detail.
    fn the_open_one(p: &PressureRule, now_ns: u64) -> (Anomaly, Pressure) {
        let [a] = &p.open_anomalies(now_ns, &Table::new(1), &Comms::default())[..] else {
            panic!("one open")
        };
        let Detail::Rule(RuleDetail::TimeWaitPressure(pr)) = a.detail else {
            panic!("{a:?}")
        };
        (a.clone(), pr)
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
        assert_eq!(a.kind(), Kind::Rule(RuleId::TimeWaitPressure));
        let Detail::Rule(RuleDetail::TimeWaitPressure(pr)) = a.detail else {
            panic!("{a:?}")
        };
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
    fn a_connect_refused_a_port_is_named_by_its_destination() {
        let mut p = four_of_four();
        let who = Task {
            pid: 42,
            comm: crate::socket::Comm::new("curl"),
        };
        // Refused to the counted destination (port 0: none was found), and to another one.
        p.refused_port(7, &tuple(0), Some(who));
        p.refused_port(7, &tuple(0), None);
        let other = Tuple::new(
            "10.0.0.1".parse().expect("addr"),
            0,
            "10.0.0.3".parse().expect("addr"),
            80,
        );
        p.refused_port(7, &other, Some(who));
        let (a, pr) = the_open_one(&p, 5);
        assert_eq!(pr.refused_connects, 2);
        assert_eq!(a.owner, Owner::Attributed(who));
    }

    /// A bind to port 0 refused in the namespace (no port at all) is counted on every
    /// pressure record there, and names the binder when no connect was refused; another
    /// namespace's, and a namespace forgotten, count nothing.
    #[test]
    fn a_bind_refused_any_port_is_named_by_the_namespaces_pressure() {
        let mut p = four_of_four();
        let who = Task {
            pid: 43,
            comm: crate::socket::Comm::new("client"),
        };
        p.bind_refused(7, who);
        p.bind_refused(7, who);
        p.bind_refused(8, who);
        let (a, pr) = the_open_one(&p, 5);
        assert_eq!((pr.refused_binds, pr.refused_connects), (2, 0));
        assert_eq!(a.owner, Owner::Attributed(who));
        p.forget(7);
        let (_, pr) = the_open_one(&p, 6);
        assert_eq!(pr.refused_binds, 0, "the namespace's count went with it");
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
