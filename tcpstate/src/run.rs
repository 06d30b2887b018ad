//! `tcpstate run`: load and attach, then the second stage. The collector thread hands batches
//! of transitions over a channel; this loop applies them to the tracker and writes what it
//! concludes. Everything that waits on the kernel's socket table or /proc runs on the
//! `kernel_table` workers and comes back as a message, so nothing here blocks for long.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::MissedTickBehavior,
};

use crate::{
    btf,
    cli::RunArgs,
    clock::{WallClock, monotonic_ns},
    collector::{Batch, Collector},
    kernel_table::{Dump, Job, Reply, Workers},
    output::{
        Sinks, Stdout,
        http::{self, Page, Request},
        logfile::{LogFile, LogOptions},
        metrics::{self, Counters},
        summary::summary,
    },
    program::{self, Admits as _, KernelCounters, LoadOptions, Probe},
    record::{Record, Started, Stopped},
    status::Report,
    tracker::{Config, Fact, Tracker, thresholds::Thresholds},
    verify::Verifier,
};

/// How often mini-sockets are checked with the kernel: the accuracy of a TIME_WAIT or an
/// orphaned FIN_WAIT2's end when no event says it.
const SWEEP: Duration = Duration::from_millis(500);
/// The tick that raises anomalies and writes batches out.
const TICK: Duration = Duration::from_millis(50);

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("tcpstate run needs root (it loads a BPF program): try sudo tcpstate run");
    }
    if let Some(ns) = args.netns
        && !crate::sockdiag::netns::all_netns().contains_key(&ns)
        && crate::sockdiag::current_netns().ok() != Some(ns)
    {
        bail!("--netns {ns}: no network namespace with that inode exists");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async { Daemon::start(args).await?.run().await })
}

/// Counters the daemon keeps itself.
#[derive(Default)]
struct Tally {
    events: u64,
    undecodable: u64,
    /// Events dropped by userspace filters (--netns).
    filtered: u64,
    /// Events since the last sweep (an idle sweep re-reads the kernel's table).
    since_sweep: u64,
    /// Events since the last reconciliation started.
    since_reconcile: u64,
}

enum Parked {
    Reconciled(Dump),
    Probed(crate::tracker::ProbeResult),
}

impl Parked {
    fn at_ns(&self) -> u64 {
        match self {
            Parked::Reconciled(d) => d.started_ns,
            Parked::Probed(p) => p.done_ns,
        }
    }
}

/// Jobs out with the workers, so none is queued twice.
#[derive(Default)]
struct InFlight {
    reconcile: bool,
    probes: usize,
    settings: std::collections::HashSet<u32>,
    /// Answers about the kernel's table that came before the events up to
    /// them were applied: they wait, so nothing is judged on stale events.
    parked: std::collections::VecDeque<Parked>,
}

struct Daemon {
    args: RunArgs,
    probe: Probe,
    collector: Collector,
    batches: mpsc::Receiver<Batch>,
    workers: Workers,
    replies: mpsc::UnboundedReceiver<Reply>,
    tracker: Tracker,
    verifier: Verifier,
    sinks: Sinks,
    http: Option<mpsc::Receiver<Request>>,
    clock: WallClock,
    tally: Tally,
    jobs: InFlight,
    /// Every event before this is applied.
    watermark_ns: u64,
    started: Instant,
    /// Kernel loss counters at the last report; as last checked for a new
    /// loss, and when one was last seen.
    reported: KernelCounters,
    loss_seen: KernelCounters,
    loss_at_ns: Option<u64>,
    warned_full: bool,
}

impl Daemon {
    async fn start(args: RunArgs) -> anyhow::Result<Self> {
        let offsets = btf::kernel_offsets()?;
        let filters = tcpstate_common::Filters {
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
        let (tx, batches) = mpsc::channel(64);
        let collector =
            Collector::spawn(rings, doorbell, tx).context("cannot start the collector")?;
        let (rtx, replies) = mpsc::unbounded_channel();
        let workers = Workers::spawn(2, rtx).context("cannot start the kernel-table workers")?;
        let http = match args.metrics_addr {
            None => None,
            Some(addr) => Some(http::start(addr).await?),
        };
        Ok(Self {
            tracker: Tracker::new(tracker_config(&args)),
            sinks: sinks(&args)?,
            http,
            probe,
            collector,
            batches,
            workers,
            replies,
            verifier: Verifier::default(),
            clock: WallClock::now(),
            tally: Tally::default(),
            jobs: InFlight::default(),
            watermark_ns: 0,
            started: Instant::now(),
            reported: KernelCounters::default(),
            loss_seen: KernelCounters::default(),
            loss_at_ns: None,
            warned_full: false,
            args,
        })
    }

    async fn run(mut self) -> anyhow::Result<()> {
        let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        let mut sigusr1 = signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?;

        let seeded = self.seed().await;
        if let Some(out) = &mut self.sinks.stdout {
            out.header();
        }
        self.emit(&Record::Started(Started {
            ts: std::time::SystemTime::now(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            ring_bytes: u32::try_from(self.probe.ring_bytes()).unwrap_or(u32::MAX),
            seeded,
        }));
        if !self.sinks.flush(Instant::now()) {
            return Ok(());
        }
        notify_systemd();

        let mut tick = interval(TICK);
        let mut sweep = interval(SWEEP);
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
                Some(batch) = self.batches.recv() => {
                    let last = batch.last;
                    self.apply(batch);
                    if last { break; }
                }
                Some(reply) = self.replies.recv() => self.on_reply(reply),
                _ = tick.tick() => self.on_tick(),
                _ = sweep.tick() => self.sweep(),
                _ = stats.tick() => self.report_losses(),
                _ = leaks.tick() => {
                    let mut facts = Vec::new();
                    self.tracker.check_leaks(monotonic_ns(), &mut facts);
                    self.publish(facts);
                }
                _ = reconcile.tick(), if !reconcile_every.is_zero() => self.start_reconcile(),
                Some((page, reply)) = next_request(&mut self.http) => self.page(page, reply),
                _ = sigusr1.recv() => eprintln!("{}", summary(&self.tracker)),
                _ = sighup.recv() => self.reopen_log(),
                _ = sigint.recv() => self.collector.stop(),
                _ = sigterm.recv() => self.collector.stop(),
            }
            if !self.sinks.flush(Instant::now()) {
                return Ok(());
            }
        }
        self.finish();
        Ok(())
    }

    /// Loads the kernel's socket table. The program is attached before, so nothing falls
    /// between the snapshot and the stream; events for snapshot sockets are matched up by the
    /// tracker. Batches wait in their channel (and the rings) meanwhile.
    async fn seed(&mut self) -> u64 {
        self.workers.submit(Job::Settings { netns: 0 });
        if self.args.no_seed {
            return 0;
        }
        if !self.workers.submit(Job::Seed { only: None }) {
            return 0;
        }
        loop {
            match self.replies.recv().await {
                Some(Reply::Seeded { sockets, host }) => {
                    let f = self.filters();
                    let only = self.args.netns;
                    let sockets = sockets
                        .into_iter()
                        .filter(|s| {
                            f.admits(
                                s.tuple.family == crate::socket::Family::V6,
                                s.tuple.sport,
                                s.tuple.dport,
                            )
                        })
                        .filter(|s| only.is_none_or(|ns| ns == s.netns));
                    let _ = host;
                    return self.tracker.seed(sockets, monotonic_ns());
                }
                Some(other) => self.on_reply(other),
                None => return 0,
            }
        }
    }

    fn filters(&self) -> tcpstate_common::Filters {
        tcpstate_common::Filters {
            port: self.args.port.unwrap_or(0),
            lport: self.args.lport.unwrap_or(0),
            rport: self.args.rport.unwrap_or(0),
            family: if self.args.ipv4 {
                tcpstate_common::AF_INET
            } else if self.args.ipv6 {
                tcpstate_common::AF_INET6
            } else {
                0
            },
        }
    }

    /// Applies one batch of transitions, in order.
    fn apply(&mut self, batch: Batch) {
        let now = Instant::now();
        self.tally.events += batch.events;
        self.tally.undecodable += batch.undecodable;
        let filtered = self.tally.filtered;
        let mut facts = Vec::new();
        for t in &batch.transitions {
            // --netns: the kernel reads a socket's namespace only at its birth, so later
            // events are matched through the table; a socket born elsewhere is never tracked.
            if let Some(ns) = self.args.netns {
                let of = if t.netns != 0 {
                    t.netns
                } else {
                    self.tracker.netns_of(t.sk)
                };
                if of != ns {
                    self.tally.filtered += 1;
                    continue;
                }
            }
            self.tracker.on_transition(t, &mut facts);
            self.write_facts(&mut facts, now);
        }
        // Activity for the idle re-read: events that reached the tracker.
        let applied = batch.transitions.len() as u64 - (self.tally.filtered - filtered);
        self.tally.since_sweep += applied;
        self.tally.since_reconcile += applied;
        self.watermark_ns = batch.watermark_ns;
        if !self.warned_full && self.tracker.refused() > 0 {
            self.warned_full = true;
            crate::warn(format_args!(
                "socket table full ({} sockets, --max-sockets); new sockets are counted but not tracked",
                self.tracker.capacity()
            ));
        }
        self.unpark();
    }

    /// Writes transition facts at once; anomaly facts go through the owner check.
    fn write_facts(&mut self, facts: &mut Vec<Fact>, now: Instant) {
        if facts.is_empty() {
            return;
        }
        let mut rest = Vec::new();
        for f in facts.drain(..) {
            match f {
                Fact::Moved(m) => {
                    let clock = self.clock;
                    self.sinks.transition(now, || {
                        Record::Transition(crate::record::TransitionRecord::from_moved(&m, clock))
                    });
                }
                other => rest.push(other),
            }
        }
        if !rest.is_empty() {
            self.publish(rest);
        }
    }

    /// Queues anomaly facts behind their owner checks and writes what is ready.
    fn publish(&mut self, facts: Vec<Fact>) {
        if facts.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut rest = Vec::with_capacity(facts.len());
        for f in facts {
            match f {
                Fact::Moved(m) => {
                    let clock = self.clock;
                    self.sinks.transition(now, || {
                        Record::Transition(crate::record::TransitionRecord::from_moved(&m, clock))
                    });
                }
                other => rest.push(other),
            }
        }
        if let Some(job) = self.verifier.push(rest) {
            self.workers.submit(job);
        }
        self.release();
    }

    fn release(&mut self) {
        let ready: Vec<Fact> = self.verifier.ready().collect();
        let now = Instant::now();
        for f in &ready {
            self.sinks.emit(&Record::from_fact(f, self.clock), now);
        }
    }

    fn emit(&mut self, rec: &Record) {
        self.sinks.emit(rec, Instant::now());
    }

    fn on_tick(&mut self) {
        let now = monotonic_ns();
        let k = self.probe.counters();
        if k != self.loss_seen {
            self.loss_seen = k;
            // Events were lost: the table may hold ghosts. No anomaly until a
            // reconciliation, which starts now rather than at its interval.
            if self.loss_at_ns.is_none() {
                self.tracker.set_incomplete(true);
                self.start_reconcile();
            }
            self.loss_at_ns = Some(now);
        }
        let mut facts = Vec::new();
        self.tracker.expire(now, &mut facts);
        self.publish(facts);
    }

    /// Checks mini-sockets with the kernel, and re-reads its table when things went quiet.
    fn sweep(&mut self) {
        let now = monotonic_ns();
        if self.jobs.probes == 0 {
            for p in self.tracker.probes(now) {
                if self.workers.submit(Job::Probe(p)) {
                    self.jobs.probes += 1;
                }
            }
        }
        for netns in self.tracker.netns_without_info() {
            if self.jobs.settings.insert(netns) {
                self.workers.submit(Job::Settings { netns });
            }
        }
        // A quiet moment after activity: one full re-read makes the counts exact (TIME_WAIT
        // killed early by an RST, request sockets), at no cost while traffic flows.
        if self.tally.since_sweep == 0 && self.tally.since_reconcile > 0 {
            self.start_reconcile();
        }
        self.tally.since_sweep = 0;
    }

    fn start_reconcile(&mut self) {
        if self.jobs.reconcile {
            return;
        }
        let mut namespaces: Vec<u32> = self.tracker.namespaces().into_iter().collect();
        namespaces.sort_unstable();
        if self.workers.submit(Job::Reconcile { namespaces }) {
            self.jobs.reconcile = true;
            self.tally.since_reconcile = 0;
        }
    }

    fn on_reply(&mut self, reply: Reply) {
        match reply {
            // Every event from before a dump or lookup must be applied first, so a socket
            // whose CLOSE is merely queued is not taken for a ghost, and a transition the
            // events show is not reported as found by sock_diag.
            Reply::Reconciled(dump) => {
                self.jobs.reconcile = false;
                self.jobs.parked.push_back(Parked::Reconciled(dump));
                self.unpark();
            }
            Reply::Probed(r) => {
                self.jobs.probes = self.jobs.probes.saturating_sub(1);
                self.jobs.parked.push_back(Parked::Probed(r));
                self.unpark();
            }
            Reply::Owners {
                ticket,
                holders,
                unreadable,
            } => self.owners_checked(ticket, &holders, unreadable),
            Reply::Settings { netns, info } => {
                self.jobs.settings.remove(&netns);
                if let Some(info) = info {
                    if netns == 0 {
                        self.tracker.set_default_netns_info(info);
                    } else {
                        let mut facts = Vec::new();
                        self.tracker
                            .set_netns_info(netns, info, monotonic_ns(), &mut facts);
                        self.publish(facts);
                    }
                }
            }
            Reply::Seeded { .. } => {}
        }
    }

    /// Applies the parked answers whose events are all in.
    fn unpark(&mut self) {
        while let Some(p) = self
            .jobs
            .parked
            .pop_front_if(|p| p.at_ns() <= self.watermark_ns)
        {
            match p {
                Parked::Reconciled(dump) => self.reconciled(dump),
                Parked::Probed(r) => {
                    let mut facts = Vec::new();
                    self.tracker.apply_probe(&r, &mut facts);
                    self.publish(facts);
                }
            }
        }
    }

    fn reconciled(&mut self, dump: Dump) {
        let now = dump.started_ns;
        let mut facts = Vec::new();
        for (ns, a) in &dump.alive {
            self.tracker
                .reconcile(*ns, a, dump.started_ns, now, &mut facts);
        }
        for ns in dump.gone {
            self.tracker.netns_gone(ns, now, &mut facts);
        }
        if self.tracker.is_incomplete() {
            if self.loss_at_ns.is_some_and(|t| t < dump.started_ns) {
                self.tracker.set_incomplete(false);
                self.loss_at_ns = None;
            } else {
                // Lost again while it ran: once more.
                self.start_reconcile();
            }
        }
        self.publish(facts);
    }

    fn owners_checked(
        &mut self,
        ticket: u64,
        holders: &[crate::kernel_table::Holder],
        unreadable: u32,
    ) {
        if unreadable > 0 {
            crate::warn(format_args!(
                "owner check could not read the fds of {unreadable} processes (raise LimitNOFILE?); those owners are shown as attributed, not verified"
            ));
        }
        if let Some((open, reply)) = self.verifier.answer(ticket, holders) {
            let report = Report::build(
                &self.tracker,
                self.counters(),
                &open,
                self.clock,
                self.started.elapsed().as_secs_f64(),
            );
            let _ = reply.send(serde_json::to_string(&report).unwrap_or_default());
        }
        self.release();
    }

    fn report_losses(&mut self) {
        let k = self.probe.counters();
        let (full, rec) = (
            k.ringbuf_full - self.reported.ringbuf_full.min(k.ringbuf_full),
            k.recursion_misses - self.reported.recursion_misses.min(k.recursion_misses),
        );
        if full > 0 || rec > 0 {
            crate::warn(format_args!(
                "lost {full} events (ring buffer full; raise --ring-size) and {rec} to recursion in the last {}; totals {} and {}",
                humantime::format_duration(self.args.stats_interval),
                k.ringbuf_full,
                k.recursion_misses
            ));
        }
        self.reported = k;
    }

    fn counters(&self) -> Counters {
        let k = self.probe.counters();
        Counters {
            events: self.tally.events,
            dropped: k.ringbuf_full,
            recursion_misses: k.recursion_misses,
            undecodable: self.tally.undecodable,
            log_suppressed: self.sinks.log_suppressed(),
            log_dropped: self.sinks.log_dropped(),
            stdout_dropped: self.sinks.stdout_dropped(),
        }
    }

    fn page(&mut self, page: Page, reply: http::Reply) {
        match page {
            Page::Metrics => {
                let _ = reply.send(metrics::render(&self.tracker, self.counters()));
            }
            Page::Status => {
                let open = self.tracker.open_anomalies(monotonic_ns());
                let job = self.verifier.status(open, reply);
                self.workers.submit(job);
            }
        }
    }

    fn reopen_log(&mut self) {
        if let Some(log) = &mut self.sinks.log
            && let Err(e) = log.reopen()
        {
            crate::warn(format_args!("cannot reopen {}: {e}", log.path().display()));
        }
    }

    /// The last batch is in: raise what is due, write everything and the final counts.
    fn finish(&mut self) {
        let mut facts = Vec::new();
        self.tracker.expire(monotonic_ns(), &mut facts);
        let _ = self.verifier.push(facts);
        let rest: Vec<Fact> = self.verifier.drain_all().collect();
        let now = Instant::now();
        for f in &rest {
            self.sinks.emit(&Record::from_fact(f, self.clock), now);
        }
        let k = self.probe.counters();
        let stopped = Record::Stopped(Stopped {
            ts: std::time::SystemTime::now(),
            events: self.tally.events,
            dropped: k.ringbuf_full,
            recursion_misses: k.recursion_misses,
            undecodable: self.tally.undecodable,
            table_full: self.tracker.refused(),
            timewait_full: self.tracker.timewait_refused(),
            log_dropped: self.sinks.log_dropped(),
            filtered: self.tally.filtered,
            uptime_s: self.started.elapsed().as_secs_f64(),
        });
        self.emit(&stopped);
        self.sinks.flush(Instant::now());
        if let Some(out) = &mut self.sinks.stdout {
            out.finish(Duration::from_secs(2));
        }
        self.collector.join();
        eprintln!("{}", summary(&self.tracker));
    }
}

fn tracker_config(args: &RunArgs) -> Config {
    use crate::tracker::thresholds::Threshold;
    let mut thresholds = Thresholds::defaults(Thresholds::host_fin_timeout());
    let mut pressure = Some(0.5);
    for t in &args.thresholds {
        match *t {
            Threshold::State(st, d) => thresholds.set(st, d),
            Threshold::Pressure(p) => pressure = p,
        }
    }
    Config {
        capacity: usize::try_from(args.max_sockets).unwrap_or(usize::MAX),
        timewait_capacity: usize::try_from(args.max_timewait).unwrap_or(usize::MAX),
        thresholds,
        leak_threshold: args.leak_threshold,
        pressure,
    }
}

fn sinks(args: &RunArgs) -> anyhow::Result<Sinks> {
    let stdout = if args.quiet {
        None
    } else {
        Some(Stdout::new(args.format).context("cannot start the stdout writer")?)
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
            Some(LogFile::open(LogOptions {
                path: path.clone(),
                rate,
                transitions: args.log_transitions,
                max_size: args.log_max_size,
                keep: args.log_keep,
            })?)
        }
    };
    Ok(Sinks::new(stdout, log, args.stats_interval))
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
