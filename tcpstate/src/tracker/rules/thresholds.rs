//! How long a socket may sit in a state before it is an anomaly.

use std::time::Duration;

use crate::state::TcpState;

/// Per-state limits; `None` means "never an anomaly".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Thresholds([Option<Duration>; TcpState::COUNT]);

impl Thresholds {
    pub fn none() -> Self {
        Self([None; TcpState::COUNT])
    }

    /// The defaults, documented in the README:
    /// - CLOSE_WAIT 60s: the kernel never times it out; only close() ends it.
    /// - FIN_WAIT2 = net.ipv4.tcp_fin_timeout (60s by default): an orphan
    ///   would have become a timewait socket by then, so a full socket still
    ///   here is half-closed and held by its application.
    /// - FIN_WAIT1, LAST_ACK, CLOSING 30s: our FIN is unacknowledged that
    ///   long (peer gone or a zero window); retransmissions give up after
    ///   minutes, so 30s is already abnormal on any real network.
    /// - SYN_SENT 10s: by then the SYN was retransmitted three times (1s,
    ///   2s, 4s); the connect is failing and the caller is waiting.
    pub fn defaults(fin_timeout: Duration) -> Self {
        let mut t = Self::none();
        t.set(TcpState::CloseWait, Some(Duration::from_secs(60)));
        t.set(TcpState::FinWait2, Some(fin_timeout));
        t.set(TcpState::FinWait1, Some(Duration::from_secs(30)));
        t.set(TcpState::LastAck, Some(Duration::from_secs(30)));
        t.set(TcpState::Closing, Some(Duration::from_secs(30)));
        t.set(TcpState::SynSent, Some(Duration::from_secs(10)));
        t
    }

    pub fn get(&self, st: TcpState) -> Option<Duration> {
        self.0[st as usize]
    }

    pub fn set(&mut self, st: TcpState, d: Option<Duration>) {
        self.0[st as usize] = d;
    }

    pub fn iter(&self) -> impl Iterator<Item = (TcpState, Duration)> + '_ {
        TcpState::ALL
            .into_iter()
            .filter_map(|st| self.get(st).map(|d| (st, d)))
    }
}

/// One `--threshold`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Threshold {
    /// A state's age limit (None: off).
    State(TcpState, Option<Duration>),
    /// A host rule's setting (`time_wait_pressure=0.5`, `accept_queue_full=off`, ...).
    Rule(super::RuleSetting),
}

/// Longest threshold accepted: beyond it a typo, not a policy (and a nanosecond count near
/// u64::MAX would wrap into "now").
const MAX_THRESHOLD: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Parses `STATE=DURATION` (`close_wait=2s`, `FIN_WAIT2=5m`, `syn_sent=off`), or a host
/// rule's `NAME=VALUE` (`time_wait_pressure=FRACTION|off`, `accept_queue_full=DURATION|off`),
/// parsed by its rule.
pub fn parse_override(s: &str) -> Result<Threshold, String> {
    let (state, dur) = s
        .split_once('=')
        .ok_or_else(|| format!("expected STATE=DURATION, got {s:?}"))?;
    if let Some(setting) = super::RuleSetting::parse(state, dur) {
        return setting.map(Threshold::Rule);
    }
    let st = TcpState::parse(state).ok_or_else(|| format!("unknown TCP state {state:?}"))?;
    if matches!(
        st,
        TcpState::Close | TcpState::TimeWait | TcpState::NewSynRecv
    ) {
        return Err(match st {
            TcpState::TimeWait => "TIME_WAIT cannot have a threshold: it always ends on the \
                 kernel's 60 s timer (see time_wait_pressure=FRACTION)"
                .to_owned(),
            st => format!(
                "{} cannot have a threshold: no socket sits in it",
                st.name()
            ),
        });
    }
    duration(dur).map(|d| Threshold::State(st, d))
}

/// A share in (0, 1]: None for `off`.
pub(super) fn fraction(v: &str, what: &str) -> Result<Option<f64>, String> {
    let v = v.trim();
    if v == "off" || v == "none" {
        return Ok(None);
    }
    match v.parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(Some(f)),
        _ => Err(format!("{what} in (0, 1] or off, got {v:?}")),
    }
}

/// A threshold's duration: None for `off`.
pub(super) fn duration(dur: &str) -> Result<Option<Duration>, String> {
    let dur = dur.trim();
    if dur == "off" || dur == "none" {
        return Ok(None);
    }
    let d = humantime::parse_duration(dur).map_err(|e| format!("bad duration {dur:?}: {e}"))?;
    if d.is_zero() {
        return Err("a threshold must be longer than 0 (use off to disable)".into());
    }
    if d > MAX_THRESHOLD {
        return Err(format!(
            "a threshold of {dur:?} is longer than ten years (use off to disable)"
        ));
    }
    Ok(Some(d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::rules::RuleSetting;

    #[test]
    fn parses_overrides() {
        assert_eq!(
            parse_override("close_wait=2s"),
            Ok(Threshold::State(
                TcpState::CloseWait,
                Some(Duration::from_secs(2))
            ))
        );
        assert_eq!(
            parse_override("FIN_WAIT2=5m"),
            Ok(Threshold::State(
                TcpState::FinWait2,
                Some(Duration::from_secs(300))
            ))
        );
        assert_eq!(
            parse_override("syn-sent=off"),
            Ok(Threshold::State(TcpState::SynSent, None))
        );
        assert_eq!(
            parse_override("time_wait_pressure=0.5"),
            Ok(Threshold::Rule(RuleSetting::TimeWaitPressure(Some(0.5))))
        );
        assert_eq!(
            parse_override("time_wait_pressure=off"),
            Ok(Threshold::Rule(RuleSetting::TimeWaitPressure(None)))
        );
        assert_eq!(
            parse_override("orphan_pressure=0.25"),
            Ok(Threshold::Rule(RuleSetting::OrphanPressure(Some(0.25))))
        );
        assert!(parse_override("orphan_pressure=1.5").is_err());
        assert_eq!(
            parse_override("accept_queue_full=3s"),
            Ok(Threshold::Rule(RuleSetting::AcceptQueueFull(Some(
                Duration::from_secs(3)
            ))))
        );
        assert_eq!(
            parse_override("Accept_Queue_Full=off"),
            Ok(Threshold::Rule(RuleSetting::AcceptQueueFull(None)))
        );
        assert!(parse_override("time_wait_pressure=2").is_err());
        assert!(parse_override("time_wait_pressure=0").is_err());
        // A duration that would wrap a nanosecond count is refused, not wrapped.
        let e = parse_override("close_wait=18446744075s 709551616ns").unwrap_err();
        assert!(e.contains("ten years"), "{e}");
        assert!(parse_override("close_wait").is_err());
        assert!(parse_override("bogus=1s").is_err());
        assert!(parse_override("close_wait=soon").is_err());
        assert!(parse_override("close_wait=0s").is_err());
        assert!(parse_override("time_wait=1s").is_err());
    }

    #[test]
    fn defaults_cover_lingering_states_only() {
        let t = Thresholds::defaults(Duration::from_secs(45));
        assert_eq!(t.get(TcpState::FinWait2), Some(Duration::from_secs(45)));
        assert_eq!(t.get(TcpState::CloseWait), Some(Duration::from_secs(60)));
        assert_eq!(t.get(TcpState::Established), None);
        assert_eq!(t.get(TcpState::Listen), None);
        assert_eq!(t.iter().count(), 6);
    }
}
