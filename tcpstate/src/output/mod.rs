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
pub mod stdout;
pub mod summary;
pub mod text;

use std::time::{Duration, Instant};

use crate::record::Record;

/// Where records are written as they happen (stdout, the log file; the next is
/// OpenTelemetry). The HTTP pages are not sinks: they read the tracker when asked.
///
/// A sink never waits on its reader or its disk: it serialises into a batch on the engine
/// and hands it to a writer of its own, dropping (and counting) what does not fit.
pub trait Sink: Send {
    /// Its name in counters and metrics (`tcpstate_{name}_dropped`).
    fn name(&self) -> &'static str;
    /// Whether it wants the next transition record (a rate limit may say no and count it):
    /// asked before the record is built, which under a flood showed in the profile.
    fn admit_transition(&mut self, now: Instant) -> bool;
    /// A transition record it admitted.
    fn write_admitted(&mut self, rec: &Record);
    /// Any other record (it may still limit resets as it limits transitions).
    fn emit(&mut self, rec: &Record, now: Instant);
    /// Hands the batch to its writer. False when its reader went away for good (a closed
    /// pipe): the daemon stops.
    fn flush(&mut self, now: Instant) -> bool;
    /// The start of the output (the text header).
    fn header(&mut self) {}
    /// SIGHUP: reopen what it writes to.
    fn reopen(&mut self) {}
    /// Flushes and waits (up to `limit`) for its writer to finish.
    fn finish(&mut self, limit: Duration);
    /// Records lost since start (a slow reader, a full disk).
    fn dropped(&self) -> u64;
    /// Transition records its rate limit left out since start.
    fn suppressed(&self) -> u64 {
        0
    }
}

/// Every place a record goes, in the order they were given.
pub struct Sinks {
    sinks: Vec<Box<dyn Sink>>,
    /// Which sinks admitted the transition being built (reused, never reallocated).
    admitted: Vec<bool>,
}

impl Sinks {
    pub fn new(sinks: Vec<Box<dyn Sink>>) -> Self {
        Self {
            admitted: vec![false; sinks.len()],
            sinks,
        }
    }

    /// `now` is read once per batch: a clock read per record showed in the profile, and the
    /// rate limit needs no finer grain.
    pub fn emit(&mut self, rec: &Record, now: Instant) {
        for s in &mut self.sinks {
            s.emit(rec, now);
        }
    }

    /// A transition record, built only when some sink takes it: under a flood
    /// the log's rate limit drops most, and building them showed in the
    /// profile.
    pub fn transition(&mut self, now: Instant, make: impl FnOnce() -> Record) {
        let mut any = false;
        for (s, a) in self.sinks.iter_mut().zip(&mut self.admitted) {
            *a = s.admit_transition(now);
            any |= *a;
        }
        if !any {
            return;
        }
        let rec = make();
        for (s, a) in self.sinks.iter_mut().zip(&self.admitted) {
            if *a {
                s.write_admitted(&rec);
            }
        }
    }

    /// Hands what is buffered to the writers; none waits on its file or reader. Returns false
    /// when a reader went away for good (stdout's pipe closed).
    pub fn flush(&mut self, now: Instant) -> bool {
        let mut open = true;
        for s in &mut self.sinks {
            open &= s.flush(now);
        }
        open
    }

    pub fn header(&mut self) {
        for s in &mut self.sinks {
            s.header();
        }
    }

    pub fn reopen(&mut self) {
        for s in &mut self.sinks {
            s.reopen();
        }
    }

    /// Flushes and lets each writer finish, `limit` each.
    pub fn finish(&mut self, limit: Duration) {
        for s in &mut self.sinks {
            s.finish(limit);
        }
    }

    /// Every sink's name and the records it lost: `/metrics` lists them all, so a new output
    /// shows there with no change elsewhere.
    pub fn each_dropped(&self) -> Vec<(&'static str, u64)> {
        self.sinks.iter().map(|s| (s.name(), s.dropped())).collect()
    }

    /// Records the sink named `name` lost (0 when there is none).
    pub fn dropped(&self, name: &str) -> u64 {
        self.sinks
            .iter()
            .filter(|s| s.name() == name)
            .map(|s| s.dropped())
            .sum()
    }

    pub fn suppressed(&self, name: &str) -> u64 {
        self.sinks
            .iter()
            .filter(|s| s.name() == name)
            .map(|s| s.suppressed())
            .sum()
    }
}
