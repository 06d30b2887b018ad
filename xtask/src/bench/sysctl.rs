//! Global sysctls the bench changes, put back by `Drop` (also on error).

use std::fs;
use std::path::PathBuf;

use anyhow::{Context as _, Result};

pub struct SysctlGuard {
    key: String,
    path: PathBuf,
    old: String,
}

fn path_of(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

fn read(key: &str) -> Result<String> {
    let path = path_of(key);
    fs::read_to_string(&path)
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("cannot read {}", path.display()))
}

impl SysctlGuard {
    /// Like `sysctl -w key=value`; the old value comes back on drop.
    pub fn set(key: &str, value: &str) -> Result<Self> {
        let path = path_of(key);
        let old = read(key)?;
        fs::write(&path, value)
            .with_context(|| format!("cannot write {value:?} to {}", path.display()))?;
        eprintln!("bench: sysctl {key} = {value} (was {old})");
        Ok(Self {
            key: key.to_owned(),
            path,
            old,
        })
    }

    /// Raises a numeric sysctl to at least `min`; None if it already is.
    pub fn raise_to(key: &str, min: u64) -> Result<Option<Self>> {
        let current: u64 = read(key)?
            .parse()
            .with_context(|| format!("{key} is not a number"))?;
        if current >= min {
            return Ok(None);
        }
        Self::set(key, &min.to_string()).map(Some)
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        match fs::write(&self.path, &self.old) {
            Ok(()) => eprintln!("bench: sysctl {} restored to {}", self.key, self.old),
            Err(err) => eprintln!(
                "bench: warning: cannot restore {} to {}: {err}",
                self.key, self.old
            ),
        }
    }
}
