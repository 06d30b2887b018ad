//! Builds the eBPF object with aya-build (nightly + bpf-linker) into OUT_DIR,
//! where `src/program.rs` embeds it. `tcpstate-ebpf` is a build-dependency so
//! cargo rebuilds us whenever the program changes.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root = std::path::Path::new(&manifest)
        .parent()
        .ok_or_else(|| anyhow!("tcpstate has no parent directory"))?
        .join("tcpstate-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: "tcpstate-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
