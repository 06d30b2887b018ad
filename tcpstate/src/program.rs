//! Loading and attaching the eBPF program, and reading its counters. Thin
//! on purpose: everything it returns is plain data for the pure layers.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::BtfTracePoint,
};
use tcpstate_common::{CONFIG, Config, Filters, Offsets, PROGRAM, map, stat};

use crate::ring::{self, EventRings};

/// The compiled program, embedded at build time by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpstate"));

/// The same test the eBPF program applies, for sockets that reach us
/// another way (the start-up snapshot).
pub trait Admits {
    fn admits(&self, v6: bool, sport: u16, dport: u16) -> bool;
}

impl Admits for Filters {
    fn admits(&self, v6: bool, sport: u16, dport: u16) -> bool {
        let family = if v6 {
            tcpstate_common::AF_INET6
        } else {
            tcpstate_common::AF_INET
        };
        (self.family == 0 || self.family == family)
            && (self.port == 0 || sport == self.port || dport == self.port)
            && (self.lport == 0 || sport == self.lport)
            && (self.rport == 0 || dport == self.rport)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Event slots across all CPUs, in bytes (split per CPU).
    pub ring_bytes: u32,
    pub filters: Filters,
    pub offsets: Offsets,
}

pub struct Probe {
    /// Keeps the program and its link alive.
    _ebpf: Ebpf,
    /// Bytes of event slots across all CPUs.
    ring_bytes: usize,
    pub rings: Option<EventRings>,
    /// Readable when a CPU's ring reached its wake-up level.
    pub doorbell: Option<RingBuf<MapData>>,
    stats: PerCpuArray<MapData, u64>,
    prog_fd: std::os::fd::OwnedFd,
}

/// What the kernel side counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub ringbuf_full: u64,
    pub recursion_misses: u64,
}

pub fn load(opts: &LoadOptions) -> Result<Probe, String> {
    match aya::sys::is_map_supported(aya::maps::MapType::RingBuf) {
        Ok(true) => {}
        Ok(false) => {
            return Err("this kernel has no BPF ring buffer (needs Linux 5.8 or later)".into());
        }
        Err(e) => return Err(permission_hint(&format!("cannot probe BPF support: {e}"))),
    }
    let cpus =
        aya::util::nr_cpus().map_err(|(what, e)| format!("cannot count CPUs ({what}): {e}"))?;
    let bits = ring::slot_bits(opts.ring_bytes, cpus);
    let slots = 1u64 << bits;
    // Wake userspace at a sixteenth full: a few hundred wake-ups a second
    // at full churn instead of one per event, with room left to catch up.
    let wake_at = (slots / 16).max(1);
    let ring_entries = u32::try_from(cpus << bits)
        .map_err(|_| format!("{cpus} CPUs x {slots} slots do not fit one map"))?;
    let cpus_u32 = u32::try_from(cpus).map_err(|_| format!("{cpus} CPUs"))?;
    let mut ebpf = EbpfLoader::new()
        // The program has no CO-RE relocations (its offsets are globals),
        // so the loader need not parse the kernel's BTF a second time.
        .btf(None)
        .map_max_entries(map::RING, ring_entries)
        .map_max_entries(map::POS, cpus_u32)
        .override_global(
            CONFIG,
            &Config {
                wake_at,
                slot_bits: bits,
                filters: opts.filters,
                off: opts.offsets,
            },
            true,
        )
        .load(OBJECT)
        .map_err(|e| permission_hint(&format!("cannot load the eBPF object: {e}")))?;
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| format!("program {PROGRAM} missing from the object"))?
        .try_into()
        .map_err(|e| format!("program {PROGRAM} is not a BTF tracepoint: {e}"))?;
    let btf = aya::Btf::from_sys_fs().map_err(|e| {
        format!(
            "cannot parse the kernel's BTF {}: {e}",
            crate::btf::VMLINUX_BTF
        )
    })?;
    prog.load(PROGRAM, &btf).map_err(|e| {
        if matches!(e, aya::programs::ProgramError::Btf(_)) {
            return format!(
                "this kernel has no inet_sock_set_state tracepoint in its BTF ({e}); \
                 tcpstate needs Linux 5.12 or later"
            );
        }
        // The verifier log is hundreds of lines; its last ones say why.
        let full = format!("{e:#}");
        let why: Vec<&str> = full
            .lines()
            .rev()
            .filter(|l| !l.trim().is_empty())
            .take(4)
            .collect();
        let why: Vec<&str> = why.into_iter().rev().collect();
        permission_hint(&format!(
            "the kernel rejected the program: {}",
            why.join(" | ")
        ))
    })?;
    prog.attach()
        .map_err(|e| format!("cannot attach to tp_btf/inet_sock_set_state: {e}"))?;
    let prog_fd = prog
        .fd()
        .map_err(|e| format!("cannot get the program fd: {e}"))?
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("cannot duplicate the program fd: {e}"))?;
    let mut take = |name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| format!("map {name} missing from the object"))
    };
    let data = |m: aya::maps::Map, name: &str| match m {
        aya::maps::Map::Array(d) => Ok(d),
        _ => Err(format!("map {name} is not an array")),
    };
    let rings = EventRings::new(
        data(take(map::RING)?, map::RING)?,
        data(take(map::POS)?, map::POS)?,
        cpus,
        bits,
    )?;
    let doorbell = RingBuf::try_from(take(map::DOORBELL)?)
        .map_err(|e| format!("map {}: {e}", map::DOORBELL))?;
    let stats = PerCpuArray::try_from(
        ebpf.take_map(map::STATS)
            .ok_or_else(|| format!("map {} missing", map::STATS))?,
    )
    .map_err(|e| format!("map {}: {e}", map::STATS))?;
    Ok(Probe {
        _ebpf: ebpf,
        ring_bytes: rings.bytes(),
        rings: Some(rings),
        doorbell: Some(doorbell),
        stats,
        prog_fd,
    })
}

fn permission_hint(msg: &str) -> String {
    if msg.contains("Operation not permitted") || msg.contains("Permission denied") {
        format!("{msg}: tcpstate needs root (CAP_BPF and CAP_PERFMON)")
    } else {
        msg.to_owned()
    }
}

impl Probe {
    pub fn ring_bytes(&self) -> usize {
        self.ring_bytes
    }

    pub fn counters(&self) -> KernelCounters {
        let sum = |i: u32| {
            self.stats
                .get(&i, 0)
                .map(|v| v.iter().sum::<u64>())
                .unwrap_or(0)
        };
        let info = prog_info(self.prog_fd.as_raw_fd());
        KernelCounters {
            ringbuf_full: sum(stat::RINGBUF_FULL),
            recursion_misses: info.map_or(0, |i| i.recursion_misses),
        }
    }
}

/// BPF_OBJ_GET_INFO_BY_FD, for the counter aya's ProgramInfo does not
/// expose (recursion_misses).
fn prog_info(fd: i32) -> Option<aya_obj::generated::bpf_prog_info> {
    // SAFETY: bpf_prog_info is plain old data; zero is a valid value.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoAttr {
        bpf_fd: fd as u32,
        info_len: size_of::<aya_obj::generated::bpf_prog_info>() as u32,
        info: (&raw mut info) as u64,
    };
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // SAFETY: attr points to a valid, sized buffer for the kernel to fill.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw mut attr,
            size_of::<InfoAttr>(),
        )
    };
    (rc == 0).then_some(info)
}
