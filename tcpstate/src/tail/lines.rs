//! Lines out of a byte stream, forwards (holding back an unfinished last one) and backwards
//! (where the last N wanted lines of a file begin), bounded in length.

use std::io;

/// A line handed out by [`Lines`], without its newline.
#[derive(Debug, PartialEq)]
pub enum Line<'a> {
    Text(&'a [u8]),
    /// Longer than the limit; its bytes were dropped.
    TooLong,
}

/// Splits a byte stream into lines, holding back the unfinished last one.
#[derive(Debug)]
pub struct Lines {
    pub(super) pending: Vec<u8>,
    /// The unfinished line passed the limit: drop bytes until its newline.
    overlong: bool,
    max: usize,
}

impl Lines {
    pub fn new(max: usize) -> Self {
        Self {
            pending: Vec::new(),
            overlong: false,
            max,
        }
    }

    /// Calls `each` for every line `data` completes, in order.
    pub fn push<E>(
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
    pub fn take_partial(&mut self) -> Option<Vec<u8>> {
        let overlong = std::mem::take(&mut self.overlong);
        let rest = std::mem::take(&mut self.pending);
        (!overlong && !rest.is_empty()).then_some(rest)
    }

    pub fn clear(&mut self) {
        self.pending.clear();
        self.overlong = false;
    }
}

/// Where the last `want` lines accepted by `keep` begin, among the lines of
/// `[0, end)`: reads backwards from `end` in `chunk`-sized pieces and stops
/// as soon as it has them. A last line without newline counts as a line.
/// 0 when there are fewer; `end` when `want` is 0. Lines longer than
/// `max_line` are never accepted (and not buffered).
pub fn find_start(
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
pub fn last_newline_end(
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
pub fn count_newlines(
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
