//! `sock:inet_sock_set_state` -> ring buffer.
//!
//! Reads the tracepoint record (layout in `tcpstate_common::RawSetState`,
//! checked against tracefs by userspace before load), applies the cheap
//! filters, and copies one fixed-size `Event` into the ring. Every event that
//! cannot be delivered is counted in `STATS`; nothing is lost silently.
#![no_std]
#![no_main]

use core::mem::offset_of;

use aya_ebpf::{
    EbpfContext as _, Global,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, generated},
    macros::{map, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use tcpstate_common::{AF_INET6, Event, IPPROTO_TCP, RawSetState, stat};

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
#[unsafe(no_mangle)]
static NETNS_SK_NET_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static NETNS_INUM_OFF: Global<u32> = Global::new(0);

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and tracepoint programs do not nest on a CPU
        // (the kernel counts that as a recursion miss instead).
        unsafe { *slot += 1 };
    }
}

/// One load from the tracepoint record at a constant offset. Volatile so
/// LLVM keeps it a single `ctx + const` load: the verifier rejects context
/// accesses through a moved pointer, which a memcpy of the arrays produces.
#[inline(always)]
unsafe fn field<T>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: the caller names an offset inside the record (checked
    // against tracefs by userspace before load).
    unsafe { core::ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(offset).cast::<T>()) }
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    // SAFETY (all `field` calls): offsets from RawSetState's layout.
    let protocol: u16 = unsafe { field(&ctx, offset_of!(RawSetState, protocol)) };
    if protocol != IPPROTO_TCP {
        return 0;
    }
    let family: u16 = unsafe { field(&ctx, offset_of!(RawSetState, family)) };
    let filter_family = FILTER_FAMILY.load();
    if filter_family != 0 && family != filter_family {
        count(stat::FILTERED);
        return 0;
    }
    let sport: u16 = unsafe { field(&ctx, offset_of!(RawSetState, sport)) };
    let dport: u16 = unsafe { field(&ctx, offset_of!(RawSetState, dport)) };
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
    let skaddr: u64 = unsafe { field(&ctx, offset_of!(RawSetState, skaddr)) };
    let oldstate: i32 = unsafe { field(&ctx, offset_of!(RawSetState, oldstate)) };
    let newstate: i32 = unsafe { field(&ctx, offset_of!(RawSetState, newstate)) };
    // Addresses as 8-byte words: two loads each instead of a byte loop.
    let (s0, s1, d0, d1): (u64, u64, u64, u64) = if family == AF_INET6 {
        let s = offset_of!(RawSetState, saddr_v6);
        let d = offset_of!(RawSetState, daddr_v6);
        unsafe {
            (
                field(&ctx, s),
                field(&ctx, s + 8),
                field(&ctx, d),
                field(&ctx, d + 8),
            )
        }
    } else {
        let s: u32 = unsafe { field(&ctx, offset_of!(RawSetState, saddr)) };
        let d: u32 = unsafe { field(&ctx, offset_of!(RawSetState, daddr)) };
        (u64::from(s), 0, u64::from(d), 0)
    };
    // SAFETY: `ev` points to a reserved, 8-aligned 80-byte slot we own
    // until submit; every field is written before it is submitted.
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).skaddr = skaddr;
        let saddr = (&raw mut (*ev).saddr).cast::<u64>();
        saddr.write(s0);
        saddr.add(1).write(s1);
        let daddr = (&raw mut (*ev).daddr).cast::<u64>();
        daddr.write(d0);
        daddr.add(1).write(d1);
        (*ev).pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        // A socket's namespace never changes, and the two probe reads cost
        // more than the rest of the event: read it only when a socket is
        // born (CLOSE -> SYN_SENT/LISTEN, LISTEN -> SYN_RECV); userspace
        // remembers it per socket.
        (*ev).netns = if oldstate == TCP_CLOSE || oldstate == TCP_LISTEN {
            netns_of(skaddr)
        } else {
            0
        };
        (*ev).sport = sport;
        (*ev).dport = dport;
        (*ev).family = family;
        (*ev).oldstate = oldstate as u8;
        (*ev).newstate = newstate as u8;
        // Straight into the ring slot; on failure the kernel zeroes it.
        generated::bpf_get_current_comm((&raw mut (*ev).comm).cast(), 16);
    }
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA.into()) >= WAKEUP_BYTES.load() {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags.into());
    0
}

/// `sk->__sk_common.skc_net.net->ns.inum`, with offsets userspace resolved
/// from the kernel's BTF. Two probe reads; skipped when offsets are unknown.
#[inline(always)]
fn netns_of(skaddr: u64) -> u32 {
    let net_off = NETNS_SK_NET_OFF.load();
    let inum_off = NETNS_INUM_OFF.load();
    if net_off == 0 || inum_off == 0 {
        return 0;
    }
    // SAFETY: bpf_probe_read_kernel tolerates bad addresses (it returns an
    // error, which we map to 0 = unknown).
    let net = match unsafe { bpf_probe_read_kernel((skaddr + u64::from(net_off)) as *const u64) } {
        Ok(net) if net != 0 => net,
        _ => return 0,
    };
    unsafe { bpf_probe_read_kernel((net + u64::from(inum_off)) as *const u32) }.unwrap_or(0)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
