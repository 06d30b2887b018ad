//! The one walker of `/proc`: the processes there are, their names and the sockets their fds
//! point at. Processes that vanish or deny access mid-walk are skipped.

use std::collections::{HashMap, HashSet};

/// Every process id in /proc, ascending.
pub fn pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// comm of a pid from `/proc/PID/comm`, raw bytes without the trailing newline; `None` if gone.
pub fn comm_of(pid: u32) -> Option<Vec<u8>> {
    let mut s = std::fs::read(format!("/proc/{pid}/comm")).ok()?;
    if s.last() == Some(&b'\n') {
        s.pop();
    }
    Some(s)
}

/// The socket inodes a process's fds point at (`socket:[INODE]` links), sorted, deduplicated.
/// `Err` when its fd table cannot be read (gone, or not ours, or out of fds).
pub fn socket_inodes(pid: u32) -> std::io::Result<Vec<u32>> {
    let mut found: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| socket_inode(target.as_os_str().to_str()?))
        .collect();
    found.sort_unstable();
    found.dedup();
    Ok(found)
}

/// The inode in a `socket:[INODE]` fd link target.
pub fn socket_inode(target: &str) -> Option<u32> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// A process holding a socket open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub comm: Vec<u8>,
}

/// What one pass over /proc found, and whether it could look everywhere.
#[derive(Debug, Default)]
pub struct Holders {
    pub by_inode: HashMap<u32, Vec<Holder>>,
    /// Processes whose fds could not be read for a reason other than having exited (EMFILE
    /// above all): an inode held only there would look orphaned, so callers must not
    /// conclude "nobody holds it" when this is non-zero.
    pub unreadable: u32,
}

impl Holders {
    /// Every holder of `inode` after the first (a socket inherited across fork, or passed):
    /// `ss -p` lists them all.
    pub fn others(&self, inode: u32) -> Vec<(u32, crate::socket::Comm)> {
        self.by_inode.get(&inode).map_or_else(Vec::new, |v| {
            v.iter()
                .skip(1)
                .map(|h| (h.pid, crate::socket::Comm::from_bytes(&h.comm)))
                .collect()
        })
    }

    /// The holder of `inode` the daemon names (the lowest pid): pid and comm.
    pub fn first(&self, inode: u32) -> Option<(u32, crate::socket::Comm)> {
        let h = self.by_inode.get(&inode)?.first()?;
        Some((h.pid, crate::socket::Comm::from_bytes(&h.comm)))
    }
}

/// The holders of these socket inodes (0, a socket without a file, is nobody's).
pub fn holders_of(inodes: impl IntoIterator<Item = u32>) -> Holders {
    holders(&inodes.into_iter().filter(|&i| i != 0).collect())
}

/// For each wanted socket inode, the processes whose fds link to it (`ss -p`'s method). Only
/// `/proc/PID` (thread-group leaders) is read, never tasks, so threads sharing an fd table count
/// once; a process holding several fds to one socket is listed once; holders sorted by pid.
pub fn holders(wanted: &HashSet<u32>) -> Holders {
    let mut out = Holders::default();
    if wanted.is_empty() {
        return out;
    }
    for pid in pids() {
        let inodes = match socket_inodes(pid) {
            Ok(v) => v,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
            Err(_) => {
                out.unreadable += 1;
                continue;
            }
        };
        let mine: Vec<u32> = inodes.into_iter().filter(|i| wanted.contains(i)).collect();
        if mine.is_empty() {
            continue;
        }
        // A process that exits between reading its fds and its comm still held the sockets.
        let comm = comm_of(pid).unwrap_or_default();
        for ino in mine {
            out.by_inode.entry(ino).or_default().push(Holder {
                pid,
                comm: comm.clone(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, TcpListener},
        os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    };

    use super::*;

    #[test]
    fn parses_socket_links() {
        assert_eq!(socket_inode("socket:[12345]"), Some(12345));
        assert_eq!(socket_inode("socket:[4294967295]"), Some(u32::MAX));
        assert_eq!(socket_inode("socket:[]"), None);
        assert_eq!(socket_inode("socket:[12"), None);
        assert_eq!(socket_inode("pipe:[12345]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        assert_eq!(socket_inode("anon_inode:[eventpoll]"), None);
    }

    #[test]
    fn empty_wanted_is_empty() {
        assert!(holders(&HashSet::new()).by_inode.is_empty());
    }

    #[test]
    fn comm_of_self_and_missing() {
        let me = std::process::id();
        let comm = comm_of(me).expect("own comm");
        assert!(!comm.is_empty() && !comm.ends_with(b"\n"), "{comm:?}");
        // pid_max is at most 2^22, so this pid cannot exist.
        assert_eq!(comm_of(u32::MAX - 1), None);
        assert!(pids().contains(&me));
    }

    #[test]
    fn listener_is_held_by_us_once() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let md =
            std::fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd())).expect("stat fd");
        let ino = u32::try_from(md.ino()).expect("inode fits u32");
        // A duplicate fd to the same socket must not list us twice.
        let dup = listener.try_clone().expect("dup");
        let wanted: HashSet<u32> = [ino, 0].into_iter().collect();
        let found = holders(&wanted);
        let hs = found.by_inode.get(&ino).expect("listener inode held");
        let me = std::process::id();
        assert_eq!(hs.iter().filter(|h| h.pid == me).count(), 1, "{hs:?}");
        assert!(!found.by_inode.contains_key(&0));
        drop(dup);
    }
}
