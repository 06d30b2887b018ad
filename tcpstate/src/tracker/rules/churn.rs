//! `connection_churn`: a client that opens a new connection per request and closes it first,
//! so its TIME_WAIT piles up (nginx `proxy_pass` without upstream keepalive, a pool turned
//! off). Judged once per flow window (10 s) over the window that just ended, per outbound
//! destination: it opened more than `rate` connections per second there, the median life of
//! those it closed first was under `max_life`, and most closes began here. Resolved after a
//! window where that no longer holds.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use super::{FlowWindow, HostRule, Rule, RuleDetail, RuleId};
use crate::record::AnomalyRecord;
use crate::{
    socket::{Family, Tuple},
    state::TcpState,
    tracker::{
        PeerKeyHasher,
        destinations::{Dest, FLOW_WINDOW_NS, Flow},
        facts::{Anomaly, Detail, Fact, Kind, Owner, Resolution},
        table::{Comms, Table},
    },
};

/// What the rule fires on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// New connections per second to one destination.
    pub rate: f64,
    /// The median life of those closed here first must be under this.
    pub max_life: Duration,
}

/// Chosen from the cases the rule is for: 670 conn/s to one upstream was a real problem
/// (about 40k TIME_WAIT), and 50 conn/s with a 10 ms median life is already the pattern. A
/// pooled connection lives for seconds to minutes; one per request, for its request.
pub const DEFAULT: Limits = Limits {
    rate: 50.0,
    max_life: Duration::from_secs(1),
};

/// One destination's churn over a window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Churn {
    /// Connections opened per second.
    pub opened_per_s: f64,
    /// The median life of those closed here first: the upper bound of its bucket, in ms.
    pub median_life_ms: u64,
    /// Of the connections that ended, the share whose close began here.
    pub closed_here: f64,
    /// Sockets to the destination in TIME_WAIT when judged.
    pub time_wait: u32,
}

#[derive(Clone, Copy, Debug)]
struct Open {
    since_ns: u64,
    churn: Churn,
    closer: Option<crate::tracker::Task>,
}

#[derive(Debug)]
pub struct ChurnRule {
    limits: Option<Limits>,
    /// At most one per destination of a window, itself capped.
    open: HashMap<Dest, Open, PeerKeyHasher>,
    /// The window judged last (its start).
    judged: Option<u64>,
    raised_total: u64,
}

impl ChurnRule {
    /// Judges the window that began at `start_ns` (`flows`: its connections per destination;
    /// None when whole windows passed without any), once. `time_wait` counts a destination's
    /// TIME_WAIT now.
    pub fn observe(
        &mut self,
        start_ns: u64,
        flows: Option<&HashMap<Dest, Flow, PeerKeyHasher>>,
        time_wait: impl Fn(&Dest) -> u32,
        now_ns: u64,
        out: &mut Vec<Fact>,
    ) {
        let Some(limits) = self.limits else { return };
        if self.judged.is_some_and(|j| j >= start_ns) {
            return;
        }
        self.judged = Some(start_ns);
        let mut now_churning = HashMap::<Dest, (Churn, Option<_>), PeerKeyHasher>::default();
        for (dest, f) in flows.into_iter().flatten() {
            if let Some(c) = churning(dest, f, &limits) {
                let c = Churn {
                    time_wait: time_wait(dest),
                    ..c
                };
                now_churning.insert(*dest, (c, f.closer));
            }
        }
        let relieved: Vec<Dest> = self
            .open
            .keys()
            .filter(|d| !now_churning.contains_key(d))
            .copied()
            .collect();
        for dest in relieved {
            if let Some(o) = self.open.remove(&dest) {
                out.push(Fact::Resolved(
                    anomaly(&dest, &o, now_ns),
                    Resolution::Relieved,
                ));
            }
        }
        for (dest, (churn, closer)) in now_churning {
            match self.open.get_mut(&dest) {
                Some(o) => {
                    o.churn = churn;
                    o.closer = closer.or(o.closer);
                }
                None => {
                    let o = Open {
                        since_ns: start_ns,
                        churn,
                        closer,
                    };
                    self.raised_total += 1;
                    out.push(Fact::Raised(anomaly(&dest, &o, now_ns)));
                    self.open.insert(dest, o);
                }
            }
        }
    }
}

/// The window's churn to `dest`, when it is the pattern.
fn churning(dest: &Dest, f: &Flow, limits: &Limits) -> Option<Churn> {
    // Inbound connections closed here first are a server's choice, and the remedy is the
    // clients': only connections this host opened count.
    if !matches!(dest, Dest::Outbound { .. }) {
        return None;
    }
    let window_s = FLOW_WINDOW_NS as f64 / 1e9;
    let opened_per_s = f64::from(f.opened) / window_s;
    let ended = f.local_first + f.peer_first + f.reset;
    let closed_here = f64::from(f.local_first) / f64::from(ended.max(1));
    let median_life_ms = f.median_life_ms()?;
    let max_ms = u64::try_from(limits.max_life.as_millis()).unwrap_or(u64::MAX);
    (opened_per_s > limits.rate && closed_here > 0.5 && median_life_ms <= max_ms).then_some(Churn {
        opened_per_s,
        median_life_ms,
        closed_here,
        time_wait: 0,
    })
}

impl HostRule for ChurnRule {
    const NAME: &'static str = "connection_churn";
    type Setting = Limits;
    type Detail = Churn;
    const DEFAULT: Option<Limits> = Some(DEFAULT);
    /// A destination: the closer is named, no socket's holder is to check.
    const CHECKS_OWNER: bool = false;

    /// `RATE` or `RATE,LIFE` (`50`, `100,500ms`): None for `off`.
    fn parse(v: &str) -> Result<Option<Limits>, String> {
        let v = v.trim();
        if v == "off" || v == "none" {
            return Ok(None);
        }
        let (rate, life) = v.split_once(',').unwrap_or((v, ""));
        let rate = match rate.trim().parse::<f64>() {
            Ok(r) if r > 0.0 && r.is_finite() => r,
            _ => {
                return Err(format!(
                    "connection_churn wants RATE[,LIFE]: new connections per second over 0, got {rate:?}"
                ));
            }
        };
        let max_life = if life.trim().is_empty() {
            DEFAULT.max_life
        } else {
            super::thresholds::duration(life)?.ok_or("connection_churn's LIFE cannot be off")?
        };
        Ok(Some(Limits { rate, max_life }))
    }

    fn new(limits: Option<Limits>) -> Self {
        Self {
            limits,
            open: HashMap::default(),
            judged: None,
            raised_total: 0,
        }
    }

    fn record(c: &Churn, rec: &mut AnomalyRecord) {
        rec.churn = Some(crate::record::Churn::from(*c));
    }
}

impl Rule for ChurnRule {
    fn kind(&self) -> Kind {
        Kind::Rule(RuleId::ConnectionChurn)
    }

    fn flow_window(&mut self, w: &FlowWindow<'_>, out: &mut Vec<Fact>) {
        self.observe(w.start_ns, w.flows, w.time_wait, w.now_ns, out);
    }

    fn enabled(&self) -> bool {
        self.limits.is_some()
    }

    fn raised_total(&self) -> u64 {
        self.raised_total
    }

    fn open(&self) -> u64 {
        self.open.len() as u64
    }

    fn open_anomalies(&self, now_ns: u64, _: &Table, _: &Comms) -> Vec<Anomaly> {
        self.open
            .iter()
            .map(|(d, o)| anomaly(d, o, now_ns))
            .collect()
    }
}

fn anomaly(dest: &Dest, o: &Open, ts_ns: u64) -> Anomaly {
    let (family, daddr, dport) = match *dest {
        Dest::Outbound {
            family, addr, port, ..
        } => (family, addr, port),
        Dest::Inbound { port, .. } => (Family::V4, [0; 16], port),
    };
    let any = match family {
        Family::V6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        Family::V4 => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    };
    let mut tuple = Tuple::new(any, 0, any, dport);
    tuple.daddr = daddr;
    Anomaly {
        // What piles up.
        state: TcpState::TimeWait,
        ts_ns,
        since_ns: o.since_ns,
        lower_bound: false,
        sk: 0,
        netns: dest.netns(),
        cgroup: 0,
        tuple,
        owner: o.closer.map_or(Owner::Unknown, Owner::Attributed),
        vitals: None,
        holder_cgroup: None,
        other_holders: Vec::new(),
        drops: None,
        detail: Detail::Rule(RuleDetail::ConnectionChurn(o.churn)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{socket::Comm, tracker::Task};

    fn dest() -> Dest {
        Dest::of(
            &Tuple::new(
                "10.0.0.1".parse().expect("addr"),
                40000,
                "10.0.3.7".parse().expect("addr"),
                5432,
            ),
            0,
            false,
        )
    }

    fn flows(
        opened: u32,
        local_first: u32,
        life_bucket: usize,
    ) -> HashMap<Dest, Flow, PeerKeyHasher> {
        let mut f = Flow {
            opened,
            closed: local_first,
            local_first,
            closer: Some(Task {
                pid: 42,
                comm: Comm(*b"curl\0\0\0\0\0\0\0\0\0\0\0\0"),
            }),
            ..Flow::default()
        };
        f.lives[life_bucket] = local_first;
        let mut m = HashMap::default();
        m.insert(dest(), f);
        m
    }

    const W: u64 = FLOW_WINDOW_NS;

    #[test]
    fn a_client_opening_a_connection_per_request_is_raised_then_relieved() {
        let mut r = ChurnRule::new(Some(DEFAULT));
        let mut out = Vec::new();
        // 670/s, 5 ms lives (bucket 3: under 8 ms), all closed here.
        r.observe(0, Some(&flows(6700, 6700, 3)), |_| 9000, W, &mut out);
        let [Fact::Raised(a)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(a.kind(), Kind::Rule(RuleId::ConnectionChurn));
        let Detail::Rule(RuleDetail::ConnectionChurn(c)) = a.detail else {
            panic!("{a:?}")
        };
        assert_eq!(
            (c.opened_per_s, c.median_life_ms, c.time_wait),
            (670.0, 8, 9000)
        );
        assert!(matches!(a.owner, Owner::Attributed(t) if t.pid == 42));
        assert_eq!(a.tuple.daddr().to_string(), "10.0.3.7");
        assert_eq!((r.open(), r.raised_total()), (1, 1));
        // The same window again: judged once.
        out.clear();
        r.observe(0, Some(&flows(6700, 6700, 3)), |_| 9000, W + 1, &mut out);
        assert!(out.is_empty());
        // Still churning: stays open, no second record.
        r.observe(W, Some(&flows(6000, 6000, 3)), |_| 9000, 2 * W, &mut out);
        assert!(out.is_empty(), "{out:?}");
        // The rate fell: resolved.
        r.observe(2 * W, Some(&flows(10, 10, 3)), |_| 0, 3 * W, &mut out);
        let [Fact::Resolved(a, Resolution::Relieved)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(a.since_ns, 0);
        assert_eq!(r.open(), 0);
    }

    #[test]
    fn pooled_connections_peer_closes_and_inbound_ones_are_not_churn() {
        let mut r = ChurnRule::new(Some(DEFAULT));
        let mut out = Vec::new();
        // Long lives: bucket 12 (under 4 s) is over the 1 s default.
        r.observe(0, Some(&flows(6700, 6700, 12)), |_| 0, W, &mut out);
        // Closed by the peer: its TIME_WAIT is there, not here.
        let mut m = flows(6700, 0, 3);
        if let Some(f) = m.values_mut().next() {
            f.peer_first = 6700;
            f.lives[3] = 10;
        }
        r.observe(W, Some(&m), |_| 0, 2 * W, &mut out);
        // A server's accepted connections.
        let mut inbound = HashMap::default();
        inbound.insert(Dest::Inbound { netns: 0, port: 80 }, flows(6700, 6700, 3)[&dest()]);
        r.observe(2 * W, Some(&inbound), |_| 0, 3 * W, &mut out);
        // Under the rate.
        r.observe(3 * W, Some(&flows(400, 400, 3)), |_| 0, 4 * W, &mut out);
        assert!(out.is_empty(), "{out:?}");
        // Off.
        let mut off = ChurnRule::new(None);
        off.observe(0, Some(&flows(6700, 6700, 3)), |_| 0, W, &mut out);
        assert!(out.is_empty() && !off.enabled());
    }

    #[test]
    fn whole_windows_without_connections_relieve_what_was_open() {
        let mut r = ChurnRule::new(Some(DEFAULT));
        let mut out = Vec::new();
        r.observe(0, Some(&flows(6700, 6700, 3)), |_| 0, W, &mut out);
        out.clear();
        r.observe(5 * W, None, |_| 0, 6 * W, &mut out);
        assert!(
            matches!(&out[..], [Fact::Resolved(_, Resolution::Relieved)]),
            "{out:?}"
        );
    }
}
