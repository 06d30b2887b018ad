//! Workers that read the kernel's own socket table (sock_diag) and `/proc`, off the event
//! path: seeding, reconciliation, the mini-socket sweep, owner checks and namespace settings.
//! The daemon sends [`Job`]s and gets [`Reply`]s back as messages; nothing here blocks the
//! draining of the rings.

use std::{
    collections::{HashMap, VecDeque},
    sync::mpsc,
    time::Duration,
};

use tokio::sync::mpsc::UnboundedSender;

use crate::{
    clock::monotonic_ns,
    procfs,
    program::Admits as _,
    sockdiag::{ALL_STATES, DiagSocket, Namespaces},
    socket::{Comm, Tuple, Vitals},
    state::TcpState,
    tracker::{
        AcceptQueue, Alive, Found, HostTcp, KernelSocket, Listening, NetnsInfo, Sweep, Swept,
    },
};

/// What a worker can be asked.
#[derive(Debug)]
pub enum Job {
    /// Every socket in every namespace, with fd holders: start-up. The daemon says on
    /// `applied` when it has taken in each [`Reply::SeedPart`].
    Seed {
        applied: std::sync::mpsc::Receiver<()>,
    },
    /// Dumps of these namespaces: reconciliation. Without `timewait`, TIME_WAIT mini-sockets
    /// are left out of the dump (the kernel skips them by state before formatting anything):
    /// on a busy client host they are most of the sockets.
    /// With `everywhere`, every namespace on the host is dumped too: some tracked sockets'
    /// namespace is unknown.
    Reconcile {
        namespaces: Vec<u32>,
        timewait: bool,
        everywhere: bool,
        /// The daemon's port and family filters: what they refuse never enters `Alive`.
        filters: tcpstate_common::Filters,
    },
    /// Exact lookups of the sockets a reconciliation's dumps lacked (namespace 0: look in
    /// every namespace), so a dump that skipped a live socket never removes it.
    Confirm {
        suspects: Vec<(u32, Tuple)>,
        dump_start_ns: u64,
    },
    /// Exact lookups of mini-sockets: the sweep.
    Sweep(Sweep),
    /// Who holds each socket's fd now.
    Owners {
        ticket: u64,
        sockets: Vec<(u32, Tuple)>,
    },
    /// A namespace's port range and `tcp_tw_reuse`.
    /// `walk`: may walk every socket fd to reach a namespace no process is in (the first
    /// ask); a retry only looks where processes and names pin namespaces.
    Settings { netns: u32, walk: bool },
    /// Whether the namespaces whose settings were read are still the ones read (the kernel
    /// gives a destroyed namespace's inode number to the next one made): a stat each. Sorted.
    Moved { namespaces: Vec<u32> },
    /// The listeners of these namespaces and their accept queues.
    Listeners { namespaces: Vec<u32> },
    /// The host's orphan and TCP memory counts, with their limits.
    HostTcp,
}

/// The answer to one socket's owner check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// This process holds its fd; `cgroup` is its own, from `/proc/PID/cgroup`. `others`
    /// hold it too (after a fork, or an fd passed): the lowest pid is named first.
    Process {
        pid: u32,
        comm: Comm,
        cgroup: Option<String>,
        others: Vec<(u32, Comm)>,
    },
    /// The kernel has it and no process holds it.
    Nobody,
    /// No process ever accepted it: it waits in the accept queue of a listener held by
    /// `listener` (None: nobody holds the listener's fd either).
    AcceptQueue {
        listener: Option<(u32, Comm)>,
        queue: AcceptQueue,
    },
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
    /// Every namespace on the host (that a process is in or `/run/netns` names) was dumped:
    /// a socket in none of them is gone.
    pub complete: bool,
}

/// What the exact lookups of a reconciliation's suspects found.
#[derive(Debug)]
pub struct Confirmed {
    /// The dump they come from: only sockets unchanged since it are judged.
    pub dump_start_ns: u64,
    /// When the lookups were done: applied once every event before then is.
    pub done_ns: u64,
    /// What holds each suspect's tuple now (a suspect whose lookup failed is left out).
    pub found: Vec<(u32, Tuple, Found)>,
}

#[derive(Debug)]
pub enum Reply {
    /// Part of the start-up snapshot; more follows.
    SeedPart {
        sockets: Vec<KernelSocket>,
    },
    /// How many TIME_WAIT mini-sockets the parts to come hold per namespace, about (the
    /// kernel's count).
    SeedExpects {
        timewait: Vec<(u32, usize)>,
    },
    /// The last part of the start-up snapshot.
    Seeded {
        sockets: Vec<KernelSocket>,
    },
    Reconciled(Dump),
    Confirmed(Confirmed),
    Swept(Swept),
    Owners {
        ticket: u64,
        holders: Vec<Holder>,
        /// Each socket's vital signs, when the kernel had them.
        vitals: Vec<Option<Vitals>>,
        /// Processes whose fds could not be read (EMFILE, ...).
        unreadable: u32,
    },
    Settings {
        netns: u32,
        info: Option<NetnsInfo>,
    },
    HostTcp(Option<HostTcp>),
    /// The namespaces of a [`Job::Moved`] whose number names another namespace now, and that
    /// one's settings when they could be read.
    Moved(Vec<(u32, Option<NetnsInfo>)>),
    Listeners {
        /// When the first dump started (monotonic ns).
        at_ns: u64,
        /// The namespaces read (one that could not be read is left out, not judged empty).
        namespaces: Vec<u32>,
        listeners: Vec<Listening>,
    },
}

/// Which worker thread a job waits for. A dump of a namespace with tens of thousands of
/// sockets (or of a thousand namespaces) takes seconds; an owner check or a sweep takes
/// milliseconds. In one queue the quick jobs waited behind the dumps: on a busy host anomalies
/// were named by a guess instead of the fd, and TIME_WAIT sockets the kernel had freed stayed
/// counted until their sweep came through. Each lane is served in order by its own thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Whole-table dumps: seed, reconciliation, listener polls.
    Dumps = 0,
    /// Exact lookups and small reads: the mini-socket sweep, a reconciliation's confirmations,
    /// a namespace's settings, the host's TCP counts. Reaching a namespace no process is in
    /// walks every socket fd on the host, so these are not where owner checks wait.
    Lookups = 1,
    /// Owner checks: an anomaly is not reported until its check answers.
    Quick = 2,
}

impl Lane {
    const ALL: [Lane; 3] = [Lane::Dumps, Lane::Lookups, Lane::Quick];

    fn name(self) -> &'static str {
        match self {
            Lane::Dumps => "tcpstate-dumps",
            Lane::Lookups => "tcpstate-lookup",
            Lane::Quick => "tcpstate-owners",
        }
    }
}

impl Job {
    pub fn lane(&self) -> Lane {
        match self {
            Job::Seed { .. } | Job::Reconcile { .. } | Job::Listeners { .. } => Lane::Dumps,
            Job::Confirm { .. }
            | Job::Sweep(_)
            | Job::Settings { .. }
            | Job::Moved { .. }
            | Job::HostTcp => Lane::Lookups,
            Job::Owners { .. } => Lane::Quick,
        }
    }
}

/// The workers: one thread per [`Lane`], each with its own queue.
pub struct Workers {
    lanes: [mpsc::Sender<Job>; 3],
}

impl Workers {
    pub fn spawn(replies: &UnboundedSender<Reply>) -> std::io::Result<Self> {
        let spawn_lane = |lane: Lane| -> std::io::Result<mpsc::Sender<Job>> {
            let (tx, rx) = mpsc::channel::<Job>();
            let replies = replies.clone();
            std::thread::Builder::new()
                .name(lane.name().to_owned())
                .spawn(move || worker(&rx, &replies))?;
            Ok(tx)
        };
        let [a, b, c] = Lane::ALL;
        Ok(Self {
            lanes: [spawn_lane(a)?, spawn_lane(b)?, spawn_lane(c)?],
        })
    }

    /// Queues a job on its lane; false when its worker is gone.
    pub fn submit(&self, job: Job) -> bool {
        self.lanes[job.lane() as usize].send(job).is_ok()
    }
}

fn worker(rx: &mpsc::Receiver<Job>, replies: &UnboundedSender<Reply>) {
    let mut ns = Namespaces::new();
    // Jobs taken off the queue while gathering owner checks, run next in their order.
    let mut next: VecDeque<Job> = VecDeque::new();
    loop {
        let job = match next.pop_front() {
            Some(job) => job,
            // A lane may get no job for a long while (no listener left to poll): it still
            // lets go of namespaces that are gone or emptied, every few seconds.
            None => match rx.recv_timeout(crate::sockdiag::netns::PRUNE_EVERY) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    ns.prune();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            },
        };
        ns.prune();
        let out = match job {
            Job::Owners { ticket, sockets } => {
                let mut checks = vec![(ticket, sockets)];
                while let Ok(job) = rx.try_recv() {
                    match job {
                        Job::Owners { ticket, sockets } => checks.push((ticket, sockets)),
                        other => next.push_back(other),
                    }
                }
                owners(&mut ns, checks)
            }
            other => vec![run(&mut ns, other, replies)],
        };
        for reply in out {
            if replies.send(reply).is_err() {
                return;
            }
        }
    }
}

fn run(ns: &mut Namespaces, job: Job, replies: &UnboundedSender<Reply>) -> Reply {
    match job {
        Job::Seed { applied } => seed(ns, replies, &applied),
        Job::Reconcile {
            namespaces,
            timewait,
            everywhere,
            filters,
        } => reconcile(ns, namespaces, (timewait, everywhere), filters),
        Job::Confirm {
            suspects,
            dump_start_ns,
        } => Reply::Confirmed(confirm(ns, &suspects, dump_start_ns)),
        Job::Sweep(p) => Reply::Swept(sweep(ns, p)),
        Job::Owners { ticket, sockets } => {
            owners(ns, vec![(ticket, sockets)])
                .pop()
                .unwrap_or(Reply::Owners {
                    ticket,
                    holders: Vec::new(),
                    vitals: Vec::new(),
                    unreadable: 0,
                })
        }
        Job::Settings { netns, walk } => Reply::Settings {
            netns,
            info: settings(ns, netns, walk),
        },
        Job::Moved { namespaces } => {
            let moved = ns.moved_among(&namespaces);
            Reply::Moved(
                moved
                    .into_iter()
                    .map(|n| (n, settings(ns, n, false)))
                    .collect(),
            )
        }
        Job::Listeners { namespaces } => listeners(ns, &namespaces),
        Job::HostTcp => Reply::HostTcp(host_tcp()),
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

/// [`dump`], each socket to `each` as it is parsed; false when the namespace is gone or cannot
/// be read (what `each` saw then is not a whole dump).
fn dump_each(ns: &mut Namespaces, netns: u32, states: u32, each: impl FnMut(DiagSocket)) -> bool {
    let Some(diag) = ns.diag(netns).ok().flatten() else {
        return false;
    };
    if diag.dump_each(states, each).is_err() {
        ns.forget(netns);
        return false;
    }
    true
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
        cgroup: s.cgroup,
    })
}

/// TIME_WAIT mini-sockets sent to the daemon at a time during the start-up snapshot.
const SEED_PART: usize = 16_384;

/// The start-up snapshot, in parts: full sockets (listeners among them) with their holders
/// first, then TIME_WAIT mini-sockets in parts of [`SEED_PART`] as they are dumped, then
/// [`Reply::Seeded`]. A busy client host has a million mini-sockets: held all at once beside
/// the table being built from them, they were most of the daemon's start-up peak (21.10).
/// Full sockets are dumped first, so one that enters TIME_WAIT between the dumps is in both
/// (its event then finds it), never in neither.
/// A part is sent only once the daemon has taken in the one before (`applied`): dumped
/// faster than the table took them in, parts queued up to 35 MB beside it at a million.
fn seed(
    ns: &mut Namespaces,
    replies: &UnboundedSender<Reply>,
    applied: &std::sync::mpsc::Receiver<()>,
) -> Reply {
    const TIME_WAIT: u32 = 1 << TcpState::TimeWait as u32;
    let mut sockets: Vec<KernelSocket> = Vec::new();
    let mut inodes: Vec<(usize, u32)> = Vec::new();
    let namespaces = ns.all();
    for &netns in &namespaces {
        let (from, inodes_from) = (sockets.len(), inodes.len());
        let whole = dump_each(ns, netns, ALL_STATES & !TIME_WAIT, |s| {
            if let Some(k) = kernel_socket(netns, &s) {
                if s.inode != 0 {
                    inodes.push((sockets.len(), s.inode));
                }
                sockets.push(k);
            }
        });
        if !whole {
            // A namespace that could not be read is skipped, never taken in part.
            sockets.truncate(from);
            inodes.truncate(inodes_from);
        }
    }
    let holders = procfs::holders_of(inodes.iter().map(|&(_, inode)| inode));
    for &(i, inode) in &inodes {
        if let Some(k) = sockets.get_mut(i) {
            k.owner = holders.first(inode);
        }
    }
    drop((holders, inodes));
    if replies.send(Reply::SeedPart { sockets }).is_err() {
        return Reply::Seeded {
            sockets: Vec::new(),
        };
    }
    let timewait: Vec<(u32, usize)> = namespaces
        .iter()
        .filter_map(|&n| Some((n, timewait_count(ns, n)?)))
        .collect();
    let _ = replies.send(Reply::SeedExpects { timewait });
    let mut part: Vec<KernelSocket> = Vec::new();
    // The full sockets' part is out and not yet taken in.
    let mut unapplied = 1;
    for netns in namespaces {
        // A namespace whose dump fails midway keeps the parts already sent: unlike full
        // sockets, a mini-socket is harmless to hold (its sweep finds it gone).
        dump_each(ns, netns, TIME_WAIT, |s| {
            if let Some(k) = kernel_socket(netns, &s) {
                part.push(k);
            }
            if part.len() >= SEED_PART {
                // The dump waits in the kernel meanwhile (its position is kept between reads).
                while unapplied > 0 && applied.recv().is_ok() {
                    unapplied -= 1;
                }
                let _ = replies.send(Reply::SeedPart {
                    sockets: std::mem::take(&mut part),
                });
                unapplied += 1;
            }
        });
    }
    Reply::Seeded { sockets: part }
}

/// A namespace's TIME_WAIT count (`tw` in its `/proc/net/sockstat`).
fn timewait_count(ns: &mut Namespaces, netns: u32) -> Option<usize> {
    let text = ns.proc_net(netns, "sockstat")?;
    let tcp = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = tcp.split_whitespace();
    words.find(|w| *w == "tw")?;
    words.next()?.parse().ok()
}

fn reconcile(
    ns: &mut Namespaces,
    mut namespaces: Vec<u32>,
    (timewait, everywhere): (bool, bool),
    filters: tcpstate_common::Filters,
) -> Reply {
    let states = if timewait {
        ALL_STATES
    } else {
        ALL_STATES & !(1 << 6)
    };
    let started_ns = monotonic_ns();
    // Listed before the first dump starts, so a namespace made during the dumps has no
    // socket older than `started_ns` to hide.
    let host = if everywhere { ns.all() } else { Vec::new() };
    let mut complete = everywhere;
    namespaces.extend(&host);
    namespaces.sort_unstable();
    namespaces.dedup();
    let mut alive = Vec::new();
    let mut gone = Vec::new();
    for netns in namespaces {
        if ns.path(netns).is_none() {
            // Our netlink socket there would keep a deleted namespace alive.
            ns.forget(netns);
            gone.push(netns);
            continue;
        }
        let mut a = Alive {
            timewait,
            adopt_timewait: true,
            ..Alive::default()
        };
        let mut any_full = false;
        // Streamed straight into `Alive`: at a million TIME_WAIT a list of the dump alongside
        // it doubled the peak (issue 21.10).
        let dumped = dump_each(ns, netns, states, |s| {
            any_full |= !s.is_timewait() && !s.is_request();
            if filters.admits_tuple(&s.tuple)
                && let Some(k) = kernel_socket(netns, &s)
            {
                a.insert(&k);
            }
        });
        if !dumped {
            complete = false;
            continue;
        }
        a.minis.seal();
        if ns.is_held(netns) && !any_full {
            // Reached only through a socket's fd, and that socket is gone: our fd alone keeps
            // the namespace alive. Let it go; it dies with its mini-sockets.
            ns.release_if_held(netns);
            gone.push(netns);
            continue;
        }
        alive.push((netns, a));
    }
    Reply::Reconciled(Dump {
        started_ns,
        alive,
        gone,
        complete,
    })
}

/// Looks up each suspect exactly. For one of unknown namespace, the strongest holder any
/// namespace has (a full socket, else a mini-socket, else none), judged only when every
/// namespace answered; one whose lookup failed is not judged.
fn confirm(ns: &mut Namespaces, suspects: &[(u32, Tuple)], dump_start_ns: u64) -> Confirmed {
    let everywhere = if suspects.iter().any(|&(n, _)| n == 0) {
        ns.all()
    } else {
        Vec::new()
    };
    let found = suspects
        .iter()
        .filter_map(|&(netns, t)| {
            let f = if netns == 0 {
                let mut strongest = Found::Absent;
                for &n in &everywhere {
                    match found(ns, n, &t)? {
                        Found::Full => return Some((netns, t, Found::Full)),
                        Found::Absent => {}
                        mini @ Found::Mini(_) => strongest = mini,
                    }
                }
                strongest
            } else {
                found(ns, netns, &t)?
            };
            Some((netns, t, f))
        })
        .collect();
    Confirmed {
        dump_start_ns,
        done_ns: monotonic_ns(),
        found,
    }
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
fn sweep(ns: &mut Namespaces, p: Sweep) -> Swept {
    let mut r = Swept {
        netns: p.netns,
        done_ns: 0,
        timewait_gone: 0,
        timewait: p.timewait,
        orphans: Vec::new(),
        netns_gone: false,
    };
    // Taken before the look: what entered a state after it belongs to a namespace made since
    // (which may have been given the number), never to the one found gone.
    let looked_ns = monotonic_ns();
    if ns.path(p.netns).is_none() {
        ns.forget(p.netns);
        r.netns_gone = true;
        r.done_ns = looked_ns;
        return r;
    }
    let (mut lo, mut hi) = (0, r.timewait.len());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match found(ns, p.netns, &r.timewait[mid]) {
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

/// What an owner check found in the kernel's table.
enum Looked {
    /// Could not tell.
    Unknown,
    /// The socket, by inode (0: it has no file).
    Socket(u32),
    /// Never accepted: it waits in this listener's accept queue.
    Queued(Listener),
}

#[derive(Clone, Copy)]
struct Listener {
    inode: u32,
    queue: AcceptQueue,
}

/// A socket no file refers to, in a state only `close()` leaves (ESTABLISHED, CLOSE_WAIT): no
/// process ever accepted it, so it still sits in its listener's accept queue. (An
/// application's `close()` moves a socket to FIN_WAIT1 or LAST_ACK, never leaves it in one of
/// these. SYN_RECV without a file is a request socket, not yet queued.)
fn unaccepted(s: &DiagSocket) -> bool {
    s.inode == 0
        && !s.is_timewait()
        && matches!(
            TcpState::from_kernel(s.state),
            Some(TcpState::Established | TcpState::CloseWait)
        )
}

/// Which listener a never-accepted socket waits on.
enum QueuedOn {
    Listener(Listener),
    /// Several SO_REUSEPORT listeners could hold it (sock_diag does not say which queued it):
    /// naming one would be a guess.
    Ambiguous,
    None,
}

/// The listener a passive socket came from: its local port, and its address or a wildcard
/// (an exact address wins, as in the kernel's own lookup). Of several SO_REUSEPORT listeners,
/// the one whose accept queue holds anything: the socket waits in some queue, so a listener
/// with an empty queue is not it. Several non-empty ones are ambiguous.
fn listener_of(listeners: &[DiagSocket], t: &Tuple) -> QueuedOn {
    let scored: Vec<(u8, &DiagSocket)> = listeners
        .iter()
        .filter(|l| l.tuple.sport == t.sport)
        .filter_map(|l| {
            let addr = l.tuple.saddr();
            let score = if addr == t.saddr() {
                2
            } else if addr.is_unspecified() {
                1
            } else {
                return None;
            };
            Some((score, l))
        })
        .collect();
    let Some(best) = scored.iter().map(|(s, _)| *s).max() else {
        return QueuedOn::None;
    };
    let candidates: Vec<&DiagSocket> = scored
        .iter()
        .filter(|(s, _)| *s == best)
        .map(|(_, l)| *l)
        .collect();
    let pick = match candidates[..] {
        [only] => only,
        _ => {
            let mut queued = candidates.iter().filter(|l| l.rqueue > 0);
            match (queued.next(), queued.next()) {
                (Some(l), None) => l,
                _ => return QueuedOn::Ambiguous,
            }
        }
    };
    QueuedOn::Listener(Listener {
        inode: pick.inode,
        queue: accept_queue(pick),
    })
}

fn accept_queue(l: &DiagSocket) -> AcceptQueue {
    AcceptQueue {
        queue: l.rqueue,
        backlog: l.wqueue,
        drops: l.drops,
    }
}

/// One socket's lookup, with its vital signs; `listeners` caches each namespace's LISTEN dump
/// for the job.
fn look(
    ns: &mut Namespaces,
    listeners: &mut HashMap<u32, Vec<DiagSocket>>,
    netns: u32,
    t: &Tuple,
    vitals: &mut Option<Vitals>,
) -> Looked {
    let Some((s, v)) = ns
        .diag(netns)
        .ok()
        .flatten()
        .and_then(|d| d.lookup_vitals(t).ok().flatten())
    else {
        return Looked::Unknown;
    };
    *vitals = v;
    if !unaccepted(&s) {
        return Looked::Socket(s.inode);
    }
    let ls = listeners
        .entry(netns)
        .or_insert_with(|| dump(ns, netns, LISTEN).unwrap_or_default());
    match listener_of(ls, &s.tuple) {
        QueuedOn::Listener(l) => Looked::Queued(l),
        QueuedOn::Ambiguous => Looked::Unknown,
        QueuedOn::None => Looked::Socket(0),
    }
}

/// A listener's own lookup (its remote end a wildcard): exact lookups never return listeners,
/// so it is found in the namespace's LISTEN dump.
fn look_listener(
    ns: &mut Namespaces,
    listeners: &mut HashMap<u32, Vec<DiagSocket>>,
    netns: u32,
    t: &Tuple,
) -> Looked {
    let ls = listeners
        .entry(netns)
        .or_insert_with(|| dump(ns, netns, LISTEN).unwrap_or_default());
    ls.iter()
        .find(|l| l.tuple == *t)
        .map_or(Looked::Unknown, |l| Looked::Socket(l.inode))
}

const LISTEN: u32 = 1 << TcpState::Listen as u32;

/// The host's FIN_WAIT2 timeout (`tcp_fin_timeout`), 60s (the kernel's default) when it
/// cannot be read. Here, not beside the thresholds it sets: the tracker reads no files.
pub fn host_fin_timeout() -> Duration {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fin_timeout")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(60), Duration::from_secs)
}

/// Host-wide counts: `tcp_max_orphans` and `tcp_mem` exist only in the first namespace, and
/// sockstat's orphan and memory counts are global. Read from this thread's namespace, the
/// daemon's own (the host's, as a service).
fn host_tcp() -> Option<HostTcp> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    HostTcp::parse(
        &read("/proc/net/sockstat")?,
        &read("/proc/sys/net/ipv4/tcp_max_orphans")?,
        &read("/proc/sys/net/ipv4/tcp_mem")?,
    )
}

fn listeners(ns: &mut Namespaces, namespaces: &[u32]) -> Reply {
    let at_ns = monotonic_ns();
    let mut read = Vec::new();
    let mut out = Vec::new();
    for &netns in namespaces {
        let Some(ls) = dump(ns, netns, LISTEN) else {
            continue;
        };
        read.push(netns);
        out.extend(ls.iter().map(|l| Listening {
            netns,
            tuple: l.tuple,
            queue: accept_queue(l),
        }));
    }
    Reply::Listeners {
        at_ns,
        namespaces: read,
        listeners: out,
    }
}

/// Owner checks, several tickets at once: every socket is looked up, then one walk of `/proc`
/// answers them all. The walk is the cost (every fd of every process: 0.1 s with 40k socket
/// fds), so checks that queued up while one ran share the next walk instead of each waiting
/// for a walk of its own.
fn owners(ns: &mut Namespaces, checks: Vec<(u64, Vec<(u32, Tuple)>)>) -> Vec<Reply> {
    let mut listeners = HashMap::new();
    let looked: Vec<(u64, Vec<Looked>, Vec<Option<Vitals>>)> = checks
        .into_iter()
        .map(|(ticket, sockets)| {
            let mut vitals = vec![None; sockets.len()];
            let looked = sockets
                .iter()
                .zip(vitals.iter_mut())
                .map(|((netns, t), v)| {
                    if t.dport == 0 && t.daddr().is_unspecified() {
                        look_listener(ns, &mut listeners, *netns, t)
                    } else {
                        look(ns, &mut listeners, *netns, t, v)
                    }
                })
                .collect();
            (ticket, looked, vitals)
        })
        .collect();
    let found = procfs::holders_of(
        looked
            .iter()
            .flat_map(|(_, l, _)| l)
            .filter_map(|l| match l {
                Looked::Socket(i) => Some(*i),
                Looked::Queued(l) => Some(l.inode),
                Looked::Unknown => None,
            }),
    );
    let holder_of = |inode: u32| found.first(inode);
    let holder = |l: &Looked| match *l {
        Looked::Unknown => Holder::Unknown,
        Looked::Socket(i) => match holder_of(i) {
            Some((pid, comm)) => Holder::Process {
                pid,
                comm,
                cgroup: crate::workload::cgroup_of_pid(pid),
                others: found.others(i),
            },
            // Orphaned, unless part of /proc could not be read.
            None if found.unreadable == 0 => Holder::Nobody,
            None => Holder::Unknown,
        },
        Looked::Queued(l) => Holder::AcceptQueue {
            listener: holder_of(l.inode),
            queue: l.queue,
        },
    };
    looked
        .into_iter()
        .map(|(ticket, looked, vitals)| Reply::Owners {
            ticket,
            holders: looked.iter().map(holder).collect(),
            vitals,
            unreadable: found.unreadable,
        })
        .collect()
}

/// Settings of `netns` (0: the daemon's own namespace, the default for all).
fn settings(ns: &mut Namespaces, netns: u32, walk: bool) -> Option<NetnsInfo> {
    let netns = if netns == 0 { ns.home() } else { netns };
    let range = ns.sysctl(netns, "/proc/sys/net/ipv4/ip_local_port_range", walk)?;
    let mut it = range.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(lo)), Some(Ok(hi))) = (it.next(), it.next()) else {
        return None;
    };
    let tw_reuse = ns
        .sysctl(netns, "/proc/sys/net/ipv4/tcp_tw_reuse", false)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(NetnsInfo::DEFAULT.tw_reuse);
    Some(NetnsInfo {
        ports: (lo.min(hi), hi.max(lo)),
        tw_reuse,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_never_waits_behind_a_dump() {
        let t = Tuple::new(
            "10.0.0.1".parse().expect("addr"),
            1,
            "10.0.0.2".parse().expect("addr"),
            2,
        );
        let dumps = [
            Job::Seed {
                applied: std::sync::mpsc::channel().1,
            },
            Job::Listeners { namespaces: vec![] },
            Job::Reconcile {
                namespaces: vec![],
                timewait: true,
                everywhere: true,
                filters: tcpstate_common::Filters::default(),
            },
        ];
        let lookups = [
            Job::Sweep(Sweep::default()),
            Job::Settings {
                netns: 1,
                walk: true,
            },
            Job::HostTcp,
        ];
        assert!(dumps.iter().all(|j| j.lane() == Lane::Dumps));
        assert!(lookups.iter().all(|j| j.lane() == Lane::Lookups));
        let check = Job::Owners {
            ticket: 1,
            sockets: vec![(1, t)],
        };
        assert_eq!(check.lane(), Lane::Quick);
    }

    fn listener(addr: &str, port: u16, inode: u32) -> DiagSocket {
        let any = if addr.contains(':') { "::" } else { "0.0.0.0" };
        DiagSocket {
            drops: 0,
            cgroup: 0,
            state: TcpState::Listen as u8,
            tuple: Tuple::new(
                addr.parse().expect("addr"),
                port,
                any.parse().expect("any"),
                0,
            ),
            timer: 0,
            expires_ms: 0,
            rqueue: 1,
            wqueue: 4,
            inode,
            uid: 0,
        }
    }

    fn child(addr: &str, port: u16) -> Tuple {
        Tuple::new(
            addr.parse().expect("addr"),
            port,
            addr.parse().expect("addr"),
            40000,
        )
    }

    #[test]
    fn the_listener_is_found_by_port_with_an_exact_address_first() {
        let ls = [
            listener("0.0.0.0", 80, 1),
            listener("10.0.0.1", 80, 2),
            listener("10.0.0.1", 81, 3),
        ];
        let inode = |t: &Tuple| match listener_of(&ls, t) {
            QueuedOn::Listener(l) => Some(l.inode),
            _ => None,
        };
        assert_eq!(inode(&child("10.0.0.1", 80)), Some(2));
        assert_eq!(inode(&child("10.0.0.2", 80)), Some(1), "the wildcard");
        assert_eq!(inode(&child("10.0.0.2", 81)), None, "bound elsewhere");
        assert_eq!(inode(&child("10.0.0.1", 82)), None);
        let v6 = [listener("::", 443, 9)];
        let QueuedOn::Listener(l) = listener_of(&v6, &child("::ffff:10.0.0.1", 443)) else {
            panic!("a dual-stack listener's v4-mapped child");
        };
        assert_eq!((l.inode, l.queue.queue, l.queue.backlog), (9, 1, 4));
    }

    /// Issue 20.4: of SO_REUSEPORT listeners, the one whose queue holds something; never a
    /// guess between several.
    #[test]
    fn of_reuseport_listeners_the_one_with_a_queue_or_none() {
        let empty = |inode| DiagSocket {
            rqueue: 0,
            ..listener("0.0.0.0", 80, inode)
        };
        let ls = [empty(1), listener("0.0.0.0", 80, 2), empty(3)];
        assert!(matches!(
            listener_of(&ls, &child("10.0.0.1", 80)),
            QueuedOn::Listener(Listener { inode: 2, .. })
        ));
        let ls = [listener("0.0.0.0", 80, 1), listener("0.0.0.0", 80, 2)];
        assert!(matches!(
            listener_of(&ls, &child("10.0.0.1", 80)),
            QueuedOn::Ambiguous
        ));
    }

    #[test]
    fn only_a_fileless_socket_in_a_state_close_would_leave_is_unaccepted() {
        let mut s = listener("127.0.0.1", 80, 0);
        for (st, want) in [
            (TcpState::Established, true),
            (TcpState::CloseWait, true),
            (TcpState::SynRecv, false),
            (TcpState::FinWait1, false),
            (TcpState::LastAck, false),
            (TcpState::Listen, false),
        ] {
            s.state = st as u8;
            assert_eq!(unaccepted(&s), want, "{st:?}");
        }
        s.state = TcpState::CloseWait as u8;
        s.inode = 7;
        assert!(!unaccepted(&s), "held by a file");
    }
}
