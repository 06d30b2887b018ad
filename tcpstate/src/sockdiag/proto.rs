//! TCP sockets over netlink `NETLINK_SOCK_DIAG` (`INET_DIAG`), the way `ss` gets them: dumps
//! filtered to some states in the kernel, and exact lookups of one socket by its tuple. A
//! [`Diag`] is bound to the network namespace of the thread that created it.

use std::io;

use netlink_packet_core::{
    DoneBuffer, ErrorBuffer, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR,
    NLMSG_NOOP, NLMSG_OVERRUN, NetlinkBuffer, NetlinkHeader, NetlinkMessage, Parseable,
};
use netlink_packet_sock_diag::{
    SOCK_DESTROY, SOCK_DIAG_BY_FAMILY, SockDiagMessage,
    constants::IPPROTO_TCP,
    inet::{
        ExtensionFlags, InetRequest, InetResponse, InetResponseHeader, SocketId, StateFlags,
        nlas::Nla,
    },
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use crate::socket::{Family, Timer, Tuple, Vitals};

/// One socket as the kernel's `inet_diag` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// Kernel TCP state number; a timewait mini-socket reports its substate
    /// (FIN_WAIT2 or TIME_WAIT), a request socket SYN_RECV.
    pub state: u8,
    /// AF_INET6 sockets keep their IPv6 form (v4-mapped for dual-stack),
    /// as the eBPF events do.
    pub tuple: Tuple,
    /// `idiag_timer`: 3 marks a timewait mini-socket.
    pub timer: u8,
    /// Time left on the timer, in milliseconds.
    pub expires_ms: u32,
    /// For listeners: the accept queue length; else unread bytes.
    pub rqueue: u32,
    /// For listeners: the backlog; else unsent bytes.
    pub wqueue: u32,
    /// Socket inode; 0 for sockets without a file (orphans, mini-sockets).
    pub inode: u32,
    pub uid: u32,
    /// The socket's cgroup v2 id (`INET_DIAG_CGROUP_ID`, what `ss --cgroup` shows); 0 when
    /// the kernel sent none (a mini-socket or request socket has no cgroup).
    pub cgroup: u64,
    /// `SK_MEMINFO_DROPS` (`INET_DIAG_SKMEMINFO`): for a listener, the handshakes it dropped
    /// because its accept queue was full (`tcp_listendrop`); only in a dump of listeners.
    pub drops: u32,
}

impl DiagSocket {
    /// A timewait mini-socket (TIME_WAIT, or an orphan's FIN_WAIT2).
    pub fn is_timewait(&self) -> bool {
        self.timer == 3
    }

    /// A request socket: a half-open connection, SYN_RECV with no file.
    pub fn is_request(&self) -> bool {
        self.state == 3 && self.inode == 0 && !self.is_timewait()
    }
}

/// Every TCP state (1..=12).
pub const ALL_STATES: u32 = ((1 << 13) - 1) & !1;
/// The states a timewait mini-socket can be in.
pub const MINI_STATES: u32 = (1 << 5) | (1 << 6);

/// The kernel caps one dump datagram at 32 KiB, so this never truncates; a truncation is
/// detected anyway (MSG_TRUNC) and reported as an error.
const RECV_BUF: usize = 64 * 1024;

fn with_context(e: io::Error, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn family_name(family: u8) -> &'static str {
    if i32::from(family) == libc::AF_INET6 {
        "AF_INET6"
    } else {
        "AF_INET"
    }
}

/// A sock_diag socket in the namespace of the thread that opened it.
pub struct Diag {
    socket: Socket,
    buf: Vec<u8>,
    seq: u32,
}

impl Diag {
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)
            .map_err(|e| with_context(e, "sock_diag: creating NETLINK_SOCK_DIAG socket"))?;
        socket
            .bind_auto()
            .map_err(|e| with_context(e, "sock_diag: binding netlink socket"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| with_context(e, "sock_diag: connecting netlink socket to the kernel"))?;
        Ok(Self {
            socket,
            buf: vec![0u8; RECV_BUF],
            seq: 0,
        })
    }

    /// Every TCP socket in one of `states` (a bitmask of `1 << state`), IPv4 then IPv6. A
    /// dump of listeners only also asks for their memory counters (a few sockets; the drop
    /// count is in there).
    pub fn dump(&mut self, states: u32) -> io::Result<Vec<DiagSocket>> {
        let mut out = Vec::new();
        self.dump_into(states, &mut out)?;
        Ok(out)
    }

    /// [`dump`](Self::dump), each socket handed to `each` as it is parsed: a dump of a million
    /// TIME_WAIT sockets is never held whole.
    pub fn dump_each(&mut self, states: u32, each: impl FnMut(DiagSocket)) -> io::Result<()> {
        let mut sink = Each { each, n: 0 };
        self.dump_into(states, &mut sink)
    }

    /// [`dump`](Self::dump), each socket with its cookie, for [`destroy_listed`](Self::destroy_listed).
    pub fn dump_with_cookies(&mut self, states: u32) -> io::Result<Vec<(DiagSocket, Cookie)>> {
        let mut out = Vec::new();
        self.dump_into(states, &mut out)?;
        Ok(out)
    }

    fn dump_into<S: Sink>(&mut self, states: u32, out: &mut S) -> io::Result<()> {
        let extensions = if states == LISTEN_ONLY {
            ExtensionFlags::SKMEMINFO
        } else {
            ExtensionFlags::empty()
        };
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            let id = if i32::from(family) == libc::AF_INET6 {
                SocketId::new_v6()
            } else {
                SocketId::new_v4()
            };
            self.request(family, states, id, extensions.clone(), Mode::Dump, out)?;
        }
        Ok(())
    }

    /// The socket with exactly this tuple (local end first), if the kernel has one: a full
    /// socket, a timewait mini-socket or a request socket. A listener the kernel falls back to
    /// for an unknown tuple is not it.
    pub fn lookup(&mut self, t: &Tuple) -> io::Result<Option<DiagSocket>> {
        let mut out: Vec<DiagSocket> = Vec::new();
        self.lookup_into(t, ExtensionFlags::empty(), &mut out)?;
        Ok(out.into_iter().find(|s| s.tuple == *t && s.state != 10))
    }

    /// [`lookup`](Self::lookup), with the socket's vital signs (`INET_DIAG_INFO`) when the
    /// kernel gives them.
    pub fn lookup_vitals(&mut self, t: &Tuple) -> io::Result<Option<(DiagSocket, Option<Vitals>)>> {
        let mut out: Vec<(DiagSocket, Option<Vitals>)> = Vec::new();
        self.lookup_into(t, ExtensionFlags::INFO, &mut out)?;
        Ok(out
            .into_iter()
            .find(|(s, _)| s.tuple == *t && s.state != 10))
    }

    /// Destroys the socket a dump listed (`SOCK_DESTROY`, as `ss -K` does), if it is still
    /// that socket in that state: the kernel aborts it, its peer gets an RST and its holder
    /// ECONNABORTED. Needs CAP_NET_ADMIN in the namespace and a kernel built with
    /// `CONFIG_INET_DIAG_DESTROY`.
    ///
    /// Asked by tuple alone, the kernel would destroy whatever socket has the tuple by then,
    /// in any state. With the cookie it answers ENOENT for any other socket (one closed and
    /// replaced at the same tuple has another cookie), but it does not compare the state, so
    /// the socket is looked up by cookie first and its state checked; it can still move on in
    /// the moment between that lookup and the destroy.
    pub fn destroy_listed(&mut self, listed: &DiagSocket, cookie: Cookie) -> io::Result<Destroy> {
        let t = &listed.tuple;
        let states = 1u32 << listed.state;
        let id = || SocketId {
            cookie,
            ..socket_id(t)
        };
        let mut now: Vec<DiagSocket> = Vec::new();
        match self.request(
            family_of(t),
            states,
            id(),
            ExtensionFlags::empty(),
            Mode::Lookup,
            &mut now,
        ) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Destroy::Changed),
            r => r?,
        }
        if !now.iter().any(|s| s.tuple == *t && s.state == listed.state) {
            return Ok(Destroy::Changed);
        }
        let mut none: Vec<DiagSocket> = Vec::new();
        match self.request(
            family_of(t),
            states,
            id(),
            ExtensionFlags::empty(),
            Mode::Destroy,
            &mut none,
        ) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Destroy::Changed),
            Err(e) => Err(e),
            Ok(()) => Ok(Destroy::Done),
        }
    }

    /// Whether this kernel destroys sockets on request (`CONFIG_INET_DIAG_DESTROY`) and lets
    /// us ask (`CAP_NET_ADMIN`): a destroy of a tuple no socket can have (port 0 at both
    /// ends) is answered ENOENT when it can, EOPNOTSUPP or EPERM when not. Nothing is touched.
    pub fn can_destroy(&mut self) -> io::Result<()> {
        let t = Tuple::new(
            std::net::Ipv4Addr::LOCALHOST.into(),
            0,
            std::net::Ipv4Addr::LOCALHOST.into(),
            0,
        );
        let mut none: Vec<DiagSocket> = Vec::new();
        match self.request(
            family_of(&t),
            ALL_STATES,
            socket_id(&t),
            ExtensionFlags::empty(),
            Mode::Destroy,
            &mut none,
        ) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
            // Nothing can have that tuple; an answer of "done" still means it can destroy.
            Ok(()) => Ok(()),
        }
    }

    fn lookup_into<S: Sink>(
        &mut self,
        t: &Tuple,
        extensions: ExtensionFlags,
        out: &mut S,
    ) -> io::Result<()> {
        let (family, id) = (family_of(t), socket_id(t));
        match self.request(family, ALL_STATES, id, extensions, Mode::Lookup, out) {
            // ENOENT: no such socket (the context wrapper keeps the kind, not the errno).
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    fn request<S: Sink>(
        &mut self,
        family: u8,
        states: u32,
        socket_id: SocketId,
        extensions: ExtensionFlags,
        mode: Mode,
        out: &mut S,
    ) -> io::Result<()> {
        let fam = family_name(family);
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let dump = mode == Mode::Dump;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST
            | match mode {
                Mode::Dump => NLM_F_DUMP,
                Mode::Lookup => 0,
                Mode::Destroy => NLM_F_ACK,
            };
        header.sequence_number = seq;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions,
                states: StateFlags::from_bits_retain(states),
                socket_id,
            })
            .into(),
        );
        request.finalize();
        let mut req = vec![0u8; request.buffer_len()];
        request.serialize(&mut req);
        if mode == Mode::Destroy {
            // The same inet_diag_req_v2, sent as SOCK_DESTROY (the crate names the message
            // type after the payload): nlmsg_type follows the 4-byte length.
            req[4..6].copy_from_slice(&SOCK_DESTROY.to_ne_bytes());
        }
        let sent = self
            .socket
            .send(&req, 0)
            .map_err(|e| with_context(e, format!("sock_diag: sending {fam} request")))?;
        if sent != req.len() {
            return Err(invalid(format!(
                "sock_diag: short send of {fam} request ({sent} of {} bytes)",
                req.len()
            )));
        }
        loop {
            let n = self
                .socket
                .recv(&mut &mut self.buf[..], libc::MSG_TRUNC)
                .map_err(|e| with_context(e, format!("sock_diag: receiving {fam} answer")))?;
            if n > self.buf.len() {
                return Err(invalid(format!(
                    "sock_diag: {fam} datagram of {n} bytes truncated to {}",
                    self.buf.len()
                )));
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("sock_diag: netlink socket closed during {fam} request"),
                ));
            }
            // An exact lookup is answered by one message and no NLMSG_DONE.
            let before = out.count();
            let done = parse_datagram(&self.buf[..n], seq, fam, out)?;
            if done || (!dump && out.count() > before) {
                return Ok(());
            }
        }
    }
}

fn family_of(t: &Tuple) -> u8 {
    match t.family {
        Family::V4 => libc::AF_INET as u8,
        Family::V6 => libc::AF_INET6 as u8,
    }
}

/// The request's socket id for exactly this tuple.
fn socket_id(t: &Tuple) -> SocketId {
    SocketId {
        source_port: t.sport,
        destination_port: t.dport,
        source_address: t.saddr(),
        destination_address: t.daddr(),
        interface_id: 0,
        cookie: NO_COOKIE,
    }
}

/// What a request asks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Dump,
    Lookup,
    Destroy,
}

/// A socket's `idiag_cookie` as a dump gave it (two u32 in the kernel's order, kept as bytes:
/// it is only ever sent back).
pub type Cookie = [u8; 8];

/// `INET_DIAG_NOCOOKIE`: any socket with the tuple.
const NO_COOKIE: Cookie = [0xff; 8];

/// Where the cookie sits in an `inet_diag_msg`: after family, state, timer, retrans, the
/// ports, both addresses and the interface.
const COOKIE_AT: usize = 44;

/// What [`Diag::destroy_listed`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destroy {
    Done,
    /// Gone, replaced by another socket at the tuple, or in another state: left alone.
    Changed,
}

impl Sink for Vec<(DiagSocket, Cookie)> {
    fn put(&mut self, s: DiagSocket, payload: &[u8]) {
        // parse_socket checked the fixed header's length; NO_COOKIE cannot happen.
        let cookie = payload
            .get(COOKIE_AT..COOKIE_AT + 8)
            .and_then(|b| b.try_into().ok())
            .unwrap_or(NO_COOKIE);
        self.push((s, cookie));
    }

    fn count(&self) -> usize {
        self.len()
    }
}

/// Where parsed sockets go: a plain list, or one that also reads each socket's vital signs
/// from the attributes after its header.
pub trait Sink {
    fn put(&mut self, s: DiagSocket, payload: &[u8]);
    fn count(&self) -> usize;
}

impl Sink for Vec<DiagSocket> {
    fn put(&mut self, s: DiagSocket, _: &[u8]) {
        self.push(s);
    }

    fn count(&self) -> usize {
        self.len()
    }
}

/// A sink that keeps nothing: each socket goes to a closure.
struct Each<F> {
    each: F,
    n: usize,
}

impl<F: FnMut(DiagSocket)> Sink for Each<F> {
    fn put(&mut self, s: DiagSocket, _: &[u8]) {
        self.n += 1;
        (self.each)(s);
    }

    fn count(&self) -> usize {
        self.n
    }
}

impl Sink for Vec<(DiagSocket, Option<Vitals>)> {
    fn put(&mut self, s: DiagSocket, payload: &[u8]) {
        let v = vitals(&s, payload);
        self.push((s, v));
    }

    fn count(&self) -> usize {
        self.len()
    }
}

/// The vital signs in an answer that asked for `INET_DIAG_INFO`. None when the kernel sent no
/// `tcp_info` (a listener, a mini-socket) or one shorter than the crate's (an old kernel).
fn vitals(s: &DiagSocket, payload: &[u8]) -> Option<Vitals> {
    let r = InetResponse::parse(payload).ok()?;
    let info = r.nlas.iter().find_map(|n| match n {
        Nla::TcpInfo(i) => Some(i),
        _ => None,
    })?;
    Some(Vitals {
        recv_q: s.rqueue,
        send_q: s.wqueue,
        notsent: info.notsent_bytes,
        timer: Timer::from_kernel(s.timer),
        timer_ms: s.expires_ms,
        retransmits: info.retransmits,
        probes: info.probes,
        backoff: info.backoff,
        total_retrans: info.total_retrans,
        snd_wnd: info.snd_wnd,
        last_data_recv_ms: info.last_data_recv,
        last_data_sent_ms: info.last_data_sent,
    })
}

/// Parses the netlink messages of one datagram, appending sockets to `out`. Returns true once
/// `NLMSG_DONE` (or an ACK) for `seq` is seen.
pub fn parse_datagram<S: Sink>(
    mut data: &[u8],
    seq: u32,
    fam: &str,
    out: &mut S,
) -> io::Result<bool> {
    while !data.is_empty() {
        let msg = NetlinkBuffer::new_checked(data)
            .map_err(|e| invalid(format!("sock_diag: malformed netlink message ({fam}): {e}")))?;
        let len = msg.length() as usize;
        let payload = msg.payload();
        // Messages are padded to 4 bytes; the last one may lack its padding.
        let advance = len.next_multiple_of(4).clamp(1, data.len());
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
                                io::Error::from_raw_os_error(code.saturating_neg()),
                                format!("sock_diag: {fam} dump ended with an error"),
                            ));
                        }
                    }
                    return Ok(true);
                }
                NLMSG_ERROR => {
                    let err = ErrorBuffer::new_checked(payload).map_err(|e| {
                        invalid(format!("sock_diag: malformed NLMSG_ERROR ({fam}): {e}"))
                    })?;
                    return match err.code() {
                        // An ACK: nothing more will come for this request.
                        None => Ok(true),
                        Some(code) => Err(with_context(
                            io::Error::from_raw_os_error(code.get().saturating_abs()),
                            format!("sock_diag: kernel refused the {fam} request"),
                        )),
                    };
                }
                NLMSG_OVERRUN => {
                    return Err(invalid(format!("sock_diag: netlink overrun ({fam})")));
                }
                SOCK_DIAG_BY_FAMILY => out.put(parse_socket(payload, fam)?, payload),
                other => {
                    return Err(invalid(format!(
                        "sock_diag: unexpected netlink message type {other} ({fam})"
                    )));
                }
            }
        }
        data = &data[advance..];
    }
    Ok(false)
}

/// Parses one `inet_diag_msg`. Only the fixed header is read: the attributes that follow are
/// not needed, and skipping them keeps this working when a kernel adds new ones.
pub fn parse_socket(payload: &[u8], fam: &str) -> io::Result<DiagSocket> {
    let h = InetResponseHeader::parse(payload)
        .map_err(|e| invalid(format!("sock_diag: malformed inet_diag_msg ({fam}): {e}")))?;
    // The crate drops a TIME_WAIT timer's expiry; read it (and the timer) from the fixed
    // layout: family, state, timer, retrans, a 48-byte id, then expires (the parse above
    // checked the length).
    let raw_u32 = |off: usize| {
        payload
            .get(off..off + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_ne_bytes)
    };
    let family = match i32::from(h.family) {
        libc::AF_INET => Family::V4,
        libc::AF_INET6 => Family::V6,
        other => {
            return Err(invalid(format!(
                "sock_diag: unknown address family {other}"
            )));
        }
    };
    let id = &h.socket_id;
    let mut tuple = Tuple::new(
        id.source_address,
        id.source_port,
        id.destination_address,
        id.destination_port,
    );
    // The family of the socket, not of the address form the crate picked.
    tuple.family = family;
    Ok(DiagSocket {
        state: h.state,
        tuple,
        timer: payload.get(2).copied().unwrap_or(0),
        expires_ms: raw_u32(52),
        rqueue: h.recv_queue,
        wqueue: h.send_queue,
        inode: h.inode,
        uid: h.uid,
        cgroup: attribute(payload, INET_DIAG_CGROUP_ID, 0).map_or(0, u64::from_ne_bytes),
        // Asked for only in dumps of listeners (see `dump`).
        drops: if h.state == 10 {
            attribute(payload, INET_DIAG_SKMEMINFO, SK_MEMINFO_DROPS * 4)
                .map_or(0, u32::from_ne_bytes)
        } else {
            0
        },
    })
}

/// The state mask of a dump of listeners.
pub const LISTEN_ONLY: u32 = 1 << 10;
/// `INET_DIAG_SKMEMINFO`, an array of u32 (`SK_MEMINFO_*`), and the index of the drop count.
const INET_DIAG_SKMEMINFO: u16 = 7;
const SK_MEMINFO_DROPS: usize = 8;

/// `INET_DIAG_CGROUP_ID`.
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `sizeof(struct inet_diag_msg)`: the attributes follow it.
const INET_DIAG_MSG_LEN: usize = 72;

/// `N` bytes at `at` in the value of attribute `kind` of an answer, read in place: every dump
/// answer carries the cgroup id, and decoding all its attributes with the crate would allocate
/// for each of hundreds of thousands of sockets.
fn attribute<const N: usize>(payload: &[u8], kind: u16, at: usize) -> Option<[u8; N]> {
    let mut rest = payload.get(INET_DIAG_MSG_LEN..).unwrap_or_default();
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let k = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        if k == kind {
            return rest[4..len].get(at..at + N)?.try_into().ok();
        }
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    None
}

#[cfg(test)]
mod tests;
