//! Where records go: stdout (text or JSON Lines), the log file, and the
//! pages served over HTTP (metrics, status). Every sink is bounded and none
//! can stall the daemon: stdout and the log each have a writer thread fed by a queue
//! bounded in bytes, so a reader that stops reading or a disk that stops writing loses
//! records, counted.

pub mod escape;
pub mod http;
pub mod json;
pub mod logfile;
pub mod metrics;
pub mod summary;
pub mod text;

use std::{
    io::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use self::logfile::LogFile;
use crate::{cli::Format, record::Record};

/// Bytes queued for the stdout writer at most; past it records are dropped.
const STDOUT_QUEUE_BYTES: usize = 4 << 20;

/// Stdout through a writer thread: records are serialised into one buffer per batch and handed
/// over, so a terminal, pipe or FIFO whose reader stops blocks only that thread.
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
    pub dropped: u64,
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

    pub fn emit(&mut self, rec: &Record) {
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

    pub fn header(&mut self) {
        if self.format == Format::Text {
            self.buf.extend_from_slice(text::HEADER.as_bytes());
            self.buf.push(b'\n');
        }
    }

    /// Hands what is buffered to the writer; drops it (counted) when the writer is too far
    /// behind.
    pub fn flush(&mut self) {
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
    pub fn finish(&mut self, limit: Duration) {
        self.flush();
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

/// Every place a record goes.
pub struct Sinks {
    pub stdout: Option<Stdout>,
    pub log: Option<LogFile>,
}

impl Sinks {
    pub fn new(stdout: Option<Stdout>, log: Option<LogFile>) -> Self {
        Self { stdout, log }
    }

    /// `now` is read once per batch: a clock read per record showed in the profile, and the
    /// rate limit needs no finer grain.
    pub fn emit(&mut self, rec: &Record, now: Instant) {
        if let Some(out) = &mut self.stdout {
            out.emit(rec);
        }
        if let Some(log) = &mut self.log {
            log.emit(rec, now);
        }
    }

    /// A transition record, built only when some sink takes it: under a flood
    /// the log's rate limit drops most, and building them showed in the
    /// profile.
    pub fn transition(&mut self, now: Instant, make: impl FnOnce() -> Record) {
        let log = self.log.as_mut().is_some_and(|l| l.admit_transition(now));
        if !log && self.stdout.is_none() {
            return;
        }
        let rec = make();
        if let Some(out) = &mut self.stdout {
            out.emit(&rec);
        }
        if log && let Some(l) = &mut self.log {
            l.write(&rec);
        }
    }

    /// Hands what is buffered to the writers; neither waits on its file or reader (a failing
    /// log is warned about by its writer, its records counted as dropped). Returns false when
    /// stdout's reader went away.
    pub fn flush(&mut self, now: Instant) -> bool {
        if let Some(log) = &mut self.log {
            log.flush(now);
        }
        match &mut self.stdout {
            Some(out) => {
                out.flush();
                !out.closed()
            }
            None => true,
        }
    }

    pub fn log_dropped(&self) -> u64 {
        self.log.as_ref().map_or(0, LogFile::dropped)
    }

    pub fn log_suppressed(&self) -> u64 {
        self.log.as_ref().map_or(0, |l| l.suppressed_total)
    }

    pub fn stdout_dropped(&self) -> u64 {
        self.stdout.as_ref().map_or(0, |s| s.dropped)
    }
}
