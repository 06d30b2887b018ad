//! The contract between the eBPF program and userspace: the event it writes
//! into its per-CPU rings, the one read-only configuration it is loaded
//! with, and the names of its maps. Both sides compile this crate, so the
//! layout can only change in one place.
#![no_std]

/// One TCP state transition, as the kernel made it.
///
/// Fields are ordered largest first so the struct has no implicit padding:
/// `aya::Pod` requires every byte to be initialised, and a fixed 88-byte
/// record keeps the ring arithmetic trivial.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC in nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the `struct sock`. The only stable key: the 4-tuple
    /// is not unique and the local port is 0 at CLOSE -> SYN_SENT.
    pub skaddr: u64,
    /// The socket's cgroup v2 id (`sk_cgrp_data.cgroup->kn->id`: the
    /// cgroup of the task that created it, or of the listener for an
    /// accepted socket, even in softirq), written only on the events that
    /// create a socket, like `netns` (elsewhere the slot holds stale bytes:
    /// read it through `is_birth`); 0 when the kernel has no socket cgroup
    /// data.
    pub cgroup: u64,
    /// Source (local) address; IPv4 uses the first 4 bytes (the rest is not
    /// written: stale bytes).
    pub saddr: [u8; 16],
    /// Destination (remote) address; IPv4 uses the first 4 bytes, as `saddr`.
    pub daddr: [u8; 16],
    /// Thread group id (the userspace pid) of the task on the CPU.
    pub pid: u32,
    /// Network namespace inode of the socket (`sk->sk_net->ns.inum`), written
    /// only on the events that create a socket (old state CLOSE or
    /// LISTEN; see `is_birth`); stale bytes on the others.
    pub netns: u32,
    /// Host byte order (the program swaps them).
    pub sport: u16,
    pub dport: u16,
    /// AF_INET (2) or AF_INET6 (10); a byte is enough for both.
    pub family: u8,
    /// On `-> CLOSE` only (0 otherwise), how the full socket ended: see
    /// [`close`].
    pub close: u8,
    pub oldstate: u8,
    pub newstate: u8,
    /// `comm` of the task on the CPU, NUL padded.
    pub comm: [u8; 16],
}

impl Event {
    /// Whether this transition creates a socket (old state CLOSE or LISTEN): the only events
    /// whose `netns` and `cgroup` the program writes. Skipping those reads and stores on the
    /// other events is part of what keeps the program near the cost of an empty one.
    pub const fn is_birth(&self) -> bool {
        self.oldstate == 7 || self.oldstate == 10
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), only integer arrays and integers, no padding (checked by
// the size assertion below).
unsafe impl aya::Pod for Event {}

const _: () = assert!(core::mem::size_of::<Event>() == 88);

/// Values of [`Event::close`]. The tracepoint shows every end of a full
/// socket as `-> CLOSE`, including the ones where `tcp_time_wait()` hands
/// the connection to a timewait mini-socket that lives on (and that `ss`
/// shows): the program tells them apart from the socket itself.
pub mod close {
    /// A timewait mini-socket in TIME_WAIT replaced the socket.
    pub const TIME_WAIT: u8 = 0xff;
    /// An orphan (its application already closed it) was handed to a
    /// timewait mini-socket in FIN_WAIT2, which waits for the peer's FIN.
    pub const FIN_WAIT2: u8 = 0xfe;
    /// Any other value is a real close, carrying the socket's pending error
    /// (`sk_err`, an errno: ECONNREFUSED, ECONNRESET, ETIMEDOUT, ...; 0 for
    /// a clean close), capped at this.
    pub const MAX_ERRNO: u8 = 0xfd;
}

/// Values of [`Event::newstate`] above every TCP state: not a transition but
/// something that happened to the socket, from the retransmit and reset
/// hooks (ring buffer `SEGMENTS`); `oldstate` is the socket's state then.
pub mod segment {
    /// `tcp_retransmit_skb`: a segment sent again.
    pub const RETRANSMIT: u8 = 0x40;
    /// `tcp_retransmit_synack`: a listener's SYN-ACK sent again (the
    /// tuple is the request's; `skaddr` the listener).
    pub const SYNACK_RETRANSMIT: u8 = 0x41;
    /// `tcp_send_reset`, from a full socket.
    pub const RESET_SENT: u8 = 0x42;
    /// `tcp_receive_reset`.
    pub const RESET_RECEIVED: u8 = 0x43;
    /// `skb:kfree_skb`: a packet of this socket's dropped, for one of the reasons userspace
    /// asked for. The reason (`enum skb_drop_reason`, this kernel's numbering) is in the
    /// event's `cgroup` slot, which a segment event otherwise leaves 0.
    pub const DROP: u8 = 0x44;
    /// `bind()` on a TCP socket refused with EADDRINUSE (fexit of `inet_bind` and
    /// `inet6_bind`, or the `syscalls:sys_exit_bind` tracepoint): the address asked for is the event's source (port 0: any port, none
    /// of the range free), the binding task is the event's, and the socket's namespace is
    /// in the `cgroup` slot. No TCP state changes, so no transition says it.
    pub const BIND_IN_USE: u8 = 0x45;
}

/// Reasons of `enum skb_drop_reason` below this are what the drop hook can be asked to watch
/// (one bit each in [`Config::drop_reasons`]), and what `DROPS` counts; subsystem reasons
/// (0x10000 and up: mac80211, openvswitch) are never about TCP.
pub const DROP_REASONS: u32 = 256;

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
    /// Retransmit and reset events lost because `SEGMENTS` was full.
    pub const SEGMENTS_FULL: u32 = 1;
    /// Resets sent with no full socket to name (a SYN to a closed port, a
    /// timewait or request socket answering): counted, not reported.
    pub const RESET_NO_SOCKET: u32 = 2;
    /// Drop events lost because `SEGMENTS` was full.
    pub const DROPS_FULL: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Kernel filters: an event passes when every non-zero field matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filters {
    /// Local or remote port.
    pub port: u16,
    pub lport: u16,
    pub rport: u16,
    /// AF_INET or AF_INET6.
    pub family: u16,
}

/// Byte offsets of every kernel field the program reads, resolved from the
/// running kernel's BTF by userspace (`tcpstate::btf`). Adding a field the
/// program reads means one field here, its BTF path there, and its use.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    /// In `struct tcp_sock` (which starts with `struct sock`).
    pub family: u32,
    pub dport: u32,
    pub sport: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub saddr6: u32,
    pub daddr6: u32,
    /// `struct net *` in the socket.
    pub net: u32,
    /// `sk_err` (int) and `sk_flags` (unsigned long) in the socket.
    pub sk_err: u32,
    pub sk_flags: u32,
    /// In `struct net`: `ns.inum`, and the timewait death row's live count
    /// (`ipv4.tcp_death_row.tw_refcount`) and limit
    /// (`sysctl_max_tw_buckets`).
    pub net_inum: u32,
    pub tw_refcount: u32,
    pub tw_max: u32,
    /// In `struct task_struct`.
    pub tgid: u32,
    pub comm: u32,
    /// Bit numbers of `SOCK_DEAD` and `SOCK_DONE` in `enum sock_flags`.
    pub flag_dead: u32,
    pub flag_done: u32,
    /// In `struct sock_common` (first in `struct sock` and in `struct
    /// request_sock`): `skc_state`, and the local port in host order
    /// (`skc_num`) and IPv4 address (`skc_rcv_saddr`), the only ones a
    /// request socket has.
    pub state: u32,
    pub num: u32,
    pub rcv_saddr: u32,
    /// The socket's cgroup id, three loads away: `sk_cgrp_data.cgroup` in
    /// the socket, `kn` in `struct cgroup`, `id` in `struct kernfs_node`.
    /// All 0 when this kernel has no socket cgroup data (the program then
    /// reports 0).
    pub sk_cgroup: u32,
    pub cgroup_kn: u32,
    pub kn_id: u32,
    /// 1 when the kernel has `bpf_get_current_task_btf` (5.11+): the task's
    /// tgid and comm are then two plain loads. 0 on older kernels, where the
    /// program calls `bpf_get_current_pid_tgid` and `bpf_get_current_comm`
    /// instead; the verifier never visits the branch this kernel cannot run.
    pub task_btf: u32,
    /// In `struct sk_buff`: the owning socket, the L3 protocol (big endian), the buffer's
    /// start and the network header's offset from it. Read only by the drop hook.
    pub skb_sk: u32,
    pub skb_protocol: u32,
    pub skb_head: u32,
    pub skb_network_header: u32,
    /// 1 when `skb:kfree_skb` says why (its third argument, 5.17+): the drop hook needs it.
    pub kfree_reason: u32,
    /// 1 when `skb:kfree_skb` also names the socket a received packet was for (`rx_sk`,
    /// its fourth argument, 6.11+): most received drops have no `skb->sk` yet.
    pub kfree_rx_sk: u32,
    /// `sk_protocol` (u16 since 5.6) in the socket: the state-change program's protocol
    /// filter (cheaper than the `bpf_skc_to_tcp_sock` call it replaced on all but `-> CLOSE`),
    /// and the drop hook's, which reads a socket it gets from a packet without the helper
    /// that types it (the helper refuses the RCU pointer `skb->sk` is on 6.2+).
    pub sk_protocol: u32,
    /// In `struct socket`: its `sk`, `type` (SOCK_STREAM...) and `file`, for the bind hooks,
    /// which find the socket from the fd `bind()` was called on: `files` in the task,
    /// `fdt` in `struct files_struct`, `fd` and `max_fds` in `struct fdtable`,
    /// `private_data` in `struct file`.
    pub socket_sk: u32,
    pub socket_type: u32,
    pub socket_file: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_fd: u32,
    pub fdtable_max_fds: u32,
    pub file_private_data: u32,
}

/// Everything the program is loaded with: the read-only global `CONFIG`,
/// which userspace sets with one `override_global` and the verifier then
/// treats as constants.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// A CPU wakes userspace when its ring holds exactly this many events.
    pub wake_at: u64,
    /// log2 of the slots in each CPU's event ring.
    pub slot_bits: u32,
    pub filters: Filters,
    pub off: Offsets,
    /// The drop reasons watched: bit `r % 64` of word `r / 64` for reason `r` (below
    /// [`DROP_REASONS`]).
    pub drop_reasons: [u64; 4],
}

impl Config {
    /// All zero: what the object carries until userspace overrides it.
    pub const ZERO: Config = Config {
        wake_at: 0,
        slot_bits: 0,
        filters: Filters {
            port: 0,
            lport: 0,
            rport: 0,
            family: 0,
        },
        off: Offsets {
            family: 0,
            dport: 0,
            sport: 0,
            saddr: 0,
            daddr: 0,
            saddr6: 0,
            daddr6: 0,
            net: 0,
            sk_err: 0,
            sk_flags: 0,
            net_inum: 0,
            tw_refcount: 0,
            tw_max: 0,
            tgid: 0,
            comm: 0,
            flag_dead: 0,
            flag_done: 0,
            state: 0,
            num: 0,
            rcv_saddr: 0,
            sk_cgroup: 0,
            cgroup_kn: 0,
            kn_id: 0,
            task_btf: 0,
            skb_sk: 0,
            skb_protocol: 0,
            skb_head: 0,
            skb_network_header: 0,
            kfree_reason: 0,
            kfree_rx_sk: 0,
            sk_protocol: 0,
            socket_sk: 0,
            socket_type: 0,
            socket_file: 0,
            task_files: 0,
            files_fdt: 0,
            fdtable_fd: 0,
            fdtable_max_fds: 0,
            file_private_data: 0,
        },
        drop_reasons: [0; 4],
    };
}

// No implicit padding (Pod): 8 + 4 + 8 + 39 * 4 + 4 * 8 = 208, a multiple of 8 (the struct
// is copied into the object as bytes, and every byte of a Pod must be initialised). Fields
// are added to `Offsets` two at a time (or with a u32 of padding) to keep it so.
const _: () = assert!(core::mem::size_of::<Config>() == 208);

#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, no padding (size assertion above).
unsafe impl aya::Pod for Config {}

/// Name of the [`Config`] global in the object.
pub const CONFIG: &str = "CONFIG";

/// Map names, shared so a rename cannot silently break the loader.
pub mod map {
    /// `Event` slots, `1 << slot_bits` per CPU, CPU-major (mmapped).
    pub const RING: &str = "RING";
    /// One `Positions` per CPU (mmapped).
    pub const POS: &str = "POS";
    /// A small BPF ring buffer used only to wake userspace.
    pub const DOORBELL: &str = "DOORBELL";
    pub const STATS: &str = "STATS";
    /// A BPF ring buffer of retransmit and reset events ([`super::segment`]):
    /// rare next to transitions, and written from several hooks, which may
    /// nest on a CPU (the per-CPU rings assume one writer that does not).
    pub const SEGMENTS: &str = "SEGMENTS";
    /// Per-CPU counts of TCP packets dropped with no full socket to name, by reason.
    pub const DROPS: &str = "DROPS";
}

/// Program name in the object file.
pub const PROGRAM: &str = "inet_sock_set_state";

/// The retransmit hooks' programs, each named after its tracepoint.
pub const RETRANSMIT_HOOKS: [&str; 2] = ["tcp_retransmit_skb", "tcp_retransmit_synack"];
/// The reset hooks' programs, each named after its tracepoint.
pub const RESET_HOOKS: [&str; 2] = ["tcp_send_reset", "tcp_receive_reset"];
/// The drop hook's program, named after its tracepoint (`skb:kfree_skb`).
pub const DROP_HOOKS: [&str; 1] = ["kfree_skb"];
/// The bind hooks' programs: fexit, named after the functions they follow (only a bind
/// pays); or, where trampolines are refused and the operator asks, the syscall tracepoints
/// (which put every syscall of every task on the slow path while attached).
pub const BIND_HOOKS: [&str; 2] = ["inet_bind", "inet6_bind"];
pub const BIND_SYSCALL_HOOKS: [&str; 2] = ["sys_enter_bind", "sys_exit_bind"];
/// `BINDS`: the `bind()` calls in flight, by thread.
pub const BINDS_MAP: &str = "BINDS";
