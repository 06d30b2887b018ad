use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use super::*;
use crate::sockdiag::netns::{all_netns, current_netns, within};

const ESTABLISHED: u8 = 1;
const LISTEN: u8 = 10;

fn find(socks: &[DiagSocket], state: u8, sport: u16, dport: u16) -> Option<&DiagSocket> {
    socks
        .iter()
        .find(|s| s.state == state && s.tuple.sport == sport && s.tuple.dport == dport)
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
    let mut out: Vec<DiagSocket> = Vec::new();
    assert!(!parse_datagram(&dgram, 7, "test", &mut out).expect("parse"));
    let ten = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    assert_eq!(
        out[0],
        DiagSocket {
            drops: 0,
            cgroup: 0,
            state: 1,
            tuple: crate::socket::Tuple::new(ten, 443, ten, 51000),
            timer: 0,
            expires_ms: 0,
            rqueue: 0,
            wqueue: 0,
            inode: 99,
            uid: 1000,
        }
    );
    assert_eq!(out.len(), 2);
    assert_eq!(out[1].tuple.family, crate::socket::Family::V6);
    assert_eq!(
        out[1].tuple.saddr(),
        IpAddr::V6(std::net::Ipv6Addr::from(v6))
    );
    assert_eq!(
        (out[1].tuple.sport, out[1].tuple.dport, out[1].state),
        (80, 40000, 6)
    );

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
    let mut out: Vec<DiagSocket> = Vec::new();
    let mut payload = (-libc::EPERM).to_ne_bytes().to_vec();
    payload.extend_from_slice(&[0; 16]); // the echoed request header
    let e = parse_datagram(&nlmsg(NLMSG_ERROR, 3, &payload), 3, "AF_INET", &mut out).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
    assert!(
        e.to_string().contains("kernel refused the AF_INET request"),
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

    let socks = Diag::open().expect("open").dump(ALL_STATES).expect("dump");
    let l = find(&socks, LISTEN, lport, 0).expect("listener in dump");
    assert_eq!(l.tuple.family, crate::socket::Family::V4);
    assert_eq!(l.tuple.saddr(), lo);
    assert_ne!(l.inode, 0);

    let c = find(&socks, ESTABLISHED, cport, lport).expect("client end in dump");
    assert_eq!((c.tuple.saddr(), c.tuple.daddr()), (lo, lo));
    assert_ne!(c.inode, 0);
    let s = find(&socks, ESTABLISHED, lport, cport).expect("server end in dump");
    assert_eq!((s.tuple.saddr(), s.tuple.daddr()), (lo, lo));
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
    let socks = Diag::open().expect("open").dump(ALL_STATES).expect("dump");
    let l = find(&socks, LISTEN, port, 0).expect("v6 listener in dump");
    assert_eq!(l.tuple.family, crate::socket::Family::V6);
    assert_eq!(l.tuple.saddr(), "::1".parse::<IpAddr>().expect("addr"));
}

#[test]
fn current_netns_matches_proc_self_and_all_netns() {
    let ns = current_netns().expect("current_netns");
    assert_ne!(ns, 0);
    let all = all_netns();
    let path = all.get(&ns).expect("own netns listed");
    let md = std::fs::metadata(path).expect("stat listed path");
    assert_eq!(md.ino(), u64::from(ns));
    // Entering our own namespace works too.
    within(Path::new("/proc/thread-self/ns/net"), || {
        Diag::open()?.dump(ALL_STATES)
    })
    .expect("enter own netns")
    .expect("dump in own netns");
}

#[test]
fn dump_in_missing_netns_is_an_error() {
    let err = within(Path::new("/nonexistent/tcpstate/netns"), || ()).unwrap_err();
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

    let mut inside = within(&path, Diag::open)
        .expect("enter netns")
        .expect("open in netns");
    let all = inside.dump(ALL_STATES).expect("dump in netns");
    let l = find(&all, LISTEN, port, 0).expect("listener found inside netns");
    assert_ne!(l.inode, 0);
    // The socket opened inside stays there: an exact lookup finds the listener's tuple
    // only in the namespace.
    let t = l.tuple;
    assert_eq!(
        inside.lookup(&t).expect("lookup").map(|s| s.inode),
        None,
        "a listener is not a connection"
    );

    let host = Diag::open()
        .expect("open")
        .dump(ALL_STATES)
        .expect("dump in host netns");
    assert!(
        !host.iter().any(|s| s.inode == l.inode),
        "netns listener leaked into host dump"
    );
    // The caller's thread did not move.
    assert_ne!(u64::from(current_netns().expect("current_netns")), ino);
    assert_eq!(all_netns().get(&(ino as u32)), Some(&path));
    drop(listener);
}

#[test]
fn exact_lookup_finds_a_time_wait_mini_socket_and_nothing_else() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let lport = listener.local_addr().expect("addr").port();
    let client = TcpStream::connect((Ipv4Addr::LOCALHOST, lport)).expect("connect");
    let cport = client.local_addr().expect("addr").port();
    let (server, _) = listener.accept().expect("accept");
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let t = crate::socket::Tuple::new(lo, cport, lo, lport);
    let mut diag = Diag::open().expect("open");
    let est = diag.lookup(&t).expect("lookup").expect("established");
    assert_eq!((est.state, est.is_timewait()), (ESTABLISHED, false));
    // The client closes first, then the server: the client's end is a TIME_WAIT mini-socket.
    drop(client);
    std::thread::sleep(std::time::Duration::from_millis(50));
    drop(server);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let tw = diag.lookup(&t).expect("lookup").expect("time wait");
    assert_eq!((tw.state, tw.is_timewait()), (6, true));
    assert!(tw.expires_ms > 50_000 && tw.expires_ms <= 60_000, "{tw:?}");
    // A tuple nobody has is None, even with a listener on its local port.
    let none = crate::socket::Tuple::new(lo, lport, lo, 9);
    assert_eq!(diag.lookup(&none).expect("lookup"), None);
}

fn cgroup_id_of(payload: &[u8]) -> u64 {
    attribute(payload, 21, 0).map_or(0, u64::from_ne_bytes)
}

#[test]
fn the_cgroup_id_attribute_is_read_in_place() {
    let mut v4 = [0u8; 16];
    v4[..4].copy_from_slice(&[10, 0, 0, 1]);
    let mut msg = diag_msg(2, 1, v4, 443, v4, 51000, 99);
    assert_eq!(cgroup_id_of(&msg), 0, "none sent");
    // An unrelated attribute (5 bytes of payload, padded), then INET_DIAG_CGROUP_ID.
    msg.extend_from_slice(&9u16.to_ne_bytes());
    msg.extend_from_slice(&1u16.to_ne_bytes());
    msg.extend_from_slice(&[1, 2, 3, 4, 5, 0, 0, 0]);
    msg.extend_from_slice(&12u16.to_ne_bytes());
    msg.extend_from_slice(&21u16.to_ne_bytes());
    msg.extend_from_slice(&0x1234_5678_9abc_u64.to_ne_bytes());
    assert_eq!(cgroup_id_of(&msg), 0x1234_5678_9abc);
    assert_eq!(
        parse_socket(&msg, "test").expect("parses").cgroup,
        0x1234_5678_9abc
    );
    // Truncated or lying lengths: 0, no panic.
    for cut in 72..msg.len() {
        let _ = cgroup_id_of(&msg[..cut]);
    }
    let mut bad = diag_msg(2, 1, v4, 443, v4, 51000, 99);
    bad.extend_from_slice(&[200, 0, 21, 0, 1, 2, 3, 4]);
    assert_eq!(cgroup_id_of(&bad), 0);
    // A listener's memory counters: the drop count is the ninth u32.
    let mut l = diag_msg(2, 10, v4, 80, v4, 0, 7);
    l.extend_from_slice(&(4u16 + 9 * 4).to_ne_bytes());
    l.extend_from_slice(&7u16.to_ne_bytes());
    for i in 0..9u32 {
        l.extend_from_slice(&(if i == 8 { 42 } else { i }).to_ne_bytes());
    }
    assert_eq!(parse_socket(&l, "test").expect("parses").drops, 42);
    // Shorter than the index: no drop count.
    let mut short = diag_msg(2, 10, v4, 80, v4, 0, 7);
    short.extend_from_slice(&8u16.to_ne_bytes());
    short.extend_from_slice(&7u16.to_ne_bytes());
    short.extend_from_slice(&1u32.to_ne_bytes());
    assert_eq!(parse_socket(&short, "test").expect("parses").drops, 0);
}

#[test]
fn destroy_listed_spares_a_socket_that_changed_since_the_dump() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: SOCK_DESTROY needs CAP_NET_ADMIN; NOT running this test");
        return;
    }
    const CLOSE_WAIT: u8 = 8;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let lport = listener.local_addr().expect("local_addr").port();
    let client = TcpStream::connect((Ipv4Addr::LOCALHOST, lport)).expect("connect");
    let cport = client.local_addr().expect("local_addr").port();
    let (server, _) = listener.accept().expect("accept");
    drop(client);
    std::thread::sleep(std::time::Duration::from_millis(100));

    let mut diag = Diag::open().expect("open");
    let listed = diag.dump_with_cookies(1 << CLOSE_WAIT).expect("dump");
    let (sock, cookie) = listed
        .iter()
        .find(|(s, _)| s.tuple.sport == lport && s.tuple.dport == cport)
        .copied()
        .expect("the server end in CLOSE_WAIT");
    assert_ne!(cookie, NO_COOKIE);

    // Another socket at the same tuple (what a close and a new connection leave) has another
    // cookie: the kernel finds none with this one.
    let mut other = cookie;
    other[0] ^= 1;
    assert_eq!(
        diag.destroy_listed(&sock, other).expect("destroy"),
        Destroy::Changed
    );
    // Listed in another state: the socket has moved on since.
    let established = DiagSocket {
        state: ESTABLISHED,
        ..sock
    };
    assert_eq!(
        diag.destroy_listed(&established, cookie).expect("destroy"),
        Destroy::Changed
    );
    // (A write would tell, but the closed peer would answer it with a reset.)
    let still = diag.lookup(&sock.tuple).expect("lookup");
    assert_eq!(still.map(|s| s.state), Some(CLOSE_WAIT), "spared so far");

    // Still the socket listed, in the state listed: destroyed.
    assert_eq!(
        diag.destroy_listed(&sock, cookie).expect("destroy"),
        Destroy::Done
    );
    let mut s = &server;
    let e = std::io::Write::write(&mut s, b"x").expect_err("destroyed");
    assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
    // And a second time it is gone.
    assert_eq!(
        diag.destroy_listed(&sock, cookie).expect("destroy"),
        Destroy::Changed
    );
}

/// The kernel gives a destroyed namespace's inode number to the next one made: the workers
/// say so (`moved`) once the path they reached it by no longer names it and a new namespace
/// of that number is pinned, and not while the path holds.
#[test]
fn a_number_given_to_a_new_namespace_is_seen_moved() {
    let mut ns = crate::sockdiag::netns::Namespaces::new();
    let name = |i: u32| format!("tcpstate-moved-{}-{i}", std::process::id());
    let inode = |n: &str| {
        std::fs::metadata(format!("/run/netns/{n}"))
            .expect("stat netns")
            .ino() as u32
    };
    ip(&["netns", "add", &name(0)]);
    let mut guard = NetnsGuard(name(0));
    let first = inode(&name(0));
    assert!(
        ns.pinned_path(first).is_some(),
        "a named namespace is found"
    );
    assert!(!ns.moved(first), "its path still names it");
    // Deleted and made again until the number comes back (the kernel frees it once the
    // namespace's cleanup has run, then hands out the lowest free one).
    for i in 1..=40 {
        drop(guard);
        std::thread::sleep(std::time::Duration::from_millis(150));
        ip(&["netns", "add", &name(i)]);
        guard = NetnsGuard(name(i));
        if inode(&name(i)) == first {
            assert!(ns.moved(first), "a new namespace has the number");
            assert!(!ns.moved(first), "and is the one known after");
            return;
        }
    }
    panic!("the kernel never gave inode {first} to a new namespace in 40 tries");
}
