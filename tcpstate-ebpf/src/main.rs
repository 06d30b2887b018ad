//! `tp_btf/inet_sock_set_state` -> per-CPU event rings.
//!
//! A BTF tracepoint rather than the classic `sock:inet_sock_set_state`: the
//! kernel calls it straight from `inet_sk_state_store()` with the socket
//! pointer, skipping the perf tracepoint machinery that formats a record
//! nobody else reads, and the socket's fields are plain typed loads instead
//! of probe reads. The field offsets come from the running kernel's BTF
//! (userspace resolves them and sets them as read-only globals, which the
//! verifier folds into constants), so one object runs on every kernel.
//!
//! Events go to a ring per CPU in a mmapped array (`RING` + `POS`) rather
//! than a BPF ring buffer: the ring buffer's reserve/commit takes a lock and
//! bounces its producer position between CPUs, ~90 ns per event on these
//! machines, while a CPU's own ring needs no lock and no shared store (the
//! program does not nest on a CPU). Userspace merges the rings by
//! timestamp. A CPU rings `DOORBELL`, a tiny BPF ring buffer, only when its
//! ring reaches `wake_at` events, so bursts wake userspace once.
//!
//! Every event that cannot be delivered is counted in `STATS`; nothing is
//! lost silently.
#![no_std]
#![no_main]
// `core`'s atomic types have no read-modify-write ops on bpfel; the
// intrinsic lowers to the BPF atomic instruction (see `publish`).
#![cfg_attr(not(bpf_target_arch = "x86_64"), allow(internal_features))]
#![cfg_attr(not(bpf_target_arch = "x86_64"), feature(core_intrinsics))]
#![cfg_attr(bpf_target_arch = "x86_64", feature(asm_experimental_arch))]

use core::ffi::c_void;
#[cfg(not(bpf_target_arch = "x86_64"))]
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    Global,
    bindings::{BPF_F_MMAPABLE, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_ktime_get_ns, generated},
    macros::{btf_tracepoint, fexit, map, tracepoint},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, FExitContext, TracePointContext},
};
use tcpstate_common::{AF_INET6, Config, DROP_REASONS, Event, Positions, close, segment, stat};

/// Userspace sizes both arrays at load: CPUs << slot_bits slots, and one
/// `Positions` per CPU.
#[map]
static RING: Array<Event> = Array::with_max_entries(1, BPF_F_MMAPABLE);
#[map]
static POS: Array<Positions> = Array::with_max_entries(1, BPF_F_MMAPABLE);
#[map]
static DOORBELL: RingBuf = RingBuf::with_byte_size(4096, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);
/// Retransmit and reset events: a BPF ring buffer, whose reserve is safe when one hook
/// interrupts another on a CPU (the per-CPU rings are not). Userspace drains it with the
/// rings, on their doorbell and timer, so a retransmit storm wakes nobody.
#[map]
static SEGMENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
/// TCP packets dropped with no full socket to name (a SYN for a closed port, a segment a
/// request or timewait socket refused, most received drops before 6.11), per reason: counted
/// in place, so a scan or a flood costs no event.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_REASONS, 0);

const TCP_FIN_WAIT2: i32 = 5;
const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: i32 = 10;
const TCP_CLOSING: i32 = 11;
const IPPROTO_TCP: u16 = 6;

/// Filters, ring geometry and this kernel's field offsets (see
/// `tcpstate_common::Config`); read-only, so the verifier folds every
/// field into a constant.
#[unsafe(no_mangle)]
static CONFIG: Global<Config> = Global::new(Config::ZERO);

/// One field of `CONFIG`, read without copying the whole struct.
macro_rules! cfg {
    ($($field:ident).+) => {{
        let c = (&raw const CONFIG).cast::<Config>();
        // SAFETY: `Global` is a transparent wrapper of an initialised
        // `Config`; volatile keeps LLVM from folding the zero default.
        #[allow(unused_unsafe, reason = "also expanded inside unsafe blocks")]
        let v = unsafe { core::ptr::read_volatile(&raw const (*c).$($field).+) };
        v
    }};
}

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and a BTF tracepoint does not nest on a CPU
        // (the kernel counts that as a recursion miss instead).
        unsafe { *slot += 1 };
    }
}

/// One typed load at `base + offset`. The offset is a frozen read-only
/// global, so the verifier sees a constant and checks the access against
/// the BTF type; volatile keeps LLVM from merging or widening loads.
#[inline(always)]
unsafe fn field<T>(base: *const u8, offset: u32, extra: usize) -> T {
    // SAFETY: the caller passes a BTF-typed kernel pointer and an offset
    // resolved from the same BTF; the verifier checks both.
    unsafe { core::ptr::read_volatile(base.add(offset as usize + extra).cast::<T>()) }
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let newstate: i32 = ctx.arg(2);
    let Some((family, sport, dport)) = tcp_ports_if_wanted(sk, newstate) else {
        return 0;
    };

    // SAFETY: no preconditions; the program cannot migrate while it runs.
    let cpu = unsafe { generated::bpf_get_smp_processor_id() };
    let Some(pos) = POS.get_ptr_mut(cpu) else {
        count(stat::RINGBUF_FULL);
        return 0;
    };
    // SAFETY: `pos` is this CPU's entry; only this program (which does not
    // nest on a CPU) writes `head`, only userspace writes `tail`.
    let (head, tail) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*pos).head),
            core::ptr::read_volatile(&raw const (*pos).tail),
        )
    };
    let bits = cfg!(slot_bits);
    let mask = (1u32 << bits) - 1;
    if head.wrapping_sub(tail) > u64::from(mask) {
        count(stat::RINGBUF_FULL);
        return 0;
    }
    let Some(ev) = RING.get_ptr_mut((cpu << bits) | (head as u32 & mask)) else {
        count(stat::RINGBUF_FULL);
        return 0;
    };
    let oldstate: i32 = ctx.arg(1);
    // SAFETY: a BTF socket pointer and this kernel's offsets.
    // `skc_rcv_saddr`, not `inet_saddr` (past `struct sock`): TCP sets both together (bind,
    // connect, the accepted socket's clone) and resets them after the `-> CLOSE` event.
    let (s0, s1, d0, d1) = unsafe { addresses(sk, family, cfg!(off.rcv_saddr)) };
    // SAFETY: `ev` is a free Event-sized slot of this CPU's ring (head - tail
    // < slots): userspace does not read it until `head` moves past it.
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).skaddr = sk as u64;
        // Only births carry the cgroup and namespace; on the other events the slot keeps
        // whatever an older event left there and userspace ignores it (`decode`), so most
        // events skip those reads, branches and stores.
        if oldstate == TCP_CLOSE || oldstate == TCP_LISTEN {
            (*ev).cgroup = cgroup_at_birth(sk);
            (*ev).netns = netns_at_birth(sk);
        }
        let saddr = (&raw mut (*ev).saddr).cast::<u64>();
        let daddr = (&raw mut (*ev).daddr).cast::<u64>();
        saddr.write(s0);
        daddr.write(d0);
        // An IPv4 address is the first 4 bytes; userspace zeroes the rest of the slot.
        if family == AF_INET6 {
            saddr.add(1).write(s1);
            daddr.add(1).write(d1);
        }
        write_current(ev);
        (*ev).sport = sport;
        (*ev).dport = dport;
        (*ev).family = family as u8;
        (*ev).close = if newstate == TCP_CLOSE {
            how_closed(sk, oldstate)
        } else {
            0
        };
        (*ev).oldstate = oldstate as u8;
        (*ev).newstate = newstate as u8;
    }
    // SAFETY: `pos` is this CPU's entry.
    let published = unsafe { publish(&raw mut (*pos).head, head) };
    if published.wrapping_sub(tail) == cfg!(wake_at) {
        // A lost doorbell (its ring full) only delays delivery to the timer.
        let _ = DOORBELL.output::<u32>(&cpu, u64::from(BPF_RB_FORCE_WAKEUP));
    }
    0
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: BtfTracePointContext) -> i32 {
    segment_from(ctx.arg(0), segment::RETRANSMIT);
    0
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    // NULL for a reset answering no socket (a SYN to a closed port), or a timewait or request
    // socket: counted, not reported.
    if !segment_from(ctx.arg(0), segment::RESET_SENT) {
        count(stat::RESET_NO_SOCKET);
    }
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    segment_from(ctx.arg(0), segment::RESET_RECEIVED);
    0
}

/// A listener's SYN-ACK sent again: the connection is the request socket (`struct
/// request_sock` starts with the same `sock_common`), whose only local port is `skc_num`.
#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn tcp_retransmit_synack(ctx: BtfTracePointContext) -> i32 {
    let listener: *const u8 = ctx.arg(0);
    let req: *const u8 = ctx.arg(1);
    if req.is_null() {
        return 0;
    }
    // SAFETY (all `field` calls): a BTF request socket pointer and sock_common offsets.
    let family: u16 = unsafe { field(req, cfg!(off.family), 0) };
    let sport: u16 = unsafe { field(req, cfg!(off.num), 0) };
    let dport = u16::from_be(unsafe { field(req, cfg!(off.dport), 0) });
    if !wanted(family, sport, dport) {
        return 0;
    }
    // SAFETY: as above.
    unsafe {
        write_segment(
            req,
            listener as u64,
            (family, sport, dport),
            // TCP_SYN_RECV: the connection's state while its SYN-ACK is unanswered.
            (3, segment::SYNACK_RETRANSMIT, 0),
            cfg!(off.rcv_saddr),
            stat::SEGMENTS_FULL,
        );
    };
    0
}

/// `skb:kfree_skb`: a packet dropped, and why. Attached only with `--drops`, on kernels whose
/// tracepoint says why (5.17+). It fires for every packet the host drops, of any protocol,
/// so the cheapest tests come first: the reason (a bit of a constant), then the socket; the
/// packet's own header is read only when no TCP socket is named.
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let reason = ctx.arg::<u64>(2) as u32;
    if reason >= DROP_REASONS {
        return 0;
    }
    let c = (&raw const CONFIG).cast::<Config>();
    // SAFETY: a word of the initialised, read-only `CONFIG`; the index is masked to its 4.
    let word = unsafe {
        core::ptr::read_volatile(
            (&raw const (*c).drop_reasons)
                .cast::<u64>()
                .add((reason / 64) as usize & 3),
        )
    };
    if word & (1 << (reason % 64)) == 0 {
        return 0;
    }
    let skb: *const u8 = ctx.arg(0);
    // The socket as a plain address: `skb->sk` is an RCU pointer to the verifier on 6.2+,
    // which `bpf_skc_to_tcp_sock` refuses, so this hook reads the socket with probe reads and
    // tells a full TCP socket from the rest itself.
    // SAFETY: a BTF sk_buff pointer and this kernel's offset.
    let mut sk: u64 = unsafe { field(skb, cfg!(off.skb_sk), 0) };
    if sk == 0 && cfg!(off.kfree_rx_sk) != 0 {
        sk = ctx.arg::<u64>(3);
    }
    if sk != 0 && dropped_from_socket(sk, reason) {
        return 0;
    }
    if is_tcp(skb)
        && let Some(n) = DROPS.get_ptr_mut(reason)
    {
        // SAFETY: per-CPU slot; a BTF tracepoint does not nest on a CPU.
        unsafe { *n += 1 };
    }
    0
}

/// `bind()` of an IPv4 socket returned (fexit: a trampoline on this function alone, so no
/// other call pays; refused where ftrace is locked down, where the syscall tracepoints
/// below stand in).
#[fexit(function = "inet_bind")]
pub fn inet_bind(ctx: FExitContext) -> i32 {
    bind_returned(&ctx);
    0
}

/// `bind()` of an IPv6 socket returned.
#[fexit(function = "inet6_bind")]
pub fn inet6_bind(ctx: FExitContext) -> i32 {
    bind_returned(&ctx);
    0
}

/// `inet_bind(sock, uaddr, addr_len)` / `inet6_bind` returned: EADDRINUSE on a TCP socket
/// is an event. Every other return costs one compare.
#[inline(always)]
fn bind_returned(ctx: &FExitContext) {
    // fexit: the return value follows the three arguments.
    if ctx.arg::<i32>(3) != -98 {
        return;
    }
    let sock: u64 = ctx.arg(0);
    let uaddr: u64 = ctx.arg(1);
    if peek::<u16>(sock + u64::from(cfg!(off.socket_type))) != Some(1) {
        return; // SOCK_STREAM only
    }
    let Some(sk) = peek::<u64>(sock + u64::from(cfg!(off.socket_sk))) else {
        return;
    };
    if sk == 0 || peek::<u16>(sk + u64::from(cfg!(off.sk_protocol))) != Some(6) {
        return;
    }
    // The kernel's copy of the address (`move_addr_to_kernel`).
    bind_refused(sk, |at| peek::<u64>(uaddr + at));
}

/// The `bind()` calls in flight, by thread: the fd and the user's address, from the syscall's
/// entry to its exit. LRU, so a thread that never returns (killed mid-call) costs a slot
/// until others need it.
#[map]
static BINDS: LruHashMap<u64, [u64; 2]> = LruHashMap::with_max_entries(4096, 0);

/// `bind(fd, addr, len)` entered: remember what it asked for. The syscall tracepoints, not a
/// function hook: they need no trampoline (fexit is refused where ftrace is locked down), and
/// their layout has been the same on every kernel: the arguments from offset 16.
#[tracepoint(category = "syscalls", name = "sys_enter_bind")]
pub fn sys_enter_bind(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets of this tracepoint's fields (its `format` in tracefs).
    let (fd, uaddr) = unsafe {
        (
            ctx.read_at::<u64>(16).unwrap_or(u64::MAX),
            ctx.read_at::<u64>(24).unwrap_or(0),
        )
    };
    // SAFETY: no preconditions.
    let id = unsafe { generated::bpf_get_current_pid_tgid() };
    let _ = BINDS.insert(id, [fd, uaddr], 0);
    0
}

/// `bind()` returned: on EADDRINUSE for a TCP socket, an event (the port asked for is taken,
/// or, asked for port 0, no port of the range is free). Every other return costs the lookup.
#[tracepoint(category = "syscalls", name = "sys_exit_bind")]
pub fn sys_exit_bind(ctx: TracePointContext) -> u32 {
    // SAFETY: no preconditions.
    let id = unsafe { generated::bpf_get_current_pid_tgid() };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(&[fd, uaddr]) = (unsafe { BINDS.get(id) }) else {
        return 0;
    };
    let _ = BINDS.remove(id);
    // SAFETY: this tracepoint's `ret` field.
    if unsafe { ctx.read_at::<i64>(16) }.unwrap_or(0) != -98 {
        return 0;
    }
    if let Some(sk) = tcp_socket_of_fd(fd) {
        bind_refused(sk, |at| {
            // SAFETY: the helper checks the user address and fails rather than fault.
            unsafe { aya_ebpf::helpers::bpf_probe_read_user((uaddr + at) as *const u64) }.ok()
        });
    }
    0
}

/// The `struct sock` of the current task's fd `fd` when it is a TCP socket's: the fd table
/// walked with probe reads (a file whose `private_data` is a socket pointing back at it).
#[inline(always)]
fn tcp_socket_of_fd(fd: u64) -> Option<u64> {
    // SAFETY: no preconditions; the address is only ever probe-read.
    let task = unsafe { generated::bpf_get_current_task() };
    let files: u64 = peek(task + u64::from(cfg!(off.task_files)))?;
    let fdt: u64 = peek(files + u64::from(cfg!(off.files_fdt)))?;
    let max: u32 = peek(fdt + u64::from(cfg!(off.fdtable_max_fds)))?;
    if fd >= u64::from(max) {
        return None;
    }
    let array: u64 = peek(fdt + u64::from(cfg!(off.fdtable_fd)))?;
    let file: u64 = peek(array + fd * 8)?;
    let socket: u64 = peek(file + u64::from(cfg!(off.file_private_data)))?;
    if file == 0 || socket == 0 || peek::<u64>(socket + u64::from(cfg!(off.socket_file)))? != file {
        return None;
    }
    if peek::<u16>(socket + u64::from(cfg!(off.socket_type)))? != 1 {
        return None; // SOCK_STREAM only
    }
    let sk: u64 = peek(socket + u64::from(cfg!(off.socket_sk)))?;
    (sk != 0 && peek::<u16>(sk + u64::from(cfg!(off.sk_protocol)))? == 6).then_some(sk)
}

/// The event for a refused bind of socket `sk`; `addr(at)` reads 8 bytes at offset `at` of
/// the address asked for (the kernel's copy or the user's).
#[inline(always)]
fn bind_refused(sk: u64, addr: impl Fn(u64) -> Option<u64>) {
    // sockaddr_in / sockaddr_in6: family (2 bytes), port (2, big endian), then the IPv4
    // address, or the flow info (4) and the IPv6 address.
    let Some(head) = addr(0) else {
        return;
    };
    // AF_UNSPEC is what an IPv4 socket may bind INADDR_ANY with.
    let family = match (head & 0xffff) as u16 {
        0 => tcpstate_common::AF_INET,
        f => f,
    };
    let port = u16::from_be(((head >> 16) & 0xffff) as u16);
    if !wanted(family, port, 0) {
        return;
    }
    let local = if family == AF_INET6 {
        (addr(8).unwrap_or(0), addr(16).unwrap_or(0))
    } else {
        ((head >> 32) & 0xffff_ffff, 0)
    };
    let net = peek::<u64>(sk + u64::from(cfg!(off.net))).unwrap_or(0);
    let netns = if net == 0 {
        0
    } else {
        peek::<u32>(net + u64::from(cfg!(off.net_inum))).unwrap_or(0)
    };
    emit_segment(
        sk,
        (family, port, 0),
        (local.0, local.1, 0, 0),
        (TCP_CLOSE as u8, segment::BIND_IN_USE, u64::from(netns)),
        stat::SEGMENTS_FULL,
    );
}

/// `T` at kernel address `at`, or None where it cannot be read.
#[inline(always)]
fn peek<T>(at: u64) -> Option<T> {
    // SAFETY: the helper checks the address and fails rather than fault.
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel(at as *const T) }.ok()
}

/// Reports a drop on `sk` when it is a full TCP socket (not a timewait or request socket,
/// nor another protocol's); false when it is none of ours, so the packet is counted by
/// reason instead. A socket the port filters leave out is ours too: it is not counted.
#[inline(always)]
fn dropped_from_socket(sk: u64, reason: u32) -> bool {
    let Some(state) = peek::<u8>(sk + u64::from(cfg!(off.state))) else {
        return false;
    };
    // TCP_TIME_WAIT and TCP_NEW_SYN_RECV: mini-sockets, which end at `sock_common`.
    if state == 6 || state == 12 {
        return false;
    }
    let family = peek::<u16>(sk + u64::from(cfg!(off.family))).unwrap_or(0);
    let protocol = peek::<u16>(sk + u64::from(cfg!(off.sk_protocol))).unwrap_or(0);
    if protocol != 6 || (family != AF_INET6 && family != tcpstate_common::AF_INET) {
        return false;
    }
    let sport = u16::from_be(peek(sk + u64::from(cfg!(off.sport))).unwrap_or(0));
    let dport = u16::from_be(peek(sk + u64::from(cfg!(off.dport))).unwrap_or(0));
    if !wanted(family, sport, dport) {
        return true;
    }
    let at = |off: u32, extra: u64| sk + u64::from(off) + extra;
    let addrs = if family == AF_INET6 {
        let (s, d) = (cfg!(off.saddr6), cfg!(off.daddr6));
        (
            peek(at(s, 0)).unwrap_or(0),
            peek(at(s, 8)).unwrap_or(0),
            peek(at(d, 0)).unwrap_or(0),
            peek(at(d, 8)).unwrap_or(0),
        )
    } else {
        (
            u64::from(peek::<u32>(at(cfg!(off.saddr), 0)).unwrap_or(0)),
            0,
            u64::from(peek::<u32>(at(cfg!(off.daddr), 0)).unwrap_or(0)),
            0,
        )
    };
    emit_segment(
        sk,
        (family, sport, dport),
        addrs,
        (state, segment::DROP, u64::from(reason)),
        stat::DROPS_FULL,
    );
    true
}

/// Whether a packet is IPv4 or IPv6 carrying TCP (no extension headers), from its own
/// network header.
#[inline(always)]
fn is_tcp(skb: *const u8) -> bool {
    // SAFETY (all `field` calls): a BTF sk_buff pointer and this kernel's offsets.
    let proto = u16::from_be(unsafe { field(skb, cfg!(off.skb_protocol), 0) });
    let at = match proto {
        0x0800 => 9, // struct iphdr.protocol
        0x86dd => 6, // struct ipv6hdr.nexthdr
        _ => return false,
    };
    let head: u64 = unsafe { field(skb, cfg!(off.skb_head), 0) };
    let nh: u16 = unsafe { field(skb, cfg!(off.skb_network_header), 0) };
    // `head` points to plain bytes, which the verifier does not let a tracing program load:
    // one probe read. A network header never set (0xffff) reads past the buffer, or garbage.
    peek::<u8>(head + u64::from(nh) + at) == Some(6)
}

/// Reports `what` about a full TCP socket; false when `sk` is none (NULL, a timewait or
/// request socket).
#[inline(always)]
fn segment_from(sk: *mut c_void, what: u8) -> bool {
    // Some hooks pass NULL (a reset for no socket); the helper wants a checked pointer.
    if sk.is_null() {
        return false;
    }
    // SAFETY: the helper accepts NULL and any socket pointer and checks them.
    let tp = unsafe { generated::bpf_skc_to_tcp_sock(sk) };
    if tp.is_null() {
        return false;
    }
    let sk = tp as *const u8;
    let Some(ports) = ports_if_wanted(sk) else {
        return true;
    };
    // SAFETY (all `field` calls): a BTF socket pointer and this kernel's offsets.
    let state: u8 = unsafe { field(sk, cfg!(off.state), 0) };
    unsafe {
        write_segment(
            sk,
            sk as u64,
            ports,
            (state, what, 0),
            cfg!(off.saddr),
            stat::SEGMENTS_FULL,
        );
    };
    true
}

/// One retransmit or reset event into `SEGMENTS` (`state`, `what`, and a detail or 0); a full
/// buffer is counted at `full`. `saddr4` is where `sk` keeps its IPv4 local address (a
/// request socket has no `inet_sock`).
///
/// # Safety
/// `sk` is a BTF-typed pointer whose `sock_common` fields the offsets describe.
#[inline(always)]
unsafe fn write_segment(
    sk: *const u8,
    skaddr: u64,
    (family, sport, dport): (u16, u16, u16),
    what: (u8, u8, u64),
    saddr4: u32,
    full: u32,
) {
    // SAFETY: a BTF pointer and this kernel's offsets.
    let addrs = unsafe { addresses(sk, family, saddr4) };
    emit_segment(skaddr, (family, sport, dport), addrs, what, full);
}

/// One segment event (a retransmit, reset or drop) into `SEGMENTS`, from values already read;
/// a full buffer is counted at `full`.
#[inline(always)]
fn emit_segment(
    skaddr: u64,
    (family, sport, dport): (u16, u16, u16),
    (s0, s1, d0, d1): (u64, u64, u64, u64),
    (state, what, detail): (u8, u8, u64),
    full: u32,
) {
    let Some(mut slot) = SEGMENTS.reserve::<Event>(0) else {
        count(full);
        return;
    };
    let ev = slot.as_mut_ptr();
    // SAFETY: `ev` is the reserved, Event-sized record.
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).skaddr = skaddr;
        (*ev).cgroup = detail;
        let saddr = (&raw mut (*ev).saddr).cast::<u64>();
        saddr.write(s0);
        saddr.add(1).write(s1);
        let daddr = (&raw mut (*ev).daddr).cast::<u64>();
        daddr.write(d0);
        daddr.add(1).write(d1);
        write_current(ev);
        (*ev).netns = 0;
        (*ev).sport = sport;
        (*ev).dport = dport;
        (*ev).family = family as u8;
        (*ev).close = 0;
        (*ev).oldstate = state;
        (*ev).newstate = what;
    }
    // Userspace drains it with the rings; no wake-up per event.
    slot.submit(u64::from(BPF_RB_NO_WAKEUP));
}

/// The current task's tgid and comm into `ev`.
///
/// # Safety
/// `ev` points to an Event-sized slot this program owns.
#[inline(always)]
unsafe fn write_current(ev: *mut Event) {
    // A constant to the verifier: it walks only the branch this kernel has, so 5.10, which lacks
    // bpf_get_current_task_btf, never sees the call, and 5.11+ pays nothing for the other.
    if cfg!(off.task_btf) != 0 {
        // SAFETY: a BTF task pointer to the current task, always valid; offsets from its BTF;
        // `ev` per the caller.
        unsafe {
            let task = generated::bpf_get_current_task_btf() as *const u8;
            (*ev).pid = field(task, cfg!(off.tgid), 0);
            // `comm` straight from the task: two loads instead of the
            // bpf_get_current_comm() copy (~75 ns here).
            let comm = (&raw mut (*ev).comm).cast::<u64>();
            let c = cfg!(off.comm);
            comm.write(field(task, c, 0));
            comm.add(1).write(field(task, c, 8));
        }
    } else {
        // SAFETY: no preconditions; `comm` is 16 writable bytes of `ev`.
        unsafe {
            (*ev).pid = (generated::bpf_get_current_pid_tgid() >> 32) as u32;
            generated::bpf_get_current_comm((&raw mut (*ev).comm).cast(), 16);
        }
    }
}

/// A `tcp_sock`'s family and ports (`inet_sport`), unless a kernel filter leaves it out.
#[inline(always)]
fn ports_if_wanted(tp: *const u8) -> Option<(u16, u16, u16)> {
    // SAFETY (all `field` calls): offsets resolved from this kernel's BTF.
    let family: u16 = unsafe { field(tp, cfg!(off.family), 0) };
    let sport = u16::from_be(unsafe { field(tp, cfg!(off.sport), 0) });
    let dport = u16::from_be(unsafe { field(tp, cfg!(off.dport), 0) });
    wanted(family, sport, dport).then_some((family, sport, dport))
}

/// A TCP socket's family and ports, unless it is another protocol's (the tracepoint also
/// fires for DCCP, SCTP and MPTCP parents) or a kernel filter leaves it out.
///
/// Everything but the `-> CLOSE` events is read from `sock_common`'s first cache line, which
/// the state change has just touched: the local port is `skc_num`, which the kernel keeps
/// equal to `inet_sport` (bind, connect and the accepted socket's clone set both) until
/// `inet_put_port()` zeroes it just before a socket goes to CLOSE. Only those events read
/// `inet_sport`, which lives past `struct sock` (another cache line), through the
/// `bpf_skc_to_tcp_sock` helper's typed pointer; the others skip the helper call too.
#[inline(always)]
fn tcp_ports_if_wanted(sk: *const u8, newstate: i32) -> Option<(u16, u16, u16)> {
    // SAFETY (all `field` calls): a BTF socket pointer and offsets resolved from this
    // kernel's BTF; the verifier checks both.
    let protocol: u16 = unsafe { field(sk, cfg!(off.sk_protocol), 0) };
    if protocol != IPPROTO_TCP {
        return None;
    }
    let family: u16 = unsafe { field(sk, cfg!(off.family), 0) };
    let dport = u16::from_be(unsafe { field(sk, cfg!(off.dport), 0) });
    let sport = if newstate == TCP_CLOSE {
        // SAFETY: the helper accepts any socket pointer and checks it.
        let tp = unsafe { generated::bpf_skc_to_tcp_sock(sk as *mut c_void) };
        if tp.is_null() {
            return None;
        }
        u16::from_be(unsafe { field(tp as *const u8, cfg!(off.sport), 0) })
    } else {
        unsafe { field(sk, cfg!(off.num), 0) }
    };
    wanted(family, sport, dport).then_some((family, sport, dport))
}

/// Whether the kernel filters let a socket with this family and ports through.
#[inline(always)]
fn wanted(family: u16, sport: u16, dport: u16) -> bool {
    let filter_family = cfg!(filters.family);
    if filter_family != 0 && family != filter_family {
        return false;
    }
    let port = cfg!(filters.port);
    let lport = cfg!(filters.lport);
    let rport = cfg!(filters.rport);
    if (port != 0 && sport != port && dport != port)
        || (lport != 0 && sport != lport)
        || (rport != 0 && dport != rport)
    {
        return false;
    }
    true
}

/// Local and remote address as two u64 halves each (IPv4 in the first 4 bytes); `saddr4` is
/// the offset of the IPv4 local address.
#[inline(always)]
unsafe fn addresses(sk: *const u8, family: u16, saddr4: u32) -> (u64, u64, u64, u64) {
    // SAFETY (all `field` calls): offsets resolved from this kernel's BTF.
    if family == AF_INET6 {
        let s = cfg!(off.saddr6);
        let d = cfg!(off.daddr6);
        unsafe {
            (
                field(sk, s, 0),
                field(sk, s, 8),
                field(sk, d, 0),
                field(sk, d, 8),
            )
        }
    } else {
        let s: u32 = unsafe { field(sk, saddr4, 0) };
        let d: u32 = unsafe { field(sk, cfg!(off.daddr), 0) };
        (u64::from(s), 0, u64::from(d), 0)
    }
}

/// The socket's network namespace inode, read only on the events that create a socket (CLOSE ->
/// SYN_SENT/LISTEN, LISTEN -> SYN_RECV). A socket's namespace never changes,
/// and `ns.inum` shares a cache line with the namespace's refcount, which every socket creation
/// bumps: the load misses and cost ~50 ns/event. Userspace remembers it per socket.
#[inline(always)]
fn netns_at_birth(sk: *const u8) -> u32 {
    // SAFETY (all `field` calls): offsets resolved from this kernel's BTF.
    let net: u64 = unsafe { field(sk, cfg!(off.net), 0) };
    if net == 0 {
        0
    } else {
        unsafe { field(net as *const u8, cfg!(off.net_inum), 0) }
    }
}

/// The socket's cgroup v2 id, on the same birth events as [`netns_at_birth`] and for the
/// same reason (it never changes). From the socket, not the current task: an accepted socket
/// is born in softirq, on whatever task the CPU was running, and inherits its listener's
/// cgroup. 0 when the kernel keeps no cgroup in its sockets.
#[inline(always)]
fn cgroup_at_birth(sk: *const u8) -> u64 {
    let sk_off = cfg!(off.sk_cgroup);
    if sk_off == 0 {
        return 0;
    }
    // SAFETY (all `field` calls): offsets resolved from this kernel's BTF; each loaded
    // pointer is BTF-typed, and the verifier turns a faulting load into 0.
    let cgrp: u64 = unsafe { field(sk, sk_off, 0) };
    if cgrp == 0 {
        return 0;
    }
    let kn: u64 = unsafe { field(cgrp as *const u8, cfg!(off.cgroup_kn), 0) };
    if kn == 0 {
        return 0;
    }
    unsafe { field(kn as *const u8, cfg!(off.kn_id), 0) }
}

/// How a full socket going to CLOSE ended (`tcpstate_common::close`).
///
/// `tcp_time_wait()` hashes a timewait mini-socket in the socket's place
/// and only then moves the socket to CLOSE, so this tracepoint cannot see
/// the mini-socket; the socket it is leaving still says which path this is:
/// - an error (`sk_err`: a reset, a timeout, an abort) is a real close;
/// - from CLOSING, or from FIN_WAIT2 once the peer's FIN arrived
///   (`SOCK_DONE`), it is TIME_WAIT: those are the only error-free ways
///   out of both states;
/// - from FIN_WAIT2 without the peer's FIN, an orphan (`SOCK_DEAD`) was
///   handed to a FIN_WAIT2 mini-socket (`tcp_fin_timeout` runs there);
/// - unless the namespace's timewait table is full (`tw_refcount - 1 >=
///   tcp_max_tw_buckets`, the test `inet_twsk_alloc()` applies), in which
///   case the kernel closed it outright (TCPTimeWaitOverflow).
///
/// Userspace checks what is left over (a rare abort without an error)
/// against sock_diag.
#[inline(always)]
unsafe fn how_closed(sk: *const u8, oldstate: i32) -> u8 {
    // SAFETY (all `field` calls): offsets from this kernel's BTF.
    let err: i32 = unsafe { field(sk, cfg!(off.sk_err), 0) };
    if err != 0 {
        return if err > 0 && err < i32::from(close::MAX_ERRNO) {
            err as u8
        } else {
            close::MAX_ERRNO
        };
    }
    if oldstate != TCP_CLOSING && oldstate != TCP_FIN_WAIT2 {
        return 0;
    }
    let flags: u64 = unsafe { field(sk, cfg!(off.sk_flags), 0) };
    let done = flags & (1 << cfg!(off.flag_done)) != 0;
    let dead = flags & (1 << cfg!(off.flag_dead)) != 0;
    let handoff = if oldstate == TCP_CLOSING || done {
        close::TIME_WAIT
    } else if dead {
        close::FIN_WAIT2
    } else {
        return 0;
    };
    if cfg!(off.tw_refcount) == 0 {
        // This kernel's death row is not in `struct net` (before 6.0): no overflow test.
        return handoff;
    }
    let net: u64 = unsafe { field(sk, cfg!(off.net), 0) };
    if net == 0 {
        return 0;
    }
    let net = net as *const u8;
    let live: u32 = unsafe { field(net, cfg!(off.tw_refcount), 0) };
    let max: i32 = unsafe { field(net, cfg!(off.tw_max), 0) };
    if max >= 0 && i64::from(live) > i64::from(max) {
        return 0;
    }
    handoff
}

/// Publishes this CPU's next slot and returns the new head. The slot's
/// stores must be visible before the head moves. x86 keeps stores in
/// order (TSO) and the JIT turns a BPF store into a plain `mov`, so a
/// compiler barrier suffices there; a lock-prefixed add would cost ~55 ns an
/// event here (it waits for the slot's cache misses). Elsewhere the
/// fetching atomic add, which every JIT emits fully ordered.
#[inline(always)]
unsafe fn publish(head: *mut u64, old: u64) -> u64 {
    #[cfg(bpf_target_arch = "x86_64")]
    {
        // An empty asm block is a compiler barrier (BPF has no fence).
        // SAFETY: emits nothing.
        unsafe { core::arch::asm!("", options(nostack, preserves_flags)) };
        // SAFETY: `head` is this CPU's, 8-aligned, in the map value.
        unsafe { core::ptr::write_volatile(head, old.wrapping_add(1)) };
        old.wrapping_add(1)
    }
    #[cfg(not(bpf_target_arch = "x86_64"))]
    {
        let _ = old;
        // SAFETY: as above.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(head, 1) }.wrapping_add(1)
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
