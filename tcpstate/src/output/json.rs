//! JSON Lines for records. Transitions are the hot path (every event, up to
//! hundreds of thousands a second), so they are written by hand: profiling
//! the daemon under churn with a full log showed serde's string escaping
//! and RFC 3339 formatting as the top costs. The output is byte-identical
//! to `serde_json::to_string(&Record)` (tested below); every other record
//! goes through serde.

use std::{
    io::Write as _,
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use crate::record::{Record, TransitionRecord};

#[derive(Default)]
pub struct JsonWriter {
    /// `YYYY-MM-DDTHH:MM:SS.` of the last second formatted.
    ts_second: Option<u64>,
    ts_prefix: Vec<u8>,
}

impl JsonWriter {
    /// Appends `rec` and a newline.
    pub fn write(&mut self, buf: &mut Vec<u8>, rec: &Record) {
        match rec {
            Record::Transition(t) => self.transition(buf, t),
            // Serialising our own types into a Vec cannot fail.
            other => {
                let _ = serde_json::to_writer(&mut *buf, other);
            }
        }
        buf.push(b'\n');
    }

    fn transition(&mut self, buf: &mut Vec<u8>, t: &TransitionRecord) {
        let mut n = itoa::Buffer::new();
        buf.extend_from_slice(b"{\"type\":\"transition\",\"ts\":\"");
        self.ts(buf, t.ts);
        buf.extend_from_slice(b"\",\"sk\":\"");
        hex(buf, t.sk);
        buf.extend_from_slice(b"\",\"family\":\"");
        buf.extend_from_slice(t.family.name().as_bytes());
        buf.extend_from_slice(b"\",\"saddr\":\"");
        addr(buf, t.saddr);
        buf.extend_from_slice(b"\",\"sport\":");
        buf.extend_from_slice(n.format(t.sport).as_bytes());
        buf.extend_from_slice(b",\"daddr\":\"");
        addr(buf, t.daddr);
        buf.extend_from_slice(b"\",\"dport\":");
        buf.extend_from_slice(n.format(t.dport).as_bytes());
        buf.extend_from_slice(b",\"old\":\"");
        buf.extend_from_slice(t.old.name().as_bytes());
        buf.extend_from_slice(b"\",\"new\":\"");
        buf.extend_from_slice(t.new.name().as_bytes());
        buf.extend_from_slice(b"\",\"pid\":");
        buf.extend_from_slice(n.format(t.pid).as_bytes());
        buf.extend_from_slice(b",\"comm\":");
        // The only field a process chooses: escape it properly.
        let _ = serde_json::to_writer(&mut *buf, t.comm.as_str().as_ref());
        buf.extend_from_slice(b",\"prev_state_ms\":");
        let _ = serde_json::to_writer(&mut *buf, &t.prev_state_ms);
        buf.extend_from_slice(b",\"netns\":");
        buf.extend_from_slice(n.format(t.netns).as_bytes());
        if let Some(w) = &t.workload {
            buf.extend_from_slice(w.json_members().as_bytes());
        }
        if let Some(via) = &t.via {
            buf.extend_from_slice(b",\"via\":");
            let _ = serde_json::to_writer(&mut *buf, via);
        }
        if let Some(reason) = &t.reason {
            buf.extend_from_slice(b",\"reason\":");
            let _ = serde_json::to_writer(&mut *buf, reason);
        }
        if let Some(r) = t.retransmits {
            buf.extend_from_slice(b",\"retransmits\":");
            buf.extend_from_slice(n.format(r).as_bytes());
        }
        if let Some(side) = &t.closed_first {
            buf.extend_from_slice(b",\"closed_first\":");
            let _ = serde_json::to_writer(&mut *buf, side);
        }
        buf.push(b'}');
    }

    /// RFC 3339 UTC with nanoseconds, the date part cached per second.
    fn ts(&mut self, buf: &mut Vec<u8>, t: SystemTime) {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = d.as_secs();
        if self.ts_second != Some(secs) {
            self.ts_prefix.clear();
            let whole = humantime::format_rfc3339_seconds(
                UNIX_EPOCH + std::time::Duration::from_secs(secs),
            );
            let _ = write!(self.ts_prefix, "{whole}");
            self.ts_prefix.pop(); // the 'Z'
            self.ts_prefix.push(b'.');
            self.ts_second = Some(secs);
        }
        buf.extend_from_slice(&self.ts_prefix);
        let mut digits = [b'0'; 10];
        let mut ns = d.subsec_nanos();
        for slot in digits[..9].iter_mut().rev() {
            *slot = b'0' + (ns % 10) as u8;
            ns /= 10;
        }
        digits[9] = b'Z';
        buf.extend_from_slice(&digits);
    }
}

/// `{:#x}` without the formatting machinery.
fn hex(buf: &mut Vec<u8>, v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    buf.extend_from_slice(b"0x");
    let nibbles = ((64 - v.leading_zeros()).div_ceil(4)).max(1);
    for i in (0..nibbles).rev() {
        buf.push(DIGITS[((v >> (i * 4)) & 0xf) as usize]);
    }
}

fn addr(buf: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(a) => {
            let mut n = itoa::Buffer::new();
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    buf.push(b'.');
                }
                buf.extend_from_slice(n.format(o).as_bytes());
            }
        }
        IpAddr::V6(a) => {
            let _ = write!(buf, "{a}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        record::Stopped,
        socket::{Comm, Family},
        state::TcpState,
    };

    #[test]
    fn transitions_are_byte_identical_to_serde() {
        let mut w = JsonWriter::default();
        let comms = [
            "curl",
            "a\"b\\c",
            "tab\there",
            "\u{1}ctl",
            "0123456789abcdef",
            "",
        ];
        let addrs = [
            "127.0.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1:2",
            "::ffff:10.0.0.1",
        ];
        let mut i = 0u64;
        for comm in comms {
            for a in addrs {
                for prev in [None, Some(0.0), Some(0.000123), Some(1234.5678), Some(1e-9)] {
                    i += 1;
                    let t = TransitionRecord {
                        workload: None,
                        ts: UNIX_EPOCH
                            + Duration::new(
                                1_795_000_000 + i / 3,
                                (i * 7_919) as u32 % 1_000_000_000,
                            ),
                        sk: if i.is_multiple_of(7) {
                            i
                        } else {
                            0xffff_8880_0000_0000 + i
                        },
                        family: if a.contains(':') {
                            Family::V6
                        } else {
                            Family::V4
                        },
                        saddr: a.parse().expect("addr"),
                        sport: (i * 13) as u16,
                        daddr: a.parse().expect("addr"),
                        dport: u16::MAX,
                        old: TcpState::ALL[(i % 12) as usize],
                        new: TcpState::ALL[((i + 5) % 12) as usize],
                        pid: i as u32 * 1000,
                        comm: Comm::new(comm),
                        prev_state_ms: prev,
                        netns: u32::MAX - i as u32,
                        via: i.is_multiple_of(3).then(|| "sock_diag".to_owned()),
                        reason: i.is_multiple_of(4).then(|| "refused".to_owned()),
                        retransmits: i.is_multiple_of(5).then_some(i as u16),
                        closed_first: i.is_multiple_of(7).then(|| "peer".to_owned()),
                    };
                    let rec = Record::Transition(t);
                    let mut buf = Vec::new();
                    w.write(&mut buf, &rec);
                    let want = serde_json::to_string(&rec).expect("serde") + "\n";
                    assert_eq!(String::from_utf8_lossy(&buf), want);
                }
            }
        }
    }

    #[test]
    fn other_records_go_through_serde() {
        let rec = Record::Stopped(Stopped {
            ts: UNIX_EPOCH,
            events: 1,
            dropped: 2,
            recursion_misses: 3,
            undecodable: 0,
            table_full: 0,
            timewait_full: 0,
            log_dropped: 0,
            filtered: 0,
            uptime_s: 0.5,
        });
        let mut buf = Vec::new();
        JsonWriter::default().write(&mut buf, &rec);
        assert_eq!(
            String::from_utf8_lossy(&buf),
            serde_json::to_string(&rec).expect("serde") + "\n"
        );
    }
}
