//! The jobs given to the workers (`crate::workers`), and their answers applied in order with
//! the events: reconciliation, the mini-socket sweep, owner checks and namespace settings.
//! What a lost event changes is `recovery.rs`'s.

use super::{Daemon, Dump, Job, Reply, recovery::Ended};
use crate::program::Admits as _;
use crate::workers::Confirmed;
use crate::{clock::monotonic_ns, status::Report};

pub(super) enum Parked {
    Reconciled(Dump),
    Confirmed(Confirmed),
    Swept(crate::tracker::Swept),
}

impl Parked {
    fn at_ns(&self) -> u64 {
        match self {
            Parked::Reconciled(d) => d.started_ns,
            Parked::Confirmed(c) => c.done_ns,
            Parked::Swept(p) => p.done_ns,
        }
    }
}

/// Jobs out with the workers, so none is queued twice.
#[derive(Default)]
pub(super) struct InFlight {
    pub(super) sweeps: usize,
    /// The sweeps out listed as many TIME_WAIT as one may: more are due, and are asked for
    /// as soon as these are in, not half a second later.
    pub(super) sweep_full: bool,
    /// A sweep since the last listing ended some: the next is worth asking for at once.
    pub(super) sweep_ended: bool,
    pub(super) settings: std::collections::HashSet<u32>,
    /// A [`Job::Moved`] is out.
    pub(super) moved: bool,
    /// Ticks since the last one was asked.
    pub(super) since_moved: u32,
    pub(super) listeners: bool,
    pub(super) host_tcp: bool,
    /// Sweeps since the last reading of the host's orphan counts.
    pub(super) since_host_tcp: u32,
    /// Sweeps since the last poll of listeners.
    pub(super) since_listeners: u32,
    /// Sweeps since namespaces' settings were last read again.
    pub(super) since_settings: u32,
    /// Namespaces whose settings could not be read: asked again only where processes and
    /// names pin namespaces, every 10 ticks.
    pub(super) unreadable: std::collections::HashSet<u32>,
    /// Ticks since those were last asked again.
    pub(super) since_retry: u32,
    /// Answers about the kernel's table that came before the events up to
    /// them were applied: they wait, so nothing is judged on stale events.
    pub(super) parked: std::collections::VecDeque<Parked>,
}

impl Daemon {
    /// Asks for the settings of namespaces met for the first time: the TIME_WAIT pressure rule
    /// judges a namespace by its own port range, so this is asked every tick, not every sweep.
    /// One that could not be read (gone, or pinned by nothing yet) is judged by the host's
    /// settings and asked again every 500 ms where processes and names pin namespaces: a new
    /// namespace may have been given its inode number, and must not wait for a reconciliation
    /// to find the old one gone. Only the first ask walks every socket fd.
    pub(super) fn ask_settings(&mut self) {
        let without = self.tracker.netns_without_info();
        self.jobs
            .unreadable
            .retain(|n| without.binary_search(n).is_ok());
        self.jobs.since_retry += 1;
        let retry = self.jobs.since_retry >= 10;
        if retry {
            self.jobs.since_retry = 0;
        }
        for netns in without {
            let again = self.jobs.unreadable.contains(&netns);
            if (!again || retry) && self.jobs.settings.insert(netns) {
                self.workers.submit(Job::Settings {
                    netns,
                    walk: !again,
                });
            }
        }
    }

    /// Asks, every 250 ms, whether a namespace whose settings were read is still the one read.
    /// The kernel gives a destroyed namespace's inode number to the next one made, and on a
    /// busy host (a namespace made and deleted every 300 ms) the next one is often made before
    /// anything says the last one is gone: its TIME_WAIT were judged by the dead one's port
    /// range until the 10 s re-read, and a 100-port namespace's pressure went unsaid. A stat
    /// per namespace while its path holds.
    pub(super) fn ask_moved(&mut self) {
        self.jobs.since_moved += 1;
        if self.jobs.moved || self.jobs.since_moved < 5 {
            return;
        }
        let namespaces = self.tracker.netns_with_info();
        if namespaces.is_empty() {
            return;
        }
        self.jobs.since_moved = 0;
        self.jobs.moved = self.workers.submit(Job::Moved { namespaces });
    }

    /// Checks mini-sockets with the kernel, and re-reads its table when things went quiet.
    pub(super) fn sweep(&mut self) {
        if self.jobs.sweeps == 0 {
            self.submit_sweeps();
        }
        self.poll_listeners();
        self.refresh_settings();
        // Every 2 s: three small /proc reads.
        self.jobs.since_host_tcp += 1;
        if self.tracker.watches_orphans()
            && !self.jobs.host_tcp
            && self.jobs.since_host_tcp >= 4
            && self.workers.submit(Job::HostTcp)
        {
            self.jobs.host_tcp = true;
            self.jobs.since_host_tcp = 0;
        }
        // A quiet moment after activity: one full re-read makes the counts exact (TIME_WAIT
        // killed early by an RST, request sockets), at no cost while traffic flows.
        if self.tally.since_sweep == 0 && self.tally.since_reconcile > 0 {
            self.start_reconcile(true);
        }
        self.tally.since_sweep = 0;
    }

    fn submit_sweeps(&mut self) {
        let sweeps = self.tracker.sweep_lookups(monotonic_ns());
        let listed: usize = sweeps.iter().map(|p| p.timewait.len()).sum();
        self.jobs.sweep_full = listed >= crate::tracker::MAX_SWEPT_TIMEWAIT;
        self.jobs.sweep_ended = false;
        for p in sweeps {
            if self.workers.submit(Job::Sweep(p)) {
                self.jobs.sweeps += 1;
            }
        }
    }

    /// Reads known namespaces' settings again every 10 s: an operator may widen a port range,
    /// and a namespace destroyed between two reconciliations leaves its inode number to the
    /// next one made. Unchanged settings cost nothing more than the read; one that cannot be
    /// read keeps what was read (a reconciliation finds it gone).
    fn refresh_settings(&mut self) {
        self.jobs.since_settings += 1;
        if self.jobs.since_settings < 20 {
            return;
        }
        self.jobs.since_settings = 0;
        for netns in self.tracker.netns_with_info() {
            if self.jobs.settings.insert(netns) {
                self.workers.submit(Job::Settings { netns, walk: false });
            }
        }
    }

    /// Asks for the accept queues of the listeners in the namespaces we track, every other
    /// sweep (a LISTEN-only dump walks the kernel's listening hash, not its sockets).
    fn poll_listeners(&mut self) {
        self.jobs.since_listeners += 1;
        if !self.tracker.watches_backlogs() || self.jobs.listeners || self.jobs.since_listeners < 2
        {
            return;
        }
        let namespaces = self.tracker.listener_namespaces();
        if self.workers.submit(Job::Listeners { namespaces }) {
            self.jobs.listeners = true;
            self.jobs.since_listeners = 0;
        }
    }

    /// Starts a reconciliation. `full`: TIME_WAIT mini-sockets too (after a loss, at a quiet
    /// moment, and every `--full-reconcile-every`th time); the others dump full sockets and
    /// FIN_WAIT2 mini-sockets only, which costs little whatever TIME_WAIT load the host has.
    pub(super) fn start_reconcile(&mut self, full: bool) {
        let Some(start) = self.recovery.begin(full) else {
            return;
        };
        let (namespaces, unknown) = self.tracker.namespaces();
        let (namespaces, everywhere) = match self.args.netns {
            // A --netns daemon tracks nothing elsewhere (an event of unknown namespace is
            // matched through the table or dropped), and must adopt nothing from elsewhere.
            Some(only) => (vec![only], false),
            None => {
                // After a loss the sockets met mid-life, of unknown namespace, may not be
                // applied yet (this can run before the rings are drained): look everywhere
                // then too.
                let mut v: Vec<u32> = namespaces.into_iter().collect();
                v.sort_unstable();
                (v, unknown || start.everywhere)
            }
        };
        if self.workers.submit(Job::Reconcile {
            namespaces,
            timewait: start.timewait,
            everywhere,
            filters: super::setup::filters(&self.args),
        }) {
            self.tally.since_reconcile = 0;
        } else {
            self.recovery.not_sent();
        }
    }

    pub(super) fn on_reply(&mut self, reply: Reply) {
        match reply {
            // Every event from before a dump or lookup must be applied first, so a socket
            // whose CLOSE is merely queued is not taken for a ghost, and a transition the
            // events show is not reported as found by sock_diag.
            Reply::Reconciled(dump) => {
                self.jobs.parked.push_back(Parked::Reconciled(dump));
                self.unpark();
            }
            Reply::Confirmed(c) => {
                self.jobs.parked.push_back(Parked::Confirmed(c));
                self.unpark();
            }
            Reply::Swept(r) => {
                self.jobs.sweeps = self.jobs.sweeps.saturating_sub(1);
                self.jobs.parked.push_back(Parked::Swept(r));
                self.unpark();
            }
            Reply::Owners {
                ticket,
                holders,
                vitals,
                unreadable,
            } => self.owners_checked(ticket, &holders, &vitals, unreadable),
            Reply::Settings { netns, info } => {
                self.jobs.settings.remove(&netns);
                if info.is_none() {
                    self.jobs.unreadable.insert(netns);
                }
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
            Reply::Moved(moved) => {
                self.jobs.moved = false;
                let mut facts = Vec::new();
                for (netns, info) in moved {
                    if let Some(info) = info {
                        self.tracker
                            .set_netns_info(netns, info, monotonic_ns(), &mut facts);
                    }
                }
                self.publish(facts);
            }
            Reply::Listeners {
                at_ns,
                namespaces,
                mut listeners,
            } => {
                self.jobs.listeners = false;
                let f = super::setup::filters(&self.args);
                listeners.retain(|l| f.admits_tuple(&l.tuple));
                let mut facts = Vec::new();
                self.tracker
                    .listeners_polled(at_ns, &namespaces, &listeners, &mut facts);
                self.publish(facts);
            }
            Reply::HostTcp(host) => {
                self.jobs.host_tcp = false;
                if let Some(host) = host {
                    let mut facts = Vec::new();
                    self.tracker.host_tcp_read(monotonic_ns(), host, &mut facts);
                    self.publish(facts);
                }
            }
            Reply::SeedPart { .. } | Reply::SeedExpects { .. } | Reply::Seeded { .. } => {}
        }
    }

    /// Applies the parked answers whose events are all in.
    pub(super) fn unpark(&mut self) {
        while let Some(p) = self
            .jobs
            .parked
            .pop_front_if(|p| p.at_ns() <= self.watermark_ns)
        {
            match p {
                Parked::Reconciled(dump) => self.reconciled(dump),
                Parked::Confirmed(c) => {
                    let mut facts = Vec::new();
                    self.tracker
                        .confirm_gone(&c.found, c.dump_start_ns, c.done_ns, &mut facts);
                    self.publish(facts);
                    self.reconciliation_done(c.dump_start_ns);
                }
                Parked::Swept(r) => {
                    let mut facts = Vec::new();
                    self.tracker.apply_sweep(&r, &mut facts);
                    self.publish(facts);
                    self.jobs.sweep_ended |= r.timewait_gone > 0;
                }
            }
        }
        // A burst's expiry: the next bounded part at once, while the last ones still end.
        if self.jobs.sweeps == 0
            && self.jobs.sweep_full
            && self.jobs.sweep_ended
            && !self
                .jobs
                .parked
                .iter()
                .any(|p| matches!(p, Parked::Swept(_)))
        {
            self.submit_sweeps();
        }
    }

    pub(super) fn reconciled(&mut self, mut dump: Dump) {
        let now = dump.started_ns;
        let mut facts = Vec::new();
        if self.args.cgroup.is_some() {
            // Mini-sockets carry no cgroup: a --cgroup daemon follows its own sockets into
            // TIME_WAIT and adopts none it did not see close.
            for (_, a) in &mut dump.alive {
                a.adopt_timewait = false;
            }
        }
        // Placed first, so the namespaces' own reconciliations judge what was placed.
        let mut suspects = self
            .tracker
            .place_unknown(&dump.alive, dump.complete, dump.started_ns);
        for (ns, a) in &dump.alive {
            suspects.extend(
                self.tracker
                    .reconcile(*ns, a, dump.started_ns, now, &mut facts),
            );
        }
        // A namespace let go frees its sock_diag socket and its share of the table.
        let let_go = !dump.gone.is_empty();
        for ns in dump.gone {
            self.jobs.unreadable.remove(&ns);
            self.tracker.netns_gone(ns, now, &mut facts);
        }
        let dumped: usize = dump
            .alive
            .iter()
            .map(|(_, a)| a.tuples.len() + a.minis.len())
            .sum();
        drop(dump.alive);
        if dumped >= crate::memory::TRIM_AFTER || let_go {
            crate::memory::give_back();
        }
        self.publish(facts);
        if !suspects.is_empty()
            && self.workers.submit(Job::Confirm {
                suspects,
                dump_start_ns: dump.started_ns,
            })
        {
            // It ends when the lookups come back; the table stays untrusted until then.
            return;
        }
        self.reconciliation_done(dump.started_ns);
    }

    /// A reconciliation that started at `started_ns` is over: the table is trusted again
    /// unless events were lost since it started.
    fn reconciliation_done(&mut self, started_ns: u64) {
        self.tally.reconciliations += 1;
        match self.recovery.end(started_ns) {
            Ended::Trusted => self.tracker.set_incomplete(false),
            Ended::Again => self.start_reconcile(true),
            Ended::Unchanged => {}
        }
    }

    pub(super) fn owners_checked(
        &mut self,
        ticket: u64,
        holders: &[crate::workers::Holder],
        vitals: &[Option<crate::socket::Vitals>],
        unreadable: u32,
    ) {
        if unreadable > 0 {
            crate::warn(format_args!(
                "owner check could not read the fds of {unreadable} processes (raise LimitNOFILE?); those owners are shown as attributed, not verified"
            ));
        }
        let answer = self.verifier.answer(ticket, holders, vitals);
        for (a, task) in self.verifier.take_verified() {
            self.tracker.holder_verified(&a, task);
        }
        if let Some((open, reply)) = answer {
            let mut report = Report::build(
                &self.tracker,
                self.counters(),
                (&open, &mut self.workloads),
                (self.clock, crate::clock::monotonic_ns()),
                self.started.elapsed().as_secs_f64(),
            );
            report.features.clone_from(&self.features);
            report.set_bpf(&self.program.costs());
            let _ = reply.send(serde_json::to_string(&report).unwrap_or_default());
        }
        self.release();
    }

    pub(super) fn report_losses(&mut self) {
        let k = self.program.counters();
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
}
