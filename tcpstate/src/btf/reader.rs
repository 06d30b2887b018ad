//! A minimal BTF reader: header, type section and string section, enough to walk struct/union
//! members (through typedefs, qualifiers and anonymous members) and read enum values. Written
//! here rather than taken from a crate because the maintained BTF crate (`btf-rs`) is LGPL, and
//! aya's BTF parser does not expose types or member offsets. Every read is bounds-checked: a
//! corrupt blob is an error, never a panic.

pub(crate) const BTF_MAGIC: u16 = 0xeb9f;
const HEADER_MIN: usize = 24;
const TYPE_HEADER: usize = 12;

pub(crate) const KIND_INT: u8 = 1;
pub(crate) const KIND_PTR: u8 = 2;
pub(crate) const KIND_ARRAY: u8 = 3;
pub(crate) const KIND_STRUCT: u8 = 4;
pub(crate) const KIND_UNION: u8 = 5;
pub(crate) const KIND_ENUM: u8 = 6;
pub(crate) const KIND_FWD: u8 = 7;
pub(crate) const KIND_TYPEDEF: u8 = 8;
pub(crate) const KIND_VOLATILE: u8 = 9;
pub(crate) const KIND_CONST: u8 = 10;
pub(crate) const KIND_RESTRICT: u8 = 11;
pub(crate) const KIND_FUNC: u8 = 12;
pub(crate) const KIND_FUNC_PROTO: u8 = 13;
pub(crate) const KIND_VAR: u8 = 14;
pub(crate) const KIND_DATASEC: u8 = 15;
pub(crate) const KIND_FLOAT: u8 = 16;
pub(crate) const KIND_DECL_TAG: u8 = 17;
pub(crate) const KIND_TYPE_TAG: u8 = 18;
pub(crate) const KIND_ENUM64: u8 = 19;

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

pub(crate) struct Btf<'a> {
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
    pub fn parse(data: &'a [u8]) -> Result<Self, String> {
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
    pub(crate) fn resolve(&self, mut id: u32) -> Result<u32, String> {
        for _ in 0..MAX_DEPTH {
            match self.get(id) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.size_type;
                }
                _ => return Ok(id),
            }
        }
        Err(format!(
            "typedef/qualifier chain from type id {id} is too deep"
        ))
    }

    /// Size in bytes of a type (typedefs and qualifiers resolved).
    pub fn size_of(&self, id: u32) -> Result<u64, String> {
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
    pub fn member_path(&self, root: &str, path: &[&str]) -> Result<(u32, u32), String> {
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

    /// Whether `id` (typedefs and qualifiers resolved) is a struct.
    pub fn is_struct(&self, id: u32) -> Result<bool, String> {
        let id = self.resolve(id)?;
        Ok(self.get(id).is_some_and(|t| t.kind == KIND_STRUCT))
    }

    /// How many parameters the function pointer typedef `name` takes (a tracepoint's
    /// `btf_trace_*` typedef: its context, then the tracepoint's arguments).
    pub fn func_proto_params(&self, name: &str) -> Result<u16, String> {
        let t = self
            .types
            .iter()
            .find(|t| t.kind == KIND_TYPEDEF && self.name(t.name_off) == name)
            .ok_or_else(|| format!("no typedef {name}"))?;
        let ptr = self
            .get(self.resolve(t.size_type)?)
            .filter(|p| p.kind == KIND_PTR)
            .ok_or_else(|| format!("typedef {name} is not a pointer"))?;
        self.get(self.resolve(ptr.size_type)?)
            .filter(|f| f.kind == KIND_FUNC_PROTO)
            .map(|f| f.vlen)
            .ok_or_else(|| format!("typedef {name} is not a function pointer"))
    }

    /// The value of enumerator `name` in `enum enum_name`.
    pub fn enum_value(&self, enum_name: &str, name: &str) -> Result<i64, String> {
        let enums = self
            .types
            .iter()
            .filter(|t| t.kind == KIND_ENUM && self.name(t.name_off) == enum_name);
        let mut found_enum = false;
        for t in enums {
            found_enum = true;
            for i in 0..usize::from(t.vlen) {
                let off = t.extra + 8 * i;
                if self.name(self.u32_at(off)?) == name {
                    let raw = self.u32_at(off + 4)?;
                    // kind_flag set means signed values.
                    return Ok(if t.kind_flag {
                        i64::from(raw as i32)
                    } else {
                        i64::from(raw)
                    });
                }
            }
        }
        Err(if found_enum {
            format!("enum {enum_name} has no {name}")
        } else {
            format!("no enum {enum_name}")
        })
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
