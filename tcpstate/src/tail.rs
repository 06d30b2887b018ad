//! `tcpstate tail`: read a transition log.

use crate::cli::TailArgs;

pub fn tail(_args: TailArgs) -> anyhow::Result<()> {
    anyhow::bail!("tcpstate tail is not implemented yet")
}
