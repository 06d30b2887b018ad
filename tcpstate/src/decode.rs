//! Ring-buffer records -> [`Transition`].

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

/// Not a transition: what the retransmit and reset hooks saw happen to a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Retransmit,
    /// A listener's SYN-ACK sent again; `sk` is the listener, the tuple the connection's.
    SynackRetransmit,
    ResetSent,
    ResetReceived,
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
    /// Set for a signal, not a transition: `old` and `new` are then both the socket's state.
    pub signal: Option<Signal>,
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
pub fn decode(bytes: &[u8]) -> Result<Transition, DecodeError> {
    if bytes.len() < size_of::<Event>() {
        return Err(DecodeError::Size(bytes.len()));
    }
    // SAFETY: length checked above; Event is Pod and read unaligned.
    let ev: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    from_event(&ev)
}

pub fn from_event(ev: &Event) -> Result<Transition, DecodeError> {
    let family = Family::from_af(u16::from(ev.family)).ok_or(DecodeError::Family(ev.family))?;
    let (mut saddr, mut daddr) = (ev.saddr, ev.daddr);
    if family == Family::V4 {
        // The program writes only an IPv4 address's 4 bytes; the rest of the slot is stale.
        saddr[4..].fill(0);
        daddr[4..].fill(0);
    }
    let state = |n| TcpState::from_kernel(n).ok_or(DecodeError::State(n));
    let sig = match ev.newstate {
        signal::RETRANSMIT => Some(Signal::Retransmit),
        signal::SYNACK_RETRANSMIT => Some(Signal::SynackRetransmit),
        signal::RESET_SENT => Some(Signal::ResetSent),
        signal::RESET_RECEIVED => Some(Signal::ResetReceived),
        _ => None,
    };
    let new = if sig.is_some() {
        ev.oldstate
    } else {
        ev.newstate
    };
    // The program writes these on births only; elsewhere the slot holds an older event's.
    // A signal's record is written whole, with both 0.
    let birth = sig.is_none() && ev.is_birth();
    let (netns, cgroup) = if birth { (ev.netns, ev.cgroup) } else { (0, 0) };
    Ok(Transition {
        ts_ns: ev.ts_ns,
        sk: ev.skaddr,
        tuple: Tuple {
            family,
            saddr,
            daddr,
            sport: ev.sport,
            dport: ev.dport,
        },
        old: state(ev.oldstate)?,
        new: state(new)?,
        ending: match ev.close {
            close::TIME_WAIT => Ending::TimeWait,
            close::FIN_WAIT2 => Ending::FinWait2,
            errno => Ending::Closed { errno },
        },
        pid: ev.pid,
        comm: Comm(ev.comm),
        netns,
        cgroup,
        signal: sig,
    })
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn event() -> Event {
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        Event {
            cgroup: 0,
            ts_ns: 42,
            skaddr: 0xffff_8880_1234_5678,
            saddr,
            daddr,
            pid: 1234,
            netns: 4026531840,
            sport: 40000,
            dport: 8080,
            family: 2,
            close: 0,
            oldstate: 2,
            newstate: 1,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        }
    }

    fn bytes(ev: &Event) -> Vec<u8> {
        // SAFETY: Event is repr(C) without padding.
        unsafe { std::slice::from_raw_parts((ev as *const Event).cast::<u8>(), size_of::<Event>()) }
            .to_vec()
    }

    #[test]
    fn decodes_ipv4() {
        let t = decode(&bytes(&event())).expect("decodes");
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
        let t = decode(&bytes(&ev)).expect("decodes");
        assert_eq!((t.netns, t.cgroup), (0, 0));
        ev.oldstate = 7; // CLOSE -> SYN_SENT: a birth
        ev.newstate = 2;
        let t = decode(&bytes(&ev)).expect("decodes");
        assert_eq!((t.netns, t.cgroup), (4026531840, 77));
        ev.oldstate = 10; // LISTEN -> SYN_RECV
        ev.newstate = 3;
        let t = decode(&bytes(&ev)).expect("decodes");
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
        let t = decode(&bytes(&ev)).expect("decodes");
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
            assert_eq!(decode(&bytes(&ev)).expect("decodes").ending, want);
        }
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(decode(&[0u8; 10]), Err(DecodeError::Size(10)));
        let mut ev = event();
        ev.family = 1;
        assert_eq!(decode(&bytes(&ev)), Err(DecodeError::Family(1)));
        let mut ev = event();
        ev.newstate = 99;
        assert_eq!(decode(&bytes(&ev)), Err(DecodeError::State(99)));
    }
}
