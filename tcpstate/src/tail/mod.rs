//! `tcpstate tail`: read a transition log.
//!
//! - Without `-f`: print the log (or its last `-n` matching records) and
//!   stop. `-n` scans backwards from the end in chunks, so `tail -n 10` of a
//!   large log reads a few kilobytes, not the whole file.
//! - With `-f`: like `tail -F`. Poll the open file for growth; notice
//!   truncation (size below our offset: start again at 0) and rotation (the
//!   path names another file, or none: finish the old file, then open the
//!   path afresh at offset 0). A last line without its newline is held back
//!   until the newline arrives.
//! - Lines that are not records are reported on stderr with their line
//!   number and skipped; so is a last line without its newline that is not
//!   a record, once the file is done.
//! - `-` (standard input), a pipe or another file that cannot seek is read
//!   as a stream: `-n` keeps the last N records in memory, `-f` reads until
//!   the writer closes. A path that stops naming a regular file while
//!   following (a FIFO put in its place) is not opened: it cannot hang us.

use std::{
    collections::VecDeque,
    fs::File,
    io::{self, IsTerminal as _, Write as _},
    os::unix::fs::{FileExt as _, FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::Path,
    time::{Duration, Instant},
};

use crate::{
    cli::TailArgs,
    output::{escape::escape, text},
    record::Record,
};

/// How often `-f` looks for growth, truncation and rotation.
const POLL: Duration = Duration::from_millis(200);
/// After the path stops naming our file, keep reading the old one until it
/// has been quiet this long: the daemon notices a rename within a second
/// and may append to the old file until then.
const ROTATE_GRACE: Duration = Duration::from_millis(1500);
/// Read size, forwards and backwards.
const CHUNK: usize = 64 * 1024;
/// Longer lines are skipped (and reported) rather than buffered.
const MAX_LINE: usize = 1 << 20;
/// `-f` without `-n` starts with this many records, like tail(1).
const FOLLOW_LINES: usize = 10;

mod filter;
mod lines;

pub use self::filter::{Filter, matches};
use self::lines::{Line, Lines, count_newlines, find_start, last_newline_end};

pub fn tail(args: TailArgs) -> anyhow::Result<()> {
    match run(&args) {
        Err(e) if broken_pipe(&e) => Ok(()),
        other => other,
    }
}

fn run(args: &TailArgs) -> anyhow::Result<()> {
    let path = args.path.as_path();
    let mut out = Out::new(args);
    if path.as_os_str() == "-" {
        out.header();
        return stream(io::stdin().lock(), &mut out, args.lines);
    }
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        // A pipe, a FIFO, /dev/stdin: no seeking, no rotation to follow.
        let file = File::open(path)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {}", out.name, io_msg(&e)))?;
        out.header();
        return stream(file, &mut out, args.lines);
    }
    let mut first = match Source::open(path) {
        Ok(src) => Some(src),
        Err(e) if args.follow && e.kind() == io::ErrorKind::NotFound => {
            note(&format!("waiting for {} to appear", out.name));
            None
        }
        Err(e) => anyhow::bail!("cannot open {}: {}", out.name, io_msg(&e)),
    };
    out.header();
    out.flush()?;

    let want = args.lines.or(if args.follow {
        Some(FOLLOW_LINES)
    } else {
        None
    });
    if let (Some(src), Some(n)) = (first.as_mut(), want) {
        let start = (|| {
            let len = src.file.metadata()?.len();
            let mut read = |buf: &mut [u8], off: u64| src.file.read_exact_at(buf, off);
            // With -f an unfinished last line is not ours to count yet.
            let end = if args.follow {
                last_newline_end(&mut read, len, CHUNK)?
            } else {
                len
            };
            find_start(&mut read, end, n, CHUNK, MAX_LINE, |l| out.wants(l))
        })()
        .map_err(|e| out.read_error(&e))?;
        src.start_at(start);
    }

    if args.follow {
        follow(path, &mut out, first)
    } else {
        let Some(mut src) = first else {
            return Ok(());
        };
        src.pump(&mut out)?;
        src.finish(&mut out);
        out.flush()
    }
}

/// The `-f` loop; returns only on an error (a closed stdout among them).
fn follow(path: &Path, out: &mut Out, mut cur: Option<Source>) -> anyhow::Result<()> {
    // Set once the path stops naming our file: when the old file last grew.
    let mut draining: Option<Instant> = None;
    let mut open_error_noted = false;
    loop {
        let Some(src) = cur.as_mut() else {
            match Source::open(path) {
                Ok(src) => {
                    cur = Some(src);
                    open_error_noted = false;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    if !open_error_noted {
                        note(&format!(
                            "cannot open {}: {}; retrying",
                            out.name,
                            io_msg(&e)
                        ));
                        open_error_noted = true;
                    }
                }
            }
            std::thread::sleep(POLL);
            continue;
        };

        let got = src.pump(out)?;
        let len = src.file.metadata().map_err(|e| out.read_error(&e))?.len();
        if len < src.offset {
            note(&format!("{} truncated", out.name));
            src.start_at(0);
            continue;
        }
        match draining {
            None => {
                if !names(path, src.id) {
                    draining = Some(Instant::now());
                }
            }
            Some(_) if got > 0 => draining = Some(Instant::now()),
            Some(since) if since.elapsed() >= ROTATE_GRACE => {
                src.finish(out);
                out.flush()?;
                cur = None;
                draining = None;
                continue;
            }
            Some(_) => {}
        }
        std::thread::sleep(POLL);
    }
}

/// Reads a stream to its end: every record, or with `-n` the last N that pass the filters.
fn stream(mut input: impl io::Read, out: &mut Out, last: Option<usize>) -> anyhow::Result<()> {
    let mut lines = Lines::new(MAX_LINE);
    let mut kept: VecDeque<Vec<u8>> = VecDeque::new();
    let mut number = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let mut take = |line: Line<'_>, out: &mut Out, number: u64| match (line, last) {
        (Line::Text(raw), Some(n)) if out.wants(raw) => {
            kept.push_back(raw.to_vec());
            if kept.len() > n {
                kept.pop_front();
            }
        }
        (Line::Text(raw), Some(_)) if Out::parse(raw).is_ok() || raw.trim_ascii().is_empty() => {}
        (line, _) => {
            let _ = out.line(line, || Ok(number));
        }
    };
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(out.read_error(&e)),
        };
        lines.push(&buf[..n], |line| {
            number += 1;
            take(line, out, number);
            Ok::<(), io::Error>(())
        })?;
        if last.is_none() {
            out.flush()?;
        }
    }
    if let Some(rest) = lines.take_partial() {
        take(Line::Text(&rest), out, number + 1);
    }
    for raw in kept {
        if let Ok(rec) = Out::parse(&raw) {
            out.record(&rec, &raw);
        }
    }
    out.flush()
}

/// Whether `path` still names the file with this (dev, inode).
fn names(path: &Path, id: (u64, u64)) -> bool {
    std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == id)
}

fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// "No such file or directory", without the " (os error 2)".
fn io_msg(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rsplit_once(" (os error ") {
        Some((msg, _)) => msg.to_owned(),
        None => s,
    }
}

/// One line on stderr, safe for a terminal (it may quote a path or a corrupt line); a closed
/// stderr is not worth dying for.
fn note(msg: &str) {
    let _ = writeln!(io::stderr(), "tcpstate: tail: {}", escape(msg));
}

/// Line numbers for error messages. When reading starts mid-file (`-n`),
/// the lines before are counted only if a message needs a number.
#[derive(Debug)]
struct LineCount {
    start: u64,
    /// Lines before `start`, once counted.
    before: Option<u64>,
    /// Lines since `start`, the current one included.
    seen: u64,
}

impl LineCount {
    fn at(start: u64) -> Self {
        Self {
            start,
            before: (start == 0).then_some(0),
            seen: 0,
        }
    }

    fn number(&mut self, file: &File) -> io::Result<u64> {
        let before = match self.before {
            Some(b) => b,
            None => {
                let mut read = |buf: &mut [u8], off: u64| file.read_at(buf, off);
                let b = count_newlines(&mut read, self.start, CHUNK)?;
                self.before = Some(b);
                b
            }
        };
        Ok(before + self.seen)
    }
}

/// One open log file and how far we have read it.
struct Source {
    file: File,
    /// (dev, inode), to notice rotation.
    id: (u64, u64),
    offset: u64,
    lines: Lines,
    count: LineCount,
    buf: Vec<u8>,
}

impl Source {
    /// Opens a regular file. Anything else (a FIFO put in the log's place) is refused without
    /// blocking: opening a FIFO would wait for a writer forever.
    fn open(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        let m = file.metadata()?;
        if !m.file_type().is_file() {
            let what = if m.file_type().is_fifo() {
                "a FIFO"
            } else {
                "not a regular file"
            };
            return Err(io::Error::new(io::ErrorKind::InvalidInput, what));
        }
        Ok(Self {
            file,
            id: (m.dev(), m.ino()),
            offset: 0,
            lines: Lines::new(MAX_LINE),
            count: LineCount::at(0),
            buf: vec![0u8; CHUNK],
        })
    }

    /// Read from `offset` on, forgetting any unfinished line.
    fn start_at(&mut self, offset: u64) {
        self.offset = offset;
        self.lines.clear();
        self.count = LineCount::at(offset);
    }

    /// Reads to the end of the file, printing every finished line; returns
    /// the bytes read.
    fn pump(&mut self, out: &mut Out) -> anyhow::Result<u64> {
        let mut total = 0;
        loop {
            let n = match self.file.read_at(&mut self.buf, self.offset) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(out.read_error(&e)),
            };
            self.offset += n as u64;
            total += n as u64;
            let Self {
                file,
                lines,
                count,
                buf,
                ..
            } = self;
            lines
                .push(&buf[..n], |line| {
                    count.seen += 1;
                    out.line(line, || count.number(file))
                })
                .map_err(|e| out.read_error(&e))?;
            out.flush()?;
        }
    }

    /// The file is done: print its unfinished last line if it is a record, and say so if it is
    /// not.
    fn finish(&mut self, out: &mut Out) {
        if let Some(rest) = self.lines.take_partial() {
            self.count.seen += 1;
            let Self { file, count, .. } = self;
            let _ = out.line(Line::Text(&rest), || count.number(file));
        }
    }
}

/// Stdout, batched: lines collect in `buf` and are written per read.
struct Out {
    /// The path, for messages.
    name: String,
    filter: Filter,
    json: bool,
    color: bool,
    buf: Vec<u8>,
    text: String,
}

impl Out {
    fn new(args: &TailArgs) -> Self {
        Self {
            name: args.path.display().to_string(),
            filter: Filter::from_args(args),
            json: args.json,
            color: io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
            buf: Vec::with_capacity(CHUNK),
            text: String::new(),
        }
    }

    fn parse(line: &[u8]) -> serde_json::Result<Record> {
        serde_json::from_slice(line)
    }

    /// Whether this line would be printed.
    fn wants(&self, line: &[u8]) -> bool {
        Self::parse(line).is_ok_and(|r| matches(&r, &self.filter))
    }

    fn header(&mut self) {
        if !self.json {
            self.buf.extend_from_slice(text::HEADER.as_bytes());
            self.buf.push(b'\n');
        }
    }

    fn line(&mut self, line: Line<'_>, number: impl FnOnce() -> io::Result<u64>) -> io::Result<()> {
        let why = match line {
            Line::Text(raw) if raw.trim_ascii().is_empty() => return Ok(()),
            Line::Text(raw) => match Self::parse(raw) {
                Ok(rec) => {
                    self.record(&rec, raw);
                    return Ok(());
                }
                Err(e) => e.to_string(),
            },
            Line::TooLong => format!("longer than {MAX_LINE} bytes"),
        };
        let n = number()?;
        note(&format!("{}:{n}: not a tcpstate record ({why})", self.name));
        Ok(())
    }

    fn record(&mut self, rec: &Record, raw: &[u8]) {
        if !matches(rec, &self.filter) {
            return;
        }
        if self.json {
            self.buf.extend_from_slice(raw);
            self.buf.push(b'\n');
        } else {
            self.text.clear();
            text::write_record(&mut self.text, rec, self.color);
            self.buf.extend_from_slice(self.text.as_bytes());
        }
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut stdout = io::stdout().lock();
        let written = stdout.write_all(&self.buf).and_then(|()| stdout.flush());
        self.buf.clear();
        written.map_err(|e| anyhow::Error::new(e).context("cannot write to stdout"))
    }

    fn read_error(&self, e: &io::Error) -> anyhow::Error {
        anyhow::anyhow!("cannot read {}: {}", self.name, io_msg(e))
    }
}

#[cfg(test)]
mod tests;
