//! The status page's "which upstream?" and "how old?": the destinations with the most
//! sockets in SYN_SENT or a closing state and who holds them, in an operator's words
//! ("payments-api.service holds 412 CLOSE_WAIT to 10.0.3.7:5432"), and a short histogram of
//! the ages of each closing state's sockets.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::{
    output::escape::escape,
    state::TcpState,
    tracker::{
        Tracker,
        ages::{Ages, BUCKETS},
        destinations::{Holder, MAX_DESTINATIONS, STATES},
    },
    workload::Workloads,
};

/// How many (holder, destination, state) lines `status` lists.
const STATUS_DESTINATIONS: usize = 10;

/// One holder's sockets to one destination in one state.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TopDestination {
    /// The workload (unit, container, pod) when its cgroup names one, else the process name,
    /// else "unknown holder" ("the kernel" for TIME_WAIT, which no process holds).
    pub holder: String,
    /// `10.0.3.7:5432`; for accepted connections, the local listening port, `:8080`.
    pub destination: String,
    /// `outbound` or `inbound`.
    pub direction: String,
    /// The network namespace (inode) the sockets are in: two containers' `127.0.0.1:5432`
    /// are two destinations.
    #[serde(default)]
    pub netns: u32,
    pub state: String,
    pub count: u32,
    /// Connections to the destination (every holder's) opened per second, over the last
    /// whole 10 s.
    #[serde(default)]
    pub opened_per_s: f64,
    /// And closed per second.
    #[serde(default)]
    pub closed_per_s: f64,
    /// Connections there whose end this host began (it sent the first FIN, so it keeps the
    /// TIME_WAIT), per second.
    #[serde(default)]
    pub local_first_per_s: f64,
    /// Whose end the peer began (its FIN came first: CLOSE_WAIT here), per second.
    #[serde(default)]
    pub peer_first_per_s: f64,
    /// Ended by a reset or an abort before any FIN, per second.
    #[serde(default)]
    pub reset_per_s: f64,
}

impl TopDestination {
    /// "payments-api.service holds 412 CLOSE_WAIT to 10.0.3.7:5432".
    pub fn sentence(&self) -> String {
        let to = if self.direction == "inbound" {
            format!("inbound to {}", escape(&self.destination))
        } else {
            format!("to {}", escape(&self.destination))
        };
        let mut s = format!(
            "{} holds {} {} {to}",
            escape(&self.holder),
            self.count,
            escape(&self.state)
        );
        crate::output::text::in_netns(&mut s, self.netns);
        if self.opened_per_s > 0.0 || self.closed_per_s > 0.0 {
            let _ = write!(
                s,
                " ({:.1} new/s, {:.1} closed/s there",
                self.opened_per_s, self.closed_per_s
            );
            let first = [
                ("this host closed first", self.local_first_per_s),
                ("the peer closed first", self.peer_first_per_s),
                ("reset", self.reset_per_s),
            ];
            for (i, (who, n)) in first.iter().filter(|(_, n)| *n > 0.0).enumerate() {
                let sep = if i == 0 { "; " } else { ", " };
                let _ = write!(s, "{sep}{who} {n:.1}/s");
            }
            s.push(')');
        }
        s
    }
}

/// Destinations counted, and what the cap left unnamed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct DestinationTotals {
    /// Destinations counted by name now.
    pub tracked: u64,
    /// At most this many; the sockets of the rest are summed in `other`.
    pub cap: u64,
    /// Sockets per state to destinations past the cap (states with none left out).
    pub other: std::collections::BTreeMap<String, u32>,
}

/// The current ages of one state's sockets.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct AgeHistogram {
    pub state: String,
    pub count: u64,
    /// Sockets at most `le_s` seconds old and older than the bucket before (not cumulative).
    pub buckets: Vec<AgeBucket>,
    /// Sockets older than the last bucket.
    pub older: u64,
    /// Sockets that predate the daemon, whose age is a lower bound.
    pub age_is_lower_bound: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct AgeBucket {
    pub le_s: f64,
    pub count: u64,
}

/// The top destinations as of `now_ns`, their holders named through `names`.
pub fn top(
    tracker: &Tracker,
    names: &mut Workloads,
    now_ns: u64,
) -> (Vec<TopDestination>, DestinationTotals) {
    let d = tracker.destinations();
    let top = d
        .top_holders(STATUS_DESTINATIONS)
        .into_iter()
        .map(|(dest, h, st, count)| {
            let rate = tracker.flow_rate(&dest, now_ns);
            TopDestination {
                holder: holder_name(tracker, names, h, st),
                destination: dest.addr(),
                direction: dest.direction().to_owned(),
                netns: dest.netns(),
                state: st.name().to_owned(),
                count,
                opened_per_s: rate.opened,
                closed_per_s: rate.closed,
                local_first_per_s: rate.local_first,
                peer_first_per_s: rate.peer_first,
                reset_per_s: rate.reset,
            }
        })
        .collect();
    let totals = DestinationTotals {
        tracked: d.len() as u64,
        cap: MAX_DESTINATIONS as u64,
        other: STATES
            .iter()
            .zip(d.other())
            .filter(|&(_, &n)| n > 0)
            .map(|(s, &n)| (s.name().to_owned(), n))
            .collect(),
    };
    (top, totals)
}

fn holder_name(tracker: &Tracker, names: &mut Workloads, h: Holder, st: TcpState) -> String {
    if h == Holder::OTHERS {
        return "other holders".to_owned();
    }
    let workload = names.get(h.cgroup).and_then(|w| {
        crate::workload::label(
            w.unit.as_deref(),
            w.container_id.as_deref(),
            w.pod_uid.as_deref(),
        )
    });
    if let Some(w) = workload {
        return w;
    }
    if h.comm != Holder::NONE {
        return tracker.comm(h.comm).as_str().into_owned();
    }
    if st == TcpState::TimeWait {
        "the kernel".to_owned()
    } else {
        "unknown holder".to_owned()
    }
}

/// The ages of the sockets of every state that has some.
pub fn ages(tracker: &Tracker, now_ns: u64) -> Vec<AgeHistogram> {
    tracker
        .ages(now_ns)
        .iter()
        .filter(|a| a.count() > 0)
        .map(histogram)
        .collect()
}

fn histogram(a: &Ages) -> AgeHistogram {
    AgeHistogram {
        state: a.state.name().to_owned(),
        count: a.count(),
        buckets: BUCKETS
            .iter()
            .zip(a.counts)
            .map(|(&le_s, count)| AgeBucket { le_s, count })
            .collect(),
        older: a.counts[BUCKETS.len()],
        age_is_lower_bound: a.lower_bound,
    }
}

/// Seconds as a bucket's bound reads: 30s, 5m, 2h.
fn bound(s: f64) -> String {
    let s = s as u64;
    match s {
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The status page's sections, appended to `s`.
pub fn write_text(
    s: &mut String,
    top: &[TopDestination],
    totals: &DestinationTotals,
    ages: &[AgeHistogram],
) {
    if !top.is_empty() {
        s.push_str("top destinations:\n");
        for d in top {
            let _ = writeln!(s, "  {}", d.sentence());
        }
        let other: u32 = totals.other.values().sum();
        if other > 0 {
            let _ = writeln!(
                s,
                "  ({other} more to destinations past the {} counted by name)",
                totals.cap
            );
        }
    }
    if !ages.is_empty() {
        s.push_str("socket ages now:\n");
        for a in ages {
            let mut buckets: Vec<String> = a
                .buckets
                .iter()
                .filter(|b| b.count > 0)
                .map(|b| format!("<={} {}", bound(b.le_s), b.count))
                .collect();
            if a.older > 0 {
                let last = BUCKETS.last().copied().unwrap_or_default();
                buckets.push(format!(">{} {}", bound(last), a.older));
            }
            let _ = writeln!(
                s,
                "  {:<11} {:>6}: {}",
                escape(&a.state),
                a.count,
                buckets.join(", ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_read_as_an_operator_says_them() {
        let d = TopDestination {
            holder: "payments-api.service".into(),
            destination: "10.0.3.7:5432".into(),
            direction: "outbound".into(),
            netns: 0,
            state: "CLOSE_WAIT".into(),
            count: 412,
            opened_per_s: 0.0,
            closed_per_s: 0.0,
            local_first_per_s: 0.0,
            peer_first_per_s: 0.0,
            reset_per_s: 0.0,
        };
        assert_eq!(
            d.sentence(),
            "payments-api.service holds 412 CLOSE_WAIT to 10.0.3.7:5432"
        );
        let churn = TopDestination {
            state: "TIME_WAIT".into(),
            opened_per_s: 670.0,
            closed_per_s: 669.9,
            local_first_per_s: 669.9,
            ..d.clone()
        };
        assert_eq!(
            churn.sentence(),
            "payments-api.service holds 412 TIME_WAIT to 10.0.3.7:5432 (670.0 new/s, 669.9 closed/s there; this host closed first 669.9/s)"
        );
        let mixed = TopDestination {
            local_first_per_s: 0.0,
            peer_first_per_s: 600.0,
            reset_per_s: 69.9,
            ..churn.clone()
        };
        assert_eq!(
            mixed.sentence(),
            "payments-api.service holds 412 TIME_WAIT to 10.0.3.7:5432 (670.0 new/s, 669.9 closed/s there; the peer closed first 600.0/s, reset 69.9/s)"
        );
        let d = TopDestination {
            holder: "nginx\x1b".into(),
            destination: ":8080".into(),
            direction: "inbound".into(),
            ..d
        };
        assert_eq!(
            d.sentence(),
            "nginx\\e holds 412 CLOSE_WAIT inbound to :8080"
        );
        // Outside the daemon's own namespace, the namespace is said.
        let d = TopDestination { netns: 7, ..d };
        assert_eq!(
            d.sentence(),
            "nginx\\e holds 412 CLOSE_WAIT inbound to :8080 [netns 7]"
        );
    }

    #[test]
    fn the_age_histogram_names_only_what_it_holds() {
        let mut buckets: Vec<AgeBucket> = BUCKETS
            .iter()
            .map(|&le_s| AgeBucket { le_s, count: 0 })
            .collect();
        buckets[1].count = 40;
        buckets[8].count = 2;
        let a = AgeHistogram {
            state: "FIN_WAIT2".into(),
            count: 43,
            buckets,
            older: 1,
            age_is_lower_bound: 0,
        };
        let mut s = String::new();
        write_text(&mut s, &[], &DestinationTotals::default(), &[a]);
        assert_eq!(
            s,
            "socket ages now:\n  FIN_WAIT2       43: <=5s 40, <=1h 2, >4h 1\n"
        );
    }
}
