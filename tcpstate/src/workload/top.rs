//! The workloads worth a metric series: cgroups' closing-socket and open-anomaly counts grouped
//! by what they name (unit, container, pod), the top N kept and the rest summed under
//! `unit="other"`, so label cardinality stays bounded whatever runs on the host.

use std::collections::HashMap;

use super::{Workload, Workloads};
use crate::tracker::cgroups::Counts;

/// A workload's metric labels; "" where the cgroup path does not say.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels {
    pub unit: String,
    pub container_id: String,
    pub pod_uid: String,
}

impl Labels {
    /// Sockets of no known cgroup, or of one that names nothing (the root cgroup, a plain
    /// slice) share the empty labels: "unattributed".
    pub fn of(w: Option<&Workload>) -> Self {
        let s = |o: Option<&String>| o.cloned().unwrap_or_default();
        match w {
            None => Self::default(),
            Some(w) => Self {
                unit: s(w.unit.as_ref()),
                container_id: s(w.container_id.as_ref()),
                pod_uid: s(w.pod_uid.as_ref()),
            },
        }
    }

    /// The bucket for everything past the top N. No systemd unit is called that (units end
    /// in `.service`, `.scope`, ...).
    pub fn other() -> Self {
        Self {
            unit: "other".into(),
            ..Self::default()
        }
    }
}

fn add(a: &mut Counts, b: &Counts) {
    for (x, y) in a.closing.iter_mut().zip(b.closing) {
        *x = x.saturating_add(y);
    }
    a.anomalies_open = a.anomalies_open.saturating_add(b.anomalies_open);
}

fn weight(c: &Counts) -> u64 {
    c.closing.iter().map(|&n| u64::from(n)).sum::<u64>() + u64::from(c.anomalies_open)
}

/// Groups per-cgroup counts by their labels and keeps the `n` heaviest (closing sockets plus
/// open anomalies; ties by labels, so the choice is stable), the rest summed as
/// [`Labels::other`]. At most `n + 1` entries.
pub fn top(counts: impl IntoIterator<Item = (Labels, Counts)>, n: usize) -> Vec<(Labels, Counts)> {
    let mut groups: HashMap<Labels, Counts> = HashMap::new();
    for (l, c) in counts {
        add(groups.entry(l).or_default(), &c);
    }
    let mut v: Vec<(Labels, Counts)> = groups.into_iter().collect();
    v.sort_by(|a, b| weight(&b.1).cmp(&weight(&a.1)).then_with(|| a.0.cmp(&b.0)));
    if v.len() > n {
        let mut other = Counts::default();
        for (_, c) in v.drain(n..) {
            add(&mut other, &c);
        }
        v.push((Labels::other(), other));
    }
    v
}

/// [`top`] over the tracker's per-cgroup counts, the cgroups named through `names`.
pub fn top_of<'a>(
    by_cgroup: impl Iterator<Item = (u64, &'a Counts)>,
    names: &mut Workloads,
    n: usize,
) -> Vec<(Labels, Counts)> {
    let labelled: Vec<(Labels, Counts)> = by_cgroup
        .map(|(id, c)| (Labels::of(names.get(id).as_deref()), *c))
        .collect();
    top(labelled, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(u: &str) -> Labels {
        Labels {
            unit: u.into(),
            ..Labels::default()
        }
    }

    fn cw(n: u32) -> Counts {
        Counts {
            closing: [n, 0, 0, 0, 0],
            anomalies_open: 0,
        }
    }

    #[test]
    fn ten_thousand_workloads_become_the_top_n_and_other() {
        let many = (0..10_000u32).map(|i| (unit(&format!("u{i}.service")), cw(i % 97 + 1)));
        let t = top(many, 20);
        assert_eq!(t.len(), 21);
        assert_eq!(t[20].0, Labels::other());
        let total: u64 = t.iter().map(|(_, c)| weight(c)).sum();
        let expect: u64 = (0..10_000u64).map(|i| i % 97 + 1).sum();
        assert_eq!(total, expect, "nothing lost to the bound");
        assert!(t[..20].iter().all(|(_, c)| c.closing[0] == 97));
    }

    #[test]
    fn cgroups_of_one_workload_add_up() {
        let t = top(
            [
                (unit("a.service"), cw(2)),
                (unit("a.service"), cw(3)),
                (unit("b.service"), cw(1)),
            ],
            5,
        );
        assert_eq!(
            t,
            vec![(unit("a.service"), cw(5)), (unit("b.service"), cw(1))]
        );
    }

    #[test]
    fn labels_of_a_pod_container() {
        let id = "a".repeat(64);
        let w = Workload::from_path(format!(
            "/kubepods.slice/kubepods-pod0c6f1a2b_3d4e_4f50_8a9b_0c1d2e3f4a5b.slice/cri-containerd-{id}.scope"
        ));
        let l = Labels::of(Some(&w));
        assert_eq!(l.container_id, id);
        assert_eq!(l.pod_uid, "0c6f1a2b-3d4e-4f50-8a9b-0c1d2e3f4a5b");
        assert_eq!(Labels::of(None), Labels::default());
    }
}
