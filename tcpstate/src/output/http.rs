//! The local HTTP endpoint: `/metrics` (Prometheus) and `/status` (JSON), served by hyper
//! (HTTP/1.1: keep-alive, HEAD, gzip when asked). Pages are made by the daemon loop, which
//! owns the tracker, over a channel: no locks, and a scrape sees one consistent moment.
//!
//! Every connection is bounded: one that has sent nothing costs a small task (no buffer) and
//! is closed after the head timeout; at most 64 are served at once; a request head is at most
//! 16 KiB and must arrive in 5 s; a connection lives at most 60 s, which also frees the slot
//! of a client that never reads its answer. When all 64 are taken, the connection idle
//! longest (between requests, or still dribbling its head) is closed for the newcomer: a
//! client that sends its request at once, as Prometheus does, is always served, however many
//! slow ones hold connections open. Only connections being answered are never taken.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request as HttpRequest, Response, StatusCode, body::Incoming, header,
    server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Metrics,
    Status,
    /// `/sockets?state=close_wait`: the tracked sockets in one state, with their ages.
    Sockets(crate::state::TcpState),
}

pub type Reply = oneshot::Sender<String>;
pub type Request = (Page, Reply);

/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Control-socket connections served at once (root's own commands).
const CONTROL_CONNECTIONS: usize = 8;
/// Time a client gets to send its request head (and to start one at all).
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection lives, answers taken or not.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Longest request head read.
const MAX_HEAD: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on --metrics-addr {addr}: {cause}")]
pub struct BindError {
    addr: SocketAddr,
    /// Not a `source`: it is said in the message, and a source would be said again.
    cause: std::io::Error,
}

/// Binds and starts serving; requests go to `tx`.
pub fn start(addr: SocketAddr, tx: mpsc::Sender<Request>) -> Result<(), BindError> {
    let listener = listen(addr).map_err(|cause| BindError { addr, cause })?;
    if !addr.ip().is_loopback() {
        crate::warn(format_args!(
            "--metrics-addr {addr} is not a loopback address: /status shows process names and addresses to anyone who can reach it"
        ));
    }
    tokio::spawn(serve(listener, tx));
    Ok(())
}

/// Serves the same pages on the control socket (see [`crate::control`]). Only root can
/// connect (the socket is 0600); a client that is not root anyway (the file's mode changed
/// under us) is turned away.
pub fn start_control(
    listener: std::os::unix::net::UnixListener,
    tx: mpsc::Sender<Request>,
) -> std::io::Result<()> {
    let listener = tokio::net::UnixListener::from_std(listener)?;
    tokio::spawn(async move {
        let slots = Slots::new(CONTROL_CONNECTIONS);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            if crate::control::peer_uid(&stream).ok() != Some(0) {
                continue;
            }
            let Some(slot) = slots.take() else {
                continue;
            };
            tokio::spawn(connection(stream, slot, tx.clone()));
        }
    });
    Ok(())
}

/// A listener with a long backlog: a burst of clients waits in the kernel's queue instead of
/// having its SYNs dropped.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// The connections being served. Each is idle (since when) or answering a request.
struct Slots {
    max: usize,
    table: Mutex<SlotTable>,
}

#[derive(Default)]
struct SlotTable {
    next: u64,
    live: HashMap<u64, Slot>,
}

struct Slot {
    /// `None` while a request is being answered.
    idle_since: Option<Instant>,
    /// Closes the connection when it is taken for a newcomer.
    evict: Option<oneshot::Sender<()>>,
}

/// A connection's hold on its slot; dropped when the connection ends.
struct Lease {
    slots: Arc<Slots>,
    id: u64,
}

impl Slots {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            table: Mutex::default(),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, SlotTable> {
        // The table stays consistent at every step: a panic elsewhere leaves nothing half-done.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a new connection, taking the one idle longest when all are in use; `None`
    /// when every one is answering a request. The receiver fires when this one is taken.
    fn take(self: &Arc<Self>) -> Option<(Lease, oneshot::Receiver<()>)> {
        let mut t = self.table();
        if t.live.len() >= self.max {
            let oldest = t
                .live
                .iter()
                .filter_map(|(&id, s)| Some((s.idle_since?, id)))
                .min()?
                .1;
            if let Some(evict) = t.live.remove(&oldest).and_then(|s| s.evict) {
                let _ = evict.send(());
            }
        }
        let (tx, rx) = oneshot::channel();
        let id = t.next;
        t.next += 1;
        t.live.insert(
            id,
            Slot {
                idle_since: Some(Instant::now()),
                evict: Some(tx),
            },
        );
        drop(t);
        Some((
            Lease {
                slots: Arc::clone(self),
                id,
            },
            rx,
        ))
    }

    fn set_answering(&self, id: u64, answering: bool) {
        if let Some(s) = self.table().live.get_mut(&id) {
            s.idle_since = (!answering).then(Instant::now);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.slots.table().live.remove(&self.id);
    }
}

/// Marks a connection as answering for as long as it lives (the answer may be cancelled).
struct Answering(Arc<Slots>, u64);

impl Answering {
    fn start(slots: &Arc<Slots>, id: u64) -> Self {
        slots.set_answering(id, true);
        Self(Arc::clone(slots), id)
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.set_answering(self.1, false);
    }
}

async fn serve(listener: TcpListener, tx: mpsc::Sender<Request>) {
    let slots = Slots::new(MAX_CONNECTIONS);
    let mut backoff = Duration::from_millis(10);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff = Duration::from_millis(10);
                stream
            }
            Err(_) => {
                // EMFILE and friends: retrying at once would spin; wait, then more.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        tokio::spawn(admit(stream, Arc::clone(&slots), tx.clone()));
    }
}

/// Waits (with a one-byte buffer) for the client to say something, then serves it if a slot
/// is free. `peek`, not `readable()`: readiness can be reported before any byte is there.
async fn admit(stream: TcpStream, slots: Arc<Slots>, tx: mpsc::Sender<Request>) {
    let mut first = [0u8; 1];
    if !matches!(
        tokio::time::timeout(HEAD_TIMEOUT, stream.peek(&mut first)).await,
        Ok(Ok(1))
    ) {
        return;
    }
    let Some(slot) = slots.take() else {
        // Every slot is answering a request: refuse fast rather than queue.
        return;
    };
    // A task of its own: idle clients above keep only this small future.
    tokio::spawn(connection(stream, slot, tx));
}

async fn connection<S>(stream: S, slot: (Lease, oneshot::Receiver<()>), tx: mpsc::Sender<Request>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (lease, evicted) = slot;
    let (slots, id) = (Arc::clone(&lease.slots), lease.id);
    let service = service_fn(move |req| {
        let answering = Answering::start(&slots, id);
        let tx = tx.clone();
        async move {
            let r = answer(req, tx).await;
            drop(answering);
            r
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        _ = evicted => {}
        () = tokio::time::sleep(CONNECTION_LIFETIME) => {}
    }
    drop(lease);
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    r
}

/// Whether the client takes gzip (Prometheus asks for it).
fn wants_gzip(req: &HttpRequest<Incoming>) -> bool {
    req.headers()
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| {
            let mut parts = e.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| matches!(p.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000"));
            name.eq_ignore_ascii_case("gzip") && !refused
        })
}

fn gzip(body: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(body).ok()?;
    enc.finish().ok()
}

async fn answer(
    req: HttpRequest<Incoming>,
    tx: mpsc::Sender<Request>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let page = match req.uri().path() {
        "/metrics" => Page::Metrics,
        "/status" => Page::Status,
        "/sockets" => match req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("state="))
            .and_then(crate::state::TcpState::parse)
        {
            Some(st) => Page::Sockets(st),
            None => {
                return Ok(plain(
                    StatusCode::BAD_REQUEST,
                    "try /sockets?state=close_wait\n",
                ));
            }
        },
        _ => return Ok(plain(StatusCode::NOT_FOUND, "try /metrics or /status\n")),
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET or HEAD\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    let (otx, orx) = oneshot::channel();
    if tx.send((page, otx)).await.is_err() {
        return Ok(plain(StatusCode::SERVICE_UNAVAILABLE, "stopping\n"));
    }
    let body = orx.await.unwrap_or_default().into_bytes();
    let ctype = match page {
        Page::Metrics => "text/plain; version=0.0.4; charset=utf-8",
        Page::Status | Page::Sockets(_) => "application/json",
    };
    let mut r = Response::builder()
        .header(header::CONTENT_TYPE, ctype)
        .header(header::VARY, "Accept-Encoding");
    let body = match wants_gzip(&req).then(|| gzip(&body)).flatten() {
        Some(z) => {
            r = r.header(header::CONTENT_ENCODING, "gzip");
            z
        }
        None => body,
    };
    Ok(r.body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_gives_the_longest_idle_slot_and_never_one_answering() {
        let slots = Slots::new(2);
        let (a, mut a_gone) = slots.take().expect("free");
        std::thread::sleep(Duration::from_millis(2));
        let (b, mut b_gone) = slots.take().expect("free");
        // Full: the newcomer takes `a`, idle longest.
        let (c, mut c_gone) = slots.take().expect("evicts");
        assert_eq!(a_gone.try_recv(), Ok(()));
        assert!(b_gone.try_recv().is_err());
        // `b` answers a request; `c` is idle: the next newcomer takes `c`.
        let busy = Answering::start(&slots, b.id);
        let (d, _) = slots.take().expect("evicts");
        assert_eq!(c_gone.try_recv(), Ok(()));
        assert!(b_gone.try_recv().is_err());
        // Both answering: nobody is taken, the newcomer is refused.
        let busy_d = Answering::start(&slots, d.id);
        assert!(slots.take().is_none());
        // An answer done makes its connection idle again, and takeable.
        drop(busy);
        assert!(slots.take().is_some());
        assert_eq!(b_gone.try_recv(), Ok(()));
        drop((a, c, busy_d));
    }

    #[test]
    fn a_connection_that_ends_frees_its_slot() {
        let slots = Slots::new(1);
        let (a, _) = slots.take().expect("free");
        let busy = Answering::start(&slots, a.id);
        assert!(slots.take().is_none());
        drop(busy);
        drop(a);
        let (_, mut gone) = slots.take().expect("free again");
        assert!(gone.try_recv().is_err(), "taken from nobody");
    }
}
