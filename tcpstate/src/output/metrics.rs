//! Prometheus exposition, rendered at scrape time from a snapshot of the
//! tracker's aggregates: the event path pays nothing for metrics. Labels
//! are bounded by construction (states, state pairs, anomaly kinds), the per-workload
//! ones by --metrics-top, the per-destination ones by --metrics-top-destinations.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::{
    state::TcpState,
    tracker::{
        Tracker,
        ages::Ages,
        cgroups::{CLOSING, Counts},
        destinations::{self, Dest, STATES},
    },
    workload::top::Labels,
};

/// Upper bounds (seconds) of the time-in-state histogram buckets.
const BUCKETS: [f64; 12] = [
    0.0001, 0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
];

/// Counters that live outside the tracker.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub events: u64,
    pub dropped: u64,
    pub recursion_misses: u64,
    pub undecodable: u64,
    /// Events merged after newer ones: a CPU published one later than the 1 ms holdback.
    pub late: u64,
    pub log_suppressed: u64,
    pub log_dropped: u64,
    pub stdout_dropped: u64,
    /// Every output's lost records, by its name (`Sinks::each_dropped`).
    pub outputs_dropped: Vec<(&'static str, u64)>,
    /// Retransmit and reset events the kernel could not queue.
    pub segments_dropped: u64,
    /// Resets sent for no full socket.
    pub resets_no_socket: u64,
    /// TCP packets dropped with no full socket named, by reason (the kernel's number).
    pub drops_no_socket: Vec<(u16, u64)>,
    /// Drop events the kernel could not queue.
    pub drops_lost: u64,
    /// Reconciliations with the kernel's socket table ended.
    pub reconciliations: u64,
}

/// (state, sum in seconds, count, cumulative buckets).
type StateHistogram = (&'static str, f64, u64, Vec<(f64, u64)>);

#[derive(Debug)]
struct Snapshot {
    sockets: Vec<(&'static str, i64)>,
    transitions: Vec<(&'static str, &'static str, u64)>,
    durations: Vec<StateHistogram>,
    anomalies_raised: Vec<(&'static str, u64)>,
    anomalies_open: Vec<(&'static str, i64)>,
    failed_connects: Vec<(&'static str, u64)>,
    /// By the socket's state: retransmits, resets sent, resets received.
    segments: [Vec<(&'static str, u64)>; 3],
    synack_retransmits: u64,
    /// Packets dropped: (reason, the socket's state or `none`, count).
    drops: Vec<(String, &'static str, u64)>,
    /// `bind()` refused with EADDRINUSE: a fixed port taken, no free port for port 0.
    binds_refused: [u64; 2],
    resets: u64,
    leaks: u64,
    reconciled: u64,
    tracked: u64,
    capacity: u64,
    refused: u64,
    timewait_refused: u64,
    table_bytes: u64,
    timewait_bytes: u64,
    pressure_raised: u64,
    pressure_open: u64,
    backlog_raised: u64,
    backlog_open: u64,
    orphans_raised: u64,
    orphans_open: u64,
    host: crate::tracker::HostTcp,
    pressure_worst: f64,
    counters: Counters,
    /// The top workloads' closing sockets and open anomalies, `other` last.
    workloads: Vec<(Labels, Counts)>,
    /// Cgroups holding closing sockets or open anomalies (how many the top N summarise).
    workload_cgroups: u64,
    /// The top destinations' sockets per state, and the rest summed.
    destinations: (Vec<(Dest, destinations::Counts)>, destinations::Counts),
    /// Destinations counted by name (at most their cap).
    destinations_tracked: u64,
    /// The current ages of the sockets in each state counted per destination.
    ages: Vec<Ages>,
    /// Each optional capability and whether it is on (why not: the `started` record).
    features: Vec<(String, bool)>,
    /// The programs' own cost, from the kernel's counters.
    bpf: crate::program::BpfCosts,
}

/// The exposition at `now_ns`. `workloads` is [`crate::workload::top::top_of`] the
/// tracker's cgroups; `top_destinations`, how many destinations are named.
pub fn render(
    tracker: &Tracker,
    counters: Counters,
    (workloads, top_destinations, now_ns): (Vec<(Labels, Counts)>, usize, u64),
    features: &[crate::features::Feature],
    bpf: crate::program::BpfCosts,
) -> String {
    let agg = tracker.stats();
    let live = TcpState::ALL
        .into_iter()
        .filter(|s| !matches!(s, TcpState::Close | TcpState::NewSynRecv));
    let anomalies = tracker.anomaly_counts();
    let snap = Snapshot {
        sockets: live
            .map(|s| (s.name(), tracker.sockets(s) as i64))
            .collect(),
        transitions: TcpState::ALL
            .into_iter()
            .flat_map(|a| TcpState::ALL.into_iter().map(move |b| (a, b)))
            .filter_map(|(a, b)| {
                let n = agg.transitions[a as usize][b as usize];
                (n > 0).then_some((a.name(), b.name(), n))
            })
            .collect(),
        durations: TcpState::ALL
            .into_iter()
            .filter_map(|s| {
                let h = &agg.durations[s as usize];
                if h.is_empty() {
                    return None;
                }
                // prometheus-client sums the buckets it is given: per-bucket counts, then
                // what lies above the last bound as +Inf (running totals here were summed
                // twice, and a bucket could exceed _count).
                let mut below = 0;
                let mut buckets: Vec<(f64, u64)> = BUCKETS
                    .iter()
                    .map(|&le| {
                        let upto = h.count_between(0, (le * 1e6) as u64).min(h.len());
                        let n = upto.saturating_sub(below);
                        below = below.max(upto);
                        (le, n)
                    })
                    .collect();
                buckets.push((f64::INFINITY, h.len().saturating_sub(below)));
                let sum = h.mean() * h.len() as f64 / 1e6;
                Some((s.name(), sum, h.len(), buckets))
            })
            .collect(),
        anomalies_raised: anomalies.iter().map(|&(k, n, _)| (k.name(), n)).collect(),
        anomalies_open: anomalies
            .iter()
            .map(|&(k, _, open)| (k.name(), open as i64))
            .collect(),
        failed_connects: agg.connect_failures.iter().map(|(&r, &n)| (r, n)).collect(),
        segments: [&agg.retransmits, &agg.resets_sent, &agg.resets_received].map(|by_state| {
            TcpState::ALL
                .into_iter()
                .filter_map(|s| {
                    let n = by_state[s as usize];
                    (n > 0).then_some((s.name(), n))
                })
                .collect()
        }),
        synack_retransmits: agg.synack_retransmits,
        drops: agg
            .drops
            .iter()
            .map(|(&(reason, state), &n)| (crate::drops::name_of(reason), state.name(), n))
            .chain(
                counters
                    .drops_no_socket
                    .iter()
                    .map(|&(reason, n)| (crate::drops::name_of(reason), "none", n)),
            )
            .collect(),
        binds_refused: agg.binds_refused,
        resets: agg.resets,
        leaks: agg.leaks_suspected,
        reconciled: agg.reconciled,
        tracked: tracker.tracked() as u64,
        capacity: tracker.capacity() as u64,
        refused: tracker.refused(),
        timewait_refused: tracker.timewait_refused(),
        table_bytes: tracker.bytes() as u64,
        timewait_bytes: tracker.timewait_bytes() as u64,
        pressure_raised: tracker.pressure_raised(),
        pressure_open: tracker.pressure_open(),
        backlog_raised: tracker.backlog_raised(),
        backlog_open: tracker.backlog_open(),
        orphans_raised: tracker.orphans_raised(),
        orphans_open: tracker.orphans_open(),
        host: tracker.host_tcp(),
        pressure_worst: tracker.pressure_worst(),
        counters,
        workloads,
        workload_cgroups: tracker.by_cgroup().count() as u64,
        destinations: tracker.destinations().top(top_destinations),
        destinations_tracked: tracker.destinations().len() as u64,
        ages: tracker.ages(now_ns),
        features: features.iter().map(|f| (f.name.clone(), f.on)).collect(),
        bpf,
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snap));
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    to_prometheus_text(&out)
}

/// prometheus-client writes OpenMetrics, where a counter family `x` has
/// samples `x_total`; the classic text format (what `promtool check
/// metrics` and every Prometheus version parse) names the family
/// `x_total` and has no `# EOF`. Everything else is the same.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let lines: Vec<&str> = openmetrics.lines().collect();
    let mut counters = std::collections::HashSet::new();
    for l in &lines {
        if let Some(rest) = l.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            counters.insert(name);
        }
    }
    let mut out = String::with_capacity(openmetrics.len() + 64);
    for l in lines {
        if l == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE ", "# UNIT "]
            .into_iter()
            .find_map(|p| l.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let name = rest.split(' ').next().unwrap_or("");
                if counters.contains(name) {
                    out.push_str(p);
                    out.push_str(name);
                    out.push_str("_total");
                    out.push_str(&rest[name.len()..]);
                } else {
                    out.push_str(l);
                }
            }
            None => out.push_str(l),
        }
        out.push('\n');
    }
    out
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Snapshot {
    /// The per-label families: sockets, transitions, durations, anomalies.
    fn families(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let mut m = e.encode_descriptor(
            "tcpstate_feature_enabled",
            "1 when an optional capability is on on this kernel with these flags; why one is off is in the started record and on tcpstate status",
            None,
            MetricType::Gauge,
        )?;
        for (name, on) in &self.features {
            ConstGauge::new(i64::from(*on))
                .encode(m.encode_family(&[("feature", name.as_str())])?)?;
        }
        let mut m = e.encode_descriptor(
            "tcpstate_sockets",
            "Sockets in each TCP state now, as ss -tan counts them (TIME_WAIT and orphaned FIN_WAIT2 mini-sockets, SYN_RECV request sockets included)",
            None,
            MetricType::Gauge,
        )?;
        for &(state, n) in &self.sockets {
            ConstGauge::new(n).encode(m.encode_family(&[("state", state)])?)?;
        }
        let mut m = e.encode_descriptor(
            "tcpstate_transitions",
            "TCP state transitions seen, by old and new state",
            None,
            MetricType::Counter,
        )?;
        for &(from, to, n) in &self.transitions {
            ConstCounter::new(n).encode(m.encode_family(&[("from", from), ("to", to)])?)?;
        }
        let mut m = e.encode_descriptor(
            "tcpstate_state_duration_seconds",
            "Time sockets spent in a state, recorded when they left it",
            None,
            MetricType::Histogram,
        )?;
        for (state, sum, count, buckets) in &self.durations {
            m.encode_family(&[("state", *state)])?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    *sum, *count, buckets, None,
                )?;
        }
        let mut m = e.encode_descriptor(
            "tcpstate_anomalies",
            "Anomalies raised, by kind: every rule (a state's threshold: close_wait, fin_wait2, ...; time_wait_pressure, accept_queue_full, orphan_pressure)",
            None,
            MetricType::Counter,
        )?;
        for &(kind, n) in &self.anomalies_raised {
            ConstCounter::new(n).encode(m.encode_family(&[("kind", kind)])?)?;
        }
        let mut m = e.encode_descriptor(
            "tcpstate_anomalies_open",
            "Anomalies raised and not yet resolved, by kind (every rule)",
            None,
            MetricType::Gauge,
        )?;
        for &(kind, n) in &self.anomalies_open {
            ConstGauge::new(n).encode(m.encode_family(&[("kind", kind)])?)?;
        }
        let mut m = e.encode_descriptor(
            "tcpstate_failed_connects",
            "Connects that went SYN_SENT -> CLOSE, by reason (refused, timed_out, unreachable, reset, aborted, error; no_local_port: connect() got EADDRNOTAVAIL, no free ephemeral port to the destination; closed: no error, the socket was closed first)",
            None,
            MetricType::Counter,
        )?;
        for &(reason, n) in &self.failed_connects {
            ConstCounter::new(n).encode(m.encode_family(&[("reason", reason)])?)?;
        }
        self.workload_families(e)?;
        self.destination_families(e)?;
        self.bpf_families(e)?;
        self.output_families(e)?;
        let [retransmits, sent, received] = &self.segments;
        for (name, help, values) in [
            (
                "tcpstate_retransmits",
                "Segments retransmitted, by the socket's state (tcp_retransmit_skb)",
                retransmits,
            ),
            (
                "tcpstate_resets_sent",
                "Resets this host sent on a full socket, by its state (tcp_send_reset)",
                sent,
            ),
            (
                "tcpstate_resets_received",
                "Resets received by a full socket, by its state (tcp_receive_reset)",
                received,
            ),
        ] {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for &(state, n) in values {
                ConstCounter::new(n).encode(m.encode_family(&[("state", state)])?)?;
            }
        }
        let mut m = e.encode_descriptor(
            "tcpstate_drops",
            "TCP packets the kernel dropped (skb:kfree_skb, --drops), by reason and the state of the socket it named (none: no full socket, as for a SYN to a closed port; those are the host's, whatever the filters)",
            None,
            MetricType::Counter,
        )?;
        for (reason, state, n) in &self.drops {
            ConstCounter::new(*n)
                .encode(m.encode_family(&[("reason", reason.as_str()), ("state", state)])?)?;
        }
        let mut m = e.encode_descriptor(
            "tcpstate_binds_refused",
            "bind() on a TCP socket refused with EADDRINUSE, by reason: port_taken (a fixed port in use), no_free_port (port 0 and the local port range exhausted)",
            None,
            MetricType::Counter,
        )?;
        // Like the failed connects: a series from the first one, so that its appearance is
        // news an alert can see (tcpstate.rules.yml).
        for (reason, n) in ["port_taken", "no_free_port"]
            .into_iter()
            .zip(self.binds_refused)
            .filter(|&(_, n)| n > 0)
        {
            ConstCounter::new(n).encode(m.encode_family(&[("reason", reason)])?)?;
        }
        Ok(())
    }

    /// Unlabelled counters: (name, help, value).
    fn counters(&self) -> [(&'static str, &'static str, u64); 21] {
        let c = &self.counters;
        [
            (
                "tcpstate_resets",
                "Connections aborted: ESTABLISHED or CLOSE_WAIT -> CLOSE",
                self.resets,
            ),
            ("tcpstate_leaks_suspected", "Leak rule firings", self.leaks),
            (
                "tcpstate_reconciled",
                "Sockets removed because the kernel no longer had them (an event was lost)",
                self.reconciled,
            ),
            (
                "tcpstate_reconciliations",
                "Reconciliations with the kernel's socket table ended (periodic, at a quiet moment, after a loss): a gone namespace's sockets leave the table at the next one",
                c.reconciliations,
            ),
            (
                "tcpstate_events",
                "Events received from the kernel",
                c.events,
            ),
            (
                "tcpstate_events_dropped",
                "Events lost because the ring buffer was full",
                c.dropped,
            ),
            (
                "tcpstate_recursion_misses",
                "Events the kernel skipped because the program was already running on that CPU",
                c.recursion_misses,
            ),
            (
                "tcpstate_events_undecodable",
                "Events received that could not be decoded",
                c.undecodable,
            ),
            (
                "tcpstate_events_late",
                "Events a CPU published after the merge had passed their time (applied after newer ones)",
                c.late,
            ),
            (
                "tcpstate_log_suppressed",
                "Transition records the log rate limit dropped",
                c.log_suppressed,
            ),
            (
                "tcpstate_log_dropped",
                "Records the log could not write (disk full, unwritable path): counted, not kept",
                c.log_dropped,
            ),
            (
                "tcpstate_stdout_dropped",
                "Records dropped because stdout's reader did not keep up",
                c.stdout_dropped,
            ),
            (
                "tcpstate_table_refused",
                "Sockets not tracked because the table was full (counted once, at birth)",
                self.refused,
            ),
            (
                "tcpstate_timewait_refused",
                "TIME_WAIT mini-sockets not tracked because their table was full (--max-timewait)",
                self.timewait_refused,
            ),
            (
                "tcpstate_time_wait_pressure",
                "time_wait_pressure anomalies raised: one destination's TIME_WAIT sockets held more than the threshold's share of the ephemeral port range",
                self.pressure_raised,
            ),
            (
                "tcpstate_synack_retransmits",
                "SYN-ACKs a listener sent again: clients not completing their handshake (tcp_retransmit_synack)",
                self.synack_retransmits,
            ),
            (
                "tcpstate_resets_no_socket",
                "Resets sent for no full socket (a SYN to a closed port, a timewait or request socket)",
                c.resets_no_socket,
            ),
            (
                "tcpstate_drop_events_lost",
                "Drop events (--drops) lost because their kernel buffer was full: counted by no reason",
                c.drops_lost,
            ),
            (
                // Named before the code called these segment events; dashboards read it.
                "tcpstate_signals_dropped",
                "Retransmit and reset events lost because their kernel buffer was full",
                c.segments_dropped,
            ),
            (
                "tcpstate_orphan_pressure",
                "orphan_pressure anomalies raised: the host's orphans or TCP memory passed the threshold's share of tcp_max_orphans or tcp_mem",
                self.orphans_raised,
            ),
            (
                "tcpstate_accept_queue_full",
                "accept_queue_full anomalies raised: a listener's accept queue stayed at its backlog past the threshold",
                self.backlog_raised,
            ),
        ]
    }

    /// Unlabelled gauges: (name, help, value).
    fn gauges(&self) -> [(&'static str, &'static str, i64); 11] {
        let h = self.host;
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        [
            (
                "tcpstate_orphan_pressure_open",
                "1 while the host is under orphan_pressure",
                g(self.orphans_open),
            ),
            (
                "tcpstate_host_orphans",
                "Orphaned TCP sockets on the host (/proc/net/sockstat; 0 until read, or with orphan_pressure off)",
                g(h.orphans),
            ),
            (
                "tcpstate_host_max_orphans",
                "net.ipv4.tcp_max_orphans",
                g(h.max_orphans),
            ),
            (
                "tcpstate_host_tcp_mem_pages",
                "Pages of TCP memory in use on the host, against tcpstate_host_tcp_mem_max_pages (tcp_mem's hard limit)",
                g(h.mem_pages),
            ),
            (
                "tcpstate_host_tcp_mem_max_pages",
                "The last value of net.ipv4.tcp_mem: past it TCP drops and kills",
                g(h.mem_max_pages),
            ),
            (
                "tcpstate_accept_queue_full_open",
                "Listeners whose accept queue is at its backlog past the threshold now",
                self.backlog_open as i64,
            ),
            (
                "tcpstate_time_wait_pressure_open",
                "Destinations under time_wait_pressure now",
                self.pressure_open as i64,
            ),
            (
                "tcpstate_timewait_bytes",
                "Heap bytes held by the TIME_WAIT table",
                self.timewait_bytes as i64,
            ),
            (
                "tcpstate_tracked_sockets",
                "Sockets in the table",
                self.tracked as i64,
            ),
            (
                "tcpstate_table_bytes",
                "Heap bytes held by the socket tables and the deadlines",
                self.table_bytes as i64,
            ),
            (
                "tcpstate_table_capacity",
                "Most sockets the table holds (--max-sockets)",
                self.capacity as i64,
            ),
        ]
    }
}

impl Snapshot {
    /// What the agent costs in the kernel: each program's run time and count. The kernel
    /// counts only while kernel.bpf_stats_enabled is on, so they are exported only then (a
    /// counter frozen while it is off would read as a program that stopped running).
    /// Every output's lost records, by name: a new output is counted here with no change.
    fn output_families(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let mut m = e.encode_descriptor(
            "tcpstate_output_dropped",
            "Records each output (stdout, log, ...) lost: its reader or disk did not keep up, or a write failed",
            None,
            MetricType::Counter,
        )?;
        for &(output, n) in &self.counters.outputs_dropped {
            ConstCounter::new(n).encode(m.encode_family(&[("output", output)])?)?;
        }
        Ok(())
    }

    fn bpf_families(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let Some(on) = self.bpf.stats_enabled else {
            return Ok(());
        };
        gauge(
            e,
            "tcpstate_bpf_stats_enabled",
            "1 when kernel.bpf_stats_enabled is on, so tcpstate_bpf_run_time_seconds_total and tcpstate_bpf_run_count_total are exported",
            i64::from(on),
        )?;
        if !on {
            return Ok(());
        }
        let mut m = e.encode_descriptor(
            "tcpstate_bpf_run_time_seconds",
            "Time the kernel spent in each of tcpstate's BPF programs since it loaded them, while kernel.bpf_stats_enabled was on (run_time_ns)",
            None,
            MetricType::Counter,
        )?;
        for p in &self.bpf.programs {
            ConstCounter::new(p.run_time_ns as f64 / 1e9)
                .encode(m.encode_family(&[("program", p.program)])?)?;
        }
        let mut m = e.encode_descriptor(
            "tcpstate_bpf_run_count",
            "Runs of each of tcpstate's BPF programs since it loaded them, while kernel.bpf_stats_enabled was on (run_cnt)",
            None,
            MetricType::Counter,
        )?;
        for p in &self.bpf.programs {
            ConstCounter::new(p.run_cnt).encode(m.encode_family(&[("program", p.program)])?)?;
        }
        Ok(())
    }

    /// Per-workload gauges, bounded to --metrics-top workloads plus `other`.
    fn workload_families(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        // Label values come from cgroup names, which anyone with a delegated subtree chooses:
        // the exposition only escapes `\`, `"` and newlines, so an ESC or BEL would reach
        // whatever prints the scrape. Control characters get the text output's escapes;
        // backslashes stay single, as systemd's `\x2d` in unit names must.
        let labels = |l: &Labels| {
            [
                ("unit", label_value(&l.unit)),
                ("container_id", label_value(&l.container_id)),
                ("pod_uid", label_value(&l.pod_uid)),
            ]
        };
        let mut m = e.encode_descriptor(
            "tcpstate_workload_sockets",
            "Sockets in a closing state now, by the unit, container and pod that created them (the top --metrics-top workloads; the rest under unit=\"other\"; empty labels: no unit or container known)",
            None,
            MetricType::Gauge,
        )?;
        for (l, c) in &self.workloads {
            for (st, &n) in CLOSING.iter().zip(&c.closing) {
                let [u, k, p] = labels(l);
                let set = [("state", st.name().to_owned()), u, k, p];
                ConstGauge::new(i64::from(n)).encode(m.encode_family(&set)?)?;
            }
        }
        let mut m = e.encode_descriptor(
            "tcpstate_workload_anomalies_open",
            "Anomalies open now, by the unit, container and pod of the socket (top --metrics-top workloads and unit=\"other\")",
            None,
            MetricType::Gauge,
        )?;
        for (l, c) in &self.workloads {
            let set = labels(l);
            ConstGauge::new(i64::from(c.anomalies_open)).encode(m.encode_family(&set)?)?;
        }
        gauge(
            e,
            "tcpstate_workload_cgroups",
            "Cgroups with closing sockets or open anomalies now (the per-workload gauges keep the top --metrics-top)",
            self.workload_cgroups as i64,
        )
    }
}

impl Snapshot {
    /// Per-destination gauges, bounded to --metrics-top-destinations plus `other`, and the
    /// ages of live sockets (a label per state, nothing more).
    fn destination_families(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let mut m = e.encode_descriptor(
            "tcpstate_destination_sockets",
            "Sockets in SYN_SENT or a closing state now, by destination: the remote address:port of connections this host opened (direction=\"outbound\"), the local listening port of those it accepted (\"inbound\"), in network namespace netns (its inode); the top --metrics-top-destinations, the rest under destination=\"other\"",
            None,
            MetricType::Gauge,
        )?;
        let (top, rest) = &self.destinations;
        // The namespace is a label: two containers' 127.0.0.1:5432 are two series, never
        // one series twice.
        let named = top
            .iter()
            .map(|(d, c)| (d.addr(), d.direction(), d.netns().to_string(), c));
        let other = ("other".to_owned(), "other", String::new(), rest);
        for (dest, direction, netns, counts) in named.chain(std::iter::once(other)) {
            for (st, &n) in STATES.iter().zip(counts.iter()) {
                if n == 0 {
                    continue;
                }
                let set = [
                    ("state", st.name()),
                    ("destination", dest.as_str()),
                    ("direction", direction),
                    ("netns", netns.as_str()),
                ];
                ConstGauge::new(i64::from(n)).encode(m.encode_family(&set)?)?;
            }
        }
        gauge(
            e,
            "tcpstate_destinations",
            "Destinations whose sockets are counted by name now (at most 4096; past that they are summed under destination=\"other\")",
            self.destinations_tracked as i64,
        )?;
        let mut m = e.encode_descriptor(
            "tcpstate_socket_age_seconds",
            "The current ages of the live sockets in SYN_SENT and each closing state, at this scrape (a pile-up in one bucket is a timeout)",
            None,
            MetricType::Histogram,
        )?;
        for a in &self.ages {
            m.encode_family(&[("state", a.state.name())])?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                a.sum_s,
                a.count(),
                &a.buckets(),
                None,
            )?;
        }
        Ok(())
    }
}

fn label_value(s: &str) -> String {
    crate::output::escape::escape_controls(s).into_owned()
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        self.families(&mut e)?;
        for (name, help, v) in self.counters() {
            counter(&mut e, name, help, v)?;
        }
        for (name, help, v) in self.gauges() {
            gauge(&mut e, name, help, v)?;
        }
        ConstGauge::new(self.pressure_worst).encode(e.encode_descriptor(
            "tcpstate_time_wait_pressure_ratio",
            "The fullest destination's TIME_WAIT sockets over its ephemeral port range size",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::{Config, rules::thresholds::Thresholds};

    /// A tracker with no thresholds or host rules: only what a test feeds it.
    fn quiet_tracker(capacity: usize) -> Tracker {
        Tracker::new(Config {
            capacity,
            timewait_capacity: 16,
            thresholds: Thresholds::none(),
            leak_threshold: 2,
            rules: crate::tracker::RuleSettings::off(),
        })
    }

    #[test]
    fn label_values_carry_no_control_characters() {
        let tracker = quiet_tracker(16);
        let hostile = Labels {
            unit: "evil\x1b[31m\x07\\x2d.service".into(),
            container_id: String::new(),
            pod_uid: "\u{9b}2J".into(),
        };
        let mut counts = Counts::default();
        counts.closing[0] = 1;
        counts.anomalies_open = 1;
        let text = render(
            &tracker,
            Counters::default(),
            (vec![(hostile, counts)], 20, 0),
            &[],
            crate::program::BpfCosts::default(),
        );
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        // One backslash in the value, doubled by the exposition format.
        assert!(
            text.contains(r#"unit="evil\\e[31m\\x07\\x2d.service""#),
            "{text}"
        );
        assert!(text.contains(r#"pod_uid="\\xc2\\x9b2J""#), "{text}");
    }

    /// Socket `sk`, 127.0.0.1:40000 -> 10.0.3.7:`dport`, moving `old` -> `new` at `ts_ns`.
    fn moved(
        sk: u64,
        dport: u16,
        (old, new): (TcpState, TcpState),
        ts_ns: u64,
    ) -> crate::decode::Transition {
        crate::decode::Transition {
            cgroup: 0,
            ts_ns,
            sk,
            tuple: crate::socket::Tuple::new(
                "127.0.0.1".parse().expect("addr"),
                40000,
                "10.0.3.7".parse().expect("addr"),
                dport,
            ),
            old,
            new,
            ending: crate::decode::Ending::Closed { errno: 0 },
            pid: 1,
            comm: crate::socket::Comm::new("client"),
            netns: 7,
        }
    }

    /// A connect to 10.0.3.7:`dport` at `ts_ns`, stuck in SYN_SENT.
    fn connect(tracker: &mut Tracker, sk: u64, dport: u16, ts_ns: u64) {
        let t = moved(sk, dport, (TcpState::Close, TcpState::SynSent), ts_ns);
        tracker.on_transition(&t, &mut Vec::new());
    }

    /// Every output's losses show by name, whatever the output: a new one needs no change here.
    #[test]
    fn every_output_is_counted_by_name() {
        let tracker = quiet_tracker(16);
        let counters = Counters {
            outputs_dropped: vec![("stdout", 0), ("log", 3), ("otel", 7)],
            ..Counters::default()
        };
        let text = render(
            &tracker,
            counters,
            (vec![], 2, 0),
            &[],
            crate::program::BpfCosts::default(),
        );
        for (output, n) in [("stdout", 0), ("log", 3), ("otel", 7)] {
            let line = format!(r#"tcpstate_output_dropped_total{{output="{output}"}} {n}"#);
            assert!(text.contains(&line), "{line} in {text}");
        }
    }

    #[test]
    fn state_durations_are_cumulative_once_and_end_at_inf() {
        let mut tracker = quiet_tracker(1000);
        let s = 1_000_000_000;
        // SYN_SENT for 0.2 s, 2 s and 2 h (past the last bound).
        for (i, lived) in [s / 5, 2 * s, 7200 * s].into_iter().enumerate() {
            let sk = 0xffff_0000_0000_0000_u64 + 0x40 * (i as u64 + 1);
            connect(&mut tracker, sk, 443, 0);
            let up = moved(sk, 443, (TcpState::SynSent, TcpState::Established), lived);
            tracker.on_transition(&up, &mut Vec::new());
        }
        let text = render(
            &tracker,
            Counters::default(),
            (vec![], 2, 0),
            &[],
            crate::program::BpfCosts::default(),
        );
        for (le, n) in [
            ("0.1", 0),
            ("0.5", 1),
            ("1.0", 1),
            ("5.0", 2),
            ("3600.0", 2),
            ("+Inf", 3),
        ] {
            let line = format!(
                r#"tcpstate_state_duration_seconds_bucket{{le="{le}",state="SYN_SENT"}} {n}"#
            );
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(
            text.contains(r#"tcpstate_state_duration_seconds_count{state="SYN_SENT"} 3"#),
            "{text}"
        );
    }

    #[test]
    fn destinations_past_the_top_k_are_one_series_and_ages_a_histogram() {
        let mut tracker = quiet_tracker(1000);
        let s = 1_000_000_000;
        // Port 1 gets 5 sockets, port 2 gets 4, then 100 ports one each.
        let mut sk = 0xffff_0000_0000_0000_u64;
        for port in [1, 1, 1, 1, 1, 2, 2, 2, 2].into_iter().chain(3..103) {
            sk += 0x40;
            connect(&mut tracker, sk, port, 0);
        }
        let text = render(
            &tracker,
            Counters::default(),
            (vec![], 2, 90 * s),
            &[],
            crate::program::BpfCosts::default(),
        );
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("tcpstate_destination_sockets{"))
            .collect();
        assert_eq!(
            series,
            [
                r#"tcpstate_destination_sockets{state="SYN_SENT",destination="10.0.3.7:1",direction="outbound",netns="7"} 5"#,
                r#"tcpstate_destination_sockets{state="SYN_SENT",destination="10.0.3.7:2",direction="outbound",netns="7"} 4"#,
                r#"tcpstate_destination_sockets{state="SYN_SENT",destination="other",direction="other",netns=""} 100"#,
            ],
            "{text}"
        );
        assert!(text.contains("tcpstate_destinations 102\n"), "{text}");
        // 90 s old: in the 300 s bucket, not the 60 s one.
        for (le, n) in [("60.0", 0), ("300.0", 109), ("14400.0", 109), ("+Inf", 109)] {
            let line =
                format!(r#"tcpstate_socket_age_seconds_bucket{{le="{le}",state="SYN_SENT"}} {n}"#);
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(
            text.contains(r#"tcpstate_socket_age_seconds_count{state="SYN_SENT"} 109"#),
            "{text}"
        );
    }

    #[test]
    fn bpf_costs_are_exported_only_while_the_kernel_counts_them() {
        let tracker = quiet_tracker(16);
        let costs = |on| crate::program::BpfCosts {
            stats_enabled: Some(on),
            programs: vec![crate::program::ProgramCost {
                program: "inet_sock_set_state",
                run_time_ns: 1_500_000_000,
                run_cnt: 7,
            }],
        };
        let render = |c| {
            to_prometheus_text(&render(
                &tracker,
                Counters::default(),
                (vec![], 20, 0),
                &[],
                c,
            ))
        };
        let on = render(costs(true));
        assert!(on.contains("tcpstate_bpf_stats_enabled 1\n"), "{on}");
        assert!(
            on.contains(
                "tcpstate_bpf_run_time_seconds_total{program=\"inet_sock_set_state\"} 1.5\n"
            ),
            "{on}"
        );
        assert!(
            on.contains("tcpstate_bpf_run_count_total{program=\"inet_sock_set_state\"} 7\n"),
            "{on}"
        );
        let off = render(costs(false));
        assert!(off.contains("tcpstate_bpf_stats_enabled 0\n"), "{off}");
        assert!(!off.contains("tcpstate_bpf_run_count_total{"), "{off}");
        assert!(
            !off.contains("tcpstate_bpf_run_time_seconds_total{"),
            "{off}"
        );
    }

    #[test]
    fn counters_get_their_total_name_and_eof_goes() {
        let om = "# HELP a_x A thing\n# TYPE a_x counter\na_x_total 3\n# HELP g G\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_x_total A thing\n# TYPE a_x_total counter\na_x_total 3\n# HELP g G\n# TYPE g gauge\ng 1\n"
        );
    }
}
