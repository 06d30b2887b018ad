//! The local HTTP endpoint: `/metrics` (Prometheus) and `/status` (JSON), served by hyper
//! (HTTP/1.1: keep-alive, HEAD, gzip when asked). Pages are made by the daemon loop, which
//! owns the tracker, over a channel: no locks, and a scrape sees one consistent moment.
//!
//! Every connection is bounded: one that has sent nothing costs a small task (no buffer) and
//! is closed after the head timeout; at most 64 are served at once (more are closed at
//! once); a request head is at most 16 KiB and must arrive in 5 s; a connection lives at most
//! 60 s, which also frees the slot of a client that never reads its answer.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request as HttpRequest, Response, StatusCode, body::Incoming, header,
    server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot},
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
/// Time a client gets to send its request head (and to start one at all).
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection lives, answers taken or not.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Longest request head read.
const MAX_HEAD: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on --metrics-addr {addr}: {source}")]
pub struct BindError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds and starts serving; requests arrive on the returned channel.
pub async fn start(addr: SocketAddr) -> Result<mpsc::Receiver<Request>, BindError> {
    let listener = listen(addr).map_err(|source| BindError { addr, source })?;
    if !addr.ip().is_loopback() {
        crate::warn(format_args!(
            "--metrics-addr {addr} is not a loopback address: /status shows process names and addresses to anyone who can reach it"
        ));
    }
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(serve(listener, tx));
    Ok(rx)
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

async fn serve(listener: TcpListener, tx: mpsc::Sender<Request>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
async fn admit(stream: TcpStream, slots: Arc<Semaphore>, tx: mpsc::Sender<Request>) {
    let mut first = [0u8; 1];
    if !matches!(
        tokio::time::timeout(HEAD_TIMEOUT, stream.peek(&mut first)).await,
        Ok(Ok(1))
    ) {
        return;
    }
    let Ok(slot) = slots.try_acquire_owned() else {
        // Full: refuse fast rather than queue.
        return;
    };
    // A task of its own: idle clients above keep only this small future.
    tokio::spawn(connection(stream, slot, tx));
}

async fn connection(stream: TcpStream, _slot: OwnedSemaphorePermit, tx: mpsc::Sender<Request>) {
    let service = service_fn(move |req| answer(req, tx.clone()));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
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
