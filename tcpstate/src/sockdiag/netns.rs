//! Network namespaces: which exist, and running sock_diag inside one. A netlink socket stays
//! bound to the namespace it was created in, so a worker thread enters a namespace only to
//! open its socket (and to read its sysctls), then returns to its own.

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use super::proto::Diag;

fn with_context(e: io::Error, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Inode of the network namespace of the current thread.
pub fn current_netns() -> io::Result<u32> {
    let md = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|e| with_context(e, "stat /proc/thread-self/ns/net"))?;
    u32::try_from(md.ino()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("netns inode {} does not fit in 32 bits", md.ino()),
        )
    })
}

/// Whether `path` opens a network namespace (an nsfs file whose type is CLONE_NEWNET).
pub fn is_netns(path: &Path) -> io::Result<u32> {
    let f = File::open(path)?;
    // NS_GET_NSTYPE = _IO(0xb7, 0x3)
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an ioctl without arguments on an fd we own.
    let ty = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE) };
    if ty != libc::CLONE_NEWNET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a network namespace",
        ));
    }
    let ino = f.metadata()?.ino();
    u32::try_from(ino).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "inode too large"))
}

/// Runs `f` with the calling thread inside the namespace `path` opens, then moves it back.
/// Meant for worker threads: nothing else may run on the thread meanwhile.
pub fn within<T>(path: &Path, f: impl FnOnce() -> T) -> io::Result<T> {
    let target = File::open(path)
        .map_err(|e| with_context(e, format!("opening netns {}", path.display())))?;
    let home = File::open("/proc/thread-self/ns/net")
        .map_err(|e| with_context(e, "opening /proc/thread-self/ns/net"))?;
    // SAFETY: setns on an fd we own; it affects only this thread.
    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(with_context(
            io::Error::last_os_error(),
            format!("setns into {}", path.display()),
        ));
    }
    let out = f();
    // SAFETY: as above; returning to where this thread was.
    if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        // The thread is now in the wrong namespace: nothing sane can follow.
        return Err(with_context(
            io::Error::last_os_error(),
            "setns back to the daemon's namespace",
        ));
    }
    Ok(out)
}

/// Map of netns inode -> a path that opens it, one per inode, for every network namespace some
/// process is in (as `/proc/PID/ns/net`) and every named namespace under `/run/netns/*`. A
/// named namespace is given by its `/run/netns` path, which stays valid when processes exit.
/// Processes that vanish or deny access are skipped.
pub fn all_netns() -> HashMap<u32, PathBuf> {
    let mut map = HashMap::new();
    // nsfs has a single superblock: a /run/netns entry whose device differs is a stale file
    // (namespace no longer mounted there), not a namespace.
    let nsfs_dev = std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| m.dev());
    let add = |path: PathBuf, map: &mut HashMap<u32, PathBuf>| {
        let Ok(md) = std::fs::metadata(&path) else {
            return;
        };
        if nsfs_dev.is_some_and(|dev| dev != md.dev()) {
            return;
        }
        if let Ok(ino) = u32::try_from(md.ino()) {
            map.entry(ino).or_insert(path);
        }
    };
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        let mut names: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        names.sort();
        for p in names {
            add(p, &mut map);
        }
    }
    for pid in crate::procfs::pids() {
        add(PathBuf::from(format!("/proc/{pid}/ns/net")), &mut map);
    }
    map
}

/// A namespace no process is in and no name pins, reached through a socket of it that some
/// process holds (an fd passed over SCM_RIGHTS outlives the last process of its namespace).
/// Each socket fd on the host is duplicated (`pidfd_getfd`) and asked for its namespace
/// (`SIOCGSKNS`) until one is in `netns`; at most `budget` sockets are asked. Returns an fd
/// of the namespace.
pub fn netns_via_sockets(netns: u32, budget: usize) -> Option<File> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    const SIOCGSKNS: libc::c_ulong = 0x894C;
    let mut asked = 0;
    for pid in crate::procfs::pids() {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let fds: Vec<i32> = dir
            .flatten()
            .filter(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|t| t.to_str().and_then(crate::procfs::socket_inode).is_some())
            })
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        if fds.is_empty() {
            continue;
        }
        // SAFETY: pidfd_open takes a pid and flags; the result is checked.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let Ok(pidfd) = i32::try_from(pidfd) else {
            continue;
        };
        if pidfd < 0 {
            continue;
        }
        // SAFETY: a new fd we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        for fd in fds {
            if asked >= budget {
                return None;
            }
            asked += 1;
            // SAFETY: pidfd_getfd duplicates the target's fd into ours; checked below.
            let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
            let Ok(dup) = i32::try_from(dup) else {
                continue;
            };
            if dup < 0 {
                continue;
            }
            // SAFETY: a new fd we own.
            let sock = unsafe { OwnedFd::from_raw_fd(dup) };
            // SAFETY: SIOCGSKNS takes no argument and returns a new fd, checked below.
            let ns = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGSKNS) };
            if ns < 0 {
                continue;
            }
            // SAFETY: a new fd we own.
            let ns = File::from(unsafe { OwnedFd::from_raw_fd(ns) });
            if ns
                .metadata()
                .is_ok_and(|m| u32::try_from(m.ino()).ok() == Some(netns))
            {
                return Some(ns);
            }
        }
    }
    None
}

/// One worker's view of the namespaces: how to open each, and a sock_diag socket per
/// namespace, opened on first use.
pub struct Namespaces {
    home: u32,
    paths: HashMap<u32, PathBuf>,
    sockets: HashMap<u32, Diag>,
    /// Namespaces reached only through a socket's fd ([`netns_via_sockets`]): our fd of each.
    /// It keeps the namespace alive, so it is let go as soon as the namespace holds no full
    /// socket ([`Self::release_if_held`]).
    held: HashMap<u32, File>,
    /// When cached sockets were last checked against their namespaces.
    pruned: std::time::Instant,
    /// When every process's namespace was last looked at ([`all_netns`]), for
    /// [`Self::pinned_path`].
    walked: Option<std::time::Instant>,
    /// Namespaces [`Self::moved`] found no path to, and when: looked for again only after
    /// [`MOVED_RETRY`], so one that lives on unpinned costs no walk of `/proc` per check.
    unpinned: HashMap<u32, std::time::Instant>,
}

/// How long a namespace [`Namespaces::moved`] could not find is left before it is looked for
/// again.
const MOVED_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Namespaces reached through sockets' fds held at once.
const MAX_HELD: usize = 64;
/// Socket fds asked for their namespace when one is looked for that way.
const SOCKETS_ASKED: usize = 200_000;
/// How often cached sockets are checked for namespaces that are gone.
pub const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Namespaces whose sockets are kept open at once; past this the least useful are closed (a
/// host with thousands of containers must not hold thousands of netlink sockets per worker).
const MAX_OPEN: usize = 256;

impl Namespaces {
    pub fn new() -> Self {
        Self {
            home: current_netns().unwrap_or(0),
            paths: HashMap::new(),
            sockets: HashMap::new(),
            held: HashMap::new(),
            pruned: std::time::Instant::now(),
            walked: None,
            unpinned: HashMap::new(),
        }
    }

    pub fn home(&self) -> u32 {
        self.home
    }

    /// Every namespace on the host now (those reached through sockets' fds included).
    pub fn all(&mut self) -> Vec<u32> {
        self.paths = all_netns();
        self.paths
            .insert(self.home, PathBuf::from("/proc/thread-self/ns/net"));
        for (&n, f) in &self.held {
            self.paths
                .entry(n)
                .or_insert_with(|| PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())));
        }
        let mut v: Vec<u32> = self.paths.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// The path of `netns` already known and still naming it.
    fn known_path(&self, netns: u32) -> Option<PathBuf> {
        if netns == self.home {
            return Some(PathBuf::from("/proc/thread-self/ns/net"));
        }
        let still = |p: &PathBuf| {
            std::fs::metadata(p).is_ok_and(|m| u32::try_from(m.ino()).ok() == Some(netns))
        };
        self.paths.get(&netns).filter(|p| still(p)).cloned()
    }

    /// The path of `netns` if a process is in it, a name pins it, or we already hold it: never
    /// a walk of every socket fd. Processes are looked at again at most every 100 ms, so asking
    /// for many namespaces at once costs one walk of `/proc`.
    pub fn pinned_path(&mut self, netns: u32) -> Option<PathBuf> {
        if let Some(p) = self.known_path(netns) {
            return Some(p);
        }
        let fresh = self
            .walked
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_millis(100));
        if !fresh {
            self.paths = all_netns();
            self.walked = Some(std::time::Instant::now());
            for (n, f) in &self.held {
                self.paths.insert(
                    *n,
                    PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())),
                );
            }
        }
        self.paths.get(&netns).cloned()
    }

    /// The path that opens `netns`, looking again when it is not known (None: it is gone).
    pub fn path(&mut self, netns: u32) -> Option<PathBuf> {
        if let Some(p) = self.known_path(netns) {
            return Some(p);
        }
        self.paths = all_netns();
        if let Some(p) = self.paths.get(&netns) {
            return Some(p.clone());
        }
        // No process is in it and no name pins it; a socket of it may still be held.
        if !self.held.contains_key(&netns) {
            if self.held.len() >= MAX_HELD {
                return None;
            }
            let f = netns_via_sockets(netns, SOCKETS_ASKED)?;
            self.held.insert(netns, f);
        }
        let f = self.held.get(&netns)?;
        let p = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
        self.paths.insert(netns, p.clone());
        Some(p)
    }

    /// Those of `namespaces` (every one whose settings were read) that [`Self::moved`]; the
    /// ones it could not find are remembered only while they are still asked about, so a host
    /// that makes and deletes namespaces for months keeps no list of the dead.
    pub fn moved_among(&mut self, namespaces: &[u32]) -> Vec<u32> {
        self.unpinned
            .retain(|n, _| namespaces.binary_search(n).is_ok());
        namespaces
            .iter()
            .copied()
            .filter(|&n| self.moved(n))
            .collect()
    }

    /// Whether the number `netns` may name another namespace than the one we reached by it: the
    /// path we had no longer names it (its process exited, its name was deleted), and a
    /// process or a name pins a namespace of that number now. A stat while the path holds.
    pub fn moved(&mut self, netns: u32) -> bool {
        if self.known_path(netns).is_some() {
            self.unpinned.remove(&netns);
            return false;
        }
        if self
            .unpinned
            .get(&netns)
            .is_some_and(|t| t.elapsed() < MOVED_RETRY)
        {
            return false;
        }
        self.paths.remove(&netns);
        if self.pinned_path(netns).is_some() {
            self.unpinned.remove(&netns);
            true
        } else {
            self.unpinned.insert(netns, std::time::Instant::now());
            false
        }
    }

    /// Whether `netns` is reached only through a socket's fd (our fd keeps it alive).
    pub fn is_held(&self, netns: u32) -> bool {
        self.held.contains_key(&netns)
    }

    /// Lets go of our fd of a namespace reached through sockets: it held no full socket, so
    /// only our fd kept it alive.
    pub fn release_if_held(&mut self, netns: u32) {
        if self.held.remove(&netns).is_some() {
            self.forget(netns);
        }
    }

    /// Closes cached sockets whose namespace is gone (its process exited, its name was
    /// deleted): a netlink socket would keep a dead namespace alive. Every worker does this,
    /// not only the one whose job found the namespace gone. Cheap: a stat per cached socket,
    /// at most every few seconds.
    pub fn prune(&mut self) {
        if self.pruned.elapsed() < PRUNE_EVERY {
            return;
        }
        self.pruned = std::time::Instant::now();
        let stale: Vec<u32> = self
            .sockets
            .keys()
            .copied()
            .filter(|&n| n != self.home && !self.held.contains_key(&n))
            .filter(|n| {
                !self.paths.get(n).is_some_and(|p| {
                    std::fs::metadata(p).is_ok_and(|m| u32::try_from(m.ino()).ok() == Some(*n))
                })
            })
            .collect();
        for n in stale {
            self.forget(n);
        }
        self.release_emptied();
    }

    /// Lets go of namespaces reached through sockets' fds that hold no full socket any more:
    /// their last process exited and their sockets closed, so only our fd keeps them alive.
    /// A reconciliation lets go of those it dumps, but one whose sockets all closed by their
    /// events is no longer asked about: 2,000 namespaces made and killed left 64 of them,
    /// and 128 fds, held for good. A dump of an empty namespace per held one, every few
    /// seconds, at most [`MAX_HELD`].
    fn release_emptied(&mut self) {
        // Full sockets only: TIME_WAIT is skipped by state in the kernel, before formatting.
        const FULL: u32 = super::proto::ALL_STATES & !(1 << 6);
        let held: Vec<u32> = self.held.keys().copied().collect();
        for n in held {
            let emptied = match self.diag(n) {
                Ok(Some(d)) => {
                    let mut full = false;
                    let read = d.dump_each(FULL, |s| full |= !s.is_timewait() && !s.is_request());
                    read.is_ok() && !full
                }
                _ => true,
            };
            if emptied {
                self.release_if_held(n);
            }
        }
    }

    /// The sock_diag socket of `netns`. `Ok(None)`: the namespace does not exist any more.
    pub fn diag(&mut self, netns: u32) -> io::Result<Option<&mut Diag>> {
        if !self.sockets.contains_key(&netns) {
            let diag = if netns == self.home {
                Diag::open()?
            } else {
                let Some(path) = self.path(netns) else {
                    return Ok(None);
                };
                match within(&path, Diag::open) {
                    Ok(d) => d?,
                    // It vanished between finding and entering it.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e),
                }
            };
            if self.sockets.len() >= MAX_OPEN {
                let victim = self.sockets.keys().copied().find(|&n| n != self.home);
                if let Some(v) = victim {
                    self.sockets.remove(&v);
                }
            }
            self.sockets.insert(netns, diag);
        }
        Ok(self.sockets.get_mut(&netns))
    }

    /// Drops the socket of a namespace that failed or is gone.
    pub fn forget(&mut self, netns: u32) {
        self.sockets.remove(&netns);
        self.paths.remove(&netns);
    }

    /// Reads `/proc/net/FILE` of the namespace: through `thread-self`, since `/proc/net` is the
    /// main thread's view and this thread may be inside another namespace.
    pub fn proc_net(&mut self, netns: u32, file: &str) -> Option<String> {
        let path = format!("/proc/thread-self/net/{file}");
        let read = || std::fs::read_to_string(&path).ok();
        if netns == self.home {
            return read();
        }
        let ns_path = self.path(netns)?;
        within(&ns_path, read).ok().flatten()
    }

    /// Reads a sysctl file (`/proc/sys/...`) as the namespace sees it.
    /// A sysctl file of `netns`. `walk`: reach a namespace no process is in through a socket
    /// fd (a walk of every process's fds), else only a pinned one ([`Self::pinned_path`]).
    pub fn sysctl(&mut self, netns: u32, file: &str, walk: bool) -> Option<String> {
        let read = || std::fs::read_to_string(file).ok();
        if netns == self.home {
            return read();
        }
        let path = if walk {
            self.path(netns)?
        } else {
            self.pinned_path(netns)?
        };
        within(&path, read).ok().flatten()
    }
}

impl Default for Namespaces {
    fn default() -> Self {
        Self::new()
    }
}
