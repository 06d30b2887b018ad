//! Workers that read the kernel's own socket table (sock_diag) and `/proc`, off the event
//! path: seeding, reconciliation, the mini-socket sweep, owner checks and namespace settings.
//! The daemon sends [`Job`]s and gets [`Reply`]s back as messages; nothing here blocks the
//! draining of the rings.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, mpsc},
};

use tokio::sync::mpsc::UnboundedSender;

use crate::{
    clock::monotonic_ns,
    procfs,
    sockdiag::{ALL_STATES, DiagSocket, Namespaces},
    socket::{Comm, Tuple},
    state::TcpState,
    tracker::{Alive, Found, KernelSocket, NetnsInfo, Probe, ProbeResult},
};

/// What a worker can be asked.
#[derive(Debug)]
pub enum Job {
    /// Every socket in every namespace (or one), with fd holders: start-up.
    Seed { only: Option<u32> },
    /// Dumps of these namespaces: reconciliation. Without `timewait`, TIME_WAIT mini-sockets
    /// are left out of the dump (the kernel skips them by state before formatting anything):
    /// on a busy client host they are most of the sockets.
    Reconcile {
        namespaces: Vec<u32>,
        timewait: bool,
    },
    /// Exact lookups of mini-sockets: the sweep.
    Probe(Probe),
    /// Who holds each socket's fd now.
    Owners {
        ticket: u64,
        sockets: Vec<(u32, Tuple)>,
    },
    /// A namespace's port range and `tcp_tw_reuse`.
    Settings { netns: u32 },
}

/// The answer to one socket's owner check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// This process holds its fd.
    Process { pid: u32, comm: Comm },
    /// The kernel has it and no process holds it.
    Nobody,
    /// Could not tell (gone, namespace unreachable, /proc unreadable).
    Unknown,
}

/// A reconciliation's dumps.
#[derive(Debug)]
pub struct Dump {
    /// When the first dump started (monotonic ns).
    pub started_ns: u64,
    pub alive: Vec<(u32, Alive)>,
    /// Namespaces that no longer exist.
    pub gone: Vec<u32>,
}

#[derive(Debug)]
pub enum Reply {
    Seeded {
        sockets: Vec<KernelSocket>,
        host: u32,
    },
    Reconciled(Dump),
    Probed(ProbeResult),
    Owners {
        ticket: u64,
        holders: Vec<Holder>,
        /// Processes whose fds could not be read (EMFILE, ...).
        unreadable: u32,
    },
    Settings {
        netns: u32,
        info: Option<NetnsInfo>,
    },
}

/// The pool: `submit` queues a job for the first free worker.
pub struct Workers {
    tx: mpsc::Sender<Job>,
}

impl Workers {
    pub fn spawn(n: usize, replies: UnboundedSender<Reply>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..n.max(1) {
            let rx = Arc::clone(&rx);
            let replies = replies.clone();
            std::thread::Builder::new()
                .name(format!("tcpstate-kt{i}"))
                .spawn(move || worker(&rx, &replies))?;
        }
        Ok(Self { tx })
    }

    /// Queues a job; false when the workers are gone.
    pub fn submit(&self, job: Job) -> bool {
        self.tx.send(job).is_ok()
    }
}

fn worker(rx: &Mutex<mpsc::Receiver<Job>>, replies: &UnboundedSender<Reply>) {
    let mut ns = Namespaces::new();
    loop {
        let job = {
            let Ok(rx) = rx.lock() else { return };
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let reply = match job {
            Job::Seed { only } => seed(&mut ns, only),
            Job::Reconcile {
                namespaces,
                timewait,
            } => reconcile(&mut ns, &namespaces, timewait),
            Job::Probe(p) => Reply::Probed(probe(&mut ns, &p)),
            Job::Owners { ticket, sockets } => owners(&mut ns, ticket, &sockets),
            Job::Settings { netns } => Reply::Settings {
                netns,
                info: settings(&mut ns, netns),
            },
        };
        if replies.send(reply).is_err() {
            return;
        }
    }
}

/// Dumps one namespace; None when it is gone or cannot be read (a namespace that cannot be
/// read is skipped, never judged empty).
fn dump(ns: &mut Namespaces, netns: u32, states: u32) -> Option<Vec<DiagSocket>> {
    let diag = ns.diag(netns).ok()??;
    match diag.dump(states) {
        Ok(v) => Some(v),
        Err(_) => {
            ns.forget(netns);
            None
        }
    }
}

fn kernel_socket(netns: u32, s: &DiagSocket) -> Option<KernelSocket> {
    Some(KernelSocket {
        netns,
        state: TcpState::from_kernel(s.state)?,
        tuple: s.tuple,
        mini: s.is_timewait(),
        request: s.is_request(),
        expires_ms: s.expires_ms,
        owner: None,
    })
}

fn seed(ns: &mut Namespaces, only: Option<u32>) -> Reply {
    let host = ns.home();
    let namespaces: Vec<u32> = match only {
        Some(n) => vec![n],
        None => ns.all(),
    };
    let mut found: Vec<(u32, DiagSocket)> = Vec::new();
    for netns in namespaces {
        if let Some(socks) = dump(ns, netns, ALL_STATES) {
            found.extend(socks.into_iter().map(|s| (netns, s)));
        }
    }
    let inodes: HashSet<u32> = found
        .iter()
        .map(|(_, s)| s.inode)
        .filter(|&i| i != 0)
        .collect();
    let holders = procfs::holders(&inodes);
    let sockets = found
        .iter()
        .filter_map(|(netns, s)| {
            let mut k = kernel_socket(*netns, s)?;
            k.owner = holders
                .by_inode
                .get(&s.inode)
                .and_then(|h| h.first())
                .map(|h| (h.pid, Comm::from_bytes(&h.comm)));
            Some(k)
        })
        .collect();
    Reply::Seeded { sockets, host }
}

fn reconcile(ns: &mut Namespaces, namespaces: &[u32], timewait: bool) -> Reply {
    let states = if timewait {
        ALL_STATES
    } else {
        ALL_STATES & !(1 << 6)
    };
    let started_ns = monotonic_ns();
    let mut alive = Vec::new();
    let mut gone = Vec::new();
    for &netns in namespaces {
        if ns.path(netns).is_none() {
            // Our netlink socket there would keep a deleted namespace alive.
            ns.forget(netns);
            gone.push(netns);
            continue;
        }
        let Some(socks) = dump(ns, netns, states) else {
            continue;
        };
        let mut a = Alive {
            timewait,
            ..Alive::default()
        };
        for s in &socks {
            if let Some(k) = kernel_socket(netns, s) {
                a.insert(&k);
            }
        }
        alive.push((netns, a));
    }
    Reply::Reconciled(Dump {
        started_ns,
        alive,
        gone,
    })
}

/// One exact lookup: what holds the tuple now.
fn found(ns: &mut Namespaces, netns: u32, t: &Tuple) -> Option<Found> {
    let diag = ns.diag(netns).ok()??;
    match diag.lookup(t) {
        Ok(None) => Some(Found::Absent),
        Ok(Some(s)) if s.is_timewait() => TcpState::from_kernel(s.state).map(Found::Mini),
        Ok(Some(_)) => Some(Found::Full),
        Err(_) => {
            ns.forget(netns);
            None
        }
    }
}

/// The sweep's lookups. TIME_WAIT timers fire in the order they were set, so the mini-sockets
/// that are gone are a prefix of the oldest-first list: a binary search finds it with
/// log2(n) + 1 lookups instead of n.
fn probe(ns: &mut Namespaces, p: &Probe) -> ProbeResult {
    let mut r = ProbeResult {
        netns: p.netns,
        done_ns: 0,
        timewait_gone: 0,
        timewait: p.timewait.clone(),
        orphans: Vec::new(),
        netns_gone: false,
    };
    if ns.path(p.netns).is_none() {
        ns.forget(p.netns);
        r.netns_gone = true;
        r.done_ns = monotonic_ns();
        return r;
    }
    let (mut lo, mut hi) = (0, p.timewait.len());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match found(ns, p.netns, &p.timewait[mid]) {
            Some(Found::Mini(TcpState::TimeWait)) => hi = mid,
            Some(_) => lo = mid + 1,
            // Cannot tell: leave the rest for the next sweep.
            None => hi = mid,
        }
    }
    r.timewait_gone = lo;
    for t in &p.orphans {
        if let Some(f) = found(ns, p.netns, t) {
            r.orphans.push((*t, f));
        }
    }
    r.done_ns = monotonic_ns();
    r
}

fn owners(ns: &mut Namespaces, ticket: u64, sockets: &[(u32, Tuple)]) -> Reply {
    let inodes: Vec<Option<u32>> = sockets
        .iter()
        .map(|(netns, t)| {
            let diag = ns.diag(*netns).ok()??;
            diag.lookup(t).ok()?.map(|s| s.inode)
        })
        .collect();
    let wanted: HashSet<u32> = inodes
        .iter()
        .flatten()
        .copied()
        .filter(|&i| i != 0)
        .collect();
    let found = procfs::holders(&wanted);
    let holders = inodes
        .iter()
        .map(|inode| match inode {
            None => Holder::Unknown,
            Some(i) => match found.by_inode.get(i).and_then(|h| h.first()) {
                Some(h) => Holder::Process {
                    pid: h.pid,
                    comm: Comm::from_bytes(&h.comm),
                },
                // Orphaned, unless part of /proc could not be read.
                None if found.unreadable == 0 => Holder::Nobody,
                None => Holder::Unknown,
            },
        })
        .collect();
    Reply::Owners {
        ticket,
        holders,
        unreadable: found.unreadable,
    }
}

/// Settings of `netns` (0: the daemon's own namespace, the default for all).
fn settings(ns: &mut Namespaces, netns: u32) -> Option<NetnsInfo> {
    let netns = if netns == 0 { ns.home() } else { netns };
    let range = ns.sysctl(netns, "/proc/sys/net/ipv4/ip_local_port_range")?;
    let mut it = range.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(lo)), Some(Ok(hi))) = (it.next(), it.next()) else {
        return None;
    };
    let tw_reuse = ns
        .sysctl(netns, "/proc/sys/net/ipv4/tcp_tw_reuse")
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(NetnsInfo::DEFAULT.tw_reuse);
    Some(NetnsInfo {
        ports: (lo.min(hi), hi.max(lo)),
        tw_reuse,
    })
}
