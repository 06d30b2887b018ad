//! What the tracker concludes, in its own terms. The outputs turn these
//! into records (`record.rs` is the only place that knows JSON); the
//! tracker knows nothing of wall clocks or formats.

use super::rules::{RuleDetail, RuleId};
use crate::{
    socket::{Comm, Tuple, Vitals},
    state::TcpState,
};

/// A process, as the kernel names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Task {
    pub pid: u32,
    pub comm: Comm,
}

/// Who is to blame for a socket, and how sure we are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// A process holding the socket's fd right now (checked in /proc).
    Verified(Task),
    /// Nobody holds it: its application closed it. `last` is who held it
    /// last, when known.
    Orphan {
        last: Option<Task>,
    },
    /// Nobody ever accepted it: it waits in the accept queue of a listener
    /// held by `listener`, the process that must `accept()` it.
    AcceptQueue {
        listener: Option<Task>,
    },
    /// Inferred from process-context transitions, not (yet) checked.
    Attributed(Task),
    Unknown,
}

/// How a transition was observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The kernel's tracepoint.
    Event,
    /// Inferred from the local peer's own transition (its FIN reached a
    /// FIN_WAIT2 mini-socket).
    Peer,
    /// A new connection reused the tuple of a TIME_WAIT mini-socket.
    Reuse,
    /// Found by asking the kernel (sock_diag) about the socket.
    SockDiag,
    /// Its network namespace was destroyed.
    NetnsGone,
}

impl Via {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Event => "event",
            Self::Peer => "peer",
            Self::Reuse => "reuse",
            Self::SockDiag => "sock_diag",
            Self::NetnsGone => "netns_gone",
        }
    }
}

impl Fact {
    /// The cgroup id of the socket the fact is about (0: unknown or none).
    pub fn cgroup(&self) -> u64 {
        match self {
            Fact::Moved(m) => m.cgroup,
            Fact::Raised(a) | Fact::Resolved(a, _) => a.cgroup,
            Fact::Leak(_) | Fact::Reset(_) | Fact::BindRefused(_) => 0,
        }
    }
}

/// A transition to report.
#[derive(Clone, Debug, PartialEq)]
pub struct Moved {
    pub ts_ns: u64,
    pub sk: u64,
    pub netns: u32,
    /// The socket's cgroup id (0: unknown, or a TIME_WAIT mini-socket, which has none).
    pub cgroup: u64,
    pub tuple: Tuple,
    pub old: TcpState,
    pub new: TcpState,
    /// Time spent in `old`, when we saw it entered.
    pub prev_ns: Option<u64>,
    /// The task on the CPU, for kernel events.
    pub task: Option<Task>,
    pub via: Via,
    /// For a real close with an error: why (`refused`, `timed_out`, `unreachable`, `reset`,
    /// `aborted`, `error`).
    pub reason: Option<&'static str>,
    /// At the socket's end: the retransmissions the hooks saw over its life (0: none or
    /// not watched).
    pub retransmits: u16,
}

/// Which end sent a reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// This host sent it (the application aborted, or the kernel refused a segment).
    Sent,
    /// The peer sent it.
    Received,
}

impl Side {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Received => "received",
        }
    }
}

/// A reset on a full socket, from the reset hooks.
#[derive(Clone, Debug, PartialEq)]
pub struct Reset {
    pub ts_ns: u64,
    pub sk: u64,
    pub netns: u32,
    pub tuple: Tuple,
    /// The socket's state when it happened.
    pub state: TcpState,
    pub side: Side,
    /// Who held the socket, as tracked (not checked).
    pub owner: Option<Task>,
    pub retransmits: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A socket sat in this state past its threshold.
    Lingering(TcpState),
    /// A host rule raised it (`time_wait_pressure`, `accept_queue_full`, ...).
    Rule(RuleId),
}

impl Kind {
    /// The name records and metric labels carry (`close_wait`, `accept_queue_full`): a
    /// contract with whoever reads the log, never renamed.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lingering(st) => st.kind(),
            Self::Rule(id) => id.name(),
        }
    }

    /// The kind of that [`name`](Self::name); None for a name no kind has.
    pub fn parse(name: &str) -> Option<Self> {
        RuleId::parse(name).map(Self::Rule).or_else(|| {
            TcpState::ALL
                .into_iter()
                .find(|st| st.kind() == name)
                .map(Self::Lingering)
        })
    }
}

/// For `time_wait_pressure`: how full the port range is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pressure {
    /// Sockets from the local address to the destination.
    pub count: u64,
    /// Ports in `net.ipv4.ip_local_port_range`.
    pub range: u32,
    /// `net.ipv4.tcp_tw_reuse` in the namespace.
    pub tw_reuse: u8,
    /// Connects to the destination refused a local port (EADDRNOTAVAIL) while counted.
    pub refused_connects: u32,
    /// Binds to port 0 in the namespace refused (EADDRINUSE: no free port at all).
    pub refused_binds: u32,
}

/// A listener's accept queue, from sock_diag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptQueue {
    /// Connections waiting for `accept()`.
    pub queue: u32,
    /// The listener's backlog.
    pub backlog: u32,
    /// Handshakes the listener dropped, its queue being full, since it was created
    /// (`SK_MEMINFO_DROPS`; 0 when unknown).
    pub drops: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Anomaly {
    pub state: TcpState,
    /// When it was raised or resolved.
    pub ts_ns: u64,
    /// Since when the socket (or destination) has been in this condition.
    pub since_ns: u64,
    /// The socket predates the daemon: the age is "at least".
    pub lower_bound: bool,
    /// Kernel address; 0 when none is known (a snapshot socket, a
    /// mini-socket, a destination).
    pub sk: u64,
    pub netns: u32,
    /// The socket's cgroup id (0: unknown, or not about one socket).
    pub cgroup: u64,
    pub tuple: Tuple,
    pub owner: Owner,
    /// The socket's queues, timer and `tcp_info` when its owner was checked (the lingering
    /// socket's, or the full queue's listener's).
    pub vitals: Option<Vitals>,
    /// The verified holder's own cgroup path (the owner check's).
    pub holder_cgroup: Option<String>,
    /// Processes that hold the socket's fd too, besides the verified owner.
    pub other_holders: Vec<Task>,
    /// The socket's packets the drop hook saw dropped (`--drops`), if any.
    pub drops: Option<SocketDrops>,
    /// What this kind of anomaly says beyond the above; it also decides the kind.
    pub detail: Detail,
}

/// Packets of one socket dropped by the kernel, and why the last one was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketDrops {
    pub count: u32,
    /// The kernel's number for the last one's reason ([`crate::drops::name_of`]).
    pub reason: u16,
}

impl Anomaly {
    /// The kind, from the detail: the two cannot disagree.
    pub fn kind(&self) -> Kind {
        match &self.detail {
            Detail::Lingering { .. } => Kind::Lingering(self.state),
            Detail::Rule(d) => Kind::Rule(d.id()),
        }
    }
}

/// Each kind's own facts: one variant per rule, so no record carries another kind's fields.
#[derive(Clone, Debug, PartialEq)]
pub enum Detail {
    /// One socket sat in its state past the threshold.
    Lingering {
        /// The accept queue of its listener, for a socket nobody accepted.
        listener_queue: Option<AcceptQueue>,
        /// For a socket in a state counted per destination: its destination, and how many
        /// sockets to it are in the same state (this one included).
        destination: Option<DestCount>,
    },
    /// A host rule's own facts (its rule declares them).
    Rule(RuleDetail),
}

/// A destination and the sockets to it in one state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestCount {
    pub dest: super::destinations::Dest,
    pub same_state: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// The socket left the state.
    LeftState,
    /// The kernel no longer had the socket (an event was lost).
    Reconciled,
    /// Its network namespace was destroyed.
    NetnsGone,
    /// The count fell below the threshold.
    Relieved,
}

impl Resolution {
    pub const fn name(self) -> &'static str {
        match self {
            Self::LeftState => "left_state",
            Self::Reconciled => "reconciled",
            Self::NetnsGone => "netns_gone",
            Self::Relieved => "below_threshold",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leak {
    pub ts_ns: u64,
    pub task: Task,
    pub state: TcpState,
    pub count: u64,
    pub previous: u64,
    pub threshold: u64,
}

/// A TCP socket's `bind()` refused with EADDRINUSE: the address asked for (port 0: any
/// port, and none of the range was free), who asked, in which namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindRefused {
    pub ts_ns: u64,
    pub task: Task,
    pub netns: u32,
    pub family: crate::socket::Family,
    pub addr: [u8; 16],
    pub port: u16,
}

/// Everything the tracker tells the outputs, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Fact {
    Moved(Moved),
    Raised(Anomaly),
    Resolved(Anomaly, Resolution),
    Leak(Leak),
    Reset(Reset),
    BindRefused(BindRefused),
}
