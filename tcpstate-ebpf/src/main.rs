//! `tp_btf/inet_sock_set_state` -> ring buffer.
//!
//! A BTF tracepoint rather than the classic `sock:inet_sock_set_state`: the
//! kernel calls it straight from `inet_sk_state_store()` with the socket
//! pointer, skipping the perf tracepoint machinery that formats a record
//! nobody else reads, and the socket's fields are plain typed loads instead
//! of probe reads. The field offsets come from the running kernel's BTF
//! (userspace resolves them and sets them as read-only globals, which the
//! verifier folds into constants), so one object runs on every kernel.
//!
//! Every event that cannot be delivered is counted in `STATS`; nothing is
//! lost silently.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    Global,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_ktime_get_ns, generated},
    macros::{btf_tracepoint, map},
    maps::{PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use tcpstate_common::{AF_INET6, Event, stat};

/// 256 KiB by default; userspace resizes it with `--ring-size`.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: i32 = 10;

#[unsafe(no_mangle)]
static FILTER_PORT: Global<u16> = Global::new(0);
#[unsafe(no_mangle)]
static FILTER_LPORT: Global<u16> = Global::new(0);
#[unsafe(no_mangle)]
static FILTER_RPORT: Global<u16> = Global::new(0);
#[unsafe(no_mangle)]
static FILTER_FAMILY: Global<u16> = Global::new(0);
/// Submits wake userspace only once this many bytes wait, so a burst costs
/// one wake-up instead of one per event; userspace also polls on a short
/// timer so a quiet stream is still delivered promptly.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: Global<u64> = Global::new(64 * 1024);

// Byte offsets in the running kernel, from its BTF (see
// `tcpstate::layout`). Socket offsets are from the start of `struct
// tcp_sock`, which begins with `struct sock`.
#[unsafe(no_mangle)]
static OFF_FAMILY: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_DPORT: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SPORT: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SADDR: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_DADDR: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SADDR6: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_DADDR6: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_NET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_NET_INUM: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_TGID: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_COMM: Global<u32> = Global::new(0);

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
    let sk: *mut c_void = ctx.arg(0);
    // Doubles as the protocol filter: NULL unless a full TCP socket (the
    // tracepoint also fires for DCCP, SCTP and MPTCP parents). It also lets
    // us read `inet_sport`, which lives past `struct sock`.
    // SAFETY: the helper accepts any socket pointer and checks it.
    let tp = unsafe { generated::bpf_skc_to_tcp_sock(sk) };
    if tp.is_null() {
        return 0;
    }
    let sk = tp as *const u8;
    // SAFETY (all `field` calls): offsets resolved from this kernel's BTF.
    let family: u16 = unsafe { field(sk, OFF_FAMILY.load(), 0) };
    let filter_family = FILTER_FAMILY.load();
    if filter_family != 0 && family != filter_family {
        count(stat::FILTERED);
        return 0;
    }
    let sport = u16::from_be(unsafe { field(sk, OFF_SPORT.load(), 0) });
    let dport = u16::from_be(unsafe { field(sk, OFF_DPORT.load(), 0) });
    let port = FILTER_PORT.load();
    let lport = FILTER_LPORT.load();
    let rport = FILTER_RPORT.load();
    if (port != 0 && sport != port && dport != port)
        || (lport != 0 && sport != lport)
        || (rport != 0 && dport != rport)
    {
        count(stat::FILTERED);
        return 0;
    }

    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(stat::RINGBUF_FULL);
        return 0;
    };
    let ev = entry.as_mut_ptr();
    let oldstate: i32 = ctx.arg(1);
    let newstate: i32 = ctx.arg(2);
    let (s0, s1, d0, d1): (u64, u64, u64, u64) = if family == AF_INET6 {
        let s = OFF_SADDR6.load();
        let d = OFF_DADDR6.load();
        unsafe {
            (
                field(sk, s, 0),
                field(sk, s, 8),
                field(sk, d, 0),
                field(sk, d, 8),
            )
        }
    } else {
        let s: u32 = unsafe { field(sk, OFF_SADDR.load(), 0) };
        let d: u32 = unsafe { field(sk, OFF_DADDR.load(), 0) };
        (u64::from(s), 0, u64::from(d), 0)
    };
    // SAFETY: a BTF task pointer to the current task, always valid.
    let task = unsafe { generated::bpf_get_current_task_btf() } as *const u8;
    // SAFETY: `ev` points to a reserved, 8-aligned 80-byte slot we own
    // until submit; every field is written before it is submitted.
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).skaddr = sk as u64;
        let saddr = (&raw mut (*ev).saddr).cast::<u64>();
        saddr.write(s0);
        saddr.add(1).write(s1);
        let daddr = (&raw mut (*ev).daddr).cast::<u64>();
        daddr.write(d0);
        daddr.add(1).write(d1);
        (*ev).pid = field(task, OFF_TGID.load(), 0);
        // A socket's namespace never changes, and `ns.inum` shares a cache
        // line with the namespace's refcount, which every socket creation
        // bumps: the load misses and cost ~50 ns/event. Read it only when
        // a socket is born (CLOSE -> SYN_SENT/LISTEN, LISTEN -> SYN_RECV);
        // userspace remembers it per socket.
        (*ev).netns = if oldstate == TCP_CLOSE || oldstate == TCP_LISTEN {
            let net: u64 = field(sk, OFF_NET.load(), 0);
            if net == 0 {
                0
            } else {
                field(net as *const u8, OFF_NET_INUM.load(), 0)
            }
        } else {
            0
        };
        (*ev).sport = sport;
        (*ev).dport = dport;
        (*ev).family = family;
        (*ev).oldstate = oldstate as u8;
        (*ev).newstate = newstate as u8;
        // `comm` straight from the task: two loads instead of the
        // bpf_get_current_comm() copy (~75 ns here).
        let comm = (&raw mut (*ev).comm).cast::<u64>();
        let c = OFF_COMM.load();
        comm.write(field(task, c, 0));
        comm.add(1).write(field(task, c, 8));
    }
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA.into()) >= WAKEUP_BYTES.load() {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags.into());
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
