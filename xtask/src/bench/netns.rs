//! The network namespace the bench's traffic runs in: created per bench run,
//! entered per thread with setns(2), deleted by `Drop`.

use std::fs::{self, File};
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::process::Command;
use std::thread;

use anyhow::{Context as _, Result, anyhow, bail};

use crate::cmd::{capture, show};

pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// `ip netns add tcpstate-bench-<pid>` and `ip -n … link set lo up`.
    pub fn create() -> Result<Self> {
        Self::create_named("bench")
    }

    /// `ip netns add tcpstate-<what>-<pid>`, lo up.
    pub fn create_named(what: &str) -> Result<Self> {
        let name = format!("tcpstate-{what}-{}", std::process::id());
        eprintln!("bench: creating network namespace {name}");
        capture(Command::new("ip").args(["netns", "add", &name]))?;
        // From here on Drop deletes it, also when the next step fails.
        let netns = Self {
            path: PathBuf::from("/run/netns").join(&name),
            name,
        };
        capture(Command::new("ip").args(["-n", &netns.name, "link", "set", "lo", "up"]))?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Moves the calling thread (only) into the namespace; sockets it
    /// creates afterwards live there.
    pub fn enter(&self) -> Result<()> {
        let file = File::open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        // SAFETY: a valid open fd and a constant flag; setns only affects
        // the calling thread's namespaces.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("setns into {} failed", self.path.display()));
        }
        Ok(())
    }

    /// Writes a per-namespace sysctl (`key` like "net.ipv4.tcp_tw_reuse")
    /// from a thread inside the namespace: /proc/sys/net resolves against the
    /// writing thread's namespace. Reads it back to be sure.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        thread::scope(|scope| {
            scope
                .spawn(|| -> Result<()> {
                    self.enter()?;
                    fs::write(&path, value)
                        .with_context(|| format!("cannot write {value:?} to {}", path.display()))?;
                    let got = fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    let norm = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
                    if norm(&got) != norm(value) {
                        bail!("{key} reads {:?} after writing {value:?}", got.trim());
                    }
                    Ok(())
                })
                .join()
                .map_err(|_| anyhow!("the sysctl thread panicked"))?
        })
        .with_context(|| format!("setting {key} in {}", self.name))?;
        eprintln!("bench: {}: {key} = {value}", self.name);
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "delete", &self.name]);
        match capture(&mut cmd) {
            Ok(_) => eprintln!("bench: deleted network namespace {}", self.name),
            Err(err) => eprintln!("bench: warning: `{}`: {err:#}", show(&cmd)),
        }
    }
}
