//! `tcpstate run`: load and attach, then the second stage. The collector thread hands batches
//! of transitions over a channel; this loop applies them to the tracker and writes what it
//! concludes. Everything that waits on the kernel's socket table or /proc runs on the
//! [`crate::workers`] threads and comes back as a message, so nothing here blocks for long.
//!
//! - `mod.rs`: the loop, the event path and the outputs;
//! - `jobs.rs`: the workers' answers (reconciliation, the sweep, owner checks, settings);
//! - `recovery.rs`: what a lost event changes, until a reconciliation mends it;
//! - `setup.rs`: what the command line turns into.

mod jobs;
mod recovery;
pub(crate) mod setup;

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    btf,
    cli::RunArgs,
    clock::{WallClock, monotonic_ns},
    collector::{Batch, Collector},
    decode::Decoded,
    features::{Found, Hooks},
    output::{
        Sinks,
        http::{self, Page, Request},
        metrics::{self, Counters},
        summary::summary,
    },
    program::{self, Admits as _, KernelCounters, LoadOptions, Loaded},
    record::{Record, Started, Stopped},
    state::TcpState,
    tracker::{Fact, Tracker},
    verify::Verifier,
    workers::{Dump, Job, Reply, Workers},
    workload::Workloads,
};

use self::{jobs::InFlight, recovery::Recovery};

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
    setup::raise_fd_limit();
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
    rt.block_on(async { Daemon::start(args)?.run().await })
}

/// Counters the daemon keeps itself.
#[derive(Default)]
struct Tally {
    events: u64,
    undecodable: u64,
    /// Events merged after newer ones (the collector counts them since the start).
    late: u64,
    /// Events dropped by userspace filters (--netns).
    filtered: u64,
    /// Events since the last sweep (an idle sweep re-reads the kernel's table).
    since_sweep: u64,
    /// Events since the last reconciliation started.
    since_reconcile: u64,
    /// Reconciliations ended: what a namespace let go or a lost event waits for.
    reconciliations: u64,
}

struct Daemon {
    args: RunArgs,
    program: Loaded,
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
    /// Kernel loss counters at the last report.
    reported: KernelCounters,
    /// Lost events and the reconciliations that mend them.
    recovery: Recovery,
    warned_full: bool,
    /// What the start-up snapshot raised, said once `started` is written.
    seed_facts: Vec<Fact>,
    /// Cgroup id -> unit, container, pod.
    workloads: Workloads,
    /// What this kernel and these flags allow, found at start-up.
    features: Vec<crate::features::Feature>,
    /// The drop reasons watched (`--drops`), by this kernel's numbers.
    drops: Option<crate::drops::Watched>,
}

impl Daemon {
    fn start(args: RunArgs) -> anyhow::Result<Self> {
        let offsets = btf::kernel_offsets()?;
        setup::cgroup_filter_possible(args.cgroup.as_deref(), &offsets)?;
        let workloads = Workloads::new(setup::hierarchy(&args)?);
        let filters = setup::filters(&args);
        let drops = args.drops.then(btf::kernel_drop_reasons).transpose()?;
        if let Some(w) = &drops {
            crate::drops::set_names(w.clone());
        }
        let mut loaded = program::load(&LoadOptions {
            ring_bytes: args.ring_size,
            filters,
            offsets,
            retransmits: args.retransmits,
            resets: args.resets,
            drops: drops.as_ref().map(crate::drops::Watched::bitmap),
            binds: args.bind_failures,
        })?;
        // Parsing the kernel's BTF and the object leaves about 18 MB of freed heap resident
        // that nothing reuses: at a million TIME_WAIT that was most of the margin (21.10).
        crate::memory::give_back();
        let rings = loaded.rings.take().context("event rings already taken")?;
        let doorbell = loaded.doorbell.take().context("doorbell already taken")?;
        let segments = loaded
            .segments
            .take()
            .context("segment ring already taken")?;
        let capture = args
            .capture_events
            .as_deref()
            .map(crate::capture::Writer::create)
            .transpose()
            .context("cannot create the --capture-events file")?;
        let (tx, batches) = mpsc::channel(64);
        let collector = Collector::spawn(rings, doorbell, segments, tx, capture)
            .context("cannot start the collector")?;
        let (rtx, replies) = mpsc::unbounded_channel();
        let workers = Workers::spawn(&rtx).context("cannot start the kernel-table workers")?;
        let features = {
            let hooks_of = |names: &[&str]| -> Vec<(&'static str, Option<String>)> {
                loaded
                    .hooks
                    .iter()
                    .filter(|(n, _)| names.contains(n))
                    .cloned()
                    .collect()
            };
            let (retransmits, resets, drops) = (
                hooks_of(&tcpstate_common::RETRANSMIT_HOOKS),
                hooks_of(&tcpstate_common::RESET_HOOKS),
                hooks_of(&tcpstate_common::DROP_HOOKS),
            );
            let binds = hooks_of(&if args.bind_failures == crate::cli::BindHooks::Syscalls {
                tcpstate_common::BIND_SYSCALL_HOOKS
            } else {
                tcpstate_common::BIND_HOOKS
            });
            let (sock_diag, sock_destroy) = crate::features::probe_sock_diag();
            let asked = |on: bool, flag, hooks| {
                if on {
                    Hooks::Asked(hooks)
                } else {
                    Hooks::NotAsked(flag)
                }
            };
            crate::features::report(&Found {
                offsets: &offsets,
                retransmit_hooks: asked(args.retransmits, "--retransmits=false", &retransmits),
                reset_hooks: asked(args.resets, "--resets=false", &resets),
                drop_hooks: asked(args.drops, "--drops=false", &drops),
                bind_hooks: asked(
                    args.bind_failures != crate::cli::BindHooks::Off,
                    "--bind-failures=off",
                    &binds,
                ),
                pressure: setup::tracker_config(&args).rules.pressure.is_some(),
                sock_diag,
                sock_destroy,
            })
        };
        let sinks = setup::sinks(&args)?;
        // Last: everything that can refuse to start has, so a refused start leaves no socket.
        let http = Some(setup::endpoints(&args)?);
        Ok(Self {
            tracker: Tracker::new(setup::tracker_config(&args)),
            sinks,
            http,
            program: loaded,
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
            recovery: Recovery::new(args.full_reconcile_every),
            warned_full: false,
            seed_facts: Vec::new(),
            workloads,
            features,
            drops,
            args,
        })
    }

    async fn run(mut self) -> anyhow::Result<()> {
        let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        let mut sigusr1 = signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?;

        let seeded = self.seed().await;
        self.sinks.header();
        self.emit(&Record::Started(Started {
            ts: std::time::SystemTime::now(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            ring_bytes: u32::try_from(self.program.ring_bytes()).unwrap_or(u32::MAX),
            seeded,
            features: self.features.clone(),
        }));
        // What the snapshot raised is said after `started`, so no record predates it.
        let mut seed_facts = std::mem::take(&mut self.seed_facts);
        let now = monotonic_ns();
        for f in &mut seed_facts {
            if let Fact::Raised(a) = f {
                a.ts_ns = a.ts_ns.max(now);
            }
        }
        self.publish(seed_facts);
        if !self.sinks.flush(Instant::now()) {
            return Ok(());
        }
        setup::notify_systemd();

        let mut tick = setup::interval(TICK);
        let mut sweep = setup::interval(SWEEP);
        let mut stats = setup::interval(self.args.stats_interval);
        let mut leaks = setup::interval(self.args.leak_interval);
        let reconcile_every = self.args.reconcile_interval;
        let mut reconcile = setup::interval(if reconcile_every.is_zero() {
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
                _ = reconcile.tick(), if !reconcile_every.is_zero() => self.start_reconcile(false),
                Some((page, reply)) = setup::next_request(&mut self.http) => self.page(page, reply),
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
        self.workers.submit(Job::Settings {
            netns: 0,
            walk: false,
        });
        if self.args.no_seed {
            return 0;
        }
        let (applied, parts_applied) = std::sync::mpsc::channel();
        if !self.workers.submit(Job::Seed {
            applied: parts_applied,
        }) {
            return 0;
        }
        let mut n = 0;
        loop {
            let (sockets, last) = match self.replies.recv().await {
                Some(Reply::SeedPart { sockets }) => (sockets, false),
                Some(Reply::Seeded { sockets }) => (sockets, true),
                Some(Reply::SeedExpects { timewait }) => {
                    // Room for the namespaces kept; none when a port or cgroup filter leaves
                    // an unknown share out.
                    let only = self.args.netns;
                    if setup::filters(&self.args) == Default::default()
                        && self.args.cgroup.is_none()
                    {
                        let n = timewait
                            .iter()
                            .filter(|(ns, _)| only.is_none_or(|o| o == *ns))
                            .map(|(_, n)| n)
                            .sum();
                        self.tracker.seed_expects_timewait(n);
                    }
                    continue;
                }
                Some(other) => {
                    self.on_reply(other);
                    continue;
                }
                None => return n,
            };
            let f = setup::filters(&self.args);
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
                .filter(|s| only.is_none_or(|ns| ns == s.netns))
                .filter(|s| self.wanted_cgroup(s.cgroup))
                .collect::<Vec<_>>();
            n += self
                .tracker
                .seed(sockets, monotonic_ns(), &mut self.seed_facts);
            // Never blocks (the channel is unbounded); the worker may be gone already.
            let _ = applied.send(());
            if last {
                self.tracker.seed_done();
                if n >= crate::memory::TRIM_AFTER as u64 {
                    crate::memory::give_back();
                }
                return n;
            }
        }
    }

    /// Applies one batch of transitions, in order.
    fn apply(&mut self, batch: Batch) {
        let now = Instant::now();
        self.tally.events += batch.events;
        self.tally.undecodable += batch.undecodable;
        self.tally.late = batch.late;
        let filtered = self.tally.filtered;
        let mut facts = Vec::new();
        for d in &batch.decoded {
            // --netns: the kernel reads a socket's namespace only at its birth, so later
            // events are matched through the table (a snapshot socket by its tuple until its
            // first event); a socket born elsewhere is never tracked.
            if let Some(ns) = self.args.netns {
                let of = match d.netns() {
                    0 => self.tracker.netns_of_event(d.sk(), d.tuple()),
                    n => n,
                };
                if of != ns {
                    self.tally.filtered += 1;
                    continue;
                }
            }
            // --cgroup: the same, by the cgroup's path (the cgroup or below it).
            if self.args.cgroup.is_some() {
                let id = match d.cgroup() {
                    0 => self.tracker.cgroup_of_event(d.sk(), d.tuple()),
                    id => id,
                };
                if !self.wanted_cgroup(id) {
                    self.tally.filtered += 1;
                    continue;
                }
            }
            match d {
                Decoded::Transition(t) => {
                    self.tracker.on_transition(t, &mut facts);
                }
                Decoded::Segment(s) => self.tracker.on_segment(s, &mut facts),
            }
            self.write_facts(&mut facts, now);
        }
        // Activity for the idle re-read: events that reached the tracker.
        let applied = batch.decoded.len() as u64 - (self.tally.filtered - filtered);
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

    /// Whether `--cgroup` (if given) keeps a socket of cgroup `id`.
    fn wanted_cgroup(&mut self, id: u64) -> bool {
        let Some(want) = &self.args.cgroup else {
            return true;
        };
        self.workloads
            .get(id)
            .is_some_and(|w| setup::under(&w.cgroup, want))
    }

    /// Writes transition facts at once; anomaly facts go through the owner check.
    fn write_facts(&mut self, facts: &mut Vec<Fact>, now: Instant) {
        if facts.is_empty() {
            return;
        }
        let mut rest = Vec::new();
        for f in facts.drain(..) {
            match f {
                Fact::Moved(m) => self.write_moved(&m, now),
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
                Fact::Moved(m) => self.write_moved(&m, now),
                other => rest.push(other),
            }
        }
        if let Some(job) = self.verifier.push(rest) {
            self.workers.submit(job);
        }
        self.release();
    }

    /// A transition's record, built only if a sink wants it. A socket's birth resolves its
    /// cgroup either way, so the name is known even if the cgroup is removed before anything
    /// is written; later transitions look it up only for a record.
    fn write_moved(&mut self, m: &crate::tracker::Moved, now: Instant) {
        let clock = self.clock;
        if matches!(m.old, TcpState::Close | TcpState::Listen) {
            self.workloads.get(m.cgroup);
        }
        let workloads = &mut self.workloads;
        self.sinks.transition(now, || {
            let mut t = crate::record::TransitionRecord::from_moved(m, clock);
            t.workload = workloads.get(m.cgroup);
            Record::Transition(t)
        });
    }

    fn release(&mut self) {
        let ready: Vec<Fact> = self.verifier.ready().collect();
        let now = Instant::now();
        for f in &ready {
            let rec = self.record(f);
            self.sinks.emit(&rec, now);
        }
    }

    /// The record of a fact other than a transition, with its workload: the socket's, or for
    /// a leak or a refused bind the process's own (`/proc/PID/cgroup`).
    fn record(&mut self, f: &Fact) -> Record {
        let mut rec = Record::from_fact(f, self.clock);
        let w = match f {
            Fact::Leak(crate::tracker::Leak { task, .. })
            | Fact::BindRefused(crate::tracker::BindRefused { task, .. }) => {
                crate::workload::cgroup_of_pid(task.pid)
                    .map(|p| std::sync::Arc::new(crate::workload::Workload::from_path(p)))
            }
            f => self.workloads.get(f.cgroup()),
        };
        rec.set_workload(w);
        rec
    }

    fn emit(&mut self, rec: &Record) {
        self.sinks.emit(rec, Instant::now());
    }

    fn on_tick(&mut self) {
        let now = monotonic_ns();
        // Events were lost: the table may hold ghosts. No anomaly until a reconciliation,
        // which starts now rather than at its interval.
        if self.recovery.tick(&self.program.counters(), now) {
            self.tracker.set_incomplete(true);
            self.start_reconcile(true);
        }
        self.ask_settings();
        self.ask_moved();
        let mut facts = Vec::new();
        self.tracker.expire(now, &mut facts);
        self.publish(facts);
    }

    fn counters(&self) -> Counters {
        let k = self.program.counters();
        Counters {
            events: self.tally.events,
            dropped: k.ringbuf_full,
            recursion_misses: k.recursion_misses,
            undecodable: self.tally.undecodable,
            late: self.tally.late,
            log_suppressed: self.sinks.suppressed("log"),
            log_dropped: self.sinks.dropped("log"),
            stdout_dropped: self.sinks.dropped("stdout"),
            outputs_dropped: self.sinks.each_dropped(),
            segments_dropped: k.segments_full,
            resets_no_socket: k.resets_no_socket,
            drops_no_socket: self.drops_no_socket(),
            drops_lost: k.drops_full,
            reconciliations: self.tally.reconciliations,
        }
    }

    /// TCP packets dropped with no socket named, by reason; none without `--drops`.
    fn drops_no_socket(&self) -> Vec<(u16, u64)> {
        match &self.drops {
            Some(watched) => self.program.drops_no_socket(watched),
            None => Vec::new(),
        }
    }

    fn page(&mut self, page: Page, reply: http::Reply) {
        match page {
            Page::Metrics => {
                let top = crate::workload::top::top_of(
                    self.tracker.by_cgroup(),
                    &mut self.workloads,
                    usize::from(self.args.metrics_top),
                );
                let _ = reply.send(metrics::render(
                    &self.tracker,
                    self.counters(),
                    (
                        top,
                        usize::from(self.args.metrics_top_destinations),
                        monotonic_ns(),
                    ),
                    &self.features,
                    self.program.costs(),
                ));
            }
            Page::Status => {
                let open = self.tracker.open_anomalies(monotonic_ns());
                let job = self.verifier.status(open, reply);
                self.workers.submit(job);
            }
            Page::Sockets(st) => {
                let list = crate::status::SocketList::build(
                    &self.tracker,
                    st,
                    monotonic_ns(),
                    self.args.log_file.clone(),
                );
                let _ = reply.send(serde_json::to_string(&list).unwrap_or_default());
            }
        }
    }

    fn reopen_log(&mut self) {
        self.sinks.reopen();
    }

    /// The last batch is in: raise what is due, write everything and the final counts.
    fn finish(&mut self) {
        let mut facts = Vec::new();
        self.tracker.flush_births(&mut facts);
        self.write_facts(&mut facts, Instant::now());
        self.tracker.expire(monotonic_ns(), &mut facts);
        let _ = self.verifier.push(facts);
        let rest: Vec<Fact> = self.verifier.drain_all().collect();
        let now = Instant::now();
        for f in &rest {
            let rec = self.record(f);
            self.sinks.emit(&rec, now);
        }
        let k = self.program.counters();
        let stopped = Record::Stopped(Stopped {
            ts: std::time::SystemTime::now(),
            events: self.tally.events,
            dropped: k.ringbuf_full,
            recursion_misses: k.recursion_misses,
            undecodable: self.tally.undecodable,
            table_full: self.tracker.refused(),
            timewait_full: self.tracker.timewait_refused(),
            log_dropped: self.sinks.dropped("log"),
            filtered: self.tally.filtered,
            uptime_s: self.started.elapsed().as_secs_f64(),
        });
        self.emit(&stopped);
        self.sinks.flush(Instant::now());
        self.sinks.finish(Duration::from_secs(5));
        self.collector.join();
        eprintln!("{}", summary(&self.tracker));
    }
}
