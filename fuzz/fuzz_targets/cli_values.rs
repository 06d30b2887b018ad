//! The command line's value parsers: sizes, ring sizes, thresholds, cgroup paths; and the
//! names derived from a cgroup path, which whoever may create cgroups chooses.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    let _ = tcpstate::cli::byte_size(s);
    let _ = tcpstate::cli::ring_size(s);
    if let Err(e) = tcpstate::cli::cgroup_path(s) {
        assert!(!e.contains('\n'), "one line: {e}");
    }
    let w = tcpstate::workload::Workload::from_path(s.to_owned());
    if let Some(id) = &w.container_id {
        assert_eq!(id.len(), 64);
    }
    let _ = w.label();
    if let Err(e) = tcpstate::tracker::rules::thresholds::parse_override(s) {
        assert!(!e.contains('\n'), "one line: {e}");
    }
});
