//! The BTF reader: a corrupt copy of /sys/kernel/btf/vmlinux gives an error, not a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|blob: &[u8]| {
    if let Err(e) = tcpstate::btf::offsets_in_blob(blob) {
        assert!(!e.contains('\n'), "one line: {e}");
    }
});
