//! The local HTTP endpoint: `/metrics` (Prometheus) and `/status` (JSON). Requests are answered
//! by the daemon loop, which owns the tracker, over a channel: no locks, and a scrape sees one
//! consistent moment. Every connection is bounded in number, time and size, so clients that
//! connect and never read (or never write) cost a slot, not memory.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc, oneshot},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Metrics,
    Status,
}

pub type Reply = oneshot::Sender<String>;
pub type Request = (Page, Reply);

/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Time a client gets to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client gets to take the answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request head read.
const MAX_HEAD: usize = 8192;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on --metrics-addr {addr}: {source}")]
pub struct BindError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds and starts serving; requests arrive on the returned channel.
pub async fn start(addr: SocketAddr) -> Result<mpsc::Receiver<Request>, BindError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })?;
    if !addr.ip().is_loopback() {
        crate::warn(format_args!(
            "--metrics-addr {addr} is not a loopback address: /status shows process names and addresses to anyone who can reach it"
        ));
    }
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(serve(listener, tx));
    Ok(rx)
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
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Full: refuse fast rather than queue.
            drop(stream);
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = answer(stream, tx).await;
            drop(slot);
        });
    }
}

/// The end of a request head: a blank line, with or without CR.
fn head_end(buf: &[u8]) -> bool {
    buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
}

async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    let read = async {
        while len < buf.len() && !head_end(&buf[..len]) {
            let n = stream.read(&mut buf[len..]).await.ok()?;
            if n == 0 {
                break;
            }
            len += n;
        }
        Some(())
    };
    tokio::time::timeout(HEAD_TIMEOUT, read).await.ok()??;
    buf.truncate(len);
    Some(buf)
}

async fn answer(mut stream: TcpStream, tx: mpsc::Sender<Request>) -> std::io::Result<()> {
    let Some(head) = read_head(&mut stream).await else {
        return Ok(());
    };
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_ascii_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let page = match path {
        "/metrics" => Some(Page::Metrics),
        "/status" => Some(Page::Status),
        _ => None,
    };
    let head_only = method == "HEAD";
    let (status, ctype, body, allow) = match (method, page) {
        ("GET" | "HEAD", Some(page)) => {
            let (otx, orx) = oneshot::channel();
            if tx.send((page, otx)).await.is_err() {
                return Ok(());
            }
            let body = orx.await.unwrap_or_default();
            let ctype = match page {
                Page::Metrics => "text/plain; version=0.0.4; charset=utf-8",
                Page::Status => "application/json",
            };
            ("200 OK", ctype, body, false)
        }
        (_, Some(_)) => (
            "405 Method Not Allowed",
            "text/plain",
            "use GET or HEAD\n".to_owned(),
            true,
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /status\n".to_owned(),
            false,
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if allow {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if !head_only {
        bytes.extend_from_slice(body.as_bytes());
    }
    let write = async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_end_with_a_blank_line_either_way() {
        assert!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(head_end(b"GET / HTTP/1.0\n\n"));
        assert!(!head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"));
    }
}
