//! `tcpstate kill`: destroys stuck sockets with sock_diag `SOCK_DESTROY`, as `ss -K` does.
//! The kernel's own table says which sockets are in the state (a dump of every namespace);
//! only the daemon knows how long each has been there, so `--older-than` asks it. Every socket
//! destroyed is written to the log as a `killed` record naming who ran the command; a dry run
//! prints the same list and touches nothing.

use std::{collections::HashMap, path::Path, time::SystemTime};

use anyhow::{Context as _, bail};

use crate::{
    cli::KillArgs,
    output::{escape::escape, text},
    procfs,
    record::{Actor, KilledRecord, Record},
    sockdiag::{
        DiagSocket, Namespaces,
        proto::{Cookie, Destroy},
    },
    socket::{Comm, Tuple},
    state::TcpState,
    status::SocketList,
};

/// One socket the filters chose.
struct Target {
    netns: u32,
    socket: DiagSocket,
    /// The socket's identity in the dump: the destroy is for this socket only.
    cookie: Cookie,
    age_ms: Option<f64>,
    holder: Holder,
}

/// Who holds a socket's fd, as far as this process could look.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Holder {
    Process(u32, Comm),
    /// Every process's fds were read and none links to it.
    Nobody,
    /// None seen, but `unreadable` processes' fds could not be read: any of them may hold it.
    Unseen {
        unreadable: u32,
    },
}

impl Holder {
    fn process(self) -> Option<(u32, Comm)> {
        match self {
            Self::Process(pid, comm) => Some((pid, comm)),
            Self::Nobody | Self::Unseen { .. } => None,
        }
    }

    /// In words; `root`: whether we run as root (without it, other users' fds are hidden).
    fn words(self, root: bool) -> String {
        match self {
            Self::Process(pid, comm) => format!("held by pid {pid} ({})", escape(&comm.as_str())),
            Self::Nobody => "held by no process".to_owned(),
            Self::Unseen { .. } if !root => {
                "holder unknown (other users' processes cannot be seen without root)".to_owned()
            }
            Self::Unseen { unreadable } => {
                format!("holder unknown (the fds of {unreadable} processes could not be read)")
            }
        }
    }
}

pub fn kill(args: KillArgs) -> anyhow::Result<()> {
    check(&args)?;
    let daemon = ask_daemon(&args)?;
    let ages: HashMap<(u32, Tuple), f64> = daemon
        .as_ref()
        .map(|d| {
            d.sockets
                .iter()
                .map(|s| {
                    let t = Tuple::new(s.saddr, s.sport, s.daddr, s.dport);
                    ((s.netns, t), s.age_ms)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut ns = Namespaces::new();
    let targets = targets(&args, &mut ns, &ages)?;
    if targets.is_empty() {
        crate::write_stdout(b"no socket matches\n")?;
        return Ok(());
    }
    if args.dry_run {
        let mut out = String::new();
        for t in &targets {
            out.push_str("would kill ");
            out.push_str(&describe(t));
            out.push('\n');
        }
        return crate::write_stdout(out.as_bytes());
    }
    let log = args
        .log_file
        .clone()
        .or_else(|| daemon.and_then(|d| d.log_file));
    let (audit, failed) = destroy(&targets, &mut ns)?;
    match &log {
        Some(path) if !audit.is_empty() => append(path, &audit)
            .with_context(|| format!("cannot write the audit records to {}", path.display()))?,
        Some(_) => {}
        None => crate::warn(format_args!(
            "no log to record the kills in (give --log-file, or run the daemon with one)"
        )),
    }
    if failed > 0 {
        bail!(
            "{failed} of {} sockets could not be destroyed",
            targets.len()
        );
    }
    Ok(())
}

/// Destroys each target that is still the socket listed, printing a line for each; returns the
/// audit records (JSON Lines) of those destroyed and how many could not be. One that changed
/// since it was listed (closed, replaced at its tuple, moved to another state) is not a
/// failure: it is no longer what the operator chose, and is left alone.
fn destroy(targets: &[Target], ns: &mut Namespaces) -> anyhow::Result<(String, usize)> {
    let by = actor();
    let mut failed = 0;
    let mut audit = String::new();
    for t in targets {
        let done = ns
            .diag(t.netns)
            .ok()
            .flatten()
            .context("its network namespace is gone")
            .and_then(|d| Ok(d.destroy_listed(&t.socket, t.cookie)?));
        let line = match done {
            Ok(Destroy::Changed) => format!("changed since listed, not killed: {}\n", describe(t)),
            Ok(Destroy::Done) => {
                let rec = Record::Killed(record(t, &by));
                audit.push_str(&serde_json::to_string(&rec)?);
                audit.push('\n');
                let mut s = String::new();
                text::write_record(&mut s, &rec, false);
                s
            }
            Err(e) => {
                failed += 1;
                // The netlink layer keeps the error's kind (EPERM: PermissionDenied).
                let denied = e.downcast_ref::<std::io::Error>().map(std::io::Error::kind)
                    == Some(std::io::ErrorKind::PermissionDenied);
                let hint = if denied {
                    " (needs root: CAP_NET_ADMIN)"
                } else {
                    ""
                };
                format!(
                    "cannot kill {}: {}{hint}\n",
                    describe(t),
                    escape(&format!("{e:#}"))
                )
            }
        };
        crate::write_stdout(line.as_bytes())?;
    }
    Ok((audit, failed))
}

/// Refuses what would destroy more than an operator means to.
fn check(args: &KillArgs) -> anyhow::Result<()> {
    match args.state {
        TcpState::Listen => bail!("refusing to kill listeners: that stops a service"),
        TcpState::Close | TcpState::NewSynRecv => {
            bail!("no socket sits in {}", args.state.name())
        }
        _ => {}
    }
    if args.older_than.is_none()
        && args.port.is_none()
        && args.lport.is_none()
        && args.rport.is_none()
        && args.pid.is_none()
    {
        bail!(
            "refusing to kill every {} socket: add --older-than, --port, --lport, --rport or --pid",
            args.state.name()
        );
    }
    Ok(())
}

/// The daemon's list of sockets in the state, with their ages. Needed for `--older-than`;
/// otherwise only a nicety (ages in the output, the log path). Asked only on the control
/// socket, of a daemon the kernel says is root's: whoever answers decides what is destroyed
/// and where root writes.
fn ask_daemon(args: &KillArgs) -> anyhow::Result<Option<SocketList>> {
    let path = format!("/sockets?state={}", args.state.name());
    let answer = crate::status::fetch_control(&args.control_socket, &path).and_then(|body| {
        serde_json::from_str::<SocketList>(&body).context("the answer is not a socket list")
    });
    match answer {
        Ok(list) => Ok(Some(list)),
        Err(e) if args.older_than.is_some() => Err(e.context(
            "--older-than needs the ages a root daemon keeps (start `tcpstate run`, or give its --control-socket)",
        )),
        Err(_) => Ok(None),
    }
}

/// The sockets in the state in every namespace, as the kernel has them now, filtered.
fn targets(
    args: &KillArgs,
    ns: &mut Namespaces,
    ages: &HashMap<(u32, Tuple), f64>,
) -> anyhow::Result<Vec<Target>> {
    let mut found = Vec::new();
    for netns in ns.all() {
        let Some(diag) = ns.diag(netns).ok().flatten() else {
            continue;
        };
        let socks = diag
            .dump_with_cookies(1 << args.state as u32)
            .with_context(|| format!("cannot list the sockets of network namespace {netns}"))?;
        found.extend(
            socks
                .into_iter()
                .filter(|(s, _)| {
                    !s.is_request() && TcpState::from_kernel(s.state) == Some(args.state)
                })
                .filter(|(s, _)| ports_match(args, &s.tuple))
                .map(|(s, cookie)| (netns, s, cookie)),
        );
    }
    let holders = procfs::holders_of(found.iter().map(|(_, s, _)| s.inode));
    // --pid matches any process holding the socket (after a fork, or an fd passed), not only
    // the one named first.
    let held_by = |inode: u32, pid: u32| {
        holders.first(inode).is_some_and(|(p, _)| p == pid)
            || holders.others(inode).iter().any(|&(p, _)| p == pid)
    };
    let min_age_ms = args.older_than.map(|d| d.as_secs_f64() * 1e3);
    Ok(found
        .into_iter()
        .map(|(netns, socket, cookie)| Target {
            netns,
            cookie,
            age_ms: ages.get(&(netns, socket.tuple)).copied(),
            holder: match holders.first(socket.inode) {
                Some((pid, comm)) => Holder::Process(pid, comm),
                None if holders.unreadable > 0 => Holder::Unseen {
                    unreadable: holders.unreadable,
                },
                None => Holder::Nobody,
            },
            socket,
        })
        .filter(|t| args.pid.is_none_or(|p| held_by(t.socket.inode, p)))
        // A socket the daemon does not know is of unknown age: never old enough.
        .filter(|t| min_age_ms.is_none_or(|min| t.age_ms.is_some_and(|a| a >= min)))
        .collect())
}

fn ports_match(args: &KillArgs, t: &Tuple) -> bool {
    args.port.is_none_or(|p| t.sport == p || t.dport == p)
        && args.lport.is_none_or(|p| t.sport == p)
        && args.rport.is_none_or(|p| t.dport == p)
}

fn describe(t: &Target) -> String {
    let age = t
        .age_ms
        .map(|ms| format!(" for {:.1}s", ms / 1000.0))
        .unwrap_or_default();
    // SAFETY: geteuid cannot fail and has no preconditions.
    let holder = t.holder.words(unsafe { libc::geteuid() } == 0);
    format!(
        "{} {} -> {} (netns {}){age}, {holder}",
        TcpState::from_kernel(t.socket.state).map_or("?", TcpState::name),
        text::endpoint(t.socket.tuple.saddr(), t.socket.tuple.sport),
        text::endpoint(t.socket.tuple.daddr(), t.socket.tuple.dport),
        t.netns,
    )
}

fn record(t: &Target, by: &Actor) -> KilledRecord {
    let s = &t.socket;
    KilledRecord {
        ts: SystemTime::now(),
        state: TcpState::from_kernel(s.state).unwrap_or(TcpState::Close),
        family: s.tuple.family,
        saddr: s.tuple.saddr(),
        sport: s.tuple.sport,
        daddr: s.tuple.daddr(),
        dport: s.tuple.dport,
        netns: t.netns,
        age_ms: t.age_ms,
        pid: t.holder.process().map(|(pid, _)| pid),
        comm: t.holder.process().map(|(_, comm)| comm),
        by: by.clone(),
    }
}

fn actor() -> Actor {
    // SAFETY: getuid cannot fail and has no preconditions.
    let uid = unsafe { libc::getuid() };
    let login_uid = std::fs::read_to_string("/proc/self/loginuid")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        // (uid_t)-1: no login session (a daemon, a container's init).
        .filter(|&u| u != u32::MAX);
    Actor {
        uid,
        login_uid,
        sudo_user: std::env::var("SUDO_USER").ok(),
        pid: std::process::id(),
    }
}

/// Appends whole lines in one write (O_APPEND: never interleaved with the daemon's own).
fn append(path: &Path, lines: &str) -> std::io::Result<()> {
    crate::output::logfile::append_lines(path, lines)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn args(argv: &[&str]) -> KillArgs {
        let cli = Cli::try_parse_from([&["tcpstate", "kill"], argv].concat()).expect("parses");
        let Command::Kill(k) = cli.command else {
            panic!("parsed as another command");
        };
        k
    }

    #[test]
    fn refuses_what_would_kill_too_much() {
        let e = check(&args(&["--state", "close_wait"])).expect_err("no filter");
        assert!(
            e.to_string().contains("refusing to kill every CLOSE_WAIT"),
            "{e}"
        );
        let e = check(&args(&["--state", "listen", "--port", "80"])).expect_err("listener");
        assert!(e.to_string().contains("listeners"), "{e}");
        for ok in [
            &["--state", "close_wait", "--older-than", "10m"][..],
            &["--state", "fin_wait2", "--pid", "7"],
            &["--state", "syn_sent", "--rport", "443"],
        ] {
            assert!(check(&args(ok)).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn a_holder_not_seen_is_not_called_nobody() {
        let unseen = Holder::Unseen { unreadable: 3 };
        let w = unseen.words(false);
        assert!(!w.contains("no process"), "{w}");
        assert!(w.contains("without root"), "{w}");
        let w = unseen.words(true);
        assert!(
            w.contains("holder unknown") && w.contains("3 processes"),
            "{w}"
        );
        assert_eq!(Holder::Nobody.words(false), "held by no process");
        let comm = Comm::from_bytes(b"ng\x1binx");
        assert_eq!(
            Holder::Process(7, comm).words(false),
            "held by pid 7 (ng\\einx)"
        );
    }

    #[test]
    fn ports_filter_either_end_or_one() {
        let lo = "127.0.0.1".parse().expect("addr");
        let t = Tuple::new(lo, 8080, lo, 40000);
        assert!(ports_match(
            &args(&["--state", "close_wait", "--port", "40000"]),
            &t
        ));
        assert!(ports_match(
            &args(&["--state", "close_wait", "--lport", "8080"]),
            &t
        ));
        assert!(!ports_match(
            &args(&["--state", "close_wait", "--lport", "40000"]),
            &t
        ));
        assert!(!ports_match(
            &args(&["--state", "close_wait", "--rport", "8080"]),
            &t
        ));
    }
}
