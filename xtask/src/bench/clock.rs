//! UTC wall-clock conversions: RFC 3339 in tcpstate's log, the report's date.

use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch of "2026-11-23T23:19:56.547190164Z"; None if it is not an
/// RFC 3339 UTC timestamp.
pub fn parse_rfc3339_utc_ns(ts: &str) -> Option<i128> {
    let t = humantime::parse_rfc3339(ts).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_nanos() as i128)
}

/// Now, in nanoseconds since the Unix epoch (CLOCK_REALTIME).
pub fn now_unix_ns() -> i128 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

/// Now as "2026-11-23 23:19:56 UTC".
pub fn now_utc_string() -> String {
    let s = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    format!("{} UTC", s.trim_end_matches('Z').replace('T', " "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcpstate_timestamps() {
        assert_eq!(
            parse_rfc3339_utc_ns("1970-01-01T00:00:01.5Z"),
            Some(1_500_000_000)
        );
        assert_eq!(
            parse_rfc3339_utc_ns("2026-11-23T23:19:56.547190164Z"),
            Some(1_795_475_996_547_190_164)
        );
        assert_eq!(parse_rfc3339_utc_ns("yesterday"), None);
        assert!(now_utc_string().ends_with(" UTC"));
    }
}
