//! `tcpstate tail`: any line of a log (a corrupt or hostile one included) is parsed or
//! refused, and what parses renders as text without a panic and without control bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcpstate::{output::text, record::Record};

fuzz_target!(|line: &[u8]| {
    if let Ok(rec) = serde_json::from_slice::<Record>(line) {
        let mut out = String::new();
        text::write_record(&mut out, &rec, false);
        // One line, and nothing a terminal would act on.
        assert_eq!(out.matches('\n').count(), 1, "{out:?}");
        assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
    }
});
