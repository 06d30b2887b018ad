//! `tcpstate run`: load, attach, seed, then stream kernel -> decode ->
//! tracker -> outputs until a signal says stop.

use std::{
    io::ErrorKind,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::MissedTickBehavior,
};

use crate::{
    btf,
    cli::RunArgs,
    clock::{WallClock, monotonic_ns},
    decode,
    output::{
        Stdout,
        http::{self, Page, Request},
        logfile::{LogFile, LogOptions},
        metrics::{self, Counters},
    },
    program::{self, Filters, KernelCounters, LoadOptions, Probe},
    record::{Record, Started, Stopped, TransitionRecord},
    reorder::Reorder,
    ring::EventRings,
    snapshot::Namespaces,
    sockdiag,
    status::Report,
    tracker::{Config, Tracker, thresholds::Thresholds},
};

/// Userspace drains at least this often, so a quiet stream (which does not
/// ring the doorbell) still shows up promptly.
const POLL: Duration = Duration::from_millis(50);
/// Events this recent are held back one drain, in case another CPU is
/// still writing an older one (see `reorder`).
const HOLDBACK_NS: u64 = 1_000_000;
/// When events are held back, the next drain comes this soon.
const HELD_RETRY: Duration = Duration::from_millis(5);

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("tcpstate run needs root (it loads a BPF program): try sudo tcpstate run");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async { Daemon::start(args).await?.run().await })
}

struct Daemon {
    args: RunArgs,
    probe: Probe,
    doorbell: AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>,
    rings: EventRings,
    reorder: Reorder,
    /// Reused drain buffer (its capacity survives between drains).
    fresh: Vec<tcpstate_common::Event>,
    tracker: Tracker,
    sinks: Sinks,
    http: Option<mpsc::Receiver<Request>>,
    clock: WallClock,
    namespaces: Namespaces,
    filters: Filters,
    started: Instant,
    events: u64,
    undecodable: u64,
    /// Events dropped by userspace filters (--netns).
    filtered: u64,
    pending: Vec<Record>,
    reported: KernelCounters,
    warned_full: bool,
}

impl Daemon {
    async fn start(args: RunArgs) -> anyhow::Result<Self> {
        let offsets = btf::kernel_offsets().map_err(anyhow::Error::msg)?;
        let filters = Filters {
            port: args.port.unwrap_or(0),
            lport: args.lport.unwrap_or(0),
            rport: args.rport.unwrap_or(0),
            family: if args.ipv4 {
                tcpstate_common::AF_INET
            } else if args.ipv6 {
                tcpstate_common::AF_INET6
            } else {
                0
            },
        };
        let mut probe = program::load(&LoadOptions {
            ring_bytes: args.ring_size,
            filters,
            offsets,
        })
        .map_err(anyhow::Error::msg)?;
        let rings = probe.rings.take().context("event rings already taken")?;
        let doorbell = probe.doorbell.take().context("doorbell already taken")?;
        // SAFETY: the AsyncFd owns the RingBuf, so the fd it registers stays
        // open exactly as long as the registration.
        let doorbell = unsafe { AsyncFd::register_with_interest(doorbell, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("cannot poll the ring buffer: {e}"))?;

        let mut thresholds = Thresholds::defaults(Thresholds::host_fin_timeout());
        for &(st, d) in &args.thresholds {
            thresholds.set(st, d);
        }
        let clock = WallClock::now();
        let tracker = Tracker::new(Config {
            capacity: usize::try_from(args.max_sockets).unwrap_or(usize::MAX),
            thresholds,
            leak_threshold: args.leak_threshold,
            clock,
        });
        let namespaces = Namespaces {
            host: sockdiag::current_netns().unwrap_or(0),
        };
        let log = match &args.log_file {
            None => None,
            Some(path) => {
                use std::io::IsTerminal as _;
                let rate = match args.log_rate {
                    Some(0) => None,
                    Some(n) => Some(n),
                    None if std::io::stdout().is_terminal() => None,
                    None => Some(10_000),
                };
                Some(
                    LogFile::open(LogOptions {
                        path: path.clone(),
                        rate,
                        transitions: args.log_transitions,
                        max_size: args.log_max_size,
                        keep: args.log_keep,
                    })
                    .map_err(anyhow::Error::msg)?,
                )
            }
        };
        let http = match args.metrics_addr {
            None => None,
            Some(addr) => {
                let listener = http::bind(addr).await.map_err(anyhow::Error::msg)?;
                let (tx, rx) = mpsc::channel(16);
                tokio::spawn(http::serve(listener, tx));
                Some(rx)
            }
        };
        Ok(Self {
            sinks: Sinks {
                stdout: (!args.quiet).then(|| Stdout::new(args.format)),
                log,
                log_error: None,
            },
            http,
            args,
            probe,
            doorbell,
            rings,
            reorder: Reorder::default(),
            fresh: Vec::new(),
            tracker,
            clock,
            namespaces,
            filters,
            started: Instant::now(),
            events: 0,
            undecodable: 0,
            filtered: 0,
            pending: Vec::new(),
            reported: KernelCounters::default(),
            warned_full: false,
        })
    }

    async fn run(mut self) -> anyhow::Result<()> {
        let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        let mut sigusr1 = signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?;

        // Attached before seeding, so nothing falls between the snapshot
        // and the stream; events for snapshot sockets are matched up by
        // the tracker.
        let seeded = if self.args.no_seed {
            0
        } else {
            let f = self.filters;
            let only = self.args.netns;
            let sockets = self
                .namespaces
                .seed()
                .into_iter()
                .filter(|s| f.admits(s.saddr.is_ipv6(), s.sport, s.dport))
                .filter(|s| only.is_none_or(|ns| ns == s.netns));
            self.tracker.seed(sockets, monotonic_ns())
        };
        if let Some(out) = &mut self.sinks.stdout {
            out.header();
        }
        self.sinks.emit(&Record::Started(Started {
            ts: std::time::SystemTime::now(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            ring_bytes: u32::try_from(self.rings.bytes()).unwrap_or(u32::MAX),
            seeded,
        }));
        if self.flush()? {
            return Ok(());
        }
        notify_systemd();

        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut stats = interval(self.args.stats_interval);
        let mut leaks = interval(self.args.leak_interval);
        let reconcile_every = self.args.reconcile_interval;
        let mut reconcile = interval(if reconcile_every.is_zero() {
            Duration::from_secs(86_400 * 365)
        } else {
            reconcile_every
        });

        loop {
            tokio::select! {
                guard = self.doorbell.readable_mut() => {
                    let mut guard = guard.context("polling the ring buffer")?;
                    // The doorbell's records carry nothing but the wake-up.
                    while guard.get_inner_mut().next().is_some() {}
                    guard.clear_ready();
                    self.drain();
                }
                _ = tokio::time::sleep(HELD_RETRY), if self.reorder.held() > 0 => self.drain(),
                _ = poll.tick() => {
                    self.drain();
                    self.expire();
                }
                _ = stats.tick() => self.report_losses(),
                _ = leaks.tick() => {
                    self.tracker.check_leaks(monotonic_ns(), &mut self.pending);
                    self.emit_pending();
                }
                _ = reconcile.tick(), if !reconcile_every.is_zero() => self.reconcile(),
                Some((page, reply)) = next_request(&mut self.http) => {
                    self.drain();
                    let _ = reply.send(self.page(page));
                }
                _ = sigusr1.recv() => eprintln!("{}", self.tracker.agg.summary()),
                _ = sighup.recv() => {
                    if let Some(log) = &mut self.sinks.log
                        && let Err(e) = log.reopen()
                    {
                        eprintln!("tcpstate: warning: cannot reopen {}: {e}", log.path().display());
                    }
                }
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
            }
            if self.flush()? {
                return Ok(());
            }
        }
        self.drain_before(u64::MAX);
        self.expire();
        let k = self.probe.counters();
        self.sinks.emit(&Record::Stopped(Stopped {
            ts: std::time::SystemTime::now(),
            events: self.events,
            dropped: k.ringbuf_full,
            recursion_misses: k.recursion_misses,
            undecodable: self.undecodable,
            table_full: self.tracker.refused(),
            filtered: self.filtered,
            uptime_s: self.started.elapsed().as_secs_f64(),
        }));
        self.flush()?;
        eprintln!("{}", self.tracker.agg.summary());
        Ok(())
    }

    /// Applies everything the rings hold but the last millisecond.
    fn drain(&mut self) {
        self.drain_before(monotonic_ns().saturating_sub(HOLDBACK_NS));
    }

    /// Applies every event with a timestamp before `cutoff_ns`, in
    /// timestamp order.
    fn drain_before(&mut self, cutoff_ns: u64) {
        let now = Instant::now();
        self.rings.drain_into(&mut self.fresh);
        let ready = self.reorder.release(&mut self.fresh, cutoff_ns);
        for ev in &ready {
            self.events += 1;
            match decode::from_event(ev) {
                // --netns: the kernel reads a socket's namespace only at its
                // birth, so later events are matched through the table; a
                // socket born elsewhere is never tracked.
                Ok(t)
                    if self.args.netns.is_some_and(|ns| {
                        ns != if t.netns != 0 {
                            t.netns
                        } else {
                            self.tracker.netns_of(t.sk)
                        }
                    }) =>
                {
                    self.filtered += 1;
                }
                Ok(t) => {
                    let applied = self.tracker.on_transition(&t, &mut self.pending);
                    self.sinks.emit_at(
                        &Record::Transition(TransitionRecord {
                            ts: self.clock.to_system(t.ts_ns),
                            sk: t.sk,
                            family: t.family,
                            saddr: t.saddr,
                            sport: t.sport,
                            daddr: t.daddr,
                            dport: t.dport,
                            old: t.old,
                            new: t.new,
                            pid: t.pid,
                            comm: t.comm,
                            prev_state_ms: applied.prev_state_ms,
                            netns: applied.netns,
                        }),
                        now,
                    );
                    for rec in self.pending.drain(..) {
                        self.sinks.emit_at(&rec, now);
                    }
                }
                Err(_) => self.undecodable += 1,
            }
        }
        if !self.warned_full && self.tracker.refused() > 0 {
            self.warned_full = true;
            eprintln!(
                "tcpstate: warning: socket table full ({} sockets, --max-sockets); new sockets are counted but not tracked",
                self.tracker.capacity()
            );
        }
    }

    /// Raises anomalies whose deadline passed, naming the fd holder.
    fn expire(&mut self) {
        self.tracker.expire(monotonic_ns(), &mut self.pending);
        self.emit_pending();
    }

    fn emit_pending(&mut self) {
        let mut fresh: Vec<&mut crate::record::AnomalyRecord> = self
            .pending
            .iter_mut()
            .filter_map(|r| match r {
                Record::Anomaly(a) => Some(a),
                _ => None,
            })
            .collect();
        self.namespaces.verify_owners(&mut fresh);
        for rec in self.pending.drain(..) {
            self.sinks.emit(&rec);
        }
    }

    fn reconcile(&mut self) {
        let start = monotonic_ns();
        let alive = self.namespaces.alive(&self.tracker.namespaces());
        // Apply every event that happened before the dump first, so a
        // socket whose CLOSE is merely queued is not taken for a ghost.
        self.drain_before(start);
        let now = monotonic_ns();
        for (ns, alive) in alive {
            self.tracker
                .reconcile(ns, &alive, start, now, &mut self.pending);
        }
        self.emit_pending();
    }

    fn report_losses(&mut self) {
        let k = self.probe.counters();
        let (full, rec) = (
            k.ringbuf_full - self.reported.ringbuf_full.min(k.ringbuf_full),
            k.recursion_misses - self.reported.recursion_misses.min(k.recursion_misses),
        );
        if full > 0 || rec > 0 {
            eprintln!(
                "tcpstate: warning: lost {full} events (ring buffer full; raise --ring-size) and {rec} to recursion in the last {}; totals {} and {}",
                humantime::format_duration(self.args.stats_interval),
                k.ringbuf_full,
                k.recursion_misses
            );
        }
        self.reported = k;
    }

    fn counters(&self) -> Counters {
        let k = self.probe.counters();
        Counters {
            events: self.events,
            dropped: k.ringbuf_full,
            recursion_misses: k.recursion_misses,
            undecodable: self.undecodable,
            log_suppressed: self.sinks.log.as_ref().map_or(0, |l| l.suppressed_total),
        }
    }

    fn page(&self, page: Page) -> String {
        match page {
            Page::Metrics => metrics::render(&self.tracker, self.counters()),
            Page::Status => {
                let mut report = Report::build(
                    &self.tracker,
                    self.counters(),
                    monotonic_ns(),
                    self.started.elapsed().as_secs_f64(),
                );
                let mut open: Vec<_> = report.open_anomalies.iter_mut().collect();
                self.namespaces.verify_owners(&mut open);
                serde_json::to_string(&report).unwrap_or_default()
            }
        }
    }

    /// Returns true when stdout is gone (a closed pipe): stop quietly.
    fn flush(&mut self) -> anyhow::Result<bool> {
        self.sinks.flush_log();
        match self.sinks.stdout.as_mut().map_or(Ok(()), Stdout::flush) {
            Ok(()) => Ok(false),
            Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(true),
            Err(e) => Err(e).context("writing to stdout"),
        }
    }
}

/// Every place a record goes.
struct Sinks {
    stdout: Option<Stdout>,
    log: Option<LogFile>,
    /// The last log write error, reported once until writes work again.
    log_error: Option<std::io::ErrorKind>,
}

impl Sinks {
    fn emit(&mut self, rec: &Record) {
        self.emit_at(rec, Instant::now());
    }

    /// `now` is read once per ring-buffer batch: a clock read per record
    /// showed in the profile, and the rate limit needs no finer grain.
    fn emit_at(&mut self, rec: &Record, now: Instant) {
        if let Some(out) = &mut self.stdout {
            out.emit(rec);
        }
        if let Some(log) = &mut self.log {
            log.emit(rec, now);
        }
    }

    /// A failing log (disk full, removed directory) is reported, not
    /// fatal: counters, metrics and stdout carry on exactly.
    fn flush_log(&mut self) {
        let Some(log) = &mut self.log else { return };
        match log.flush(Instant::now()) {
            Ok(()) => self.log_error = None,
            Err(e) => {
                if self.log_error != Some(e.kind()) {
                    eprintln!("tcpstate: warning: writing {}: {e}", log.path().display());
                }
                self.log_error = Some(e.kind());
            }
        }
    }
}

async fn next_request(rx: &mut Option<mpsc::Receiver<Request>>) -> Option<Request> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// `Type=notify`: tell systemd we are attached and seeded.
fn notify_systemd() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let _ = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(b"READY=1", &addr))
    } else {
        sock.send_to(b"READY=1", std::path::Path::new(&path))
    };
}

fn interval(period: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    i.set_missed_tick_behavior(MissedTickBehavior::Delay);
    i
}
