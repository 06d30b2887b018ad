//! Naming the process that holds a socket before its anomaly is reported. The tracker's owner
//! is a guess from process-context transitions (wrong for pre-fork servers and after fd
//! passing); the workers look the socket up (sock_diag, one exact lookup) and find the process
//! whose fd points at it (/proc), as `ss -p` does. Anomaly facts wait here, in order, until
//! their check comes back; transitions do not wait.

use std::collections::{HashMap, VecDeque};

use crate::{
    socket::{Tuple, Vitals},
    tracker::{Anomaly, Detail, Fact, Owner, Task},
    workers::{Holder, Job},
};

/// What a ticket was for.
#[derive(Debug)]
pub enum Purpose {
    /// Anomaly facts waiting in the queue.
    Facts,
    /// A status page: these anomalies, answered with this reply.
    Status(Vec<Anomaly>, crate::output::http::Reply),
}

#[derive(Default)]
pub struct Verifier {
    next: u64,
    queue: VecDeque<(Fact, Option<u64>)>,
    tickets: HashMap<u64, Purpose>,
    /// Holders the checks found, for the tracker to adopt as owners.
    verified: Vec<(Anomaly, Task)>,
}

/// Whether an anomaly's owner is worth checking: not an orphan we already know, not a
/// destination.
fn needs_check(a: &Anomaly) -> bool {
    // A holder verified earlier is checked again: it may have passed the fd on since, and the
    // check also brings its cgroup and the socket's vital signs.
    let of_a_socket = match &a.detail {
        Detail::Lingering { .. } => true,
        Detail::Rule(d) => d.id().checks_owner(),
    };
    of_a_socket
        && matches!(
            a.owner,
            Owner::Attributed(_) | Owner::Verified(_) | Owner::Unknown
        )
}

/// Applies a check's answer to an anomaly.
fn apply(a: &mut Anomaly, h: &Holder, v: Option<Vitals>) {
    a.owner = checked(a.owner, h);
    if let Holder::Process { cgroup, others, .. } = h {
        a.holder_cgroup.clone_from(cgroup);
        a.other_holders = others
            .iter()
            .map(|&(pid, comm)| Task { pid, comm })
            .collect();
    }
    a.vitals = v.or(a.vitals);
    if let (Holder::AcceptQueue { queue, .. }, Detail::Lingering { listener_queue, .. }) =
        (h, &mut a.detail)
    {
        *listener_queue = Some(*queue);
    }
}

/// The owner after a check.
pub fn checked(owner: Owner, h: &Holder) -> Owner {
    let last = match owner {
        Owner::Attributed(t) | Owner::Verified(t) => Some(t),
        Owner::Orphan { last } => last,
        Owner::AcceptQueue { listener } => listener,
        Owner::Unknown => None,
    };
    match h {
        Holder::Process { pid, comm, .. } => Owner::Verified(Task {
            pid: *pid,
            comm: *comm,
        }),
        Holder::Nobody => Owner::Orphan { last },
        Holder::AcceptQueue { listener, .. } => Owner::AcceptQueue {
            listener: listener.map(|(pid, comm)| Task { pid, comm }),
        },
        Holder::Unknown => owner,
    }
}

impl Verifier {
    fn ticket(&mut self, purpose: Purpose) -> u64 {
        self.next += 1;
        self.tickets.insert(self.next, purpose);
        self.next
    }

    /// Queues facts; returns the job that checks the owners of the anomalies raised among
    /// them, if any.
    pub fn push(&mut self, facts: impl IntoIterator<Item = Fact>) -> Option<Job> {
        let mut sockets: Vec<(u32, Tuple)> = Vec::new();
        let mut held = Vec::new();
        for f in facts {
            match &f {
                Fact::Raised(a) if needs_check(a) => {
                    sockets.push((a.netns, a.tuple));
                    held.push(self.queue.len());
                    self.queue.push_back((f, None));
                }
                _ => self.queue.push_back((f, None)),
            }
        }
        if sockets.is_empty() {
            return None;
        }
        let ticket = self.ticket(Purpose::Facts);
        for i in held {
            self.queue[i].1 = Some(ticket);
        }
        Some(Job::Owners { ticket, sockets })
    }

    /// The job that checks a status page's open anomalies.
    pub fn status(&mut self, open: Vec<Anomaly>, reply: crate::output::http::Reply) -> Job {
        let sockets = open.iter().map(|a| (a.netns, a.tuple)).collect();
        let ticket = self.ticket(Purpose::Status(open, reply));
        Job::Owners { ticket, sockets }
    }

    /// Applies a check's answers. For a status page, returns its anomalies and reply.
    pub fn answer(
        &mut self,
        ticket: u64,
        holders: &[Holder],
        vitals: &[Option<Vitals>],
    ) -> Option<(Vec<Anomaly>, crate::output::http::Reply)> {
        let vital = |i: usize| vitals.get(i).copied().flatten();
        match self.tickets.remove(&ticket)? {
            Purpose::Facts => {
                let mut answers = holders.iter().enumerate();
                for (f, t) in &mut self.queue {
                    if *t != Some(ticket) {
                        continue;
                    }
                    *t = None;
                    if let (Fact::Raised(a), Some((i, h))) = (f, answers.next()) {
                        apply(a, h, vital(i));
                        if let Owner::Verified(t) = a.owner {
                            self.verified.push((a.clone(), t));
                        }
                    }
                }
                None
            }
            Purpose::Status(mut open, reply) => {
                for (i, (a, h)) in open.iter_mut().zip(holders).enumerate() {
                    if needs_check(a) {
                        apply(a, h, vital(i));
                        if let Owner::Verified(t) = a.owner {
                            self.verified.push((a.clone(), t));
                        }
                    }
                }
                Some((open, reply))
            }
        }
    }

    /// The holders found since the last call: each anomaly's socket and who holds it.
    pub fn take_verified(&mut self) -> Vec<(Anomaly, Task)> {
        std::mem::take(&mut self.verified)
    }

    /// Facts whose checks are done, in the order they came.
    pub fn ready(&mut self) -> impl Iterator<Item = Fact> + '_ {
        std::iter::from_fn(|| {
            if self.queue.front().is_some_and(|(_, t)| t.is_none()) {
                self.queue.pop_front().map(|(f, _)| f)
            } else {
                None
            }
        })
    }

    /// Everything still queued, checked or not (shutdown).
    pub fn drain_all(&mut self) -> impl Iterator<Item = Fact> + '_ {
        self.queue.drain(..).map(|(f, _)| f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{socket::Comm, state::TcpState, tracker::Resolution};

    fn anomaly(owner: Owner) -> Anomaly {
        let lo = "127.0.0.1".parse().expect("addr");
        Anomaly {
            state: TcpState::CloseWait,
            ts_ns: 1,
            since_ns: 0,
            lower_bound: false,
            sk: 1,
            netns: 7,
            cgroup: 0,
            tuple: Tuple::new(lo, 80, lo, 5000),
            owner,
            vitals: None,
            holder_cgroup: None,
            other_holders: Vec::new(),
            drops: None,
            detail: Detail::Lingering {
                listener_queue: None,
                destination: None,
            },
        }
    }

    const T: Task = Task {
        pid: 42,
        comm: Comm(*b"server\0\0\0\0\0\0\0\0\0\0"),
    };

    #[test]
    fn anomalies_wait_for_their_check_in_order() {
        let mut v = Verifier::default();
        let job = v.push([
            Fact::Raised(anomaly(Owner::Attributed(T))),
            Fact::Resolved(anomaly(Owner::Attributed(T)), Resolution::LeftState),
        ]);
        let Some(Job::Owners { ticket, sockets }) = job else {
            panic!("{job:?}");
        };
        assert_eq!(sockets.len(), 1);
        assert_eq!(
            v.ready().count(),
            0,
            "the resolution waits behind the raise"
        );
        v.answer(ticket, &[Holder::Nobody], &[]);
        let out: Vec<Fact> = v.ready().collect();
        let Fact::Raised(a) = &out[0] else {
            panic!("{out:?}");
        };
        assert_eq!(a.owner, Owner::Orphan { last: Some(T) });
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn a_holder_is_verified_and_unknown_keeps_the_guess() {
        let pid = Holder::Process {
            cgroup: None,
            others: Vec::new(),
            pid: 7,
            comm: Comm::new("worker"),
        };
        assert!(matches!(
            checked(Owner::Attributed(T), &pid),
            Owner::Verified(Task { pid: 7, .. })
        ));
        assert_eq!(
            checked(Owner::Attributed(T), &Holder::Unknown),
            Owner::Attributed(T)
        );
        assert_eq!(
            checked(Owner::Unknown, &Holder::Nobody),
            Owner::Orphan { last: None }
        );
    }
}
