//! Kernel timestamps are CLOCK_MONOTONIC; people read wall-clock time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; MONOTONIC and REALTIME cannot fail on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Now on the clock `bpf_ktime_get_ns()` uses.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Converts monotonic nanoseconds to wall time with one offset sampled at
/// start-up, so every record of a run uses the same mapping (an NTP step
/// later does not reorder the log).
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    /// Realtime minus monotonic, in ns, at start-up.
    offset_ns: u64,
}

impl WallClock {
    pub fn now() -> Self {
        let mono = monotonic_ns();
        let real = clock_ns(libc::CLOCK_REALTIME);
        Self {
            offset_ns: real.saturating_sub(mono),
        }
    }

    /// For tests: a fixed mapping.
    pub const fn with_offset(offset_ns: u64) -> Self {
        Self { offset_ns }
    }

    pub fn to_system(self, mono_ns: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(mono_ns.saturating_add(self.offset_ns))
    }
}
