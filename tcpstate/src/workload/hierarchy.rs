//! The cgroup v2 (unified) hierarchy, wherever this host mounts it, and the two kernel
//! questions asked of it: which path has this cgroup id, and which id has this path.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

/// `FILEID_KERNFS`: a kernfs node's 64-bit id as a file handle, which is what a cgroup id is.
const FILEID_KERNFS: i32 = 0xfe;

/// `struct file_handle` with room for the 8-byte kernfs id.
#[repr(C)]
struct KernfsHandle {
    handle_bytes: u32,
    handle_type: i32,
    id: u64,
}

#[derive(Debug)]
pub struct Hierarchy {
    mount: PathBuf,
    root: OwnedFd,
}

impl Hierarchy {
    /// The host's unified hierarchy: `/sys/fs/cgroup` on pure v2 hosts,
    /// `/sys/fs/cgroup/unified` on hybrid ones, else wherever `/proc/self/mountinfo` says a
    /// cgroup2 is mounted. None without one (a v1-only host): sockets then carry no names.
    pub fn find() -> Option<Self> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let mount = cgroup2_mount(&info)?;
        let c = CString::new(mount.as_os_str().as_bytes()).ok()?;
        // SAFETY: a NUL-terminated path; the fd is checked and owned below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh fd that nothing else owns.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        Some(Self { mount, root })
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The path (from the hierarchy's root, `/system.slice/x.service`) of the cgroup with
    /// this id: the id is the cgroup directory's kernfs node id, which the kernel opens as a
    /// file handle (as systemd and bpftool do). Fails for a cgroup already removed.
    pub fn path_of(&self, id: u64) -> io::Result<String> {
        let mut h = KernfsHandle {
            handle_bytes: 8,
            handle_type: FILEID_KERNFS,
            id,
        };
        // SAFETY: `h` is a valid file_handle with handle_bytes of payload; the fd is checked.
        let fd = unsafe {
            libc::open_by_handle_at(
                self.root.as_raw_fd(),
                (&raw mut h).cast(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns; closed on drop.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let full = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        relative(&self.mount, &full).ok_or_else(|| {
            io::Error::other(format!(
                "{} is outside {}",
                full.display(),
                self.mount.display()
            ))
        })
    }

    /// The id of the cgroup at `path` (from the hierarchy's root, or absolute under the
    /// mount): its directory's inode number.
    pub fn id_of(&self, path: &str) -> io::Result<u64> {
        let p = Path::new(path);
        let full = if p.starts_with(&self.mount) {
            p.to_owned()
        } else {
            self.mount.join(path.trim_start_matches('/'))
        };
        let m = std::fs::metadata(&full)?;
        if !m.is_dir() || !full.join("cgroup.procs").exists() {
            return Err(io::Error::other(format!(
                "{} is not a cgroup",
                full.display()
            )));
        }
        Ok(m.ino())
    }
}

/// A process's cgroup in the unified hierarchy, from `/proc/PID/cgroup` (its `0::` line).
pub fn cgroup_of_pid(pid: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    unified_line(&s)
}

fn unified_line(s: &str) -> Option<String> {
    s.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// `full` made relative to `mount`, with its leading `/`; a removed directory's
/// " (deleted)" suffix dropped.
fn relative(mount: &Path, full: &Path) -> Option<String> {
    let rest = full.strip_prefix(mount).ok()?;
    let s = rest.to_string_lossy();
    let s = s.strip_suffix(" (deleted)").unwrap_or(&s);
    Some(format!("/{s}"))
}

/// The cgroup2 mount point to use from a mountinfo text: `/sys/fs/cgroup` first, then
/// `/sys/fs/cgroup/unified`, then the first other.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    let mounts: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split(' ').next()? == "cgroup2").then(|| pre.split(' ').nth(4))?
        })
        .collect();
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .find(|m| mounts.contains(m))
        .or_else(|| mounts.first().copied())
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unified_mount_on_pure_and_hybrid_hosts() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(cgroup2_mount(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        let elsewhere = "50 23 0:40 / /mnt/cg rw - cgroup2 none rw";
        assert_eq!(cgroup2_mount(elsewhere), Some(PathBuf::from("/mnt/cg")));
        assert_eq!(
            cgroup2_mount("41 31 0:38 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu"),
            None
        );
    }

    #[test]
    fn paths_are_relative_to_the_mount() {
        let m = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(
            relative(
                m,
                Path::new("/sys/fs/cgroup/unified/system.slice/a.service")
            )
            .as_deref(),
            Some("/system.slice/a.service")
        );
        assert_eq!(relative(m, m).as_deref(), Some("/"));
        assert_eq!(
            relative(m, Path::new("/sys/fs/cgroup/unified/x (deleted)")).as_deref(),
            Some("/x")
        );
        assert_eq!(relative(m, Path::new("/elsewhere")), None);
    }

    #[test]
    fn the_unified_line_of_proc_pid_cgroup() {
        let hybrid = "9:name=systemd:/\n4:memory:/a\n0::/system.slice/sshd.service\n";
        assert_eq!(
            unified_line(hybrid).as_deref(),
            Some("/system.slice/sshd.service")
        );
        assert_eq!(unified_line("4:memory:/a\n"), None);
    }
}
