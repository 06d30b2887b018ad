//! `cargo xtask setup`: idempotent environment set-up. Each step prints one
//! line saying what it found or did, and only acts when something is missing.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::cmd::{
    NIGHTLY, capture, cargo_home, euid, probe, run, rustup_run, stable_cargo, step, which,
};

/// Installed when there is no `nightly` at all: a nightly known to build the
/// eBPF crate (rustc 1.97, LLVM 22, which bpf-linker 0.10.x supports).
const PINNED_NIGHTLY: &str = "nightly-2026-05-20";
const BPF_LINKER_VERSION: &str = "0.10.4";
/// The `rust-llvm-<major>` features bpf-linker 0.10.x offers.
const BPF_LINKER_LLVM_MAJORS: [u32; 3] = [20, 21, 22];
const TRACEFS: &str = "/sys/kernel/tracing";

pub fn setup() -> Result<()> {
    ensure_nightly()?;
    ensure_nightly_component("rust-src")?;
    let llvm_major = nightly_llvm_major()?;
    ensure_bpf_linker(llvm_major)?;
    // The integration tests create network namespaces and veths with `ip`.
    ensure_apt_package("ip", "iproute2")?;
    // The metrics tests check /metrics with promtool and scrape it with a
    // real Prometheus server (both in Debian's `prometheus`).
    ensure_apt_package("promtool", "prometheus")?;
    ensure_apt_package("prometheus", "prometheus")?;
    // The drops test arms a firewall rule in its namespace with `nft`.
    ensure_apt_package("nft", "nftables")?;
    ensure_tracefs();
    // No sysctl changes are needed (yet).
    Ok(())
}

/// Step 1: a toolchain answering to `nightly`.
fn ensure_nightly() -> Result<()> {
    const WHAT: &str = "nightly toolchain";
    if which("rustup").is_none() {
        bail!(
            "rustup is not on PATH; the eBPF crate is built with `rustup run nightly cargo`, \
             install rustup from https://rustup.rs"
        );
    }
    if let Some(version) = probe(rustup_run(NIGHTLY, "rustc").arg("-V")) {
        step(WHAT, format_args!("present ({})", first_line(&version)));
        return Ok(());
    }
    step(WHAT, format_args!("missing; installing {PINNED_NIGHTLY}"));
    run(Command::new("rustup").args([
        "toolchain",
        "install",
        PINNED_NIGHTLY,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))?;
    alias_as_nightly(PINNED_NIGHTLY)?;
    let version = capture(rustup_run(NIGHTLY, "rustc").arg("-V"))
        .with_context(|| format!("{PINNED_NIGHTLY} was linked as `nightly` but does not run"))?;
    step(WHAT, format_args!("installed ({})", first_line(&version)));
    Ok(())
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default().trim()
}

/// Makes `toolchain` usable under the name `nightly`, which is what tcpstate/build.rs runs
/// (`rustup run nightly cargo build` for the eBPF crate).
///
/// `rustup toolchain link nightly <sysroot>` would be the obvious way, but
/// rustup refuses it ("invalid custom toolchain name 'nightly'": release
/// channel names are reserved for real installs). rustup does, however, accept
/// a symlink `toolchains/nightly-<host>` -> `nightly-2026-05-20-<host>` next
/// to the pinned toolchain as an installed nightly (checked with rustup 1.29).
/// Caveat: `rustup update nightly` would then update the pinned directory in
/// place through the link; delete the link to undo the alias.
fn alias_as_nightly(toolchain: &str) -> Result<()> {
    let sysroot = capture(rustup_run(toolchain, "rustc").args(["--print", "sysroot"]))?;
    let sysroot = PathBuf::from(sysroot.trim());
    // e.g. "nightly-2026-05-20-x86_64-unknown-linux-gnu" -> host "-x86_64-unknown-linux-gnu"
    let dir_name = sysroot
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("unexpected sysroot {} for {toolchain}", sysroot.display()))?;
    let host = dir_name.strip_prefix(toolchain).with_context(|| {
        format!(
            "sysroot {} is not a rustup toolchain directory",
            sysroot.display()
        )
    })?;
    let link = sysroot.with_file_name(format!("{NIGHTLY}{host}"));
    if link.symlink_metadata().is_ok() {
        bail!(
            "{} exists but `rustup run nightly rustc -V` fails; remove it (or run \
             `rustup toolchain uninstall nightly`) and re-run `cargo xtask setup`",
            link.display()
        );
    }
    symlink(dir_name, &link)
        .with_context(|| format!("cannot create {} -> {dir_name}", link.display()))?;
    step(
        "nightly toolchain",
        format_args!("linked {} -> {dir_name}", link.display()),
    );
    Ok(())
}

/// Step 2 (and reused by `test` for clippy): a rustup component of nightly.
pub fn ensure_nightly_component(component: &str) -> Result<()> {
    let what = format!("{component} for nightly");
    let installed = capture(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        NIGHTLY,
        "--installed",
    ]))?;
    // Host-specific components are listed with their triple ("clippy-x86_64-..."),
    // target-independent ones bare ("rust-src").
    let with_triple = format!("{component}-");
    if installed
        .lines()
        .any(|line| line == component || line.starts_with(&with_triple))
    {
        step(&what, "present");
        return Ok(());
    }
    step(&what, "missing; installing");
    run(Command::new("rustup").args(["component", "add", component, "--toolchain", NIGHTLY]))
}

/// Step 3: LLVM major version of nightly, which bpf-linker must match because
/// it links with rustc's own LLVM (the `rust-llvm-<major>` features).
fn nightly_llvm_major() -> Result<u32> {
    const WHAT: &str = "LLVM of nightly";
    let verbose = capture(rustup_run(NIGHTLY, "rustc").arg("-vV"))?;
    let full = verbose
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))
        .map(str::trim)
        .context(
            "`rustup run nightly rustc -vV` printed no `LLVM version:` line; \
             cannot choose a matching bpf-linker",
        )?;
    let major = full
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .with_context(|| format!("cannot parse nightly's LLVM version {full:?}"))?;
    step(WHAT, format_args!("{full} (major {major})"));
    Ok(major)
}

/// Step 4: bpf-linker in $CARGO_HOME/bin, built for nightly's LLVM major.
fn ensure_bpf_linker(llvm_major: u32) -> Result<()> {
    const WHAT: &str = "bpf-linker";
    let feature = format!("rust-llvm-{llvm_major}");
    let cargo_home = cargo_home()?;
    let binary = cargo_home.join("bin").join("bpf-linker");

    let reason = match installed_bpf_linker(&cargo_home)? {
        Some(installed) if installed.features.contains(&feature) && binary.is_file() => {
            step(
                WHAT,
                format_args!("present ({} with {feature})", installed.version),
            );
            return Ok(());
        }
        Some(installed) if installed.features.contains(&feature) => {
            format!(
                "recorded by cargo install but {} is missing",
                binary.display()
            )
        }
        Some(installed) => format!(
            "{} is built without {feature} (features: [{}])",
            installed.version,
            installed.features.join(", ")
        ),
        None => "not installed by cargo install".to_owned(),
    };

    if !BPF_LINKER_LLVM_MAJORS.contains(&llvm_major) {
        bail!(
            "nightly uses LLVM {llvm_major}, but bpf-linker {BPF_LINKER_VERSION} supports only \
             rust-llvm-20/21/22; install a nightly with LLVM 20-22: `rustup toolchain install \
             {PINNED_NIGHTLY} --profile minimal --component rust-src` (tcpstate/build.rs runs the \
             toolchain named `nightly`: `rustup toolchain uninstall nightly && cargo xtask setup` \
             installs {PINNED_NIGHTLY} and links it as `nightly`)"
        );
    }

    step(
        WHAT,
        format_args!("{reason}; installing {BPF_LINKER_VERSION} with {feature}"),
    );
    run(stable_cargo().args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
        "--no-default-features",
        "--features",
        &feature,
        "--force",
    ]))?;
    if !binary.is_file() {
        bail!(
            "`cargo install bpf-linker` succeeded but {} does not exist",
            binary.display()
        );
    }
    step(
        WHAT,
        format_args!("installed {BPF_LINKER_VERSION} with {feature}"),
    );
    Ok(())
}

struct InstalledCrate {
    version: String,
    features: Vec<String>,
}

/// What cargo recorded about its bpf-linker install in `.crates2.json`:
/// `{"installs": {"bpf-linker 0.10.4 (registry+...)": {"features": [...], ...}}}`.
fn installed_bpf_linker(cargo_home: &Path) -> Result<Option<InstalledCrate>> {
    let path = cargo_home.join(".crates2.json");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))?;
    let installs = json
        .get("installs")
        .and_then(|installs| installs.as_object())
        .with_context(|| format!("{} has no \"installs\" object", path.display()))?;
    Ok(installs.iter().find_map(|(key, entry)| {
        let rest = key.strip_prefix("bpf-linker ")?;
        let version = rest.split(' ').next().unwrap_or(rest).to_owned();
        let features = entry
            .get("features")
            .and_then(|f| f.as_array())
            .map(|f| {
                f.iter()
                    .filter_map(|f| f.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Some(InstalledCrate { version, features })
    }))
}

/// Makes sure the program `bin` is on PATH, installing the Debian/Ubuntu
/// `package` that provides it with apt-get if not. Returns its path.
pub fn ensure_apt_package(bin: &str, package: &str) -> Result<PathBuf> {
    let what = format!("{bin} ({package})");
    if let Some(path) = which(bin) {
        step(&what, format_args!("present ({})", path.display()));
        return Ok(path);
    }
    if which("apt-get").is_none() {
        bail!("`{bin}` is not on PATH and apt-get is unavailable; install the {package} package");
    }
    if euid() != 0 {
        bail!(
            "`{bin}` is not on PATH and installing {package} needs root: \
             `sudo apt-get install -y {package}`"
        );
    }
    step(&what, format_args!("missing; installing {package}"));
    apt_get_install(&what, &[], &[package])?;
    let path = which(bin)
        .with_context(|| format!("installed {package} but `{bin}` is still not on PATH"))?;
    step(&what, format_args!("installed ({})", path.display()));
    Ok(path)
}

/// `apt-get install -y OPTIONS PACKAGES` (as root); on failure, one
/// `apt-get update` and a retry. `what` names the step in progress lines.
pub fn apt_get_install(what: &str, options: &[&str], packages: &[&str]) -> Result<()> {
    let apt_get = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    let install = || {
        let mut cmd = apt_get(&["install", "-y"]);
        cmd.args(options).args(packages);
        cmd
    };
    if run(&mut install()).is_err() {
        // Package lists are often absent or stale (fresh containers): refresh once.
        step(
            what,
            "apt-get install failed; running apt-get update and retrying",
        );
        run(&mut apt_get(&["update"]))?;
        run(&mut install())?;
    }
    Ok(())
}

/// Step 6: tracefs mounted, for the benchmark's peers (libbpf-tools `tcpstates`, bpftrace),
/// which attach classic tracepoints. tcpstate itself needs none (a BTF tracepoint), so failing
/// here is only a warning.
fn ensure_tracefs() {
    const WHAT: &str = "tracefs";
    if Path::new(TRACEFS).join("events").is_dir() {
        step(WHAT, format_args!("present ({TRACEFS})"));
        return;
    }
    if euid() != 0 {
        step(
            WHAT,
            format_args!("not mounted at {TRACEFS}; mounting needs root (warning only)"),
        );
        return;
    }
    step(WHAT, format_args!("not mounted; mounting at {TRACEFS}"));
    if let Err(err) = run(Command::new("mount").args(["-t", "tracefs", "tracefs", TRACEFS])) {
        step(
            WHAT,
            format_args!("warning: {err:#}; tcpstate will try itself"),
        );
    }
}
