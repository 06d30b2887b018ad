//! `tcpstate status`: ask the running daemon.

use crate::cli::StatusArgs;

pub fn status(_args: StatusArgs) -> anyhow::Result<()> {
    anyhow::bail!("tcpstate status is not implemented yet")
}
