//! The event the eBPF program writes into the ring buffer, and the layout of
//! the tracepoint record it reads. Both sides compile this crate, so the
//! layout can only change in one place.
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
    /// Network namespace inode of the socket, read only on the events that
    /// create a socket (old state CLOSE or LISTEN); 0 on the others, and
    /// when the kernel offsets could not be resolved from BTF.
    pub netns: u32,
    /// Host byte order already: the tracepoint converts them.
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

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// The `sock:inet_sock_set_state` record this program was written against
/// (Linux 5.6+: `protocol` is a u16). The program reads these offsets
/// directly from the context, which the verifier turns into plain loads;
/// userspace checks the kernel's `format` file against this table before
/// loading and refuses to start when any field moved.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawSetState {
    pub common: u64,
    pub skaddr: u64,
    pub oldstate: i32,
    pub newstate: i32,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub saddr_v6: [u8; 16],
    pub daddr_v6: [u8; 16],
}

/// (field name, offset, size) of every field of [`RawSetState`] the program
/// reads, as the tracefs `format` file must list them.
pub const EXPECTED_LAYOUT: [(&str, usize, usize); 11] = [
    ("skaddr", 8, 8),
    ("oldstate", 16, 4),
    ("newstate", 20, 4),
    ("sport", 24, 2),
    ("dport", 26, 2),
    ("family", 28, 2),
    ("protocol", 30, 2),
    ("saddr", 32, 4),
    ("daddr", 36, 4),
    ("saddr_v6", 40, 16),
    ("daddr_v6", 56, 16),
];

const _: () = assert!(core::mem::size_of::<RawSetState>() == 72);

/// Index of each counter in the per-CPU `STATS` array.
pub mod stat {
    /// Events lost because the ring buffer was full.
    pub const RINGBUF_FULL: u32 = 0;
    /// TCP events the kernel filters dropped before the ring buffer.
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
    /// u64: bytes waiting in the ring past which a submit wakes userspace.
    pub const WAKEUP_BYTES: &str = "WAKEUP_BYTES";
    /// u32: offset of `possible_net_t skc_net` in `struct sock` (0 = unknown).
    pub const NETNS_SK_NET_OFF: &str = "NETNS_SK_NET_OFF";
    /// u32: offset of `ns.inum` in `struct net`.
    pub const NETNS_INUM_OFF: &str = "NETNS_INUM_OFF";
}

/// Map names, shared so a rename cannot silently break the loader.
pub mod map {
    pub const EVENTS: &str = "EVENTS";
    pub const STATS: &str = "STATS";
}

/// Program name in the object file.
pub const PROGRAM: &str = "inet_sock_set_state";
