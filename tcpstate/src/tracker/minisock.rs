//! The second half of the close, after `tcp_time_wait()` replaced a full
//! socket with a timewait mini-socket: an orphan waiting in FIN_WAIT2 for
//! the peer's FIN, then TIME_WAIT for 2MSL. No tracepoint fires for a
//! mini-socket, so its transitions are inferred from other sockets' events
//! (the local peer's close, a new connection reusing the tuple) or found
//! by asking the kernel (sock_diag), and each is reported with how it was
//! observed (`Via`).

use super::{
    Fact, MetTimeWait, Moved, Resolution, Tracker, Via,
    destinations::{Dest, Holder},
    table::flag,
    timewait::Insert,
};
use crate::{decode::Transition, socket::Tuple, state::TcpState};

impl Tracker {
    /// An orphan in FIN_WAIT2 was handed to a mini-socket: it stays in
    /// FIN_WAIT2 (its time and any open anomaly go on), but loses its
    /// kernel address, which the next socket may take: from here on it is
    /// named by namespace and tuple, as `ss` names it, and its records say
    /// `sk` 0.
    pub(super) fn detach_orphan(&mut self, sk: u64, netns: u32, now_ns: u64, out: &mut Vec<Fact>) {
        let key = self.synthetic_key();
        if !self.table.rekey(sk, key) {
            return;
        }
        let epoch = self.epoch();
        let Some(e) = self.table.update(key, |e| {
            e.netns = netns;
            e.flags |= flag::ORPHAN;
            e.epoch = epoch;
            if e.state != TcpState::FinWait2 {
                // Its FIN_WAIT1 -> FIN_WAIT2 was lost: it is in FIN_WAIT2
                // from now, as far as we know.
                e.state = TcpState::FinWait2;
                e.flags &= !(flag::ENTRY_SEEN | flag::ANOMALY_OPEN);
            }
        }) else {
            return;
        };
        // A new epoch, so the deadline left under the old address (which a
        // new socket may take) is dead; this one replaces it.
        self.enter_deadline(key);
        if let Some(old) = self.orphans.insert((e.netns, e.tuple), key) {
            // The kernel has one mini-socket per tuple: an older entry for
            // it is stale (its end was missed), and its open anomaly ends with it.
            if old != key {
                self.forget_ghost(old, now_ns, Resolution::Reconciled, out);
            }
        }
    }

    /// Starts tracking a TIME_WAIT mini-socket, which entered TIME_WAIT at `since_ns` and was
    /// met as `how` says. `active`: its connection was opened by connect(), so its port counts
    /// towards `time_wait_pressure`.
    pub(super) fn enter_timewait(
        &mut self,
        netns: u32,
        tuple: &Tuple,
        since_ns: u64,
        how: MetTimeWait,
        active: bool,
        out: &mut Vec<Fact>,
    ) {
        let (estimated, now_ns) = match how {
            MetTimeWait::Event => (false, since_ns),
            MetTimeWait::Seed { now_ns } | MetTimeWait::Dump { now_ns } => (true, now_ns),
        };
        match self
            .timewait
            .insert(netns, tuple, since_ns, (estimated, active))
        {
            Insert::New => {
                self.table.destinations_mut().account(
                    Dest::of(tuple, netns, !active),
                    no_holder(),
                    TcpState::TimeWait,
                    true,
                );
                if active && netns != 0 && !self.rules.pressure.knows(netns) {
                    self.unknown_netns.insert(netns);
                }
                // Said now: an anomaly is dated when tcpstate says it, never at a
                // mini-socket's estimated start (which can predate the daemon).
                for r in self.rules.each_mut() {
                    r.time_wait_added(netns, tuple, active, now_ns, out);
                }
            }
            // A socket is refused once: at its event, or at the start-up snapshot. Every
            // later dump meets the same untracked sockets again and must not count them anew.
            Insert::Full if !matches!(how, MetTimeWait::Dump { .. }) => {
                self.timewait.count_refused();
            }
            _ => {}
        }
    }

    /// Ends a TIME_WAIT mini-socket, reporting TIME_WAIT -> CLOSE.
    pub(super) fn end_timewait(
        &mut self,
        netns: u32,
        tuple: &Tuple,
        ts_ns: u64,
        via: Via,
        out: &mut Vec<Fact>,
    ) -> bool {
        let Some(s) = self.timewait.remove(netns, tuple) else {
            return false;
        };
        self.table.destinations_mut().account(
            Dest::of(tuple, netns, !s.active),
            no_holder(),
            TcpState::TimeWait,
            false,
        );
        for r in self.rules.each_mut() {
            r.time_wait_removed(netns, tuple, ts_ns, out);
        }
        let prev_ns = (!s.estimated).then(|| ts_ns.saturating_sub(s.since_ns));
        self.stats
            .transition(TcpState::TimeWait, TcpState::Close, prev_ns);
        out.push(Fact::Moved(Moved {
            ts_ns,
            sk: 0,
            netns,
            cgroup: 0,
            tuple: *tuple,
            old: TcpState::TimeWait,
            new: TcpState::Close,
            prev_ns,
            task: None,
            via,
            reason: None,
            retransmits: 0,
        }));
        true
    }

    /// A FIN_WAIT2 mini-socket got the peer's FIN: FIN_WAIT2 -> TIME_WAIT.
    pub(super) fn orphan_to_timewait(
        &mut self,
        netns: u32,
        tuple: &Tuple,
        ts_ns: u64,
        via: Via,
        out: &mut Vec<Fact>,
    ) -> bool {
        let Some(key) = self.orphans.remove(&(netns, *tuple)) else {
            return false;
        };
        let Some(e) = self.table.remove(key) else {
            return false;
        };
        let left = (TcpState::TimeWait, via, Resolution::LeftState);
        self.orphan_left(key, &e, (netns, tuple, ts_ns), left, out);
        let active = e.has(flag::ACTIVE);
        self.enter_timewait(netns, tuple, ts_ns, MetTimeWait::Event, active, out);
        true
    }

    /// A FIN_WAIT2 mini-socket the kernel no longer has (its
    /// `tcp_fin_timeout` ran out, or an RST): FIN_WAIT2 -> CLOSE.
    pub(super) fn end_orphan(
        &mut self,
        netns: u32,
        tuple: &Tuple,
        ts_ns: u64,
        via: Via,
        why: Resolution,
        out: &mut Vec<Fact>,
    ) -> bool {
        let Some(&key) = self.orphans.get(&(netns, *tuple)) else {
            return false;
        };
        let Some(e) = self.forget(key) else {
            return false;
        };
        self.orphan_left(
            key,
            &e,
            (netns, tuple, ts_ns),
            (TcpState::Close, via, why),
            out,
        );
        true
    }

    /// A FIN_WAIT2 mini-socket left for `new`: its move, and its anomaly resolved.
    fn orphan_left(
        &mut self,
        key: u64,
        e: &super::Entry,
        (netns, tuple, ts_ns): (u32, &Tuple, u64),
        (new, via, why): (TcpState, Via, Resolution),
        out: &mut Vec<Fact>,
    ) {
        let prev_ns = e
            .has(flag::ENTRY_SEEN)
            .then(|| ts_ns.saturating_sub(e.since_ns));
        self.stats.transition(TcpState::FinWait2, new, prev_ns);
        out.push(Fact::Moved(Moved {
            ts_ns,
            sk: 0,
            netns,
            cgroup: e.cgroup,
            tuple: *tuple,
            old: TcpState::FinWait2,
            new,
            prev_ns,
            task: None,
            via,
            reason: None,
            retransmits: 0,
        }));
        if e.has(flag::ANOMALY_OPEN) {
            out.push(Fact::Resolved(self.anomaly(key, e, ts_ns), why));
        }
    }

    /// A new connection took a tuple (its connect or its handshake
    /// completed): a TIME_WAIT mini-socket on it was reused (`tcp_tw_reuse`,
    /// or a SYN the mini-socket accepted). It ended first.
    pub(super) fn before_move(&mut self, t: &Transition, netns: u32, out: &mut Vec<Fact>) {
        if self.timewait.is_empty() || t.tuple.sport == 0 {
            return;
        }
        if matches!(
            (t.old, t.new),
            (TcpState::SynSent, _) | (TcpState::Listen, TcpState::SynRecv)
        ) {
            self.end_timewait(netns, &t.tuple, t.ts_ns, Via::Reuse, out);
        }
    }

    /// The local peer sent its FIN (CLOSE_WAIT -> LAST_ACK): our FIN_WAIT2
    /// mini-socket at the other end got it and entered TIME_WAIT.
    pub(super) fn after_move(&mut self, t: &Transition, netns: u32, out: &mut Vec<Fact>) {
        if !self.orphans.is_empty() && (t.old, t.new) == (TcpState::CloseWait, TcpState::LastAck) {
            let peer = t.tuple.reversed();
            self.orphan_to_timewait(netns, &peer, t.ts_ns, Via::Peer, out);
        }
    }

    /// Forgets everything tracked in a namespace found destroyed at `as_of_ns` (its
    /// mini-sockets die with it; a full socket cannot outlive it).
    ///
    /// The kernel gives a destroyed namespace's inode number to the next one made, and the
    /// verdict reaches the engine after events that came since: what entered its state after
    /// `as_of_ns` lives in the new namespace of that number and is kept. On a busy host (a
    /// namespace made and deleted every 300 ms) a new namespace's 70 TIME_WAIT were wiped by
    /// a sweep's older verdict about the last one, and its TIME_WAIT pressure never said.
    pub fn netns_gone(&mut self, netns: u32, as_of_ns: u64, out: &mut Vec<Fact>) {
        if netns == 0 {
            return;
        }
        let mut newer = false;
        let mut timewait: Vec<Tuple> = Vec::new();
        for s in self.timewait.iter().filter(|s| s.netns == netns) {
            if s.since_ns <= as_of_ns {
                timewait.push(s.tuple);
            } else {
                newer = true;
            }
        }
        for tuple in timewait {
            self.end_timewait(netns, &tuple, as_of_ns, Via::NetnsGone, out);
        }
        let keys: Vec<u64> = self
            .table
            .iter()
            .filter(|(_, e)| e.netns == netns && e.since_ns <= as_of_ns)
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            self.forget_ghost(key, as_of_ns, Resolution::NetnsGone, out);
        }
        // Its request sockets died with it too.
        self.requests.remove(&netns);
        // Its inode number goes to the next namespace made, whose settings are its own: asked
        // for anew when that one already has TIME_WAIT here.
        self.rules.pressure.forget(netns);
        self.unknown_netns.remove(&netns);
        if newer {
            self.unknown_netns.insert(netns);
        }
    }
}

/// No process holds a TIME_WAIT mini-socket, and it keeps no cgroup.
fn no_holder() -> Holder {
    Holder {
        cgroup: 0,
        comm: Holder::NONE,
    }
}
