//! The per-CPU event rings the eBPF program fills: maps `RING` (event
//! slots, `1 << bits` per CPU) and `POS` (each CPU's head and tail), both
//! mmapped. Draining copies each CPU's published events out and hands the
//! slots back by moving its tail; ordering across CPUs is `reorder`'s job.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::MapData;
use tcpstate_common::{Event, Positions};

/// How many slots each CPU gets for a total budget of `ring_bytes`: the
/// largest power of two that fits, at least 64 so a burst on one CPU of a
/// many-CPU host still has room. Returns log2 of it.
pub fn slot_bits(ring_bytes: u32, cpus: usize) -> u32 {
    let per_cpu = u64::from(ring_bytes) / size_of::<Event>() as u64 / cpus.max(1) as u64;
    per_cpu.max(64).ilog2().min(24)
}

/// The event rings could not be mapped.
#[derive(Debug, thiserror::Error)]
#[error("cannot mmap the event ring: {0}")]
pub struct RingError(#[source] std::io::Error);

/// One shared mapping of a BPF array map.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(map: &MapData, len: usize, writable: bool) -> Result<Self, RingError> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of a map fd we hold; the kernel
        // checks `len` against the map's size.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(RingError(std::io::Error::last_os_error()));
        }
        NonNull::new(ptr.cast())
            .map(|ptr| Mapping { ptr, len })
            .ok_or_else(|| RingError(std::io::Error::other("mmap returned NULL")))
    }
}

// SAFETY: the mapping is plain shared memory owned by this value; moving it to another thread
// (the collector's) moves the only handle to it.
unsafe impl Send for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the region mmap returned.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn page_round(n: usize) -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    n.div_ceil(page) * page
}

pub struct EventRings {
    ring: Mapping,
    pos: Mapping,
    cpus: usize,
    bits: u32,
    /// The mappings hold the maps too; these keep the fds for as long.
    _maps: (MapData, MapData),
}

impl EventRings {
    /// Maps `ring` (`cpus << bits` events) and `pos` (`cpus` positions).
    pub fn new(ring: MapData, pos: MapData, cpus: usize, bits: u32) -> Result<Self, RingError> {
        let ring_map = Mapping::new(
            &ring,
            page_round((cpus << bits) * size_of::<Event>()),
            false,
        )?;
        let pos_map = Mapping::new(&pos, page_round(cpus * size_of::<Positions>()), true)?;
        Ok(EventRings {
            ring: ring_map,
            pos: pos_map,
            cpus,
            bits,
            _maps: (ring, pos),
        })
    }

    /// Bytes of event slots across all CPUs.
    pub fn bytes(&self) -> usize {
        (self.cpus << self.bits) * size_of::<Event>()
    }

    fn positions(&self, cpu: usize) -> (&AtomicU64, &AtomicU64) {
        let base = self.pos.ptr.as_ptr().cast::<Positions>();
        // SAFETY: cpu < cpus, so the entry lies inside the mapping, which
        // is page-aligned; the program writes only `head` (see `publish`
        // in the eBPF crate), we only `tail`, each with single stores.
        unsafe {
            let p = base.add(cpu);
            (
                AtomicU64::from_ptr(&raw mut (*p).head),
                AtomicU64::from_ptr(&raw mut (*p).tail),
            )
        }
    }

    /// Appends every published event to `out`, each CPU's in its order
    /// (at most two copies per CPU: the run up to the ring's end and the
    /// wrapped one), and frees their slots. Returns how many.
    pub fn drain_into(&mut self, out: &mut Vec<Event>) -> usize {
        let mask = (1u64 << self.bits) - 1;
        let slots = self.ring.ptr.as_ptr().cast::<Event>();
        let before = out.len();
        for cpu in 0..self.cpus {
            let (head, tail) = self.positions(cpu);
            // Acquire pairs with the program's ordered publish (a plain
            // store after its slot stores on x86, a fully ordered add
            // elsewhere): the slots below `head` are completely written.
            let h = head.load(Ordering::Acquire);
            let t = tail.load(Ordering::Relaxed);
            if h == t {
                continue;
            }
            let size = 1usize << self.bits;
            let start = (t & mask) as usize;
            let n = (h.wrapping_sub(t) as usize).min(size);
            let first = n.min(size - start);
            // SAFETY: both runs lie inside this CPU's `size` slots of the
            // mapping; they are published (below `head`) and the program
            // does not write them again until the tail moves past them, so
            // nothing writes them while these slices live.
            unsafe {
                let base = slots.add(cpu << self.bits);
                out.extend_from_slice(std::slice::from_raw_parts(base.add(start), first));
                out.extend_from_slice(std::slice::from_raw_parts(base, n - first));
            }
            // Release: our reads of the slots happen before the program
            // may overwrite them.
            tail.store(h, Ordering::Release);
        }
        out.len() - before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_per_cpu() {
        // 4 MiB over 2 CPUs: 26,214 events each, rounded down to 16,384.
        assert_eq!(slot_bits(4 << 20, 2), 14);
        // A tiny ring still gets 64 slots per CPU.
        assert_eq!(slot_bits(4096, 2), 6);
        assert_eq!(slot_bits(4096, 0), 6);
        // 1 GiB on one CPU is capped at 16M slots.
        assert_eq!(slot_bits(1 << 30, 1), 23);
    }
}
