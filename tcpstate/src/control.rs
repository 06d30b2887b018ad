//! The control socket: a Unix socket only root can reach, on which the daemon serves the same
//! pages as its HTTP endpoint. `tcpstate kill` runs as root and destroys connections on the
//! strength of the ages it is told; it takes them only from here, after the kernel has said
//! (`SO_PEERCRED`) that the process answering is root's. A TCP port proves nothing: whenever
//! no daemon holds it, any local user can bind it and answer.

use std::{
    io,
    os::{
        fd::{AsFd, AsRawFd as _},
        unix::{
            fs::{DirBuilderExt as _, PermissionsExt as _},
            net::{UnixListener, UnixStream},
        },
    },
    path::Path,
};

use anyhow::{Context as _, bail};

use crate::output::escape::escape;

/// Where the daemon serves it unless told otherwise (`--control-socket`).
pub const DEFAULT_PATH: &str = "/run/tcpstate/control.sock";

/// The uid of the process at the other end of a connected Unix socket, as the kernel recorded
/// it when the connection was made (the server's at `connect`, the client's at `accept`).
pub fn peer_uid(sock: impl AsFd) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the size given.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::from_mut(&mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// What binding the control socket came to.
pub enum Bound {
    Listening(UnixListener),
    /// Another live daemon serves the path: it keeps it (a second daemon, say one for one
    /// namespace, must not take `kill` away from the first).
    Taken,
}

/// Binds `path` for the daemon: its directory made if missing (0755), a stale socket left by
/// a daemon that died replaced, the socket itself 0600 so that only root can connect.
pub fn bind(path: &Path) -> anyhow::Result<Bound> {
    let fail = || format!("cannot serve the control socket {}", escape_path(path));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(fail)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(_) if UnixStream::connect(path).is_ok() => return Ok(Bound::Taken),
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path).with_context(fail)?;
        }
        Ok(_) => bail!("{}: it exists and is not a socket", fail()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(fail),
    }
    // Made 0600 from the start (umask), not chmod-ed after: no window in which another user
    // could connect.
    // SAFETY: umask only swaps the process's file mode mask; restored below.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = match bound {
        // Another daemon bound it between our look and our bind.
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Ok(Bound::Taken),
        r => r.with_context(fail)?,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).with_context(fail)?;
    listener.set_nonblocking(true).with_context(fail)?;
    Ok(Bound::Listening(listener))
}

/// Connects to the daemon's control socket and proves it is root's. `Err` says, in one line,
/// why it is not to be trusted or not there.
pub fn connect(path: &Path) -> anyhow::Result<UnixStream> {
    let shown = escape_path(path);
    let s = UnixStream::connect(path)
        .with_context(|| format!("no daemon answers on the control socket {shown}"))?;
    let uid = peer_uid(&s).with_context(|| format!("cannot tell who serves {shown}"))?;
    if uid != 0 {
        bail!("the control socket {shown} is served by uid {uid}, not root: not trusting it");
    }
    Ok(s)
}

fn escape_path(path: &Path) -> String {
    escape(&path.to_string_lossy()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_is_made_for_root_only_and_a_stale_one_replaced() {
        let dir = std::env::temp_dir().join(format!("tcpstate-control-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub").join("control.sock");
        let Ok(Bound::Listening(l)) = bind(&path) else {
            panic!("bound")
        };
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Live: a second daemon leaves it alone.
        assert!(matches!(bind(&path), Ok(Bound::Taken)));
        // The first died without cleaning up: its socket is replaced.
        drop(l);
        assert!(matches!(bind(&path), Ok(Bound::Listening(_))));
        // A regular file is never removed.
        let file = dir.join("file");
        std::fs::write(&file, b"x").expect("write");
        let err = bind(&file).err().expect("refused");
        assert!(format!("{err:#}").contains("not a socket"), "{err:#}");
        assert!(file.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_peer_is_named_by_the_kernel() {
        let (a, b) = UnixStream::pair().expect("pair");
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        assert_eq!(peer_uid(&a).expect("cred"), me);
        assert_eq!(peer_uid(&b).expect("cred"), me);
    }
}
