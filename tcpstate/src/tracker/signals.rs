//! Retransmits and resets from the optional hooks: counted by the socket's state, the
//! retransmits kept on the socket, a reset on a full socket reported with its story.

use super::{Fact, Reset, Side, Tracker, tuple_of};
use crate::{
    decode::{Signal, SignalKind},
    state::TcpState,
};

impl Tracker {
    /// A retransmit or reset: counted by the socket's state, the retransmits on the socket
    /// too; a reset on a full socket is reported. Never a transition: the socket stays put.
    pub fn on_signal(&mut self, t: &Signal, out: &mut Vec<Fact>) {
        let e = self.table.get(t.sk).copied();
        // A reset sent by an abortive close comes after the close: the socket as it was.
        let closed = match e {
            None if t.state == TcpState::Close => self.recent.get(t.sk).copied(),
            _ => None,
        };
        // A signal's record never carries the namespace: only the table or the close knows it.
        let netns = match (e, closed) {
            (Some(e), _) if e.netns != 0 => e.netns,
            (_, Some(c)) => c.netns,
            _ => 0,
        };
        let state = closed.map_or(t.state, |c| c.state);
        let st = state as usize;
        let side = match t.kind {
            SignalKind::Retransmit => {
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
            SignalKind::SynackRetransmit => {
                self.stats.synack_retransmits += 1;
                None
            }
            SignalKind::ResetSent => {
                self.stats.resets_sent[st] += 1;
                Some(Side::Sent)
            }
            SignalKind::ResetReceived => {
                self.stats.resets_received[st] += 1;
                Some(Side::Received)
            }
        };
        if let Some(side) = side {
            let (tuple, owner, retransmits) = match (e, closed) {
                // An orphan is held by nobody: its last owner closed it.
                (Some(e), _) => {
                    let held = e.owner().filter(|_| !e.has(super::table::flag::ORPHAN));
                    (
                        tuple_of(&t.tuple, &e),
                        held.map(|o| self.task(o)),
                        e.retrans,
                    )
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
    }
}
