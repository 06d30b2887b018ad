//! The TIME_WAIT memory run: N TIME_WAIT sockets made in a namespace first (clients close
//! first, to 64 loopback addresses so no connect searches a crowded port range), then the
//! daemon started on it, seeding them and reconciling every 4 s with a full dump each time.
//! Peak RSS (VmHWM) against the table's own bytes is the figure: every socket is held once in
//! the table, and a dump or seed must not hold the whole host again beside it (issue 21.10).

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
    /// VmHWM once the seed is in, and at the end (after the reconciliations).
    pub peak_kib_after_seed: u64,
    pub peak_kib: u64,
    pub rss_kib_end: u64,
}

impl TwMemResult {
    pub fn markdown(&self) -> String {
        let mb = |kib: u64| kib as f64 / 1024.0;
        let table_mb = self.table_bytes as f64 / 1048576.0;
        format!(
            "\n## TIME_WAIT memory\n\n{} TIME_WAIT made in {:.0} s, then `{}`; {} tracked.\n\n\
             | table | peak RSS after the seed | peak RSS after 5 full reconciliations | × table | RSS at the end |\n\
             | --- | --- | --- | --- | --- |\n\
             | {table_mb:.1} MB | {:.1} MB | {:.1} MB | {:.1} | {:.1} MB |\n",
            self.made,
            self.made_in_s,
            self.command,
            self.tracked_timewait,
            mb(self.peak_kib_after_seed),
            mb(self.peak_kib),
            mb(self.peak_kib) / table_mb.max(f64::MIN_POSITIVE),
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
    let tracked_timewait = last
        .get("sockets")
        .and_then(|s| s.get("TIME_WAIT"))
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    Ok(TwMemResult {
        command,
        made,
        made_in_s,
        tracked_timewait,
        table_bytes: field(&last, "table_bytes")?,
        peak_kib_after_seed,
        peak_kib: procstat::status_kib(pid, "VmHWM:")?,
        rss_kib_end: procstat::status_kib(pid, "VmRSS:")?,
    })
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
