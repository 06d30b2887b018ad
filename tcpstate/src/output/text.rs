//! Human-readable lines: `tcpstate run --format text` and `tcpstate tail`.
//! Times are UTC (the JSON carries the full RFC 3339 stamp).

use std::{fmt::Write as _, net::IpAddr, time::SystemTime};

use super::escape::escape;
use crate::{
    record::{
        AnomalyRecord, BindRefusedRecord, KilledRecord, Orphans, OwnerSource, Record, ResetRecord,
        TransitionRecord, Vitals,
    },
    state::TcpState,
    tracker::{Kind, RuleId},
    workload::Workload,
};

pub const HEADER: &str = "TIME(UTC)       PID     COMM             LADDR:LPORT                RADDR:RPORT                OLD          -> NEW          MS";

const RED: &str = "\x1b[1;31m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// Appends one line (with newline) for `rec`.
pub fn write_record(out: &mut String, rec: &Record, color: bool) {
    let paint = |out: &mut String, code: &str| {
        if color {
            out.push_str(code);
        }
    };
    match rec {
        Record::Transition(t) => write_transition(out, t),
        Record::Anomaly(a) => {
            paint(out, RED);
            write_anomaly(out, "ANOMALY ", a);
            paint(out, RESET);
        }
        Record::AnomalyResolved(a) => {
            paint(out, GREEN);
            write_anomaly(out, "RESOLVED", a);
            paint(out, RESET);
        }
        Record::LeakSuspected(l) => {
            paint(out, RED);
            let _ = write!(
                out,
                "{} LEAK     pid {} ({}) holds {} sockets in {} (was {}, threshold {})",
                clock(l.ts),
                l.pid,
                escape(&l.comm.as_str()),
                l.count,
                l.state,
                l.previous,
                l.threshold
            );
            in_workload(out, l.workload.as_deref());
            paint(out, RESET);
        }
        Record::Suppressed(s) => {
            paint(out, YELLOW);
            let _ = write!(
                out,
                "{} SUPPRESSED {} transition records (log rate limit)",
                clock(s.ts),
                s.transitions
            );
            paint(out, RESET);
        }
        Record::Reset(r) => {
            paint(out, YELLOW);
            write_reset(out, r);
            paint(out, RESET);
        }
        Record::Killed(k) => {
            paint(out, YELLOW);
            write_killed(out, k);
            paint(out, RESET);
        }
        Record::BindRefused(b) => {
            paint(out, YELLOW);
            write_bind_refused(out, b);
            paint(out, RESET);
        }
        Record::Started(s) => {
            paint(out, DIM);
            let _ = write!(
                out,
                "{} STARTED  tcpstate {} pid {}, ring {} KiB, {} sockets seeded",
                clock(s.ts),
                escape(&s.version),
                s.pid,
                s.ring_bytes / 1024,
                s.seeded
            );
            // Only what is off: on a kernel with everything, the line stays as it was.
            for f in s.features.iter().filter(|f| !f.on) {
                let _ = write!(
                    out,
                    "; {} off: {}",
                    escape(&f.name),
                    escape(f.why_off.as_deref().unwrap_or("no reason given"))
                );
            }
            paint(out, RESET);
        }
        Record::Stopped(s) => {
            paint(out, DIM);
            let _ = write!(
                out,
                "{} STOPPED  {} events, {} dropped, {} recursion misses, {} undecodable, {} refused (table full), {} TIME_WAIT refused, {} log records lost, {} filtered (--netns), up {:.1}s",
                clock(s.ts),
                s.events,
                s.dropped,
                s.recursion_misses,
                s.undecodable,
                s.table_full,
                s.timewait_full,
                s.log_dropped,
                s.filtered,
                s.uptime_s
            );
            paint(out, RESET);
        }
    }
    out.push('\n');
}

fn write_transition(out: &mut String, t: &TransitionRecord) {
    let ms = match t.prev_state_ms {
        Some(ms) => format!("{ms:.3}"),
        None => "-".to_owned(),
    };
    // A mini-socket's transition runs in no task: say how it was seen instead.
    let (pid, comm) = match &t.via {
        Some(via) => ("-".to_owned(), format!("({})", escape(via))),
        None => (t.pid.to_string(), escape(&t.comm.as_str()).into_owned()),
    };
    let _ = write!(
        out,
        "{} {:<7} {:<16} {:<26} {:<26} {:<12} -> {:<12} {}",
        clock(t.ts),
        pid,
        comm,
        endpoint(t.saddr, t.sport),
        endpoint(t.daddr, t.dport),
        t.old.name(),
        t.new.name(),
        ms
    );
    if let Some(reason) = &t.reason {
        let _ = write!(out, " ({})", escape(reason));
    }
    if let Some(n) = t.retransmits {
        let _ = write!(out, " [{n} retransmits]");
    }
    if let Some(side) = &t.closed_first {
        let _ = write!(out, " [{} closed first]", escape(side));
    }
    in_netns(out, t.netns);
    in_workload(out, t.workload.as_deref());
}

/// ` [netns N]` for a socket outside the daemon's own namespace: two containers'
/// `127.0.0.1:8080` must not read as one socket.
pub(crate) fn in_netns(out: &mut String, netns: u32) {
    static OWN: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let own = *OWN.get_or_init(|| crate::sockdiag::netns::current_netns().unwrap_or(0));
    if netns != 0 && netns != own {
        let _ = write!(out, " [netns {netns}]");
    }
}

/// ` in payments-api.service`, ` in pod P container C`: who the socket works for, when its
/// cgroup names someone.
fn in_workload(out: &mut String, w: Option<&Workload>) {
    if let Some(w) = w
        && (w.unit.is_some() || w.container_id.is_some() || w.pod_uid.is_some())
    {
        let _ = write!(out, " in {}", escape(&w.label()));
    }
}

/// An accept queue's fill. The kernel calls a queue full only past its backlog, so a full one
/// holds backlog + 1: "5 of 4" would read as a bug.
fn waiting(queue: u32, backlog: u32) -> String {
    if queue > backlog {
        format!("{queue} waiting, the queue is full (backlog {backlog})")
    } else {
        format!("{queue} of a backlog of {backlog} waiting")
    }
}

/// Who must act, in words: the verified holder (and its own unit when the socket came from
/// another), the guess, the last owner of an orphan, or the listener of a socket nobody
/// accepted.
fn owner_words(a: &AnomalyRecord) -> String {
    match (a.pid, a.comm, a.owner_source) {
        (pid, comm, OwnerSource::AcceptQueue) => {
            let holder = match (pid, comm) {
                (Some(pid), Some(comm)) => format!("pid {pid} ({})", escape(&comm.as_str())),
                _ => "nobody".to_owned(),
            };
            let queue = a
                .accept_queue
                .map(|q| format!(", {}", waiting(q.queue, q.backlog)))
                .unwrap_or_default();
            format!(
                "never accepted: in the accept queue of port {}, listener held by {holder}{queue}",
                a.sport
            )
        }
        (Some(pid), Some(comm), OwnerSource::Fd) => {
            let mut s = format!("held by pid {pid} ({})", escape(&comm.as_str()));
            // After a fork or an fd passed, every holder could close it: all are named.
            for h in a.holders.iter().skip(1) {
                let _ = write!(s, " and pid {} ({})", h.pid, escape(&h.comm.as_str()));
            }
            // The holder's own cgroup, when it is not the one the socket was made in (fd
            // passing, a socket inherited across a fork into another unit).
            if let Some(h) = &a.holder_cgroup
                && a.workload.as_ref().is_none_or(|w| &w.cgroup != h)
            {
                let w = Workload::from_path(h.clone());
                // `/` or a slice names no unit, container or pod: nothing to say.
                if w.unit.is_some() || w.container_id.is_some() || w.pod_uid.is_some() {
                    let _ = write!(s, " of {}", escape(&w.label()));
                }
            }
            s
        }
        // time_wait_pressure names the process refused a port after its counts.
        (Some(_), Some(_), _) if a.count.is_some() => String::new(),
        (Some(pid), Some(comm), _) => {
            format!(
                "attributed to pid {pid} ({}), not verified",
                escape(&comm.as_str())
            )
        }
        _ => match a.last_owner {
            Some(o) => format!(
                "orphaned, last owner pid {} ({})",
                o.pid,
                escape(&o.comm.as_str())
            ),
            None if a.count.is_some() => String::new(),
            None => "owner unknown".to_owned(),
        },
    }
}

fn write_anomaly(out: &mut String, label: &str, a: &AnomalyRecord) {
    let mut owner = owner_words(a);
    in_workload(&mut owner, a.workload.as_deref());
    in_netns(&mut owner, a.netns);
    let at_least = if a.age_is_lower_bound { ">=" } else { "" };
    if let Kind::Rule(id) = a.kind
        && id.text(out, label, a)
    {
        return;
    }
    let queue_full = a.kind == Kind::Rule(RuleId::AcceptQueueFull);
    if let Some(o) = &a.orphans {
        write_orphans(out, label, a, o);
        return;
    }
    if let Some(c) = &a.churn {
        write_churn(out, label, a, c);
        return;
    }
    let what = if a.count.is_some() {
        "TW_PRESSURE"
    } else if queue_full {
        "QUEUE_FULL"
    } else {
        a.state.name()
    };
    let _ = write!(
        out,
        "{} {label} {what:<11} {at_least}{:.1}s {} -> ",
        clock(a.ts),
        a.age_ms / 1000.0,
        endpoint(a.saddr, a.sport),
    );
    if queue_full {
        let _ = write!(out, "(listening) {owner}");
        if let Some(q) = a.accept_queue {
            let _ = write!(
                out,
                ": {} for accept(), new handshakes are dropped",
                waiting(q.queue, q.backlog)
            );
            if q.drops > 0 {
                let _ = write!(out, " ({} so far)", q.drops);
            }
        }
    } else {
        let _ = write!(out, "{} {owner}", endpoint(a.daddr, a.dport));
    }
    if let (Some(n), Some(range)) = (a.count, a.port_range) {
        let _ = write!(
            out,
            "{n} sockets of a {range}-port range (tcp_tw_reuse={})",
            a.tw_reuse.unwrap_or(0)
        );
        if let Some(refused) = a.refused_connects {
            let _ = write!(
                out,
                ", {refused} connects refused a local port (EADDRNOTAVAIL)"
            );
        }
        if let Some(refused) = a.refused_binds {
            let _ = write!(
                out,
                ", {refused} binds to port 0 refused in the namespace (EADDRINUSE)"
            );
        }
        if (a.refused_connects.is_some() || a.refused_binds.is_some())
            && let (Some(pid), Some(comm)) = (a.pid, a.comm)
        {
            let _ = write!(out, ", the last by pid {pid} ({})", escape(&comm.as_str()));
        }
    }
    if let Some(d) = &a.destination {
        let to = match d.direction.as_str() {
            "inbound" => format!("inbound to {}", escape(&d.addr)),
            _ => format!("to {}", escape(&d.addr)),
        };
        let _ = match d.same_state {
            0 | 1 => write!(out, "; the only {} {to}", a.state.name()),
            n => write!(out, "; one of {n} {} {to}", a.state.name()),
        };
    }
    if let Some(v) = &a.vitals {
        for w in vital_signs(a.state, v, reader_of(a)) {
            let _ = write!(out, "; {w}");
        }
    }
    if let Some(d) = &a.drops {
        let what = if d.count == 1 { "packet" } else { "packets" };
        let _ = write!(
            out,
            "; {} {what} dropped by the kernel, the last for {}",
            d.count,
            escape(&d.reason)
        );
    }
    if let Some(why) = &a.resolution {
        let _ = write!(out, " ({})", escape(why));
    }
}

fn write_reset(out: &mut String, r: &ResetRecord) {
    let who = match (r.pid, r.comm) {
        (Some(pid), Some(comm)) => {
            format!(" held by pid {pid} ({})", escape(&comm.as_str()))
        }
        _ => String::new(),
    };
    let retrans = if r.retransmits > 0 {
        format!(", after {} retransmissions", r.retransmits)
    } else {
        String::new()
    };
    let _ = write!(
        out,
        "{} RESET    {:<11} {} -> {} {} in {}{who}{retrans}",
        clock(r.ts),
        r.state.name(),
        endpoint(r.saddr, r.sport),
        endpoint(r.daddr, r.dport),
        escape(&r.side),
        r.state.name(),
    );
    in_netns(out, r.netns);
}

fn write_bind_refused(out: &mut String, b: &BindRefusedRecord) {
    let why = if b.port == 0 {
        "no free port in the local port range"
    } else {
        "the port is taken"
    };
    let _ = write!(
        out,
        "{} BIND     {} refused for pid {} ({}): {why} (EADDRINUSE)",
        clock(b.ts),
        endpoint(b.addr, b.port),
        b.pid,
        escape(&b.comm.as_str()),
    );
    in_netns(out, b.netns);
}

fn write_churn(out: &mut String, label: &str, a: &AnomalyRecord, c: &crate::record::Churn) {
    let who = match (a.pid, a.comm) {
        (Some(pid), Some(comm)) => format!("pid {pid} ({})", escape(&comm.as_str())),
        _ => "a process".to_owned(),
    };
    let _ = write!(
        out,
        "{} {label} CHURN       {:.1}s -> {}: {who} opens {:.0} new connections/s, median life under {} ms, {:.0}% closed here first, {} in TIME_WAIT",
        clock(a.ts),
        a.age_ms / 1000.0,
        endpoint(a.daddr, a.dport),
        c.opened_per_s,
        c.median_life_ms,
        c.closed_here * 100.0,
        c.time_wait,
    );
    match &a.resolution {
        Some(why) => {
            let _ = write!(out, " ({why})");
        }
        None => out.push_str(": opens a new connection per request: enable keep-alive/pooling"),
    }
}

fn write_orphans(out: &mut String, label: &str, a: &AnomalyRecord, o: &Orphans) {
    let _ = write!(
        out,
        "{} {label} ORPHANS     {:.1}s host: {} orphans of {} (tcp_max_orphans), TCP memory {} of {} pages",
        clock(a.ts),
        a.age_ms / 1000.0,
        o.orphans,
        o.max_orphans,
        o.tcp_mem_pages,
        o.tcp_mem_max_pages,
    );
    for (i, c) in o.by_owner.iter().enumerate() {
        let lead = if i == 0 {
            "; closing sockets by last owner: "
        } else {
            ", "
        };
        let _ = write!(
            out,
            "{lead}pid {} ({}) {}",
            c.pid,
            escape(&c.comm.as_str()),
            c.count
        );
    }
    if let Some(why) = &a.resolution {
        let _ = write!(out, " ({})", escape(why));
    }
}

fn write_killed(out: &mut String, k: &KilledRecord) {
    let age = k
        .age_ms
        .map(|ms| format!(" after {:.1}s", ms / 1000.0))
        .unwrap_or_default();
    let holder = match (k.pid, k.comm) {
        (Some(pid), Some(comm)) => format!("held by pid {pid} ({})", escape(&comm.as_str())),
        _ => "held by no process".to_owned(),
    };
    let by = match (&k.by.sudo_user, k.by.login_uid) {
        (Some(u), _) => format!("uid {} (sudo by {})", k.by.uid, escape(u)),
        (None, Some(l)) if l != k.by.uid => format!("uid {} (login uid {l})", k.by.uid),
        _ => format!("uid {}", k.by.uid),
    };
    let _ = write!(
        out,
        "{} KILLED   {:<11} {} -> {}{age} {holder}; destroyed by {by}",
        clock(k.ts),
        k.state.name(),
        endpoint(k.saddr, k.sport),
        endpoint(k.daddr, k.dport),
    );
}

/// Whether an application holds the socket and could read or close it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reader {
    Application,
    /// Still in its listener's accept queue: no application has it yet.
    NotAccepted,
    /// Closed by its application (an orphan): nobody will read it again.
    Nobody,
    /// Not known: no blame is laid.
    Unknown,
}

fn reader_of(a: &AnomalyRecord) -> Reader {
    match (a.owner_source, a.pid) {
        (OwnerSource::AcceptQueue, _) => Reader::NotAccepted,
        (_, None) if a.last_owner.is_some() => Reader::Nobody,
        (_, None) => Reader::Unknown,
        _ => Reader::Application,
    }
}

/// A socket's vital signs in words: what keeps it in its state.
fn vital_signs(state: TcpState, v: &Vitals, reader: Reader) -> Vec<String> {
    let mut w = Vec::new();
    let sending = matches!(
        state,
        TcpState::FinWait1 | TcpState::LastAck | TcpState::Closing
    );
    if v.snd_wnd == 0 && (v.send_q > 0 || sending) {
        w.push(format!(
            "the peer's receive window is 0 ({} unanswered probes): it is not reading",
            v.probes
        ));
    }
    // Once the peer's FIN is in, Recv-Q counts it as one byte (its sequence number) until the
    // application reads the end of the stream: Recv-Q 1 in CLOSE_WAIT is an application that
    // has not read since the peer closed, not one byte of data.
    let fin_in = matches!(
        state,
        TcpState::CloseWait | TcpState::LastAck | TcpState::Closing
    );
    let blame = match reader {
        Reader::Application => ": the application is not reading",
        Reader::NotAccepted => ": never accepted, so no application can read it",
        Reader::Nobody => ": its application closed it",
        Reader::Unknown => "",
    };
    match (fin_in, v.recv_q) {
        (_, 0) => {}
        (true, 1) if reader == Reader::Application => w.push(
            "the peer's FIN is unread: the application has not read since the peer closed".into(),
        ),
        (true, 1) => w.push(format!("the peer's FIN is in Recv-Q{blame}")),
        (true, n) => w.push(format!(
            "{} unread bytes and the peer's FIN in Recv-Q{blame}",
            n - 1
        )),
        (false, n) => w.push(format!("{n} unread bytes in Recv-Q{blame}")),
    }
    // Send-Q counts bytes written and not acknowledged, sent or not: the ones never sent
    // are held back by the peer's window (or ours), not lost on the way.
    let notsent = v.notsent.min(v.send_q);
    let unacked = v.send_q - notsent;
    if unacked > 0 {
        w.push(format!("{unacked} bytes sent and not acknowledged"));
    }
    if notsent > 0 {
        w.push(format!("{notsent} bytes in Send-Q not sent yet"));
    }
    if v.retransmits > 0 {
        w.push(format!(
            "{} retransmissions of the same segment (backoff {})",
            v.retransmits, v.backoff
        ));
    }
    if v.timer != "none" {
        w.push(format!("{} timer in {} ms", escape(&v.timer), v.timer_ms));
    }
    w
}

/// `HH:MM:SS.micros` of the UTC RFC 3339 stamp.
fn clock(ts: SystemTime) -> String {
    let full = humantime::format_rfc3339_micros(ts).to_string();
    full.get(11..26).unwrap_or(&full).to_owned()
}

pub fn endpoint(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        fixtures,
        record::{AcceptQueue, Owner},
        socket::{Comm, Family},
    };

    /// Over IPv6, which the columns must fit; no namespace, which the line would name.
    fn transition() -> TransitionRecord {
        let lo: IpAddr = "::1".parse().expect("addr");
        TransitionRecord {
            family: Family::V6,
            saddr: lo,
            daddr: lo,
            netns: 0,
            ..fixtures::transition()
        }
    }

    #[test]
    fn transition_line_has_aligned_columns() {
        let mut s = String::new();
        write_record(&mut s, &Record::Transition(transition()), false);
        assert_eq!(
            s,
            "11:06:40.123456 77      curl             [::1]:40000                [::1]:8080                 SYN_SENT     -> ESTABLISHED  0.250\n"
        );
        let mut t = transition();
        t.prev_state_ms = None;
        s.clear();
        write_record(&mut s, &Record::Transition(t), true);
        assert!(s.ends_with(" -\n"), "{s}");
        assert!(!s.contains('\x1b'), "transitions are never coloured");
    }

    /// An orphan: nobody holds it, its last owner is known, its age only from the snapshot.
    fn anomaly() -> AnomalyRecord {
        AnomalyRecord {
            age_is_lower_bound: true,
            netns: 0,
            pid: None,
            comm: None,
            owner_source: OwnerSource::None,
            last_owner: Some(Owner {
                pid: 9,
                comm: Comm::new("server"),
            }),
            ..fixtures::anomaly()
        }
    }

    #[test]
    fn anomaly_line_says_how_many_go_to_the_same_destination() {
        let mut a = anomaly();
        a.destination = Some(crate::record::Destination {
            addr: "10.0.3.7:5432".into(),
            direction: "outbound".into(),
            same_state: 412,
        });
        let mut s = String::new();
        write_record(&mut s, &Record::Anomaly(a.clone()), false);
        assert!(
            s.ends_with("(server); one of 412 CLOSE_WAIT to 10.0.3.7:5432\n"),
            "{s}"
        );
        a.destination = Some(crate::record::Destination {
            addr: ":8080".into(),
            direction: "inbound".into(),
            same_state: 1,
        });
        let mut s = String::new();
        write_record(&mut s, &Record::Anomaly(a), false);
        assert!(
            s.ends_with("; the only CLOSE_WAIT inbound to :8080\n"),
            "{s}"
        );
    }

    #[test]
    fn anomaly_line_says_how_many_of_its_packets_the_kernel_dropped_and_why() {
        let mut a = anomaly();
        a.drops = Some(crate::record::Drops {
            count: 7,
            reason: "NETFILTER_DROP".into(),
        });
        let mut s = String::new();
        write_record(&mut s, &Record::Anomaly(a), false);
        assert!(
            s.ends_with("(server); 7 packets dropped by the kernel, the last for NETFILTER_DROP\n"),
            "{s}"
        );
    }

    #[test]
    fn anomaly_line_says_what_is_known() {
        let mut s = String::new();
        write_record(&mut s, &Record::Anomaly(anomaly()), false);
        assert_eq!(
            s,
            "11:06:40.000000 ANOMALY  CLOSE_WAIT  >=61.5s 10.0.0.1:8080 -> 10.0.0.2:5555 orphaned, last owner pid 9 (server)\n"
        );
        let mut a = anomaly();
        a.pid = Some(9);
        a.comm = Some(Comm::new("server"));
        a.owner_source = OwnerSource::Fd;
        s.clear();
        write_record(&mut s, &Record::Anomaly(a), true);
        assert!(
            s.starts_with(RED) && s.contains("held by pid 9 (server)"),
            "{s}"
        );
    }

    #[test]
    fn the_workload_and_a_holder_from_elsewhere_are_named() {
        let mut a = anomaly();
        a.pid = Some(9);
        a.comm = Some(Comm::new("server"));
        a.owner_source = OwnerSource::Fd;
        a.workload = Some(std::sync::Arc::new(Workload::from_path(
            "/system.slice/payments-api.service".into(),
        )));
        a.holder_cgroup = Some("/system.slice/payments-api.service".into());
        let mut s = String::new();
        write_record(&mut s, &Record::Anomaly(a.clone()), false);
        assert!(
            s.ends_with("held by pid 9 (server) in payments-api.service\n"),
            "{s}"
        );
        // Passed to a process of another unit: both are named; control bytes escaped.
        a.holder_cgroup = Some("/system.slice/\x1b[31mworker.service".into());
        s.clear();
        write_record(&mut s, &Record::Anomaly(a), false);
        assert!(
            s.contains("held by pid 9 (server) of \\e[31mworker.service in payments-api.service"),
            "{s}"
        );
    }

    #[test]
    fn a_close_wait_recv_q_of_one_is_the_unread_fin() {
        let v = |recv_q| Vitals {
            recv_q,
            send_q: 0,
            notsent: 0,
            timer: "none".into(),
            timer_ms: 0,
            retransmits: 0,
            probes: 0,
            backoff: 0,
            total_retrans: 0,
            snd_wnd: 65535,
            last_data_recv_ms: 0,
            last_data_sent_ms: 0,
        };
        let app = Reader::Application;
        assert_eq!(
            vital_signs(TcpState::CloseWait, &v(1), app),
            ["the peer's FIN is unread: the application has not read since the peer closed"]
        );
        assert_eq!(
            vital_signs(TcpState::CloseWait, &v(13), app),
            ["12 unread bytes and the peer's FIN in Recv-Q: the application is not reading"]
        );
        assert_eq!(
            vital_signs(TcpState::Established, &v(3), app),
            ["3 unread bytes in Recv-Q: the application is not reading"]
        );
        assert!(vital_signs(TcpState::CloseWait, &v(0), app).is_empty());
        // Issue 20.9: no application to blame for a socket nobody accepted, or an orphan.
        assert_eq!(
            vital_signs(TcpState::CloseWait, &v(1), Reader::NotAccepted),
            ["the peer's FIN is in Recv-Q: never accepted, so no application can read it"]
        );
        assert_eq!(
            vital_signs(TcpState::LastAck, &v(1), Reader::Nobody),
            ["the peer's FIN is in Recv-Q: its application closed it"]
        );
    }

    /// Issue 20.9: Send-Q bytes never sent are not "not acknowledged"; a full accept queue
    /// holds one more than its backlog; `/` names no workload; another namespace is said.
    #[test]
    fn words_that_were_wrong() {
        let mut a = anomaly();
        a.state = TcpState::FinWait1;
        a.vitals = Some(Vitals {
            recv_q: 0,
            send_q: 2_317_313,
            notsent: 2_300_000,
            timer: "none".into(),
            timer_ms: 0,
            retransmits: 0,
            probes: 0,
            backoff: 0,
            total_retrans: 0,
            snd_wnd: 65535,
            last_data_recv_ms: 0,
            last_data_sent_ms: 0,
        });
        a.netns = 4_026_500_000;
        let mut s = String::new();
        write_record(&mut s, &Record::Anomaly(a), false);
        assert!(
            s.contains(
                "; 17313 bytes sent and not acknowledged; 2300000 bytes in Send-Q not sent yet"
            ),
            "{s}"
        );
        assert!(s.contains(" [netns 4026500000]"), "{s}");

        assert_eq!(waiting(5, 4), "5 waiting, the queue is full (backlog 4)");
        assert_eq!(waiting(2, 4), "2 of a backlog of 4 waiting");

        let mut h = anomaly();
        h.pid = Some(12567);
        h.comm = Some(Comm::new("python3"));
        h.owner_source = OwnerSource::Fd;
        h.holder_cgroup = Some("/".into());
        s.clear();
        write_record(&mut s, &Record::Anomaly(h), false);
        assert!(s.ends_with("held by pid 12567 (python3)\n"), "{s}");
    }

    #[test]
    fn vital_signs_and_queues_are_put_in_words() {
        let mut a = anomaly();
        a.state = TcpState::FinWait1;
        a.vitals = Some(Vitals {
            recv_q: 0,
            send_q: 4096,
            notsent: 0,
            timer: "probe".into(),
            timer_ms: 1200,
            retransmits: 0,
            probes: 3,
            backoff: 2,
            total_retrans: 0,
            snd_wnd: 0,
            last_data_recv_ms: 0,
            last_data_sent_ms: 0,
        });
        let mut s = String::new();
        write_record(&mut s, &Record::Anomaly(a), false);
        assert!(
            s.contains("; the peer's receive window is 0 (3 unanswered probes): it is not reading; 4096 bytes sent and not acknowledged; probe timer in 1200 ms"),
            "{s}"
        );

        let mut q = anomaly();
        q.owner_source = OwnerSource::AcceptQueue;
        q.last_owner = None;
        q.pid = Some(812);
        q.comm = Some(Comm::new("server"));
        q.accept_queue = Some(AcceptQueue {
            drops: 0,
            queue: 2,
            backlog: 4,
        });
        s.clear();
        write_record(&mut s, &Record::Anomaly(q.clone()), false);
        assert!(
            s.contains("never accepted: in the accept queue of port 8080, listener held by pid 812 (server), 2 of a backlog of 4 waiting"),
            "{s}"
        );
        q.kind = Kind::Rule(RuleId::AcceptQueueFull);
        q.state = TcpState::Listen;
        q.owner_source = OwnerSource::Fd;
        s.clear();
        write_record(&mut s, &Record::Anomaly(q), false);
        assert!(
            s.contains("QUEUE_FULL  >=61.5s 10.0.0.1:8080 -> (listening) held by pid 812 (server): 2 of a backlog of 4 waiting for accept()"),
            "{s}"
        );
    }
}
