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

    /// The host's FIN_WAIT2 timeout, 60s when it cannot be read.
    pub fn host_fin_timeout() -> Duration {
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fin_timeout")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map_or(Duration::from_secs(60), Duration::from_secs)
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

/// Parses `STATE=DURATION` (`close_wait=2s`, `FIN_WAIT2=5m`, `syn_sent=off`).
pub fn parse_override(s: &str) -> Result<(TcpState, Option<Duration>), String> {
    let (state, dur) = s
        .split_once('=')
        .ok_or_else(|| format!("expected STATE=DURATION, got {s:?}"))?;
    let st = TcpState::parse(state).ok_or_else(|| format!("unknown TCP state {state:?}"))?;
    if matches!(
        st,
        TcpState::Close | TcpState::TimeWait | TcpState::NewSynRecv
    ) {
        return Err(format!(
            "{} cannot have a threshold: the tracepoint never shows sockets sitting in it",
            st.name()
        ));
    }
    let dur = dur.trim();
    if dur == "off" || dur == "none" {
        return Ok((st, None));
    }
    let d = humantime::parse_duration(dur).map_err(|e| format!("bad duration {dur:?}: {e}"))?;
    if d.is_zero() {
        return Err("a threshold must be longer than 0 (use off to disable)".into());
    }
    Ok((st, Some(d)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_overrides() {
        assert_eq!(
            parse_override("close_wait=2s"),
            Ok((TcpState::CloseWait, Some(Duration::from_secs(2))))
        );
        assert_eq!(
            parse_override("FIN_WAIT2=5m"),
            Ok((TcpState::FinWait2, Some(Duration::from_secs(300))))
        );
        assert_eq!(
            parse_override("syn-sent=off"),
            Ok((TcpState::SynSent, None))
        );
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
