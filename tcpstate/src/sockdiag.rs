//! TCP socket dumps over netlink `NETLINK_SOCK_DIAG` (`INET_DIAG`), the way `ss -t -a` gets them.
//!
//! [`dump_tcp`] lists every full TCP socket (all states but TIME_WAIT and NEW_SYN_RECV, IPv4
//! then IPv6) in the network namespace of the calling thread; [`dump_tcp_in_netns`] does the
//! same in another namespace from a short-lived helper thread, so the caller's thread never
//! changes namespace.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use netlink_packet_core::{
    DoneBuffer, ErrorBuffer, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP,
    NLMSG_OVERRUN, NetlinkBuffer, NetlinkHeader, NetlinkMessage, Parseable,
};
use netlink_packet_sock_diag::{
    SOCK_DIAG_BY_FAMILY, SockDiagMessage,
    constants::IPPROTO_TCP,
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// One socket as reported by the kernel's `inet_diag`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// `libc::AF_INET` or `libc::AF_INET6` as u16.
    pub family: u16,
    /// Kernel TCP state number (1=ESTABLISHED ... 12=NEW_SYN_RECV). Request sockets are reported
    /// by the kernel as SYN_RECV (3).
    pub state: u8,
    /// Local address. `Ipv4Addr` for AF_INET sockets; AF_INET6 sockets keep their IPv6 form
    /// (including v4-mapped addresses of dual-stack sockets), as the eBPF events do.
    pub saddr: IpAddr,
    /// Local port, host order.
    pub sport: u16,
    /// Remote address (unspecified for listeners).
    pub daddr: IpAddr,
    /// Remote port, host order.
    pub dport: u16,
    /// Socket inode; 0 for sockets without a file (orphans, timewait, request sockets).
    pub inode: u32,
    pub uid: u32,
}

/// Every state of a full socket: bits 1..=11 (TCP_ESTABLISHED..TCP_CLOSING) without TIME_WAIT
/// (6). Timewait and request (NEW_SYN_RECV, 12) sockets are mini-sockets the tracepoint never
/// reports and that have no owner; a busy server can hold a million of them, which would make
/// every dump (start-up, reconciliation) cost that much memory and time for nothing.
const FULL_SOCKET_STATES: u32 = ((1 << 12) - 1) & !1 & !(1 << 6);

/// Receive buffer size. The kernel caps one dump datagram at 32 KiB, so this never truncates; a
/// truncation is detected anyway (MSG_TRUNC) and reported as an error.
const RECV_BUF: usize = 64 * 1024;

fn with_context(e: io::Error, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Dump every full TCP socket (see [`FULL_SOCKET_STATES`]), IPv4 then IPv6, in the network
/// namespace the calling thread is in.
pub fn dump_tcp() -> io::Result<Vec<DiagSocket>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)
        .map_err(|e| with_context(e, "sock_diag: creating NETLINK_SOCK_DIAG socket"))?;
    socket
        .bind_auto()
        .map_err(|e| with_context(e, "sock_diag: binding netlink socket"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(|e| with_context(e, "sock_diag: connecting netlink socket to the kernel"))?;

    let mut out = Vec::new();
    let mut buf = vec![0u8; RECV_BUF];
    for (seq, family) in [(1u32, libc::AF_INET as u8), (2, libc::AF_INET6 as u8)] {
        dump_family(&socket, family, seq, &mut buf, &mut out)?;
    }
    Ok(out)
}

fn family_name(family: u8) -> &'static str {
    if i32::from(family) == libc::AF_INET6 {
        "AF_INET6"
    } else {
        "AF_INET"
    }
}

/// Sends one `SOCK_DIAG_BY_FAMILY` dump request and reads the multipart answer until
/// `NLMSG_DONE`.
fn dump_family(
    socket: &Socket,
    family: u8,
    seq: u32,
    buf: &mut [u8],
    out: &mut Vec<DiagSocket>,
) -> io::Result<()> {
    let fam = family_name(family);
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let socket_id = if i32::from(family) == libc::AF_INET6 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    };
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::from_bits_retain(FULL_SOCKET_STATES),
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut req = vec![0u8; request.buffer_len()];
    request.serialize(&mut req);
    let sent = socket
        .send(&req, 0)
        .map_err(|e| with_context(e, format!("sock_diag: sending {fam} dump request")))?;
    if sent != req.len() {
        return Err(invalid(format!(
            "sock_diag: short send of {fam} dump request ({sent} of {} bytes)",
            req.len()
        )));
    }

    loop {
        let n = socket
            .recv(&mut &mut buf[..], libc::MSG_TRUNC)
            .map_err(|e| with_context(e, format!("sock_diag: receiving {fam} dump")))?;
        if n > buf.len() {
            return Err(invalid(format!(
                "sock_diag: {fam} dump datagram of {n} bytes truncated to {}",
                buf.len()
            )));
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("sock_diag: netlink socket closed during {fam} dump"),
            ));
        }
        if parse_datagram(&buf[..n], seq, fam, out)? {
            return Ok(());
        }
    }
}

/// Parses the netlink messages of one datagram, appending sockets to `out`. Returns true once
/// `NLMSG_DONE` for `seq` is seen.
fn parse_datagram(
    mut data: &[u8],
    seq: u32,
    fam: &str,
    out: &mut Vec<DiagSocket>,
) -> io::Result<bool> {
    while !data.is_empty() {
        let msg = NetlinkBuffer::new_checked(data).map_err(|e| {
            invalid(format!(
                "sock_diag: malformed netlink message in {fam} dump: {e}"
            ))
        })?;
        let len = msg.length() as usize;
        let payload = msg.payload();
        // Messages are padded to 4 bytes; the last one may lack its padding.
        let advance = len.next_multiple_of(4).min(data.len());
        // Anything not answering our request (e.g. a stale reply) is skipped.
        if msg.sequence_number() == seq {
            match msg.message_type() {
                NLMSG_NOOP => {}
                NLMSG_DONE => {
                    // The kernel's NLMSG_DONE of a dump carries the dump's final errno.
                    if let Ok(done) = DoneBuffer::new_checked(payload) {
                        let code = done.code();
                        if code < 0 {
                            return Err(with_context(
                                io::Error::from_raw_os_error(-code),
                                format!("sock_diag: {fam} dump ended with an error"),
                            ));
                        }
                    }
                    return Ok(true);
                }
                NLMSG_ERROR => {
                    let err = ErrorBuffer::new_checked(payload).map_err(|e| {
                        invalid(format!(
                            "sock_diag: malformed NLMSG_ERROR in {fam} dump: {e}"
                        ))
                    })?;
                    match err.code() {
                        // An ACK: nothing more will come for this request.
                        None => return Ok(true),
                        Some(code) => {
                            return Err(with_context(
                                io::Error::from_raw_os_error(code.get().saturating_abs()),
                                format!("sock_diag: kernel refused the {fam} dump request"),
                            ));
                        }
                    }
                }
                NLMSG_OVERRUN => {
                    return Err(invalid(format!(
                        "sock_diag: netlink overrun during {fam} dump"
                    )));
                }
                SOCK_DIAG_BY_FAMILY => out.push(parse_socket(payload, fam)?),
                other => {
                    return Err(invalid(format!(
                        "sock_diag: unexpected netlink message type {other} in {fam} dump"
                    )));
                }
            }
        }
        data = &data[advance..];
    }
    Ok(false)
}

fn parse_socket(payload: &[u8], fam: &str) -> io::Result<DiagSocket> {
    // Only the fixed inet_diag_msg header is parsed: the attributes that follow are not needed,
    // and skipping them keeps this working when a kernel adds new ones.
    let h = InetResponseHeader::parse(payload).map_err(|e| {
        invalid(format!(
            "sock_diag: malformed inet_diag_msg in {fam} dump: {e}"
        ))
    })?;
    Ok(DiagSocket {
        family: u16::from(h.family),
        state: h.state,
        saddr: h.socket_id.source_address,
        sport: h.socket_id.source_port,
        daddr: h.socket_id.destination_address,
        dport: h.socket_id.destination_port,
        inode: h.inode,
        uid: h.uid,
    })
}

/// Same as [`dump_tcp`], inside the network namespace that `netns_path` opens (a
/// `/proc/PID/ns/net` link, a `/proc/PID/task/TID/ns/net` link, or a `/run/netns/NAME` mount).
///
/// The dump runs on a short-lived dedicated thread that `setns(2)`s into the namespace (which
/// affects only that thread; its netlink socket stays bound to that namespace), so the caller's
/// thread is never moved. If the path is the calling thread's own namespace, no thread is used.
pub fn dump_tcp_in_netns(netns_path: &Path) -> io::Result<Vec<DiagSocket>> {
    let shown = netns_path.display().to_string();
    let ns = File::open(netns_path)
        .map_err(|e| with_context(e, format!("sock_diag: opening netns {shown}")))?;
    let target = ns
        .metadata()
        .map_err(|e| with_context(e, format!("sock_diag: stat of netns {shown}")))?;
    if let Ok(cur) = std::fs::metadata("/proc/thread-self/ns/net")
        && cur.dev() == target.dev()
        && cur.ino() == target.ino()
    {
        return dump_tcp();
    }

    let handle = std::thread::Builder::new()
        .name("tcpstate-netns".into())
        .spawn(move || -> io::Result<Vec<DiagSocket>> {
            // SAFETY: `ns` is an open file descriptor owned by this closure for the whole call;
            // setns only changes the namespace of this (dedicated, soon to exit) thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(with_context(
                    io::Error::last_os_error(),
                    format!("sock_diag: setns(CLONE_NEWNET) into {shown}"),
                ));
            }
            drop(ns);
            dump_tcp().map_err(|e| with_context(e, format!("in netns {shown}")))
        })
        .map_err(|e| with_context(e, "sock_diag: spawning netns helper thread"))?;
    handle.join().unwrap_or_else(|_| {
        Err(io::Error::other(format!(
            "sock_diag: netns helper thread for {} panicked",
            netns_path.display()
        )))
    })
}

/// Inode of the network namespace of the current thread (stat of `/proc/thread-self/ns/net`).
pub fn current_netns() -> io::Result<u32> {
    let md = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|e| with_context(e, "stat /proc/thread-self/ns/net"))?;
    u32::try_from(md.ino()).map_err(|_| {
        invalid(format!(
            "netns inode {} of /proc/thread-self/ns/net does not fit in 32 bits",
            md.ino()
        ))
    })
}

/// Map of netns inode -> a path that opens it, one per inode, for every network namespace some
/// process is in (as `/proc/PID/ns/net`) and every named namespace under `/run/netns/*`. A named
/// namespace is given by its `/run/netns` path, which stays valid when processes exit. Processes
/// that vanish or deny access are skipped; never fails (an unreadable /proc gives an empty map).
pub fn all_netns() -> HashMap<u32, PathBuf> {
    let mut map = HashMap::new();
    // nsfs has a single superblock: a /run/netns entry whose device differs is a stale file
    // (namespace no longer mounted there), not a namespace.
    let nsfs_dev = std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| m.dev());

    let add = |path: PathBuf, map: &mut HashMap<u32, PathBuf>| {
        let Ok(md) = std::fs::metadata(&path) else {
            return;
        };
        if nsfs_dev.is_some_and(|dev| dev != md.dev()) {
            return;
        }
        if let Ok(ino) = u32::try_from(md.ino()) {
            map.entry(ino).or_insert(path);
        }
    };

    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        let mut names: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        names.sort();
        for p in names {
            add(p, &mut map);
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc") {
        let mut pids: Vec<u32> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .collect();
        pids.sort_unstable();
        for pid in pids {
            add(PathBuf::from(format!("/proc/{pid}/ns/net")), &mut map);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener, TcpStream};
    use std::process::Command;

    const ESTABLISHED: u8 = 1;
    const LISTEN: u8 = 10;

    fn find(socks: &[DiagSocket], state: u8, sport: u16, dport: u16) -> Option<&DiagSocket> {
        socks
            .iter()
            .find(|s| s.state == state && s.sport == sport && s.dport == dport)
    }

    /// A raw netlink message: nlmsghdr + payload, padded to 4 bytes.
    fn nlmsg(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = (16 + payload.len()) as u32;
        let mut v = Vec::new();
        v.extend_from_slice(&len.to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(payload);
        v.resize(v.len().next_multiple_of(4), 0);
        v
    }

    /// A raw inet_diag_msg (72 bytes).
    fn diag_msg(
        family: u8,
        state: u8,
        src: [u8; 16],
        sport: u16,
        dst: [u8; 16],
        dport: u16,
        inode: u32,
    ) -> Vec<u8> {
        let mut v = vec![family, state, 0, 0];
        v.extend_from_slice(&sport.to_be_bytes());
        v.extend_from_slice(&dport.to_be_bytes());
        v.extend_from_slice(&src);
        v.extend_from_slice(&dst);
        v.extend_from_slice(&[0; 4 + 8]); // interface, cookie
        for w in [0u32, 0, 0, 1000, inode] {
            v.extend_from_slice(&w.to_ne_bytes()); // expires, rqueue, wqueue, uid, inode
        }
        assert_eq!(v.len(), 72);
        v
    }

    #[test]
    fn parses_multipart_datagrams() {
        let v4 = {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&[10, 0, 0, 1]);
            a
        };
        let v6 = "::ffff:10.0.0.2"
            .parse::<std::net::Ipv6Addr>()
            .expect("addr")
            .octets();
        let mut dgram = nlmsg(
            SOCK_DIAG_BY_FAMILY,
            7,
            &diag_msg(2, 1, v4, 443, v4, 51000, 99),
        );
        dgram.extend(nlmsg(
            SOCK_DIAG_BY_FAMILY,
            6,
            &diag_msg(2, 10, v4, 1, v4, 0, 1),
        )); // other seq
        dgram.extend(nlmsg(
            SOCK_DIAG_BY_FAMILY,
            7,
            &diag_msg(10, 6, v6, 80, v6, 40000, 0),
        ));
        let mut out = Vec::new();
        assert!(!parse_datagram(&dgram, 7, "test", &mut out).expect("parse"));
        assert_eq!(
            out[0],
            DiagSocket {
                family: libc::AF_INET as u16,
                state: 1,
                saddr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                sport: 443,
                daddr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                dport: 51000,
                inode: 99,
                uid: 1000,
            }
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].family, libc::AF_INET6 as u16);
        assert_eq!(out[1].saddr, IpAddr::V6(std::net::Ipv6Addr::from(v6)));
        assert_eq!((out[1].sport, out[1].dport, out[1].state), (80, 40000, 6));

        // NLMSG_DONE (with its int payload) ends the dump.
        let done = nlmsg(NLMSG_DONE, 7, &0i32.to_ne_bytes());
        assert!(parse_datagram(&done, 7, "test", &mut out).expect("done"));
        // A DONE carrying a negative errno is an error.
        let done = nlmsg(NLMSG_DONE, 7, &(-libc::EINTR).to_ne_bytes());
        let e = parse_datagram(&done, 7, "test", &mut out).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
        assert!(e.to_string().contains("dump ended with an error"), "{e}");
    }

    #[test]
    fn netlink_errors_become_io_errors() {
        let mut out = Vec::new();
        let mut payload = (-libc::EPERM).to_ne_bytes().to_vec();
        payload.extend_from_slice(&[0; 16]); // the echoed request header
        let e =
            parse_datagram(&nlmsg(NLMSG_ERROR, 3, &payload), 3, "AF_INET", &mut out).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(
            e.to_string().contains("kernel refused the AF_INET dump"),
            "{e}"
        );

        let e = parse_datagram(&[1, 2, 3], 3, "AF_INET", &mut out).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let e = parse_datagram(
            &nlmsg(SOCK_DIAG_BY_FAMILY, 3, &[2, 1]),
            3,
            "AF_INET",
            &mut out,
        )
        .unwrap_err();
        assert!(e.to_string().contains("malformed inet_diag_msg"), "{e}");
        assert!(out.is_empty());
    }

    #[test]
    fn dump_sees_listener_and_both_established_ends() {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let lport = listener.local_addr().expect("local_addr").port();
        let client = TcpStream::connect((Ipv4Addr::LOCALHOST, lport)).expect("connect");
        let cport = client.local_addr().expect("local_addr").port();
        let (_server, _) = listener.accept().expect("accept");

        let socks = dump_tcp().expect("dump_tcp");
        let l = find(&socks, LISTEN, lport, 0).expect("listener in dump");
        assert_eq!(l.family, libc::AF_INET as u16);
        assert_eq!(l.saddr, lo);
        assert_ne!(l.inode, 0);

        let c = find(&socks, ESTABLISHED, cport, lport).expect("client end in dump");
        assert_eq!((c.saddr, c.daddr), (lo, lo));
        assert_ne!(c.inode, 0);
        let s = find(&socks, ESTABLISHED, lport, cport).expect("server end in dump");
        assert_eq!((s.saddr, s.daddr), (lo, lo));
        assert_ne!(s.inode, 0);
        assert_ne!(s.inode, c.inode);
        // SAFETY: getuid has no preconditions.
        assert_eq!(s.uid, unsafe { libc::getuid() });
    }

    #[test]
    fn dump_sees_ipv6_sockets() {
        let Ok(listener) = TcpListener::bind("[::1]:0") else {
            eprintln!("no IPv6 loopback; skipping");
            return;
        };
        let port = listener.local_addr().expect("local_addr").port();
        let socks = dump_tcp().expect("dump_tcp");
        let l = find(&socks, LISTEN, port, 0).expect("v6 listener in dump");
        assert_eq!(l.family, libc::AF_INET6 as u16);
        assert_eq!(l.saddr, "::1".parse::<IpAddr>().expect("addr"));
    }

    #[test]
    fn current_netns_matches_proc_self_and_all_netns() {
        let ns = current_netns().expect("current_netns");
        assert_ne!(ns, 0);
        let all = all_netns();
        let path = all.get(&ns).expect("own netns listed");
        let md = std::fs::metadata(path).expect("stat listed path");
        assert_eq!(md.ino(), u64::from(ns));
        // Dumping "in" our own namespace takes the no-thread path and still works.
        dump_tcp_in_netns(Path::new("/proc/thread-self/ns/net")).expect("dump in own netns");
    }

    #[test]
    fn dump_in_missing_netns_is_an_error() {
        let err = dump_tcp_in_netns(Path::new("/nonexistent/tcpstate/netns")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/tcpstate/netns"),
            "{err}"
        );
    }

    /// Deletes the named netns when dropped, so a failing test does not leak it.
    struct NetnsGuard(String);

    impl Drop for NetnsGuard {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    fn ip(args: &[&str]) {
        let st = Command::new("ip").args(args).status().expect("run ip");
        assert!(st.success(), "ip {args:?} failed: {st}");
    }

    #[test]
    fn dump_in_other_netns() {
        let name = format!("tcpstate-diag-test-{}", std::process::id());
        // A leftover from an aborted run with the same pid would make `ip netns add` fail.
        if Path::new("/run/netns").join(&name).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
        ip(&["netns", "add", &name]);
        let _guard = NetnsGuard(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        let path = PathBuf::from(format!("/run/netns/{name}"));

        // Open the listener from a thread inside the namespace; the socket stays in that netns.
        let p = path.clone();
        let listener = std::thread::spawn(move || {
            let f = File::open(&p).expect("open netns");
            // SAFETY: valid fd; only this helper thread moves.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind in netns")
        })
        .join()
        .expect("netns thread");
        let port = listener.local_addr().expect("local_addr").port();
        let ino = std::fs::metadata(&path).expect("stat netns").ino();

        let inside = dump_tcp_in_netns(&path).expect("dump in netns");
        let l = find(&inside, LISTEN, port, 0).expect("listener found inside netns");
        assert_ne!(l.inode, 0);

        let host = dump_tcp().expect("dump in host netns");
        assert!(
            !host.iter().any(|s| s.inode == l.inode),
            "netns listener leaked into host dump"
        );
        // The caller's thread did not move.
        assert_ne!(u64::from(current_netns().expect("current_netns")), ino);
        assert_eq!(all_netns().get(&(ino as u32)), Some(&path));
        drop(listener);
    }
}
