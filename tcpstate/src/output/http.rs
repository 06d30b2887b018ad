//! The local HTTP endpoint: `/metrics` (Prometheus) and `/status` (JSON).
//! Requests are answered by the daemon loop, which owns the tracker, over
//! a channel: no locks, and a scrape sees one consistent moment.

use std::net::SocketAddr;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Metrics,
    Status,
}

pub type Request = (Page, oneshot::Sender<String>);

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on --metrics-addr {addr}: {e}"))
}

pub async fn serve(listener: TcpListener, tx: mpsc::Sender<Request>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = answer(stream, tx).await;
        });
    }
}

async fn answer(mut stream: TcpStream, tx: mpsc::Sender<Request>) -> std::io::Result<()> {
    // A request line and headers; we only need the path. Bounded read so a
    // client cannot make us buffer without limit.
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    let fut = async {
        while len < buf.len() && !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf[len..]).await?;
            if n == 0 {
                break;
            }
            len += n;
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(std::time::Duration::from_secs(5), fut)
        .await
        .is_err()
    {
        return Ok(());
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let page = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => Some(Page::Metrics),
        ("GET", "/status") => Some(Page::Status),
        _ => None,
    };
    let (status, ctype, body) = match page {
        Some(page) => {
            let (otx, orx) = oneshot::channel();
            if tx.send((page, otx)).await.is_err() {
                return Ok(());
            }
            let body = orx.await.unwrap_or_default();
            let ctype = match page {
                Page::Metrics => "text/plain; version=0.0.4; charset=utf-8",
                Page::Status => "application/json",
            };
            ("200 OK", ctype, body)
        }
        None => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /status\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
