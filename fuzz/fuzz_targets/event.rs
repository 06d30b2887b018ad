//! The ring-buffer event decoder: any 88 bytes (or fewer) decode or are refused.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = tcpstate::decode::decode(bytes);
});
