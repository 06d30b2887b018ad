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
    time::{Instant, SystemTime},
};

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

pub struct LogFile {
    opts: LogOptions,
    file: File,
    ino: (u64, u64),
    size: u64,
    buf: Vec<u8>,
    rate: Option<RateLimit>,
    suppressed: u64,
    /// Transition records dropped by the rate limit since start.
    pub suppressed_total: u64,
    /// Records in `buf`, not yet written.
    buffered: u64,
    /// Records lost to write errors since start.
    pub dropped_total: u64,
    last_check: Instant,
    json: super::json::JsonWriter,
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
    /// Opens (creating) the log; the error names the path.
    pub fn open(opts: LogOptions) -> Result<Self, LogError> {
        let (file, ino, size) = open(&opts.path).map_err(|reason| LogError {
            path: opts.path.clone(),
            reason,
        })?;
        let now = Instant::now();
        Ok(Self {
            rate: opts.rate.map(|r| RateLimit::new(r, now)),
            opts,
            file,
            ino,
            size,
            buf: Vec::with_capacity(256 * 1024),
            suppressed: 0,
            suppressed_total: 0,
            buffered: 0,
            dropped_total: 0,
            last_check: now,
            json: super::json::JsonWriter::default(),
            check_torn: true,
        })
    }

    pub fn emit(&mut self, rec: &Record, now: Instant) {
        // Resets come at the network's pace, like transitions: the same limit.
        if matches!(rec, Record::Transition(_) | Record::Reset(_)) && !self.admit_transition(now) {
            return;
        }
        self.write(rec);
    }

    /// Whether the next transition record is to be written (counted as
    /// suppressed when not): asked before the record is even built.
    pub fn admit_transition(&mut self, now: Instant) -> bool {
        if !self.opts.transitions {
            return false;
        }
        if let Some(rate) = &mut self.rate
            && !rate.admit(now)
        {
            self.suppressed += 1;
            self.suppressed_total += 1;
            return false;
        }
        true
    }

    /// Appends a record the caller already admitted.
    pub fn write(&mut self, rec: &Record) {
        self.json.write(&mut self.buf, rec);
        self.buffered += 1;
    }

    /// Writes the batch; once a second also says how many transitions the
    /// rate limit dropped and checks for rotation. On an error the batch is
    /// dropped and counted, never kept: the next batch starts clean.
    pub fn flush(&mut self, now: Instant) -> io::Result<()> {
        if now.saturating_duration_since(self.last_check).as_secs() >= 1 {
            self.last_check = now;
            if self.suppressed > 0 {
                let n = std::mem::take(&mut self.suppressed);
                self.emit(
                    &Record::Suppressed(Suppressed {
                        ts: SystemTime::now(),
                        transitions: n,
                    }),
                    now,
                );
            }
            if let Err(e) = self.follow_path() {
                self.drop_batch();
                return Err(e);
            }
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let r = self.write_batch();
        if r.is_err() {
            self.drop_batch();
        }
        self.buf.clear();
        self.buffered = 0;
        // A batch that grew huge once must not keep its memory.
        self.buf.shrink_to(256 * 1024);
        r
    }

    fn drop_batch(&mut self) {
        self.dropped_total += self.buffered;
        self.buffered = 0;
        self.buf.clear();
    }

    fn write_batch(&mut self) -> io::Result<()> {
        if let Some(max) = self.opts.max_size
            && self.size > 0
            && self.size + self.buf.len() as u64 > max
        {
            self.rotate()?;
        }
        let before = self.file.metadata().map_or(self.size, |m| m.len());
        if self.check_torn && is_torn(&self.file, before)? {
            self.buf.insert(0, b'\n');
        }
        if let Err(e) = self.file.write_all(&self.buf) {
            // Part of the batch may be in the file: cut it back to the last whole line, so
            // readers never see a spliced record and nothing is written twice.
            let _ = self.file.set_len(before);
            self.size = before;
            return Err(e);
        }
        self.check_torn = false;
        self.size = before + self.buf.len() as u64;
        Ok(())
    }

    /// Reopens when the path no longer names our file (renamed or removed
    /// by logrotate), and notices copytruncate.
    pub fn follow_path(&mut self) -> io::Result<()> {
        match std::fs::metadata(&self.opts.path) {
            Ok(m) if (m.dev(), m.ino()) == self.ino => {
                self.size = m.len();
                Ok(())
            }
            _ => self.reopen(),
        }
    }

    /// SIGHUP: reopen the path unconditionally (recreating its directory).
    pub fn reopen(&mut self) -> io::Result<()> {
        let (file, ino, size) = open(&self.opts.path)?;
        self.file = file;
        self.ino = ino;
        self.size = size;
        self.check_torn = true;
        Ok(())
    }

    /// Built-in rotation: PATH -> PATH.1 -> ... -> PATH.keep (dropped).
    fn rotate(&mut self) -> io::Result<()> {
        rotate_files(&self.opts.path, self.opts.keep)?;
        self.reopen()
    }

    pub fn path(&self) -> &Path {
        &self.opts.path
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
        let mut log = LogFile::open(LogOptions {
            path: path.clone(),
            rate: None,
            transitions: true,
            max_size: Some(400),
            keep: 2,
        })
        .expect("open");
        let t = Instant::now();
        for _ in 0..20 {
            log.emit(&stopped(), t);
            log.flush(t).expect("flush");
        }
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
        let mut log = LogFile::open(LogOptions {
            path: path.clone(),
            rate: None,
            transitions: true,
            max_size: None,
            keep: 0,
        })
        .expect("open");
        let t = Instant::now();
        log.emit(&stopped(), t);
        log.flush(t).expect("flush");
        std::fs::rename(&path, path.with_extension("old")).expect("rename");
        log.emit(&stopped(), t);
        log.flush(t + Duration::from_secs(2)).expect("flush");
        let new = std::fs::read_to_string(&path).expect("reopened");
        let old = std::fs::read_to_string(path.with_extension("old")).expect("old");
        assert_eq!((old.lines().count(), new.lines().count()), (1, 1));
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
            LogFile::open(opts(&p)).err()
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
        let mut log = LogFile::open(opts(&path)).expect("open");
        std::fs::remove_file(&path).expect("rm");
        mkfifo(&path);
        let (log, r) = within(Duration::from_secs(5), move || {
            let r = log.reopen();
            (log, r)
        })
        .expect("the reopen returns at once");
        let e = r.expect_err("a FIFO is refused");
        assert!(e.to_string().contains("it is a FIFO"), "{e}");
        assert_eq!(log.path(), path);
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
        let mut log = LogFile::open(opts(&path)).expect("open");
        let t = Instant::now();
        log.emit(&stopped(), t);
        log.flush(t).expect("flush");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text:?}");
        serde_json::from_str::<Record>(lines[1]).expect("the next record is whole");
        assert_eq!(log.size, text.len() as u64);

        // Torn again while we had it open (another writer, e.g. `tcpstate kill`), then SIGHUP.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"type\""))
            .expect("append");
        log.reopen().expect("reopen");
        log.emit(&stopped(), t);
        log.flush(t).expect("flush");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text:?}");
        serde_json::from_str::<Record>(lines[3]).expect("whole after the reopen");

        // A whole log, or an empty one, gains no blank line.
        log.reopen().expect("reopen");
        log.emit(&stopped(), t);
        log.flush(t).expect("flush");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 5, "{text:?}");
        assert!(!text.contains("\n\n"), "{text:?}");
        std::fs::write(&path, "").expect("truncate");
        log.reopen().expect("reopen");
        log.emit(&stopped(), t);
        log.flush(t).expect("flush");
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
        let err = LogFile::open(LogOptions {
            path: PathBuf::from("/proc/tcpstate/log"),
            rate: None,
            transitions: true,
            max_size: None,
            keep: 0,
        })
        .err()
        .expect("must fail")
        .to_string();
        assert!(err.contains("/proc/tcpstate"), "{err}");
        assert!(!err.contains('\n'));
    }
}
