use super::{reader::*, *};

/// Builds a little-endian BTF blob.
struct Builder {
    types: Vec<u8>,
    strings: Vec<u8>,
    next_id: u32,
}

impl Builder {
    fn new() -> Self {
        Builder {
            types: Vec::new(),
            strings: vec![0],
            next_id: 1,
        }
    }

    fn s(&mut self, name: &str) -> u32 {
        if name.is_empty() {
            return 0;
        }
        let off = self.strings.len() as u32;
        self.strings.extend_from_slice(name.as_bytes());
        self.strings.push(0);
        off
    }

    fn push(&mut self, name: &str, kind: u8, kflag: bool, vlen: u16, st: u32) -> u32 {
        let n = self.s(name);
        let info = (u32::from(kind) << 24) | u32::from(vlen) | if kflag { 1 << 31 } else { 0 };
        for w in [n, info, st] {
            self.types.extend_from_slice(&w.to_le_bytes());
        }
        self.next_id += 1;
        self.next_id - 1
    }

    fn int(&mut self, name: &str, size: u32) -> u32 {
        let id = self.push(name, KIND_INT, false, 0, size);
        self.types.extend_from_slice(&(size * 8).to_le_bytes());
        id
    }

    /// Members are (name, type id, raw offset word).
    fn composite(
        &mut self,
        kind: u8,
        name: &str,
        kflag: bool,
        size: u32,
        members: &[(&str, u32, u32)],
    ) -> u32 {
        let id = self.push(name, kind, kflag, members.len() as u16, size);
        for &(m, ty, off) in members {
            let n = self.s(m);
            for w in [n, ty, off] {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
        }
        id
    }

    fn array(&mut self, elem: u32, n: u32) -> u32 {
        let id = self.push("", KIND_ARRAY, false, 0, 0);
        for w in [elem, elem, n] {
            self.types.extend_from_slice(&w.to_le_bytes());
        }
        id
    }

    fn finish(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        v.extend_from_slice(&[1, 0]);
        let tl = self.types.len() as u32;
        for w in [24, 0, tl, tl, self.strings.len() as u32] {
            v.extend_from_slice(&w.to_le_bytes());
        }
        v.extend_from_slice(&self.types);
        v.extend_from_slice(&self.strings);
        v
    }
}

/// A kernel-like layout: a kind_flag struct with bitfields, a typedef'd anonymous struct
/// holding the net pointer, `inum` nested in an anonymous union/struct inside `ns_common`,
/// and the tcp_sock -> inet_connection_sock -> inet_sock -> sock nesting.
fn sample() -> Vec<u8> {
    let mut b = Builder::new();
    let uint = b.int("unsigned int", 4);
    let int = b.int("int", 4);
    let uchar = b.int("unsigned char", 1);
    let ushort = b.int("short unsigned int", 2);
    let be16 = b.push("__be16", KIND_TYPEDEF, false, 0, ushort);
    let be32 = b.push("__be32", KIND_TYPEDEF, false, 0, uint);
    // Unrelated kinds before the structs, to exercise the size table.
    b.push("", KIND_FUNC_PROTO, false, 2, uint);
    b.types.extend_from_slice(&[0; 16]);
    b.push("e", KIND_ENUM, false, 1, 4);
    b.types.extend_from_slice(&[0; 8]);
    let u8x16 = b.array(uchar, 16);
    let in6 = b.composite(KIND_STRUCT, "in6_addr", false, 16, &[("s6_addr", u8x16, 0)]);
    let net_fwd = b.push("net", KIND_FWD, false, 0, 0);
    let net_ptr = b.push("", KIND_PTR, false, 0, net_fwd);
    let pn_anon = b.composite(KIND_STRUCT, "", false, 8, &[("net", net_ptr, 0)]);
    let pn = b.push("possible_net_t", KIND_TYPEDEF, false, 0, pn_anon);
    let pair = b.composite(
        KIND_STRUCT,
        "",
        false,
        8,
        &[("skc_daddr", be32, 0), ("skc_rcv_saddr", be32, 32)],
    );
    let addr_union = b.composite(
        KIND_UNION,
        "",
        false,
        8,
        &[("skc_addrpair", uint, 0), ("", pair, 0)],
    );
    let ulong = b.int("long unsigned int", 8);
    let flags_union = b.composite(KIND_UNION, "", false, 8, &[("skc_flags", ulong, 0)]);
    let vuchar = b.push("", KIND_VOLATILE, false, 0, uchar);
    let sock_common = b.composite(
        KIND_STRUCT,
        "sock_common",
        true,
        136,
        &[
            ("", addr_union, 0),
            ("skc_dport", be16, 96),
            ("skc_num", ushort, 112),
            ("skc_family", ushort, 128),
            ("skc_state", vuchar, 136),
            ("skc_reuse", uchar, (4 << 24) | 144),
            ("skc_flag", uchar, (1 << 24) | 158),
            ("skc_net", pn, 384),
            ("skc_v6_daddr", in6, 448),
            ("skc_v6_rcv_saddr", in6, 576),
            ("", flags_union, 704),
        ],
    );
    let const_sc = b.push("", KIND_CONST, false, 0, sock_common);
    let sock = b.composite(
        KIND_STRUCT,
        "sock",
        false,
        784,
        &[
            ("__sk_common", const_sc, 0),
            ("sk_drops", uint, 1088),
            ("sk_err", int, 1120),
            ("sk_protocol", ushort, 1152),
        ],
    );
    let inet = b.composite(
        KIND_STRUCT,
        "inet_sock",
        false,
        1024,
        &[
            ("sk", sock, 0),
            ("inet_saddr", be32, 784 * 8 + 32),
            ("inet_sport", be16, 784 * 8 + 64),
        ],
    );
    let icsk = b.composite(
        KIND_STRUCT,
        "inet_connection_sock",
        false,
        1400,
        &[("icsk_inet", inet, 0)],
    );
    b.composite(
        KIND_STRUCT,
        "tcp_sock",
        false,
        2200,
        &[("inet_conn", icsk, 0)],
    );
    let pid_t = b.push("pid_t", KIND_TYPEDEF, false, 0, int);
    let comm = b.array(uchar, 16);
    b.composite(
        KIND_STRUCT,
        "task_struct",
        false,
        9000,
        &[("tgid", pid_t, 1300 * 8), ("comm", comm, 2000 * 8)],
    );
    let inner = b.composite(
        KIND_STRUCT,
        "",
        false,
        8,
        &[("ns_type", uint, 0), ("inum", uint, 32)],
    );
    let u = b.composite(
        KIND_UNION,
        "",
        false,
        8,
        &[("", inner, 0), ("pad", uint, 0)],
    );
    let ns_common = b.composite(
        KIND_STRUCT,
        "ns_common",
        false,
        24,
        &[("stashed", net_ptr, 0), ("", u, 64)],
    );
    let refcount = b.composite(KIND_STRUCT, "", false, 4, &[("refs", int, 0)]);
    let refcount_t = b.push("refcount_t", KIND_TYPEDEF, false, 0, refcount);
    let death_row = b.composite(
        KIND_STRUCT,
        "inet_timewait_death_row",
        false,
        192,
        &[
            ("tw_refcount", refcount_t, 0),
            ("sysctl_max_tw_buckets", int, 72 * 8),
        ],
    );
    let netns_ipv4 = b.composite(
        KIND_STRUCT,
        "netns_ipv4",
        false,
        1024,
        &[("tcp_death_row", death_row, 256 * 8)],
    );
    b.composite(
        KIND_STRUCT,
        "net",
        false,
        4288,
        &[
            ("passive", uint, 0),
            ("ns", ns_common, 1216),
            ("ipv4", netns_ipv4, 1024 * 8),
        ],
    );
    b.push("sock_flags", KIND_ENUM, false, 2, 4);
    for (name, v) in [("SOCK_DEAD", 0u32), ("SOCK_DONE", 1)] {
        let n = b.s(name);
        b.types.extend_from_slice(&n.to_le_bytes());
        b.types.extend_from_slice(&v.to_le_bytes());
    }
    b.finish()
}

#[test]
fn synthetic_offsets() {
    let data = sample();
    let btf = Btf::parse(&data).expect("parse");
    let off = offsets_in(&btf).expect("offsets");
    assert_eq!(
        off,
        Offsets {
            sk_cgroup: 0,
            cgroup_kn: 0,
            kn_id: 0,
            task_btf: 0,
            family: 16,
            dport: 12,
            sport: 792,
            saddr: 788,
            daddr: 0,
            saddr6: 72,
            daddr6: 56,
            net: 48,
            sk_err: 140,
            sk_flags: 88,
            net_inum: 152 + 8 + 4,
            tw_refcount: 1024 + 256,
            tw_max: 1024 + 256 + 72,
            tgid: 1300,
            comm: 2000,
            flag_dead: 0,
            flag_done: 1,
            state: 17,
            num: 14,
            rcv_saddr: 4,
            // No sk_buff and no kfree_skb tracepoint: no drop hook, and the rest still runs.
            skb_sk: 0,
            skb_protocol: 0,
            skb_head: 0,
            skb_network_header: 0,
            kfree_reason: 0,
            kfree_rx_sk: 0,
            sk_protocol: 144,
            socket_sk: 0,
            socket_type: 0,
            socket_file: 0,
            task_files: 0,
            files_fdt: 0,
            fdtable_fd: 0,
            fdtable_max_fds: 0,
            file_private_data: 0,
        }
    );
    // Lookups through an anonymous union in a kind_flag struct.
    let (o, _) = btf
        .member_path("sock", &["__sk_common", "skc_rcv_saddr"])
        .expect("anon member");
    assert_eq!(o, 4);
    let (o, _) = btf
        .member_path("sock_common", &["skc_reuse"])
        .expect("bitfield");
    assert_eq!(o, 18);
}

#[test]
fn wrong_sizes_are_refused() {
    let data = sample();
    let btf = Btf::parse(&data).expect("parse");
    // A kernel where skc_family were a u32 must not be read as a u16.
    let (_, ty) = btf
        .member_path("sock", &["__sk_common", "skc_family"])
        .expect("family");
    assert_eq!(btf.size_of(ty), Ok(2));
    let (_, ty) = btf.member_path("task_struct", &["comm"]).expect("comm");
    assert_eq!(btf.size_of(ty), Ok(16));
}

#[test]
fn missing_member_and_struct_errors() {
    let data = sample();
    let btf = Btf::parse(&data).expect("parse");
    let e = btf
        .member_path("sock", &["__sk_common", "nope"])
        .unwrap_err();
    assert!(e.contains("sock.__sk_common has no member nope"), "{e}");
    let e = btf.member_path("nosuch", &["x"]).unwrap_err();
    assert!(e.contains("no struct nosuch"), "{e}");
    let e = btf.member_path("sock_common", &["skc_flag"]).unwrap_err();
    assert!(e.contains("not byte aligned"), "{e}");
}

#[test]
fn rejects_bad_blobs() {
    assert!(Btf::parse(&[]).is_err());
    assert!(Btf::parse(&[0u8; 24]).unwrap_err().contains("magic"));
    let mut data = sample();
    // Truncate the blob: the string section no longer fits.
    data.truncate(data.len() - 3);
    assert!(Btf::parse(&data).unwrap_err().contains("outside"));
    // Unknown kind.
    let mut b = Builder::new();
    b.push("x", 31, false, 0, 0);
    assert!(
        Btf::parse(&b.finish())
            .unwrap_err()
            .contains("unknown kind")
    );
    // A struct whose members run past the section.
    let mut b = Builder::new();
    b.push("s", KIND_STRUCT, false, 3, 8);
    assert!(
        Btf::parse(&b.finish())
            .unwrap_err()
            .contains("past the end")
    );
    // A typedef loop.
    let mut b = Builder::new();
    b.push("a", KIND_TYPEDEF, false, 0, 1);
    let data = b.finish();
    let btf = Btf::parse(&data).expect("parse");
    assert!(btf.resolve(1).is_err());
}

#[test]
fn missing_file_is_a_descriptive_error() {
    let e = kernel_offsets_from(Path::new("/nonexistent/btf/vmlinux"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/btf/vmlinux"), "{e}");
    assert!(e.contains("CONFIG_DEBUG_INFO_BTF"), "{e}");
}

#[test]
fn running_kernel_offsets() {
    // Every BPF test needs this file too; a kernel without it is not one tcpstate runs on.
    let off = kernel_offsets().expect("kernel offsets");
    eprintln!("running kernel: {off:?}");
    assert_eq!(off.net % 8, 0, "pointer alignment: {off:?}");
    assert_eq!(off.net_inum % 4, 0, "{off:?}");
    assert_ne!(off.sport, off.dport, "{off:?}");
    assert_ne!(off.comm, 0, "{off:?}");
    // The death row is embedded (and so resolvable) from 6.0 on; before, 0 is right.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    if (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 0) {
        assert_ne!(
            off.tw_refcount, 0,
            "{release}: the death row is embedded: {off:?}"
        );
    } else {
        assert_eq!(
            off.tw_refcount, 0,
            "{release}: the death row is a pointer: {off:?}"
        );
    }
    assert_eq!((off.flag_dead, off.flag_done), (0, 1), "{off:?}");
    assert_eq!(off.task_btf, 1, "the host runs 5.11+: {off:?}");
}

/// The BTF of a kernel users run, checked in gzipped by `cargo xtask btf-fixtures` (the
/// packages are listed in `fixtures/SOURCES`).
pub(crate) fn fixture(name: &str) -> Offsets {
    let path = format!(
        "{}/src/btf/fixtures/{name}.btf.gz",
        env!("CARGO_MANIFEST_DIR")
    );
    let gz = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut data)
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    offsets_in_blob(&data).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// `struct sock_common` has kept its head since 4.x on every architecture: a change here
/// means the resolver, not the kernel, moved.
fn assert_common_head(name: &str, off: &Offsets) {
    let head = (
        off.daddr,
        off.rcv_saddr,
        off.dport,
        off.num,
        off.family,
        off.state,
        off.net,
        off.daddr6,
        off.saddr6,
        off.flag_dead,
        off.flag_done,
    );
    assert_eq!(
        head,
        (0, 4, 12, 14, 16, 18, 48, 56, 72, 0, 1),
        "{name}: {off:?}"
    );
    // The state-change program's protocol filter: a u16 in `struct sock` on every kernel.
    assert_ne!(off.sk_protocol, 0, "{name}: {off:?}");
}

#[test]
fn debian_5_10_has_no_embedded_death_row_and_no_cgroup_pointer() {
    let off = fixture("5.10-amd64");
    assert_common_head("5.10", &off);
    // Before 6.0 `net.ipv4.tcp_death_row` is a pointer, and before 5.15 `sk_cgrp_data` is a
    // tagged union with no `cgroup` member: both optional groups resolve to 0, which the
    // program reads as "skip", and the feature report names as off.
    assert_eq!((off.tw_refcount, off.tw_max), (0, 0), "{off:?}");
    // Nor bpf_get_current_task_btf (5.11): the program takes the helper-call branch.
    assert_eq!(off.task_btf, 0, "{off:?}");
    assert_eq!(
        (off.sk_cgroup, off.cgroup_kn, off.kn_id),
        (0, 0, 0),
        "{off:?}"
    );
    assert_eq!(
        (off.sport, off.saddr, off.sk_err, off.sk_flags, off.net_inum),
        (776, 768, 568, 96, 136)
    );
    assert_eq!((off.tgid, off.comm), (2236, 2736));
}

#[test]
fn debian_6_1_amd64() {
    let off = fixture("6.1-amd64");
    assert_common_head("6.1", &off);
    assert_eq!(off.task_btf, 1);
    assert_eq!(
        (off.sport, off.saddr, off.sk_err, off.sk_flags, off.net_inum),
        (804, 784, 544, 96, 144)
    );
    assert_eq!((off.tw_refcount, off.tw_max), (704, 776));
    assert_eq!((off.sk_cgroup, off.cgroup_kn, off.kn_id), (648, 248, 104));
    assert_eq!((off.tgid, off.comm), (2420, 2976));
}

#[test]
fn debian_6_1_arm64_differs_from_amd64_only_in_the_task() {
    let arm = fixture("6.1-arm64");
    let amd = fixture("6.1-amd64");
    assert_common_head("6.1 arm64", &arm);
    assert_eq!((arm.tgid, arm.comm, arm.task_files), (1356, 1912, 1984));
    assert_eq!(
        Offsets {
            tgid: amd.tgid,
            comm: amd.comm,
            task_files: amd.task_files,
            ..arm
        },
        amd
    );
}

#[test]
fn debian_6_12_amd64() {
    let off = fixture("6.12-amd64");
    assert_common_head("6.12", &off);
    assert_eq!(off.task_btf, 1);
    assert_eq!(
        (off.sport, off.saddr, off.sk_err, off.sk_flags, off.net_inum),
        (806, 800, 284, 96, 136)
    );
    assert_eq!((off.tw_refcount, off.tw_max), (832, 904));
    assert_eq!((off.sk_cgroup, off.cgroup_kn, off.kn_id), (672, 256, 96));
    assert_eq!((off.tgid, off.comm), (2436, 2976));
}

#[test]
fn debian_7_3_amd64() {
    let off = fixture("7.3-amd64");
    assert_common_head("7.3", &off);
    assert_eq!(off.task_btf, 1);
    assert_eq!(
        (off.sport, off.saddr, off.sk_err, off.sk_flags, off.net_inum),
        (830, 824, 284, 96, 280)
    );
    assert_eq!((off.tw_refcount, off.tw_max), (1152, 1224));
    assert_eq!((off.sk_cgroup, off.cgroup_kn, off.kn_id), (688, 296, 96));
    assert_eq!((off.tgid, off.comm), (2876, 3408));
}

/// The drop hook needs `skb:kfree_skb`'s reason (5.17+); from 6.11 the tracepoint also names
/// the socket a received packet was for. Both are read from the tracepoint's own prototype.
#[test]
fn the_drop_hook_needs_a_reason_and_names_the_receiving_socket_from_6_11() {
    let hook = |o: &Offsets| {
        (
            o.kfree_reason,
            o.kfree_rx_sk,
            (o.skb_sk, o.skb_protocol, o.skb_head, o.skb_network_header),
        )
    };
    // 5.10's tracepoint passes (skb, location) only: the hook is refused by name.
    assert_eq!(hook(&fixture("5.10-amd64")).0, 0);
    assert_eq!(hook(&fixture("6.1-amd64")), (1, 0, (24, 180, 200, 184)));
    for name in ["6.12-amd64", "7.3-amd64"] {
        assert_eq!(hook(&fixture(name)), (1, 1, (24, 180, 200, 184)), "{name}");
    }
}

/// The bind hooks walk from the fd to the socket; every kernel users run has the fields.
#[test]
fn the_bind_hooks_find_the_socket_of_an_fd_on_every_kernel() {
    for (name, want) in [
        ("5.10-amd64", [2808, 32, 8, 0, 200, 16, 24, 4]),
        ("6.1-amd64", [3048, 32, 8, 0, 200, 16, 24, 4]),
        ("6.12-amd64", [3048, 32, 8, 0, 32, 16, 24, 4]),
        ("7.3-amd64", [3488, 32, 8, 0, 24, 16, 24, 4]),
    ] {
        let o = fixture(name);
        // task.files, files_struct.fdt, fdtable.fd, fdtable.max_fds (first: 0),
        // file.private_data (it moved twice), socket.file, socket.sk, socket.type.
        let walk = [
            o.task_files,
            o.files_fdt,
            o.fdtable_fd,
            o.fdtable_max_fds,
            o.file_private_data,
            o.socket_file,
            o.socket_sk,
            o.socket_type,
        ];
        assert_eq!(walk, want, "{name}");
    }
}
