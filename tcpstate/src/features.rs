//! What this kernel and these flags let tcpstate do: each optional capability, on or off,
//! and why it is off. Said once in the `started` record, on `status` and as
//! `tcpstate_feature_enabled{feature}`, so that nothing degrades to zeros unannounced.

use serde::{Deserialize, Serialize};
use tcpstate_common::Offsets;

/// One capability.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Feature {
    pub name: String,
    pub on: bool,
    /// Why it is off, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why_off: Option<String>,
}

impl Feature {
    fn on(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            on: true,
            why_off: None,
        }
    }

    fn off(name: &str, why: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            on: false,
            why_off: Some(why.into()),
        }
    }

    fn either(name: &str, why_off: Option<String>) -> Self {
        match why_off {
            None => Self::on(name),
            Some(why) => Self::off(name, why),
        }
    }
}

/// What was found at start-up, from which the report is made.
pub struct Found<'a> {
    pub offsets: &'a Offsets,
    /// Hooks asked for, each with the error that kept it from attaching, if one did.
    pub retransmit_hooks: Hooks<'a>,
    pub reset_hooks: Hooks<'a>,
    pub drop_hooks: Hooks<'a>,
    pub bind_hooks: Hooks<'a>,
    /// `--threshold time_wait_pressure` is not `off`.
    pub pressure: bool,
    /// A sock_diag dump of this namespace: `Err` says why it failed.
    pub sock_diag: Result<(), String>,
    /// A harmless SOCK_DESTROY: `Err` says why the kernel refused it.
    pub sock_destroy: Result<(), String>,
}

/// Optional hooks: not asked for, or asked for with what attaching each one gave.
pub enum Hooks<'a> {
    NotAsked(&'static str),
    Asked(&'a [(&'static str, Option<String>)]),
}

impl Hooks<'_> {
    fn why_off(&self) -> Option<String> {
        match self {
            Self::NotAsked(flag) => Some(format!("turned off ({flag})")),
            Self::Asked(hooks) => {
                let failed: Vec<String> = hooks
                    .iter()
                    .filter_map(|(name, e)| Some(format!("{name}: {}", e.as_ref()?)))
                    .collect();
                (!failed.is_empty()).then(|| failed.join("; "))
            }
        }
    }
}

/// Every capability, in a fixed order.
pub fn report(f: &Found<'_>) -> Vec<Feature> {
    let o = f.offsets;
    vec![
        Feature::either(
            "cgroup_attribution",
            (o.sk_cgroup == 0 || o.cgroup_kn == 0 || o.kn_id == 0).then(|| {
                "the kernel's BTF has no sock.sk_cgrp_data.cgroup (needs Linux 5.15+ with CONFIG_SOCK_CGROUP_DATA): sockets are not named after their unit, container or pod".to_owned()
            }),
        ),
        Feature::either(
            "timewait_overflow",
            (o.tw_refcount == 0 || o.tw_max == 0).then(|| {
                "the kernel keeps net.ipv4.tcp_death_row behind a pointer (before Linux 6.0): a close refused TIME_WAIT by a full tcp_max_tw_buckets is taken for a handoff until a reconciliation corrects it".to_owned()
            }),
        ),
        Feature::either(
            "task_btf",
            (o.task_btf == 0).then(|| {
                "the kernel has no bpf_get_current_task_btf (Linux 5.11+): each event's pid and comm come from two helper calls instead, some 75 ns more per event".to_owned()
            }),
        ),
        Feature::either(
            "time_wait_pressure",
            (!f.pressure).then(|| "turned off (--threshold time_wait_pressure=off)".to_owned()),
        ),
        Feature::either("retransmit_hooks", f.retransmit_hooks.why_off()),
        Feature::either("reset_hooks", f.reset_hooks.why_off()),
        Feature::either("drop_hooks", f.drop_hooks.why_off()),
        Feature::either("bind_hooks", f.bind_hooks.why_off()),
        Feature::either(
            "sock_diag",
            f.sock_diag.as_ref().err().map(|e| {
                format!("{e}: no start-up seed, reconciliation or owner vital signs (is the tcp_diag module loaded?)")
            }),
        ),
        Feature::either(
            "syn_recv_tracking",
            f.sock_diag.as_ref().err().map(|_| {
                "request sockets are counted from sock_diag dumps (no tracepoint shows their end), and sock_diag is off".to_owned()
            }),
        ),
        Feature::either(
            "sock_destroy",
            f.sock_destroy.as_ref().err().map(|e| format!("{e}: `tcpstate kill` cannot destroy sockets")),
        ),
    ]
}

/// Probes this namespace's sock_diag: a dump of listeners, then a destroy of nothing.
pub fn probe_sock_diag() -> (Result<(), String>, Result<(), String>) {
    use crate::sockdiag::proto::{Diag, LISTEN_ONLY};
    let mut diag = match Diag::open() {
        Ok(d) => d,
        Err(e) => {
            let e = e.to_string();
            return (Err(e.clone()), Err(e));
        }
    };
    let dump = diag.dump(LISTEN_ONLY).map(drop).map_err(|e| e.to_string());
    let destroy = diag.can_destroy().map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => "needs CAP_NET_ADMIN".to_owned(),
        _ if e.raw_os_error() == Some(libc::EOPNOTSUPP)
            || e.to_string().contains("not supported") =>
        {
            "the kernel is built without CONFIG_INET_DIAG_DESTROY".to_owned()
        }
        _ => e.to_string(),
    });
    (dump, destroy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(offsets: &Offsets) -> Found<'_> {
        Found {
            offsets,
            retransmit_hooks: Hooks::Asked(&[]),
            reset_hooks: Hooks::Asked(&[]),
            drop_hooks: Hooks::Asked(&[]),
            bind_hooks: Hooks::Asked(&[]),
            pressure: true,
            sock_diag: Ok(()),
            sock_destroy: Ok(()),
        }
    }

    fn full() -> Offsets {
        Offsets {
            sk_cgroup: 1,
            cgroup_kn: 2,
            kn_id: 3,
            tw_refcount: 4,
            tw_max: 5,
            task_btf: 1,
            ..Offsets::default()
        }
    }

    fn off(r: &[Feature]) -> Vec<(&str, &str)> {
        r.iter()
            .filter(|f| !f.on)
            .map(|f| (f.name.as_str(), f.why_off.as_deref().unwrap_or("")))
            .collect()
    }

    #[test]
    fn everything_on_says_so_and_gives_no_reasons() {
        let o = full();
        let r = report(&found(&o));
        assert_eq!(r.len(), 11);
        assert!(r.iter().all(|f| f.on && f.why_off.is_none()), "{r:?}");
    }

    #[test]
    fn a_kernel_without_cgroup_or_death_row_offsets_turns_both_off_by_name() {
        // 5.10's BTF, as Debian 11 ships it: neither the embedded death row nor the
        // socket's cgroup pointer.
        let o = crate::btf::tests::fixture("5.10-amd64");
        let r = report(&found(&o));
        let off = off(&r);
        assert_eq!(
            off.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            ["cgroup_attribution", "timewait_overflow", "task_btf"]
        );
        assert!(off[0].1.contains("5.15"), "{off:?}");
        assert!(off[1].1.contains("6.0"), "{off:?}");
        assert!(off[2].1.contains("5.11"), "{off:?}");
    }

    #[test]
    fn hooks_off_by_flag_or_by_the_kernel_say_which() {
        let o = full();
        let failed = [
            ("tcp_retransmit_skb", None),
            (
                "tcp_retransmit_synack",
                Some("no such tracepoint".to_owned()),
            ),
        ];
        let too_old = [(
            "kfree_skb",
            Some("this kernel's skb:kfree_skb gives no drop reason (Linux 5.17+)".to_owned()),
        )];
        let r = report(&Found {
            retransmit_hooks: Hooks::Asked(&failed),
            reset_hooks: Hooks::NotAsked("--resets=false"),
            drop_hooks: Hooks::Asked(&too_old),
            ..found(&o)
        });
        assert_eq!(
            off(&r),
            [
                (
                    "retransmit_hooks",
                    "tcp_retransmit_synack: no such tracepoint"
                ),
                ("reset_hooks", "turned off (--resets=false)"),
                (
                    "drop_hooks",
                    "kfree_skb: this kernel's skb:kfree_skb gives no drop reason (Linux 5.17+)"
                ),
            ]
        );
    }

    #[test]
    fn no_sock_diag_turns_off_what_depends_on_it() {
        let o = full();
        let r = report(&Found {
            sock_diag: Err("sock_diag: receiving AF_INET answer: No such file".into()),
            sock_destroy: Err("the kernel is built without CONFIG_INET_DIAG_DESTROY".into()),
            ..found(&o)
        });
        assert_eq!(
            off(&r).iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            ["sock_diag", "syn_recv_tracking", "sock_destroy"]
        );
    }
}
