//! The sock_diag answer parser: any datagram parses or is one error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // With vital signs: every answer's attributes are parsed too.
    let mut out: Vec<(
        tcpstate::sockdiag::DiagSocket,
        Option<tcpstate::socket::Vitals>,
    )> = Vec::new();
    let _ = tcpstate::sockdiag::proto::parse_datagram(data, 1, "fuzz", &mut out);
    if data.len() >= 4 {
        let _ = tcpstate::sockdiag::proto::parse_socket(&data[4..], "fuzz");
    }
});
