//! Stdout (text or JSON Lines) through a writer thread: records are serialised into one
//! buffer per batch and handed over, so a terminal, pipe or FIFO whose reader stops blocks
//! only that thread.

use std::{
    io::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use super::{Sink, json, text};
use crate::{cli::Format, record::Record};

/// Bytes queued for the stdout writer at most; past it records are dropped.
const STDOUT_QUEUE_BYTES: usize = 4 << 20;

pub struct Stdout {
    format: Format,
    color: bool,
    buf: Vec<u8>,
    records: u64,
    line: String,
    json: json::JsonWriter,
    tx: Option<mpsc::Sender<Vec<u8>>>,
    queued: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Records dropped because the reader did not keep up.
    dropped: u64,
}

impl Stdout {
    pub fn new(format: Format) -> std::io::Result<Self> {
        use std::io::IsTerminal as _;
        let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let queued = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicBool::new(false));
        let (q, c) = (Arc::clone(&queued), Arc::clone(&closed));
        let writer = std::thread::Builder::new()
            .name("tcpstate-stdout".into())
            .spawn(move || {
                let mut out = std::io::stdout().lock();
                for chunk in rx {
                    let r = out.write_all(&chunk).and_then(|()| out.flush());
                    q.fetch_sub(chunk.len(), Ordering::Relaxed);
                    if r.is_err() {
                        // A closed pipe (`| head`): the daemon stops quietly.
                        c.store(true, Ordering::Release);
                        return;
                    }
                }
            })?;
        Ok(Self {
            format,
            color,
            buf: Vec::with_capacity(64 * 1024),
            records: 0,
            line: String::new(),
            json: json::JsonWriter::default(),
            tx: Some(tx),
            queued,
            closed,
            writer: Some(writer),
            dropped: 0,
        })
    }

    fn write_record(&mut self, rec: &Record) {
        match self.format {
            Format::Json => self.json.write(&mut self.buf, rec),
            Format::Text => {
                self.line.clear();
                text::write_record(&mut self.line, rec, self.color);
                self.buf.extend_from_slice(self.line.as_bytes());
            }
        }
        self.records += 1;
    }

    fn write_header(&mut self) {
        if self.format == Format::Text {
            self.buf.extend_from_slice(text::HEADER.as_bytes());
            self.buf.push(b'\n');
        }
    }

    /// Hands what is buffered to the writer; drops it (counted) when the writer is too far
    /// behind.
    fn hand_over(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(64 * 1024));
        let records = std::mem::take(&mut self.records);
        let len = chunk.len();
        let room = self.queued.load(Ordering::Relaxed) + len <= STDOUT_QUEUE_BYTES;
        let sent = room
            && self.tx.as_ref().is_some_and(|tx| {
                self.queued.fetch_add(len, Ordering::Relaxed);
                tx.send(chunk).is_ok()
            });
        if !sent {
            self.dropped += records;
        }
    }

    /// The reader went away (a closed pipe).
    pub fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Flushes and waits (up to `limit`) for the writer to finish.
    fn wait_written(&mut self, limit: Duration) {
        self.hand_over();
        self.tx = None;
        let deadline = Instant::now() + limit;
        while self.queued.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            if self.closed() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.queued.load(Ordering::Relaxed) == 0
            && let Some(w) = self.writer.take()
        {
            let _ = w.join();
        }
    }
}

impl Sink for Stdout {
    fn name(&self) -> &'static str {
        "stdout"
    }

    fn admit_transition(&mut self, _now: Instant) -> bool {
        true
    }

    fn write_admitted(&mut self, rec: &Record) {
        self.write_record(rec);
    }

    fn emit(&mut self, rec: &Record, _now: Instant) {
        self.write_record(rec);
    }

    fn flush(&mut self, _now: Instant) -> bool {
        self.hand_over();
        !self.closed()
    }

    fn header(&mut self) {
        self.write_header();
    }

    fn finish(&mut self, limit: Duration) {
        self.wait_written(limit);
    }

    fn dropped(&self) -> u64 {
        self.dropped
    }
}
