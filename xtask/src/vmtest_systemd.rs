//! `cargo xtask vmtest-systemd`: packaging/tcpstate.service, as shipped, run by a real
//! systemd in a QEMU guest (Debian 12's kernel and userland), and checked from inside:
//! Type=notify readiness, LimitNOFILE, the hardening against what the daemon needs (its
//! eBPF program, /proc of other units' processes, sock_diag in another unit's network
//! namespace), real transitions in the log, the daemon's own clients, journald, reload
//! (SIGHUP) and packaging/logrotate.conf, Restart= after `kill -9`, stop, and the failures
//! no restart cures (a usage error; a start that always fails).
//!
//! The host's root cannot be the guest's here (virtme-ng's `--systemd` wants to create
//! `/lib/modules` on it, read-only, and the host's own units would boot too), so the guest
//! gets its own Debian root:
//! - `<target>/vmtest/rootfs/bookworm-systemd/`: `debootstrap --variant=minbase` of
//!   bookworm with systemd and what the checks use (iproute2, python3, kmod, procps,
//!   logrotate),
//!   made once (about 1.5 min) and cached; `.packages` says what it holds, and a change of
//!   [`PACKAGES`] makes it again;
//! - `<target>/vmtest/systemd/root/`: a fresh copy for each run, with the kernel's modules,
//!   the release binary in /usr/local/bin, the unit in /etc/systemd/system,
//!   packaging/logrotate.conf in /etc/logrotate.d and the check
//!   script (`vmtest_systemd_check.sh`) in /root. virtme-ng boots it read-write over 9p with
//!   `--systemd`; systemd runs the script itself (`systemd.run=`, then powers off), and the
//!   script writes `@@check NAME pass|FAIL EVIDENCE` lines to the console and to
//!   /root/results.txt, which is read back from the copy.
//!
//! Kernels, qemu and virtme-ng come from `cargo xtask vmtest`'s cache and functions.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{euid, run, show, step};
use crate::vmtest::{self, Kernel, secs};

/// What the guest's root holds beyond minbase: systemd as init, and the tools the check
/// script runs (ss, python3 for traffic and JSON, modprobe for the diag modules, logrotate
/// for packaging/logrotate.conf).
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "udev",
    "kmod",
    "iproute2",
    "procps",
    "python3",
    "logrotate",
];
const SUITE: &str = "bookworm";

/// The script systemd runs in the guest.
const CHECK_SCRIPT: &str = include_str!("vmtest_systemd_check.sh");

/// Every check the script makes, in its order: one missing from its output is a failure.
const CHECKS: &[&str] = &[
    "unit_verify",
    "ready",
    "limit_nofile",
    "ebpf_loaded",
    "transitions",
    "owner_other_unit",
    "owner_other_netns",
    "clients",
    "journald",
    "reload",
    "logrotate",
    "restart_after_kill9",
    "stop",
    "usage_error_not_restarted",
    "start_failures_give_up",
];

#[derive(clap::Args)]
pub struct VmtestSystemdArgs {
    /// Kernel to boot, as `cargo xtask vmtest --kernel` takes it (default: Debian 12's).
    #[arg(long, default_value = "6.1")]
    pub kernel: String,
    /// vCPUs of the guest.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Guest memory.
    #[arg(long, default_value = "2G")]
    pub memory: String,
    /// Give up on the guest after this long.
    #[arg(long, default_value = "20m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

impl Default for VmtestSystemdArgs {
    fn default() -> Self {
        Self {
            kernel: "6.1".to_owned(),
            cpus: 2,
            memory: "2G".to_owned(),
            timeout: Duration::from_secs(20 * 60),
        }
    }
}

pub fn vmtest_systemd(args: &VmtestSystemdArgs) -> Result<()> {
    let started = Instant::now();
    if euid() != 0 {
        bail!(
            "vmtest-systemd installs packages, runs debootstrap and writes a root filesystem \
             owned by root: run it as root"
        );
    }
    let binary = crate::build()?;
    let dir = crate::target_dir()?.join("vmtest");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;

    let t = Instant::now();
    let vng = vmtest::ensure_host_tools(&dir)?;
    let kernel = vmtest::ensure_kernels(&dir, std::slice::from_ref(&args.kernel))?
        .pop()
        .context("no kernel")?;
    let base = ensure_rootfs(&dir)?;
    println!(
        "xtask vmtest-systemd: tools, kernel and root ready in {}",
        secs(t.elapsed())
    );
    let kvm = vmtest::kvm_works(&dir, &vng, &kernel)?;
    let logs = dir.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;

    let mut guest_time = Duration::ZERO;
    let mut attempt = 1;
    let (report, failed) = loop {
        let root = guest_root(&dir, &base, &kernel, &binary)?;
        let log_path = logs.join(format!("systemd-{}-{attempt}.log", args.kernel));
        let boot = Instant::now();
        let (results, code) = boot_guest(args, &vng, &kernel, kvm, &root, &log_path)?;
        guest_time += boot.elapsed();
        let (report, failed, cut_short) = report(&results, code, &log_path);
        // A check that ran and failed is never retried. A guest that died before the end
        // with every check so far passed (seen once in six runs under TCG, cause unknown)
        // gets one more boot, said loudly, so emulation cannot fail a landing by itself.
        if cut_short && attempt == 1 {
            println!(
                "\n{report}\n!!! xtask vmtest-systemd: the guest ended before its last check \
                 (every check it ran passed); booting it once more (log {})",
                log_path.display()
            );
            attempt += 1;
            continue;
        }
        break (report, failed);
    };
    println!("\n{report}");
    let report_path = dir.join("systemd-checks.txt");
    fs::write(&report_path, &report)
        .with_context(|| format!("cannot write {}", report_path.display()))?;
    println!(
        "xtask vmtest-systemd: {} in {} (guest {}, {attempt} boot(s); checks also in {}, guest \
         logs in {})",
        if failed { "FAILED" } else { "passed" },
        secs(started.elapsed()),
        secs(guest_time),
        report_path.display(),
        logs.display()
    );
    if failed {
        bail!("the unit failed checks under systemd (see above)");
    }
    Ok(())
}

/// Boots the guest on `root`, which runs the checks under systemd; returns what the script
/// wrote and vng's exit code.
fn boot_guest(
    args: &VmtestSystemdArgs,
    vng: &Path,
    kernel: &vmtest::Kernel,
    kvm: bool,
    root: &Path,
    log_path: &Path,
) -> Result<(String, Option<i32>)> {
    let mut log = fs::File::create(log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut cmd = vmtest::vng_base(vng, kernel, args.cpus, &args.memory, kvm);
    cmd.arg("--root")
        .arg(root)
        .args(["--rw", "--systemd"])
        .arg("--append")
        .arg(
            // The journal also goes to the console, so the guest log has it after a failure
            // (the guest's own journal stays in its memory).
            "systemd.run=/root/check.sh systemd.run_success_action=poweroff \
             systemd.run_failure_action=poweroff systemd.journald.forward_to_console=1",
        );
    println!(
        "\n==> xtask vmtest-systemd: kernel {} ({}), {} vCPUs, {}, root {} (log: {})",
        kernel.label(),
        kernel.release,
        args.cpus,
        if kvm { "KVM" } else { "TCG" },
        root.display(),
        log_path.display()
    );
    let _ = writeln!(log, "$ {}", show(&cmd));
    let boot = Instant::now();
    // A boot that hangs, or a guest gone quiet, is killed early and counts as cut short
    // (booted once more), rather than eating the whole 20 minutes.
    let watch = vmtest::Watch {
        total: args.timeout,
        boot: Some(("@@vmtest-systemd guest up", Duration::from_secs(420))),
        silence: Some(Duration::from_secs(600)),
    };
    let ended = vmtest::run_watched(&mut cmd, &watch, |line| {
        let _ = writeln!(log, "{line}");
        if line.starts_with("@@") || line.contains("xtask vmtest: guest killed") {
            println!("[guest +{}] {line}", secs(boot.elapsed()));
        }
    })?;
    let _ = writeln!(log, "[vng ended: {ended:?}]");
    let code = match ended {
        vmtest::Ended::Exited(code) => code,
        vmtest::Ended::Killed(_) => None,
    };
    let results_path = root.join("root").join("results.txt");
    Ok((fs::read_to_string(&results_path).unwrap_or_default(), code))
}

/// One line per check, in [`CHECKS`] order: `pass`/`FAIL name: evidence`. Also whether any
/// failed, and whether the only failures are checks the guest never reached.
fn report(results: &str, code: Option<i32>, log: &Path) -> (String, bool, bool) {
    let mut out = String::from("systemd unit checks (packaging/tcpstate.service in a guest):\n");
    let mut failed = false;
    let (mut ran_and_failed, mut not_run) = (false, false);
    for line in results.lines() {
        if let Some(info) = line.strip_prefix("@@info ") {
            let _ = writeln!(out, "  guest: {info}");
        }
    }
    for name in CHECKS {
        let found = results.lines().find_map(|l| {
            let rest = l.strip_prefix("@@check ")?.strip_prefix(name)?;
            rest.strip_prefix(' ')
        });
        let (verdict, evidence) = match found.and_then(|r| r.split_once(' ')) {
            Some(("pass", evidence)) => ("pass", evidence.to_owned()),
            Some((_, evidence)) => {
                ran_and_failed = true;
                ("FAIL", evidence.to_owned())
            }
            None => {
                not_run = true;
                (
                    "FAIL",
                    format!(
                        "not run: the guest ended before it (vng exit {code:?}; log {})",
                        log.display()
                    ),
                )
            }
        };
        failed |= verdict != "pass";
        let _ = writeln!(out, "  {verdict:<4} {name}: {evidence}");
    }
    (out, failed, not_run && !ran_and_failed)
}

/// The cached Debian root with systemd (debootstrap, once).
fn ensure_rootfs(dir: &Path) -> Result<PathBuf> {
    let what = format!("guest root ({SUITE} + systemd)");
    let base = dir.join("rootfs").join(format!("{SUITE}-systemd"));
    let stamp = PACKAGES.join(",");
    let cached = fs::read_to_string(base.join(".packages")).is_ok_and(|s| s.trim() == stamp);
    if cached && base.join("sbin/init").exists() {
        step(&what, format_args!("cached ({})", base.display()));
        return Ok(base);
    }
    vmtest::ensure_package("debootstrap", &["debootstrap"])?;
    let staging = dir.join("rootfs").join(format!(".{SUITE}-systemd.tmp"));
    for old in [&staging, &base] {
        if old.exists() {
            fs::remove_dir_all(old).with_context(|| format!("cannot remove {}", old.display()))?;
        }
    }
    fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    step(
        &what,
        format_args!("debootstrap into {} (about 1.5 min)", staging.display()),
    );
    run(Command::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--keyring={}", vmtest::KEYRING))
        .arg(format!("--include={stamp}"))
        .arg(SUITE)
        .arg(&staging)
        .arg(vmtest::MIRROR))?;
    // The package cache is 100 MB that every per-run copy would carry.
    let archives = staging.join("var/cache/apt/archives");
    if let Ok(entries) = fs::read_dir(&archives) {
        for deb in entries.filter_map(Result::ok).map(|e| e.path()) {
            if deb.extension().is_some_and(|e| e == "deb") {
                let _ = fs::remove_file(deb);
            }
        }
    }
    fs::write(staging.join(".packages"), format!("{stamp}\n"))?;
    fs::rename(&staging, &base)
        .with_context(|| format!("cannot move {} to {}", staging.display(), base.display()))?;
    step(&what, format_args!("made ({})", base.display()));
    Ok(base)
}

/// A fresh copy of `base` with the kernel's modules, tcpstate, its unit and the checks.
fn guest_root(dir: &Path, base: &Path, kernel: &Kernel, binary: &Path) -> Result<PathBuf> {
    let root = dir.join("systemd").join("root");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("cannot remove {}", root.display()))?;
    }
    if let Some(parent) = root.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    run(Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(base)
        .arg(&root))?;
    // bookworm's /lib is a link to usr/lib.
    let modules = root.join("usr/lib/modules");
    fs::create_dir_all(&modules).with_context(|| format!("cannot create {}", modules.display()))?;
    run(Command::new("cp")
        .arg("-a")
        .arg(kernel.modules_dir())
        .arg(&modules))?;
    let install = |from: &Path, to: &str, mode: &str| {
        run(Command::new("install")
            .args(["-D", "-m", mode])
            .arg(from)
            .arg(root.join(to)))
    };
    install(binary, "usr/local/bin/tcpstate", "0755")?;
    let packaging = crate::cmd::workspace_root().join("packaging");
    install(
        &packaging.join("tcpstate.service"),
        "etc/systemd/system/tcpstate.service",
        "0644",
    )?;
    install(
        &packaging.join("logrotate.conf"),
        "etc/logrotate.d/tcpstate",
        "0644",
    )?;
    let script = root.join("root/check.sh");
    fs::write(&script, CHECK_SCRIPT)
        .with_context(|| format!("cannot write {}", script.display()))?;
    run(Command::new("chmod").arg("0755").arg(&script))?;
    Ok(root)
}
