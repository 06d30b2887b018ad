//! `cargo xtask btf-fixtures`: the BTF of each kernel in the matrix (and arm64 6.1), taken from
//! Debian's packages and checked in gzipped under `tcpstate/src/btf/fixtures/`, so that the
//! offset resolver's unit tests see the layouts users run without booting anything.
//!
//! Kernels come through vmtest's private apt configuration and share its cache
//! (`<target>/vmtest/kernels/`). A `vmlinuz` holds a compressed kernel (bzImage on amd64, a
//! gzipped `Image` on arm64): every known compression magic is tried until an output holds
//! the BTF blob, which is found by its header rather than by ELF section, because arm64's
//! `Image` is not an ELF.

use std::fmt::Write as _;
use std::fs;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{euid, step, workspace_root};
use crate::vmtest::{Apt, Kernel, fetch_kernel, read_kernel};

/// (version spec as vmtest takes it, Debian architecture). `7` is the newest 7.x Debian serves.
const KERNELS: &[(&str, &str)] = &[
    ("5.10", "amd64"),
    ("6.1", "amd64"),
    ("6.12", "amd64"),
    ("7", "amd64"),
    ("6.1", "arm64"),
];

const BTF_MAGIC_LE: [u8; 2] = [0x9f, 0xeb];
const BTF_HEADER: usize = 24;

/// Compression magics a `vmlinuz` payload may start with, and the tool that undoes each.
const DECOMPRESSORS: &[(&[u8], &str)] = &[
    (&[0x1f, 0x8b, 0x08], "gzip"),
    (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], "xz"),
    (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
    (&[0x02, 0x21, 0x4c, 0x18], "lz4"),
];

pub fn fixtures_dir() -> PathBuf {
    workspace_root().join("tcpstate/src/btf/fixtures")
}

pub fn btf_fixtures() -> Result<()> {
    if euid() != 0 {
        bail!("btf-fixtures fetches kernels with apt-get into a root-owned cache: run it as root");
    }
    let dir = crate::target_dir()?.join("vmtest");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let out_dir = fixtures_dir();
    fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;

    let mut apts: Vec<Apt> = Vec::new();
    let mut sources = String::from(
        "# Written by `cargo xtask btf-fixtures`: each fixture's Debian package.\n\
         # fixture\tpackage version\tsuite\trelease\n",
    );
    for &(spec, arch) in KERNELS {
        // amd64 kernels sit where vmtest looks for them, so each side reuses the other's.
        let root = match arch {
            "amd64" => dir.join("kernels").join(spec),
            _ => dir.join("kernels").join(format!("{spec}-{arch}")),
        };
        let kernel = match read_kernel(spec, &root) {
            Some(k) => {
                step(
                    &format!("kernel {spec} {arch}"),
                    format_args!("cached ({} {})", k.version, k.suite),
                );
                k
            }
            None => {
                let idx = match apts.iter().position(|a| a.arch() == arch) {
                    Some(i) => i,
                    None => {
                        apts.push(Apt::new(&dir, arch)?);
                        apts.len() - 1
                    }
                };
                fetch_kernel(&mut apts[idx], &dir, spec, &root)?
            }
        };
        let name = fixture_name(&kernel, arch);
        let btf = btf_of(&kernel.vmlinuz())
            .with_context(|| format!("kernel {} {arch}", kernel.version))?;
        let path = out_dir.join(&name);
        write_gz(&path, &btf)?;
        let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        step(
            &format!("fixture {name}"),
            format_args!(
                "{} bytes of BTF, {} gzipped ({} {})",
                btf.len(),
                size,
                kernel.version,
                kernel.suite
            ),
        );
        let _ = writeln!(
            sources,
            "{name}\t{}\t{}\t{}",
            kernel.version, kernel.suite, kernel.release
        );
    }
    let list = out_dir.join("SOURCES");
    fs::write(&list, sources).with_context(|| format!("cannot write {}", list.display()))?;
    println!(
        "xtask btf-fixtures: written to {}; a new kernel version means new names: update the \
         fixture tests in tcpstate/src/btf/tests.rs",
        out_dir.display()
    );
    Ok(())
}

/// `6.1-amd64.btf.gz`: named by major.minor, since the tests pin each layout to a version.
fn fixture_name(kernel: &Kernel, arch: &str) -> String {
    let (major, minor) = kernel.major_minor();
    format!("{major}.{minor}-{arch}.btf.gz")
}

fn write_gz(path: &Path, data: &[u8]) -> Result<()> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(data)?;
    let gz = enc.finish()?;
    fs::write(path, gz).with_context(|| format!("cannot write {}", path.display()))
}

/// The kernel's own BTF blob, from a `vmlinuz` that may be compressed or not.
fn btf_of(vmlinuz: &Path) -> Result<Vec<u8>> {
    let image = fs::read(vmlinuz).with_context(|| format!("cannot read {}", vmlinuz.display()))?;
    if let Some(btf) = find_btf(&image) {
        return Ok(btf.to_vec());
    }
    let mut tried = Vec::new();
    for &(magic, tool) in DECOMPRESSORS {
        for at in memchr::memmem::find_iter(&image, magic) {
            let out = decompress(tool, &image[at..])?;
            if let Some(btf) = find_btf(&out) {
                return Ok(btf.to_vec());
            }
            tried.push(format!("{tool}@{at}"));
        }
    }
    bail!(
        "{}: no BTF in the image nor in any payload tried ({})",
        vmlinuz.display(),
        if tried.is_empty() {
            "no compression magic found".to_owned()
        } else {
            tried.join(", ")
        }
    )
}

/// Whatever `tool -dc` makes of `input` before it stops: a payload is followed by other data,
/// which the tool rejects after writing everything it decompressed, so its exit status says
/// nothing about success.
fn decompress(tool: &str, input: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new(tool)
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {tool} (install it to read this kernel)"))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let mut stdout = child.stdout.take().context("no stdout")?;
    let mut out = Vec::new();
    std::thread::scope(|s| -> Result<()> {
        // The tool may stop reading early (a bad magic), so a write error is expected.
        s.spawn(move || {
            let _ = stdin.write_all(input);
        });
        stdout.read_to_end(&mut out)?;
        Ok(())
    })?;
    child.wait()?;
    Ok(out)
}

/// The largest well-formed BTF blob in `data`: the kernel's, not one of the small ones
/// that a string or a module table may happen to look like.
fn find_btf(data: &[u8]) -> Option<&[u8]> {
    let u32_at = |off: usize| -> Option<usize> {
        let b: [u8; 4] = data.get(off..off + 4)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(b)).ok()
    };
    memchr::memmem::find_iter(data, &BTF_MAGIC_LE)
        .filter_map(|at| {
            // version 1, flags 0, a 24-byte header, types then strings back to back.
            if data.get(at + 2..at + 4)? != [1, 0] || u32_at(at + 4)? != BTF_HEADER {
                return None;
            }
            let (type_off, type_len) = (u32_at(at + 8)?, u32_at(at + 12)?);
            let (str_off, str_len) = (u32_at(at + 16)?, u32_at(at + 20)?);
            if type_off != 0 || str_off != type_len || str_len == 0 {
                return None;
            }
            let end = at + BTF_HEADER + str_off + str_len;
            let blob = data.get(at..end)?;
            (blob.last() == Some(&0)).then_some(blob)
        })
        .max_by_key(|b| b.len())
}
