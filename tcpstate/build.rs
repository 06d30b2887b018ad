//! Builds the eBPF object (nightly + bpf-linker) into OUT_DIR, where
//! `src/program.rs` embeds it. `tcpstate-ebpf` is a build-dependency so
//! cargo rebuilds us whenever the program changes.
//!
//! This is what `aya_build::build_ebpf` 0.2.0 does, minus its JSON
//! plumbing, plus one flag it cannot take: `-Ctarget-cpu=v3`. aya-build
//! replaces CARGO_ENCODED_RUSTFLAGS wholesale and rustc always hands
//! bpf-linker `--cpu generic` (v1), whose only atomic add cannot return a
//! value. Off x86, publishing an event to a CPU's ring needs the fetching
//! add (the one every JIT emits fully ordered), which is BPF ISA v3:
//! Linux 5.12+. One ISA for every architecture keeps one kernel minimum.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

const TARGET: &str = "bpfel-unknown-none";
const BIN: &str = "tcpstate";

fn main() -> anyhow::Result<()> {
    let manifest = env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let out_dir = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR not set")?);
    let root = Path::new(&manifest)
        .parent()
        .ok_or_else(|| anyhow!("tcpstate has no parent directory"))?
        .join("tcpstate-ebpf");
    println!("cargo:rerun-if-changed={}", root.display());

    // aya-ebpf picks architecture-specific definitions by this cfg.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
        "-Ctarget-cpu=v3".into(),
    ]
    .join("\x1f");
    // A target dir of its own: cargo would otherwise wait on the lock the
    // outer build holds.
    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--package",
        "tcpstate-ebpf",
    ])
    .args([
        "--bins",
        "--release",
        "--target",
        TARGET,
        "-Z",
        "build-std=core",
    ])
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(&root)
    .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
    // The outer build's compiler settings must not leak into the
    // nightly build.
    .env_remove("RUSTC")
    .env_remove("RUSTC_WRAPPER")
    .env_remove("RUSTC_WORKSPACE_WRAPPER")
    .env_remove("RUSTFLAGS")
    .env_remove("CARGO_TARGET_DIR");
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?} (is rustup installed?)"))?;
    if !out.status.success() {
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            println!("cargo:warning={line}");
        }
        bail!("building the eBPF program failed ({}): {cmd:?}", out.status);
    }
    let object = target_dir.join(TARGET).join("release").join(BIN);
    std::fs::copy(&object, out_dir.join(BIN))
        .with_context(|| format!("cannot copy {}", object.display()))?;
    Ok(())
}
