//! Ring-buffer records -> [`Decoded`]: a [`Transition`], or a [`SegmentEvent`] about a socket.

use tcpstate_common::{Event, close, segment};

use crate::{
    socket::{Comm, Family, Tuple},
    state::TcpState,
};

/// How a full socket's `-> CLOSE` ended, as the program judged it from the
/// socket (see `tcpstate_common::close`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Really gone, with the socket's pending error (0: a clean close).
    Closed { errno: u8 },
    /// Replaced by a timewait mini-socket in TIME_WAIT.
    TimeWait,
    /// An orphan replaced by a timewait mini-socket in FIN_WAIT2.
    FinWait2,
}

impl Ending {
    /// Why a real close happened, in words, from the socket's error (`sk_err`): what a failed
    /// connect or an abort reports. None for a clean close or a handoff.
    pub fn reason(self) -> Option<&'static str> {
        let Ending::Closed { errno } = self else {
            return None;
        };
        Some(match i32::from(errno) {
            0 => return None,
            libc::ECONNREFUSED => "refused",
            libc::ETIMEDOUT => "timed_out",
            libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN => {
                "unreachable"
            }
            libc::ECONNRESET | libc::EPIPE => "reset",
            libc::ECONNABORTED => "aborted",
            _ => "error",
        })
    }
}

/// What the retransmit and reset hooks saw happen to a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentKind {
    Retransmit,
    /// A listener's SYN-ACK sent again; `sk` is the listener, the tuple the connection's.
    SynackRetransmit,
    ResetSent,
    ResetReceived,
    /// A packet of the socket's dropped (`skb:kfree_skb`), for this reason (the running
    /// kernel's number; [`crate::drops::name_of`] names it).
    Drop {
        reason: u16,
    },
    /// `bind()` refused with EADDRINUSE; the tuple's source is the address asked for.
    BindInUse {
        pid: u32,
        comm: Comm,
        netns: u32,
    },
}

/// A retransmit or reset: the socket stays in `state`. The program sends these through the
/// transition record (`newstate` above every TCP state), but nothing downstream may count one
/// as a move between states, so it gets a type of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentEvent {
    pub ts_ns: u64,
    pub sk: u64,
    pub tuple: Tuple,
    /// The socket's state when it happened.
    pub state: TcpState,
    pub kind: SegmentKind,
}

/// One ring record, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    Transition(Transition),
    Segment(SegmentEvent),
}

impl Decoded {
    pub fn sk(&self) -> u64 {
        match self {
            Decoded::Transition(t) => t.sk,
            Decoded::Segment(s) => s.sk,
        }
    }

    pub fn tuple(&self) -> &Tuple {
        match self {
            Decoded::Transition(t) => &t.tuple,
            Decoded::Segment(s) => &s.tuple,
        }
    }

    /// The socket's namespace when the record carries it (births and refused binds; 0
    /// otherwise).
    pub fn netns(&self) -> u32 {
        match self {
            Decoded::Transition(t) => t.netns,
            Decoded::Segment(SegmentEvent {
                kind: SegmentKind::BindInUse { netns, .. },
                ..
            }) => *netns,
            Decoded::Segment(_) => 0,
        }
    }

    /// The socket's cgroup when the record carries it (births only; 0 otherwise).
    pub fn cgroup(&self) -> u64 {
        match self {
            Decoded::Transition(t) => t.cgroup,
            Decoded::Segment(_) => 0,
        }
    }
}

/// One decoded transition. `ts_ns` stays on the kernel's monotonic clock;
/// the outputs convert it to wall time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub ts_ns: u64,
    pub sk: u64,
    pub tuple: Tuple,
    pub old: TcpState,
    pub new: TcpState,
    /// Meaningful when `new` is CLOSE.
    pub ending: Ending,
    pub pid: u32,
    pub comm: Comm,
    /// Only on events that create a socket (0 otherwise).
    pub netns: u32,
    /// The socket's cgroup v2 id; like `netns`, only on events that create a socket.
    pub cgroup: u64,
}

impl Transition {
    /// Why this close happened, in words (None for a clean close, a handoff, or no close).
    /// Beside the socket's error: a connect that never got a local port. `tcp_v4_connect()`
    /// and `tcp_v6_connect()` enter SYN_SENT before choosing the port, and close the socket
    /// again when none is free to that destination, returning EADDRNOTAVAIL to `connect()`
    /// with no error on the socket. No other path leaves SYN_SENT with port 0: port
    /// exhaustion is seen with no hook of its own.
    pub fn close_reason(&self) -> Option<&'static str> {
        if self.new != TcpState::Close {
            return None;
        }
        match self.ending {
            Ending::Closed { errno: 0 }
                if self.old == TcpState::SynSent && self.tuple.sport == 0 =>
            {
                Some(NO_LOCAL_PORT)
            }
            e => e.reason(),
        }
    }
}

/// The close reason of a connect refused a local port (EADDRNOTAVAIL).
pub const NO_LOCAL_PORT: &str = "no_local_port";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes, expected {size}", size = size_of::<Event>())]
    Size(usize),
    #[error("unknown address family {0}")]
    Family(u8),
    #[error("unknown TCP state {0}")]
    State(u8),
}

/// Decodes raw bytes (what a fuzzer or a foreign ring hands us).
pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    if bytes.len() < size_of::<Event>() {
        return Err(DecodeError::Size(bytes.len()));
    }
    // SAFETY: length checked above; Event is Pod and read unaligned.
    let ev: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    from_event(&ev)
}

pub fn from_event(ev: &Event) -> Result<Decoded, DecodeError> {
    let family = Family::from_af(u16::from(ev.family)).ok_or(DecodeError::Family(ev.family))?;
    let (mut saddr, mut daddr) = (ev.saddr, ev.daddr);
    if family == Family::V4 {
        // The program writes only an IPv4 address's 4 bytes; the rest of the slot is stale.
        saddr[4..].fill(0);
        daddr[4..].fill(0);
    }
    let tuple = Tuple {
        family,
        saddr,
        daddr,
        sport: ev.sport,
        dport: ev.dport,
    };
    let state = |n| TcpState::from_kernel(n).ok_or(DecodeError::State(n));
    let kind = match ev.newstate {
        segment::RETRANSMIT => Some(SegmentKind::Retransmit),
        segment::SYNACK_RETRANSMIT => Some(SegmentKind::SynackRetransmit),
        segment::RESET_SENT => Some(SegmentKind::ResetSent),
        segment::RESET_RECEIVED => Some(SegmentKind::ResetReceived),
        segment::DROP => Some(SegmentKind::Drop {
            reason: u16::try_from(ev.cgroup).unwrap_or(u16::MAX),
        }),
        segment::BIND_IN_USE => Some(SegmentKind::BindInUse {
            pid: ev.pid,
            comm: Comm(ev.comm),
            netns: u32::try_from(ev.cgroup).unwrap_or(0),
        }),
        _ => None,
    };
    if let Some(kind) = kind {
        return Ok(Decoded::Segment(SegmentEvent {
            ts_ns: ev.ts_ns,
            sk: ev.skaddr,
            tuple,
            state: state(ev.oldstate)?,
            kind,
        }));
    }
    // The program writes these on births only; elsewhere the slot holds an older event's.
    let (netns, cgroup) = if ev.is_birth() {
        (ev.netns, ev.cgroup)
    } else {
        (0, 0)
    };
    Ok(Decoded::Transition(Transition {
        ts_ns: ev.ts_ns,
        sk: ev.skaddr,
        tuple,
        old: state(ev.oldstate)?,
        new: state(ev.newstate)?,
        ending: match ev.close {
            close::TIME_WAIT => Ending::TimeWait,
            close::FIN_WAIT2 => Ending::FinWait2,
            errno => Ending::Closed { errno },
        },
        pid: ev.pid,
        comm: Comm(ev.comm),
        netns,
        cgroup,
    }))
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::fixtures::{event, event_bytes};

    /// A connect refused a local port leaves SYN_SENT with port 0 and no error; a refused
    /// one has its error, and a connect closed early has its port.
    #[test]
    fn a_connect_that_found_no_local_port_says_so() {
        let lo: IpAddr = "127.0.0.1".parse().expect("addr");
        let t = |sport, errno| Transition {
            ts_ns: 1,
            sk: 1,
            tuple: Tuple::new(lo, sport, lo, 80),
            old: TcpState::SynSent,
            new: TcpState::Close,
            ending: Ending::Closed { errno },
            pid: 1,
            comm: crate::socket::Comm::default(),
            netns: 0,
            cgroup: 0,
        };
        assert_eq!(t(0, 0).close_reason(), Some(NO_LOCAL_PORT));
        assert_eq!(t(40000, 0).close_reason(), None);
        assert_eq!(
            t(0, libc::ECONNREFUSED as u8).close_reason(),
            Some("refused")
        );
        let established = Transition {
            old: TcpState::Established,
            ..t(0, 0)
        };
        assert_eq!(established.close_reason(), None);
    }

    fn transition(bytes: &[u8]) -> Transition {
        match decode(bytes) {
            Ok(Decoded::Transition(t)) => t,
            other => panic!("not a transition: {other:?}"),
        }
    }

    #[test]
    fn decodes_ipv4() {
        let t = transition(&event_bytes(&event()));
        assert_eq!(t.tuple.family, Family::V4);
        assert_eq!(t.tuple.saddr(), "10.0.0.1".parse::<IpAddr>().expect("addr"));
        assert_eq!(t.tuple.daddr(), "10.0.0.2".parse::<IpAddr>().expect("addr"));
        assert_eq!((t.tuple.sport, t.tuple.dport), (40000, 8080));
        assert_eq!((t.old, t.new), (TcpState::SynSent, TcpState::Established));
        assert_eq!(t.comm.as_str(), "curl");
        assert_eq!(t.sk, 0xffff_8880_1234_5678);
    }

    #[test]
    fn only_births_carry_netns_and_cgroup() {
        let mut ev = event();
        ev.cgroup = 77;
        ev.oldstate = 2; // SYN_SENT -> ESTABLISHED: the slot's netns and cgroup are stale
        let t = transition(&event_bytes(&ev));
        assert_eq!((t.netns, t.cgroup), (0, 0));
        ev.oldstate = 7; // CLOSE -> SYN_SENT: a birth
        ev.newstate = 2;
        let t = transition(&event_bytes(&ev));
        assert_eq!((t.netns, t.cgroup), (4026531840, 77));
        ev.oldstate = 10; // LISTEN -> SYN_RECV
        ev.newstate = 3;
        let t = transition(&event_bytes(&ev));
        assert_eq!((t.netns, t.cgroup), (4026531840, 77));
    }

    #[test]
    fn decodes_ipv6() {
        let mut ev = event();
        ev.family = 10;
        ev.saddr = std::net::Ipv6Addr::LOCALHOST.octets();
        ev.daddr = "fd00::2"
            .parse::<std::net::Ipv6Addr>()
            .expect("addr")
            .octets();
        let t = transition(&event_bytes(&ev));
        assert_eq!(t.tuple.family, Family::V6);
        assert_eq!(t.tuple.saddr().to_string(), "::1");
        assert_eq!(t.tuple.daddr().to_string(), "fd00::2");
    }

    #[test]
    fn decodes_how_a_socket_closed() {
        let mut ev = event();
        ev.newstate = 7;
        for (byte, want) in [
            (0, Ending::Closed { errno: 0 }),
            (104, Ending::Closed { errno: 104 }),
            (close::TIME_WAIT, Ending::TimeWait),
            (close::FIN_WAIT2, Ending::FinWait2),
        ] {
            ev.close = byte;
            assert_eq!(transition(&event_bytes(&ev)).ending, want);
        }
    }

    /// A retransmit or reset comes out as a segment event in the socket's state, never as a
    /// transition from that state to itself.
    #[test]
    fn retransmits_and_resets_are_segment_events_not_transitions() {
        let mut ev = event();
        ev.oldstate = 4; // FIN_WAIT1
        for (byte, kind) in [
            (segment::RETRANSMIT, SegmentKind::Retransmit),
            (segment::SYNACK_RETRANSMIT, SegmentKind::SynackRetransmit),
            (segment::RESET_SENT, SegmentKind::ResetSent),
            (segment::RESET_RECEIVED, SegmentKind::ResetReceived),
            (segment::DROP, SegmentKind::Drop { reason: 12 }),
        ] {
            ev.newstate = byte;
            // A drop's reason rides in the cgroup slot, which no other segment event uses.
            ev.cgroup = 12;
            let Ok(Decoded::Segment(s)) = decode(&event_bytes(&ev)) else {
                panic!("{byte:#x} is not a segment event");
            };
            assert_eq!(
                (s.kind, s.state, s.sk),
                (kind, TcpState::FinWait1, ev.skaddr)
            );
            assert_eq!((s.tuple.sport, s.tuple.dport), (40000, 8080));
        }
        // One after an abortive close: state CLOSE, which is not a birth.
        ev.oldstate = 7;
        ev.newstate = segment::RESET_SENT;
        let d = decode(&event_bytes(&ev)).expect("decodes");
        assert_eq!((d.netns(), d.cgroup()), (0, 0));
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(decode(&[0u8; 10]), Err(DecodeError::Size(10)));
        let mut ev = event();
        ev.family = 1;
        assert_eq!(decode(&event_bytes(&ev)), Err(DecodeError::Family(1)));
        let mut ev = event();
        ev.newstate = 99;
        assert_eq!(decode(&event_bytes(&ev)), Err(DecodeError::State(99)));
    }
}
