//! Lingering sockets and open anomalies per cgroup, kept incrementally as sockets enter and
//! leave states (like the per-owner leak counts), so the metrics' per-workload gauges cost a
//! walk over cgroups, not over sockets. Bounded by the table: a cgroup is here only while one
//! of its sockets is.

use rustc_hash::FxHashMap;

use crate::state::TcpState;

/// The states whose sockets the per-workload gauges count: the close handshake's, where a
/// socket can wait on an application or a peer.
pub const CLOSING: [TcpState; 5] = [
    TcpState::CloseWait,
    TcpState::FinWait1,
    TcpState::FinWait2,
    TcpState::LastAck,
    TcpState::Closing,
];

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sockets in each of [`CLOSING`].
    pub closing: [u32; CLOSING.len()],
    pub anomalies_open: u32,
}

impl Counts {
    fn is_zero(&self) -> bool {
        *self == Self::default()
    }
}

/// FxHash: keyed by kernel cgroup ids, which only root chooses.
#[derive(Debug, Default)]
pub struct ByCgroup {
    map: FxHashMap<u64, Counts>,
}

impl ByCgroup {
    /// Books (`add`) or unbooks a socket in `st`, with or without an open anomaly.
    pub fn account(&mut self, cgroup: u64, st: TcpState, anomaly_open: bool, add: bool) {
        let i = CLOSING.iter().position(|&s| s == st);
        if i.is_none() && !anomaly_open {
            return;
        }
        let c = self.map.entry(cgroup).or_default();
        let bump = |n: &mut u32| *n = if add { *n + 1 } else { n.saturating_sub(1) };
        if let Some(i) = i {
            bump(&mut c.closing[i]);
        }
        if anomaly_open {
            bump(&mut c.anomalies_open);
        }
        if c.is_zero() {
            self.map.remove(&cgroup);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &Counts)> {
        self.map.iter().map(|(&k, c)| (k, c))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_come_and_go_with_their_sockets() {
        let mut b = ByCgroup::default();
        b.account(7, TcpState::CloseWait, false, true);
        b.account(7, TcpState::CloseWait, true, true);
        b.account(7, TcpState::Established, false, true);
        b.account(8, TcpState::Established, true, true);
        let c7 = b.iter().find(|(k, _)| *k == 7).map(|(_, c)| *c);
        assert_eq!(c7.map(|c| (c.closing[0], c.anomalies_open)), Some((2, 1)));
        assert_eq!(b.len(), 2);
        b.account(7, TcpState::CloseWait, false, false);
        b.account(7, TcpState::CloseWait, true, false);
        b.account(8, TcpState::Established, true, false);
        assert_eq!(b.len(), 0, "nothing left behind");
    }
}
