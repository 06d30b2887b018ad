//! Which packet drops `--drops` watches (`skb:kfree_skb`, by `enum skb_drop_reason`), and
//! their names. The numbering is each kernel's own (reasons are added in the middle of the
//! enum from one release to the next), so names are resolved against the running kernel's
//! BTF at start-up, and a name this kernel lacks is simply not watched.

use std::sync::OnceLock;

use tcpstate_common::DROP_REASONS;

/// The reasons that say something about a TCP connection: a peer or middlebox refused it
/// (`NETFILTER_DROP`, a socket filter, a full queue, an invalid or out-of-window segment, a
/// bad checksum), or the host had no room for it. Left out: `NOT_SPECIFIED` (every drop a
/// caller did not explain, a flood of them on any host), and the ones TCP meets in normal
/// work (`TCP_OLD_DATA` and `TCP_OLD_ACK`: duplicates after a retransmit; `TCP_OFOMERGE`:
/// coalesced out-of-order data).
pub const WATCHED: &[&str] = &[
    "NO_SOCKET",
    "SOCKET_FILTER",
    "SOCKET_RCVBUFF",
    "SOCKET_BACKLOG",
    "NETFILTER_DROP",
    "IP_CSUM",
    "IP_INHDR",
    "IP_RPFILTER",
    "IP_INADDRERRORS",
    "IP_INNOROUTES",
    "XFRM_POLICY",
    "TCP_CSUM",
    "TCP_FLAGS",
    "TCP_ZEROWINDOW",
    "TCP_OVERWINDOW",
    "TCP_RFC7323_PAWS",
    "TCP_INVALID_SEQUENCE",
    "TCP_INVALID_ACK_SEQUENCE",
    "TCP_RESET",
    "TCP_INVALID_SYN",
    "TCP_CLOSE",
    "TCP_FASTOPEN",
    "TCP_TOO_OLD_ACK",
    "TCP_ACK_UNSENT_DATA",
    "TCP_OFO_QUEUE_PRUNE",
    "TCP_OFO_DROP",
    "TCP_MINTTL",
    "TCP_MD5NOTFOUND",
    "TCP_MD5UNEXPECTED",
    "TCP_MD5FAILURE",
    "TCP_LISTEN_OVERFLOW",
    "TCP_REQQFULLDROP",
    "QDISC_DROP",
    "CPU_BACKLOG",
    "FULL_RING",
    "NOMEM",
];

/// The reasons watched on this kernel: their numbers, and the bitmap the program tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Watched {
    pub reasons: Vec<(u16, &'static str)>,
}

impl Watched {
    /// From `value_of(name)`, this kernel's number for a reason (None: it has no such reason).
    pub fn resolve(value_of: impl Fn(&str) -> Option<i64>) -> Self {
        let mut reasons: Vec<(u16, &'static str)> = WATCHED
            .iter()
            .filter_map(|&name| {
                let v = value_of(name)?;
                let v = u16::try_from(v)
                    .ok()
                    .filter(|&v| u32::from(v) < DROP_REASONS)?;
                Some((v, name))
            })
            .collect();
        reasons.sort_unstable();
        Self { reasons }
    }

    /// One bit per watched reason, as `Config::drop_reasons` wants it.
    pub fn bitmap(&self) -> [u64; 4] {
        let mut words = [0u64; 4];
        for &(v, _) in &self.reasons {
            words[usize::from(v / 64)] |= 1 << (v % 64);
        }
        words
    }
}

static NAMES: OnceLock<Watched> = OnceLock::new();

/// Says which reasons this kernel's numbers stand for; once, at start-up.
pub fn set_names(w: Watched) {
    let _ = NAMES.set(w);
}

/// A reason's name, as the kernel spells it after `SKB_DROP_REASON_`.
pub fn name_of(reason: u16) -> String {
    NAMES
        .get()
        .and_then(|w| w.reasons.iter().find(|&&(v, _)| v == reason))
        .map_or_else(|| format!("REASON_{reason}"), |&(_, n)| n.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_this_kernel_lacks_are_not_watched_and_the_bitmap_has_one_bit_each() {
        let w = Watched::resolve(|name| match name {
            "NO_SOCKET" => Some(3),
            "NETFILTER_DROP" => Some(12),
            "TCP_LISTEN_OVERFLOW" => Some(70),
            // A subsystem reason can never be a bit.
            "QDISC_DROP" => Some(0x1_0000),
            _ => None,
        });
        assert_eq!(
            w.reasons,
            [
                (3, "NO_SOCKET"),
                (12, "NETFILTER_DROP"),
                (70, "TCP_LISTEN_OVERFLOW")
            ]
        );
        assert_eq!(w.bitmap(), [(1 << 3) | (1 << 12), 1 << 6, 0, 0]);
    }
}
