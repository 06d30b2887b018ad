//! `cargo xtask vmtest`: the real-kernel integration tests, run inside QEMU
//! guests booted with Debian's kernels, so that a change is proven on the
//! kernels users run and not only on the host's.
//!
//! Everything it needs is fetched once and cached under `<target>/vmtest/`:
//! - `kernels/<spec>/`: the kernel packages of the version asked, unpacked
//!   (`boot/vmlinuz-<release>`, `lib/modules/<release>/` with a `depmod`),
//!   found through a private apt configuration (`apt/`) that leaves the
//!   system's sources alone. `kernel.txt` says what was fetched; delete the
//!   directory to fetch the newest one again.
//! - `venv/`: virtme-ng (PyPI), which boots the kernel with the host's root
//!   shared read-only over 9p, so the guest runs the test binaries that the
//!   host built, in place.
//! - `qemu-system-x86` (the version of an installed qemu-utils, see
//!   [`ensure_qemu`]), `busybox-static` (virtme-ng's initramfs) and `udev`
//!   (virtme-ng's guest init names its virtio-serial ports with it) are
//!   installed system-wide with apt-get; `udev` pinned to the installed
//!   `libudev1` so that nothing else gets upgraded.
//!
//! Each kernel boots once and runs the chosen test binaries one after the
//! other; their libtest output is read for each test's verdict.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead as _, BufReader, Read, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{capture, euid, probe, run, show, stable_cargo, step, which, workspace_root};
use crate::setup::apt_get_install;

/// The guest script's first line. Under TCG a guest can hang in its boot (6.12.117 in about
/// one boot in three, 6.1 too: CPU 0 idles and its timer never wakes it, RCU stalls while
/// udev settles; clearing the TSC-deadline timer does not help), so a guest that has not
/// printed it within [`boot_within`] is killed and booted again, [`BOOTS`] boots at most.
/// A good boot prints it after 30-40 s on 4 vCPUs.
const BOOTED_MARKER: &str = "@@vmtest kernel";
const BOOTS: u32 = 4;
fn boot_within(cpus: u32) -> Duration {
    Duration::from_secs(120 + 10 * u64::from(cpus))
}
/// One test binary's limit in the guest. The slowest takes about 110 s under
/// TCG; its output is printed when it ends, so the guest is silent meanwhile.
const BINARY_TIMEOUT_SECS: u64 = 600;
/// No line for longer than a binary may take (and its retry's first line): the
/// guest is dead.
const SILENCE_LIMIT: Duration = Duration::from_secs(BINARY_TIMEOUT_SECS + 60);

/// What `cargo xtask test` boots: Debian 12's kernel, and the newest 7.x that
/// Debian serves (sid or trixie-backports, whichever is newer).
pub const DEFAULT_KERNELS: &[&str] = &["6.1", "6.12", "7"];

/// The integration test binaries run in each guest: between them they load
/// every program, attach every hook and read every BTF-resolved offset
/// (pipeline: transitions and both families; closepath: FIN_WAIT2/TIME_WAIT
/// and the TIME_WAIT offsets; anomalies and busyhost: retransmits, resets,
/// SYN_RECV, ring losses; workloads: cgroup ids and naming; segments (retransmits, resets) and kill:
/// reload, SOCK_DESTROY; reconcile: sock_diag against the table). The other
/// binaries (cli, outputs, tail, packaging, service, faults) test userspace
/// behaviour that the kernel does not change, and stay on the host.
pub const DEFAULT_TESTS: &[&str] = &[
    "pipeline",
    "closepath",
    "anomalies",
    "busyhost",
    "workloads",
    "segments",
    "reconcile",
    "kill",
];

/// virtme-ng release known to boot Debian's kernels here (`--force-9p`).
const VIRTME_NG: &str = "virtme-ng==1.42";
const VIRTME_NG_VERSION: &str = "1.42";

/// Suites of Debian's registry searched for a kernel; a spec (`6.1`, `7`)
/// takes the newest `linux-image-amd64` among them whose version starts with
/// it. Today: bullseye 5.10, bookworm 6.1, trixie 6.12, sid 7.2,
/// trixie-backports 7.3.
const SUITES: &[&str] = &["bullseye", "bookworm", "trixie", "trixie-backports", "sid"];
pub(crate) const MIRROR: &str = "http://deb.debian.org/debian";
const SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";
pub(crate) const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Tests that cannot work on some kernels for a known reason: reported as
/// "not applicable: REASON" in the matrix (never as a pass) and not run
/// there. `test` is a binary name, or `binary::test_name` for one test.
/// The version stands for a feature the daemon itself probes and reports (`features` in its
/// `started` record): a test is listed only for what that report names as off there.
struct NotApplicable {
    /// Kernels below this version (major, minor) are concerned.
    below: (u32, u32),
    test: &'static str,
    reason: &'static str,
}
const CGROUP_OFF: &str = "cgroup_attribution is off before 5.15 (sock.sk_cgrp_data has no cgroup pointer): no socket is named after its unit, container or pod, and --cgroup is refused";
const NOT_APPLICABLE: &[NotApplicable] = &[
    NotApplicable {
        below: (5, 15),
        test: "workloads::sockets_are_named_after_their_unit_container_and_pod",
        reason: CGROUP_OFF,
    },
    NotApplicable {
        below: (5, 15),
        test: "workloads::a_removed_cgroup_keeps_its_last_known_name",
        reason: CGROUP_OFF,
    },
    NotApplicable {
        below: (5, 15),
        test: "workloads::ten_thousand_cgroups_stay_within_the_top_n",
        reason: CGROUP_OFF,
    },
    NotApplicable {
        below: (5, 15),
        test: "workloads::the_cgroup_filter_keeps_one_subtree",
        reason: CGROUP_OFF,
    },
];

#[derive(clap::Args)]
pub struct VmtestArgs {
    /// Kernel version to boot, as Debian serves it: `6.1`, `6.12`, `7.2`,
    /// `5.10`, or a major (`7`: the newest 7.x). Repeatable.
    /// Default: 6.1, 6.12 and the newest 7.x.
    #[arg(long = "kernel")]
    pub kernels: Vec<String>,
    /// Integration test binary to run in each guest (repeatable); default:
    /// pipeline closepath anomalies busyhost workloads segments reconcile kill.
    #[arg(long = "test")]
    pub tests: Vec<String>,
    /// vCPUs of each guest (QEMU TCG when KVM does not work).
    #[arg(long, default_value_t = 4)]
    pub cpus: u32,
    /// Guest memory.
    #[arg(long, default_value = "4G")]
    pub memory: String,
    /// Give up on a guest after this long (the tests' own output says where).
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

impl Default for VmtestArgs {
    fn default() -> Self {
        Self {
            kernels: Vec::new(),
            tests: Vec::new(),
            cpus: 4,
            memory: "4G".to_owned(),
            timeout: Duration::from_secs(30 * 60),
        }
    }
}

/// A kernel unpacked in the cache.
pub(crate) struct Kernel {
    spec: String,
    /// `uname -r`, e.g. 6.1.0-50-amd64.
    pub(crate) release: String,
    /// Debian package version, e.g. 6.1.176-1.
    pub(crate) version: String,
    pub(crate) suite: String,
    root: PathBuf,
}

impl Kernel {
    pub(crate) fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    /// `lib/modules/<release>` of the unpacked packages.
    pub(crate) fn modules_dir(&self) -> PathBuf {
        self.root.join("lib").join("modules").join(&self.release)
    }

    pub(crate) fn label(&self) -> String {
        format!("{} ({} {})", self.spec, self.version, self.suite)
    }

    /// (major, minor) of the package version.
    pub(crate) fn major_minor(&self) -> (u32, u32) {
        let mut parts = self.version.split(['.', '-', '+', '~']);
        let mut next = || parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        (next(), next())
    }
}

/// The verdict of one test binary on one kernel.
#[derive(Clone)]
enum Verdict {
    Pass {
        passed: u32,
    },
    Fail {
        passed: u32,
        failed: Vec<String>,
        why: String,
    },
    NotApplicable(String),
    /// Every test passed, some only when run a second time: shown, not hidden.
    Flaky {
        passed: u32,
        flaky: Vec<String>,
        why: String,
    },
}

/// Where a binary's second run of its failed tests is parsed.
fn retry_key(name: &str) -> String {
    format!("{name} (retry)")
}

struct Cell {
    verdict: Verdict,
    time: Option<Duration>,
    /// Tests of this binary skipped as not applicable, with the reason.
    not_applicable: Vec<(String, String)>,
}

/// `cargo xtask vmtest`. `standalone` runs `setup` first (under `cargo xtask
/// test` it has just run).
pub fn vmtest(args: &VmtestArgs, standalone: bool) -> Result<()> {
    let started = Instant::now();
    if standalone {
        crate::setup::setup()?;
    }
    let specs: Vec<String> = if args.kernels.is_empty() {
        DEFAULT_KERNELS.iter().map(|&k| k.to_owned()).collect()
    } else {
        args.kernels.clone()
    };
    let tests: Vec<String> = if args.tests.is_empty() {
        DEFAULT_TESTS.iter().map(|&t| t.to_owned()).collect()
    } else {
        args.tests.clone()
    };
    if euid() != 0 {
        bail!("vmtest installs packages with apt-get and the tests run as root: run it as root");
    }
    let dir = crate::target_dir()?.join("vmtest");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;

    let t = Instant::now();
    let vng = ensure_host_tools(&dir)?;
    let kernels = ensure_kernels(&dir, &specs)?;
    println!(
        "xtask vmtest: tools and kernels ready in {}",
        secs(t.elapsed())
    );

    let t = Instant::now();
    let binaries = build_test_binaries()?;
    for name in &tests {
        if !binaries.contains_key(name) {
            bail!(
                "no integration test binary `{name}` (have: {})",
                binaries.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    println!("xtask vmtest: test binaries ready in {}", secs(t.elapsed()));

    let kvm = kvm_works(&dir, &vng, &kernels[0])?;
    let mut matrix: Vec<Guest> = Vec::new();
    for kernel in &kernels {
        let t = Instant::now();
        let (cells, notes) = run_guest(&dir, &vng, kernel, &tests, &binaries, args, kvm)?;
        let took = t.elapsed();
        println!(
            "xtask vmtest: kernel {} done in {}",
            kernel.label(),
            secs(took)
        );
        matrix.push(Guest {
            kernel: kernel.label(),
            took,
            cells,
            notes,
        });
    }

    let report = render_matrix(&tests, &matrix, args.cpus, kvm);
    println!("\n{report}");
    let report_path = dir.join("matrix.txt");
    fs::write(&report_path, &report)
        .with_context(|| format!("cannot write {}", report_path.display()))?;
    println!(
        "xtask vmtest: {} in {} (matrix also in {}, guest logs in {})",
        if any_failed(&matrix) {
            "FAILED"
        } else {
            "passed"
        },
        secs(started.elapsed()),
        report_path.display(),
        dir.join("logs").display()
    );
    if any_failed(&matrix) {
        bail!("tests failed in the kernel matrix (see the failures above)");
    }
    Ok(())
}

/// One kernel's column of the matrix.
struct Guest {
    kernel: String,
    took: Duration,
    cells: BTreeMap<String, Cell>,
    /// What happened to the guest itself (a boot that hung and was retried).
    notes: Vec<String>,
}

fn any_failed(matrix: &[Guest]) -> bool {
    matrix
        .iter()
        .flat_map(|g| g.cells.values())
        .any(|c| matches!(c.verdict, Verdict::Fail { .. }))
}

pub(crate) fn secs(d: Duration) -> String {
    format!("{:.0} s", d.as_secs_f64())
}

// ---------------------------------------------------------------------------
// Host tools

/// qemu, busybox, udev and the virtme-ng venv. Returns the venv's `bin/`.
pub(crate) fn ensure_host_tools(dir: &Path) -> Result<PathBuf> {
    ensure_qemu(dir)?;
    // virtme-ng builds its initramfs with busybox.
    ensure_package("busybox", &["busybox-static"])?;
    ensure_udev()?;
    ensure_venv(dir)
}

pub(crate) fn ensure_package(bin: &str, packages: &[&str]) -> Result<()> {
    let what = format!("{bin} ({})", packages.join(" "));
    if let Some(path) = which(bin) {
        step(&what, format_args!("present ({})", path.display()));
        return Ok(());
    }
    step(&what, "missing; installing");
    apt_get_install(&what, &["--no-install-recommends"], packages)?;
    which(bin).with_context(|| format!("installed {} but `{bin}` is not on PATH", packages[0]))?;
    step(&what, "installed");
    Ok(())
}

/// qemu-system-x86. These machines come with bookworm-backports' qemu-utils
/// (10.x), which Breaks bookworm's qemu-system-common (7.2): a plain
/// `apt-get install qemu-system-x86` would remove it. So when a qemu-utils is
/// installed, qemu-system-x86 of the same version is installed, from the
/// system's suites plus their backports (a private sources list: the system's
/// stays as it is).
fn ensure_qemu(dir: &Path) -> Result<()> {
    const WHAT: &str = "qemu-system-x86_64 (qemu-system-x86)";
    if let Some(path) = which("qemu-system-x86_64") {
        step(WHAT, format_args!("present ({})", path.display()));
        return Ok(());
    }
    let utils = probe(Command::new("dpkg-query").args([
        "-W",
        "-f",
        "${db:Status-Abbrev} ${Version}",
        "qemu-utils",
    ]))
    .and_then(|s| s.strip_prefix("ii ").map(|v| v.trim().to_owned()))
    .filter(|v| !v.is_empty());
    let codename = fs::read_to_string("/etc/os-release").ok().and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
            .map(|c| c.trim_matches('"').to_owned())
    });
    match (utils, codename) {
        (Some(version), Some(codename)) if !codename.is_empty() => {
            // From backports (where a `~bpo` qemu-utils came from), qemu
            // and its dependencies come from there, with qemu-utils moving
            // along if backports moved on; else the exact version.
            let wanted: Vec<String> = if version.contains("~bpo") {
                vec![
                    "-t".to_owned(),
                    format!("{codename}-backports"),
                    "qemu-system-x86".to_owned(),
                    "qemu-utils".to_owned(),
                ]
            } else {
                vec![format!("qemu-system-x86={version}")]
            };
            step(
                WHAT,
                format_args!(
                    "missing; installing {} to match the installed qemu-utils {version}",
                    wanted.join(" ")
                ),
            );
            let apt = dir.join("apt-host");
            for sub in ["lists/partial", "cache/archives/partial"] {
                fs::create_dir_all(apt.join(sub))?;
            }
            let sources: String = [
                (MIRROR, codename.clone()),
                (MIRROR, format!("{codename}-updates")),
                (MIRROR, format!("{codename}-backports")),
                (SECURITY_MIRROR, format!("{codename}-security")),
            ]
            .iter()
            .map(|(mirror, suite)| format!("deb [signed-by={KEYRING}] {mirror} {suite} main\n"))
            .collect();
            fs::write(apt.join("sources.list"), sources)?;
            let apt_get = |args: &[&str]| {
                let opt = |k: &str, v: PathBuf| format!("{k}={}", v.display());
                let mut cmd = Command::new("apt-get");
                cmd.env("DEBIAN_FRONTEND", "noninteractive").args([
                    "-o",
                    &opt("Dir::Etc::SourceList", apt.join("sources.list")),
                    "-o",
                    "Dir::Etc::SourceParts=/dev/null",
                    "-o",
                    &opt("Dir::State::Lists", apt.join("lists")),
                    "-o",
                    &opt("Dir::Cache", apt.join("cache")),
                    "-o",
                    "APT::Sandbox::User=root",
                ]);
                cmd.args(args);
                cmd
            };
            run(&mut apt_get(&["-q", "update"]))?;
            // --no-remove: fail rather than take anything away.
            run(
                apt_get(&["install", "-y", "--no-install-recommends", "--no-remove"]).args(&wanted),
            )?;
        }
        _ => {
            step(WHAT, "missing; installing");
            apt_get_install(WHAT, &["--no-install-recommends"], &["qemu-system-x86"])?;
        }
    }
    let path = which("qemu-system-x86_64")
        .context("installed qemu-system-x86 but qemu-system-x86_64 is not on PATH")?;
    step(WHAT, format_args!("installed ({})", path.display()));
    Ok(())
}

/// systemd-udevd, for virtme-ng's guest init: without it the guest's
/// virtio-serial ports have no names and the command's output and exit code
/// are lost. Pinned to the installed libudev1 so that installing it upgrades
/// nothing else; if apt no longer has that version, both move together.
fn ensure_udev() -> Result<()> {
    const WHAT: &str = "udev (systemd-udevd)";
    let udevd = [
        "/lib/systemd/systemd-udevd",
        "/usr/lib/systemd/systemd-udevd",
    ];
    if let Some(path) = udevd.iter().find(|p| Path::new(p).is_file()) {
        step(WHAT, format_args!("present ({path})"));
        return Ok(());
    }
    let libudev = probe(Command::new("dpkg-query").args(["-W", "-f", "${Version}", "libudev1"]))
        .filter(|v| !v.trim().is_empty());
    match libudev {
        Some(version) => {
            let pinned = format!("udev={}", version.trim());
            step(WHAT, format_args!("missing; installing {pinned}"));
            if let Err(err) = apt_get_install(WHAT, &["--no-install-recommends"], &[&pinned]) {
                step(
                    WHAT,
                    format_args!("{err:#}; installing udev and libudev1 together"),
                );
                apt_get_install(WHAT, &["--no-install-recommends"], &["udev", "libudev1"])?;
            }
        }
        None => apt_get_install(WHAT, &["--no-install-recommends"], &["udev"])?,
    }
    if !udevd.iter().any(|p| Path::new(p).is_file()) {
        bail!("installed udev but systemd-udevd is not in /lib/systemd or /usr/lib/systemd");
    }
    step(WHAT, "installed");
    Ok(())
}

/// virtme-ng in `<dir>/venv`. Returns the venv's `bin/` (vng runs
/// `virtme-run` from PATH, so it goes first on the guest runner's PATH).
fn ensure_venv(dir: &Path) -> Result<PathBuf> {
    let what = format!("virtme-ng {VIRTME_NG_VERSION}");
    let venv = dir.join("venv");
    let bin = venv.join("bin");
    let vng = bin.join("vng");
    if let Some(version) = probe(Command::new(&vng).arg("--version"))
        && version.contains(VIRTME_NG_VERSION)
    {
        step(&what, format_args!("present ({})", venv.display()));
        return Ok(bin);
    }
    step(
        &what,
        format_args!("missing; installing in {}", venv.display()),
    );
    if venv.exists() {
        fs::remove_dir_all(&venv).with_context(|| format!("cannot remove {}", venv.display()))?;
    }
    // Debian's python3 first: a pyenv shim on PATH may point anywhere.
    let python = ["/usr/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| which("python3"))
        .context("python3 is not installed (virtme-ng is a Python program)")?;
    let mut make_venv = Command::new(&python);
    make_venv.arg("-m").arg("venv").arg(&venv);
    if run(&mut make_venv).is_err() {
        // Debian splits ensurepip into python3-venv.
        let _ = fs::remove_dir_all(&venv);
        apt_get_install(&what, &["--no-install-recommends"], &["python3-venv"])?;
        run(&mut make_venv)?;
    }
    run(Command::new(bin.join("pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        VIRTME_NG,
    ]))?;
    let version = capture(Command::new(&vng).arg("--version"))?;
    step(&what, format_args!("installed ({})", version.trim()));
    Ok(bin)
}

// ---------------------------------------------------------------------------
// Kernels

/// Apt with its own sources, lists and cache under `<dir>/apt` (amd64) or
/// `<dir>/apt-<arch>`, so that one architecture's lists never shadow another's.
pub(crate) struct Apt {
    dir: PathBuf,
    arch: String,
    updated: bool,
}

impl Apt {
    pub(crate) fn new(dir: &Path, arch: &str) -> Result<Self> {
        let apt = match arch {
            "amd64" => dir.join("apt"),
            _ => dir.join(format!("apt-{arch}")),
        };
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(apt.join(sub))
                .with_context(|| format!("cannot create {}", apt.join(sub).display()))?;
        }
        let sources: String = SUITES
            .iter()
            .map(|suite| format!("deb [signed-by={KEYRING}] {MIRROR} {suite} main\n"))
            .collect();
        fs::write(apt.join("sources.list"), sources)
            .with_context(|| format!("cannot write {}", apt.join("sources.list").display()))?;
        Ok(Self {
            dir: apt,
            arch: arch.to_owned(),
            updated: false,
        })
    }

    pub(crate) fn arch(&self) -> &str {
        &self.arch
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let opt = |k: &str, v: &Path| format!("{k}={}", v.display());
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args([
            "-o",
            &opt("Dir::Etc::SourceList", &self.dir.join("sources.list")),
            "-o",
            "Dir::Etc::SourceParts=/dev/null",
            "-o",
            &opt("Dir::State::Lists", &self.dir.join("lists")),
            "-o",
            &opt("Dir::Cache", &self.dir.join("cache")),
            "-o",
            &format!("APT::Architecture={}", self.arch),
            // Downloads land in our own directory, which _apt may not reach.
            "-o",
            "APT::Sandbox::User=root",
        ]);
        cmd
    }

    fn update(&mut self) -> Result<()> {
        if !self.updated {
            step("kernel package lists", "apt-get update (private sources)");
            run(self.command("apt-get").args(["-q", "update"]))?;
            self.updated = true;
        }
        Ok(())
    }

    /// The first stanza of `apt-cache show PKG` (`name=version` or `name/suite`).
    fn show(&self, pkg: &str) -> Option<BTreeMap<String, String>> {
        let text = probe(self.command("apt-cache").args(["show", pkg]))?;
        let stanza = text.split("\n\n").next()?;
        let mut fields = BTreeMap::new();
        for line in stanza.lines() {
            if let Some((key, value)) = line.split_once(':')
                && !line.starts_with(' ')
            {
                fields.insert(key.to_owned(), value.trim().to_owned());
            }
        }
        Some(fields)
    }
}

fn version_gt(a: &str, b: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .is_ok_and(|s| s.success())
}

pub(crate) fn ensure_kernels(dir: &Path, specs: &[String]) -> Result<Vec<Kernel>> {
    let mut apt: Option<Apt> = None;
    let mut kernels = Vec::new();
    for spec in specs {
        if spec.is_empty() || !spec.chars().all(|c| c.is_ascii_digit() || c == '.') {
            bail!("--kernel {spec:?}: give a version such as 6.1, 6.12, 7.2 or 7");
        }
        let root = dir.join("kernels").join(spec);
        if let Some(kernel) = read_kernel(spec, &root) {
            step(
                &format!("kernel {spec}"),
                format_args!(
                    "cached ({} {}, {})",
                    kernel.version,
                    kernel.suite,
                    root.display()
                ),
            );
            kernels.push(kernel);
            continue;
        }
        let apt = match &mut apt {
            Some(apt) => apt,
            None => apt.insert(Apt::new(dir, "amd64")?),
        };
        kernels.push(fetch_kernel(apt, dir, spec, &root)?);
    }
    Ok(kernels)
}

pub(crate) fn read_kernel(spec: &str, root: &Path) -> Option<Kernel> {
    let text = fs::read_to_string(root.join("kernel.txt")).ok()?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let kernel = Kernel {
        spec: spec.to_owned(),
        release: field("release")?,
        version: field("version")?,
        suite: field("suite")?,
        root: root.to_owned(),
    };
    kernel.vmlinuz().is_file().then_some(kernel)
}

/// Fetches and unpacks the newest kernel of `spec` for `apt`'s architecture into `root`.
pub(crate) fn fetch_kernel(apt: &mut Apt, dir: &Path, spec: &str, root: &Path) -> Result<Kernel> {
    let arch = apt.arch.clone();
    let what = format!("kernel {spec} {arch}");
    apt.update()?;
    // The newest linux-image-<arch> among the suites whose version is the spec.
    let prefix = format!("{spec}.");
    let mut best: Option<(String, String)> = None;
    let mut served = Vec::new();
    for suite in SUITES {
        let Some(version) = apt
            .show(&format!("linux-image-{arch}/{suite}"))
            .and_then(|f| f.get("Version").cloned())
        else {
            continue;
        };
        served.push(format!("{suite} {version}"));
        if version.starts_with(&prefix)
            && best.as_ref().is_none_or(|(_, v)| version_gt(&version, v))
        {
            best = Some((suite.to_string(), version));
        }
    }
    let Some((suite, version)) = best else {
        bail!(
            "Debian serves no {spec}.x kernel in {}; it serves: {}",
            SUITES.join(", "),
            served.join(", ")
        );
    };
    // The metapackage's version-specific dependencies, recursively: the image
    // (6.1: vmlinuz and modules in one package; 7.x: linux-image- depends on
    // linux-binary-, linux-modules- and linux-base- of one version).
    let mut wanted: Vec<String> = Vec::new();
    let mut queue = vec![format!("linux-image-{arch}={version}")];
    while let Some(pkg) = queue.pop() {
        let fields = apt
            .show(&pkg)
            .with_context(|| format!("apt-cache show {pkg} found nothing"))?;
        for dep in fields
            .get("Depends")
            .map(String::as_str)
            .unwrap_or("")
            .split(',')
        {
            // The first alternative; `name (= version)` or `name (>= version)` or `name`.
            let first = dep.split('|').next().unwrap_or("").trim();
            let name = first.split([' ', '(']).next().unwrap_or("");
            let versioned = name.starts_with("linux-")
                && name.chars().any(|c| c.is_ascii_digit())
                && !name.ends_with("-dbg");
            if !versioned {
                continue;
            }
            let exact = first
                .split_once("(=")
                .map(|(_, v)| v.trim_end_matches(')').trim().to_owned());
            let spec = match exact {
                Some(v) => format!("{name}={v}"),
                None => format!("{name}/{suite}"),
            };
            if !wanted.contains(&spec) {
                wanted.push(spec.clone());
                queue.push(spec);
            }
        }
    }
    if wanted.is_empty() {
        bail!("linux-image-{arch}={version} ({suite}) depends on no kernel package");
    }
    step(
        &what,
        format_args!("fetching {version} from {suite}: {}", wanted.join(" ")),
    );

    let staging = dir.join("kernels").join(format!(
        ".{}.tmp",
        root.file_name()
            .map_or_else(|| spec.into(), |n| n.to_string_lossy())
    ));
    if staging.exists() {
        fs::remove_dir_all(&staging)
            .with_context(|| format!("cannot remove {}", staging.display()))?;
    }
    let debs = staging.join("debs");
    let unpacked = staging.join("x");
    fs::create_dir_all(&debs).with_context(|| format!("cannot create {}", debs.display()))?;
    run(apt
        .command("apt-get")
        .current_dir(&debs)
        .arg("-q")
        .arg("download")
        .args(&wanted))?;
    for deb in fs::read_dir(&debs)? {
        let deb = deb?.path();
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    }
    // Modules under lib/modules (6.1) or usr/lib/modules (7.x); vmlinuz in
    // boot/ (6.1) or next to the modules (7.x).
    let modules_parent = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| unpacked.join(p))
        .find(|p| p.is_dir())
        .context("the kernel packages have no lib/modules")?;
    let release = fs::read_dir(&modules_parent)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.ends_with(&format!("-{arch}")))
        .with_context(|| format!("no lib/modules/<release>-{arch} in the kernel packages"))?;
    let vmlinuz = [
        unpacked.join("boot").join(format!("vmlinuz-{release}")),
        modules_parent.join(&release).join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .with_context(|| format!("no vmlinuz for {release} in the kernel packages"))?;

    let out = staging.join("out");
    fs::create_dir_all(out.join("boot"))?;
    fs::create_dir_all(out.join("lib/modules"))?;
    fs::rename(
        &vmlinuz,
        out.join("boot").join(format!("vmlinuz-{release}")),
    )?;
    fs::rename(
        modules_parent.join(&release),
        out.join("lib/modules").join(&release),
    )?;
    // The packages leave modules.dep to their postinst; modprobe in the guest needs it.
    run(Command::new("depmod").arg("-b").arg(&out).arg(&release))?;
    fs::write(
        out.join("kernel.txt"),
        format!("release={release}\nversion={version}\nsuite={suite}\n"),
    )?;
    if root.exists() {
        fs::remove_dir_all(root).with_context(|| format!("cannot remove {}", root.display()))?;
    }
    fs::rename(&out, root)
        .with_context(|| format!("cannot move {} to {}", out.display(), root.display()))?;
    fs::remove_dir_all(&staging).with_context(|| format!("cannot remove {}", staging.display()))?;
    let kernel = read_kernel(spec, root).context("the unpacked kernel is incomplete")?;
    step(
        &what,
        format_args!(
            "{} ({version} {suite}) in {}",
            kernel.release,
            root.display()
        ),
    );
    Ok(kernel)
}

// ---------------------------------------------------------------------------
// Test binaries

/// Builds the integration tests like the host suite does (same profile and
/// packages, so nothing is rebuilt after it) and returns name -> executable.
fn build_test_binaries() -> Result<BTreeMap<String, PathBuf>> {
    let mut cargo = stable_cargo();
    cargo.args([
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "tcpstate-ebpf",
        "--no-run",
        "--message-format=json",
    ]);
    println!("xtask vmtest: {}", show(&cargo));
    let out = cargo
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{}`", show(&cargo)))?;
    if !out.status.success() {
        bail!("`{}` failed ({})", show(&cargo), out.status);
    }
    let mut binaries = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == true
            && msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(name), Some(exe)) = (
            is_test,
            msg["target"]["name"].as_str(),
            msg["executable"].as_str(),
        ) {
            binaries.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    if binaries.is_empty() {
        bail!("`{}` listed no integration test executable", show(&cargo));
    }
    Ok(binaries)
}

// ---------------------------------------------------------------------------
// Guests

/// The vng command that boots `kernel` and runs `script` in it.
fn vng_command(
    vng_bin: &Path,
    kernel: &Kernel,
    cpus: u32,
    memory: &str,
    kvm: bool,
    exec: &str,
) -> Command {
    let mut cmd = vng_base(vng_bin, kernel, cpus, memory, kvm);
    cmd.args([
        "--cwd",
        &workspace_root().join("tcpstate").to_string_lossy(),
    ]);
    cmd.args(["--exec", exec]);
    cmd
}

/// vng booting `kernel` over 9p (TCG unless `kvm`), with the venv's `bin/` first on its PATH
/// (vng runs `virtme-run` from there); the caller adds the root and what runs.
pub(crate) fn vng_base(
    vng_bin: &Path,
    kernel: &Kernel,
    cpus: u32,
    memory: &str,
    kvm: bool,
) -> Command {
    let mut cmd = Command::new(vng_bin.join("vng"));
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut new_path = std::ffi::OsString::from(vng_bin);
    new_path.push(":");
    new_path.push(path);
    cmd.env("PATH", new_path)
        .arg("--run")
        .arg(kernel.vmlinuz())
        .args(["--cpus", &cpus.to_string(), "--memory", memory])
        // The generic kernels have 9p; virtiofsd is not in bookworm.
        .arg("--force-9p");
    if !kvm {
        cmd.arg("--disable-kvm");
    }
    cmd
}

/// Runs `cmd`, reading its stdout and stderr line by line until it exits or
/// `timeout` passes (then its process group is killed). Each line goes to
/// `on_line` with the time since start. Returns the exit code (None: killed
/// or signalled).
pub(crate) fn run_streaming(
    cmd: &mut Command,
    timeout: Duration,
    on_line: impl FnMut(&str),
) -> Result<Option<i32>> {
    let watch = Watch {
        total: timeout,
        ..Watch::default()
    };
    Ok(match run_watched(cmd, &watch, on_line)? {
        Ended::Exited(code) => code,
        Ended::Killed(_) => None,
    })
}

/// When to give up on a guest.
#[derive(Default)]
pub(crate) struct Watch {
    /// The whole run.
    pub total: Duration,
    /// A line containing `.0` must come within `.1`: a guest that has not
    /// reached its script by then hung in its boot (seen once in CI: 6.12
    /// under TCG printed nothing for the whole 30 minutes).
    pub boot: Option<(&'static str, Duration)>,
    /// No line at all for this long: the guest is dead.
    pub silence: Option<Duration>,
}

/// Why a run ended.
#[derive(Debug, PartialEq)]
pub(crate) enum Ended {
    Exited(Option<i32>),
    Killed(Killed),
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Clone, Copy)]
pub(crate) enum Killed {
    Timeout,
    NotBooted,
    Silent,
}

/// [`run_streaming`] with a boot and a silence watchdog.
pub(crate) fn run_watched(
    cmd: &mut Command,
    watch: &Watch,
    mut on_line: impl FnMut(&str),
) -> Result<Ended> {
    let shown = show(cmd);
    // Its own process group, so a timeout kills qemu too. stdin from
    // /dev/null: qemu's stdio chardev must not read the terminal.
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("could not start `{shown}`"))?;
    let (tx, rx) = mpsc::channel::<String>();
    let pipe = |reader: Box<dyn Read + Send>, tx: mpsc::Sender<String>| {
        std::thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        if tx
                            .send(line.trim_end_matches(['\n', '\r']).to_owned())
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        })
    };
    let out = pipe(Box::new(child.stdout.take().expect("piped")), tx.clone());
    let err = pipe(Box::new(child.stderr.take().expect("piped")), tx);
    let start = Instant::now();
    let mut last_line = start;
    let mut booted = watch.boot.is_none();
    let mut killed = None;
    loop {
        let now = Instant::now();
        let mut deadline = (start + watch.total, Killed::Timeout);
        if let Some((_, within)) = watch.boot.filter(|_| !booted) {
            deadline = deadline.min((start + within, Killed::NotBooted));
        }
        if let Some(silence) = watch.silence {
            deadline = deadline.min((last_line + silence, Killed::Silent));
        }
        let left = deadline.0.saturating_duration_since(now);
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => {
                last_line = Instant::now();
                if let Some((marker, _)) = watch.boot {
                    booted |= line.contains(marker);
                }
                on_line(&line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() < deadline.0 {
                    continue;
                }
                killed = Some(deadline.1);
                // SAFETY: signalling the process group we created.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                break;
            }
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    let _ = out.join();
    let _ = err.join();
    for line in rx.try_iter() {
        on_line(&line);
    }
    let Some(killed) = killed else {
        return Ok(Ended::Exited(status.code()));
    };
    on_line(&format!(
        "xtask vmtest: guest killed after {}: {}",
        secs(start.elapsed()),
        match killed {
            Killed::Timeout => "its time was up".to_owned(),
            Killed::NotBooted => format!(
                "it did not reach its script (no `{}` line)",
                watch.boot.map(|(m, _)| m).unwrap_or_default()
            ),
            Killed::Silent => format!(
                "it printed nothing for {}",
                secs(watch.silence.unwrap_or_default())
            ),
        }
    ));
    Ok(Ended::Killed(killed))
}

/// Whether KVM boots a guest here. `/dev/kvm` can exist and still not run a
/// normal kernel (a nested "PVM" hypervisor hangs or aborts), so a tiny guest
/// is tried once; the verdict is cached per host kernel.
pub(crate) fn kvm_works(dir: &Path, vng: &Path, kernel: &Kernel) -> Result<bool> {
    const WHAT: &str = "KVM";
    if !Path::new("/dev/kvm").exists() {
        step(WHAT, "no /dev/kvm; guests run under QEMU's TCG (emulation)");
        return Ok(false);
    }
    let host = probe(Command::new("uname").arg("-r")).unwrap_or_default();
    let cache = dir.join(format!("kvm-probe-{}.txt", host.trim()));
    if let Ok(verdict) = fs::read_to_string(&cache) {
        let works = verdict.trim() == "works";
        step(
            WHAT,
            format_args!(
                "{} (probed before: {})",
                if works {
                    "works"
                } else {
                    "does not boot a guest; using TCG"
                },
                cache.display()
            ),
        );
        return Ok(works);
    }
    step(
        WHAT,
        "/dev/kvm exists; probing with a tiny guest (60 s at most)",
    );
    let mut cmd = vng_command(vng, kernel, 1, "1G", true, "echo vmtest-kvm-ok");
    let mut seen = false;
    let code = run_streaming(&mut cmd, Duration::from_secs(60), |line| {
        seen |= line.contains("vmtest-kvm-ok");
    })?;
    let works = seen && code == Some(0);
    fs::write(&cache, if works { "works\n" } else { "fails\n" })
        .with_context(|| format!("cannot write {}", cache.display()))?;
    step(
        WHAT,
        if works {
            "works"
        } else {
            "does not boot a guest; using TCG"
        },
    );
    Ok(works)
}

/// Shell-quotes for the guest's /bin/sh.
pub(crate) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The guest script: load the sock_diag modules, mount tracefs, run each
/// binary between markers.
fn guest_script(tests: &[(String, PathBuf, Vec<String>)]) -> String {
    let mut s = String::from("#!/bin/sh\n");
    // The host's environment does not reach the guest: PATH (ip, ss, python3,
    // prometheus...) and HOME are passed here.
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let _ = writeln!(
        s,
        "export PATH={} HOME={}",
        sh_quote(&path),
        sh_quote(&home)
    );
    s.push_str("export RUST_BACKTRACE=0\n");
    // The guest's shell starts with 1024 open files; the tests are written
    // for the host's limit (reconcile holds more than 1024 sockets).
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 && limit.rlim_cur > 1024 {
        let _ = writeln!(
            s,
            "ulimit -n {} || echo \"@@vmtest setup-failed ulimit -n {}\"",
            limit.rlim_cur, limit.rlim_cur
        );
    }
    s.push_str("echo \"@@vmtest kernel $(uname -r) cpus $(nproc)\"\n");
    // Tests that take a branch by what the host allows (fexit is refused where ftrace is
    // locked down) must take the full one on the matrix's stock kernels.
    s.push_str("export TCPSTATE_IN_VM=1\n");
    // Debian's kernels build inet_diag/tcp_diag as modules: without them
    // sock_diag finds nothing.
    s.push_str(
        "for m in inet_diag tcp_diag; do modprobe $m || echo \"@@vmtest setup-failed modprobe $m\"; done\n",
    );
    s.push_str(
        "[ -d /sys/kernel/tracing/events ] || mount -t tracefs tracefs /sys/kernel/tracing \
         || echo \"@@vmtest setup-failed mount tracefs\"\n",
    );
    for (name, exe, skips) in tests {
        let _ = writeln!(s, "echo \"@@vmtest begin {name}\"");
        let mut line = format!("{} --test-threads 2", sh_quote(&exe.to_string_lossy()));
        for skip in skips {
            let _ = write!(line, " --skip {}", sh_quote(skip));
        }
        // libtest takes `--exact` once, for every filter: a skip must not hide a test whose
        // name merely contains it.
        if !skips.is_empty() {
            line.push_str(" --exact");
        }
        // A hung binary must not eat the whole guest's time. Its output is kept to find the
        // tests that failed.
        let out = format!("/tmp/vmtest-{name}.out");
        let _ = writeln!(
            s,
            "timeout -k 10 {BINARY_TIMEOUT_SECS} {line} > {out} 2>&1; rc=$?; cat {out}; echo \"@@vmtest end {name} $rc\""
        );
        // Under emulation the kernel defers softirq work to ksoftirqd at random, and a test's
        // timing or context assumption can lose once in many runs. Tests that failed (and
        // only those: not a crash or a timeout) run once more, alone; the matrix shows them as
        // flaky with the first failure's message, and a second failure fails the kernel.
        let _ = writeln!(
            s,
            "failed=$(sed -n 's/^test \\([^ ]*\\) \\.\\.\\. FAILED$/\\1/p' {out}); \
             if [ \"$rc\" != 124 ] && [ \"$rc\" != 137 ] && [ -n \"$failed\" ]; then \
             echo \"@@vmtest retry {name}\"; \
             timeout -k 10 {BINARY_TIMEOUT_SECS} {exe} --test-threads 1 --exact $failed 2>&1; \
             echo \"@@vmtest retried {name} $?\"; fi",
            exe = sh_quote(&exe.to_string_lossy()),
        );
    }
    s.push_str("echo \"@@vmtest done\"\n");
    s
}

/// What one binary printed, being parsed.
#[derive(Default)]
struct Parse {
    begin: Option<Instant>,
    end: Option<(Instant, i32)>,
    passed: u32,
    failed: Vec<String>,
    summary: Option<String>,
    /// test name -> panic message lines.
    panics: BTreeMap<String, Vec<String>>,
    current_panic: Option<String>,
    /// The daemon's own error lines (why it did not start), deduplicated.
    daemon_errors: Vec<String>,
}

fn run_guest(
    dir: &Path,
    vng: &Path,
    kernel: &Kernel,
    tests: &[String],
    binaries: &BTreeMap<String, PathBuf>,
    args: &VmtestArgs,
    kvm: bool,
) -> Result<(BTreeMap<String, Cell>, Vec<String>)> {
    let (major, minor) = kernel.major_minor();
    let mut notes = Vec::new();
    let mut cells: BTreeMap<String, Cell> = BTreeMap::new();
    let mut to_run = Vec::new();
    for name in tests {
        let mut whole = None;
        let mut skips = Vec::new();
        for na in NOT_APPLICABLE.iter().filter(|na| (major, minor) < na.below) {
            if na.test == name {
                whole = Some(na.reason.to_owned());
            } else if let Some(test) = na.test.strip_prefix(&format!("{name}::")) {
                skips.push((test.to_owned(), na.reason.to_owned()));
            }
        }
        if let Some(reason) = whole {
            cells.insert(
                name.clone(),
                Cell {
                    verdict: Verdict::NotApplicable(reason),
                    time: None,
                    not_applicable: Vec::new(),
                },
            );
            continue;
        }
        let skip_names = skips.iter().map(|(t, _)| t.clone()).collect();
        to_run.push((name.clone(), binaries[name].clone(), skip_names));
        cells.insert(
            name.clone(),
            Cell {
                verdict: Verdict::Fail {
                    passed: 0,
                    failed: Vec::new(),
                    why: "did not run (the guest ended before it)".into(),
                },
                time: None,
                not_applicable: skips,
            },
        );
    }
    if to_run.is_empty() {
        return Ok((cells, notes));
    }

    let script_path = dir.join(format!("guest-{}.sh", kernel.spec));
    fs::write(&script_path, guest_script(&to_run))
        .with_context(|| format!("cannot write {}", script_path.display()))?;
    let logs = dir.join("logs");
    fs::create_dir_all(&logs)?;
    let log_path = logs.join(format!("{}.log", kernel.spec));
    let mut log = fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;

    println!(
        "\n==> xtask vmtest: kernel {} ({}), {} vCPUs, {}; {} (log: {})",
        kernel.label(),
        kernel.release,
        args.cpus,
        if kvm { "KVM" } else { "TCG" },
        to_run
            .iter()
            .map(|(n, _, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        log_path.display()
    );
    let mut cmd = vng_command(
        vng,
        kernel,
        args.cpus,
        &args.memory,
        kvm,
        &format!("sh {}", sh_quote(&script_path.to_string_lossy())),
    );
    let _ = writeln!(log, "$ {}", show(&cmd));

    let watch = Watch {
        total: args.timeout,
        boot: Some((BOOTED_MARKER, boot_within(args.cpus))),
        silence: Some(SILENCE_LIMIT),
    };
    let mut boots = 0;
    let (parses, setup_failures, done, code) = loop {
        boots += 1;
        let boot = Instant::now();
        let mut parses: BTreeMap<String, Parse> = BTreeMap::new();
        let mut current: Option<String> = None;
        let mut setup_failures: Vec<String> = Vec::new();
        let mut done = false;
        let mut booted = false;
        let ended = run_watched(&mut cmd, &watch, |line| {
            let _ = writeln!(log, "{line}");
            let now = Instant::now();
            if let Some(marker) = line.trim().strip_prefix("@@vmtest ") {
                println!("[{}] +{} {line}", kernel.spec, secs(boot.elapsed()));
                let mut words = marker.split_whitespace();
                match words.next() {
                    Some("kernel") => booted = true,
                    Some("begin") => {
                        let name = words.next().unwrap_or_default().to_owned();
                        parses.entry(name.clone()).or_default().begin = Some(now);
                        current = Some(name);
                    }
                    Some("end") => {
                        let name = words.next().unwrap_or_default();
                        let rc = words.next().and_then(|w| w.parse().ok()).unwrap_or(-1);
                        parses.entry(name.to_owned()).or_default().end = Some((now, rc));
                        current = None;
                    }
                    Some("retry") => {
                        let name = retry_key(words.next().unwrap_or_default());
                        parses.entry(name.clone()).or_default().begin = Some(now);
                        current = Some(name);
                    }
                    Some("retried") => {
                        let name = retry_key(words.next().unwrap_or_default());
                        let rc = words.next().and_then(|w| w.parse().ok()).unwrap_or(-1);
                        parses.entry(name).or_default().end = Some((now, rc));
                        current = None;
                    }
                    Some("setup-failed") => setup_failures.push(marker.to_owned()),
                    Some("done") => done = true,
                    _ => {}
                }
                return;
            }
            let Some(p) = current.as_ref().and_then(|c| parses.get_mut(c)) else {
                return;
            };
            parse_libtest_line(p, line, &kernel.spec);
        })?;
        let _ = writeln!(log, "[vng ended: {ended:?}]");
        match ended {
            Ended::Killed(Killed::NotBooted) if boots < BOOTS => {
                println!(
                    "[{}] the guest did not reach its script in {}; booting it again (log: {})",
                    kernel.spec,
                    secs(boot_within(args.cpus)),
                    log_path.display()
                );
                notes.push(format!(
                    "boot {boots} hung (no output in {}); booted again",
                    secs(boot_within(args.cpus))
                ));
            }
            Ended::Killed(why) => {
                notes.push(format!("guest killed: {why:?}"));
                break (parses, setup_failures, done, None);
            }
            // Under TCG a boot also dies outright, vng exiting 255 with no line from the
            // guest (twice in eight boots of 6.1 here, about 90 s in): nothing ran, so it is a
            // boot to do again, not a failed kernel.
            Ended::Exited(code) if !booted && boots < BOOTS => {
                println!(
                    "[{}] the guest ended before its script (vng exit {code:?}); booting it again \
                     (log: {})",
                    kernel.spec,
                    log_path.display()
                );
                notes.push(format!(
                    "boot {boots} ended before its script (vng exit {code:?}); booted again"
                ));
            }
            Ended::Exited(code) => break (parses, setup_failures, done, code),
        }
    };

    for (name, _, _) in &to_run {
        let Some(p) = parses.get(name) else {
            if let Some(cell) = cells.get_mut(name) {
                cell.verdict = Verdict::Fail {
                    passed: 0,
                    failed: Vec::new(),
                    why: format!(
                        "did not run: the guest ended first (vng exit {code:?}, {}; log {})",
                        if done {
                            "script done"
                        } else {
                            "script not done"
                        },
                        log_path.display()
                    ),
                };
            }
            continue;
        };
        let cell = cells.get_mut(name).expect("inserted above");
        cell.time = match (p.begin, p.end) {
            (Some(b), Some((e, _))) => Some(e - b),
            (Some(b), None) => Some(b.elapsed()),
            _ => None,
        };
        let mut why = Vec::new();
        if !setup_failures.is_empty() {
            why.push(setup_failures.join("; "));
        }
        match p.end {
            None => why.push("did not finish (guest timed out or died)".to_owned()),
            Some((_, 124 | 137)) => {
                why.push(format!("timed out in the guest ({BINARY_TIMEOUT_SECS} s)"));
            }
            Some((_, 0)) => {}
            Some((_, rc)) => why.push(format!("exit code {rc}")),
        }
        match &p.summary {
            None => why.push("no libtest summary line".to_owned()),
            Some(s) if !s.contains("test result: ok") => why.push(s.clone()),
            Some(_) => {}
        }
        for failed in &p.failed {
            let message = p
                .panics
                .get(failed)
                .map(|m| m.join(" | "))
                .unwrap_or_else(|| "(no panic message seen)".to_owned());
            why.push(format!("{failed}: {message}"));
        }
        if !why.is_empty() {
            why.extend(p.daemon_errors.iter().map(|e| format!("daemon said: {e}")));
        }
        // Failed tests that passed when run once more, alone, and nothing else wrong.
        // Counted from the summary line: the daemon's own output (its summary on SIGTERM)
        // can land between "test x ... " and its "ok", which then has a line of its own.
        let retried = parses.get(&retry_key(name)).filter(|r| {
            r.end.is_some_and(|(_, rc)| rc == 0)
                && r.failed.is_empty()
                && r.summary.as_deref().is_some_and(|s| {
                    s.contains("test result: ok") && summary_passed(s) == Some(p.failed.len())
                })
        });
        let only_tests_failed = p.summary.is_some()
            && setup_failures.is_empty()
            && !matches!(p.end, None | Some((_, 124 | 137)));
        cell.verdict = if why.is_empty() && p.failed.is_empty() {
            Verdict::Pass { passed: p.passed }
        } else if let Some(r) = retried.filter(|_| only_tests_failed && !p.failed.is_empty()) {
            Verdict::Flaky {
                passed: p.passed
                    + r.summary.as_deref().and_then(summary_passed).unwrap_or(0) as u32,
                flaky: p.failed.clone(),
                why: why.join("\n      "),
            }
        } else {
            Verdict::Fail {
                passed: p.passed,
                failed: p.failed.clone(),
                why: why.join("\n      "),
            }
        };
    }
    Ok((cells, notes))
}

/// The "N passed" of a libtest summary line ("test result: ok. 1 passed; 0 failed; ...").
fn summary_passed(summary: &str) -> Option<usize> {
    let part = summary.split(';').next()?.trim().strip_suffix(" passed")?;
    part.rsplit(' ').next()?.parse().ok()
}

/// One line of libtest output (with the daemon's stderr interleaved).
fn parse_libtest_line(p: &mut Parse, line: &str, spec: &str) {
    let trimmed = line.trim();
    if let Some(pos) = trimmed.find("tcpstate: error:") {
        let error: String = trimmed[pos..].chars().take(300).collect();
        if p.daemon_errors.len() < 3 && !p.daemon_errors.contains(&error) {
            p.daemon_errors.push(error);
        }
    }
    // "test foo::bar ... ok" / "... FAILED" / "... ignored"; another
    // process's output can precede it on the same line.
    if let Some(pos) = line.find("test ")
        && let Some((name, result)) = line[pos + 5..].split_once(" ... ")
        && !name.contains(' ')
    {
        match result.trim() {
            "ok" => p.passed += 1,
            r if r.starts_with("FAILED") => {
                println!("[{spec}] {trimmed}");
                if !p.failed.iter().any(|f| f == name) {
                    p.failed.push(name.to_owned());
                }
            }
            _ => {}
        }
        return;
    }
    if trimmed.starts_with("test result:") {
        println!("[{spec}] {trimmed}");
        p.summary = Some(trimmed.to_owned());
        return;
    }
    // "---- name stdout ----" starts a failed test's captured output.
    if let Some(rest) = trimmed.strip_prefix("---- ")
        && let Some(name) = rest.strip_suffix(" stdout ----")
    {
        p.current_panic = Some(name.to_owned());
        return;
    }
    if trimmed == "failures:" || trimmed.starts_with("successes:") {
        p.current_panic = None;
        return;
    }
    if let Some(name) = &p.current_panic {
        // Keep the panic line and the assertion message after it.
        let lines = p.panics.entry(name.clone()).or_default();
        let keep = trimmed.contains("panicked at")
            || (!lines.is_empty() && lines.len() < 8 && !trimmed.starts_with("note:"));
        if keep && !trimmed.is_empty() {
            lines.push(trimmed.chars().take(400).collect());
        }
    }
}

fn render_matrix(tests: &[String], matrix: &[Guest], cpus: u32, kvm: bool) -> String {
    let mut out = format!(
        "Kernel matrix ({cpus} vCPUs, {}, --test-threads 2):\n\n",
        if kvm { "KVM" } else { "QEMU TCG" }
    );
    let mut header = vec!["test binary".to_owned()];
    header.extend(
        matrix
            .iter()
            .map(|g| format!("{} [{}]", g.kernel, secs(g.took))),
    );
    let mut rows = vec![header];
    for test in tests {
        let mut row = vec![test.clone()];
        for g in matrix {
            let cell = &g.cells[test];
            let time = cell
                .time
                .map(|t| format!(", {}", secs(t)))
                .unwrap_or_default();
            let na = if cell.not_applicable.is_empty() {
                String::new()
            } else {
                format!(", {} n/a", cell.not_applicable.len())
            };
            row.push(match &cell.verdict {
                Verdict::Pass { passed } => format!("pass {passed}{na}{time}"),
                Verdict::Fail { passed, failed, .. } => {
                    format!("FAIL: {} failed, {passed} passed{na}{time}", failed.len())
                }
                Verdict::NotApplicable(reason) => format!("not applicable: {reason}"),
                Verdict::Flaky { passed, flaky, .. } => {
                    format!("pass {passed}{na}{time}, {} flaky", flaky.len())
                }
            });
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "  {}", line.join(" | ").trim_end());
    }
    let mut details = String::new();
    for Guest {
        kernel,
        cells,
        notes,
        ..
    } in matrix
    {
        for note in notes {
            let _ = writeln!(details, "  {kernel}: {note}");
        }
        for (test, cell) in cells {
            match &cell.verdict {
                Verdict::Fail { why, .. } => {
                    let _ = writeln!(details, "  {kernel} {test}:\n      {why}");
                }
                Verdict::Flaky { flaky, why, .. } => {
                    let _ = writeln!(
                        details,
                        "  {kernel} {test}: FLAKY, passed when run again alone: {}\n      first run: {why}",
                        flaky.join(", ")
                    );
                }
                _ => {}
            }
            for (t, reason) in &cell.not_applicable {
                let _ = writeln!(details, "  {kernel} {test}::{t}: not applicable: {reason}");
            }
        }
    }
    if !details.is_empty() {
        let _ = write!(out, "\nDetails:\n{details}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest that never reaches its script, or goes quiet, is killed then, not at the end
    /// of its whole time (6.12 under TCG once printed nothing for 30 minutes in CI).
    #[test]
    fn a_hung_boot_and_a_silent_guest_are_killed_early() {
        let run = |script: &str, watch: Watch| {
            let start = Instant::now();
            let mut lines = Vec::new();
            let ended = run_watched(Command::new("sh").args(["-c", script]), &watch, |l| {
                lines.push(l.to_owned());
            })
            .expect("sh runs");
            (ended, start.elapsed(), lines)
        };
        let watch = || Watch {
            total: Duration::from_secs(30),
            boot: Some(("@@booted", Duration::from_millis(300))),
            silence: Some(Duration::from_millis(600)),
        };
        let (ended, took, lines) = run("echo starting; sleep 20", watch());
        assert_eq!(ended, Ended::Killed(Killed::NotBooted), "{lines:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
        assert!(lines.iter().any(|l| l.contains("did not reach its script")));

        let (ended, took, _) = run("echo @@booted; sleep 0.2; echo a; sleep 20", watch());
        assert_eq!(ended, Ended::Killed(Killed::Silent));
        assert!(took < Duration::from_secs(10), "{took:?}");

        let (ended, _, lines) = run(
            "echo @@booted; for i in 1 2 3 4 5; do sleep 0.2; echo $i; done; exit 3",
            watch(),
        );
        assert_eq!(ended, Ended::Exited(Some(3)), "{lines:?}");
        assert_eq!(lines.len(), 6);
    }

    /// The guest script runs a binary, and its failed tests once more alone: checked with a
    /// fake binary that fails `flaky` on its first run only.
    #[test]
    fn failed_tests_run_once_more_alone() {
        let dir = std::env::temp_dir().join(format!("vmtest-script-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let exe = dir.join("fake");
        let state = dir.join("ran");
        std::fs::write(
            &exe,
            format!(
                "#!/bin/sh\necho \"args: $*\"\nif [ -e {s} ]; then echo 'test flaky ... ok'; \
                 echo 'test result: ok. 1 passed; 0 failed'; exit 0; fi\ntouch {s}\n\
                 echo 'test steady ... ok'\necho 'test flaky ... FAILED'\n\
                 echo 'test result: FAILED. 1 passed; 1 failed'\nexit 101\n",
                s = state.display()
            ),
        )
        .expect("write");
        let script = guest_script(&[("fake".to_owned(), exe.clone(), Vec::new())]);
        let script = script.replace("mount -t tracefs", "true");
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("chmod +x {}; {script}", exe.display()))
            .output()
            .expect("sh");
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        std::fs::remove_dir_all(&dir).ok();
        assert!(out.contains("@@vmtest end fake 101"), "{out}");
        assert!(out.contains("@@vmtest retry fake"), "{out}");
        assert!(
            out.contains("args: --test-threads 1 --exact flaky"),
            "{out}"
        );
        assert!(out.contains("@@vmtest retried fake 0"), "{out}");
        let mut p = Parse::default();
        for line in out.lines() {
            parse_libtest_line(&mut p, line, "test");
        }
        assert!(p.failed.contains(&"flaky".to_owned()));
    }

    /// A retried test whose "ok" the daemon's summary pushed onto a line of its own (6.1 in
    /// CI): the summary line still says it passed.
    #[test]
    fn a_retry_passes_by_its_summary_line() {
        let mut p = Parse::default();
        for line in [
            "running 1 test",
            "test fin_wait2_anomaly_on_a_half_closed_client ... sockets by state: TIME_WAIT=1",
            "failed connects 0, resets 0, anomalies raised 1 (open 0)",
            "ok",
            "",
            "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 7 filtered out; finished in 5.10s",
        ] {
            parse_libtest_line(&mut p, line, "test");
        }
        assert_eq!(p.passed, 0, "the split line is not counted");
        assert_eq!(p.summary.as_deref().and_then(summary_passed), Some(1));
        assert_eq!(
            summary_passed("test result: FAILED. 7 passed; 1 failed"),
            Some(7)
        );
        assert_eq!(summary_passed("no summary"), None);
    }
}
