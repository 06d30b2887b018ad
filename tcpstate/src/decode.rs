//! Ring-buffer records -> [`Decoded`]: a [`Transition`], or a [`Signal`] about a socket.

use tcpstate_common::{Event, close, signal};

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
pub enum SignalKind {
    Retransmit,
    /// A listener's SYN-ACK sent again; `sk` is the listener, the tuple the connection's.
    SynackRetransmit,
    ResetSent,
    ResetReceived,
}

/// A retransmit or reset: the socket stays in `state`. The program sends these through the
/// transition record (`newstate` above every TCP state), but nothing downstream may count one
/// as a move between states, so it gets a type of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signal {
    pub ts_ns: u64,
    pub sk: u64,
    pub tuple: Tuple,
    /// The socket's state when it happened.
    pub state: TcpState,
    pub kind: SignalKind,
}

/// One ring record, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    Transition(Transition),
    Signal(Signal),
}

impl Decoded {
    pub fn sk(&self) -> u64 {
        match self {
            Decoded::Transition(t) => t.sk,
            Decoded::Signal(s) => s.sk,
        }
    }

    /// The socket's namespace when the record carries it (births only; 0 otherwise).
    pub fn netns(&self) -> u32 {
        match self {
            Decoded::Transition(t) => t.netns,
            Decoded::Signal(_) => 0,
        }
    }

    /// The socket's cgroup when the record carries it (births only; 0 otherwise).
    pub fn cgroup(&self) -> u64 {
        match self {
            Decoded::Transition(t) => t.cgroup,
            Decoded::Signal(_) => 0,
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
        signal::RETRANSMIT => Some(SignalKind::Retransmit),
        signal::SYNACK_RETRANSMIT => Some(SignalKind::SynackRetransmit),
        signal::RESET_SENT => Some(SignalKind::ResetSent),
        signal::RESET_RECEIVED => Some(SignalKind::ResetReceived),
        _ => None,
    };
    if let Some(kind) = kind {
        return Ok(Decoded::Signal(Signal {
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

    /// A retransmit or reset comes out as a signal in the socket's state, never as a
    /// transition from that state to itself.
    #[test]
    fn retransmits_and_resets_are_signals_not_transitions() {
        let mut ev = event();
        ev.oldstate = 4; // FIN_WAIT1
        for (byte, kind) in [
            (signal::RETRANSMIT, SignalKind::Retransmit),
            (signal::SYNACK_RETRANSMIT, SignalKind::SynackRetransmit),
            (signal::RESET_SENT, SignalKind::ResetSent),
            (signal::RESET_RECEIVED, SignalKind::ResetReceived),
        ] {
            ev.newstate = byte;
            let Ok(Decoded::Signal(s)) = decode(&event_bytes(&ev)) else {
                panic!("{byte:#x} is not a signal");
            };
            assert_eq!(
                (s.kind, s.state, s.sk),
                (kind, TcpState::FinWait1, ev.skaddr)
            );
            assert_eq!((s.tuple.sport, s.tuple.dport), (40000, 8080));
        }
        // One after an abortive close: state CLOSE, which is not a birth.
        ev.oldstate = 7;
        ev.newstate = signal::RESET_SENT;
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
