//! What names a socket, in one form for every layer: its address family,
//! its 4-tuple, and the task names the kernel reports.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The address family number (`AF_INET`, `AF_INET6`).
    pub const fn af(self) -> u16 {
        match self {
            Self::V4 => tcpstate_common::AF_INET,
            Self::V6 => tcpstate_common::AF_INET6,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        }
    }

    /// From a kernel `AF_*` number.
    pub fn from_af(af: u16) -> Option<Self> {
        match af {
            tcpstate_common::AF_INET => Some(Self::V4),
            tcpstate_common::AF_INET6 => Some(Self::V6),
            _ => None,
        }
    }

    pub fn of(addr: IpAddr) -> Self {
        if addr.is_ipv6() { Self::V6 } else { Self::V4 }
    }
}

/// A socket's 4-tuple as the kernel stores it: raw addresses (IPv4 in the
/// first 4 bytes, the rest zero) and host-order ports. Compact and
/// hashable, so the socket table, the timewait table and the sock_diag
/// layer all key on the same value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub family: Family,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

impl Tuple {
    /// An IPv4 tuple from the four bytes of each address, as compact tables keep them.
    pub fn v4(saddr: [u8; 4], sport: u16, daddr: [u8; 4], dport: u16) -> Self {
        let (mut s, mut d) = ([0; 16], [0; 16]);
        s[..4].copy_from_slice(&saddr);
        d[..4].copy_from_slice(&daddr);
        Self {
            family: Family::V4,
            saddr: s,
            daddr: d,
            sport,
            dport,
        }
    }

    pub fn new(saddr: IpAddr, sport: u16, daddr: IpAddr, dport: u16) -> Self {
        Self {
            family: Family::of(saddr),
            saddr: raw(saddr),
            daddr: raw(daddr),
            sport,
            dport,
        }
    }

    pub fn saddr(&self) -> IpAddr {
        ip(self.family, &self.saddr)
    }

    pub fn daddr(&self) -> IpAddr {
        ip(self.family, &self.daddr)
    }

    /// The same connection seen from its other end.
    pub fn reversed(&self) -> Self {
        Self {
            family: self.family,
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
        }
    }
}

pub fn ip(family: Family, b: &[u8; 16]) -> IpAddr {
    match family {
        Family::V6 => IpAddr::V6(Ipv6Addr::from(*b)),
        Family::V4 => IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
    }
}

pub fn raw(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// A task's `comm`: 16 bytes, NUL padded, not necessarily UTF-8 (any local
/// user picks it with `prctl(PR_SET_NAME)`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm(pub [u8; 16]);

impl Comm {
    pub fn new(s: &str) -> Self {
        Self::from_bytes(s.as_bytes())
    }

    pub fn from_bytes(s: &[u8]) -> Self {
        let mut b = [0u8; 16];
        let n = s.len().min(15);
        b[..n].copy_from_slice(&s[..n]);
        Self(b)
    }

    /// The name's bytes, without the NUL padding.
    pub fn bytes(&self) -> &[u8] {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        &self.0[..end]
    }

    /// Lossy UTF-8, for JSON (which escapes control characters itself).
    /// Human-readable outputs use `output::escape` instead.
    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(self.bytes())
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip() {
        for a in ["10.1.2.3", "::1", "fe80::1", "::ffff:10.0.0.1"] {
            let addr: IpAddr = a.parse().expect("addr");
            let t = Tuple::new(addr, 1, addr, 2);
            assert_eq!(t.saddr(), addr);
            assert_eq!(t.reversed().dport, 1);
        }
    }

    #[test]
    fn comm_handles_full_and_invalid_bytes() {
        assert_eq!(Comm(*b"0123456789abcdef").as_str(), "0123456789abcdef");
        assert_eq!(Comm::new("nginx").as_str(), "nginx");
        let mut raw = [0u8; 16];
        raw[0] = 0xff;
        assert_eq!(Comm(raw).as_str(), "\u{fffd}");
        assert_eq!(Comm(raw).bytes(), &[0xff]);
    }
}

/// The timer pending on a socket (`idiag_timer`, the `timer:` column of `ss -o`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    None,
    /// Retransmission (or loss probe): data or a FIN not acknowledged.
    Retransmit,
    Keepalive,
    TimeWait,
    /// Zero window probe: the peer advertises no room.
    Probe,
}

impl Timer {
    pub fn from_kernel(t: u8) -> Self {
        match t {
            1 => Self::Retransmit,
            2 => Self::Keepalive,
            3 => Self::TimeWait,
            4 => Self::Probe,
            _ => Self::None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Retransmit => "retransmit",
            Self::Keepalive => "keepalive",
            Self::TimeWait => "timewait",
            Self::Probe => "probe",
        }
    }
}

/// What `ss -tio` shows of a socket: its queues, its pending timer and the parts of
/// `tcp_info` that say why it is stuck. Read with one exact sock_diag lookup when its anomaly
/// is raised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vitals {
    /// Bytes received and not read by the application.
    pub recv_q: u32,
    /// Bytes sent and not acknowledged, and bytes not yet sent (`notsent`).
    pub send_q: u32,
    /// Of `send_q`, bytes not sent yet (`tcpi_notsent_bytes`): held back by the peer's
    /// window or the congestion window, never on the wire.
    pub notsent: u32,
    pub timer: Timer,
    /// Time left on the timer.
    pub timer_ms: u32,
    /// Consecutive retransmissions of the same segment (`tcpi_retransmits`).
    pub retransmits: u8,
    /// Unanswered zero-window or keepalive probes (`tcpi_probes`).
    pub probes: u8,
    /// Exponential backoff of the retransmission timer (`tcpi_backoff`).
    pub backoff: u8,
    /// Retransmitted segments over the socket's life.
    pub total_retrans: u32,
    /// The peer's advertised receive window, scaled: 0 stops our data and our FIN.
    pub snd_wnd: u32,
    pub last_data_recv_ms: u32,
    pub last_data_sent_ms: u32,
}
