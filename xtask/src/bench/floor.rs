//! The floor: an empty BTF tracepoint program (`r0 = 0; exit`) on `inet_sock_set_state`,
//! loaded and attached by xtask itself. With kernel.bpf_stats_enabled=1 its ns/event is what
//! the kernel charges any program on this hook (the dispatch and the two clock reads around
//! it), so tcpstate's ns/event over the floor's, measured in the same round, is a ratio the
//! VM's drift cancels out of.
//!
//! Raw bpf(2) rather than aya: linking aya would make xtask need the eBPF toolchain before
//! `setup` could install it, and two instructions need no object file.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{Context as _, Result, bail};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_RAW_TP: u32 = 23;
const BTF_KIND_TYPEDEF: u32 = 8;

/// The tracepoint's BTF type: what libbpf and aya look up for `tp_btf/inet_sock_set_state`.
const TRACEPOINT_TYPE: &str = "btf_trace_inet_sock_set_state";

/// The name bpftool shows (at most 15 bytes).
pub const PROG_NAME: &str = "tcpstate_floor";

/// A loaded and attached floor program; detached and unloaded on drop.
pub struct Floor {
    pub id: u32,
    _link: OwnedFd,
    _prog: OwnedFd,
}

/// `union bpf_attr` as BPF_PROG_LOAD reads it, up to `attach_btf_obj_fd` (the kernel
/// zero-fills what a shorter attr leaves out).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
    attach_btf_obj_fd: u32,
    _pad: u32,
}

#[repr(C)]
struct RawTracepointAttr {
    /// NULL: a tracing program names its tracepoint by `attach_btf_id`.
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a live, correctly sized bpf_attr variant for `cmd`; the kernel reads
    // (and for GET_INFO writes through the pointer inside) only within it.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd_from(rc: i64) -> Result<OwnedFd> {
    let fd = i32::try_from(rc).context("bpf(2) returned an fd out of range")?;
    // SAFETY: bpf(2) just returned this new fd, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn attach() -> Result<Floor> {
    let btf = fs::read("/sys/kernel/btf/vmlinux").context("cannot read the kernel's BTF")?;
    let btf_id = typedef_id(&btf, TRACEPOINT_TYPE)?
        .with_context(|| format!("the kernel's BTF has no {TRACEPOINT_TYPE}"))?;
    // BPF_MOV64_IMM(r0, 0); BPF_EXIT.
    let insns: [u64; 2] = [u64::from_le_bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]), 0x95];
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let mut name = [0u8; 16];
    name[..PROG_NAME.len()].copy_from_slice(PROG_NAME.as_bytes());
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_TRACING,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name,
        expected_attach_type: BPF_TRACE_RAW_TP,
        attach_btf_id: btf_id,
        ..ProgLoadAttr::default()
    };
    let prog = match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => fd_from(fd)?,
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            bail!(
                "the kernel refused the floor program: {e}; verifier: {}",
                String::from_utf8_lossy(&log[..end]).trim()
            );
        }
    };
    let mut open = RawTracepointAttr {
        name: 0,
        prog_fd: prog.as_raw_fd() as u32,
        _pad: 0,
    };
    let link = fd_from(
        bpf(BPF_RAW_TRACEPOINT_OPEN, &mut open)
            .context("cannot attach the floor program to tp_btf/inet_sock_set_state")?,
    )?;
    // bpf_prog_info: `id` is its second u32. The kernel writes at most info_len bytes.
    let mut info = [0u32; 64];
    let mut get = InfoAttr {
        bpf_fd: prog.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut get).context("cannot read the floor program's id")?;
    Ok(Floor {
        id: info[1],
        _link: link,
        _prog: prog,
    })
}

/// The id of the typedef named `name` in a raw BTF blob (type ids count from 1, in order).
fn typedef_id(btf: &[u8], name: &str) -> Result<Option<u32>> {
    let u32_at = |off: usize| -> Result<u32> {
        let bytes = btf
            .get(off..off + 4)
            .context("the kernel's BTF is truncated")?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    };
    if btf.get(..2) != Some(&[0x9f, 0xeb]) {
        bail!("the kernel's BTF is not little-endian BTF");
    }
    let hdr_len = u32_at(4)? as usize;
    let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
    let str_off = u32_at(16)? as usize;
    let types = hdr_len + type_off;
    let strings = hdr_len + str_off;
    let name_at = |off: u32| -> &[u8] {
        let start = strings + off as usize;
        let rest = btf.get(start..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    };
    let (mut at, mut id) = (types, 1u32);
    while at < types + type_len {
        let name_off = u32_at(at)?;
        let info = u32_at(at + 4)?;
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        if kind == BTF_KIND_TYPEDEF && name_at(name_off) == name.as_bytes() {
            return Ok(Some(id));
        }
        // Each kind's data after its 12-byte common part (include/uapi/linux/btf.h).
        let extra = match kind {
            1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
            3 => 12,                      // ARRAY
            4 | 5 | 15 | 19 => vlen * 12, // STRUCT, UNION, DATASEC, ENUM64
            6 | 13 => vlen * 8,           // ENUM, FUNC_PROTO
            0 | 2 | 7..=12 | 16 | 18 => 0,
            _ => bail!("unknown BTF kind {kind} in the kernel's BTF"),
        };
        at += 12 + extra;
        id += 1;
    }
    Ok(None)
}
