//! The events and records unit tests start from, in one place: a new field is added here
//! once, not in every test module that builds the type. Each is a plausible value; a test
//! changes only the fields it is about (`Event { ts_ns, ..event() }`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tcpstate_common::Event;

use crate::{
    record::{AnomalyRecord, OwnerSource, TransitionRecord},
    socket::{Comm, Family},
    state::TcpState,
    tracker::Kind,
};

/// 2026-11-18T11:06:40.123456789Z.
pub fn ts() -> SystemTime {
    UNIX_EPOCH + Duration::new(1_795_000_000, 123_456_789)
}

/// A ring event: curl's connect completing, 10.0.0.1:40000 -> 10.0.0.2:8080, SYN_SENT ->
/// ESTABLISHED.
pub fn event() -> Event {
    let mut saddr = [0u8; 16];
    saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
    let mut daddr = [0u8; 16];
    daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
    Event {
        cgroup: 0,
        ts_ns: 42,
        skaddr: 0xffff_8880_1234_5678,
        saddr,
        daddr,
        pid: 1234,
        netns: 4026531840,
        sport: 40000,
        dport: 8080,
        family: 2,
        close: 0,
        oldstate: 2,
        newstate: 1,
        comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
    }
}

/// [`event`] at `ts_ns` from socket `skaddr`: what ordering tests tell events apart by.
pub fn event_at(ts_ns: u64, skaddr: u64) -> Event {
    Event {
        ts_ns,
        skaddr,
        ..event()
    }
}

/// An event's bytes as the ring holds them.
pub fn event_bytes(ev: &Event) -> Vec<u8> {
    // SAFETY: Event is repr(C) without padding (tcpstate-common pins its size).
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(ev).cast::<u8>(), size_of::<Event>()) }
        .to_vec()
}

/// A transition record: curl's loopback connect to port 8080 completing.
pub fn transition() -> TransitionRecord {
    TransitionRecord {
        workload: None,
        ts: ts(),
        sk: 0xffff_8880_0abc_0000,
        family: Family::V4,
        saddr: "127.0.0.1".parse().expect("addr"),
        sport: 40000,
        daddr: "127.0.0.1".parse().expect("addr"),
        dport: 8080,
        old: TcpState::SynSent,
        new: TcpState::Established,
        pid: 77,
        comm: Comm::new("curl"),
        prev_state_ms: Some(0.25),
        netns: 4026531840,
        via: None,
        reason: None,
        retransmits: None,
        closed_first: None,
    }
}

/// An anomaly record: a server's socket 61.5 s in CLOSE_WAIT, its fd held by pid 900.
pub fn anomaly() -> AnomalyRecord {
    AnomalyRecord {
        workload: None,
        holder_cgroup: None,
        ts: UNIX_EPOCH + Duration::new(1_795_000_000, 0),
        kind: Kind::Lingering(TcpState::CloseWait),
        state: TcpState::CloseWait,
        age_ms: 61_500.0,
        age_is_lower_bound: false,
        sk: 0xffff_8881_05db_8000,
        family: Family::V4,
        saddr: "10.0.0.1".parse().expect("addr"),
        sport: 8080,
        daddr: "10.0.0.2".parse().expect("addr"),
        dport: 5555,
        netns: 4026531833,
        pid: Some(900),
        comm: Some(Comm::new("server")),
        owner_source: OwnerSource::Fd,
        holders: Vec::new(),
        last_owner: None,
        accept_queue: None,
        vitals: None,
        drops: None,
        orphans: None,
        churn: None,
        resolution: None,
        count: None,
        port_range: None,
        tw_reuse: None,
        refused_connects: None,
        refused_binds: None,
        destination: None,
        extra: serde_json::Map::new(),
    }
}
