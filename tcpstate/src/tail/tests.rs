//! `tail`'s pieces, without files where possible.

use std::time::{Duration, UNIX_EPOCH};

use super::{lines::*, *};
use crate::{
    fixtures::anomaly,
    record::{LeakRecord, Owner, OwnerSource, Started, Stopped, Suppressed},
    socket::Comm,
    state::TcpState,
};

const TRANSITION: &str = r#"{"type":"transition","ts":"2026-11-23T22:47:00.072509318Z","sk":"0xffff888105db8000","family":"ipv4","saddr":"127.0.0.1","sport":43052,"daddr":"127.0.0.1","dport":18080,"old":"SYN_SENT","new":"ESTABLISHED","pid":14949,"comm":"python3","prev_state_ms":0.088936,"netns":4026531833}"#;

fn transition() -> Record {
    serde_json::from_str(TRANSITION).expect("the example parses")
}

fn leak() -> Record {
    Record::LeakSuspected(LeakRecord {
        workload: None,
        ts: UNIX_EPOCH + Duration::new(1_795_000_000, 0),
        pid: 900,
        comm: Comm::new("server"),
        state: TcpState::CloseWait,
        count: 40,
        previous: 12,
        threshold: 10,
    })
}

fn others() -> Vec<Record> {
    let ts = UNIX_EPOCH + Duration::new(1_795_000_000, 0);
    vec![
        Record::Started(Started {
            ts,
            version: "0.1.0".into(),
            pid: 1,
            ring_bytes: 4 << 20,
            seeded: 3,
            features: Vec::new(),
        }),
        Record::Suppressed(Suppressed { ts, transitions: 5 }),
        Record::Stopped(Stopped {
            ts,
            events: 1,
            dropped: 0,
            recursion_misses: 0,
            undecodable: 0,
            table_full: 0,
            timewait_full: 0,
            log_dropped: 0,
            filtered: 0,
            uptime_s: 1.0,
        }),
    ]
}

/// Through JSON, as tail sees them.
fn round_trip(rec: &Record) -> Record {
    let line = serde_json::to_string(rec).expect("serialises");
    serde_json::from_str(&line).expect("parses")
}

#[test]
fn no_filter_passes_everything() {
    let f = Filter::default();
    assert!(f.is_empty());
    assert!(matches(&transition(), &f));
    assert!(matches(&round_trip(&Record::Anomaly(anomaly())), &f));
    assert!(matches(&round_trip(&leak()), &f));
    for r in others() {
        assert!(matches(&round_trip(&r), &f), "{r:?}");
    }
}

#[test]
fn each_filter_on_a_transition() {
    let t = transition();
    let by = |f: Filter| matches(&t, &f);
    assert!(by(Filter {
        port: Some(43052),
        ..Filter::default()
    }));
    assert!(by(Filter {
        port: Some(18080),
        ..Filter::default()
    }));
    assert!(!by(Filter {
        port: Some(80),
        ..Filter::default()
    }));
    assert!(by(Filter {
        state: Some(TcpState::SynSent),
        ..Filter::default()
    }));
    assert!(by(Filter {
        state: Some(TcpState::Established),
        ..Filter::default()
    }));
    assert!(!by(Filter {
        state: Some(TcpState::CloseWait),
        ..Filter::default()
    }));
    assert!(!by(Filter {
        anomalies: true,
        ..Filter::default()
    }));
    assert!(by(Filter {
        pid: Some(14949),
        ..Filter::default()
    }));
    assert!(!by(Filter {
        pid: Some(1),
        ..Filter::default()
    }));
    assert!(by(Filter {
        comm: Some(Comm::new("python3")),
        ..Filter::default()
    }));
    assert!(!by(Filter {
        comm: Some(Comm::new("python")),
        ..Filter::default()
    }));
    // AND: one failing filter is enough.
    assert!(!by(Filter {
        port: Some(18080),
        pid: Some(1),
        ..Filter::default()
    }));
    assert!(by(Filter {
        port: Some(18080),
        pid: Some(14949),
        state: Some(TcpState::Established),
        comm: Some(Comm::new("python3")),
        anomalies: false,
        unit: None,
        container: None,
    }));
}

const ID: &str = "3f2a9c1e5b7d4f6a8c0e2b4d6f8a0c2e4b6d8f0a2c4e6b8d0f2a4c6e8b0d2f4a";

#[test]
fn unit_and_container_filters_read_the_workload() {
    let line = TRANSITION.replace(
        r#""netns":4026531833}"#,
        &format!(r#""netns":4026531833,"cgroup":"/system.slice/docker-{ID}.scope","unit":"docker-{ID}.scope","container_id":"{ID}"}}"#),
    );
    let rec: Record = serde_json::from_str(&line).expect("parses");
    let by = |f: Filter| filter::matches(&rec, &f);
    assert!(by(Filter {
        container: Some("3f2a9c1e".into()),
        ..Filter::default()
    }));
    assert!(by(Filter {
        unit: Some(format!("docker-{ID}.scope")),
        ..Filter::default()
    }));
    assert!(!by(Filter {
        container: Some("3f2b".into()),
        ..Filter::default()
    }));
    assert!(!by(Filter {
        unit: Some("nginx.service".into()),
        ..Filter::default()
    }));
    // A record without a workload never matches a workload filter.
    assert!(!filter::matches(
        &transition(),
        &Filter {
            unit: Some("nginx.service".into()),
            ..Filter::default()
        }
    ));
    // And the JSON comes back out as it went in.
    let Record::Transition(t) = &rec else {
        panic!("a transition")
    };
    assert_eq!(
        t.workload.as_ref().and_then(|w| w.container_id.as_deref()),
        Some(ID)
    );
    assert_eq!(serde_json::to_string(&rec).expect("json"), line);
}

#[test]
fn anomalies_and_leaks() {
    let a = round_trip(&Record::Anomaly(anomaly()));
    let mut resolved = anomaly();
    resolved.resolution = Some("left_state".into());
    let r = round_trip(&Record::AnomalyResolved(resolved));
    let l = round_trip(&leak());
    let only = Filter {
        anomalies: true,
        ..Filter::default()
    };
    for rec in [&a, &r, &l] {
        assert!(matches(rec, &only), "{rec:?}");
        assert!(matches(
            rec,
            &Filter {
                state: Some(TcpState::CloseWait),
                pid: Some(900),
                comm: Some(Comm::new("server")),
                ..only.clone()
            }
        ));
        assert!(!matches(
            rec,
            &Filter {
                state: Some(TcpState::FinWait2),
                ..Filter::default()
            }
        ));
    }
    let port = Filter {
        port: Some(5555),
        ..Filter::default()
    };
    assert!(matches(&a, &port) && matches(&r, &port));
    assert!(!matches(&l, &port), "a leak has no port");
    for rec in others() {
        assert!(!matches(&round_trip(&rec), &only));
        assert!(!matches(&round_trip(&rec), &port));
    }
}

#[test]
fn an_orphan_matches_its_last_owner() {
    let mut o = anomaly();
    o.pid = None;
    o.comm = None;
    o.owner_source = OwnerSource::None;
    let pid = |p| Filter {
        pid: Some(p),
        ..Filter::default()
    };
    assert!(!matches(&Record::Anomaly(o.clone()), &pid(900)));
    o.last_owner = Some(Owner {
        pid: 900,
        comm: Comm::new("server"),
    });
    assert!(matches(&Record::Anomaly(o.clone()), &pid(900)));
    assert!(matches(
        &Record::Anomaly(o),
        &Filter {
            comm: Some(Comm::new("server")),
            ..Filter::default()
        }
    ));
}

#[test]
fn a_long_comm_matches_as_the_kernel_truncates_it() {
    let mut t = transition();
    if let Record::Transition(t) = &mut t {
        t.comm = Comm::new("a-very-long-process-name");
    }
    let t = round_trip(&t);
    let f = Filter {
        comm: Some(Comm::new("a-very-long-process-name")),
        ..Filter::default()
    };
    assert!(matches(&t, &f));
}

fn split(lines: &mut Lines, data: &[u8]) -> Vec<Option<String>> {
    let mut got = Vec::new();
    lines
        .push(data, |l| {
            got.push(match l {
                Line::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
                Line::TooLong => None,
            });
            Ok::<(), ()>(())
        })
        .expect("no error");
    got
}

#[test]
fn lines_hold_back_the_unfinished_one() {
    let mut l = Lines::new(100);
    assert_eq!(
        split(&mut l, b"a\nbb\nc"),
        [Some("a".into()), Some("bb".into())]
    );
    assert!(split(&mut l, b"cc").is_empty(), "no newline yet");
    assert_eq!(
        split(&mut l, b"c\n\nd"),
        [Some("cccc".into()), Some(String::new())]
    );
    assert_eq!(l.take_partial(), Some(b"d".to_vec()));
    assert_eq!(l.take_partial(), None);
    assert!(split(&mut l, b"half").is_empty());
    l.clear();
    assert_eq!(split(&mut l, b"new\n"), [Some("new".into())]);
}

#[test]
fn lines_byte_by_byte() {
    let text = format!("{TRANSITION}\n{TRANSITION}\npart");
    let mut l = Lines::new(1000);
    let mut got = Vec::new();
    for b in text.as_bytes() {
        got.extend(split(&mut l, std::slice::from_ref(b)));
    }
    assert_eq!(got, [Some(TRANSITION.into()), Some(TRANSITION.into())]);
    assert_eq!(l.take_partial(), Some(b"part".to_vec()));
}

#[test]
fn overlong_lines_are_dropped_not_buffered() {
    let mut l = Lines::new(4);
    assert_eq!(
        split(&mut l, b"1234\n12345\nok\n"),
        [Some("1234".into()), None, Some("ok".into())]
    );
    assert!(split(&mut l, b"12").is_empty());
    assert!(split(&mut l, b"345").is_empty());
    assert!(l.pending.len() <= 4);
    assert!(split(&mut l, b"6789").is_empty());
    assert_eq!(split(&mut l, b"0\nx\n"), [None, Some("x".into())]);
    assert!(split(&mut l, b"123456").is_empty());
    assert_eq!(l.take_partial(), None, "an overlong rest is no record");
}

fn reader(data: &[u8]) -> impl FnMut(&mut [u8], u64) -> io::Result<()> + '_ {
    move |buf: &mut [u8], off: u64| {
        let off = usize::try_from(off).expect("small");
        let src = data
            .get(off..off + buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// The obvious way: split everything, take the last `want` kept lines.
fn naive(data: &[u8], want: usize, keep: &impl Fn(&[u8]) -> bool) -> u64 {
    if want == 0 {
        return data.len() as u64;
    }
    let mut starts = Vec::new();
    let mut at = 0;
    for line in data.split(|&b| b == b'\n') {
        if keep(line) {
            starts.push(at as u64);
        }
        at += line.len() + 1;
    }
    starts.len().checked_sub(want).map_or(0, |i| starts[i])
}

#[test]
fn find_start_agrees_with_the_obvious_way() {
    let texts: [&[u8]; 6] = [
        b"",
        b"\n",
        b"a\nb\nc\n",
        b"a\nb\nc",
        b"x\n\nab\nxyz\nb\n\nxx\nc\nxxx",
        b"aaaa\nbb\nxbxb\nc\nbbbbbbb\n",
    ];
    type Keep = dyn Fn(&[u8]) -> bool;
    let keeps: [&Keep; 3] = [
        &|l: &[u8]| !l.is_empty(),
        &|l: &[u8]| l.first() == Some(&b'x'),
        &|l: &[u8]| l.contains(&b'b'),
    ];
    for data in texts {
        for keep in keeps {
            for want in 0..6 {
                let expected = naive(data, want, &keep);
                for chunk in [1, 2, 3, 5, 64] {
                    let got =
                        find_start(&mut reader(data), data.len() as u64, want, chunk, 100, keep)
                            .expect("reads");
                    assert_eq!(
                        got,
                        expected,
                        "{:?} want {want} chunk {chunk}",
                        String::from_utf8_lossy(data)
                    );
                }
            }
        }
    }
}

#[test]
fn find_start_stops_early_and_skips_long_lines() {
    let data = b"first\nan overlong line\nok\nlast\n";
    // Reads that reach the beginning would fail: we must not need them.
    let mut read = |buf: &mut [u8], off: u64| {
        // With 4-byte chunks from 31: [27,31), [23,27), then [19,23)
        // holds the newline before "ok". Nothing earlier is needed.
        assert!(off >= 19, "read too far back: {off}");
        reader(data)(buf, off)
    };
    let two = find_start(&mut read, data.len() as u64, 2, 4, 100, |l| !l.is_empty());
    assert_eq!(two.expect("reads"), 23);
    // Too long (limit 8) is never kept, whatever the chunk size.
    for chunk in [1, 3, 7, 100] {
        let three = find_start(&mut reader(data), data.len() as u64, 3, chunk, 8, |l| {
            !l.is_empty()
        });
        assert_eq!(three.expect("reads"), 0, "chunk {chunk}");
    }
}

#[test]
fn find_start_with_records() {
    let a = serde_json::to_string(&Record::Anomaly(anomaly())).expect("json");
    let data = format!("{TRANSITION}\n{a}\n{TRANSITION}\nnot json\n{TRANSITION}\n");
    let only = Filter {
        anomalies: true,
        ..Filter::default()
    };
    let keep = |l: &[u8]| Out::parse(l).is_ok_and(|r| matches(&r, &only));
    let start = find_start(
        &mut reader(data.as_bytes()),
        data.len() as u64,
        1,
        16,
        MAX_LINE,
        keep,
    )
    .expect("reads");
    assert_eq!(start, TRANSITION.len() as u64 + 1);
    let start = find_start(
        &mut reader(data.as_bytes()),
        data.len() as u64,
        2,
        16,
        MAX_LINE,
        |l| Out::parse(l).is_ok(),
    )
    .expect("reads");
    assert_eq!(
        &data[usize::try_from(start).expect("small")..],
        format!("{TRANSITION}\nnot json\n{TRANSITION}\n")
    );
}

#[test]
fn last_newline_and_counting() {
    for chunk in [1, 2, 3, 64] {
        let end = |d: &[u8]| last_newline_end(&mut reader(d), d.len() as u64, chunk);
        assert_eq!(end(b"").expect("reads"), 0);
        assert_eq!(end(b"abc").expect("reads"), 0);
        assert_eq!(end(b"a\nbc").expect("reads"), 2);
        assert_eq!(end(b"a\nbc\n").expect("reads"), 5);
        let data = b"a\nb\n\ncd\ne";
        let mut read = |buf: &mut [u8], off: u64| {
            let off = usize::try_from(off).expect("small");
            let src = data.get(off..).unwrap_or_default();
            let n = src.len().min(buf.len());
            buf[..n].copy_from_slice(&src[..n]);
            Ok(n)
        };
        assert_eq!(count_newlines(&mut read, 0, chunk).expect("reads"), 0);
        assert_eq!(count_newlines(&mut read, 2, chunk).expect("reads"), 1);
        assert_eq!(count_newlines(&mut read, 5, chunk).expect("reads"), 3);
        assert_eq!(count_newlines(&mut read, 100, chunk).expect("reads"), 4);
    }
}

#[test]
fn os_error_numbers_are_dropped() {
    let e = io::Error::from_raw_os_error(libc::ENOENT);
    assert_eq!(io_msg(&e), "No such file or directory");
    assert_eq!(io_msg(&io::Error::other("plain")), "plain");
}

#[test]
fn broken_pipe_is_recognised_through_context() {
    let e = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe))
        .context("cannot write to stdout");
    assert!(broken_pipe(&e));
    assert!(!broken_pipe(&anyhow::anyhow!("cannot open x")));
}
