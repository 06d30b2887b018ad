//! `tcpstate replay CAPTURE [run flags]`: the daemon's userspace, with no kernel. A capture
//! (`run --capture-events`) is pushed drain by drain through the collector's merge and decode,
//! the tracker and the outputs the flags ask for, as fast as they take it; the CPU it cost
//! says how many events per second one engine thread takes, which says which host one daemon
//! fits. What is left out is what a capture cannot replay: sock_diag answers (seed,
//! reconciliation, owner checks) and cgroup names. Anomalies are written without waiting for
//! their owner check.

use std::time::Instant;

use anyhow::Context as _;

use crate::{
    capture,
    cli::ReplayArgs,
    clock::WallClock,
    decode::Decoded,
    record::Record,
    reorder::Reorder,
    run::setup,
    tracker::{Fact, Tracker},
};

/// How often, in the events' own time, the tracker's deadlines are looked at (the daemon's
/// tick).
const TICK_NS: u64 = 100_000_000;

/// What a replay cost, printed as one JSON line on stderr (stdout is a sink's; the bench reads
/// it).
#[derive(serde::Serialize, Debug)]
pub struct Cost {
    pub events: u64,
    pub drains: usize,
    /// CPU time of the whole process (every thread: the log writer's too), in seconds.
    pub cpu_s: f64,
    pub wall_s: f64,
    /// Events per second of CPU: per core, when one engine thread does the work.
    pub events_per_cpu_s: f64,
    pub ns_per_event: f64,
    pub records: u64,
}

pub fn replay(args: &ReplayArgs) -> anyhow::Result<()> {
    let file = std::fs::File::open(&args.capture)
        .with_context(|| format!("cannot open {}", args.capture.display()))?;
    let drains = capture::read_drains(std::io::BufReader::new(file))
        .with_context(|| format!("cannot read {}", args.capture.display()))?;
    let mut tracker = Tracker::new(setup::tracker_config(&args.run));
    let mut sinks = setup::sinks(&args.run)?;
    let clock = WallClock::now();
    let mut reorder = Reorder::default();
    let (mut events, mut records) = (0u64, 0u64);
    let mut facts = Vec::new();
    let mut next_tick = 0u64;
    let cpu0 = cpu_s();
    let wall0 = Instant::now();
    let n_drains = drains.len();
    for mut d in drains {
        let batch = crate::collector::merge(&mut reorder, &mut d.events, d.cutoff_ns, d.last);
        let now = Instant::now();
        events += batch.events;
        for dec in &batch.decoded {
            let ts = match dec {
                Decoded::Transition(t) => {
                    tracker.on_transition(t, &mut facts);
                    t.ts_ns
                }
                Decoded::Segment(s) => {
                    tracker.on_segment(s, &mut facts);
                    s.ts_ns
                }
            };
            if ts >= next_tick {
                tracker.expire(ts, &mut facts);
                next_tick = ts + TICK_NS;
            }
            for f in facts.drain(..) {
                records += 1;
                match f {
                    Fact::Moved(m) => {
                        sinks.transition(now, || {
                            Record::Transition(crate::record::TransitionRecord::from_moved(
                                &m, clock,
                            ))
                        });
                    }
                    other => sinks.emit(&Record::from_fact(&other, clock), now),
                }
            }
        }
        if !sinks.flush(now) {
            break;
        }
    }
    sinks.finish(std::time::Duration::from_secs(30));
    let cpu = cpu_s() - cpu0;
    let cost = Cost {
        events,
        drains: n_drains,
        cpu_s: cpu,
        wall_s: wall0.elapsed().as_secs_f64(),
        events_per_cpu_s: events as f64 / cpu.max(1e-9),
        ns_per_event: cpu * 1e9 / (events.max(1) as f64),
        records,
    };
    eprintln!("{}", serde_json::to_string(&cost)?);
    Ok(())
}

/// User and system CPU of this process, every thread included.
fn cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer for the call.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
