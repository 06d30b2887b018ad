//! Resolves, from the running kernel's BTF, the struct offsets the eBPF program reads: the
//! socket's addresses, ports, family and network namespace, and the current task's tgid and
//! comm. The program gets them as read-only globals, which the verifier folds into constants,
//! so one object runs on every kernel layout.
//!
//! A minimal BTF reader: header, type section and string section, enough to walk struct/union
//! members (through typedefs, qualifiers and anonymous members). It is written here rather than
//! taken from a crate because the maintained BTF crate (`btf-rs`) is LGPL, and aya's BTF parser
//! does not expose types or member offsets.

use std::path::Path;

/// The running kernel's BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Byte offsets of every kernel field the eBPF program reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// In `struct tcp_sock` (which starts with `struct sock`).
    pub family: u32,
    pub dport: u32,
    pub sport: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub saddr6: u32,
    pub daddr6: u32,
    /// `struct net *` in the socket, and `ns.inum` in `struct net`.
    pub net: u32,
    pub net_inum: u32,
    /// In `struct task_struct`.
    pub tgid: u32,
    pub comm: u32,
}

/// Reads [`VMLINUX_BTF`] and resolves [`KernelOffsets`]. Returns one descriptive line if BTF
/// is missing or malformed or a member is not found.
pub fn kernel_offsets() -> Result<KernelOffsets, String> {
    kernel_offsets_from(Path::new(VMLINUX_BTF))
}

/// Same as [`kernel_offsets`] with the BTF read from `path` (a raw BTF blob, as in
/// /sys/kernel/btf/).
pub fn kernel_offsets_from(path: &Path) -> Result<KernelOffsets, String> {
    let data = std::fs::read(path).map_err(|e| {
        format!(
            "cannot read the kernel's BTF {}: {e} (tcpstate needs a kernel built with \
             CONFIG_DEBUG_INFO_BTF)",
            path.display()
        )
    })?;
    let btf = Btf::parse(&data).map_err(|e| format!("parsing BTF {}: {e}", path.display()))?;
    offsets_in(&btf).map_err(|e| format!("BTF {}: {e}", path.display()))
}

fn offsets_in(btf: &Btf<'_>) -> Result<KernelOffsets, String> {
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
    Ok(KernelOffsets {
        family: sk("skc_family", 2)?,
        dport: sk("skc_dport", 2)?,
        sport: field("inet_sock", &["inet_sport"], 2)?,
        saddr: field("inet_sock", &["inet_saddr"], 4)?,
        daddr: sk("skc_daddr", 4)?,
        saddr6: sk("skc_v6_rcv_saddr", 16)?,
        daddr6: sk("skc_v6_daddr", 16)?,
        net: field("sock", &["__sk_common", "skc_net", "net"], 8)?,
        net_inum: field("net", &["ns", "inum"], 4)?,
        tgid: field("task_struct", &["tgid"], 4)?,
        comm: field("task_struct", &["comm"], 16)?,
    })
}

const BTF_MAGIC: u16 = 0xeb9f;
const HEADER_MIN: usize = 24;
const TYPE_HEADER: usize = 12;

const KIND_INT: u8 = 1;
const KIND_PTR: u8 = 2;
const KIND_ARRAY: u8 = 3;
const KIND_STRUCT: u8 = 4;
const KIND_UNION: u8 = 5;
const KIND_ENUM: u8 = 6;
const KIND_FWD: u8 = 7;
const KIND_TYPEDEF: u8 = 8;
const KIND_VOLATILE: u8 = 9;
const KIND_CONST: u8 = 10;
const KIND_RESTRICT: u8 = 11;
const KIND_FUNC: u8 = 12;
const KIND_FUNC_PROTO: u8 = 13;
const KIND_VAR: u8 = 14;
const KIND_DATASEC: u8 = 15;
const KIND_FLOAT: u8 = 16;
const KIND_DECL_TAG: u8 = 17;
const KIND_TYPE_TAG: u8 = 18;
const KIND_ENUM64: u8 = 19;

/// Limit on typedef/qualifier chains and anonymous-member nesting (guards against loops in a
/// corrupt blob).
const MAX_DEPTH: usize = 64;

#[derive(Clone, Copy, Debug)]
struct Type {
    name_off: u32,
    kind: u8,
    vlen: u16,
    kind_flag: bool,
    /// `size` for INT/STRUCT/UNION/ENUM..., `type` for PTR/TYPEDEF/qualifiers...
    size_type: u32,
    /// Byte offset of the kind-specific data that follows the 12-byte header, within the type
    /// section.
    extra: usize,
}

struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
}

struct Btf<'a> {
    big_endian: bool,
    types_sec: &'a [u8],
    strings: &'a [u8],
    /// Index = type id - 1 (id 0 is void).
    types: Vec<Type>,
}

impl std::fmt::Debug for Btf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Btf")
            .field("types", &self.types.len())
            .field("strings_len", &self.strings.len())
            .finish()
    }
}

fn section<'a>(
    data: &'a [u8],
    base: usize,
    off: u32,
    len: u32,
    what: &str,
) -> Result<&'a [u8], String> {
    let start = base
        .checked_add(off as usize)
        .ok_or_else(|| format!("{what} section offset overflows"))?;
    let end = start
        .checked_add(len as usize)
        .ok_or_else(|| format!("{what} section length overflows"))?;
    data.get(start..end).ok_or_else(|| {
        format!(
            "{what} section {start}..{end} lies outside the {}-byte blob",
            data.len()
        )
    })
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> Result<Self, String> {
        let magic = data
            .get(..2)
            .ok_or_else(|| format!("blob of {} bytes is too short", data.len()))?;
        let big_endian = match [magic[0], magic[1]] {
            m if u16::from_le_bytes(m) == BTF_MAGIC => false,
            m if u16::from_be_bytes(m) == BTF_MAGIC => true,
            m => return Err(format!("bad magic {:02x}{:02x}", m[0], m[1])),
        };
        let rd = |off: usize| read_u32(data, off, big_endian);
        if data.len() < HEADER_MIN {
            return Err(format!(
                "blob of {} bytes is shorter than the BTF header",
                data.len()
            ));
        }
        let hdr_len = rd(4)? as usize;
        if hdr_len < HEADER_MIN || hdr_len > data.len() {
            return Err(format!("bad header length {hdr_len}"));
        }
        let types_sec = section(data, hdr_len, rd(8)?, rd(12)?, "type")?;
        let strings = section(data, hdr_len, rd(16)?, rd(20)?, "string")?;

        let mut btf = Btf {
            big_endian,
            types_sec,
            strings,
            types: Vec::new(),
        };
        let mut off = 0;
        while off < types_sec.len() {
            let id = btf.types.len() + 1;
            let name_off = btf.u32_at(off)?;
            let info = btf.u32_at(off + 4)?;
            let size_type = btf.u32_at(off + 8)?;
            let kind = ((info >> 24) & 0x1f) as u8;
            let vlen = (info & 0xffff) as u16;
            let n = usize::from(vlen);
            let extra_len = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * n,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * n,
                other => {
                    return Err(format!(
                        "type id {id} at type section offset {off} has unknown kind {other}"
                    ));
                }
            };
            let extra = off + TYPE_HEADER;
            let next = extra + extra_len;
            if next > types_sec.len() {
                return Err(format!(
                    "type id {id} runs past the end of the type section"
                ));
            }
            btf.types.push(Type {
                name_off,
                kind,
                vlen,
                kind_flag: info & (1 << 31) != 0,
                size_type,
                extra,
            });
            off = next;
        }
        Ok(btf)
    }

    fn u32_at(&self, off: usize) -> Result<u32, String> {
        read_u32(self.types_sec, off, self.big_endian)
    }

    fn get(&self, id: u32) -> Option<&Type> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    fn name(&self, name_off: u32) -> &str {
        let Some(rest) = self.strings.get(name_off as usize..) else {
            return "";
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Follows typedefs and qualifiers to the underlying type id.
    fn resolve(&self, mut id: u32) -> Result<u32, String> {
        for _ in 0..MAX_DEPTH {
            match self.get(id) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.size_type
                }
                _ => return Ok(id),
            }
        }
        Err(format!(
            "typedef/qualifier chain from type id {id} is too deep"
        ))
    }

    /// Size in bytes of a type (typedefs and qualifiers resolved).
    fn size_of(&self, id: u32) -> Result<u64, String> {
        self.size_at_depth(id, 0)
    }

    fn size_at_depth(&self, id: u32, depth: usize) -> Result<u64, String> {
        if depth > MAX_DEPTH {
            return Err("array types nested too deeply".into());
        }
        let id = self.resolve(id)?;
        let t = self
            .get(id)
            .ok_or_else(|| format!("type id {id} does not exist"))?;
        match t.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT => {
                Ok(u64::from(t.size_type))
            }
            KIND_PTR => Ok(8),
            KIND_ARRAY => {
                let elem = self.u32_at(t.extra)?;
                let n = self.u32_at(t.extra + 8)?;
                Ok(u64::from(n) * self.size_at_depth(elem, depth + 1)?)
            }
            k => Err(format!("type id {id} of kind {k} has no size")),
        }
    }

    fn members(&self, t: &Type) -> Result<Vec<Member>, String> {
        (0..usize::from(t.vlen))
            .map(|i| {
                let off = t.extra + 12 * i;
                let raw = self.u32_at(off + 8)?;
                Ok(Member {
                    name_off: self.u32_at(off)?,
                    type_id: self.u32_at(off + 4)?,
                    // With kind_flag set, the top 8 bits hold the bitfield size.
                    bit_offset: if t.kind_flag { raw & 0x00ff_ffff } else { raw },
                })
            })
            .collect()
    }

    /// Finds member `name` of the struct/union `id`, looking through anonymous struct/union
    /// members. Returns (bit offset from the start of `id`, member type id).
    fn find_member(&self, id: u32, name: &str, depth: usize) -> Result<Option<(u64, u32)>, String> {
        if depth > MAX_DEPTH {
            return Err("anonymous members nested too deeply".into());
        }
        let Some(t) = self
            .get(id)
            .filter(|t| matches!(t.kind, KIND_STRUCT | KIND_UNION))
        else {
            return Ok(None);
        };
        let members = self.members(t)?;
        if let Some(m) = members.iter().find(|m| self.name(m.name_off) == name) {
            return Ok(Some((u64::from(m.bit_offset), m.type_id)));
        }
        for m in members.iter().filter(|m| self.name(m.name_off).is_empty()) {
            let inner = self.resolve(m.type_id)?;
            if let Some((off, ty)) = self.find_member(inner, name, depth + 1)? {
                return Ok(Some((u64::from(m.bit_offset) + off, ty)));
            }
        }
        Ok(None)
    }

    /// Walks `path` from `struct root`, returning the byte offset of the last member and its
    /// type id (typedefs and qualifiers resolved). Every struct named `root` is tried.
    fn member_path(&self, root: &str, path: &[&str]) -> Result<(u32, u32), String> {
        let mut last_err = format!("no struct {root}");
        let roots = self
            .types
            .iter()
            .enumerate()
            .filter(|(_, t)| t.kind == KIND_STRUCT && self.name(t.name_off) == root);
        'roots: for (idx, _) in roots {
            let mut cur = (idx + 1) as u32;
            let mut bits = 0u64;
            let mut walked = String::from(root);
            for name in path {
                match self.find_member(cur, name, 0)? {
                    Some((off, ty)) => {
                        bits += off;
                        cur = self.resolve(ty)?;
                        walked.push('.');
                        walked.push_str(name);
                    }
                    None => {
                        last_err = format!("{walked} has no member {name}");
                        continue 'roots;
                    }
                }
            }
            if !bits.is_multiple_of(8) {
                return Err(format!(
                    "{walked} is at bit offset {bits}, not byte aligned"
                ));
            }
            let bytes = u32::try_from(bits / 8)
                .map_err(|_| format!("{walked} offset {} is too large", bits / 8))?;
            return Ok((bytes, cur));
        }
        Err(last_err)
    }
}

fn read_u32(data: &[u8], off: usize, big_endian: bool) -> Result<u32, String> {
    let b: [u8; 4] = off
        .checked_add(4)
        .and_then(|end| data.get(off..end))
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| format!("read of 4 bytes at offset {off} past the end"))?;
    Ok(if big_endian {
        u32::from_be_bytes(b)
    } else {
        u32::from_le_bytes(b)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let sock_common = b.composite(
            KIND_STRUCT,
            "sock_common",
            true,
            136,
            &[
                ("", addr_union, 0),
                ("skc_dport", be16, 96),
                ("skc_family", ushort, 128),
                ("skc_reuse", uchar, (4 << 24) | 144),
                ("skc_flag", uchar, (1 << 24) | 158),
                ("skc_net", pn, 384),
                ("skc_v6_daddr", in6, 448),
                ("skc_v6_rcv_saddr", in6, 576),
            ],
        );
        let const_sc = b.push("", KIND_CONST, false, 0, sock_common);
        let sock = b.composite(
            KIND_STRUCT,
            "sock",
            false,
            784,
            &[("__sk_common", const_sc, 0), ("sk_drops", uint, 1088)],
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
        let int = b.int("int", 4);
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
        b.composite(
            KIND_STRUCT,
            "net",
            false,
            4288,
            &[("passive", uint, 0), ("ns", ns_common, 1216)],
        );
        b.finish()
    }

    #[test]
    fn synthetic_offsets() {
        let data = sample();
        let btf = Btf::parse(&data).expect("parse");
        let off = offsets_in(&btf).expect("offsets");
        assert_eq!(
            off,
            KernelOffsets {
                family: 16,
                dport: 12,
                sport: 792,
                saddr: 788,
                daddr: 0,
                saddr6: 72,
                daddr6: 56,
                net: 48,
                net_inum: 152 + 8 + 4,
                tgid: 1300,
                comm: 2000,
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
        let e = kernel_offsets_from(Path::new("/nonexistent/btf/vmlinux")).unwrap_err();
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
    }
}
