//! Resolves, from the running kernel's BTF, the struct offsets the eBPF program reads (the
//! socket's addresses, ports, family, namespace, error and flags; the namespace's timewait
//! count; the current task's tgid and comm). The program gets them in its read-only `CONFIG`,
//! which the verifier folds into constants, so one object runs on every kernel layout.

mod reader;

use std::path::{Path, PathBuf};

use tcpstate_common::Offsets;

use self::reader::Btf;

/// The running kernel's BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "cannot read the kernel's BTF {path}: {source} (tcpstate needs a kernel built with CONFIG_DEBUG_INFO_BTF)"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("BTF {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Reads [`VMLINUX_BTF`] and resolves [`Offsets`].
pub fn kernel_offsets() -> Result<Offsets, BtfError> {
    kernel_offsets_from(Path::new(VMLINUX_BTF))
}

/// Same as [`kernel_offsets`] with the BTF read from `path` (a raw BTF blob, as in
/// /sys/kernel/btf/).
pub fn kernel_offsets_from(path: &Path) -> Result<Offsets, BtfError> {
    let data = std::fs::read(path).map_err(|source| BtfError::Read {
        path: path.to_owned(),
        source,
    })?;
    offsets_in_blob(&data).map_err(|reason| BtfError::Invalid {
        path: path.to_owned(),
        reason,
    })
}

/// This kernel's numbers for the drop reasons `--drops` watches (see [`crate::drops`]).
pub fn kernel_drop_reasons() -> Result<crate::drops::Watched, BtfError> {
    let path = Path::new(VMLINUX_BTF);
    let data = std::fs::read(path).map_err(|source| BtfError::Read {
        path: path.to_owned(),
        source,
    })?;
    let btf = Btf::parse(&data).map_err(|e| BtfError::Invalid {
        path: path.to_owned(),
        reason: format!("malformed: {e}"),
    })?;
    Ok(crate::drops::Watched::resolve(|name| {
        btf.enum_value("skb_drop_reason", &format!("SKB_DROP_REASON_{name}"))
            .ok()
    }))
}

/// Parses a blob and resolves every offset: the fuzzable core.
pub fn offsets_in_blob(data: &[u8]) -> Result<Offsets, String> {
    let btf = Btf::parse(data).map_err(|e| format!("malformed: {e}"))?;
    offsets_in(&btf)
}

fn offsets_in(btf: &Btf<'_>) -> Result<Offsets, String> {
    // The program casts the socket to `struct tcp_sock` and reads `struct sock` and
    // `struct inet_sock` fields through it: both must start it.
    for (root, path) in [
        ("tcp_sock", &["inet_conn", "icsk_inet"][..]),
        ("inet_sock", &["sk"][..]),
    ] {
        let (off, _) = btf.member_path(root, path)?;
        if off != 0 {
            return Err(format!("{root}.{} is not at offset 0", path.join(".")));
        }
    }
    let field = |root: &str, path: &[&str], size: u64| -> Result<u32, String> {
        let (off, ty) = btf.member_path(root, path)?;
        match btf.size_of(ty)? {
            s if s == size => Ok(off),
            s => Err(format!(
                "{root}.{} is {s} bytes, expected {size}",
                path.join(".")
            )),
        }
    };
    let sk = |name: &str, size: u64| field("sock", &["__sk_common", name], size);
    // The namespace's timewait count, embedded in `struct net` since Linux 6.0 (a pointer
    // before): optional, 0 tells the program to skip the overflow test.
    let death_row = |name: &str| -> Result<u32, String> {
        let (base, ty) = btf.member_path("net", &["ipv4", "tcp_death_row"])?;
        if !btf.is_struct(ty)? {
            return Err("net.ipv4.tcp_death_row is not embedded".into());
        }
        let (off, ty) = btf.member_path("inet_timewait_death_row", &[name])?;
        match btf.size_of(ty)? {
            4 => Ok(base + off),
            s => Err(format!(
                "inet_timewait_death_row.{name} is {s} bytes, expected 4"
            )),
        }
    };
    let (tw_refcount, tw_max) = match (death_row("tw_refcount"), death_row("sysctl_max_tw_buckets"))
    {
        (Ok(a), Ok(b)) => (a, b),
        _ => (0, 0),
    };
    // Optional: a kernel without CONFIG_SOCK_CGROUP_DATA (or before 5.15, when the field was a
    // tagged union) reports no cgroup rather than refusing to run.
    let cgroup = || -> Result<(u32, u32, u32), String> {
        Ok((
            field("sock", &["sk_cgrp_data", "cgroup"], 8)?,
            field("cgroup", &["kn"], 8)?,
            field("kernfs_node", &["id"], 8)?,
        ))
    };
    let (sk_cgroup, cgroup_kn, kn_id) = cgroup().unwrap_or((0, 0, 0));
    // The helper's id is in the kernel's own `enum bpf_func_id` from the release that added it.
    let task_btf = u32::from(
        btf.enum_value("bpf_func_id", "BPF_FUNC_get_current_task_btf")
            .is_ok(),
    );
    let flag = |name: &str| -> Result<u32, String> {
        let v = btf.enum_value("sock_flags", name)?;
        u32::try_from(v)
            .ok()
            .filter(|&v| v < 64)
            .ok_or_else(|| format!("sock_flags {name} = {v} is not a bit of an unsigned long"))
    };
    // The drop hook's: optional, so a kernel whose sk_buff differs loses drops, not the
    // daemon. The tracepoint's arguments say whether it names a reason and a receiving socket.
    let skb = || -> Result<(u32, u32, u32, u32), String> {
        Ok((
            field("sk_buff", &["sk"], 8)?,
            field("sk_buff", &["protocol"], 2)?,
            field("sk_buff", &["head"], 8)?,
            field("sk_buff", &["network_header"], 2)?,
        ))
    };
    let (skb_sk, skb_protocol, skb_head, skb_network_header) = skb().unwrap_or((0, 0, 0, 0));
    // The state-change program's protocol filter (u16 since 5.6).
    let sk_protocol = field("sock", &["sk_protocol"], 2)?;
    // The bind hooks' (optional too): from the fd to the socket.
    let bind = || -> Result<[u32; 8], String> {
        Ok([
            field("socket", &["sk"], 8)?,
            field("socket", &["type"], 2)?,
            field("socket", &["file"], 8)?,
            field("task_struct", &["files"], 8)?,
            field("files_struct", &["fdt"], 8)?,
            field("fdtable", &["fd"], 8)?,
            field("fdtable", &["max_fds"], 4)?,
            field("file", &["private_data"], 8)?,
        ])
    };
    let [
        socket_sk,
        socket_type,
        socket_file,
        task_files,
        files_fdt,
        fdtable_fd,
        fdtable_max_fds,
        file_private_data,
    ] = bind().unwrap_or_default();
    let kfree_args = btf.func_proto_params("btf_trace_kfree_skb").unwrap_or(0);
    // (void *, skb, location, reason[, rx_sk]): the context is the first.
    let kfree_reason = u32::from(kfree_args >= 4 && skb_sk != 0);
    let kfree_rx_sk = u32::from(kfree_args >= 5 && kfree_reason == 1);
    Ok(Offsets {
        family: sk("skc_family", 2)?,
        dport: sk("skc_dport", 2)?,
        sport: field("inet_sock", &["inet_sport"], 2)?,
        saddr: field("inet_sock", &["inet_saddr"], 4)?,
        daddr: sk("skc_daddr", 4)?,
        saddr6: sk("skc_v6_rcv_saddr", 16)?,
        daddr6: sk("skc_v6_daddr", 16)?,
        net: field("sock", &["__sk_common", "skc_net", "net"], 8)?,
        sk_err: field("sock", &["sk_err"], 4)?,
        sk_flags: sk("skc_flags", 8)?,
        net_inum: field("net", &["ns", "inum"], 4)?,
        tw_refcount,
        tw_max,
        tgid: field("task_struct", &["tgid"], 4)?,
        comm: field("task_struct", &["comm"], 16)?,
        flag_dead: flag("SOCK_DEAD")?,
        flag_done: flag("SOCK_DONE")?,
        state: sk("skc_state", 1)?,
        num: sk("skc_num", 2)?,
        rcv_saddr: sk("skc_rcv_saddr", 4)?,
        sk_cgroup,
        cgroup_kn,
        kn_id,
        task_btf,
        skb_sk,
        skb_protocol,
        skb_head,
        skb_network_header,
        kfree_reason,
        kfree_rx_sk,
        sk_protocol,
        socket_sk,
        socket_type,
        socket_file,
        task_files,
        files_fdt,
        fdtable_fd,
        fdtable_max_fds,
        file_private_data,
    })
}

#[cfg(test)]
pub(crate) mod tests;
