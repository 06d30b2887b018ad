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

/// One worker's view of the namespaces: how to open each, and a sock_diag socket per
/// namespace, opened on first use.
pub struct Namespaces {
    home: u32,
    paths: HashMap<u32, PathBuf>,
    sockets: HashMap<u32, Diag>,
}

/// Namespaces whose sockets are kept open at once; past this the least useful are closed (a
/// host with thousands of containers must not hold thousands of netlink sockets per worker).
const MAX_OPEN: usize = 256;

impl Namespaces {
    pub fn new() -> Self {
        Self {
            home: current_netns().unwrap_or(0),
            paths: HashMap::new(),
            sockets: HashMap::new(),
        }
    }

    pub fn home(&self) -> u32 {
        self.home
    }

    /// Every namespace on the host now.
    pub fn all(&mut self) -> Vec<u32> {
        self.paths = all_netns();
        self.paths
            .insert(self.home, PathBuf::from("/proc/thread-self/ns/net"));
        let mut v: Vec<u32> = self.paths.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// The path that opens `netns`, looking again when it is not known (None: it is gone).
    pub fn path(&mut self, netns: u32) -> Option<PathBuf> {
        if netns == self.home {
            return Some(PathBuf::from("/proc/thread-self/ns/net"));
        }
        let still = |p: &PathBuf| {
            std::fs::metadata(p).is_ok_and(|m| u32::try_from(m.ino()).ok() == Some(netns))
        };
        if let Some(p) = self.paths.get(&netns).filter(|p| still(p)) {
            return Some(p.clone());
        }
        self.paths = all_netns();
        self.paths.get(&netns).cloned()
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

    /// Reads a sysctl file (`/proc/sys/...`) as the namespace sees it.
    pub fn sysctl(&mut self, netns: u32, file: &str) -> Option<String> {
        let read = || std::fs::read_to_string(file).ok();
        if netns == self.home {
            return read();
        }
        let path = self.path(netns)?;
        within(&path, read).ok().flatten()
    }
}

impl Default for Namespaces {
    fn default() -> Self {
        Self::new()
    }
}
