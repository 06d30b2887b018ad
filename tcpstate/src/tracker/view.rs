//! What the outputs read from the tracker: counts and gauges, the open anomalies, the top
//! owners, the sockets in a state. Nothing here changes the tables.

use super::{
    Anomaly, Config, Kind, Task, Tracker,
    rules::{Rule as _, orphans::HostTcp},
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
        for rule in self.rules.each().into_iter().filter(|r| r.enabled()) {
            v.push((rule.kind(), rule.raised_total(), rule.open()));
        }
        v
    }

    pub fn pressure_open(&self) -> u64 {
        self.rules.pressure.open()
    }

    pub fn pressure_raised(&self) -> u64 {
        self.rules.pressure.raised_total()
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
        self.rules.orphans.host()
    }

    pub fn orphans_open(&self) -> u64 {
        self.rules.orphans.open()
    }

    pub fn orphans_raised(&self) -> u64 {
        self.rules.orphans.raised_total()
    }

    pub fn backlog_open(&self) -> u64 {
        self.rules.backlog.open()
    }

    pub fn backlog_raised(&self) -> u64 {
        self.rules.backlog.raised_total()
    }

    /// The worst destination's share of its ephemeral port range.
    pub fn pressure_worst(&self) -> f64 {
        self.rules.pressure.worst()
    }

    pub fn comm(&self, id: u32) -> Comm {
        self.comms.get(id)
    }

    /// The namespace remembered for a tracked socket (0 = unknown).
    pub fn netns_of(&self, sk: u64) -> u32 {
        self.table.get(sk).map_or(0, |e| e.netns)
    }

    /// The namespace of the socket an event that does not carry one is about: the table's,
    /// or, for a socket of the start-up snapshot not yet met by its address, the snapshot's
    /// by the event's tuple when that is one namespace's. A `--netns` filter that took such
    /// an event for another namespace's would drop the close of every socket that predates
    /// the daemon, and its anomaly would stay open.
    pub fn netns_of_event(&self, sk: u64, tuple: &Tuple) -> u32 {
        match self.netns_of(sk) {
            0 => self.of_snapshot(tuple, |e| u64::from(e.netns)) as u32,
            n => n,
        }
    }

    /// The cgroup of the socket an event that does not carry one is about, as
    /// [`netns_of_event`](Self::netns_of_event) finds its namespace.
    pub fn cgroup_of_event(&self, sk: u64, tuple: &Tuple) -> u64 {
        match self.cgroup_of(sk) {
            0 => self.of_snapshot(tuple, |e| e.cgroup),
            id => id,
        }
    }

    /// `what` of the snapshot sockets with this tuple not yet met by address, when they all
    /// agree (the same tuple may be two containers' sockets); else 0.
    fn of_snapshot(&self, tuple: &Tuple, what: impl Fn(&super::table::Entry) -> u64) -> u64 {
        let Some(keys) = self.seeded.get(tuple) else {
            return 0;
        };
        let mut found = keys.iter().filter_map(|&k| self.table.get(k)).map(what);
        match found.next() {
            Some(v) if found.all(|w| w == v) => v,
            _ => 0,
        }
    }

    /// Open anomalies, oldest first, as of `now_ns` (the status page).
    pub fn open_anomalies(&self, now_ns: u64) -> Vec<Anomaly> {
        let mut v: Vec<Anomaly> = self
            .table
            .iter()
            .filter(|(_, e)| e.has(flag::ANOMALY_OPEN))
            .map(|(key, e)| self.anomaly(key, e, now_ns))
            .collect();
        for rule in self.rules.each() {
            v.extend(rule.open_anomalies(now_ns, &self.table, &self.comms));
        }
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
