//! Every line tcpstate writes, as one serde type: `--format json`, the log
//! file and `tcpstate tail` all share it, so the JSON contract lives here.
//! Fields are Copy types with custom serde so serialising a transition
//! allocates nothing.

use std::{net::IpAddr, sync::Arc, time::SystemTime};

use serde::{Deserialize, Serialize};

use crate::{
    clock::WallClock,
    socket::{Comm, Family},
    state::TcpState,
    tracker::{Anomaly, Detail, Fact, Kind, Leak, Moved, Owner as Blame, Resolution},
    workload::Workload,
};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Started(Started),
    Transition(TransitionRecord),
    Anomaly(AnomalyRecord),
    AnomalyResolved(AnomalyRecord),
    LeakSuspected(LeakRecord),
    Suppressed(Suppressed),
    Stopped(Stopped),
    Killed(KilledRecord),
    Reset(ResetRecord),
    BindRefused(BindRefusedRecord),
}

/// Written by `tcpstate kill` for each socket it destroyed: which, and who asked.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct KilledRecord {
    #[serde(with = "ts")]
    pub ts: SystemTime,
    #[serde(with = "state")]
    pub state: TcpState,
    #[serde(with = "family")]
    pub family: Family,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    pub netns: u32,
    /// How long it had been in `state`, from the daemon (null: not asked or not known).
    pub age_ms: Option<f64>,
    /// The process holding it, if any.
    pub pid: Option<u32>,
    #[serde(with = "opt_comm")]
    pub comm: Option<Comm>,
    pub by: Actor,
}

/// Who ran `tcpstate kill`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    pub uid: u32,
    /// The audit login uid (`/proc/self/loginuid`): the person behind sudo or su.
    pub login_uid: Option<u32>,
    /// `$SUDO_USER`, when run through sudo.
    pub sudo_user: Option<String>,
    pub pid: u32,
}

/// Written once the tracepoint is attached: scripts start their traffic on it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Started {
    #[serde(with = "ts")]
    pub ts: SystemTime,
    pub version: String,
    pub pid: u32,
    pub ring_bytes: u32,
    /// Sockets found in the kernel's table at start-up.
    pub seeded: u64,
    /// Each optional capability, on or off with the reason (older logs have none).
    #[serde(default)]
    pub features: Vec<crate::features::Feature>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TransitionRecord {
    #[serde(with = "ts")]
    pub ts: SystemTime,
    #[serde(with = "hex")]
    pub sk: u64,
    #[serde(with = "family")]
    pub family: Family,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    #[serde(with = "state")]
    pub old: TcpState,
    #[serde(with = "state")]
    pub new: TcpState,
    pub pid: u32,
    #[serde(with = "comm")]
    pub comm: Comm,
    /// Null when the socket was not seen entering `old`.
    pub prev_state_ms: Option<f64>,
    #[serde(default)]
    pub netns: u32,
    /// The socket's cgroup and the unit, container and pod it names (absent when unknown).
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Arc<Workload>>,
    /// How a transition no tracepoint shows was observed (a mini-socket's:
    /// `peer`, `reuse`, `sock_diag`, `netns_gone`); absent for the kernel's
    /// own events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// On a real close with an error (a failed connect, a reset): why. `refused`,
    /// `timed_out`, `unreachable`, `reset`, `aborted` or `error`; `no_local_port` for a connect refused a local port (EADDRNOTAVAIL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// At the socket's end (CLOSE, TIME_WAIT): the retransmissions seen over its life, when
    /// there were any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retransmits: Option<u16>,
    /// At a connection's end (CLOSE, or TIME_WAIT): which side began it. `local` (this host
    /// sent the first FIN, so it keeps the TIME_WAIT), `peer`, or `reset` (ended before any
    /// FIN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_first: Option<String>,
}

/// A reset on a full socket: which side sent it, in which state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ResetRecord {
    #[serde(with = "ts")]
    pub ts: SystemTime,
    #[serde(with = "hex")]
    pub sk: u64,
    #[serde(with = "family")]
    pub family: Family,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    pub netns: u32,
    #[serde(with = "state")]
    pub state: TcpState,
    /// `sent` (by this host) or `received` (from the peer).
    pub side: String,
    /// Who held the socket, as tracked (not checked: a reset is reported at once).
    pub pid: Option<u32>,
    #[serde(with = "opt_comm")]
    pub comm: Option<Comm>,
    /// Retransmissions the socket had seen.
    pub retransmits: u16,
}

impl ResetRecord {
    pub fn new(r: &crate::tracker::Reset, clock: WallClock) -> Self {
        Self {
            ts: clock.to_system(r.ts_ns),
            sk: r.sk,
            family: r.tuple.family,
            saddr: r.tuple.saddr(),
            sport: r.tuple.sport,
            daddr: r.tuple.daddr(),
            dport: r.tuple.dport,
            netns: r.netns,
            state: r.state,
            side: r.side.name().to_owned(),
            pid: r.owner.map(|t| t.pid),
            comm: r.owner.map(|t| t.comm),
            retransmits: r.retransmits,
        }
    }
}

/// Who the anomaly names, and how sure we are.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OwnerSource {
    /// A process holding the socket's fd right now (/proc/PID/fd).
    Fd,
    /// The process attributed from process-context transitions; the fd
    /// lookup could not run (for example, another network namespace gone).
    Attributed,
    /// No process ever accepted it: `pid` and `comm` hold its listener,
    /// and `accept_queue` says how full that listener's queue is.
    AcceptQueue,
    /// No process holds it (orphan) and none was ever attributed.
    None,
}

/// A listener's accept queue, from sock_diag.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptQueue {
    /// Connections waiting for `accept()`.
    pub queue: u32,
    /// The listener's backlog.
    pub backlog: u32,
    /// Handshakes the listener dropped because its queue was full, since it was created.
    #[serde(default)]
    pub drops: u32,
}

/// The host's orphans and TCP memory against their limits, and the processes whose closing
/// sockets are the most.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Orphans {
    pub orphans: u64,
    pub max_orphans: u64,
    pub tcp_mem_pages: u64,
    pub tcp_mem_max_pages: u64,
    pub by_owner: Vec<OwnerCount>,
}

/// For `connection_churn`: one destination's new connections over the last flow window.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Churn {
    /// New connections per second to the destination.
    pub opened_per_s: f64,
    /// The median life of those closed here first is under this many ms.
    pub median_life_ms: u64,
    /// Of the connections that ended, the share whose close began here (0 to 1).
    pub closed_here: f64,
    /// Sockets to the destination in TIME_WAIT.
    pub time_wait: u32,
}

impl From<crate::tracker::rules::churn::Churn> for Churn {
    fn from(c: crate::tracker::rules::churn::Churn) -> Self {
        Self {
            opened_per_s: c.opened_per_s,
            median_life_ms: c.median_life_ms,
            closed_here: c.closed_here,
            time_wait: c.time_wait,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerCount {
    pub pid: u32,
    #[serde(with = "comm")]
    pub comm: Comm,
    /// Closing sockets (FIN_WAIT1, LAST_ACK, CLOSING, orphaned FIN_WAIT2) it last held.
    pub count: u64,
}

impl From<&crate::tracker::rules::orphans::OrphanPressure> for Orphans {
    fn from(o: &crate::tracker::rules::orphans::OrphanPressure) -> Self {
        Self {
            orphans: o.host.orphans,
            max_orphans: o.host.max_orphans,
            tcp_mem_pages: o.host.mem_pages,
            tcp_mem_max_pages: o.host.mem_max_pages,
            by_owner: o
                .by_owner
                .iter()
                .map(|(t, count)| OwnerCount {
                    pid: t.pid,
                    comm: t.comm,
                    count: *count,
                })
                .collect(),
        }
    }
}

/// A socket's vital signs when its anomaly was raised: what `ss -tio` shows.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Vitals {
    pub recv_q: u32,
    pub send_q: u32,
    /// Of `send_q`, bytes never sent yet.
    #[serde(default)]
    pub notsent: u32,
    /// `none`, `retransmit`, `keepalive`, `timewait` or `probe` (zero window).
    pub timer: String,
    pub timer_ms: u32,
    pub retransmits: u8,
    pub probes: u8,
    pub backoff: u8,
    pub total_retrans: u32,
    /// The peer's receive window: 0 stops our data and our FIN.
    pub snd_wnd: u32,
    pub last_data_recv_ms: u32,
    pub last_data_sent_ms: u32,
}

impl From<crate::socket::Vitals> for Vitals {
    fn from(v: crate::socket::Vitals) -> Self {
        Self {
            recv_q: v.recv_q,
            send_q: v.send_q,
            notsent: v.notsent,
            timer: v.timer.name().to_owned(),
            timer_ms: v.timer_ms,
            retransmits: v.retransmits,
            probes: v.probes,
            backoff: v.backoff,
            total_retrans: v.total_retrans,
            snd_wnd: v.snd_wnd,
            last_data_recv_ms: v.last_data_recv_ms,
            last_data_sent_ms: v.last_data_sent_ms,
        }
    }
}

impl From<crate::tracker::AcceptQueue> for AcceptQueue {
    fn from(q: crate::tracker::AcceptQueue) -> Self {
        Self {
            queue: q.queue,
            backlog: q.backlog,
            drops: q.drops,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    #[serde(with = "comm")]
    pub comm: Comm,
}

/// A socket's dropped packets, as an anomaly record carries them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Drops {
    pub count: u32,
    /// The last one's reason, as the kernel names it (`NETFILTER_DROP`, `SOCKET_FILTER`...).
    pub reason: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct AnomalyRecord {
    #[serde(with = "ts")]
    pub ts: SystemTime,
    /// The state name in lower case (`close_wait`, `fin_wait2`, ...) or the rule's
    /// (`accept_queue_full`, ...).
    #[serde(with = "kind")]
    pub kind: Kind,
    #[serde(with = "state")]
    pub state: TcpState,
    pub age_ms: f64,
    /// True when the socket predates the daemon: its age is "at least".
    #[serde(default)]
    pub age_is_lower_bound: bool,
    #[serde(with = "hex")]
    pub sk: u64,
    #[serde(with = "family")]
    pub family: Family,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    #[serde(default)]
    pub netns: u32,
    /// The socket's cgroup and the unit, container and pod it names (absent when unknown).
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Arc<Workload>>,
    /// For a socket a process holds (`owner_source` fd): that process's own cgroup, from
    /// `/proc/PID/cgroup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_cgroup: Option<String>,
    pub pid: Option<u32>,
    #[serde(with = "opt_comm")]
    pub comm: Option<Comm>,
    pub owner_source: OwnerSource,
    /// Every process holding the socket's fd (`owner_source` fd), as `ss -p` lists them: the
    /// first is `pid`. More than one after a fork or an fd passed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<Owner>,
    /// Set when no process holds the socket: who held it last.
    pub last_owner: Option<Owner>,
    /// For a socket nobody accepted, and for `accept_queue_full`: the
    /// listener's queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_queue: Option<AcceptQueue>,
    /// The socket's queues, timer and `tcp_info` when the anomaly was raised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vitals: Option<Vitals>,
    /// The socket's packets the kernel dropped so far (`--drops`), and the last one's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drops: Option<Drops>,
    /// For `orphan_pressure`: the host's counts and who left the closing sockets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orphans: Option<Orphans>,
    /// For `connection_churn`: the destination's new connections, their median life and its
    /// TIME_WAIT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub churn: Option<Churn>,
    /// For `anomaly_resolved`: why it ended (`left_state`, `reconciled`,
    /// `netns_gone`, `below_threshold`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<String>,
    /// For `time_wait_pressure`: sockets to the destination, the size of
    /// the ephemeral port range, and the namespace's `tcp_tw_reuse`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tw_reuse: Option<u8>,
    /// For `time_wait_pressure`: connects to the destination refused a local port
    /// (EADDRNOTAVAIL); `pid` and `comm` name the last one's process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_connects: Option<u32>,
    /// For `time_wait_pressure`: binds to port 0 in the namespace refused (EADDRINUSE, no
    /// port of the range free); `pid` and `comm` name the last one's process when no connect
    /// was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_binds: Option<u32>,
    /// For a socket in a state counted per destination: where it goes and how many sockets
    /// to there are in the same state ("one of 412 to the same upstream").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Destination>,
    /// The fields of a host rule that has no field of its own above: its file fills them
    /// (`HostRule::record`), and they are read back as they were written.
    #[serde(flatten, default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A destination as records and `status` name it, and the sockets to it in one state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// `10.0.3.7:5432`; for an accepted socket, the local listening port, `:8080`.
    pub addr: String,
    /// `outbound` (this host connected) or `inbound` (it accepted).
    pub direction: String,
    pub same_state: u32,
}

impl From<crate::tracker::DestCount> for Destination {
    fn from(d: crate::tracker::DestCount) -> Self {
        Self {
            addr: d.dest.addr(),
            direction: d.dest.direction().to_owned(),
            same_state: d.same_state,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LeakRecord {
    #[serde(with = "ts")]
    pub ts: SystemTime,
    pub pid: u32,
    #[serde(with = "comm")]
    pub comm: Comm,
    #[serde(with = "state")]
    pub state: TcpState,
    pub count: u64,
    /// Count at the previous check; the rule fires on growth.
    pub previous: u64,
    pub threshold: u64,
    /// The process's cgroup and what it names, from `/proc/PID/cgroup`.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Arc<Workload>>,
}

/// A TCP socket's `bind()` refused with EADDRINUSE (`bind_refused`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BindRefusedRecord {
    #[serde(with = "ts")]
    pub ts: SystemTime,
    pub pid: u32,
    #[serde(with = "comm")]
    pub comm: Comm,
    #[serde(with = "family")]
    pub family: Family,
    /// The address asked for.
    pub addr: IpAddr,
    /// The port asked for; 0: any port, and none of the range was free.
    pub port: u16,
    pub netns: u32,
    /// `port_taken` (a fixed port in use) or `no_free_port` (port 0, the range exhausted).
    pub reason: String,
    /// The process's cgroup and what it names, from `/proc/PID/cgroup`.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Arc<Workload>>,
}

impl BindRefusedRecord {
    pub fn new(b: &crate::tracker::BindRefused, clock: WallClock) -> Self {
        Self {
            ts: clock.to_system(b.ts_ns),
            pid: b.task.pid,
            comm: b.task.comm,
            family: b.family,
            addr: crate::socket::ip(b.family, &b.addr),
            port: b.port,
            netns: b.netns,
            reason: if b.port == 0 {
                "no_free_port"
            } else {
                "port_taken"
            }
            .to_owned(),
            workload: None,
        }
    }
}

/// Transition records the log rate limit dropped since the last one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Suppressed {
    #[serde(with = "ts")]
    pub ts: SystemTime,
    pub transitions: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Stopped {
    #[serde(with = "ts")]
    pub ts: SystemTime,
    /// Events received from the ring buffer.
    pub events: u64,
    /// Events lost because the ring buffer was full.
    pub dropped: u64,
    /// Events the kernel skipped because the program was already running
    /// on that CPU.
    pub recursion_misses: u64,
    /// Events received that could not be decoded.
    pub undecodable: u64,
    /// Sockets the tracker could not hold because the table was full.
    pub table_full: u64,
    /// TIME_WAIT mini-sockets not tracked because their table was full.
    #[serde(default)]
    pub timewait_full: u64,
    /// Records the log could not write (disk full, ...): counted, not kept.
    #[serde(default)]
    pub log_dropped: u64,
    /// Events received but left out by a userspace filter (`--netns`).
    #[serde(default)]
    pub filtered: u64,
    pub uptime_s: f64,
}

impl Record {
    /// The record for a tracker fact. `ts` comes from the fact's monotonic
    /// time through the run's one wall-clock mapping.
    pub fn from_fact(f: &Fact, clock: WallClock) -> Record {
        match f {
            Fact::Moved(m) => Record::Transition(TransitionRecord::from_moved(m, clock)),
            Fact::Raised(a) => Record::Anomaly(AnomalyRecord::new(a, None, clock)),
            Fact::Resolved(a, why) => {
                Record::AnomalyResolved(AnomalyRecord::new(a, Some(*why), clock))
            }
            Fact::Leak(l) => Record::LeakSuspected(LeakRecord::new(l, clock)),
            Fact::Reset(r) => Record::Reset(ResetRecord::new(r, clock)),
            Fact::BindRefused(b) => Record::BindRefused(BindRefusedRecord::new(b, clock)),
        }
    }
}

impl Record {
    /// Sets the workload on the records that carry one.
    pub fn set_workload(&mut self, w: Option<Arc<Workload>>) {
        match self {
            Record::Transition(t) => t.workload = w,
            Record::Anomaly(a) | Record::AnomalyResolved(a) => a.workload = w,
            Record::LeakSuspected(l) => l.workload = w,
            Record::BindRefused(b) => b.workload = w,
            _ => {}
        }
    }
}

impl TransitionRecord {
    pub fn from_moved(m: &Moved, clock: WallClock) -> Self {
        Self {
            ts: clock.to_system(m.ts_ns),
            sk: m.sk,
            family: m.tuple.family,
            saddr: m.tuple.saddr(),
            sport: m.tuple.sport,
            daddr: m.tuple.daddr(),
            dport: m.tuple.dport,
            old: m.old,
            new: m.new,
            pid: m.task.map_or(0, |t| t.pid),
            comm: m.task.map_or_else(Comm::default, |t| t.comm),
            prev_state_ms: m.prev_ns.map(|ns| ns as f64 / 1e6),
            netns: m.netns,
            workload: None,
            via: (m.via != crate::tracker::Via::Event).then(|| m.via.name().to_owned()),
            reason: m.reason.map(str::to_owned),
            retransmits: (m.retransmits > 0).then_some(m.retransmits),
            closed_first: crate::tracker::FirstClose::at_end(m.old, m.new)
                .map(|f| f.name().to_owned()),
        }
    }
}

impl AnomalyRecord {
    pub fn new(a: &Anomaly, resolution: Option<Resolution>, clock: WallClock) -> Self {
        let (pid, comm, owner_source, last_owner) = match a.owner {
            Blame::Verified(t) => (Some(t.pid), Some(t.comm), OwnerSource::Fd, None),
            Blame::Attributed(t) => (Some(t.pid), Some(t.comm), OwnerSource::Attributed, None),
            Blame::Orphan { last } => (
                None,
                None,
                OwnerSource::None,
                last.map(|t| Owner {
                    pid: t.pid,
                    comm: t.comm,
                }),
            ),
            Blame::AcceptQueue { listener } => (
                listener.map(|t| t.pid),
                listener.map(|t| t.comm),
                OwnerSource::AcceptQueue,
                None,
            ),
            Blame::Unknown => (None, None, OwnerSource::None, None),
        };
        // The wire keeps its flat fields (a contract with readers): each kind fills its own, a
        // lingering socket here and a host rule in its file (`HostRule::record`, below).
        let (mut accept_queue, mut destination) = (None, None);
        if let Detail::Lingering {
            listener_queue,
            destination: d,
        } = &a.detail
        {
            accept_queue = listener_queue.map(AcceptQueue::from);
            destination = d.map(Destination::from);
        }
        let holders = match a.owner {
            Blame::Verified(t) => std::iter::once(t)
                .chain(a.other_holders.iter().copied())
                .map(|t| Owner {
                    pid: t.pid,
                    comm: t.comm,
                })
                .collect(),
            _ => Vec::new(),
        };
        let mut rec = Self {
            ts: clock.to_system(a.ts_ns),
            kind: a.kind(),
            state: a.state,
            age_ms: a.ts_ns.saturating_sub(a.since_ns) as f64 / 1e6,
            age_is_lower_bound: a.lower_bound,
            sk: a.sk,
            family: a.tuple.family,
            saddr: a.tuple.saddr(),
            sport: a.tuple.sport,
            daddr: a.tuple.daddr(),
            dport: a.tuple.dport,
            netns: a.netns,
            workload: None,
            holder_cgroup: a.holder_cgroup.clone(),
            pid,
            comm,
            owner_source,
            holders,
            last_owner,
            accept_queue,
            vitals: a.vitals.map(Vitals::from),
            drops: a.drops.map(|d| Drops {
                count: d.count,
                reason: crate::drops::name_of(d.reason),
            }),
            orphans: None,
            churn: None,
            resolution: resolution.map(|r| r.name().to_owned()),
            count: None,
            port_range: None,
            tw_reuse: None,
            refused_connects: None,
            refused_binds: None,
            destination,
            extra: serde_json::Map::new(),
        };
        if let Detail::Rule(d) = &a.detail {
            d.record(&mut rec);
        }
        rec
    }
}

impl LeakRecord {
    pub fn new(l: &Leak, clock: WallClock) -> Self {
        Self {
            ts: clock.to_system(l.ts_ns),
            pid: l.task.pid,
            comm: l.task.comm,
            state: l.state,
            count: l.count,
            previous: l.previous,
            threshold: l.threshold,
            workload: None,
        }
    }
}

mod ts {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_nanos(*t))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = <&str>::deserialize(d)?;
        humantime::parse_rfc3339(s).map_err(D::Error::custom)
    }
}

mod hex {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{v:#x}"))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = <&str>::deserialize(d)?;
        let digits = s.strip_prefix("0x").unwrap_or(s);
        u64::from_str_radix(digits, 16).map_err(D::Error::custom)
    }
}

mod family {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    use crate::socket::Family;

    pub fn serialize<S: Serializer>(f: &Family, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(f.name())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Family, D::Error> {
        match <&str>::deserialize(d)? {
            "ipv4" => Ok(Family::V4),
            "ipv6" => Ok(Family::V6),
            other => Err(D::Error::custom(format!("unknown family {other:?}"))),
        }
    }
}

mod state {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    use crate::state::TcpState;

    pub fn serialize<S: Serializer>(st: &TcpState, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(st.name())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TcpState, D::Error> {
        let s = <&str>::deserialize(d)?;
        TcpState::parse(s).ok_or_else(|| D::Error::custom(format!("unknown TCP state {s:?}")))
    }
}

mod kind {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    use crate::tracker::Kind;

    pub fn serialize<S: Serializer>(k: &Kind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(k.name())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Kind, D::Error> {
        let s = <&str>::deserialize(d)?;
        Kind::parse(s).ok_or_else(|| D::Error::custom(format!("unknown anomaly kind {s:?}")))
    }
}

mod comm {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::socket::Comm;

    pub fn serialize<S: Serializer>(c: &Comm, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&c.as_str())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Comm, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(Comm::new(&s))
    }
}

mod opt_comm {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::socket::Comm;

    pub fn serialize<S: Serializer>(c: &Option<Comm>, s: S) -> Result<S::Ok, S::Error> {
        match c {
            Some(c) => s.serialize_str(&c.as_str()),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Comm>, D::Error> {
        let s = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
        Ok(s.map(|s| Comm::new(&s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::transition;

    #[test]
    fn transition_json_is_the_contract() {
        let line = serde_json::to_string(&Record::Transition(transition())).expect("serialises");
        assert_eq!(
            line,
            r#"{"type":"transition","ts":"2026-11-18T11:06:40.123456789Z","sk":"0xffff88800abc0000","family":"ipv4","saddr":"127.0.0.1","sport":40000,"daddr":"127.0.0.1","dport":8080,"old":"SYN_SENT","new":"ESTABLISHED","pid":77,"comm":"curl","prev_state_ms":0.25,"netns":4026531840}"#
        );
        let back: Record = serde_json::from_str(&line).expect("parses");
        assert_eq!(back, Record::Transition(transition()));
    }

    #[test]
    fn null_prev_state_and_ipv6() {
        let mut t = transition();
        t.prev_state_ms = None;
        t.family = Family::V6;
        t.saddr = "::1".parse().expect("addr");
        let line = serde_json::to_string(&Record::Transition(t.clone())).expect("serialises");
        assert!(line.contains(r#""prev_state_ms":null"#), "{line}");
        assert!(line.contains(r#""family":"ipv6","saddr":"::1""#), "{line}");
        assert_eq!(
            serde_json::from_str::<Record>(&line).expect("parses"),
            Record::Transition(t)
        );
    }

    /// The names are a contract: logs, `tail` and alerting rules match on them.
    #[test]
    fn anomaly_kinds_keep_their_names() {
        use crate::{fixtures::anomaly, tracker::RuleId};
        let mut kinds: Vec<Kind> = TcpState::ALL.into_iter().map(Kind::Lingering).collect();
        kinds.extend([
            Kind::Rule(RuleId::TimeWaitPressure),
            Kind::Rule(RuleId::AcceptQueueFull),
            Kind::Rule(RuleId::OrphanPressure),
            Kind::Rule(RuleId::ConnectionChurn),
        ]);
        let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
        assert_eq!(
            names,
            [
                "established",
                "syn_sent",
                "syn_recv",
                "fin_wait1",
                "fin_wait2",
                "time_wait",
                "close",
                "close_wait",
                "last_ack",
                "listen",
                "closing",
                "new_syn_recv",
                "time_wait_pressure",
                "accept_queue_full",
                "orphan_pressure",
                "connection_churn"
            ]
        );
        for k in kinds {
            let rec = Record::Anomaly(AnomalyRecord {
                kind: k,
                ..anomaly()
            });
            let line = serde_json::to_string(&rec).expect("serialises");
            assert!(
                line.contains(&format!(r#""kind":"{}""#, k.name())),
                "{line}"
            );
            assert_eq!(serde_json::from_str::<Record>(&line).expect("parses"), rec);
        }
        let line = serde_json::to_string(&Record::Anomaly(anomaly())).expect("serialises");
        let typo = line.replace(r#""kind":"close_wait""#, r#""kind":"closewait""#);
        assert!(serde_json::from_str::<Record>(&typo).is_err(), "{typo}");
    }

    #[test]
    fn rejects_garbage() {
        assert!(serde_json::from_str::<Record>(r#"{"type":"transition"}"#).is_err());
        assert!(serde_json::from_str::<Record>(r#"{"type":"nope"}"#).is_err());
        assert!(serde_json::from_str::<Record>("not json").is_err());
    }
}
