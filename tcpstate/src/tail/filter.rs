//! Which records `tail` prints: `--port`, `--state`, `--anomalies`, `--pid`, `--comm`,
//! `--unit`, `--container`.

use crate::{cli::TailArgs, record::Record, socket::Comm, state::TcpState, workload::Workload};

/// What `--port`, `--state`, `--anomalies`, `--pid` and `--comm` ask for;
/// all given ones must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    pub port: Option<u16>,
    pub state: Option<TcpState>,
    pub anomalies: bool,
    pub pid: Option<u32>,
    /// Truncated like the kernel's comm (15 bytes), so a long name given in
    /// full still matches.
    pub comm: Option<Comm>,
    pub unit: Option<String>,
    /// A prefix of the container id.
    pub container: Option<String>,
}

impl Filter {
    pub fn from_args(a: &TailArgs) -> Self {
        Self {
            port: a.port,
            state: a.state,
            anomalies: a.anomalies,
            pid: a.pid,
            comm: a.comm.as_deref().map(Comm::new),
            unit: a.unit.clone(),
            container: a.container.clone(),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Whether `rec` passes every filter. Records without the field a filter
/// looks at (a leak has no port) do not pass it; `started`, `stopped` and
/// `suppressed` pass only when there is no filter at all.
pub fn matches(rec: &Record, f: &Filter) -> bool {
    let (anomaly, ports, state, pid, comm) = match rec {
        Record::Transition(t) => (
            false,
            Some([t.sport, t.dport]),
            [Some(t.old), Some(t.new)],
            Some(t.pid),
            Some(t.comm),
        ),
        Record::Anomaly(a) | Record::AnomalyResolved(a) => {
            // An orphan has no pid; it is still the last owner's problem.
            let (pid, comm) = match (a.pid, a.comm, a.last_owner) {
                (None, None, Some(o)) => (Some(o.pid), Some(o.comm)),
                (pid, comm, _) => (pid, comm),
            };
            (
                true,
                Some([a.sport, a.dport]),
                [Some(a.state), None],
                pid,
                comm,
            )
        }
        Record::LeakSuspected(l) => (true, None, [Some(l.state), None], Some(l.pid), Some(l.comm)),
        Record::Reset(r) => (
            false,
            Some([r.sport, r.dport]),
            [Some(r.state), None],
            r.pid,
            r.comm,
        ),
        Record::BindRefused(b) => (
            false,
            Some([b.port, b.port]),
            [None, None],
            Some(b.pid),
            Some(b.comm),
        ),
        Record::Killed(k) => (
            false,
            Some([k.sport, k.dport]),
            [Some(k.state), None],
            k.pid,
            k.comm,
        ),
        Record::Started(_) | Record::Stopped(_) | Record::Suppressed(_) => return f.is_empty(),
    };
    (!f.anomalies || anomaly)
        && f.port
            .is_none_or(|p| ports.is_some_and(|ps| ps.contains(&p)))
        && f.state.is_none_or(|s| state.contains(&Some(s)))
        && f.pid.is_none_or(|p| pid == Some(p))
        && f.comm.is_none_or(|c| comm == Some(c))
        && workload_matches(workload_of(rec), f)
}

fn workload_of(rec: &Record) -> Option<&Workload> {
    match rec {
        Record::Transition(t) => t.workload.as_deref(),
        Record::Anomaly(a) | Record::AnomalyResolved(a) => a.workload.as_deref(),
        Record::LeakSuspected(l) => l.workload.as_deref(),
        Record::BindRefused(b) => b.workload.as_deref(),
        _ => None,
    }
}

fn workload_matches(w: Option<&Workload>, f: &Filter) -> bool {
    f.unit
        .as_deref()
        .is_none_or(|u| w.and_then(|w| w.unit.as_deref()) == Some(u))
        && f.container.as_deref().is_none_or(|c| {
            w.and_then(|w| w.container_id.as_deref())
                .is_some_and(|id| id.starts_with(c))
        })
}
