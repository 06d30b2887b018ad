//! Who a socket works for, in a fleet's words: its cgroup (read from the socket by the eBPF
//! program when it is born) resolved to a path in the unified hierarchy, and the systemd
//! unit, container and pod that path names. Resolution is one `open_by_handle_at` per new
//! cgroup, on the engine thread (never the thread draining the rings), then cached with a
//! bound.

mod hierarchy;
mod naming;
pub mod top;

use std::sync::Arc;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

pub use self::{
    hierarchy::{Hierarchy, cgroup_of_pid},
    naming::{Names, names_of},
};

/// A cgroup and the names it carries. Shared (`Arc`) by every record of its sockets.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Workload {
    /// The path in the unified hierarchy, as `/proc/PID/cgroup` writes it.
    pub cgroup: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// These fields as JSON object members (`,"cgroup":...`), made once: the transition
    /// writer appends them to every record of the cgroup's sockets.
    #[serde(skip)]
    json: Box<str>,
}

impl PartialEq for Workload {
    fn eq(&self, o: &Self) -> bool {
        (&self.cgroup, &self.unit, &self.container_id, &self.pod_uid)
            == (&o.cgroup, &o.unit, &o.container_id, &o.pod_uid)
    }
}

impl Eq for Workload {}

impl Workload {
    pub fn from_path(cgroup: String) -> Self {
        let Names {
            unit,
            container_id,
            pod_uid,
        } = names_of(&cgroup);
        let mut w = Self {
            cgroup,
            unit,
            container_id,
            pod_uid,
            json: Box::default(),
        };
        // Serialising strings into a String cannot fail; strip the braces.
        let obj = serde_json::to_string(&w).unwrap_or_default();
        w.json = obj
            .strip_prefix('{')
            .and_then(|o| o.strip_suffix('}'))
            .map(|o| format!(",{o}").into_boxed_str())
            .unwrap_or_default();
        w
    }

    /// `,"cgroup":"...",...`: the members a JSON record of this workload carries.
    pub fn json_members(&self) -> &str {
        &self.json
    }

    /// What the text output and `status` call it: the pod and container, else the unit,
    /// else the path.
    pub fn label(&self) -> String {
        label(
            self.unit.as_deref(),
            self.container_id.as_deref(),
            self.pod_uid.as_deref(),
        )
        .unwrap_or_else(|| self.cgroup.clone())
    }
}

/// The pod and container, else the container, the pod, the unit; None when nothing is named.
pub fn label(unit: Option<&str>, container: Option<&str>, pod: Option<&str>) -> Option<String> {
    Some(match (pod, container.map(short), unit) {
        (Some(p), Some(c), _) => format!("pod {p} container {c}"),
        (None, Some(c), _) => format!("container {c}"),
        (Some(p), None, _) => format!("pod {p}"),
        (None, None, Some(u)) => u.to_owned(),
        (None, None, None) => return None,
    })
}

/// A container id as `docker ps` shows it: 12 characters.
pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Most cgroups remembered at once. A host rarely runs more than a few thousand; past this the
/// least recently used go (a socket's next record then resolves its cgroup again, or, if it
/// was removed meanwhile, carries no names).
pub const CACHE_CGROUPS: usize = 16_384;

/// Cgroup id -> workload, bounded: two generations, the older dropped whole when the newer
/// fills, so a lookup is one hash probe and the cache never exceeds its bound. A cgroup's name
/// is resolved the first time one of its sockets is seen (at birth), and kept while its
/// sockets keep being seen, even after the cgroup itself is removed.
#[derive(Debug)]
pub struct Workloads {
    hierarchy: Option<Hierarchy>,
    young: FxHashMap<u64, Option<Arc<Workload>>>,
    old: FxHashMap<u64, Option<Arc<Workload>>>,
    per_generation: usize,
    resolved: u64,
}

impl Workloads {
    pub fn new(hierarchy: Option<Hierarchy>) -> Self {
        Self::with_capacity(hierarchy, CACHE_CGROUPS)
    }

    pub fn with_capacity(hierarchy: Option<Hierarchy>, capacity: usize) -> Self {
        Self {
            hierarchy,
            young: FxHashMap::default(),
            old: FxHashMap::default(),
            per_generation: (capacity / 2).max(1),
            resolved: 0,
        }
    }

    pub fn hierarchy(&self) -> Option<&Hierarchy> {
        self.hierarchy.as_ref()
    }

    /// The workload of cgroup `id` (0: unknown).
    pub fn get(&mut self, id: u64) -> Option<Arc<Workload>> {
        self.get_with(id, |h, id| h?.path_of(id).ok())
    }

    fn get_with(
        &mut self,
        id: u64,
        resolve: impl FnOnce(Option<&Hierarchy>, u64) -> Option<String>,
    ) -> Option<Arc<Workload>> {
        if id == 0 {
            return None;
        }
        if let Some(w) = self.young.get(&id) {
            return w.clone();
        }
        let w = match self.old.remove(&id) {
            Some(w) => w,
            None => {
                self.resolved += 1;
                let path = resolve(self.hierarchy.as_ref(), id);
                path.map(|p| Arc::new(Workload::from_path(p)))
            }
        };
        if self.young.len() >= self.per_generation {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(id, w.clone());
        w
    }

    /// Cgroups remembered now.
    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lookups that went to the kernel.
    pub fn resolved(&self) -> u64 {
        self.resolved
    }

    /// Inserts a known name (tests, and names learnt elsewhere).
    #[cfg(test)]
    fn remember(&mut self, id: u64, path: &str) {
        self.get_with(id, |_, _| Some(path.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_members_are_what_serde_writes() {
        let w = Workload::from_path("/system.slice/a\"b.service".into());
        assert_eq!(
            w.json_members(),
            r#","cgroup":"/system.slice/a\"b.service","unit":"a\"b.service""#
        );
    }

    #[test]
    fn labels_say_the_most_specific_name() {
        let id = "a".repeat(64);
        let w = Workload::from_path(format!("/system.slice/docker-{id}.scope"));
        assert_eq!(w.label(), "container aaaaaaaaaaaa");
        let w = Workload::from_path("/system.slice/payments-api.service".into());
        assert_eq!(w.label(), "payments-api.service");
        assert_eq!(Workload::from_path("/".into()).label(), "/");
    }

    #[test]
    fn the_cache_stays_within_its_bound_and_keeps_what_is_used() {
        // Without a hierarchy nothing resolves; `remember` stands in for the kernel.
        let mut w = Workloads::with_capacity(None, 100);
        w.remember(1, "/system.slice/a.service");
        for id in 2..10_000 {
            w.remember(id, "/x");
            assert!(w.len() <= 100);
            // Used all along: never dropped.
            assert_eq!(
                w.get(1).map(|x| x.cgroup.clone()).as_deref(),
                Some("/system.slice/a.service")
            );
        }
        assert_eq!(w.get(0), None);
        assert_eq!(
            w.get(20_000),
            None,
            "unknown, and nothing to resolve it with"
        );
    }
}
