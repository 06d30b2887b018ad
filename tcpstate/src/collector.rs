//! The first stage: a thread that drains the per-CPU rings, merges them in time order, decodes
//! and hands batches to the daemon over a bounded channel. It waits for nothing but the
//! doorbell and its timer, so a slow moment in the rest of the daemon (a status page, a burst
//! of anomalies) does not stop the rings from being emptied; when the channel is full it
//! waits, and the rings' own drop counters say if that cost events.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::sync::mpsc::Sender;

use crate::{
    clock::monotonic_ns,
    decode::{self, Decoded},
    reorder::Reorder,
    ring::EventRings,
};

/// Userspace drains at least this often, so a quiet stream (which does not ring the doorbell)
/// still shows up promptly.
const POLL: Duration = Duration::from_millis(50);
/// Events this recent are held back one drain, in case another CPU is still writing an older
/// one (see `reorder`).
const HOLDBACK_NS: u64 = 1_000_000;
/// When events are held back, the next drain comes this soon.
const HELD_RETRY: Duration = Duration::from_millis(5);

/// Transitions and signals in time order, and what came with them.
#[derive(Debug, Default)]
pub struct Batch {
    pub decoded: Vec<Decoded>,
    /// Events read from the rings (decoded or not).
    pub events: u64,
    pub undecodable: u64,
    /// Every event before this (monotonic ns) is in this batch or an earlier one: the daemon
    /// applies a sock_diag dump only once its start is behind this.
    pub watermark_ns: u64,
    /// The last batch: the collector stopped.
    pub last: bool,
}

pub struct Collector {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Collector {
    pub fn spawn(
        rings: EventRings,
        doorbell: RingBuf<MapData>,
        signals: RingBuf<MapData>,
        tx: Sender<Batch>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("tcpstate-rings".into())
            .spawn(move || collect(rings, doorbell, signals, &tx, &flag))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Asks the thread to drain everything once more, send the last batch and exit.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }

    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
    }
}

fn collect(
    mut rings: EventRings,
    mut doorbell: RingBuf<MapData>,
    mut signals: RingBuf<MapData>,
    tx: &Sender<Batch>,
    stop: &AtomicBool,
) {
    let mut reorder = Reorder::default();
    let mut fresh = Vec::new();
    loop {
        let last = stop.load(Ordering::Acquire);
        let cutoff = if last {
            u64::MAX
        } else {
            monotonic_ns().saturating_sub(HOLDBACK_NS)
        };
        rings.drain_into(&mut fresh);
        // Retransmits and resets merge with the transitions by time.
        while let Some(item) = signals.next() {
            if item.len() >= size_of::<tcpstate_common::Event>() {
                // SAFETY: length checked; Event is Pod and read unaligned.
                fresh.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            }
        }
        let ready = reorder.release(&mut fresh, cutoff);
        let mut batch = Batch {
            decoded: Vec::with_capacity(ready.len()),
            events: ready.len() as u64,
            undecodable: 0,
            watermark_ns: cutoff,
            last,
        };
        for ev in &ready {
            match decode::from_event(ev) {
                Ok(d) => batch.decoded.push(d),
                Err(_) => batch.undecodable += 1,
            }
        }
        if tx.blocking_send(batch).is_err() || last {
            return;
        }
        let wait = if reorder.held() > 0 { HELD_RETRY } else { POLL };
        wait_for_doorbell(&mut doorbell, wait);
    }
}

/// Sleeps until a CPU rings the doorbell or `timeout` passes, then empties the doorbell (its
/// records carry nothing but the wake-up).
fn wait_for_doorbell(doorbell: &mut RingBuf<MapData>, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd: doorbell.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&raw mut pfd, 1, ms) };
    while doorbell.next().is_some() {}
}
