//! The event the eBPF program writes into its per-CPU rings, and the names of
//! the maps and globals both sides refer to. Both sides compile this crate,
//! so the layout can only change in one place.
#![no_std]

/// One TCP state transition, as the kernel made it.
///
/// Fields are ordered largest first so the struct has no implicit padding:
/// `aya::Pod` requires every byte to be initialised, and a fixed 80-byte
/// record keeps the ring buffer arithmetic trivial.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC in nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the `struct sock`. The only stable key: the 4-tuple
    /// is not unique and the local port is 0 at CLOSE -> SYN_SENT.
    pub skaddr: u64,
    /// Source (local) address; IPv4 uses the first 4 bytes.
    pub saddr: [u8; 16],
    /// Destination (remote) address; IPv4 uses the first 4 bytes.
    pub daddr: [u8; 16],
    /// Thread group id (the userspace pid) of the task on the CPU.
    pub pid: u32,
    /// Network namespace inode of the socket (`sk->sk_net->ns.inum`), read
    /// only on the events that create a socket (old state CLOSE or
    /// LISTEN); 0 on the others.
    pub netns: u32,
    /// Host byte order (the program swaps them).
    pub sport: u16,
    pub dport: u16,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    pub oldstate: u8,
    pub newstate: u8,
    /// `comm` of the task on the CPU, NUL padded.
    pub comm: [u8; 16],
}

#[cfg(feature = "user")]
// SAFETY: repr(C), only integer arrays and integers, no padding (checked by
// the size assertion below).
unsafe impl aya::Pod for Event {}

const _: () = assert!(core::mem::size_of::<Event>() == 80);

/// One CPU's producer and consumer positions in its event ring (map
/// `POS`, mmapped by userspace). Positions count events and never wrap in
/// practice (u64). Each sits alone on a 64-byte cache line so the
/// producer's stores do not invalidate the consumer's line and vice versa.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
pub struct Positions {
    /// Events this CPU has published; written only by the eBPF program.
    pub head: u64,
    _pad0: [u64; 7],
    /// Events userspace has consumed; written only by userspace.
    pub tail: u64,
    _pad1: [u64; 7],
}

const _: () = assert!(core::mem::size_of::<Positions>() == 128);

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Index of each counter in the per-CPU `STATS` array.
pub mod stat {
    /// Events lost because this CPU's event ring was full.
    pub const RINGBUF_FULL: u32 = 0;
    /// TCP events the kernel filters dropped before the rings.
    pub const FILTERED: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// Names of the globals userspace sets with `EbpfLoader::override_global`.
pub mod global {
    /// u16: keep events whose local or remote port equals this (0 = any).
    pub const FILTER_PORT: &str = "FILTER_PORT";
    /// u16: keep events whose local port equals this (0 = any).
    pub const FILTER_LPORT: &str = "FILTER_LPORT";
    /// u16: keep events whose remote port equals this (0 = any).
    pub const FILTER_RPORT: &str = "FILTER_RPORT";
    /// u16: keep only this address family (0 = both).
    pub const FILTER_FAMILY: &str = "FILTER_FAMILY";
    /// u32: log2 of the slots in each CPU's event ring.
    pub const SLOT_BITS: &str = "SLOT_BITS";
    /// u64: the fill level (events) at which a CPU rings the doorbell.
    pub const WAKE_AT: &str = "WAKE_AT";
    /// u32 byte offsets in the running kernel, resolved from its BTF:
    /// socket fields from the start of `struct tcp_sock`.
    pub const OFF_FAMILY: &str = "OFF_FAMILY";
    pub const OFF_DPORT: &str = "OFF_DPORT";
    pub const OFF_SPORT: &str = "OFF_SPORT";
    pub const OFF_SADDR: &str = "OFF_SADDR";
    pub const OFF_DADDR: &str = "OFF_DADDR";
    pub const OFF_SADDR6: &str = "OFF_SADDR6";
    pub const OFF_DADDR6: &str = "OFF_DADDR6";
    /// `struct net *` in the socket, then `ns.inum` in `struct net`.
    pub const OFF_NET: &str = "OFF_NET";
    pub const OFF_NET_INUM: &str = "OFF_NET_INUM";
    /// In `struct task_struct`.
    pub const OFF_TGID: &str = "OFF_TGID";
    pub const OFF_COMM: &str = "OFF_COMM";
}

/// Map names, shared so a rename cannot silently break the loader.
pub mod map {
    /// `Event` slots, `1 << SLOT_BITS` per CPU, CPU-major (mmapped).
    pub const RING: &str = "RING";
    /// One `Positions` per CPU (mmapped).
    pub const POS: &str = "POS";
    /// A small BPF ring buffer used only to wake userspace.
    pub const DOORBELL: &str = "DOORBELL";
    pub const STATS: &str = "STATS";
}

/// Program name in the object file.
pub const PROGRAM: &str = "inet_sock_set_state";
