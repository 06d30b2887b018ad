//! Event-to-log-line latency: tails tcpstate's JSON Lines log every 5 ms
//! and, for each transition record on the probe port, takes (CLOCK_REALTIME
//! when the line was read) - (the record's "ts"). The 5 ms poll adds up to
//! 5 ms (2.5 ms on average) to every sample.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};

use super::clock::{now_unix_ns, parse_rfc3339_utc_ns};

const POLL: Duration = Duration::from_millis(5);

pub struct LogTail {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<Tailed>>>,
}

impl LogTail {
    /// Starts reading `path` from its current end.
    pub fn start(path: &Path, port: u16) -> Result<Self> {
        let mut file =
            File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        file.seek(SeekFrom::End(0))
            .with_context(|| format!("cannot seek in {}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let path = path.to_owned();
        let handle = thread::spawn(move || tail(file, &path, port, &flag));
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Reads what is left and returns the latencies.
    pub fn finish(mut self) -> Result<Tailed> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .context("log tail already finished")?
            .join()
            .map_err(|_| anyhow!("the log tail thread panicked"))?
    }
}

impl Drop for LogTail {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn tail(mut file: File, path: &Path, port: u16, stop: &AtomicBool) -> Result<Tailed> {
    let needles = [format!("\"sport\":{port},"), format!("\"dport\":{port},")];
    let mut latencies = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        // Checked before reading, so the last pass sees everything written
        // before `finish`.
        let stopping = stop.load(Ordering::Relaxed);
        loop {
            let n = file
                .read(&mut chunk)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if n == 0 {
                break;
            }
            let read_at = now_unix_ns();
            pending.extend_from_slice(&chunk[..n]);
            let Some(last_newline) = memrchr(&pending, b'\n') else {
                continue;
            };
            let complete = last_newline + 1;
            for line in probe_lines(&pending[..complete], &needles) {
                if let Some(ms) = probe_latency(line, read_at) {
                    latencies.push(ms);
                }
            }
            pending.copy_within(complete.., 0);
            pending.truncate(pending.len() - complete);
        }
        if stopping {
            return Ok(Tailed {
                latencies_ms: latencies,
                cpu_s: thread_cpu_seconds(),
            });
        }
        thread::sleep(POLL);
    }
}

/// What the tail thread found, and the CPU it used doing so (it runs next to
/// the tracer, so it is part of the load).
pub struct Tailed {
    pub latencies_ms: Vec<f64>,
    pub cpu_s: f64,
}

/// The lines of `text` (whole lines) containing one of `needles`.
///
/// xtask is built unoptimised (the dev profile) and at --log-rate 0 the log
/// grows by ~30 MB/s, so the scanning is done by libc's memmem / memchr
/// rather than by Rust code generic over bytes, which would cost most of a
/// core and slow the churn being measured.
fn probe_lines<'t>(text: &'t [u8], needles: &[String; 2]) -> Vec<&'t [u8]> {
    let mut starts = Vec::new();
    for needle in needles {
        let mut from = 0;
        while let Some(hit) = memmem(&text[from..], needle.as_bytes()).map(|at| from + at) {
            let start = memrchr(&text[..hit], b'\n').map_or(0, |nl| nl + 1);
            let end = memchr(&text[hit..], b'\n').map_or(text.len(), |nl| hit + nl);
            starts.push((start, end));
            from = end;
        }
    }
    starts.sort_unstable();
    starts.dedup();
    starts.into_iter().map(|(s, e)| &text[s..e]).collect()
}

fn offset_in(haystack: &[u8], found: *mut libc::c_void) -> Option<usize> {
    (!found.is_null()).then(|| found as usize - haystack.as_ptr() as usize)
}

fn memmem(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    // SAFETY: pointers and lengths describe live slices.
    let found = unsafe {
        libc::memmem(
            haystack.as_ptr().cast(),
            haystack.len(),
            needle.as_ptr().cast(),
            needle.len(),
        )
    };
    offset_in(haystack, found)
}

fn memchr(haystack: &[u8], byte: u8) -> Option<usize> {
    // SAFETY: pointer and length describe a live slice.
    let found = unsafe { libc::memchr(haystack.as_ptr().cast(), i32::from(byte), haystack.len()) };
    offset_in(haystack, found)
}

fn memrchr(haystack: &[u8], byte: u8) -> Option<usize> {
    // SAFETY: pointer and length describe a live slice.
    let found = unsafe { libc::memrchr(haystack.as_ptr().cast(), i32::from(byte), haystack.len()) };
    offset_in(haystack, found)
}

/// CPU time (user + system) of the calling thread.
fn thread_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we pass.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_THREAD, &raw mut usage) != 0 {
            return f64::NAN;
        }
        let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        secs(usage.ru_utime) + secs(usage.ru_stime)
    }
}

fn probe_latency(line: &[u8], read_at: i128) -> Option<f64> {
    let record: serde_json::Value = serde_json::from_slice(line).ok()?;
    if record.get("type")?.as_str()? != "transition" {
        return None;
    }
    let ts = parse_rfc3339_utc_ns(record.get("ts")?.as_str()?)?;
    Some((read_at - ts) as f64 / 1e6)
}

/// Nearest-rank percentile of unsorted samples.
pub fn percentile(samples: &[f64], pct: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((pct / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_probe_lines() {
        let text = b"{\"sport\":1,\"dport\":998,\"a\":1}\n{\"sport\":5,\"dport\":9}\n\
                     {\"sport\":998,\"dport\":0}\n";
        let needles = [r#""sport":998,"#.to_owned(), r#""dport":998,"#.to_owned()];
        let lines = probe_lines(text, &needles);
        assert_eq!(
            lines,
            [
                &b"{\"sport\":1,\"dport\":998,\"a\":1}"[..],
                &b"{\"sport\":998,\"dport\":0}"[..]
            ]
        );
        assert_eq!(percentile(&[3.0, 1.0, 2.0, 4.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0, 4.0], 99.0), Some(4.0));
    }
}
