//! The command line: one struct per subcommand.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    state::TcpState,
    tracker::thresholds::{Threshold, parse_override},
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
    /// Print the daemon's JSON as it is.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct KillArgs {
    /// The state of the sockets to destroy (close_wait, fin_wait2, syn_sent, ...).
    #[arg(long, value_parser = state)]
    pub state: TcpState,
    /// Only sockets in that state for at least this long (e.g. 10m). Only the running daemon
    /// knows how long, so it is asked (see --addr).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
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
    /// Where the daemon serves /sockets (its --metrics-addr).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub addr: std::net::SocketAddr,
    /// Log to write a `killed` record to for each socket destroyed (default: the daemon's
    /// --log-file).
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<std::path::PathBuf>,
}

fn state(s: &str) -> Result<TcpState, String> {
    TcpState::parse(s).ok_or_else(|| format!("unknown TCP state {s:?}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
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
    #[arg(long, default_value_t = 10)]
    pub leak_threshold: u64,
    /// How often the leak rule compares counts.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub leak_interval: Duration,
    /// How often to check the table against the kernel's socket list (0 = never).
    #[arg(long, default_value = "30s", value_parser = duration_or_zero)]
    pub reconcile_interval: Duration,
    /// Every Nth reconciliation also re-reads TIME_WAIT sockets (the others read full sockets
    /// and orphaned FIN_WAIT2 ones: cheap whatever TIME_WAIT load the host has). After a lost
    /// event and at a quiet moment, every reconciliation does.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub full_reconcile_every: u64,
    /// Do not load the kernel's existing sockets at start-up.
    #[arg(long)]
    pub no_seed: bool,
    /// How often to report lost events on stderr (only when some were lost).
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub stats_interval: Duration,

    /// Append every record to this file as JSON Lines (reopened on SIGHUP
    /// and when logrotate renames it).
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<std::path::PathBuf>,
    /// Transition records per second written to the log; 0 = unlimited.
    /// Default: unlimited when stdout is a terminal, 10000 otherwise.
    /// Anomalies are never limited.
    #[arg(long, value_name = "N")]
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
    /// Rotate the log ourselves past this size (e.g. 100M); for hosts without logrotate.
    #[arg(long, value_parser = byte_size, value_name = "SIZE")]
    pub log_max_size: Option<u64>,
    /// Rotated logs kept with --log-max-size (PATH.1 .. PATH.N).
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub log_keep: u32,
    /// Serve Prometheus /metrics and /status here (loopback unless you say otherwise).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Per-workload gauges for the N units/containers with the most closing sockets and open
    /// anomalies; the rest are summed under unit="other" (label cardinality stays bounded).
    #[arg(long, default_value_t = 20, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub metrics_top: u16,
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
    crate::sockdiag::netns::is_netns(std::path::Path::new(s))
        .map_err(|e| format!("{s}: {e} (want /run/netns/NAME, /proc/PID/ns/net or an inode)"))
}

fn threshold(s: &str) -> Result<Threshold, String> {
    parse_override(s)
}

fn duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be longer than 0".into()),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

fn duration_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    duration(s)
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
}
