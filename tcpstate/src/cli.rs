//! The command line: one struct per subcommand.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    output::escape::{escape, escape_controls},
    state::TcpState,
    tracker::rules::thresholds::{Threshold, parse_override},
};

#[derive(Parser, Debug)]
#[command(
    name = "tcpstate",
    version,
    about = "Watch every TCP state transition; find the sockets that are stuck and who owns them"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Trace transitions, track sockets and report anomalies (needs root).
    Run(RunArgs),
    /// Print a transition log in columns; -f follows it across rotation.
    Tail(TailArgs),
    /// Ask the running daemon what is stuck right now.
    Status(StatusArgs),
    /// Destroy stuck sockets, as `ss -K` does (needs root). Run it with --dry-run first.
    Kill(KillArgs),
    /// Write shell completions or the man page (used by `cargo xtask dist`).
    #[command(hide = true)]
    Generate(GenerateArgs),
    /// Push a capture (`run --capture-events`) through merge, decode, the tracker and the
    /// outputs as fast as they take it, with no kernel, and say what it cost (benchmarks).
    #[command(hide = true)]
    Replay(ReplayArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ReplayArgs {
    /// The capture to replay.
    pub capture: std::path::PathBuf,
    /// The daemon's settings for the tracker and the outputs (filters, thresholds, --log-file,
    /// --format, --quiet); the kernel-facing ones are ignored.
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    #[command(subcommand)]
    pub what: Generate,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Generate {
    /// Completions for a shell, on stdout.
    Completions { shell: clap_complete::Shell },
    /// The man page (roff), on stdout.
    Man,
}

#[derive(Args, Debug, Clone)]
pub struct TailArgs {
    /// The log to read (as written by `tcpstate run --log-file`).
    #[arg(default_value = "/var/log/tcpstate/transitions.jsonl")]
    pub path: std::path::PathBuf,
    /// Keep reading as the log grows, across rename and truncation (like tail -F).
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Start with the last N records (default: all, or 10 with --follow).
    #[arg(short = 'n', long)]
    pub lines: Option<usize>,
    /// Only records with this local or remote port.
    #[arg(long, value_parser = nonzero_port)]
    pub port: Option<u16>,
    /// Only records involving this state (either end of a transition).
    #[arg(long, value_parser = state)]
    pub state: Option<TcpState>,
    /// Only anomaly, anomaly_resolved and leak_suspected records.
    #[arg(long)]
    pub anomalies: bool,
    /// Only records of this pid.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Only records of this command name.
    #[arg(long)]
    pub comm: Option<String>,
    /// Only records of sockets created in this systemd unit (payments-api.service).
    #[arg(long)]
    pub unit: Option<String>,
    /// Only records of sockets created in this container: its id, or a prefix of it as
    /// `docker ps` shows (at least 4 characters).
    #[arg(long, value_parser = container_prefix)]
    pub container: Option<String>,
    /// Print the JSON records as they are instead of columns.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// Where the daemon serves /status (its --metrics-addr).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub addr: std::net::SocketAddr,
    /// Print the daemon's JSON (refused unless it is JSON; DEL and C1 controls written as
    /// \u escapes).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct KillArgs {
    /// The state of the sockets to destroy (close_wait, fin_wait2, syn_sent, ...).
    #[arg(long, value_parser = state)]
    pub state: TcpState,
    /// Only sockets in that state for at least this long (e.g. 10m). Only the running daemon
    /// knows how long, so it is asked (see --control-socket).
    #[arg(long, value_parser = age, value_name = "DURATION")]
    pub older_than: Option<std::time::Duration>,
    /// Only sockets with this local or remote port.
    #[arg(long, value_parser = nonzero_port)]
    pub port: Option<u16>,
    /// Only sockets with this local port.
    #[arg(long, value_parser = nonzero_port)]
    pub lport: Option<u16>,
    /// Only sockets with this remote port.
    #[arg(long, value_parser = nonzero_port)]
    pub rport: Option<u16>,
    /// Only sockets whose fd this process holds.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Print exactly what would be destroyed, and destroy nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The daemon's control socket (its --control-socket). Ages are taken only from a daemon
    /// that the kernel says runs as root.
    #[arg(long, value_name = "PATH", default_value = crate::control::DEFAULT_PATH)]
    pub control_socket: std::path::PathBuf,
    /// Log to write a `killed` record to for each socket destroyed (default: the daemon's
    /// --log-file).
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<std::path::PathBuf>,
}

fn state(s: &str) -> Result<TcpState, String> {
    TcpState::parse(s).ok_or_else(|| format!("unknown TCP state {s:?}"))
}

/// How refused binds are watched (`--bind-failures`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BindHooks {
    Auto,
    Syscalls,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Write every drain of the rings to this file, for `tcpstate replay` (benchmarks only:
    /// the file is written on the draining thread).
    #[arg(long, hide = true)]
    pub capture_events: Option<std::path::PathBuf>,

    /// Output format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Only transitions with this local or remote port (filtered in the kernel).
    #[arg(long, value_parser = nonzero_port)]
    pub port: Option<u16>,
    /// Only transitions with this local port.
    #[arg(long, value_parser = nonzero_port)]
    pub lport: Option<u16>,
    /// Only transitions with this remote port.
    #[arg(long, value_parser = nonzero_port)]
    pub rport: Option<u16>,
    /// IPv4 only.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// IPv6 only.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,

    /// Only sockets of this network namespace: an inode number, or a path
    /// such as /run/netns/NAME or /proc/PID/ns/net.
    #[arg(long, value_parser = netns, value_name = "INODE|PATH")]
    pub netns: Option<u32>,

    /// Only sockets created in this cgroup or below it: a path in the unified hierarchy as
    /// /proc/PID/cgroup writes it (/system.slice/nginx.service).
    #[arg(long, value_parser = cgroup_path, value_name = "PATH")]
    pub cgroup: Option<String>,

    /// Event ring size, split evenly across CPUs (power of two, at least 4KiB; e.g. 256K, 4M).
    #[arg(long, default_value = "4M", value_parser = ring_size)]
    pub ring_size: u32,

    /// Age limit per state, e.g. close_wait=2s, fin_wait2=5m, syn_sent=off; or
    /// time_wait_pressure=0.5 (share of the ephemeral port range one destination's
    /// TIME_WAIT sockets may hold) (repeatable).
    #[arg(long = "threshold", value_name = "STATE=DURATION", value_parser = threshold)]
    pub thresholds: Vec<Threshold>,

    /// Most sockets tracked at once; more are counted and refused.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub max_sockets: u64,
    /// Most TIME_WAIT mini-sockets tracked at once; more are counted and refused.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub max_timewait: u64,

    /// Leak rule: an owner holding more than this many CLOSE_WAIT or FIN_WAIT2 sockets, and more than last time.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(..=MAX_COUNT))]
    pub leak_threshold: u64,
    /// How often the leak rule compares counts.
    #[arg(long, default_value = "30s", value_parser = interval)]
    pub leak_interval: Duration,
    /// How often to check the table against the kernel's socket list (0 = never).
    #[arg(long, default_value = "30s", value_parser = interval_or_zero)]
    pub reconcile_interval: Duration,
    /// Every Nth reconciliation also re-reads TIME_WAIT sockets (the others read full sockets
    /// and orphaned FIN_WAIT2 ones: cheap whatever TIME_WAIT load the host has). After a lost
    /// event and at a quiet moment, every reconciliation does.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub full_reconcile_every: u64,
    /// Do not load the kernel's existing sockets at start-up.
    #[arg(long)]
    pub no_seed: bool,
    /// How often to report lost events on stderr (only when some were lost).
    #[arg(long, default_value = "10s", value_parser = interval)]
    pub stats_interval: Duration,

    /// Append every record to this file as JSON Lines (reopened on SIGHUP
    /// and when logrotate renames it).
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<std::path::PathBuf>,
    /// Transition records per second written to the log; 0 = unlimited.
    /// Default: unlimited when stdout is a terminal, 10000 otherwise.
    /// Anomalies are never limited.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(..=MAX_LOG_RATE))]
    pub log_rate: Option<u32>,
    /// Write transition records to the log (false: anomalies only).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub log_transitions: bool,
    /// Count retransmissions per socket and state (tcp_retransmit_skb, tcp_retransmit_synack).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub retransmits: bool,
    /// Report resets, sent and received, with the socket's state (tcp_send_reset,
    /// tcp_receive_reset).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub resets: bool,
    /// Count packets the kernel drops for a reason that concerns TCP (skb:kfree_skb, Linux
    /// 5.17+): per socket and state where the kernel names the socket, else per reason. It
    /// costs nothing per transition and some 45 ns per dropped packet (a UDP flood's worst
    /// case: docs/performance.md).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL",
          num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub drops: bool,
    /// Report bind() refused with EADDRINUSE on TCP sockets (a fixed port taken, or no free
    /// port in the range for port 0). auto: fexit on inet_bind and inet6_bind, which only a
    /// bind pays for, where the kernel allows trampolines; syscalls: the syscall tracepoints
    /// (needs tracefs), which work everywhere but cost every syscall of every process on the
    /// host 10-20 ns while attached; off.
    #[arg(long, value_enum, default_value_t = BindHooks::Auto, value_name = "HOW")]
    pub bind_failures: BindHooks,
    /// Rotate the log ourselves past this size (e.g. 100M); for hosts without logrotate.
    #[arg(long, value_parser = log_size, value_name = "SIZE")]
    pub log_max_size: Option<u64>,
    /// Rotated logs kept with --log-max-size (PATH.1 .. PATH.N; at most 1000).
    #[arg(long, default_value_t = 5, value_name = "N", value_parser = clap::value_parser!(u32).range(..=MAX_LOG_KEEP))]
    pub log_keep: u32,
    /// Serve Prometheus /metrics and /status here (loopback unless you say otherwise).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Serve the same pages on this Unix socket, for root only: `tcpstate kill` trusts the
    /// ages it reads here, and nothing it reads over TCP.
    #[arg(long, value_name = "PATH", default_value = crate::control::DEFAULT_PATH)]
    pub control_socket: std::path::PathBuf,
    /// Per-workload gauges for the N units/containers with the most closing sockets and open
    /// anomalies; the rest are summed under unit="other" (label cardinality stays bounded).
    #[arg(long, default_value_t = 20, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub metrics_top: u16,
    /// Per-destination gauges (tcpstate_destination_sockets) for the N destinations with the
    /// most sockets in SYN_SENT or a closing state; the rest are summed under
    /// destination="other" (a scan of every port cannot grow the series).
    #[arg(long, default_value_t = 20, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub metrics_top_destinations: u16,
    /// Print nothing on stdout (use with --log-file).
    #[arg(short, long)]
    pub quiet: bool,
}

fn nonzero_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{s:?} is not a port (1-65535)")),
        Ok(p) => Ok(p),
    }
}

fn container_prefix(s: &str) -> Result<String, String> {
    let ok = (4..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit());
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!(
            "{s:?}: want a container id or a prefix of 4 to 64 hex digits"
        ))
    }
}

/// A cgroup path: absolute, no `..`, no control characters (it is matched as a prefix of the
/// socket's cgroup path; existence is checked once running).
pub fn cgroup_path(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err(format!(
            "{s:?}: want an absolute path such as /system.slice/nginx.service"
        ));
    }
    if s.split('/').any(|p| p == "..") || s.chars().any(char::is_control) {
        return Err("a cgroup path has no `..` and no control characters".into());
    }
    let trimmed = s.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.into()
    })
}

/// An inode number (checked against the host's namespaces once running as root), or a path
/// that must open a network namespace.
pub fn netns(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse::<u32>() {
        if n == 0 {
            return Err("0 is not a network namespace inode".into());
        }
        return Ok(n);
    }
    crate::sockdiag::netns::is_netns(std::path::Path::new(s)).map_err(|e| {
        format!(
            "{}: {e} (want /run/netns/NAME, /proc/PID/ns/net or an inode)",
            escape(s)
        )
    })
}

/// clap's error as one line, without its `error: ` prefix and usage footer. clap quotes the
/// value it refused as it was typed: a newline in it would cut the line short, and an escape
/// sequence would reach the terminal, so every value in the error's context is escaped first.
pub fn error_line(mut e: clap::Error) -> String {
    use clap::error::ContextValue;
    let escaped: Vec<_> = e
        .context()
        .filter_map(|(kind, v)| {
            let v = match v {
                ContextValue::String(s) => ContextValue::String(escape(s).into_owned()),
                ContextValue::Strings(v) => {
                    ContextValue::Strings(v.iter().map(|s| escape(s).into_owned()).collect())
                }
                _ => return None,
            };
            Some((kind, v))
        })
        .collect();
    for (kind, v) in escaped {
        e.insert(kind, v);
    }
    let text = e.render().to_string();
    // The message ends at the first blank line: a tip, the usage or "For more information".
    let message = text.split("\n\n").next().unwrap_or_default().trim();
    let message = message.strip_prefix("error: ").unwrap_or(message);
    let message = if message.is_empty() {
        "invalid arguments"
    } else {
        message
    };
    escape_controls(&message.replace('\n', " ")).into_owned()
}

// Every duration and count is bounded here, at parse time: the daemon adds intervals to the
// current instant (which panics on overflow) and sizes work by counts, so a value past these
// bounds is a typo to be refused in one line, not a policy to be carried out.

/// Longest `--*-interval`: a timer that fires less than once a day is no timer.
const MAX_INTERVAL: Duration = Duration::from_secs(86_400);
/// Longest age limit per state: a socket stuck for a month is reported long before it.
const MAX_STATE_THRESHOLD: Duration = Duration::from_secs(30 * 86_400);
/// Longest `kill --older-than`: a year covers any socket an operator will meet.
const MAX_AGE: Duration = Duration::from_secs(365 * 86_400);
/// Largest plain count (`--leak-threshold`): as many as the table can hold.
const MAX_COUNT: u64 = 100_000_000;
/// Most transition records per second in the log: ten million a second already fills a disk
/// in minutes; beyond it means "unlimited", which is 0.
const MAX_LOG_RATE: i64 = 10_000_000;
/// Most rotated logs kept. logrotate has no cap, but a rotation renames each kept file on the
/// daemon's loop thread; a thousand files of --log-max-size is more history than anyone keeps
/// on one host, and bounds that work.
const MAX_LOG_KEEP: i64 = 1000;
/// Largest `--log-max-size`: 1 TiB, larger than any disk a log should fill.
const MAX_LOG_SIZE: u64 = 1 << 40;

fn threshold(s: &str) -> Result<Threshold, String> {
    let t = parse_override(s)?;
    let limit = match t {
        // A listener lives as long as its service: its age says nothing, and a threshold on
        // it would raise an anomaly for every listener.
        Threshold::State(TcpState::Listen, _) => {
            return Err(
                "LISTEN cannot have a threshold: a listener lives as long as its \
                 service (see accept_queue_full=DURATION)"
                    .into(),
            );
        }
        Threshold::State(_, d) => d,
        Threshold::Rule(s) => s.longest(),
    };
    if limit.is_some_and(|d| d > MAX_STATE_THRESHOLD) {
        return Err(format!(
            "{s:?}: a threshold is at most 30 days (use off to disable)"
        ));
    }
    Ok(t)
}

/// A positive duration of at most `max` (`what` names the bound in the error).
fn bounded(s: &str, max: Duration, what: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be longer than 0".into()),
        Ok(d) if d > max => Err(format!("{s:?} is longer than {what}")),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

fn interval(s: &str) -> Result<Duration, String> {
    bounded(s, MAX_INTERVAL, "a day")
}

fn interval_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    interval(s)
}

fn age(s: &str) -> Result<Duration, String> {
    bounded(s, MAX_AGE, "a year")
}

fn log_size(s: &str) -> Result<u64, String> {
    match byte_size(s)? {
        n if n > MAX_LOG_SIZE => Err(format!("{s:?} is larger than 1024G")),
        n => Ok(n),
    }
}

/// `100M`, `1G`, `65536`.
pub fn byte_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}")),
    };
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("{s:?} is not a usable size"))
}

/// `4M`, `256K`, `4MiB`, `1048576`.
pub fn ring_size(s: &str) -> Result<u32, String> {
    let bytes = byte_size(s)?;
    if !bytes.is_power_of_two() || !(4096..=(1 << 30)).contains(&bytes) {
        return Err(format!("{s:?}: must be a power of two between 4K and 1G"));
    }
    Ok(bytes as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes() {
        assert_eq!(ring_size("4M"), Ok(4 << 20));
        assert_eq!(ring_size("256KiB"), Ok(256 << 10));
        assert_eq!(ring_size("65536"), Ok(65536));
        assert!(ring_size("3M").is_err());
        assert!(ring_size("1K").is_err());
        assert!(ring_size("2T").is_err());
        assert!(ring_size("lots").is_err());
    }

    #[test]
    fn parses_a_run_line() {
        let cli = Cli::try_parse_from([
            "tcpstate",
            "run",
            "--format",
            "json",
            "--port",
            "8080",
            "-6",
            "--threshold",
            "close_wait=2s",
            "--threshold",
            "syn_sent=off",
        ])
        .expect("parses");
        let Command::Run(r) = cli.command else {
            panic!("parsed as another command");
        };
        assert_eq!((r.format, r.port, r.ipv6), (Format::Json, Some(8080), true));
        assert_eq!(r.thresholds.len(), 2);
        assert!(Cli::try_parse_from(["tcpstate", "run", "-4", "-6"]).is_err());
        assert!(Cli::try_parse_from(["tcpstate", "run", "--port", "0"]).is_err());
        assert!(Cli::try_parse_from(["tcpstate", "run", "--threshold", "x=1s"]).is_err());
    }

    fn run_err(args: &[&str]) -> String {
        Cli::try_parse_from([&["tcpstate", "run"], args].concat())
            .err()
            .unwrap_or_else(|| panic!("{args:?} must be refused"))
            .to_string()
    }

    #[test]
    fn every_duration_and_count_is_bounded() {
        const HUGE: &str = "18446744073709551615";
        let huge_s = format!("{HUGE}s");
        for flag in [
            "--stats-interval",
            "--leak-interval",
            "--reconcile-interval",
        ] {
            for v in [huge_s.as_str(), "25h"] {
                let e = run_err(&[flag, v]);
                assert!(e.contains("longer than a day"), "{flag} {v}: {e}");
            }
        }
        for (flag, v) in [
            ("--leak-threshold", HUGE),
            ("--leak-threshold", "100000001"),
            ("--full-reconcile-every", HUGE),
            ("--full-reconcile-every", "10001"),
            ("--log-rate", "4294967295"),
            ("--log-keep", "4294967295"),
            ("--log-keep", "1001"),
            ("--log-max-size", "1025G"),
            ("--threshold", "close_wait=31d"),
            ("--threshold", "accept_queue_full=31d"),
        ] {
            run_err(&[flag, v]);
        }
        let kill = |v: &str| {
            Cli::try_parse_from([
                "tcpstate",
                "kill",
                "--state",
                "close_wait",
                "--older-than",
                v,
            ])
        };
        assert!(kill(&huge_s).is_err());
        assert!(kill("366d").is_err());
        assert!(kill("0s").is_err());
        assert!(kill("30d").is_ok());
        // The bounds themselves are accepted.
        Cli::try_parse_from([
            "tcpstate",
            "run",
            "--stats-interval",
            "1day",
            "--leak-interval",
            "24h",
            "--reconcile-interval",
            "0",
            "--leak-threshold",
            "100000000",
            "--full-reconcile-every",
            "10000",
            "--log-rate",
            "10000000",
            "--log-keep",
            "1000",
            "--log-max-size",
            "1024G",
            "--threshold",
            "close_wait=30d",
        ])
        .expect("the bounds are accepted");
    }

    #[test]
    fn a_refused_value_is_escaped_on_one_line() {
        let e = Cli::try_parse_from(["tcpstate", "run", "--netns", "/a\nb\x1b[31m"])
            .expect_err("no such namespace");
        let line = error_line(e);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.contains("'/a\\nb\\e[31m' for '--netns"), "{line:?}");
        assert!(line.contains("/a\\nb\\e[31m: No such file"), "{line:?}");
        assert!(line.contains("want /run/netns/NAME"), "{line:?}");
        let e = Cli::try_parse_from(["tcpstate", "run", "--bo\ngus"]).expect_err("unknown flag");
        let line = error_line(e);
        assert!(line.contains("--bo\\ngus"), "{line:?}");
        assert!(!line.contains("tip") && !line.contains("Usage"), "{line:?}");
    }

    #[test]
    fn thresholds_only_for_states_where_age_means_something() {
        for refused in [
            "listen=1s",
            "LISTEN=off",
            "close=1s",
            "time_wait=1s",
            "new_syn_recv=1s",
        ] {
            run_err(&["--threshold", refused]);
        }
        assert!(run_err(&["--threshold", "listen=1s"]).contains("LISTEN cannot have a threshold"));
        for ok in [
            "close_wait=1s",
            "fin_wait1=1s",
            "fin_wait2=1s",
            "last_ack=1s",
            "closing=1s",
            "syn_sent=1s",
            "syn_recv=1s",
            "established=1h",
        ] {
            Cli::try_parse_from(["tcpstate", "run", "--threshold", ok])
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }
}
