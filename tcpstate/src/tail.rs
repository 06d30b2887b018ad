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
    socket::Comm,
    state::TcpState,
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

/// What `--port`, `--state`, `--anomalies`, `--pid` and `--comm` ask for;
/// all given ones must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    pub port: Option<u16>,
    pub state: Option<TcpState>,
    pub anomalies: bool,
    pub pid: Option<u32>,
    /// Truncated like the kernel's comm (15 bytes), so a long name given in
    /// full still matches.
    pub comm: Option<Comm>,
}

impl Filter {
    pub fn from_args(a: &TailArgs) -> Self {
        Self {
            port: a.port,
            state: a.state,
            anomalies: a.anomalies,
            pid: a.pid,
            comm: a.comm.as_deref().map(Comm::new),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Whether `rec` passes every filter. Records without the field a filter
/// looks at (a leak has no port) do not pass it; `started`, `stopped` and
/// `suppressed` pass only when there is no filter at all.
pub fn matches(rec: &Record, f: &Filter) -> bool {
    let (anomaly, ports, state, pid, comm) = match rec {
        Record::Transition(t) => (
            false,
            Some([t.sport, t.dport]),
            [Some(t.old), Some(t.new)],
            Some(t.pid),
            Some(t.comm),
        ),
        Record::Anomaly(a) | Record::AnomalyResolved(a) => {
            // An orphan has no pid; it is still the last owner's problem.
            let (pid, comm) = match (a.pid, a.comm, a.last_owner) {
                (None, None, Some(o)) => (Some(o.pid), Some(o.comm)),
                (pid, comm, _) => (pid, comm),
            };
            (
                true,
                Some([a.sport, a.dport]),
                [Some(a.state), None],
                pid,
                comm,
            )
        }
        Record::LeakSuspected(l) => (true, None, [Some(l.state), None], Some(l.pid), Some(l.comm)),
        Record::Started(_) | Record::Stopped(_) | Record::Suppressed(_) => return f.is_empty(),
    };
    (!f.anomalies || anomaly)
        && f.port
            .is_none_or(|p| ports.is_some_and(|ps| ps.contains(&p)))
        && f.state.is_none_or(|s| state.contains(&Some(s)))
        && f.pid.is_none_or(|p| pid == Some(p))
        && f.comm.is_none_or(|c| comm == Some(c))
}

/// A line handed out by [`Lines`], without its newline.
#[derive(Debug, PartialEq)]
enum Line<'a> {
    Text(&'a [u8]),
    /// Longer than the limit; its bytes were dropped.
    TooLong,
}

/// Splits a byte stream into lines, holding back the unfinished last one.
#[derive(Debug)]
struct Lines {
    pending: Vec<u8>,
    /// The unfinished line passed the limit: drop bytes until its newline.
    overlong: bool,
    max: usize,
}

impl Lines {
    fn new(max: usize) -> Self {
        Self {
            pending: Vec::new(),
            overlong: false,
            max,
        }
    }

    /// Calls `each` for every line `data` completes, in order.
    fn push<E>(
        &mut self,
        mut data: &[u8],
        mut each: impl FnMut(Line<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        while let Some(i) = data.iter().position(|&b| b == b'\n') {
            let head = &data[..i];
            data = &data[i + 1..];
            if self.overlong || self.pending.len() + head.len() > self.max {
                self.overlong = false;
                self.pending.clear();
                each(Line::TooLong)?;
            } else if self.pending.is_empty() {
                each(Line::Text(head))?;
            } else {
                self.pending.extend_from_slice(head);
                each(Line::Text(&self.pending))?;
                self.pending.clear();
            }
        }
        if self.overlong {
            // Still inside the long line.
        } else if self.pending.len() + data.len() > self.max {
            self.pending.clear();
            self.overlong = true;
        } else {
            self.pending.extend_from_slice(data);
        }
        Ok(())
    }

    /// The unfinished last line, if any (it will never be finished).
    fn take_partial(&mut self) -> Option<Vec<u8>> {
        let overlong = std::mem::take(&mut self.overlong);
        let rest = std::mem::take(&mut self.pending);
        (!overlong && !rest.is_empty()).then_some(rest)
    }

    fn clear(&mut self) {
        self.pending.clear();
        self.overlong = false;
    }
}

/// Where the last `want` lines accepted by `keep` begin, among the lines of
/// `[0, end)`: reads backwards from `end` in `chunk`-sized pieces and stops
/// as soon as it has them. A last line without newline counts as a line.
/// 0 when there are fewer; `end` when `want` is 0. Lines longer than
/// `max_line` are never accepted (and not buffered).
fn find_start(
    read: &mut impl FnMut(&mut [u8], u64) -> io::Result<()>,
    end: u64,
    want: usize,
    chunk: usize,
    max_line: usize,
    mut keep: impl FnMut(&[u8]) -> bool,
) -> io::Result<u64> {
    if want == 0 {
        return Ok(end);
    }
    let mut found = 0;
    // `[pos, end)` has been read. `carry` is the start of the leftmost line
    // seen so far, whose beginning lies before `pos`.
    let mut pos = end;
    let mut carry: Vec<u8> = Vec::new();
    let mut overlong = false;
    let mut buf = vec![0u8; chunk.max(1)];
    while pos > 0 {
        let n = usize::try_from(pos).map_or(buf.len(), |p| p.min(buf.len()));
        let base = pos - n as u64;
        let piece = &mut buf[..n];
        read(piece, base)?;
        pos = base;
        let mut line_end = n;
        let mut first = true;
        while let Some(i) = piece[..line_end].iter().rposition(|&b| b == b'\n') {
            let accepted = if first {
                first = false;
                let len = line_end - (i + 1) + carry.len();
                if overlong || len > max_line {
                    false
                } else {
                    let mut line = piece[i + 1..line_end].to_vec();
                    line.extend_from_slice(&carry);
                    keep(&line)
                }
            } else {
                line_end - (i + 1) <= max_line && keep(&piece[i + 1..line_end])
            };
            if accepted {
                found += 1;
                if found == want {
                    return Ok(base + i as u64 + 1);
                }
            }
            line_end = i;
            carry.clear();
            overlong = false;
        }
        // `piece[..line_end]` continues the leftmost line.
        if !overlong {
            if line_end + carry.len() > max_line {
                carry.clear();
                overlong = true;
            } else {
                let mut joined = piece[..line_end].to_vec();
                joined.extend_from_slice(&carry);
                carry = joined;
            }
        }
    }
    Ok(0)
}

/// The offset just past the last newline in `[0, len)`, or 0.
fn last_newline_end(
    read: &mut impl FnMut(&mut [u8], u64) -> io::Result<()>,
    len: u64,
    chunk: usize,
) -> io::Result<u64> {
    let mut buf = vec![0u8; chunk.max(1)];
    let mut pos = len;
    while pos > 0 {
        let n = usize::try_from(pos).map_or(buf.len(), |p| p.min(buf.len()));
        let base = pos - n as u64;
        read(&mut buf[..n], base)?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(base + i as u64 + 1);
        }
        pos = base;
    }
    Ok(0)
}

/// Newlines in `[0, end)` (fewer if the file is shorter now).
fn count_newlines(
    read: &mut impl FnMut(&mut [u8], u64) -> io::Result<usize>,
    end: u64,
    chunk: usize,
) -> io::Result<u64> {
    let mut buf = vec![0u8; chunk.max(1)];
    let mut pos = 0;
    let mut count = 0;
    while pos < end {
        let want = usize::try_from(end - pos).map_or(buf.len(), |r| r.min(buf.len()));
        let n = match read(&mut buf[..want], pos) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        count += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        pos += n as u64;
    }
    Ok(count)
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
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::{
        record::{AnomalyRecord, LeakRecord, Owner, OwnerSource, Started, Stopped, Suppressed},
        socket::Family,
    };

    const TRANSITION: &str = r#"{"type":"transition","ts":"2026-11-23T22:47:00.072509318Z","sk":"0xffff888105db8000","family":"ipv4","saddr":"127.0.0.1","sport":43052,"daddr":"127.0.0.1","dport":18080,"old":"SYN_SENT","new":"ESTABLISHED","pid":14949,"comm":"python3","prev_state_ms":0.088936,"netns":4026531833}"#;

    fn transition() -> Record {
        serde_json::from_str(TRANSITION).expect("the example parses")
    }

    fn anomaly() -> AnomalyRecord {
        AnomalyRecord {
            ts: UNIX_EPOCH + Duration::new(1_795_000_000, 0),
            kind: "close_wait".into(),
            state: TcpState::CloseWait,
            age_ms: 61_500.0,
            age_is_lower_bound: false,
            sk: 0xffff_8881_05db_8000,
            family: Family::V4,
            saddr: "10.0.0.1".parse().expect("addr"),
            sport: 8080,
            daddr: "10.0.0.2".parse().expect("addr"),
            dport: 5555,
            netns: 4026531833,
            pid: Some(900),
            comm: Some(Comm::new("server")),
            owner_source: OwnerSource::Fd,
            last_owner: None,
            resolution: None,
            count: None,
            port_range: None,
            tw_reuse: None,
        }
    }

    fn leak() -> Record {
        Record::LeakSuspected(LeakRecord {
            ts: UNIX_EPOCH + Duration::new(1_795_000_000, 0),
            pid: 900,
            comm: Comm::new("server"),
            state: TcpState::CloseWait,
            count: 40,
            previous: 12,
            threshold: 10,
        })
    }

    fn others() -> Vec<Record> {
        let ts = UNIX_EPOCH + Duration::new(1_795_000_000, 0);
        vec![
            Record::Started(Started {
                ts,
                version: "0.1.0".into(),
                pid: 1,
                ring_bytes: 4 << 20,
                seeded: 3,
            }),
            Record::Suppressed(Suppressed { ts, transitions: 5 }),
            Record::Stopped(Stopped {
                ts,
                events: 1,
                dropped: 0,
                recursion_misses: 0,
                undecodable: 0,
                table_full: 0,
                timewait_full: 0,
                log_dropped: 0,
                filtered: 0,
                uptime_s: 1.0,
            }),
        ]
    }

    /// Through JSON, as tail sees them.
    fn round_trip(rec: &Record) -> Record {
        let line = serde_json::to_string(rec).expect("serialises");
        serde_json::from_str(&line).expect("parses")
    }

    #[test]
    fn no_filter_passes_everything() {
        let f = Filter::default();
        assert!(f.is_empty());
        assert!(matches(&transition(), &f));
        assert!(matches(&round_trip(&Record::Anomaly(anomaly())), &f));
        assert!(matches(&round_trip(&leak()), &f));
        for r in others() {
            assert!(matches(&round_trip(&r), &f), "{r:?}");
        }
    }

    #[test]
    fn each_filter_on_a_transition() {
        let t = transition();
        let by = |f: Filter| matches(&t, &f);
        assert!(by(Filter {
            port: Some(43052),
            ..Filter::default()
        }));
        assert!(by(Filter {
            port: Some(18080),
            ..Filter::default()
        }));
        assert!(!by(Filter {
            port: Some(80),
            ..Filter::default()
        }));
        assert!(by(Filter {
            state: Some(TcpState::SynSent),
            ..Filter::default()
        }));
        assert!(by(Filter {
            state: Some(TcpState::Established),
            ..Filter::default()
        }));
        assert!(!by(Filter {
            state: Some(TcpState::CloseWait),
            ..Filter::default()
        }));
        assert!(!by(Filter {
            anomalies: true,
            ..Filter::default()
        }));
        assert!(by(Filter {
            pid: Some(14949),
            ..Filter::default()
        }));
        assert!(!by(Filter {
            pid: Some(1),
            ..Filter::default()
        }));
        assert!(by(Filter {
            comm: Some(Comm::new("python3")),
            ..Filter::default()
        }));
        assert!(!by(Filter {
            comm: Some(Comm::new("python")),
            ..Filter::default()
        }));
        // AND: one failing filter is enough.
        assert!(!by(Filter {
            port: Some(18080),
            pid: Some(1),
            ..Filter::default()
        }));
        assert!(by(Filter {
            port: Some(18080),
            pid: Some(14949),
            state: Some(TcpState::Established),
            comm: Some(Comm::new("python3")),
            anomalies: false,
        }));
    }

    #[test]
    fn anomalies_and_leaks() {
        let a = round_trip(&Record::Anomaly(anomaly()));
        let mut resolved = anomaly();
        resolved.resolution = Some("left_state".into());
        let r = round_trip(&Record::AnomalyResolved(resolved));
        let l = round_trip(&leak());
        let only = Filter {
            anomalies: true,
            ..Filter::default()
        };
        for rec in [&a, &r, &l] {
            assert!(matches(rec, &only), "{rec:?}");
            assert!(matches(
                rec,
                &Filter {
                    state: Some(TcpState::CloseWait),
                    pid: Some(900),
                    comm: Some(Comm::new("server")),
                    ..only.clone()
                }
            ));
            assert!(!matches(
                rec,
                &Filter {
                    state: Some(TcpState::FinWait2),
                    ..Filter::default()
                }
            ));
        }
        let port = Filter {
            port: Some(5555),
            ..Filter::default()
        };
        assert!(matches(&a, &port) && matches(&r, &port));
        assert!(!matches(&l, &port), "a leak has no port");
        for rec in others() {
            assert!(!matches(&round_trip(&rec), &only));
            assert!(!matches(&round_trip(&rec), &port));
        }
    }

    #[test]
    fn an_orphan_matches_its_last_owner() {
        let mut o = anomaly();
        o.pid = None;
        o.comm = None;
        o.owner_source = OwnerSource::None;
        let pid = |p| Filter {
            pid: Some(p),
            ..Filter::default()
        };
        assert!(!matches(&Record::Anomaly(o.clone()), &pid(900)));
        o.last_owner = Some(Owner {
            pid: 900,
            comm: Comm::new("server"),
        });
        assert!(matches(&Record::Anomaly(o.clone()), &pid(900)));
        assert!(matches(
            &Record::Anomaly(o),
            &Filter {
                comm: Some(Comm::new("server")),
                ..Filter::default()
            }
        ));
    }

    #[test]
    fn a_long_comm_matches_as_the_kernel_truncates_it() {
        let mut t = transition();
        if let Record::Transition(t) = &mut t {
            t.comm = Comm::new("a-very-long-process-name");
        }
        let t = round_trip(&t);
        let f = Filter {
            comm: Some(Comm::new("a-very-long-process-name")),
            ..Filter::default()
        };
        assert!(matches(&t, &f));
    }

    fn split(lines: &mut Lines, data: &[u8]) -> Vec<Option<String>> {
        let mut got = Vec::new();
        lines
            .push(data, |l| {
                got.push(match l {
                    Line::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
                    Line::TooLong => None,
                });
                Ok::<(), ()>(())
            })
            .expect("no error");
        got
    }

    #[test]
    fn lines_hold_back_the_unfinished_one() {
        let mut l = Lines::new(100);
        assert_eq!(
            split(&mut l, b"a\nbb\nc"),
            [Some("a".into()), Some("bb".into())]
        );
        assert!(split(&mut l, b"cc").is_empty(), "no newline yet");
        assert_eq!(
            split(&mut l, b"c\n\nd"),
            [Some("cccc".into()), Some("".into())]
        );
        assert_eq!(l.take_partial(), Some(b"d".to_vec()));
        assert_eq!(l.take_partial(), None);
        assert!(split(&mut l, b"half").is_empty());
        l.clear();
        assert_eq!(split(&mut l, b"new\n"), [Some("new".into())]);
    }

    #[test]
    fn lines_byte_by_byte() {
        let text = format!("{TRANSITION}\n{TRANSITION}\npart");
        let mut l = Lines::new(1000);
        let mut got = Vec::new();
        for b in text.as_bytes() {
            got.extend(split(&mut l, std::slice::from_ref(b)));
        }
        assert_eq!(got, [Some(TRANSITION.into()), Some(TRANSITION.into())]);
        assert_eq!(l.take_partial(), Some(b"part".to_vec()));
    }

    #[test]
    fn overlong_lines_are_dropped_not_buffered() {
        let mut l = Lines::new(4);
        assert_eq!(
            split(&mut l, b"1234\n12345\nok\n"),
            [Some("1234".into()), None, Some("ok".into())]
        );
        assert!(split(&mut l, b"12").is_empty());
        assert!(split(&mut l, b"345").is_empty());
        assert!(l.pending.len() <= 4);
        assert!(split(&mut l, b"6789").is_empty());
        assert_eq!(split(&mut l, b"0\nx\n"), [None, Some("x".into())]);
        assert!(split(&mut l, b"123456").is_empty());
        assert_eq!(l.take_partial(), None, "an overlong rest is no record");
    }

    fn reader(data: &[u8]) -> impl FnMut(&mut [u8], u64) -> io::Result<()> + '_ {
        move |buf: &mut [u8], off: u64| {
            let off = usize::try_from(off).expect("small");
            let src = data
                .get(off..off + buf.len())
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    /// The obvious way: split everything, take the last `want` kept lines.
    fn naive(data: &[u8], want: usize, keep: &impl Fn(&[u8]) -> bool) -> u64 {
        if want == 0 {
            return data.len() as u64;
        }
        let mut starts = Vec::new();
        let mut at = 0;
        for line in data.split(|&b| b == b'\n') {
            if keep(line) {
                starts.push(at as u64);
            }
            at += line.len() + 1;
        }
        starts.len().checked_sub(want).map_or(0, |i| starts[i])
    }

    #[test]
    fn find_start_agrees_with_the_obvious_way() {
        let texts: [&[u8]; 6] = [
            b"",
            b"\n",
            b"a\nb\nc\n",
            b"a\nb\nc",
            b"x\n\nab\nxyz\nb\n\nxx\nc\nxxx",
            b"aaaa\nbb\nxbxb\nc\nbbbbbbb\n",
        ];
        type Keep = dyn Fn(&[u8]) -> bool;
        let keeps: [&Keep; 3] = [
            &|l: &[u8]| !l.is_empty(),
            &|l: &[u8]| l.first() == Some(&b'x'),
            &|l: &[u8]| l.contains(&b'b'),
        ];
        for data in texts {
            for keep in keeps {
                for want in 0..6 {
                    let expected = naive(data, want, &keep);
                    for chunk in [1, 2, 3, 5, 64] {
                        let got = find_start(
                            &mut reader(data),
                            data.len() as u64,
                            want,
                            chunk,
                            100,
                            keep,
                        )
                        .expect("reads");
                        assert_eq!(
                            got,
                            expected,
                            "{:?} want {want} chunk {chunk}",
                            String::from_utf8_lossy(data)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn find_start_stops_early_and_skips_long_lines() {
        let data = b"first\nan overlong line\nok\nlast\n";
        // Reads that reach the beginning would fail: we must not need them.
        let mut read = |buf: &mut [u8], off: u64| {
            // With 4-byte chunks from 31: [27,31), [23,27), then [19,23)
            // holds the newline before "ok". Nothing earlier is needed.
            assert!(off >= 19, "read too far back: {off}");
            reader(data)(buf, off)
        };
        let two = find_start(&mut read, data.len() as u64, 2, 4, 100, |l| !l.is_empty());
        assert_eq!(two.expect("reads"), 23);
        // Too long (limit 8) is never kept, whatever the chunk size.
        for chunk in [1, 3, 7, 100] {
            let three = find_start(&mut reader(data), data.len() as u64, 3, chunk, 8, |l| {
                !l.is_empty()
            });
            assert_eq!(three.expect("reads"), 0, "chunk {chunk}");
        }
    }

    #[test]
    fn find_start_with_records() {
        let a = serde_json::to_string(&Record::Anomaly(anomaly())).expect("json");
        let data = format!("{TRANSITION}\n{a}\n{TRANSITION}\nnot json\n{TRANSITION}\n");
        let only = Filter {
            anomalies: true,
            ..Filter::default()
        };
        let keep = |l: &[u8]| Out::parse(l).is_ok_and(|r| matches(&r, &only));
        let start = find_start(
            &mut reader(data.as_bytes()),
            data.len() as u64,
            1,
            16,
            MAX_LINE,
            keep,
        )
        .expect("reads");
        assert_eq!(start, TRANSITION.len() as u64 + 1);
        let start = find_start(
            &mut reader(data.as_bytes()),
            data.len() as u64,
            2,
            16,
            MAX_LINE,
            |l| Out::parse(l).is_ok(),
        )
        .expect("reads");
        assert_eq!(
            &data[usize::try_from(start).expect("small")..],
            format!("{TRANSITION}\nnot json\n{TRANSITION}\n")
        );
    }

    #[test]
    fn last_newline_and_counting() {
        for chunk in [1, 2, 3, 64] {
            let end = |d: &[u8]| last_newline_end(&mut reader(d), d.len() as u64, chunk);
            assert_eq!(end(b"").expect("reads"), 0);
            assert_eq!(end(b"abc").expect("reads"), 0);
            assert_eq!(end(b"a\nbc").expect("reads"), 2);
            assert_eq!(end(b"a\nbc\n").expect("reads"), 5);
            let data = b"a\nb\n\ncd\ne";
            let mut read = |buf: &mut [u8], off: u64| {
                let off = usize::try_from(off).expect("small");
                let src = data.get(off..).unwrap_or_default();
                let n = src.len().min(buf.len());
                buf[..n].copy_from_slice(&src[..n]);
                Ok(n)
            };
            assert_eq!(count_newlines(&mut read, 0, chunk).expect("reads"), 0);
            assert_eq!(count_newlines(&mut read, 2, chunk).expect("reads"), 1);
            assert_eq!(count_newlines(&mut read, 5, chunk).expect("reads"), 3);
            assert_eq!(count_newlines(&mut read, 100, chunk).expect("reads"), 4);
        }
    }

    #[test]
    fn os_error_numbers_are_dropped() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(io_msg(&e), "No such file or directory");
        assert_eq!(io_msg(&io::Error::other("plain")), "plain");
    }

    #[test]
    fn broken_pipe_is_recognised_through_context() {
        let e = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe))
            .context("cannot write to stdout");
        assert!(broken_pipe(&e));
        assert!(!broken_pipe(&anyhow::anyhow!("cannot open x")));
    }
}
