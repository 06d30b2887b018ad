//! Loading and attaching the eBPF program, and reading its counters. Thin
//! on purpose: everything it returns is plain data for the pure layers.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, FExit, TracePoint},
};
use tcpstate_common::{
    BIND_HOOKS, BIND_SYSCALL_HOOKS, CONFIG, Config, DROP_HOOKS, DROP_REASONS, Filters, Offsets,
    PROGRAM, RESET_HOOKS, RETRANSMIT_HOOKS, map, stat,
};

use crate::ring::{self, EventRings};

/// The compiled program, embedded at build time by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpstate"));

/// The same test the eBPF program applies, for sockets that reach us
/// another way (the start-up snapshot, reconciliation dumps, listener polls): every path
/// into the table must filter alike.
pub trait Admits {
    fn admits(&self, v6: bool, sport: u16, dport: u16) -> bool;

    fn admits_tuple(&self, t: &crate::socket::Tuple) -> bool {
        self.admits(t.family == crate::socket::Family::V6, t.sport, t.dport)
    }
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
    /// Attach the retransmit hooks (`tcp_retransmit_skb`, `tcp_retransmit_synack`).
    pub retransmits: bool,
    /// Attach the reset hooks (`tcp_send_reset`, `tcp_receive_reset`).
    pub resets: bool,
    /// Attach the drop hook (`skb:kfree_skb`), watching the reasons of this bitmap.
    pub drops: Option<[u64; 4]>,
    /// The bind hooks: fexit (`inet_bind`, `inet6_bind`), the syscall tracepoints, or none.
    pub binds: crate::cli::BindHooks,
}

/// The eBPF object loaded and attached: its rings, hooks and counters. Dropping it detaches.
pub struct Loaded {
    /// Keeps the program and its link alive.
    _ebpf: Ebpf,
    /// Bytes of event slots across all CPUs.
    ring_bytes: usize,
    pub rings: Option<EventRings>,
    /// Readable when a CPU's ring reached its wake-up level.
    pub doorbell: Option<RingBuf<MapData>>,
    /// Retransmit and reset events.
    pub segments: Option<RingBuf<MapData>>,
    /// The optional hooks asked for, by name, each with the error that kept it from
    /// attaching (`None`: attached).
    pub hooks: Vec<(&'static str, Option<String>)>,
    stats: PerCpuArray<MapData, u64>,
    /// TCP packets dropped with no socket named, per reason.
    drops: PerCpuArray<MapData, u64>,
    /// The transition program's fd first, then each attached hook's: their kernel counters.
    prog_fds: Vec<(&'static str, std::os::fd::OwnedFd)>,
}

/// What one program has cost, as the kernel counts it (`run_time_ns`, `run_cnt` of
/// BPF_OBJ_GET_INFO_BY_FD): totals since load, moving only while kernel.bpf_stats_enabled
/// is on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramCost {
    pub program: &'static str,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// The programs' costs, and whether the kernel is counting them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BpfCosts {
    /// kernel.bpf_stats_enabled; None when unreadable.
    pub stats_enabled: Option<bool>,
    pub programs: Vec<ProgramCost>,
}

/// kernel.bpf_stats_enabled. Counting costs every BPF program on the host two clock reads per
/// run, so it is the operator's call: tcpstate reads it, never sets it.
pub fn bpf_stats_enabled() -> Option<bool> {
    let text = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").ok()?;
    Some(text.trim() != "0")
}

/// What the kernel side counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub ringbuf_full: u64,
    pub recursion_misses: u64,
    /// Retransmit and reset events lost to a full `SEGMENTS` buffer.
    pub segments_full: u64,
    /// Resets sent for no full socket (a SYN to a closed port, timewait or request sockets).
    pub resets_no_socket: u64,
    /// Drop events lost to a full `SEGMENTS` buffer.
    pub drops_full: u64,
}

impl KernelCounters {
    /// Transitions that never reached us: the only counts after which the table may hold
    /// ghosts. A reset for no socket (every SYN a scanner sends to a closed port) or a lost
    /// retransmit leaves the table as true as it was, so neither may stop detection.
    pub fn transitions_lost(&self) -> u64 {
        self.ringbuf_full.saturating_add(self.recursion_misses)
    }
}

/// Why the program could not be loaded and attached: one line each, with the cause kept.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this kernel has no BPF ring buffer (needs Linux 5.8 or later)")]
    NoRingBuf,
    #[error("{what}: {cause}{}", hint(*.needs_root))]
    Kernel {
        what: &'static str,
        cause: Box<dyn std::error::Error + Send + Sync>,
        /// The kernel said EPERM or EACCES.
        needs_root: bool,
    },
    #[error(
        "this kernel has no inet_sock_set_state tracepoint in its BTF ({0}); tcpstate needs Linux 5.10 or later (5.12 off x86_64) built with CONFIG_DEBUG_INFO_BTF"
    )]
    NoTracepoint(aya::programs::ProgramError),
    /// The verifier's log is hundreds of lines: `why` is its last ones, on one line.
    #[error("the kernel rejected the program: {why}{}", hint(*.needs_root))]
    Rejected { why: String, needs_root: bool },
    /// A helper the program calls is newer than the kernel: the verifier's words alone
    /// (`invalid func unknown#158`) tell the user nothing.
    #[error(
        "this kernel lacks BPF helper {helper} (Linux {since} or later); tcpstate cannot run here ({why})"
    )]
    TooOld {
        helper: &'static str,
        since: &'static str,
        why: String,
    },
    #[error("the eBPF object is broken: {0}")]
    Object(String),
    /// An optional hook the kernel will not have, said with the way round it.
    #[error("{0}")]
    HookRefused(String),
    #[error(transparent)]
    Ring(#[from] ring::RingError),
}

/// The helper a verifier log says the kernel does not know (`invalid func unknown#ID`), by the
/// ids the program calls that are newest: its name and the first kernel that has it.
fn missing_helper(log: &str) -> Option<(&'static str, &'static str)> {
    const NEWEST: [(u32, &str, &str); 2] = [
        (158, "bpf_get_current_task_btf", "5.11"),
        (136, "bpf_skc_to_tcp_sock", "5.9"),
    ];
    NEWEST.iter().find_map(|&(id, name, since)| {
        log.contains(&format!("invalid func unknown#{id}"))
            .then_some((name, since))
    })
}

fn hint(needs_root: bool) -> &'static str {
    if needs_root {
        ": tcpstate needs root (CAP_BPF and CAP_PERFMON)"
    } else {
        ""
    }
}

/// Whether an error (or one it was caused by) is the kernel's EPERM or EACCES: matched on the
/// errno, not on a message.
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return true;
        }
        cur = err.source();
    }
    false
}

fn kernel<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> LoadError {
    move |e| LoadError::Kernel {
        what,
        needs_root: refused(&e),
        cause: Box::new(e),
    }
}

/// Ring geometry for the byte budget on this machine.
struct Geometry {
    cpus: usize,
    bits: u32,
}

pub fn load(opts: &LoadOptions) -> Result<Loaded, LoadError> {
    match aya::sys::is_map_supported(aya::maps::MapType::RingBuf) {
        Ok(true) => {}
        Ok(false) => return Err(LoadError::NoRingBuf),
        Err(e) => return Err(kernel("cannot probe BPF support")(e)),
    }
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| kernel("cannot count CPUs")(e))?;
    let geo = Geometry {
        cpus,
        bits: ring::slot_bits(opts.ring_bytes, cpus),
    };
    let mut ebpf = load_object(opts, &geo)?;
    let btf = aya::Btf::from_sys_fs().map_err(kernel("cannot parse the kernel's BTF"))?;
    let mut prog_fds = vec![(PROGRAM, attach(&mut ebpf, &btf)?)];
    let mut hooks = Vec::new();
    let binds = |how| opts.binds == how;
    let mut fexit_refused: Option<String> = None;
    let wanted: [(bool, &[&'static str]); 5] = [
        (opts.retransmits, &RETRANSMIT_HOOKS),
        (opts.resets, &RESET_HOOKS),
        (opts.drops.is_some(), &DROP_HOOKS),
        (binds(crate::cli::BindHooks::Auto), &BIND_HOOKS),
        (binds(crate::cli::BindHooks::Syscalls), &BIND_SYSCALL_HOOKS),
    ];
    for &name in wanted
        .into_iter()
        .filter(|(on, _)| *on)
        .flat_map(|(_, h)| h)
    {
        // The drop hook reads the tracepoint's reason, which older kernels do not pass: the
        // verifier would refuse it with a message about argument 3.
        // Hooks on by default that this kernel cannot have are said in the feature report
        // (`started`, status, metrics), not on stderr at every start.
        if DROP_HOOKS.contains(&name) && opts.offsets.kfree_reason == 0 {
            let why = "this kernel's skb:kfree_skb gives no drop reason (Linux 5.17+)";
            hooks.push((name, Some(why.to_owned())));
            continue;
        }
        let bind_hook = BIND_HOOKS.contains(&name) || BIND_SYSCALL_HOOKS.contains(&name);
        if bind_hook && opts.offsets.socket_sk == 0 {
            let why =
                "this kernel's BTF lacks a field the hook reads (struct socket, file, fdtable)";
            hooks.push((name, Some(why.to_owned())));
            continue;
        }
        // Both fexit hooks fail alike: said once.
        if let (true, Some(why)) = (BIND_HOOKS.contains(&name), &fexit_refused) {
            hooks.push((name, Some(why.clone())));
            continue;
        }
        // An optional hook this kernel lacks costs its information, not the daemon.
        let attached = if BIND_HOOKS.contains(&name) {
            attach_fexit(&mut ebpf, &btf, name)
        } else if BIND_SYSCALL_HOOKS.contains(&name) {
            mount_tracefs();
            attach_syscall_hook(&mut ebpf, name)
        } else {
            attach_hook(&mut ebpf, &btf, name)
        };
        match attached {
            Ok(fd) => {
                hooks.push((name, None));
                prog_fds.push((name, fd));
            }
            Err(e) => {
                if BIND_HOOKS.contains(&name) {
                    // The default's refusal (ftrace locked down): the feature report says it
                    // and how to get the hook anyway.
                    fexit_refused = Some(e.to_string());
                } else {
                    crate::warn(format_args!("not watching {name}: {e}"));
                }
                hooks.push((name, Some(e.to_string())));
            }
        }
    }
    let (rings, doorbell, segments, stats, drops) = take_maps(&mut ebpf, &geo)?;
    Ok(Loaded {
        _ebpf: ebpf,
        ring_bytes: rings.bytes(),
        rings: Some(rings),
        doorbell: Some(doorbell),
        segments: Some(segments),
        hooks,
        stats,
        drops,
        prog_fds,
    })
}

/// The object with its maps sized and `CONFIG` set.
fn load_object(opts: &LoadOptions, geo: &Geometry) -> Result<Ebpf, LoadError> {
    let slots = 1u64 << geo.bits;
    // Wake userspace at a sixteenth full: a few hundred wake-ups a second
    // at full churn instead of one per event, with room left to catch up.
    let wake_at = (slots / 16).max(1);
    let too_many = |_| {
        LoadError::Object(format!(
            "{} CPUs x {slots} slots do not fit one map",
            geo.cpus
        ))
    };
    let ring_entries = u32::try_from(geo.cpus << geo.bits).map_err(too_many)?;
    let cpus = u32::try_from(geo.cpus).map_err(too_many)?;
    EbpfLoader::new()
        // The program has no CO-RE relocations (its offsets are in CONFIG),
        // so the loader need not parse the kernel's BTF a second time.
        .btf(None)
        .map_max_entries(map::RING, ring_entries)
        .map_max_entries(map::POS, cpus)
        .override_global(
            CONFIG,
            &Config {
                wake_at,
                slot_bits: geo.bits,
                filters: opts.filters,
                off: opts.offsets,
                drop_reasons: opts.drops.unwrap_or_default(),
            },
            true,
        )
        .load(OBJECT)
        .map_err(kernel("cannot load the eBPF object"))
}

/// The object's program `name`, as the kind (`what`) its hook needs.
fn program_of<'a, P>(ebpf: &'a mut Ebpf, name: &str, what: &str) -> Result<&'a mut P, LoadError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| LoadError::Object(format!("program {name} missing")))?
        .try_into()
        .map_err(|e| LoadError::Object(format!("program {name} is not {what}: {e}")))
}

/// A loaded program's fd, duplicated: its kernel counters stay readable for as long as the
/// daemon runs.
fn owned_fd(
    fd: Result<&aya::programs::ProgramFd, aya::programs::ProgramError>,
) -> Result<std::os::fd::OwnedFd, LoadError> {
    fd.map_err(kernel("cannot get the hook's fd"))?
        .as_fd()
        .try_clone_to_owned()
        .map_err(kernel("cannot duplicate the hook's fd"))
}

/// Loads and attaches one of the optional hooks (a BTF tracepoint of the same name); returns
/// its fd (for its counters).
fn attach_hook(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    name: &str,
) -> Result<std::os::fd::OwnedFd, LoadError> {
    let prog: &mut BtfTracePoint = program_of(ebpf, name, "a BTF tracepoint")?;
    prog.load(name, btf)
        .map_err(kernel("the kernel refused the hook"))?;
    prog.attach().map_err(kernel("cannot attach the hook"))?;
    owned_fd(prog.fd())
}

/// Loads and attaches one of the fexit hooks (on the kernel function of the same name);
/// returns its fd (for its counters). A kernel that refuses trampolines (ftrace locked down)
/// is told in words, with the way round it.
fn attach_fexit(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    name: &str,
) -> Result<std::os::fd::OwnedFd, LoadError> {
    let prog: &mut FExit = program_of(ebpf, name, "an fexit program")?;
    let refused = |e: aya::programs::ProgramError| {
        // The verifier's log is empty for a refused trampoline: the errno is the story.
        let errno =
            std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
        LoadError::HookRefused(format!(
            "the kernel refused an fexit trampoline on {name} ({errno}; ftrace locked down?): --bind-failures=syscalls watches bind() through the syscall tracepoints instead, at 10-20 ns on every syscall of the host"
        ))
    };
    prog.load(name, btf).map_err(refused)?;
    prog.attach().map_err(refused)?;
    owned_fd(prog.fd())
}

/// Mounts tracefs where it is not (the syscall tracepoints are found through it; systemd
/// mounts it at boot, a bare host or container may not). A failure is the attach's to say.
fn mount_tracefs() {
    const TRACEFS: &str = "/sys/kernel/tracing";
    if std::path::Path::new(TRACEFS).join("events").exists()
        || std::path::Path::new("/sys/kernel/debug/tracing/events").exists()
    {
        return;
    }
    // SAFETY: NUL-terminated constant strings; no data argument.
    unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            c"/sys/kernel/tracing".as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        );
    }
}

/// Loads and attaches one of the syscall tracepoint hooks (`syscalls:NAME`, through
/// tracefs); returns its fd (for its counters).
fn attach_syscall_hook(ebpf: &mut Ebpf, name: &str) -> Result<std::os::fd::OwnedFd, LoadError> {
    let prog: &mut TracePoint = program_of(ebpf, name, "a tracepoint")?;
    prog.load().map_err(kernel("the kernel refused the hook"))?;
    prog.attach("syscalls", name)
        .map_err(kernel("cannot attach the hook (is tracefs mounted?)"))?;
    owned_fd(prog.fd())
}

/// Verifies, loads and attaches the program; returns its fd (for its counters).
fn attach(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<std::os::fd::OwnedFd, LoadError> {
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| LoadError::Object(format!("program {PROGRAM} missing")))?
        .try_into()
        .map_err(|e| {
            LoadError::Object(format!("program {PROGRAM} is not a BTF tracepoint: {e}"))
        })?;
    prog.load(PROGRAM, btf).map_err(|e| {
        if matches!(e, aya::programs::ProgramError::Btf(_)) {
            return LoadError::NoTracepoint(e);
        }
        let needs_root = refused(&e);
        let full = format!("{e:#}");
        let mut why: Vec<&str> = full
            .lines()
            .rev()
            .filter(|l| !l.trim().is_empty())
            .take(4)
            .collect();
        why.reverse();
        if let Some((helper, since)) = missing_helper(&full) {
            return LoadError::TooOld {
                helper,
                since,
                why: why.join(" | "),
            };
        }
        LoadError::Rejected {
            why: why.join(" | "),
            needs_root,
        }
    })?;
    prog.attach()
        .map_err(kernel("cannot attach to tp_btf/inet_sock_set_state"))?;
    prog.fd()
        .map_err(kernel("cannot get the program fd"))?
        .as_fd()
        .try_clone_to_owned()
        .map_err(kernel("cannot duplicate the program fd"))
}

type Maps = (
    EventRings,
    RingBuf<MapData>,
    RingBuf<MapData>,
    PerCpuArray<MapData, u64>,
    PerCpuArray<MapData, u64>,
);

fn take_maps(ebpf: &mut Ebpf, geo: &Geometry) -> Result<Maps, LoadError> {
    let mut take = |name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| LoadError::Object(format!("map {name} missing")))
    };
    let array = |m: aya::maps::Map, name: &str| match m {
        aya::maps::Map::Array(d) => Ok(d),
        _ => Err(LoadError::Object(format!("map {name} is not an array"))),
    };
    let rings = EventRings::new(
        array(take(map::RING)?, map::RING)?,
        array(take(map::POS)?, map::POS)?,
        geo.cpus,
        geo.bits,
    )?;
    let doorbell = RingBuf::try_from(take(map::DOORBELL)?)
        .map_err(|e| LoadError::Object(format!("map {}: {e}", map::DOORBELL)))?;
    let segments = RingBuf::try_from(take(map::SEGMENTS)?)
        .map_err(|e| LoadError::Object(format!("map {}: {e}", map::SEGMENTS)))?;
    let stats = PerCpuArray::try_from(take(map::STATS)?)
        .map_err(|e| LoadError::Object(format!("map {}: {e}", map::STATS)))?;
    let drops = PerCpuArray::try_from(take(map::DROPS)?)
        .map_err(|e| LoadError::Object(format!("map {}: {e}", map::DROPS)))?;
    Ok((rings, doorbell, segments, stats, drops))
}

impl Loaded {
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
        let info = self
            .prog_fds
            .first()
            .and_then(|(_, fd)| prog_info(fd.as_raw_fd()));
        KernelCounters {
            ringbuf_full: sum(stat::RINGBUF_FULL),
            recursion_misses: info.map_or(0, |i| i.recursion_misses),
            segments_full: sum(stat::SEGMENTS_FULL),
            resets_no_socket: sum(stat::RESET_NO_SOCKET),
            drops_full: sum(stat::DROPS_FULL),
        }
    }

    /// TCP packets dropped with no full socket named, per reason (non-zero ones): a syscall
    /// per reason watched, so for scrapes, not for the event path.
    pub fn drops_no_socket(&self, watched: &crate::drops::Watched) -> Vec<(u16, u64)> {
        watched
            .reasons
            .iter()
            .filter(|&&(v, _)| u32::from(v) < DROP_REASONS)
            .filter_map(|&(v, _)| {
                let n: u64 = self.drops.get(&u32::from(v), 0).ok()?.iter().sum();
                (n > 0).then_some((v, n))
            })
            .collect()
    }
}

impl Loaded {
    /// Every attached program's run time and count; one syscall each, so for scrapes, not
    /// for the event path.
    pub fn costs(&self) -> BpfCosts {
        BpfCosts {
            stats_enabled: bpf_stats_enabled(),
            programs: self
                .prog_fds
                .iter()
                .filter_map(|&(program, ref fd)| {
                    let info = prog_info(fd.as_raw_fd())?;
                    Some(ProgramCost {
                        program,
                        run_time_ns: info.run_time_ns,
                        run_cnt: info.run_cnt,
                    })
                })
                .collect(),
        }
    }
}

/// BPF_OBJ_GET_INFO_BY_FD: one call gives the recursion misses (which aya's ProgramInfo does
/// not expose) and the run time and count.
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

#[cfg(test)]
mod tests {
    /// Issue 22: on 5.10 the verifier says only `invalid func unknown#158`.
    #[test]
    fn a_missing_helper_is_named_with_the_kernel_it_needs() {
        let log = "; let task = ...\n123: (85) call unknown#158\ninvalid func unknown#158\n";
        assert_eq!(
            super::missing_helper(log),
            Some(("bpf_get_current_task_btf", "5.11"))
        );
        assert_eq!(super::missing_helper("R1 invalid mem access"), None);
    }
}
