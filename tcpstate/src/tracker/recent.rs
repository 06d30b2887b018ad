//! Sockets that just closed, for the retransmits and resets that arrive after: an application's abortive
//! close (`SO_LINGER` 0, unread data at `close()`) moves the socket to CLOSE and only then
//! sends its reset, so the reset hook sees a socket the table has already let go. A bounded
//! ring of the last closes keeps what the reset record needs.

use std::collections::{HashMap, VecDeque};

use super::facts::Task;
use crate::{socket::Tuple, state::TcpState};

/// Closes remembered: a reset follows its close within microseconds, so a few thousand cover
/// any burst; older ones are forgotten first.
const KEEP: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Closed {
    /// The state it left for CLOSE.
    pub state: TcpState,
    pub netns: u32,
    pub tuple: Tuple,
    pub owner: Option<Task>,
    pub retrans: u16,
}

#[derive(Debug, Default)]
pub struct RecentCloses {
    by_sk: HashMap<u64, Closed, foldhash::fast::RandomState>,
    order: VecDeque<u64>,
}

impl RecentCloses {
    pub fn push(&mut self, sk: u64, c: Closed) {
        if self.by_sk.insert(sk, c).is_none() {
            self.order.push_back(sk);
        }
        if self.order.len() > KEEP
            && let Some(old) = self.order.pop_front()
        {
            self.by_sk.remove(&old);
        }
    }

    pub fn get(&self, sk: u64) -> Option<&Closed> {
        self.by_sk.get(&sk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_closes_only() {
        let lo = "127.0.0.1".parse().expect("addr");
        let c = Closed {
            state: TcpState::Established,
            netns: 7,
            tuple: Tuple::new(lo, 1, lo, 2),
            owner: None,
            retrans: 3,
        };
        let mut r = RecentCloses::default();
        for sk in 0..(KEEP as u64 + 10) {
            r.push(sk, c);
        }
        assert!(r.get(0).is_none() && r.get(9).is_none());
        assert_eq!(r.get(10), Some(&c));
        assert_eq!(r.by_sk.len(), KEEP);
        // The same address closing again (a reused struct sock) replaces, not grows.
        r.push(KEEP as u64 + 9, c);
        assert_eq!(r.order.len(), KEEP);
    }
}
