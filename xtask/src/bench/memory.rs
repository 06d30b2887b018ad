//! Memory run: tcpstate's table and RSS cost per tracked socket, with
//! `--conns` sockets held open (conns/2 loopback connections; both ends are
//! ESTABLISHED sockets and both are tracked).
//!
//! The sockets need an fd each. RLIMIT_NOFILE is raised to 4 per socket +
//! 1000 when we may (CAP_SYS_RESOURCE); where the hard limit cannot be raised
//! (containers), the sockets are spread over "holder" threads that each
//! unshare(CLONE_FILES): the limit applies per fd table, so every holder can
//! keep up to the limit open.

use std::fs;
use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::Serialize;

use super::churn::listen;
use super::interrupt;
use super::netns::Netns;
use super::procstat;
use super::sysctl::SysctlGuard;
use super::tracer::ChildGuard;
use crate::cmd::show;

/// Server ports for the held connections (one per holder thread), below the
/// ephemeral range.
const FIRST_PORT: u16 = 1000;
/// Connections per holder (each needs its own client port towards its
/// server port; 64k are available).
const MAX_PAIRS_PER_HOLDER: u64 = 25_000;
const MAX_HOLDERS: u64 = 23;
/// fds a holder keeps free for everything else in its table.
const FD_HEADROOM: u64 = 200;

#[derive(Debug, Serialize)]
pub struct MemoryResult {
    pub command: String,
    pub sockets_opened: u64,
    pub connections: u64,
    pub holder_threads: u64,
    pub fd_limit: u64,
    pub tracked_before: u64,
    pub tracked_after: u64,
    pub table_bytes_before: u64,
    pub table_bytes_after: u64,
    pub rss_kib_before: u64,
    pub rss_kib_after: u64,
    pub dropped: u64,
    pub table_bytes_per_socket: f64,
    pub rss_bytes_per_socket: f64,
    pub settle_s: f64,
}

pub fn run(tcpstate: &Path, netns: &Netns, dir: &Path, conns: u64) -> Result<MemoryResult> {
    let pairs = (conns / 2).max(1);
    let sockets = pairs * 2;
    let (_sysctls, fd_limit) = raise_fd_limits(sockets)?;
    let per_holder = (fd_limit.saturating_sub(FD_HEADROOM) / 2).clamp(1, MAX_PAIRS_PER_HOLDER);
    let holders = pairs.div_ceil(per_holder);
    if holders > MAX_HOLDERS {
        bail!(
            "{sockets} sockets need {holders} holder threads at RLIMIT_NOFILE {fd_limit} \
             (at most {MAX_HOLDERS}); use a smaller --conns"
        );
    }

    let addr = free_loopback_port()?;
    let mut cmd = Command::new(tcpstate);
    cmd.args(["run", "--quiet", "--metrics-addr", &addr.to_string()])
        .stdout(fs::File::create(dir.join("memory.stdout"))?)
        .stderr(fs::File::create(dir.join("memory.stderr"))?);
    let command = show(&cmd);
    eprintln!("bench: memory run: starting {command}");
    let mut child = ChildGuard::spawn(&mut cmd)?;
    let pid = child.pid();
    let before = wait_for_status_of(&mut child, addr)?;
    let rss_before = procstat::status_kib(pid, "VmRSS:")?;
    let tracked_before = field(&before, "tracked")?;
    let table_before = field(&before, "table_bytes")?;
    eprintln!(
        "bench: memory run: tracked {tracked_before}, table_bytes {table_before}, VmRSS \
         {rss_before} KiB; opening {pairs} connections ({sockets} sockets) in {holders} \
         holder thread(s)"
    );

    let (after, rss_after, settle_s) = thread::scope(|scope| -> Result<_> {
        let (ready_tx, ready_rx) = mpsc::channel();
        // Dropping these (on return, also on error) releases the holders,
        // which close their sockets; the scope then joins them.
        let mut release = Vec::new();
        for idx in 0..holders {
            let count = per_holder.min(pairs - idx * per_holder);
            let port = FIRST_PORT + u16::try_from(idx).context("too many holders")?;
            let (release_tx, release_rx) = mpsc::channel::<()>();
            release.push(release_tx);
            let ready = ready_tx.clone();
            scope.spawn(move || {
                let held = hold(netns, port, count);
                let opened = held.as_ref().map(|(_, s)| s.len() as u64 / 2);
                let _ = ready.send(opened.map_err(|e| anyhow!("holder on port {port}: {e:#}")));
                // Blocks until `release` is dropped.
                let _ = release_rx.recv();
                drop(held);
            });
        }
        let start = Instant::now();
        for _ in 0..holders {
            ready_rx
                .recv()
                .context("a holder thread ended without reporting")??;
        }
        eprintln!(
            "bench: memory run: {pairs} connections open in {:.1}s; waiting for \"tracked\" to settle",
            start.elapsed().as_secs_f64()
        );
        let settle_start = Instant::now();
        let after = wait_until_stable(addr)?;
        let settle_s = settle_start.elapsed().as_secs_f64();
        let rss_after = procstat::status_kib(pid, "VmRSS:")?;
        drop(release);
        Ok((after, rss_after, settle_s))
    })?;
    eprintln!("bench: memory run: closed the connections; stopping tcpstate");
    child.terminate()?;

    let tracked_after = field(&after, "tracked")?;
    let grown = tracked_after.saturating_sub(tracked_before).max(1) as f64;
    let table_after = field(&after, "table_bytes")?;
    Ok(MemoryResult {
        command,
        sockets_opened: sockets,
        connections: pairs,
        holder_threads: holders,
        fd_limit,
        tracked_before,
        tracked_after,
        table_bytes_before: table_before,
        table_bytes_after: table_after,
        rss_kib_before: rss_before,
        rss_kib_after: rss_after,
        dropped: field(&after, "dropped")?,
        table_bytes_per_socket: table_after.saturating_sub(table_before) as f64 / grown,
        rss_bytes_per_socket: rss_after.saturating_sub(rss_before) as f64 * 1024.0 / grown,
        settle_s,
    })
}

/// RLIMIT_NOFILE to 4 fds per socket + 1000, raising fs.nr_open and
/// fs.file-max first if they are lower (restored on drop). Without
/// CAP_SYS_RESOURCE only the soft limit can go up, to the hard one. Returns
/// the guards and the soft limit now in force.
fn raise_fd_limits(sockets: u64) -> Result<(Vec<SysctlGuard>, u64)> {
    let want = 4 * sockets + 1000;
    let mut guards = Vec::new();
    for key in ["fs.nr_open", "fs.file-max"] {
        if let Some(guard) = SysctlGuard::raise_to(key, want)? {
            guards.push(guard);
        }
    }
    let old = getrlimit()?;
    if old.rlim_cur >= want as libc::rlim_t {
        return Ok((guards, old.rlim_cur as u64));
    }
    let full = libc::rlimit {
        rlim_cur: want as libc::rlim_t,
        rlim_max: (want as libc::rlim_t).max(old.rlim_max),
    };
    let soft_only = libc::rlimit {
        rlim_cur: old.rlim_max,
        rlim_max: old.rlim_max,
    };
    if setrlimit(&full).is_err() {
        setrlimit(&soft_only).context("setrlimit(RLIMIT_NOFILE) to the hard limit")?;
    }
    let now = getrlimit()?.rlim_cur as u64;
    eprintln!(
        "bench: memory run: RLIMIT_NOFILE {} -> {now}{}",
        old.rlim_cur,
        if now < want {
            format!(" (wanted {want}; the hard limit needs CAP_SYS_RESOURCE)")
        } else {
            String::new()
        }
    );
    Ok((guards, now))
}

fn getrlimit() -> Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit that outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return Err(io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    Ok(limit)
}

fn setrlimit(limit: &libc::rlimit) -> io::Result<()> {
    // SAFETY: a valid pointer to an rlimit that outlives the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(super) fn free_loopback_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("cannot bind 127.0.0.1:0 to find a free port")?;
    Ok(listener.local_addr()?)
}

/// On a holder thread: its own fd table, the namespace, a listener on
/// `port`, and `pairs` connections to it (both ends kept).
fn hold(netns: &Netns, port: u16, pairs: u64) -> Result<(TcpListener, Vec<TcpStream>)> {
    // SAFETY: unshare(CLONE_FILES) only gives this thread a private copy of
    // the fd table; nothing else in the process refers to fds it opens later.
    if unsafe { libc::unshare(libc::CLONE_FILES) } != 0 {
        return Err(io::Error::last_os_error()).context("unshare(CLONE_FILES)");
    }
    netns.enter()?;
    let listener = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    let mut streams = Vec::with_capacity(2 * pairs as usize);
    for i in 0..pairs {
        let client = TcpStream::connect(listener.local_addr()?)
            .with_context(|| format!("connection {} of {pairs}", i + 1))?;
        let (server, _) = listener
            .accept()
            .with_context(|| format!("accepting connection {} of {pairs}", i + 1))?;
        streams.push(client);
        streams.push(server);
    }
    Ok((listener, streams))
}

pub(super) fn wait_for_status_of(
    child: &mut ChildGuard,
    addr: SocketAddr,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        interrupt::check()?;
        if let Some(status) = child.exited()? {
            bail!("tcpstate exited ({status}) before serving /status");
        }
        match get_status(addr) {
            Ok(status) => return Ok(status),
            Err(err) if Instant::now() > deadline => {
                return Err(err.context("tcpstate did not serve /status within 30s"));
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Polls /status until "tracked" has not changed for a second (at most 120 s).
fn wait_until_stable(addr: SocketAddr) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = get_status(addr)?;
    let mut unchanged = 0;
    while unchanged < 4 {
        interrupt::check()?;
        thread::sleep(Duration::from_millis(250));
        let now = get_status(addr)?;
        if field(&now, "tracked")? == field(&last, "tracked")? {
            unchanged += 1;
        } else {
            unchanged = 0;
        }
        last = now;
        if Instant::now() > deadline {
            eprintln!("bench: warning: /status \"tracked\" still changing after 120s");
            break;
        }
    }
    Ok(last)
}

/// GET /status over a fresh HTTP/1.1 connection (Connection: close).
pub(super) fn get_status(addr: SocketAddr) -> Result<serde_json::Value> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading http://{addr}/status"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("http://{addr}/status: malformed response"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!(
            "http://{addr}/status: {}",
            head.lines().next().unwrap_or_default()
        );
    }
    serde_json::from_str(body).with_context(|| format!("http://{addr}/status: body is not JSON"))
}

pub(super) fn field(status: &serde_json::Value, key: &str) -> Result<u64> {
    status
        .get(key)
        .and_then(serde_json::Value::as_u64)
        .with_context(|| format!("/status has no integer {key:?}"))
}
