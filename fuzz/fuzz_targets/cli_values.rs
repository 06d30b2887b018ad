//! The command line's value parsers: sizes, ring sizes, thresholds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    let _ = tcpstate::cli::byte_size(s);
    let _ = tcpstate::cli::ring_size(s);
    if let Err(e) = tcpstate::tracker::thresholds::parse_override(s) {
        assert!(!e.contains('\n'), "one line: {e}");
    }
});
