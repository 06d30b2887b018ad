//! The load: TCP connection churn over loopback inside the bench's network
//! namespace, plus a slow "probe" connection for the log-latency measurement.
//!
//! Each client connection is connect / write 1 byte / read the 1-byte echo /
//! close, alternating 127.0.0.1 and [::1]. The *server closes first*: it
//! closes right after echoing and the client waits for that FIN (read() == 0)
//! before closing. So TIME_WAIT lands on the server end, keyed by the 4-tuple
//! with the listening port, and the client's ephemeral port is free as soon as
//! its LAST_ACK -> CLOSE completes. With the client closing first, ~15-50k
//! conn/s would leave that many client TIME_WAITs per second and exhaust the
//! ~28k (or even 64k) ephemeral ports within seconds: connect() then fails
//! with EADDRNOTAVAIL, or with tcp_tw_reuse only reuses TIME_WAITs older than
//! 1 s, and the rate collapses. A SYN that meets a server TIME_WAIT of the same
//! 4-tuple is accepted (its ISN and timestamp are newer), so the rate stays
//! flat over a run and across runs. The transitions per connection are the
//! same ten either way (client and server both go through their full path).
//! The namespace's port range is still widened (`mod.rs`), which the memory
//! run needs anyway.

use std::io::{self, ErrorKind, Read as _, Write as _};
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};

use super::interrupt::interrupted;
use super::netns::Netns;

/// Ports below the (widened) ephemeral range, so connect() never picks them.
pub const CHURN_PORT: u16 = 999;
pub const PROBE_PORT: u16 = 998;
/// Accept timeout (and, inherited by accepted sockets, their read timeout):
/// how quickly server threads notice the stop flag.
const ACCEPT_TIMEOUT_US: i64 = 250_000;
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// Upper bound per client thread, besides the deadline.
const MAX_CONNS_PER_THREAD: u64 = 50_000_000;
/// A client thread gives up after this many failed connections.
const MAX_ERRORS_PER_THREAD: u64 = 1_000;

pub struct Churn<'a> {
    netns: &'a Netns,
    targets: Vec<SocketAddr>,
    /// IPv4 client addresses to rotate through (the TIME_WAIT run: more
    /// distinct 4-tuples than one address's 64k ports); empty = the kernel's
    /// choice.
    sources: Vec<Ipv4Addr>,
    probe: SocketAddr,
    threads: usize,
    stop: Arc<AtomicBool>,
    server_errors: Arc<AtomicU64>,
    servers: Vec<JoinHandle<()>>,
}

#[derive(Clone, Debug, Default)]
pub struct ChurnResult {
    pub conns: u64,
    pub elapsed: Duration,
    pub errors: u64,
    pub first_error: Option<String>,
    pub probes: u64,
}

impl ChurnResult {
    pub fn rate(&self) -> f64 {
        self.conns as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl<'a> Churn<'a> {
    /// Binds the listeners in `netns` and starts `threads` accepting threads
    /// per address family plus one for the probe port.
    pub fn start(netns: &'a Netns, threads: usize) -> Result<Self> {
        let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), CHURN_PORT);
        let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), CHURN_PORT);
        let probe = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), PROBE_PORT);
        let (listeners, probe_listener) = in_netns(netns, || {
            let mut listeners = vec![listen(v4)?];
            match listen(v6) {
                Ok(l) => listeners.push(l),
                Err(err) => eprintln!("bench: no IPv6 in the namespace, IPv4 only: {err:#}"),
            }
            Ok((listeners, listen(probe)?))
        })?;
        let mut churn = Self {
            netns,
            targets: Vec::new(),
            sources: Vec::new(),
            probe,
            threads,
            stop: Arc::new(AtomicBool::new(false)),
            server_errors: Arc::new(AtomicU64::new(0)),
            servers: Vec::new(),
        };
        for listener in listeners {
            churn.targets.push(listener.local_addr()?);
            for _ in 0..threads {
                churn.spawn_server(listener.try_clone()?, true);
            }
        }
        churn.spawn_server(probe_listener, false);
        eprintln!(
            "bench: churn servers on {} ({threads} accept threads each), probe on {probe}",
            churn
                .targets
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" and ")
        );
        Ok(churn)
    }

    /// Clients of IPv4 targets bind to these addresses in turn.
    pub fn with_sources(mut self, sources: Vec<Ipv4Addr>) -> Self {
        self.sources = sources;
        self
    }

    fn spawn_server(&mut self, listener: TcpListener, echo: bool) {
        let stop = Arc::clone(&self.stop);
        let errors = Arc::clone(&self.server_errors);
        self.servers.push(thread::spawn(move || {
            serve(&listener, &stop, &errors, echo);
        }));
    }

    pub fn ipv6(&self) -> bool {
        self.targets.iter().any(SocketAddr::is_ipv6)
    }

    pub fn server_errors(&self) -> u64 {
        self.server_errors.load(Ordering::Relaxed)
    }

    /// Churns for `duration` with the client threads, and one probe
    /// connection every 50 ms alongside.
    pub fn run(&self, duration: Duration) -> Result<ChurnResult> {
        let start = Instant::now();
        let deadline = start + duration;
        thread::scope(|scope| {
            let clients: Vec<_> = (0..self.threads)
                .map(|idx| scope.spawn(move || self.client(idx, deadline)))
                .collect();
            let prober = scope.spawn(move || self.prober(deadline));
            let mut total = ChurnResult::default();
            for client in clients {
                let one = client
                    .join()
                    .map_err(|_| anyhow!("a churn client thread panicked"))??;
                total.conns += one.conns;
                total.errors += one.errors;
                total.first_error = total.first_error.or(one.first_error);
            }
            total.elapsed = start.elapsed();
            total.probes = prober
                .join()
                .map_err(|_| anyhow!("the probe thread panicked"))??;
            Ok(total)
        })
    }

    fn client(&self, idx: usize, deadline: Instant) -> Result<ChurnResult> {
        self.netns.enter()?;
        let mut out = ChurnResult::default();
        let mut turn = idx;
        while out.conns < MAX_CONNS_PER_THREAD && Instant::now() < deadline && !interrupted() {
            let addr = self.targets[turn % self.targets.len()];
            let source = match addr {
                SocketAddr::V4(_) if !self.sources.is_empty() => {
                    Some(self.sources[(turn / self.targets.len()) % self.sources.len()])
                }
                _ => None,
            };
            turn += 1;
            match echo(addr, source) {
                Ok(()) => out.conns += 1,
                Err(err) => {
                    out.errors += 1;
                    out.first_error
                        .get_or_insert_with(|| format!("{addr}: {err}"));
                    if out.errors >= MAX_ERRORS_PER_THREAD {
                        break;
                    }
                    thread::sleep(Duration::from_millis(1));
                }
            }
        }
        Ok(out)
    }

    /// One connection to the probe port every 50 ms until `deadline`.
    fn prober(&self, deadline: Instant) -> Result<u64> {
        self.netns.enter()?;
        let mut probes = 0;
        let mut next = Instant::now();
        while next < deadline && !interrupted() {
            if TcpStream::connect(self.probe).is_ok() {
                probes += 1;
            }
            next += PROBE_INTERVAL;
            thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        Ok(probes)
    }

    /// One connection to the probe port, to see a tracer's program run.
    pub fn trigger(&self) -> Result<()> {
        let probe = self.probe;
        in_netns(self.netns, move || {
            TcpStream::connect(probe)
                .map(drop)
                .with_context(|| format!("cannot connect to the probe port {probe}"))
        })
    }
}

impl Drop for Churn<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for server in self.servers.drain(..) {
            let _ = server.join();
        }
    }
}

/// Runs `f` on a thread inside `netns` and returns its result.
pub fn in_netns<T: Send>(netns: &Netns, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    thread::scope(|scope| {
        scope
            .spawn(|| {
                netns.enter()?;
                f()
            })
            .join()
            .map_err(|_| anyhow!("a thread in {} panicked", netns.name()))?
    })
}

/// A listener with a long backlog and an accept timeout.
pub fn listen(addr: SocketAddr) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    let fd = listener.as_raw_fd();
    // listen() again on a listening socket only updates its backlog.
    // SAFETY: fd is a valid socket owned by `listener`.
    if unsafe { libc::listen(fd, 4096) } != 0 {
        return Err(io::Error::last_os_error()).context("listen(4096)");
    }
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: ACCEPT_TIMEOUT_US,
    };
    // SAFETY: pointer and length describe `timeout`, which outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("setsockopt(SO_RCVTIMEO)");
    }
    Ok(listener)
}

fn serve(listener: &TcpListener, stop: &AtomicBool, errors: &AtomicU64, echo: bool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            // Dropping the stream closes it: the server closes first.
            Ok((stream, _)) => {
                if echo && echo_back(stream).is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(err)
                if matches!(
                    err.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Server side. The accepted socket inherits the listener's SO_RCVTIMEO, so
/// a silent client cannot hold the thread.
fn echo_back(mut stream: TcpStream) -> io::Result<()> {
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte)?;
    stream.write_all(&byte)
}

/// Client side; returns after the server's FIN (see the module docs).
fn echo(addr: SocketAddr, source: Option<Ipv4Addr>) -> io::Result<()> {
    let mut stream = match source {
        None => TcpStream::connect(addr)?,
        Some(ip) => {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            // Port 0 with IP_BIND_ADDRESS_NO_PORT: the port is chosen at
            // connect() for the full 4-tuple, as without bind().
            let one: libc::c_int = 1;
            // SAFETY: a valid socket and option buffer.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&raw const one).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            s.bind(&SocketAddr::new(IpAddr::V4(ip), 0).into())?;
            s.connect(&addr.into())?;
            s.into()
        }
    };
    stream.write_all(&[1])?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte)?;
    match stream.read(&mut byte)? {
        0 => Ok(()),
        _ => Err(io::Error::other("the server sent more than one byte")),
    }
}
