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
use tcpstate_common::Event;
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

/// Transitions and segment events (retransmits, resets) in time order, and what came with them.
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
    /// Events so far that arrived after newer ones had been released (see `reorder`).
    pub late: u64,
}

pub struct Collector {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Collector {
    pub fn spawn(
        rings: EventRings,
        doorbell: RingBuf<MapData>,
        segments: RingBuf<MapData>,
        tx: Sender<Batch>,
        capture: Option<crate::capture::Writer>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("tcpstate-rings".into())
            .spawn(move || collect(rings, doorbell, segments, &tx, &flag, capture))?;
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
    mut segments: RingBuf<MapData>,
    tx: &Sender<Batch>,
    stop: &AtomicBool,
    mut capture: Option<crate::capture::Writer>,
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
        while let Some(item) = segments.next() {
            if item.len() >= size_of::<Event>() {
                // SAFETY: length checked; Event is Pod and read unaligned.
                fresh.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            }
        }
        if let Some(w) = &mut capture
            && let Err(e) = w.drain(cutoff, last, &fresh)
        {
            crate::warn(format_args!("capture stopped: {e}"));
            capture = None;
        }
        let batch = merge(&mut reorder, &mut fresh, cutoff, last);
        if tx.blocking_send(batch).is_err() || last {
            return;
        }
        let wait = if reorder.held() > 0 { HELD_RETRY } else { POLL };
        wait_for_doorbell(&mut doorbell, wait);
    }
}

/// One drain's worth: `fresh` (every ring's new events, each ring's in its order) merged with
/// those held, what is older than `cutoff` released in time order and decoded. The rest of
/// the collector is reading rings and waiting; this is its logic, tested without a kernel.
pub(crate) fn merge(
    reorder: &mut Reorder,
    fresh: &mut Vec<Event>,
    cutoff: u64,
    last: bool,
) -> Batch {
    let ready = reorder.release(fresh, cutoff);
    let mut batch = Batch {
        decoded: Vec::with_capacity(ready.len()),
        events: ready.len() as u64,
        undecodable: 0,
        watermark_ns: cutoff,
        last,
        late: reorder.late(),
    };
    for ev in &ready {
        match decode::from_event(ev) {
            Ok(d) => batch.decoded.push(d),
            Err(_) => batch.undecodable += 1,
        }
    }
    batch
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

#[cfg(test)]
mod many_cpus {
    //! The merge of 64 rings, simulated: a host with more CPUs than any test machine here.
    use proptest::prelude::*;

    use super::*;
    use crate::fixtures::event_at;

    const RINGS: usize = 64;

    /// One simulated CPU's events: (time written, time published); skaddr tags ring and index.
    fn ring_events(
        cpu: usize,
        gaps: &[u64],
        delays: &[u64],
        stall: Option<(u64, u64)>,
    ) -> Vec<(Event, u64)> {
        let mut ts = 0;
        let mut published = 0;
        let mut v = Vec::new();
        for (i, gap) in gaps.iter().enumerate() {
            ts += gap;
            // A stalled CPU writes nothing during its stall.
            if stall.is_some_and(|(from, to)| (from..to).contains(&ts)) {
                continue;
            }
            // Slots are published in ring order: never before the one ahead.
            published = (ts + delays[i % delays.len()]).max(published);
            v.push((event_at(ts, (cpu as u64) << 32 | i as u64), published));
        }
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// 64 rings, each published with its own random delays under the holdback, one CPU
        /// silent for a long stretch, drained every few hundred µs: every event comes out
        /// once, in time order, none late, and what is held never exceeds what the last
        /// holdback's worth of time wrote (the silent ring holds nothing back).
        #[test]
        fn sixty_four_rings_merge_in_order_whole_and_bounded(
            gaps in proptest::collection::vec(proptest::collection::vec(1u64..40_000, 200), RINGS),
            delays in proptest::collection::vec(proptest::collection::vec(0u64..HOLDBACK_NS - 1, 16), RINGS),
            stalled in 0..RINGS,
            drain_every in 50_000u64..500_000,
        ) {
            let rings: Vec<Vec<(Event, u64)>> = (0..RINGS)
                .map(|cpu| {
                    let stall = (cpu == stalled).then_some((100_000, 3_000_000));
                    ring_events(cpu, &gaps[cpu], &delays[cpu], stall)
                })
                .collect();
            let total: usize = rings.iter().map(Vec::len).sum();
            let end = rings.iter().flatten().map(|&(_, p)| p).max().unwrap_or(0);
            let mut next = vec![0usize; RINGS];
            let mut reorder = Reorder::default();
            let mut out: Vec<u64> = Vec::new();
            let mut ts_out: Vec<u64> = Vec::new();
            let mut now = 0;
            let mut most_held = 0;
            let mut most_recent = 0;
            loop {
                now += drain_every;
                let last = now > end + HOLDBACK_NS;
                let mut fresh = Vec::new();
                for (r, events) in rings.iter().enumerate() {
                    while let Some(&(e, published)) = events.get(next[r]) {
                        if published > now {
                            break;
                        }
                        fresh.push(e);
                        next[r] += 1;
                    }
                }
                let cutoff = if last { u64::MAX } else { now.saturating_sub(HOLDBACK_NS) };
                let batch = merge(&mut reorder, &mut fresh, cutoff, last);
                prop_assert_eq!(batch.undecodable, 0);
                for d in &batch.decoded {
                    let Decoded::Transition(t) = d else {
                        return Err(TestCaseError::fail("a fixture event decoded as a segment event"));
                    };
                    ts_out.push(t.ts_ns);
                    out.push(t.sk);
                }
                most_held = most_held.max(reorder.held());
                // Written in the last holdback and a drain: all that may be held.
                let recent = rings
                    .iter()
                    .flatten()
                    .filter(|(e, _)| e.ts_ns + HOLDBACK_NS + drain_every > now && e.ts_ns <= now)
                    .count();
                most_recent = most_recent.max(recent);
                prop_assert!(reorder.held() <= recent, "held {} > {} recent", reorder.held(), recent);
                if last {
                    break;
                }
            }
            prop_assert_eq!(out.len(), total, "every event once");
            prop_assert!(ts_out.windows(2).all(|w| w[0] <= w[1]), "in time order");
            let mut tags = out.clone();
            tags.sort_unstable();
            tags.dedup();
            prop_assert_eq!(tags.len(), total, "nothing duplicated");
            prop_assert_eq!(reorder.late(), 0);
            prop_assert!(most_held <= most_recent);
        }
    }

    /// A CPU that stalls longer than the holdback between reading the clock and publishing
    /// (a vCPU the host descheduled): its event is released late, after newer ones, and
    /// counted, never dropped.
    #[test]
    fn a_ring_stalled_past_the_holdback_is_late_and_counted_not_lost() {
        let mut reorder = Reorder::default();
        let on_time: Vec<Event> = (1..=63).map(|cpu| event_at(1_000_000 + cpu, cpu)).collect();
        let b = merge(&mut reorder, &mut on_time.clone(), 3_000_000, false);
        assert_eq!(b.events, 63);
        // CPU 0's event from t = 500 µs is published at 5 ms.
        let b = merge(
            &mut reorder,
            &mut vec![event_at(500_000, 0)],
            4_000_000,
            false,
        );
        assert_eq!((b.events, b.late), (1, 1));
    }
}
