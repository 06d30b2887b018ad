//! What the command line turns into: the tracker's configuration, the sinks, the kernel
//! filters; and the small pieces of process plumbing (systemd notification, timers).

use std::time::Duration;

use anyhow::Context as _;
use tokio::{sync::mpsc, time::MissedTickBehavior};

use crate::{
    cli::RunArgs,
    output::{
        Sink, Sinks,
        escape::escape,
        http::{self, Request},
        logfile::{LogFile, LogOptions},
        stdout::Stdout,
    },
    tracker::{Config, RuleSettings, rules::thresholds::Thresholds},
    workload::Hierarchy,
};

/// The kernel filters the flags ask for.
pub(super) fn filters(args: &RunArgs) -> tcpstate_common::Filters {
    tcpstate_common::Filters {
        port: args.port.unwrap_or(0),
        lport: args.lport.unwrap_or(0),
        rport: args.rport.unwrap_or(0),
        family: if args.ipv4 {
            tcpstate_common::AF_INET
        } else if args.ipv6 {
            tcpstate_common::AF_INET6
        } else {
            0
        },
    }
}

/// The unified cgroup hierarchy, which `--cgroup` needs and must name a cgroup in.
pub(super) fn hierarchy(args: &RunArgs) -> anyhow::Result<Option<Hierarchy>> {
    let h = Hierarchy::find();
    if let Some(path) = &args.cgroup {
        let Some(h) = &h else {
            anyhow::bail!(
                "--cgroup {path}: this host has no cgroup v2 (unified) hierarchy mounted"
            );
        };
        if let Err(e) = h.id_of(path) {
            anyhow::bail!(
                "--cgroup {path}: not a cgroup under {}: {e}",
                h.mount().display()
            );
        }
    }
    Ok(h)
}

/// `--cgroup` on a kernel whose events carry no cgroup would keep nothing: refused by name.
pub(super) fn cgroup_filter_possible(
    cgroup: Option<&str>,
    offsets: &tcpstate_common::Offsets,
) -> anyhow::Result<()> {
    if let Some(path) = cgroup
        && offsets.sk_cgroup == 0
    {
        anyhow::bail!(
            "--cgroup {path}: this kernel's BTF has no sock.sk_cgrp_data.cgroup (Linux 5.15+ with CONFIG_SOCK_CGROUP_DATA), so no socket's cgroup can be known"
        );
    }
    Ok(())
}

/// Whether cgroup `path` is `want` or below it.
pub(super) fn under(path: &str, want: &str) -> bool {
    want == "/"
        || path
            .strip_prefix(want)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

pub(crate) fn tracker_config(args: &RunArgs) -> Config {
    use crate::tracker::rules::thresholds::Threshold;
    let mut thresholds = Thresholds::defaults(crate::workers::host_fin_timeout());
    // Each rule's default lives beside it.
    let mut rules = RuleSettings::default();
    for t in &args.thresholds {
        match *t {
            Threshold::State(st, d) => thresholds.set(st, d),
            Threshold::Rule(s) => rules.set(s),
        }
    }
    Config {
        capacity: usize::try_from(args.max_sockets).unwrap_or(usize::MAX),
        timewait_capacity: usize::try_from(args.max_timewait).unwrap_or(usize::MAX),
        thresholds,
        leak_threshold: args.leak_threshold,
        rules,
    }
}

pub(crate) fn sinks(args: &RunArgs) -> anyhow::Result<Sinks> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if !args.quiet {
        sinks.push(Box::new(
            Stdout::new(args.format).context("cannot start the stdout writer")?,
        ));
    }
    if let Some(path) = &args.log_file {
        use std::io::IsTerminal as _;
        let rate = match args.log_rate {
            Some(0) => None,
            Some(n) => Some(n),
            None if std::io::stdout().is_terminal() => None,
            None => Some(10_000),
        };
        sinks.push(Box::new(LogFile::open(
            LogOptions {
                path: path.clone(),
                rate,
                transitions: args.log_transitions,
                max_size: args.log_max_size,
                keep: args.log_keep,
            },
            args.stats_interval,
        )?));
    }
    Ok(Sinks::new(sinks))
}

/// The HTTP endpoint (if asked for) and the control socket, both feeding one channel of page
/// requests to the loop.
pub(super) fn endpoints(args: &RunArgs) -> anyhow::Result<mpsc::Receiver<Request>> {
    let (tx, rx) = mpsc::channel(16);
    if let Some(addr) = args.metrics_addr {
        http::start(addr, tx.clone())?;
    }
    match crate::control::bind(&args.control_socket)? {
        crate::control::Bound::Listening(l) => http::start_control(l, tx).with_context(|| {
            format!(
                "cannot serve the control socket {}",
                escape(&args.control_socket.to_string_lossy())
            )
        })?,
        crate::control::Bound::Taken => crate::warn(format_args!(
            "another daemon serves the control socket {}: `tcpstate kill` talks to that one (give this one --control-socket)",
            args.control_socket.display()
        )),
    }
    Ok(rx)
}

pub(super) async fn next_request(rx: &mut Option<mpsc::Receiver<Request>>) -> Option<Request> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// `Type=notify`: tell systemd we are attached and seeded.
pub(super) fn notify_systemd() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let _ = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(b"READY=1", &addr))
    } else {
        sock.send_to(b"READY=1", std::path::Path::new(&path))
    };
}

pub(super) fn interval(period: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    i.set_missed_tick_behavior(MissedTickBehavior::Delay);
    i
}

/// Raises the soft limit on open files to the hard one: the endpoint may hold thousands of
/// idle clients, and each namespace's sock_diag socket is a descriptor too. Failure is not
/// fatal (the accept loop backs off and the owner check says when it cannot look).
pub(super) fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{cgroup_filter_possible, under};

    #[test]
    fn a_cgroup_filter_on_a_kernel_without_socket_cgroups_is_refused_by_name() {
        let old = crate::btf::tests::fixture("5.10-amd64");
        let e = cgroup_filter_possible(Some("/system.slice"), &old)
            .expect_err("5.10 has no socket cgroup")
            .to_string();
        assert!(e.starts_with("--cgroup /system.slice: "), "{e}");
        assert!(e.contains("5.15"), "{e}");
        assert!(cgroup_filter_possible(None, &old).is_ok());
        let new = crate::btf::tests::fixture("6.1-amd64");
        assert!(cgroup_filter_possible(Some("/system.slice"), &new).is_ok());
    }

    #[test]
    fn a_cgroup_filter_keeps_its_subtree_only() {
        assert!(under("/system.slice/a.service", "/system.slice/a.service"));
        assert!(under(
            "/system.slice/a.service/worker",
            "/system.slice/a.service"
        ));
        assert!(!under(
            "/system.slice/a.service2",
            "/system.slice/a.service"
        ));
        assert!(!under("/system.slice", "/system.slice/a.service"));
        assert!(under("/anything", "/"));
    }
}
