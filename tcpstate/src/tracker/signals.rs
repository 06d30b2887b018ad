//! Retransmits and resets from the optional hooks: counted by the socket's state, the
//! retransmits kept on the socket, a reset on a full socket reported with its story.

use super::{Applied, Fact, Reset, Side, Tracker, tuple_of};
use crate::{decode::Signal, decode::Transition, state::TcpState};

impl Tracker {
    /// A retransmit or reset: counted by the socket's state (`t.new`), the retransmits on the
    /// socket too; a reset on a full socket is reported.
    pub(super) fn on_signal(&mut self, t: &Transition, s: Signal, out: &mut Vec<Fact>) -> Applied {
        let e = self.table.get(t.sk).copied();
        // A reset sent by an abortive close comes after the close: the socket as it was.
        let closed = match e {
            None if t.new == TcpState::Close => self.recent.get(t.sk).copied(),
            _ => None,
        };
        let netns = match (e, closed) {
            (Some(e), _) if e.netns != 0 => e.netns,
            (_, Some(c)) => c.netns,
            _ => t.netns,
        };
        let state = closed.map_or(t.new, |c| c.state);
        let st = state as usize;
        let side = match s {
            Signal::Retransmit => {
                self.stats.retransmits[st] += 1;
                self.table.update(t.sk, |e| {
                    e.retrans = e.retrans.saturating_add(1);
                    // A connect's birth comes before the kernel picks its local port; a SYN
                    // retransmit carries it, so a stuck SYN_SENT has its real tuple (and can
                    // be looked up, owned and killed) before its threshold.
                    if e.tuple.sport == 0 && t.tuple.sport != 0 {
                        e.tuple.saddr = t.tuple.saddr;
                        e.tuple.sport = t.tuple.sport;
                    }
                });
                None
            }
            Signal::SynackRetransmit => {
                self.stats.synack_retransmits += 1;
                None
            }
            Signal::ResetSent => {
                self.stats.resets_sent[st] += 1;
                Some(Side::Sent)
            }
            Signal::ResetReceived => {
                self.stats.resets_received[st] += 1;
                Some(Side::Received)
            }
        };
        if let Some(side) = side {
            let (tuple, owner, retransmits) = match (e, closed) {
                // An orphan is held by nobody: its last owner closed it.
                (Some(e), _) => {
                    let held = e.owner().filter(|_| !e.has(super::table::flag::ORPHAN));
                    (tuple_of(t, &e), held.map(|o| self.task(o)), e.retrans)
                }
                (None, Some(c)) => (c.tuple, c.owner, c.retrans),
                (None, None) => (t.tuple, None, 0),
            };
            out.push(Fact::Reset(Reset {
                ts_ns: t.ts_ns,
                sk: t.sk,
                netns,
                tuple,
                state,
                side,
                owner,
                retransmits,
            }));
        }
        Applied {
            prev_state_ms: None,
            netns,
        }
    }
}
