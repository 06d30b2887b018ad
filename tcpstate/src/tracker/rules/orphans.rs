//! `orphan_pressure`: the kernel keeps closing sockets nobody holds (FIN_WAIT1, LAST_ACK,
//! CLOSING) up to `net.ipv4.tcp_max_orphans`, and all TCP memory up to `tcp_mem`'s last
//! value; past either it kills orphans outright ("too many orphaned sockets", "out of
//! memory"), and their peers see resets. Both counts are host-wide (`/proc/net/sockstat`),
//! so this is one condition for the host, raised when either passes a share of its limit,
//! and it names the processes whose closing sockets are the most.

use std::collections::HashMap;

use super::{HostRule, Rule, RuleDetail, RuleId};
use crate::record::AnomalyRecord;
use crate::tracker::{
    facts::{Anomaly, Detail, Fact, Kind, Owner, Resolution, Task},
    table::{Comms, OwnerRef, Table, flag},
};
use crate::{socket::Tuple, state::TcpState};

/// The default: half of `tcp_max_orphans` or of `tcp_mem`, early enough to act before the
/// kernel starts killing orphans.
pub const DEFAULT_SHARE: f64 = 0.5;

/// The host's TCP orphan and memory counts and their limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostTcp {
    pub orphans: u64,
    /// `net.ipv4.tcp_max_orphans`.
    pub max_orphans: u64,
    /// Pages of TCP memory in use, and `tcp_mem`'s hard limit.
    pub mem_pages: u64,
    pub mem_max_pages: u64,
}

impl HostTcp {
    /// The fuller of the two, as a share of its limit.
    pub fn ratio(&self) -> f64 {
        let share = |n: u64, max: u64| if max == 0 { 0.0 } else { n as f64 / max as f64 };
        share(self.orphans, self.max_orphans).max(share(self.mem_pages, self.mem_max_pages))
    }

    /// From `/proc/net/sockstat` (`TCP: inuse 5 orphan 1 tw 0 alloc 7 mem 268`), the
    /// `tcp_max_orphans` value and `tcp_mem` (three page counts).
    pub fn parse(sockstat: &str, max_orphans: &str, tcp_mem: &str) -> Option<Self> {
        let tcp = sockstat.lines().find_map(|l| l.strip_prefix("TCP:"))?;
        let mut words = tcp.split_whitespace();
        let (mut orphans, mut mem) = (None, None);
        while let (Some(k), Some(v)) = (words.next(), words.next()) {
            match k {
                "orphan" => orphans = v.parse().ok(),
                "mem" => mem = v.parse().ok(),
                _ => {}
            }
        }
        Some(Self {
            orphans: orphans?,
            max_orphans: max_orphans.trim().parse().ok()?,
            mem_pages: mem?,
            mem_max_pages: tcp_mem.split_whitespace().nth(2)?.parse().ok()?,
        })
    }
}

/// What an `orphan_pressure` anomaly carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrphanPressure {
    pub host: HostTcp,
    /// Closing sockets (FIN_WAIT1, LAST_ACK, CLOSING, orphaned FIN_WAIT2) by their last
    /// owner, most first.
    pub by_owner: Vec<(Task, u64)>,
}

#[derive(Debug, Default)]
pub struct OrphanRule {
    fraction: Option<f64>,
    last: HostTcp,
    raised: Option<u64>,
    raised_total: u64,
}

impl OrphanRule {
    pub fn host(&self) -> HostTcp {
        self.last
    }

    /// A reading at `now_ns`; `by_owner` is asked only when an anomaly is raised or
    /// resolved.
    pub fn observe(
        &mut self,
        now_ns: u64,
        host: HostTcp,
        by_owner: impl FnOnce() -> Vec<(Task, u64)>,
        out: &mut Vec<Fact>,
    ) {
        self.last = host;
        let Some(f) = self.fraction else { return };
        let over = host.ratio() > f;
        match (over, self.raised) {
            (true, None) => {
                self.raised = Some(now_ns);
                self.raised_total += 1;
                out.push(Fact::Raised(anomaly(host, by_owner(), now_ns, now_ns)));
            }
            (false, Some(since)) => {
                self.raised = None;
                out.push(Fact::Resolved(
                    anomaly(host, by_owner(), since, now_ns),
                    Resolution::Relieved,
                ));
            }
            _ => {}
        }
    }
}

impl HostRule for OrphanRule {
    const NAME: &'static str = "orphan_pressure";
    /// The share of `tcp_max_orphans` or `tcp_mem` the host may reach.
    type Setting = f64;
    type Detail = OrphanPressure;
    const DEFAULT: Option<f64> = Some(DEFAULT_SHARE);

    fn parse(value: &str) -> Result<Option<f64>, String> {
        super::thresholds::fraction(
            value,
            "orphan_pressure wants a fraction of tcp_max_orphans and tcp_mem",
        )
    }

    fn new(fraction: Option<f64>) -> Self {
        Self {
            fraction,
            ..Self::default()
        }
    }

    fn record(o: &OrphanPressure, rec: &mut AnomalyRecord) {
        rec.orphans = Some(crate::record::Orphans::from(o));
    }
}

impl Rule for OrphanRule {
    fn kind(&self) -> Kind {
        Kind::Rule(RuleId::OrphanPressure)
    }

    fn reads_host(&self) -> bool {
        self.enabled()
    }

    fn host_read(
        &mut self,
        now_ns: u64,
        host: HostTcp,
        by_owner: &dyn Fn() -> Vec<(Task, u64)>,
        out: &mut Vec<Fact>,
    ) {
        self.observe(now_ns, host, by_owner, out);
    }

    fn enabled(&self) -> bool {
        self.fraction.is_some()
    }

    fn open(&self) -> u64 {
        u64::from(self.raised.is_some())
    }

    fn raised_total(&self) -> u64 {
        self.raised_total
    }

    fn open_anomalies(&self, now_ns: u64, table: &Table, comms: &Comms) -> Vec<Anomaly> {
        self.raised
            .map(|since| anomaly(self.last, closing_by_owner(table, comms), since, now_ns))
            .into_iter()
            .collect()
    }
}

/// Closing sockets (FIN_WAIT1, LAST_ACK, CLOSING, orphaned FIN_WAIT2) by their last owner,
/// the five with the most: who left the orphans. Walks the table, so only when an
/// `orphan_pressure` anomaly is raised, resolved or shown.
pub(crate) fn closing_by_owner(table: &Table, comms: &Comms) -> Vec<(Task, u64)> {
    let mut n: HashMap<OwnerRef, u64> = HashMap::new();
    for (_, e) in table.iter() {
        let closing = matches!(
            e.state,
            TcpState::FinWait1 | TcpState::LastAck | TcpState::Closing
        ) || (e.state == TcpState::FinWait2 && e.has(flag::ORPHAN));
        if let (true, Some(o)) = (closing, e.owner()) {
            *n.entry(o).or_default() += 1;
        }
    }
    let mut v: Vec<(Task, u64)> = n
        .into_iter()
        .map(|(o, c)| {
            (
                Task {
                    pid: o.pid,
                    comm: comms.get(o.comm),
                },
                c,
            )
        })
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.pid.cmp(&b.0.pid)));
    v.truncate(5);
    v
}

fn anomaly(host: HostTcp, by_owner: Vec<(Task, u64)>, since_ns: u64, ts_ns: u64) -> Anomaly {
    let any = std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
    Anomaly {
        // Not one socket: the host's closing ones.
        state: TcpState::Close,
        ts_ns,
        since_ns,
        lower_bound: false,
        sk: 0,
        netns: 0,
        cgroup: 0,
        tuple: Tuple::new(any, 0, any, 0),
        owner: Owner::Unknown,
        vitals: None,
        holder_cgroup: None,
        other_holders: Vec::new(),
        drops: None,
        detail: Detail::Rule(RuleDetail::OrphanPressure(OrphanPressure {
            host,
            by_owner,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::Kind;

    const SOCKSTAT: &str =
        "sockets: used 9\nTCP: inuse 5 orphan 20 tw 3 alloc 7 mem 268\nUDP: inuse 0 mem 0\n";

    #[test]
    fn parses_sockstat_and_limits() {
        let h = HostTcp::parse(SOCKSTAT, "131072\n", "287898\t383867\t575796\n").expect("parses");
        assert_eq!(
            h,
            HostTcp {
                orphans: 20,
                max_orphans: 131_072,
                mem_pages: 268,
                mem_max_pages: 575_796
            }
        );
        assert!(HostTcp::parse("UDP: inuse 0\n", "1", "1 2 3").is_none());
        assert!(HostTcp::parse(SOCKSTAT, "x", "1 2 3").is_none());
        assert!(HostTcp::parse(SOCKSTAT, "1", "1 2").is_none());
    }

    #[test]
    fn raised_past_either_share_and_resolved_below() {
        let mut r = OrphanRule::new(Some(0.5));
        let mut out = Vec::new();
        let host = |orphans, mem_pages| HostTcp {
            orphans,
            max_orphans: 100,
            mem_pages,
            mem_max_pages: 1000,
        };
        let who = || vec![];
        r.observe(1, host(50, 10), who, &mut out);
        assert!(out.is_empty(), "at the share, not past it");
        r.observe(2, host(10, 600), who, &mut out);
        let [Fact::Raised(a)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(a.kind(), Kind::Rule(RuleId::OrphanPressure));
        assert!(
            matches!(&a.detail, Detail::Rule(RuleDetail::OrphanPressure(o)) if o.host.mem_pages == 600),
            "{a:?}"
        );
        out.clear();
        r.observe(3, host(80, 10), who, &mut out);
        assert!(out.is_empty(), "still over, raised once");
        assert_eq!((r.open(), r.raised_total()), (1, 1));
        r.observe(4, host(10, 10), who, &mut out);
        let [Fact::Resolved(a, Resolution::Relieved)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(a.since_ns, 2);
        assert_eq!(r.open(), 0);
    }
}
