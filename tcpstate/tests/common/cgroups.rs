//! Cgroups a test makes, and moving a forked child into one: what names a socket's workload.

use std::{
    ffi::CString,
    io::{BufRead as _, BufReader},
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use super::Netns;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The unified hierarchy's mount point, found as the daemon finds it.
pub fn cgroup2_mount() -> PathBuf {
    tcpstate::workload::Hierarchy::find()
        .expect("this test needs a cgroup2 (unified) hierarchy mounted")
        .mount()
        .to_owned()
}

/// A subtree of cgroups for one test, under `/tcpstate-test-PID-N`; removed on drop.
pub struct Cgroups {
    mount: PathBuf,
    pub root: PathBuf,
    made: Vec<PathBuf>,
}

impl Cgroups {
    pub fn new() -> Self {
        let mount = cgroup2_mount();
        let name = format!(
            "tcpstate-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let root = mount.join(name);
        std::fs::create_dir(&root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
        Self {
            mount,
            made: vec![root.clone()],
            root,
        }
    }

    /// Makes `rel` (and its parents) below the test's root; the path as the daemon reports it.
    pub fn make(&mut self, rel: &str) -> (PathBuf, String) {
        let mut p = self.root.clone();
        for part in rel.split('/') {
            p.push(part);
            if !p.exists() {
                std::fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
                self.made.push(p.clone());
            }
        }
        let shown = format!(
            "/{}",
            p.strip_prefix(&self.mount).expect("under mount").display()
        );
        (p, shown)
    }

    pub fn remove(&mut self, p: &Path) {
        std::fs::remove_dir(p).unwrap_or_else(|e| panic!("rmdir {}: {e}", p.display()));
        self.made.retain(|m| m != p);
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for p in self.made.iter().rev() {
            let _ = std::fs::remove_dir(p);
        }
    }
}

/// Moves the calling process (after fork, before exec) into the cgroup whose `cgroup.procs`
/// is `procs`: raw syscalls only, as a forked child of a threaded process must.
pub fn join(procs: &CString) -> std::io::Result<()> {
    // SAFETY: a NUL-terminated path; the fd is closed below.
    let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: writes one byte from a static buffer to our fd.
    let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    if n == 1 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A bash in cgroup `cg` and namespace `ns` that runs `opens` (which opens connections with
/// `/dev/tcp`), then `exec sleep`, which keeps the fds: one process holding every socket,
/// never closing one. Returns once `opens` succeeded.
pub fn holder_in(cg: &Path, ns: &Netns, opens: &str) -> Child {
    let procs = CString::new(cg.join("cgroup.procs").as_os_str().as_bytes()).expect("path");
    let mut c = ns.command("bash");
    c.args(["-c", &format!("{opens} && echo connected && exec sleep 60")])
        .stdout(Stdio::piped());
    // SAFETY: `join` makes raw syscalls only.
    unsafe { c.pre_exec(move || join(&procs)) };
    let mut child = c.spawn().expect("spawn bash");
    let mut line = String::new();
    let out = child.stdout.take().expect("stdout");
    BufReader::new(out).read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "connected", "holder in {}", cg.display());
    child
}
