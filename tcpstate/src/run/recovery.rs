//! What a lost event changes, as a state machine the loop drives and the tests drive with a
//! fake kernel. The table is trusted until the kernel counts a lost transition. From then on
//! it may hold ghosts (a socket whose CLOSE was lost), so no anomaly is raised and a full
//! reconciliation starts at once. The table is trusted again only when a reconciliation that
//! started after the last loss has ended: one that was already out, or that ran while more
//! was lost, cannot vouch for the sockets those losses concern.
//!
//! One reconciliation is out at a time; every `full_every`th one also lists TIME_WAIT.

use crate::program::KernelCounters;

/// A reconciliation to ask the workers for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Start {
    /// TIME_WAIT mini-sockets too.
    pub timewait: bool,
    /// Every namespace, not only those tracked: sockets met mid-life after a loss have no
    /// namespace yet.
    pub everywhere: bool,
}

/// What the end of a reconciliation means for the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ended {
    /// It started after the last loss: the table is whole again.
    Trusted,
    /// Events were lost while it ran (or before it, while another was out): once more.
    Again,
    /// Nothing was lost: a periodic reconciliation.
    Unchanged,
}

pub(super) struct Recovery {
    /// The kernel's count of lost transitions at the last tick.
    seen: u64,
    /// When the last loss was seen, while the table is not trusted.
    lost_at_ns: Option<u64>,
    /// A reconciliation is out.
    out: bool,
    /// Reconciliations started.
    started: u64,
    full_every: u64,
}

impl Recovery {
    pub fn new(full_every: u64) -> Self {
        Self {
            seen: 0,
            lost_at_ns: None,
            out: false,
            started: 0,
            full_every: full_every.max(1),
        }
    }

    /// The kernel's counters at a tick. True when this loss is the one that stops the table
    /// being trusted: the caller marks it so and starts a full reconciliation. Only lost
    /// transitions count ([`KernelCounters::transitions_lost`]): a scanner's resets for no
    /// socket or a full segment ring leave the table as true as it was.
    pub fn tick(&mut self, kernel: &KernelCounters, now_ns: u64) -> bool {
        let lost = kernel.transitions_lost();
        if lost == self.seen {
            return false;
        }
        self.seen = lost;
        // Set before the reconciliation starts: it must look in every namespace.
        self.lost_at_ns.replace(now_ns).is_none()
    }

    /// Whether a loss is not yet mended by a reconciliation.
    pub fn untrusted(&self) -> bool {
        self.lost_at_ns.is_some()
    }

    /// A reconciliation may start (none is out): what it must cover. `full` asks for
    /// TIME_WAIT whatever the turn. The caller says [`not_sent`](Self::not_sent) if the
    /// workers would not take it.
    pub fn begin(&mut self, full: bool) -> Option<Start> {
        if self.out {
            return None;
        }
        self.out = true;
        self.started += 1;
        Some(Start {
            timewait: full || self.started.is_multiple_of(self.full_every),
            everywhere: self.untrusted(),
        })
    }

    /// The workers did not take the reconciliation [`begin`](Self::begin) gave.
    pub fn not_sent(&mut self) {
        self.out = false;
    }

    /// The reconciliation whose dump started at `started_ns` is over.
    pub fn end(&mut self, started_ns: u64) -> Ended {
        self.out = false;
        match self.lost_at_ns {
            None => Ended::Unchanged,
            Some(lost) if lost < started_ns => {
                self.lost_at_ns = None;
                Ended::Trusted
            }
            Some(_) => Ended::Again,
        }
    }
}

#[cfg(test)]
mod tests;
