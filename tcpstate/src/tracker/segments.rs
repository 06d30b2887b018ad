//! Retransmits and resets from the optional hooks: counted by the socket's state, the
//! retransmits kept on the socket, a reset on a full socket reported with its story.

use super::{Fact, Reset, Side, Tracker, tuple_of};
use crate::{
    decode::{SegmentEvent, SegmentKind},
    state::TcpState,
};

impl Tracker {
    /// A retransmit or reset: counted by the socket's state, the retransmits on the socket
    /// too; a reset on a full socket is reported. Never a transition: the socket stays put.
    pub fn on_segment(&mut self, t: &SegmentEvent, out: &mut Vec<Fact>) {
        // A refused bind is about a socket no table holds: said before any lookup.
        if let SegmentKind::BindInUse { pid, comm, netns } = t.kind {
            self.bind_refused(t, super::Task { pid, comm }, netns, out);
            return;
        }
        let e = self.table.get(t.sk).copied();
        // A reset sent by an abortive close comes after the close: the socket as it was.
        let closed = match e {
            None if t.state == TcpState::Close => self.recent.get(t.sk).copied(),
            _ => None,
        };
        // A retransmit or reset record never carries the namespace: only the table or the close knows it.
        let netns = match (e, closed) {
            (Some(e), _) if e.netns != 0 => e.netns,
            (_, Some(c)) => c.netns,
            _ => 0,
        };
        let state = closed.map_or(t.state, |c| c.state);
        let st = state as usize;
        let side = match t.kind {
            SegmentKind::Retransmit => {
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
            SegmentKind::SynackRetransmit => {
                self.stats.synack_retransmits += 1;
                None
            }
            SegmentKind::ResetSent => {
                self.stats.resets_sent[st] += 1;
                Some(Side::Sent)
            }
            SegmentKind::ResetReceived => {
                self.stats.resets_received[st] += 1;
                Some(Side::Received)
            }
            SegmentKind::BindInUse { .. } => return,
            SegmentKind::Drop { reason } => {
                *self.stats.drops.entry((reason, state)).or_default() += 1;
                if e.is_some() {
                    self.socket_dropped(t.sk, reason);
                }
                None
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

    /// Keeps a tracked socket's drops for its anomaly's vital signs. The map is bounded: when
    /// full, closed sockets are let go first, and a socket that finds no room is counted by
    /// reason and state only.
    fn socket_dropped(&mut self, sk: u64, reason: u16) {
        if self.socket_drops.len() >= super::MAX_SOCKET_DROPS
            && !self.socket_drops.contains_key(&sk)
        {
            let table = &self.table;
            self.socket_drops.retain(|k, _| table.get(*k).is_some());
            if self.socket_drops.len() >= super::MAX_SOCKET_DROPS {
                return;
            }
        }
        let d = self
            .socket_drops
            .entry(sk)
            .or_insert(super::SocketDrops { count: 0, reason });
        d.count = d.count.saturating_add(1);
        d.reason = reason;
    }

    /// bind() refused with EADDRINUSE: counted by why, told at once, and, for port 0 (no
    /// port of the range free), counted on the namespace's TIME_WAIT pressure.
    fn bind_refused(
        &mut self,
        t: &SegmentEvent,
        task: super::Task,
        netns: u32,
        out: &mut Vec<Fact>,
    ) {
        let any_port = t.tuple.sport == 0;
        self.stats.binds_refused[usize::from(any_port)] += 1;
        if any_port {
            for r in self.rules.each_mut() {
                r.bind_refused(netns, task);
            }
        }
        out.push(Fact::BindRefused(super::BindRefused {
            ts_ns: t.ts_ns,
            task,
            netns,
            family: t.tuple.family,
            addr: t.tuple.saddr,
            port: t.tuple.sport,
        }));
    }
}
