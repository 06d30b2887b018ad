//! What the outputs read from the tracker: counts and gauges, the open anomalies, the top
//! owners, the sockets in a state. Nothing here changes the tables.

use super::{
    Anomaly, Config, Kind, Task, Tracker,
    orphans::{HostTcp, closing_by_owner},
    stats::Stats,
    table::flag,
};
use crate::{
    socket::{Comm, Tuple},
    state::TcpState,
};

impl Tracker {
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Full sockets and FIN_WAIT2 mini-sockets tracked.
    pub fn tracked(&self) -> usize {
        self.table.len()
    }

    pub fn timewait(&self) -> usize {
        self.timewait.len()
    }

    /// Sockets refused at birth (table full), and TIME_WAIT mini-sockets
    /// refused (timewait table full).
    pub fn refused(&self) -> u64 {
        self.refused
    }

    pub fn timewait_refused(&self) -> u64 {
        self.timewait.refused()
    }

    pub fn capacity(&self) -> usize {
        self.table.capacity()
    }

    /// Heap bytes of the tables and the deadline heap.
    pub fn bytes(&self) -> usize {
        self.table.bytes() + self.timewait.bytes() + self.deadlines.bytes()
    }

    pub fn timewait_bytes(&self) -> usize {
        self.timewait.bytes()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Sockets in `st` now, as `ss -tan` counts them.
    pub fn sockets(&self, st: TcpState) -> u64 {
        match st {
            TcpState::TimeWait => self.timewait.len() as u64,
            TcpState::SynRecv => self.table.sockets(st) + self.requests(),
            st => self.table.sockets(st),
        }
    }

    pub fn anomalies_open(&self, st: TcpState) -> u64 {
        self.table.anomalies_open(st)
    }

    /// Every anomaly kind this configuration can raise, with how many were raised since start
    /// and how many are open: the one list metrics, the summary and status count from.
    pub fn anomaly_counts(&self) -> Vec<(Kind, u64, u64)> {
        let cfg = self.config();
        let mut v: Vec<(Kind, u64, u64)> = cfg
            .thresholds
            .iter()
            .map(|(st, _)| {
                let raised = self.stats.anomalies_raised[st as usize];
                (Kind::Lingering(st), raised, self.table.anomalies_open(st))
            })
            .collect();
        if cfg.pressure.is_some() {
            let p = &self.pressure;
            v.push((Kind::TimeWaitPressure, p.raised_total(), p.open()));
        }
        if cfg.accept_queue_full.is_some() {
            let b = &self.backlog;
            v.push((Kind::AcceptQueueFull, b.raised_total(), b.open()));
        }
        if cfg.orphan_pressure.is_some() {
            let o = &self.orphan_rule;
            v.push((Kind::OrphanPressure, o.raised_total(), o.open()));
        }
        v
    }

    pub fn pressure_open(&self) -> u64 {
        self.pressure.open()
    }

    pub fn pressure_raised(&self) -> u64 {
        self.pressure.raised_total()
    }

    /// The sockets in `st`: (netns, tuple, since, whether `since` is a lower bound).
    pub fn sockets_in(&self, st: TcpState) -> Vec<(u32, Tuple, u64, bool)> {
        if st == TcpState::TimeWait {
            return self
                .timewait
                .iter()
                .map(|s| (s.netns, s.tuple, s.since_ns, s.estimated))
                .collect();
        }
        self.table
            .iter()
            .filter(|(_, e)| e.state == st)
            .map(|(_, e)| (e.netns, e.tuple, e.since_ns, e.has(flag::SEEDED)))
            .collect()
    }

    pub fn host_tcp(&self) -> HostTcp {
        self.orphan_rule.host()
    }

    pub fn orphans_open(&self) -> u64 {
        self.orphan_rule.open()
    }

    pub fn orphans_raised(&self) -> u64 {
        self.orphan_rule.raised_total()
    }

    pub fn backlog_open(&self) -> u64 {
        self.backlog.open()
    }

    pub fn backlog_raised(&self) -> u64 {
        self.backlog.raised_total()
    }

    /// The worst destination's share of its ephemeral port range.
    pub fn pressure_worst(&self) -> f64 {
        self.pressure.worst()
    }

    pub fn comm(&self, id: u32) -> Comm {
        self.comms.get(id)
    }

    /// The namespace remembered for a tracked socket (0 = unknown).
    pub fn netns_of(&self, sk: u64) -> u32 {
        self.table.get(sk).map_or(0, |e| e.netns)
    }

    /// Open anomalies, oldest first, as of `now_ns` (the status page).
    pub fn open_anomalies(&self, now_ns: u64) -> Vec<Anomaly> {
        let mut v: Vec<Anomaly> = self
            .table
            .iter()
            .filter(|(_, e)| e.has(flag::ANOMALY_OPEN))
            .map(|(key, e)| self.anomaly(key, e, now_ns))
            .collect();
        v.extend(self.pressure.open_anomalies(now_ns));
        v.extend(self.backlog.open_anomalies(now_ns));
        v.extend(
            self.orphan_rule
                .open_anomaly(now_ns, || closing_by_owner(&self.table, &self.comms)),
        );
        v.sort_by_key(|a| a.since_ns);
        v
    }

    /// Closing sockets and open anomalies per cgroup id.
    pub fn by_cgroup(&self) -> impl Iterator<Item = (u64, &super::cgroups::Counts)> {
        self.table.by_cgroup().iter()
    }

    /// The cgroup remembered for a tracked socket (0 = unknown).
    pub fn cgroup_of(&self, sk: u64) -> u64 {
        self.table.get(sk).map_or(0, |e| e.cgroup)
    }

    /// Sockets per destination and holder.
    pub fn destinations(&self) -> &super::destinations::Destinations {
        self.table.destinations()
    }

    /// Connections to `dest` opened, closed and ending (by who began it) per second, over
    /// the last whole window before `now_ns`.
    pub fn flow_rate(
        &self,
        dest: &super::destinations::Dest,
        now_ns: u64,
    ) -> super::destinations::FlowRate {
        self.flows.rate(dest, now_ns)
    }

    /// Top owners of lingering sockets: (task, state, count).
    pub fn top_owners(&self, n: usize) -> Vec<(Task, TcpState, u64)> {
        self.table
            .leaks()
            .top(n)
            .into_iter()
            .map(|(o, st, c)| (self.task(o), st, c))
            .collect()
    }
}
