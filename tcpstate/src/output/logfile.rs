//! `--log-file`: the transition log as JSON Lines.
//!
//! - Whole lines: records are serialised into a buffer and written with one
//!   append per batch, so a reader sees whole records. A write that fails
//!   part-way (disk full) is cut back to the last whole line and the batch is
//!   dropped, counted: memory stays bounded and nothing is written twice. A
//!   fatal signal (`kill -9`, the OOM killer) can still stop a write to a
//!   regular file part-way, leaving a torn last line: after every open
//!   (start and reopen) the first append ends such a line with a newline, so
//!   only that record is lost and the next starts whole.
//! - Safety: the path is opened without following a final symlink (a user
//!   who can write its directory cannot point root's log at another file),
//!   mode 0640, and must be a regular file: a FIFO put at the path would
//!   otherwise block the open, and with it the daemon, until a reader came.
//! - Rotation: O_APPEND makes logrotate's copytruncate safe; rename or
//!   removal is noticed by comparing the path's inode with ours (checked
//!   every second and on SIGHUP), and the path is reopened.
//! - Off the engine: the engine only serialises records into a batch and hands it to the
//!   log's own writer thread over a queue bounded in bytes; the writes, opens, renames and
//!   rotations run there. A slow or frozen disk stops that thread alone: past the bound,
//!   batches are dropped and counted (`log_dropped`), and the engine goes on.
//! - Flood safety: transition records pass a token bucket (`--log-rate`),
//!   with a `suppressed` record saying how many were dropped; anomalies
//!   always pass. `--log-max-size`/`--log-keep` cap the disk used.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::fs::{FileExt as _, FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime},
};

use super::Sink;
use crate::record::{Record, Suppressed};

#[derive(Clone, Debug)]
pub struct LogOptions {
    pub path: PathBuf,
    /// Transition records per second; None = unlimited.
    pub rate: Option<u32>,
    /// Write transition records at all.
    pub transitions: bool,
    /// Rotate ourselves past this size; None = leave it to logrotate.
    pub max_size: Option<u64>,
    /// Rotated files kept by the built-in rotation (PATH.1 .. PATH.N).
    pub keep: u32,
}

/// Token bucket over transition records.
#[derive(Debug)]
pub struct RateLimit {
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub fn new(per_sec: u32, now: Instant) -> Self {
        Self {
            per_sec: f64::from(per_sec),
            tokens: f64::from(per_sec),
            last: now,
        }
    }

    pub fn admit(&mut self, now: Instant) -> bool {
        // A whole drained batch shares one `now`: refill once per batch.
        if now != self.last {
            let dt = now.saturating_duration_since(self.last).as_secs_f64();
            self.last = now;
            self.tokens = (self.tokens + dt * self.per_sec).min(self.per_sec);
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Bytes of batches queued for the log's writer at most; past it batches are dropped.
const LOG_QUEUE_BYTES: usize = 16 << 20;
/// How often the writer looks whether the path still names its file.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// The engine's side of the log: what is admitted (rate limit, `--log-transitions`), the
/// batch being serialised, and the queue to the writer thread.
pub struct LogFile {
    path: PathBuf,
    transitions: bool,
    rate: Option<RateLimit>,
    /// Suppressed since the last `suppressed` record said how many.
    unsaid: u64,
    /// Transition records dropped by the rate limit since start.
    suppressed_total: u64,
    buf: Vec<u8>,
    /// Records in `buf`, not yet handed over.
    buffered: u64,
    last_tick: Instant,
    json: super::json::JsonWriter,
    tx: Option<mpsc::Sender<Command>>,
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// What the engine and the writer thread both see.
#[derive(Default)]
struct Shared {
    /// Bytes handed over and not yet written (or given up on).
    queued: AtomicUsize,
    /// Records lost since start: to write errors, or because the queue was full.
    dropped: AtomicU64,
}

enum Command {
    Batch {
        bytes: Vec<u8>,
        records: u64,
    },
    /// SIGHUP: reopen the path.
    Reopen,
}

/// The file side, owned by the writer thread: appends whole batches, rotates, follows the
/// path when it is renamed or removed.
struct Appender {
    path: PathBuf,
    max_size: Option<u64>,
    keep: u32,
    file: File,
    ino: (u64, u64),
    size: u64,
    /// The file was (re)opened and its last byte not yet looked at: the next append ends a
    /// torn line first. The newline goes out with that append, not at the open, so it is cut
    /// back with it on a failed write and a full disk does not stop the open.
    check_torn: bool,
}

fn open(path: &Path) -> io::Result<(File, (u64, u64), u64)> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new()
        // Read too: with O_RDWR a FIFO opens at once, reader or not, for the check below to
        // name it; and the last byte says whether a write was torn.
        .read(true)
        .create(true)
        .append(true)
        .mode(0o640)
        // O_NONBLOCK: opening a FIFO blocks until its other end is opened, which would stop
        // the daemon; with it the open returns at once and the check below refuses what is
        // not a regular file. O_NOCTTY: a terminal put at the path must not become ours.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => io::Error::new(
                e.kind(),
                "it is a symbolic link (refused: the log is opened as root)",
            ),
            // What opening a UNIX socket gives.
            Some(libc::ENXIO) => not_a_file("a socket"),
            _ => e,
        })?;
    let m = file.metadata()?;
    let ft = m.file_type();
    if !ft.is_file() {
        return Err(not_a_file(if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        }));
    }
    // Back to blocking, as a log file is written: O_NONBLOCK was only for the open.
    // SAFETY: fcntl on an fd we own, with integer arguments.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok((file, (m.dev(), m.ino()), m.len()))
}

fn not_a_file(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("it is {what} (refused: the log must be a regular file)"),
    )
}

/// Whether the file, `size` bytes long, ends in part of a record: its writer was killed
/// mid-write.
fn is_torn(file: &File, size: u64) -> io::Result<bool> {
    let Some(at) = size.checked_sub(1) else {
        return Ok(false);
    };
    let mut last = [0u8; 1];
    // 0 bytes: truncated since the fstat (copytruncate), so nothing is left to end.
    Ok(file.read_at(&mut last, at)? == 1 && last[0] != b'\n')
}

impl LogFile {
    /// Opens (creating) the log and starts its writer; the error names the path. A failing
    /// write is warned about at most once per `warn_every`.
    pub fn open(opts: LogOptions, warn_every: Duration) -> Result<Self, LogError> {
        let err = |reason| LogError {
            path: opts.path.clone(),
            reason,
        };
        let appender = Appender::open(&opts).map_err(err)?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel();
        let s = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("tcpstate-log".into())
            .spawn(move || write_loop(appender, &rx, &s, warn_every))
            .map_err(err)?;
        let now = Instant::now();
        Ok(Self {
            path: opts.path,
            transitions: opts.transitions,
            rate: opts.rate.map(|r| RateLimit::new(r, now)),
            unsaid: 0,
            suppressed_total: 0,
            buf: Vec::with_capacity(256 * 1024),
            buffered: 0,
            last_tick: now,
            json: super::json::JsonWriter::default(),
            tx: Some(tx),
            shared,
            writer: Some(writer),
        })
    }

    /// Whether the next transition record is to be written (counted as
    /// suppressed when not): asked before the record is even built.
    fn admit(&mut self, now: Instant) -> bool {
        if !self.transitions {
            return false;
        }
        if let Some(rate) = &mut self.rate
            && !rate.admit(now)
        {
            self.unsaid += 1;
            self.suppressed_total += 1;
            return false;
        }
        true
    }

    /// Appends a record the caller already admitted.
    fn write(&mut self, rec: &Record) {
        self.json.write(&mut self.buf, rec);
        self.buffered += 1;
    }

    /// Hands the batch to the writer; once a second also says how many transitions the rate
    /// limit dropped. Never waits: when the writer is too far behind (a slow disk), the batch
    /// is dropped and counted.
    fn hand_over(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_tick) >= FOLLOW_EVERY {
            self.last_tick = now;
            if self.unsaid > 0 {
                let n = std::mem::take(&mut self.unsaid);
                self.write(&Record::Suppressed(Suppressed {
                    ts: SystemTime::now(),
                    transitions: n,
                }));
            }
        }
        if self.buf.is_empty() {
            return;
        }
        // A batch that grew huge once must not keep its memory.
        let bytes = std::mem::replace(&mut self.buf, Vec::with_capacity(256 * 1024));
        let records = std::mem::take(&mut self.buffered);
        let len = bytes.len();
        let room = self.shared.queued.load(Ordering::Relaxed) + len <= LOG_QUEUE_BYTES;
        let sent = room
            && self.tx.as_ref().is_some_and(|tx| {
                self.shared.queued.fetch_add(len, Ordering::Relaxed);
                tx.send(Command::Batch { bytes, records }).is_ok()
            });
        if !sent {
            self.shared.dropped.fetch_add(records, Ordering::Relaxed);
        }
    }

    /// Waits (up to `limit`) until everything handed over is written; false if it was not.
    pub fn written(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.shared.queued.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Sink for LogFile {
    fn name(&self) -> &'static str {
        "log"
    }

    fn admit_transition(&mut self, now: Instant) -> bool {
        self.admit(now)
    }

    fn write_admitted(&mut self, rec: &Record) {
        self.write(rec);
    }

    fn emit(&mut self, rec: &Record, now: Instant) {
        // Resets come at the network's pace, like transitions: the same limit.
        if matches!(
            rec,
            Record::Transition(_) | Record::Reset(_) | Record::BindRefused(_)
        ) && !self.admit(now)
        {
            return;
        }
        self.write(rec);
    }

    fn flush(&mut self, now: Instant) -> bool {
        self.hand_over(now);
        true
    }

    /// SIGHUP: the writer reopens the path (recreating its directory), in its turn.
    fn reopen(&mut self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Command::Reopen);
        }
    }

    /// Flushes, then waits (up to `limit`) for the writer to write everything and stop: on
    /// SIGTERM nothing recorded is lost unless the disk is stuck past `limit`.
    fn finish(&mut self, limit: Duration) {
        self.hand_over(Instant::now());
        self.tx = None;
        if self.written(limit)
            && let Some(w) = self.writer.take()
        {
            let _ = w.join();
        }
    }

    /// Records lost to write errors or a full queue since start.
    fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    fn suppressed(&self) -> u64 {
        self.suppressed_total
    }
}

/// The writer thread: batches in order, a look at the path every second, reopens on SIGHUP.
fn write_loop(
    mut app: Appender,
    rx: &mpsc::Receiver<Command>,
    shared: &Shared,
    warn_every: Duration,
) {
    let mut last_follow = Instant::now();
    let mut warned: Option<Instant> = None;
    let mut warn = |what: std::fmt::Arguments<'_>| {
        let now = Instant::now();
        if warned.is_none_or(|t| now.saturating_duration_since(t) >= warn_every) {
            warned = Some(now);
            crate::warn(what);
        }
    };
    let shown = crate::output::escape::escape(&app.path.display().to_string()).into_owned();
    loop {
        let cmd = rx.recv_timeout(FOLLOW_EVERY);
        let mut failed = None;
        if last_follow.elapsed() >= FOLLOW_EVERY {
            last_follow = Instant::now();
            failed = app.follow_path().err();
        }
        match cmd {
            Ok(Command::Batch { mut bytes, records }) => {
                let r = match failed {
                    Some(e) => Err(e),
                    None => app.append(&mut bytes),
                };
                if let Err(e) = r {
                    let lost = shared.dropped.fetch_add(records, Ordering::Relaxed) + records;
                    warn(format_args!(
                        "writing {shown}: {e}; {lost} records dropped so far"
                    ));
                }
                shared.queued.fetch_sub(bytes.len(), Ordering::Release);
            }
            Ok(Command::Reopen) => {
                // One per SIGHUP, which only root sends: not limited.
                if let Err(e) = app.reopen() {
                    crate::warn(format_args!("cannot reopen {shown}: {e}"));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(e) = failed {
                    warn(format_args!("writing {shown}: {e}"));
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

impl Appender {
    fn open(opts: &LogOptions) -> io::Result<Self> {
        let (file, ino, size) = open(&opts.path)?;
        Ok(Self {
            path: opts.path.clone(),
            max_size: opts.max_size,
            keep: opts.keep,
            file,
            ino,
            size,
            check_torn: true,
        })
    }

    /// Appends the batch in one write. On an error what reached the file is cut back to the
    /// last whole line, so readers never see a spliced record and nothing is written twice.
    /// `buf` keeps its length (a torn-line newline put before it is taken out again).
    fn append(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        let len = buf.len();
        if let Some(max) = self.max_size
            && self.size > 0
            && self.size + len as u64 > max
        {
            self.rotate()?;
        }
        let before = self.file.metadata().map_or(self.size, |m| m.len());
        let torn = self.check_torn && is_torn(&self.file, before)?;
        if torn {
            buf.insert(0, b'\n');
        }
        let r = self.file.write_all(buf);
        let written = buf.len() as u64;
        if torn {
            buf.remove(0);
        }
        if let Err(e) = r {
            let _ = self.file.set_len(before);
            self.size = before;
            return Err(e);
        }
        self.check_torn = false;
        self.size = before + written;
        Ok(())
    }

    /// Reopens when the path no longer names our file (renamed or removed
    /// by logrotate), and notices copytruncate.
    fn follow_path(&mut self) -> io::Result<()> {
        match std::fs::metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.ino => {
                self.size = m.len();
                Ok(())
            }
            _ => self.reopen(),
        }
    }

    /// Reopens the path unconditionally (recreating its directory).
    fn reopen(&mut self) -> io::Result<()> {
        let (file, ino, size) = open(&self.path)?;
        self.file = file;
        self.ino = ino;
        self.size = size;
        self.check_torn = true;
        Ok(())
    }

    /// Built-in rotation: PATH -> PATH.1 -> ... -> PATH.keep (dropped).
    fn rotate(&mut self) -> io::Result<()> {
        rotate_files(&self.path, self.keep)?;
        self.reopen()
    }
}

/// Appends whole lines to the log at `path` in one write, as another process than the daemon
/// (`tcpstate kill`): opened as the daemon opens it (a regular file, never a FIFO to block
/// on), and a torn last line ended first.
pub fn append_lines(path: &Path, lines: &str) -> io::Result<()> {
    let (file, _, size) = open(path)?;
    let mut buf = Vec::with_capacity(lines.len() + 1);
    if is_torn(&file, size)? {
        buf.push(b'\n');
    }
    buf.extend_from_slice(lines.as_bytes());
    (&file).write_all(&buf)
}

/// Moves PATH to PATH.1, shifting the rotated files up and dropping the one past `keep`; returns
/// how many files it renamed. Only files there are moved: PATH.1 .. PATH.n up to the first
/// missing one (a file past a gap stays put, still older than those before it). So a rotation
/// on the loop thread costs a stat and a rename per file kept, not one per file it may keep.
fn rotate_files(path: &Path, keep: u32) -> io::Result<u32> {
    let name = |i: u32| {
        let mut p = path.to_path_buf().into_os_string();
        p.push(format!(".{i}"));
        PathBuf::from(p)
    };
    if keep == 0 {
        std::fs::remove_file(path)?;
        return Ok(0);
    }
    // PATH.keep is replaced, not shifted: it is the one dropped.
    let present = (1..keep)
        .take_while(|&i| std::fs::symlink_metadata(name(i)).is_ok())
        .count() as u32;
    for i in (1..=present).rev() {
        // A file removed meanwhile (by hand, by logrotate) is a gap: nothing to move.
        let _ = std::fs::rename(name(i), name(i + 1));
    }
    std::fs::rename(path, name(1))?;
    Ok(present + 1)
}

/// The log could not be opened: one line naming the path and why.
#[derive(Debug, thiserror::Error)]
// The reason is in the message and deliberately not a `#[source]`: printed with its chain, the
// error would say it twice.
#[error("cannot open log file {}: {reason}", path.display())]
pub struct LogError {
    pub path: PathBuf,
    pub reason: io::Error,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::record::Stopped;

    fn stopped() -> Record {
        Record::Stopped(Stopped {
            ts: SystemTime::UNIX_EPOCH,
            events: 1,
            dropped: 0,
            recursion_misses: 0,
            undecodable: 0,
            table_full: 0,
            timewait_full: 0,
            log_dropped: 0,
            filtered: 0,
            uptime_s: 1.0,
        })
    }

    const WARN: Duration = Duration::from_secs(60);

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tcpstate-log-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d.join("log.jsonl")
    }

    #[test]
    fn rate_limit_admits_the_rate_then_refills() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10, t0);
        assert_eq!((0..20).filter(|_| r.admit(t0)).count(), 10);
        assert!(!r.admit(t0));
        assert!(r.admit(t0 + Duration::from_millis(150)));
    }

    #[test]
    fn built_in_rotation_keeps_n_files_of_whole_lines() {
        let path = tmp("rotate");
        let mut log = LogFile::open(
            LogOptions {
                path: path.clone(),
                rate: None,
                transitions: true,
                max_size: Some(400),
                keep: 2,
            },
            WARN,
        )
        .expect("open");
        let t = Instant::now();
        for _ in 0..20 {
            log.emit(&stopped(), t);
            log.flush(t);
        }
        assert!(log.written(Duration::from_secs(5)));
        let mut total = 0;
        for p in [
            path.clone(),
            path.with_extension("jsonl.1"),
            path.with_extension("jsonl.2"),
        ] {
            let text = std::fs::read_to_string(&p).expect("rotated file exists");
            assert!(text.len() <= 400, "{} is {} bytes", p.display(), text.len());
            for line in text.lines() {
                serde_json::from_str::<Record>(line).expect("whole record");
                total += 1;
            }
        }
        assert!(!path.with_extension("jsonl.3").exists());
        assert!(total > 0 && total < 20, "older files were dropped: {total}");
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[test]
    fn reopens_after_rename() {
        let path = tmp("rename");
        let mut log = LogFile::open(opts(&path), WARN).expect("open");
        let t = Instant::now();
        log.emit(&stopped(), t);
        log.flush(t);
        assert!(log.written(Duration::from_secs(5)));
        std::fs::rename(&path, path.with_extension("old")).expect("rename");
        // The writer looks at the path once a second.
        std::thread::sleep(Duration::from_millis(1100));
        log.emit(&stopped(), t);
        log.flush(t);
        assert!(log.written(Duration::from_secs(5)));
        let new = std::fs::read_to_string(&path).expect("reopened");
        let old = std::fs::read_to_string(path.with_extension("old")).expect("old");
        assert_eq!((old.lines().count(), new.lines().count()), (1, 1));
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    /// The engine hands batches over and goes on; a writer stuck on its file (here: behind a
    /// lock on its queue's far end, as a frozen disk holds it) costs queued batches, counted,
    /// never a wait.
    #[test]
    fn a_stuck_writer_never_holds_the_engine() {
        let path = tmp("stuck");
        let mut log = LogFile::open(opts(&path), WARN).expect("open");
        // Pretend the writer is 16 MiB behind.
        log.shared.queued.store(LOG_QUEUE_BYTES, Ordering::Relaxed);
        let t = Instant::now();
        let started = Instant::now();
        for _ in 0..1000 {
            log.emit(&stopped(), t);
            log.flush(t);
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(log.dropped(), 1000);
        log.shared.queued.store(0, Ordering::Relaxed);
        log.emit(&stopped(), t);
        log.finish(Duration::from_secs(5));
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(
            text.lines().count(),
            1,
            "the queue is taken again once it drains"
        );
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    fn opts(path: &Path) -> LogOptions {
        LogOptions {
            path: path.to_path_buf(),
            rate: None,
            transitions: true,
            max_size: None,
            keep: 0,
        }
    }

    /// Runs `f` on a thread; None if it has not returned within `limit` (the thread is left
    /// behind: what it is stuck in cannot be interrupted).
    fn within<T: Send + 'static>(
        limit: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(limit).ok()
    }

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    }

    #[test]
    fn a_fifo_at_the_path_is_refused_not_waited_on() {
        let path = tmp("fifo");
        std::fs::create_dir_all(path.parent().expect("dir")).expect("dir");
        mkfifo(&path);
        let p = path.clone();
        let err = within(Duration::from_secs(5), move || {
            LogFile::open(opts(&p), WARN).err()
        })
        .expect("the open returns at once")
        .expect("a FIFO is refused")
        .to_string();
        assert!(
            err.contains("it is a FIFO") && err.contains("regular file"),
            "{err}"
        );
        assert!(!err.contains('\n'));

        // A FIFO put at the path of a running log: the reopen fails, it does not block.
        let _ = std::fs::remove_file(&path);
        let mut app = Appender::open(&opts(&path)).expect("open");
        std::fs::remove_file(&path).expect("rm");
        mkfifo(&path);
        let r = within(Duration::from_secs(5), move || app.reopen())
            .expect("the reopen returns at once");
        let e = r.expect_err("a FIFO is refused");
        assert!(e.to_string().contains("it is a FIFO"), "{e}");
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[test]
    fn devices_are_refused() {
        let e = open(Path::new("/dev/null")).expect_err("a device");
        assert!(e.to_string().contains("it is a device"), "{e}");
    }

    #[test]
    fn rotation_moves_only_the_files_there_are() {
        let path = tmp("keep");
        let dir = path.parent().expect("dir").to_path_buf();
        std::fs::create_dir_all(&dir).expect("dir");
        let file = |suffix: &str| path.with_extension(format!("jsonl{suffix}"));
        std::fs::write(&path, "new\n").expect("write");
        std::fs::write(file(".1"), "one\n").expect("write");
        // A gap at .2: .3 is older than .1 and stays where it is.
        std::fs::write(file(".3"), "three\n").expect("write");
        // The largest --log-keep there could be: one rename per possible file would take
        // hours on the loop thread.
        let p = path.clone();
        let renamed = within(Duration::from_secs(10), move || rotate_files(&p, u32::MAX))
            .expect("rotation returns at once")
            .expect("rotate");
        assert_eq!(renamed, 2);
        let read = |suffix: &str| std::fs::read_to_string(file(suffix)).ok();
        assert_eq!(read(""), None);
        assert_eq!(read(".1").as_deref(), Some("new\n"));
        assert_eq!(read(".2").as_deref(), Some("one\n"));
        assert_eq!(read(".3").as_deref(), Some("three\n"));
        // keep=2: .1 replaces .2, the oldest kept, and nothing moves past it.
        std::fs::write(&path, "newer\n").expect("write");
        assert_eq!(rotate_files(&path, 2).expect("rotate"), 2);
        assert_eq!(read(".1").as_deref(), Some("newer\n"));
        assert_eq!(read(".2").as_deref(), Some("new\n"));
        assert_eq!(read(".3").as_deref(), Some("three\n"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_torn_last_line_is_ended_on_open_and_reopen() {
        let path = tmp("torn");
        std::fs::create_dir_all(path.parent().expect("dir")).expect("dir");
        // What a writer killed mid-write leaves.
        std::fs::write(&path, "{\"type\":\"stopped\",\"ts\":\"2024").expect("write");
        let mut app = Appender::open(&opts(&path)).expect("open");
        let line = || {
            serde_json::to_string(&stopped())
                .expect("json")
                .into_bytes()
        };
        let append = |app: &mut Appender| {
            let mut l = line();
            l.push(b'\n');
            app.append(&mut l).expect("append");
        };
        append(&mut app);
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text:?}");
        serde_json::from_str::<Record>(lines[1]).expect("the next record is whole");
        assert_eq!(app.size, text.len() as u64);

        // Torn again while we had it open (another writer, e.g. `tcpstate kill`), then SIGHUP.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"type\""))
            .expect("append");
        app.reopen().expect("reopen");
        append(&mut app);
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text:?}");
        serde_json::from_str::<Record>(lines[3]).expect("whole after the reopen");

        // A whole log, or an empty one, gains no blank line.
        app.reopen().expect("reopen");
        append(&mut app);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 5, "{text:?}");
        assert!(!text.contains("\n\n"), "{text:?}");
        std::fs::write(&path, "").expect("truncate");
        app.reopen().expect("reopen");
        append(&mut app);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.starts_with('{') && text.lines().count() == 1,
            "{text:?}"
        );
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[test]
    fn another_writer_ends_a_torn_line_too() {
        let path = tmp("append");
        std::fs::create_dir_all(path.parent().expect("dir")).expect("dir");
        std::fs::write(&path, "{\"ty").expect("write");
        append_lines(&path, "{}\n{}\n").expect("append");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "{\"ty\n{}\n{}\n"
        );
        append_lines(&path, "{}\n").expect("append");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "{\"ty\n{}\n{}\n{}\n"
        );
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[test]
    fn unwritable_path_is_one_clear_error() {
        let err = LogFile::open(
            LogOptions {
                path: PathBuf::from("/proc/tcpstate/log"),
                rate: None,
                transitions: true,
                max_size: None,
                keep: 0,
            },
            WARN,
        )
        .err()
        .expect("must fail")
        .to_string();
        assert!(err.contains("/proc/tcpstate"), "{err}");
        assert!(!err.contains('\n'));
    }
}
