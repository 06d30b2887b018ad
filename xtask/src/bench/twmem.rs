//! The TIME_WAIT memory run: N TIME_WAIT sockets made in a namespace first (clients close
//! first, to 64 loopback addresses so no connect searches a crowded port range), then the
//! daemon started on it, seeding them and reconciling every 4 s with a full dump each time.
//! Then it watches them expire, all within the same 10 s, 60 s after they were made: every
//! one is then due for the sweep and missing from the next dump at once.
//! Peak RSS (VmHWM) against the table's own bytes is the figure: every socket is held once in
//! the table, and a dump, seed or sweep must not hold the whole host again beside it, nor
//! keep what the burst needed once it is gone (issue 21.10).

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::churn::in_netns;
use super::memory::{field, free_loopback_port, wait_for_status_of};
use super::netns::Netns;
use super::procstat;
use super::tracer::ChildGuard;
use crate::cmd::show;

/// Threads making connections; each has its own listener and 16 destination addresses.
const MAKERS: u16 = 4;
const FIRST_PORT: u16 = 7000;
/// How long the daemon runs after its seed: five full reconciliations.
const WATCH: Duration = Duration::from_secs(20);

#[derive(Debug, serde::Serialize)]
pub struct TwMemResult {
    pub command: String,
    pub made: u64,
    pub made_in_s: f64,
    pub tracked_timewait: u64,
    pub table_bytes: u64,
    /// VmHWM once the seed is in, after the reconciliations, and once the burst expired.
    pub peak_kib_after_seed: u64,
    pub peak_kib: u64,
    pub peak_kib_expiry: u64,
    /// VmRSS after the reconciliations, and once the table is empty again.
    pub rss_kib_full: u64,
    pub rss_kib_end: u64,
    /// Seconds from the kernel's last TIME_WAIT gone (sockstat, polled every 500 ms) to the
    /// daemon's count reaching 0; None if either did not within the watch.
    pub emptied_lag_s: Option<f64>,
}

impl TwMemResult {
    pub fn markdown(&self) -> String {
        let mb = |kib: u64| kib as f64 / 1024.0;
        let table_mb = self.table_bytes as f64 / 1048576.0;
        let lag = self
            .emptied_lag_s
            .map_or_else(|| "did not empty".to_owned(), |s| format!("{s:.1} s"));
        format!(
            "\n## TIME_WAIT memory\n\n{} TIME_WAIT made in {:.0} s, then `{}`; {} tracked. \
             They expire together 60 s after they were made.\n\n\
             | table | peak RSS after the seed | after 5 full reconciliations (RSS) | through the expiry | × table | RSS once expired | table emptied after the kernel's |\n\
             | --- | --- | --- | --- | --- | --- | --- |\n\
             | {table_mb:.1} MB | {:.1} MB | {:.1} MB ({:.1} MB) | {:.1} MB | {:.2} | {:.1} MB | {lag} |\n",
            self.made,
            self.made_in_s,
            self.command,
            self.tracked_timewait,
            mb(self.peak_kib_after_seed),
            mb(self.peak_kib),
            mb(self.rss_kib_full),
            mb(self.peak_kib_expiry),
            mb(self.peak_kib_expiry) / table_mb.max(f64::MIN_POSITIVE),
            mb(self.rss_kib_end),
        )
    }
}

pub fn run(tcpstate: &Path, dir: &Path, count: u64) -> Result<TwMemResult> {
    let netns = Netns::create_named("bench-twmem")?;
    netns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    netns.sysctl(
        "net.ipv4.tcp_max_tw_buckets",
        &(count * 2).max(1024).to_string(),
    )?;
    // A connect must not take over a TIME_WAIT tuple: every one made stays.
    netns.sysctl("net.ipv4.tcp_tw_reuse", "0")?;
    eprintln!("bench: TIME_WAIT memory run: making {count} TIME_WAIT sockets");
    let started = Instant::now();
    let made = make_timewait(&netns, count)?;
    let made_in_s = started.elapsed().as_secs_f64();
    eprintln!("bench: TIME_WAIT memory run: {made} made in {made_in_s:.1} s");

    let addr = free_loopback_port()?;
    let netns_path = format!("/run/netns/{}", netns.name());
    let mut cmd = Command::new(tcpstate);
    cmd.args(["run", "--quiet", "--metrics-addr", &addr.to_string()])
        .args(["--netns", &netns_path])
        .args(["--reconcile-interval", "4s", "--full-reconcile-every", "1"])
        .args(["--max-timewait", &(count + count / 10).to_string()])
        .args([
            "--control-socket",
            &dir.join("twmem.sock").to_string_lossy(),
        ])
        .stdout(std::fs::File::create(dir.join("twmem.stdout"))?)
        .stderr(std::fs::File::create(dir.join("twmem.stderr"))?);
    let command = show(&cmd);
    let mut child = ChildGuard::spawn(&mut cmd)?;
    let pid = child.pid();
    let status = wait_for_status_of(&mut child, addr)?;
    let peak_kib_after_seed = procstat::status_kib(pid, "VmHWM:")?;
    let end = Instant::now() + WATCH;
    while Instant::now() < end {
        if let Some(s) = child.exited()? {
            bail!("tcpstate exited ({s}) during the TIME_WAIT memory run");
        }
        thread::sleep(Duration::from_millis(500));
    }
    let last = wait_for_status_of(&mut child, addr).unwrap_or(status);
    let tracked_timewait = tracked(&last);
    let table_bytes = field(&last, "table_bytes")?;
    let peak_kib = procstat::status_kib(pid, "VmHWM:")?;
    let rss_kib_full = procstat::status_kib(pid, "VmRSS:")?;
    // The last were made `made_in_s` after the first: all are gone 60 s (plus the timer
    // wheel's slack) after that, and the daemon should follow within a sweep or two.
    let expired_by = started + Duration::from_secs_f64(made_in_s) + Duration::from_secs(100);
    let (mut kernel_empty, mut daemon_empty) = (None, None);
    while Instant::now() < expired_by && daemon_empty.is_none() {
        if let Some(s) = child.exited()? {
            bail!("tcpstate exited ({s}) while the TIME_WAIT expired");
        }
        thread::sleep(Duration::from_millis(500));
        if kernel_empty.is_none() && kernel_timewait(&netns)? == 0 {
            kernel_empty = Some(Instant::now());
        }
        if kernel_empty.is_some()
            && let Ok(st) = super::memory::get_status(addr)
            && tracked(&st) == 0
        {
            daemon_empty = Some(Instant::now());
        }
    }
    Ok(TwMemResult {
        command,
        made,
        made_in_s,
        tracked_timewait,
        table_bytes,
        peak_kib_after_seed,
        peak_kib,
        peak_kib_expiry: procstat::status_kib(pid, "VmHWM:")?,
        rss_kib_full,
        rss_kib_end: procstat::status_kib(pid, "VmRSS:")?,
        emptied_lag_s: kernel_empty
            .zip(daemon_empty)
            .map(|(k, d)| d.saturating_duration_since(k).as_secs_f64()),
    })
}

fn tracked(status: &serde_json::Value) -> u64 {
    status
        .get("sockets")
        .and_then(|s| s.get("TIME_WAIT"))
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0)
}

/// The namespace's TIME_WAIT count, as the kernel keeps it (`tw` in its sockstat).
fn kernel_timewait(netns: &Netns) -> Result<u64> {
    let text = in_netns(netns, || {
        std::fs::read_to_string("/proc/thread-self/net/sockstat").context("cannot read sockstat")
    })?;
    text.lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let mut w = l.split_whitespace();
            w.find(|w| *w == "tw")?;
            w.next()?.parse().ok()
        })
        .context("no tw count in sockstat")
}

/// `count` connections closed client first, so each leaves its client in TIME_WAIT.
fn make_timewait(netns: &Netns, count: u64) -> Result<u64> {
    let per = count.div_ceil(u64::from(MAKERS));
    thread::scope(|scope| {
        let makers: Vec<_> = (0..MAKERS)
            .map(|m| {
                scope.spawn(move || {
                    in_netns(netns, || {
                        let port = FIRST_PORT + m;
                        let listener =
                            TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
                                .with_context(|| format!("cannot listen on port {port}"))?;
                        let mut made = 0u64;
                        for i in 0..per {
                            let last = u8::try_from(1 + u64::from(m) * 16 + i % 16).unwrap_or(1);
                            let to = SocketAddr::from((Ipv4Addr::new(127, 0, 0, last), port));
                            let Ok(mut client) = TcpStream::connect(to) else {
                                continue;
                            };
                            let (server, _) = listener.accept().context("accept")?;
                            let _ = client.flush();
                            drop(client);
                            drop(server);
                            made += 1;
                        }
                        Ok(made)
                    })
                })
            })
            .collect();
        let mut made = 0;
        for m in makers {
            made += m
                .join()
                .map_err(|_| anyhow::anyhow!("a TIME_WAIT maker panicked"))??;
        }
        Ok(made)
    })
}
