//! Bytes any local user chooses (a process name set with `prctl(PR_SET_NAME)`, a corrupt log
//! line) must not reach an operator's terminal as control sequences. Every human-readable
//! output passes them through here: C0 controls, DEL, C1 controls and invalid UTF-8 become
//! `\e`, `\n`, `\t`, `\\` or `\xNN`, the forms `ps` and `ss` users know. JSON keeps exact
//! names (JSON escapes on its own).

use std::{borrow::Cow, fmt::Write as _};

/// `bytes` made safe to print.
pub fn escape_bytes(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.chars().any(needs_escape) => Cow::Borrowed(s),
        _ => Cow::Owned(escape_slow(bytes)),
    }
}

/// `s` made safe to print.
pub fn escape(s: &str) -> Cow<'_, str> {
    if s.chars().any(needs_escape) {
        Cow::Owned(escape_slow(s.as_bytes()))
    } else {
        Cow::Borrowed(s)
    }
}

/// `s` with its control characters escaped as [`escape`] escapes them, but its backslashes
/// kept: for text whose backslashes are already escapes (systemd writes `\x2d` in unit names;
/// a message assembled from escaped parts) and must not be doubled.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if s.chars().any(char::is_control) {
        let mut out = String::with_capacity(s.len() + 8);
        for c in s.chars() {
            if c == '\\' {
                out.push(c);
            } else {
                push_escaped(&mut out, c.encode_utf8(&mut [0u8; 4]));
            }
        }
        Cow::Owned(out)
    } else {
        Cow::Borrowed(s)
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control() || c == '\\'
}

fn escape_slow(mut bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 8);
    while !bytes.is_empty() {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                push_escaped(&mut out, s);
                break;
            }
            Err(e) => {
                let (good, bad) = bytes.split_at(e.valid_up_to());
                // SAFETY-free: `good` is valid UTF-8 by construction.
                push_escaped(&mut out, std::str::from_utf8(good).unwrap_or_default());
                let n = e.error_len().unwrap_or(bad.len()).max(1);
                for b in &bad[..n] {
                    let _ = write!(out, "\\x{b:02x}");
                }
                bytes = &bad[n..];
            }
        }
    }
    out
}

fn push_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\x1b' => out.push_str("\\e"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(out, "\\x{b:02x}");
                }
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_borrowed() {
        assert!(matches!(escape("nginx: worker"), Cow::Borrowed(_)));
        assert!(matches!(escape_bytes("héllo".as_bytes()), Cow::Borrowed(_)));
    }

    #[test]
    fn controls_and_bad_bytes_are_escaped() {
        assert_eq!(
            escape("\x1b[31mEVIL\x1b]0;x\x07"),
            "\\e[31mEVIL\\e]0;x\\x07"
        );
        assert_eq!(escape("a\nb\tc\\d\x7f"), "a\\nb\\tc\\\\d\\x7f");
        // C1 control U+009B (CSI) in UTF-8 is c2 9b.
        assert_eq!(escape("x\u{9b}y"), "x\\xc2\\x9by");
        assert_eq!(escape_bytes(&[b'a', 0xff, 0xfe, b'b']), "a\\xff\\xfeb");
        assert_eq!(escape_bytes(&[0xe2, 0x82]), "\\xe2\\x82");
    }

    #[test]
    fn escape_controls_keeps_backslashes() {
        assert!(matches!(
            escape_controls("dev-disk-by\\x2duuid.service"),
            Cow::Borrowed("dev-disk-by\\x2duuid.service")
        ));
        assert_eq!(
            escape_controls("a\\x2d\x1b[31m\x07\n"),
            "a\\x2d\\e[31m\\x07\\n"
        );
        let all: String = (0..=0x9f_u8).map(char::from).collect();
        assert!(!escape_controls(&all).chars().any(char::is_control));
    }

    #[test]
    fn escaped_output_has_no_control_bytes() {
        let all: Vec<u8> = (0..=255u8).collect();
        let s = escape_bytes(&all);
        assert!(!s.chars().any(char::is_control), "{s}");
    }
}
