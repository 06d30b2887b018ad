//! Ring-buffer bytes -> [`Transition`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tcpstate_common::{AF_INET, AF_INET6, Event};

use crate::state::TcpState;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const fn name(self) -> &'static str {
        match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        }
    }
}

/// A task's `comm`: 16 bytes, NUL padded, not necessarily UTF-8.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm(pub [u8; 16]);

impl Comm {
    pub fn new(s: &str) -> Self {
        let mut b = [0u8; 16];
        let n = s.len().min(15);
        b[..n].copy_from_slice(&s.as_bytes()[..n]);
        Self(b)
    }

    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        String::from_utf8_lossy(&self.0[..end])
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// One decoded transition. `ts_ns` stays on the kernel's monotonic clock;
/// the outputs convert it to wall time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub ts_ns: u64,
    pub sk: u64,
    pub family: Family,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    pub old: TcpState,
    pub new: TcpState,
    pub pid: u32,
    pub comm: Comm,
    pub netns: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes, expected {size}", size = size_of::<Event>())]
    Size(usize),
    #[error("unknown address family {0}")]
    Family(u16),
    #[error("unknown TCP state {0}")]
    State(u8),
}

pub fn decode(bytes: &[u8]) -> Result<Transition, DecodeError> {
    if bytes.len() < size_of::<Event>() {
        return Err(DecodeError::Size(bytes.len()));
    }
    // SAFETY: length checked above; Event is Pod and read unaligned.
    let ev: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    from_event(&ev)
}

pub fn from_event(ev: &Event) -> Result<Transition, DecodeError> {
    let (family, saddr, daddr) = match ev.family {
        AF_INET => (Family::V4, v4(&ev.saddr), v4(&ev.daddr)),
        AF_INET6 => (
            Family::V6,
            IpAddr::V6(Ipv6Addr::from(ev.saddr)),
            IpAddr::V6(Ipv6Addr::from(ev.daddr)),
        ),
        other => return Err(DecodeError::Family(other)),
    };
    let state = |n| TcpState::from_kernel(n).ok_or(DecodeError::State(n));
    Ok(Transition {
        ts_ns: ev.ts_ns,
        sk: ev.skaddr,
        family,
        saddr,
        sport: ev.sport,
        daddr,
        dport: ev.dport,
        old: state(ev.oldstate)?,
        new: state(ev.newstate)?,
        pid: ev.pid,
        comm: Comm(ev.comm),
        netns: ev.netns,
    })
}

fn v4(b: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        Event {
            ts_ns: 42,
            skaddr: 0xffff_8880_1234_5678,
            saddr,
            daddr,
            pid: 1234,
            netns: 4026531840,
            sport: 40000,
            dport: 8080,
            family: AF_INET,
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
        assert_eq!(t.family, Family::V4);
        assert_eq!(t.saddr, "10.0.0.1".parse::<IpAddr>().expect("addr"));
        assert_eq!(t.daddr, "10.0.0.2".parse::<IpAddr>().expect("addr"));
        assert_eq!((t.sport, t.dport), (40000, 8080));
        assert_eq!((t.old, t.new), (TcpState::SynSent, TcpState::Established));
        assert_eq!(t.comm.as_str(), "curl");
        assert_eq!(t.sk, 0xffff_8880_1234_5678);
    }

    #[test]
    fn decodes_ipv6() {
        let mut ev = event();
        ev.family = AF_INET6;
        ev.saddr = Ipv6Addr::LOCALHOST.octets();
        ev.daddr = "fd00::2".parse::<Ipv6Addr>().expect("addr").octets();
        let t = decode(&bytes(&ev)).expect("decodes");
        assert_eq!(t.family, Family::V6);
        assert_eq!(t.saddr, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(t.daddr.to_string(), "fd00::2");
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

    #[test]
    fn comm_handles_full_and_invalid_bytes() {
        assert_eq!(Comm(*b"0123456789abcdef").as_str(), "0123456789abcdef");
        assert_eq!(Comm::new("nginx").as_str(), "nginx");
        let mut raw = [0u8; 16];
        raw[0] = 0xff;
        assert_eq!(Comm(raw).as_str(), "\u{fffd}");
    }
}
