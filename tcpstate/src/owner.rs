//! Which processes hold a socket, found the way `ss -p` does: by reading the `/proc/PID/fd/*`
//! links and matching `socket:[INODE]`.

use std::collections::{HashMap, HashSet};

/// A process holding a socket open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub comm: String,
}

/// For each wanted socket inode, the processes whose `/proc/PID/fd/*` links to `socket:[inode]`.
///
/// One pass over /proc, skipping processes that vanish or deny access. Returns immediately when
/// `wanted` is empty. Only `/proc/PID` (thread-group leaders) is read, never tasks, so threads
/// sharing an fd table count once; a process holding several fds to one socket is listed once.
/// Each inode's holders are sorted by pid. Inodes nobody holds are absent from the map.
pub fn holders(wanted: &HashSet<u32>) -> HashMap<u32, Vec<Holder>> {
    let mut out: HashMap<u32, Vec<Holder>> = HashMap::new();
    if wanted.is_empty() {
        return out;
    }
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    let mut pids: Vec<u32> = proc_dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .collect();
    pids.sort_unstable();

    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue; // gone, or not ours to read
        };
        let mut found: Vec<u32> = fds
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter_map(|target| socket_inode(target.as_os_str().to_str()?))
            .filter(|ino| wanted.contains(ino))
            .collect();
        if found.is_empty() {
            continue;
        }
        found.sort_unstable();
        found.dedup();
        // A process that exits between reading its fds and its comm still held the sockets.
        let comm = comm_of(pid).unwrap_or_default();
        for ino in found {
            out.entry(ino).or_default().push(Holder {
                pid,
                comm: comm.clone(),
            });
        }
    }
    out
}

/// The inode in a `socket:[INODE]` fd link target.
fn socket_inode(target: &str) -> Option<u32> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// comm of a pid from `/proc/PID/comm`, with its trailing newline removed; `None` if gone.
pub fn comm_of(pid: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(s.trim_end_matches('\n').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener};
    use std::os::unix::fs::MetadataExt;

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
        assert!(holders(&HashSet::new()).is_empty());
    }

    #[test]
    fn comm_of_self_and_missing() {
        let me = std::process::id();
        let comm = comm_of(me).expect("own comm");
        assert!(!comm.is_empty() && !comm.ends_with('\n'), "{comm:?}");
        // pid_max is at most 2^22, so this pid cannot exist.
        assert_eq!(comm_of(u32::MAX - 1), None);
    }

    /// Socket inode of a listener, read from our own fd table (independent of sock_diag).
    fn inode_of(l: &TcpListener) -> u32 {
        use std::os::fd::AsRawFd;
        let md = std::fs::metadata(format!("/proc/self/fd/{}", l.as_raw_fd())).expect("stat fd");
        u32::try_from(md.ino()).expect("inode fits u32")
    }

    #[test]
    fn listener_is_held_by_us() {
        const LISTEN: u8 = 10;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = listener.local_addr().expect("local_addr").port();
        let socks = crate::sockdiag::dump_tcp().expect("dump_tcp");
        let ino = socks
            .iter()
            .find(|s| s.state == LISTEN && s.sport == port && s.family == libc::AF_INET as u16)
            .map(|s| s.inode)
            .expect("listener in dump");
        assert_eq!(ino, inode_of(&listener));
        // A duplicate fd to the same socket must not list us twice.
        let dup = listener.try_clone().expect("dup");
        let wanted: HashSet<u32> = [ino, 0].into_iter().collect();
        let map = holders(&wanted);
        let hs = map.get(&ino).expect("listener inode held");
        let me = std::process::id();
        assert_eq!(hs.iter().filter(|h| h.pid == me).count(), 1, "{hs:?}");
        let h = hs.iter().find(|h| h.pid == me).expect("our pid");
        assert_eq!(Some(h.comm.clone()), comm_of(me));
        assert!(!map.contains_key(&0));
        drop(dup);
    }
}
