//! The kernel's own socket table (sock_diag): seeding the tracker at
//! start-up, reconciling it, and checking who really holds a socket when an
//! anomaly is raised.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
};

use crate::{
    decode::Comm,
    owner,
    record::{AnomalyRecord, Owner, OwnerSource},
    sockdiag::{self, DiagSocket},
    state::TcpState,
    tracker::{Alive, SeedSocket},
};

/// Which namespaces to look in, and how to name them.
pub struct Namespaces {
    /// The daemon's own netns inode.
    pub host: u32,
}

impl Namespaces {
    /// Dumps the sockets of `netns` (as events label it).
    fn dump(&self, netns: u32, paths: &HashMap<u32, PathBuf>) -> Option<Vec<DiagSocket>> {
        if netns == self.host || netns == 0 {
            return sockdiag::dump_tcp().ok();
        }
        sockdiag::dump_tcp_in_netns(paths.get(&netns)?).ok()
    }

    /// Every socket in every namespace, with its holder, for seeding.
    pub fn seed(&self) -> Vec<SeedSocket> {
        let paths = sockdiag::all_netns();
        let mut namespaces: Vec<u32> = paths.keys().copied().collect();
        if !namespaces.contains(&self.host) {
            namespaces.push(self.host);
        }
        let mut found: Vec<(u32, DiagSocket)> = Vec::new();
        for ns in namespaces {
            if let Some(socks) = self.dump(ns, &paths) {
                found.extend(socks.into_iter().map(|s| (ns, s)));
            }
        }
        let inodes: HashSet<u32> = found
            .iter()
            .map(|(_, s)| s.inode)
            .filter(|&i| i != 0)
            .collect();
        let holders = owner::holders(&inodes);
        found
            .into_iter()
            .filter_map(|(netns, s)| {
                let state = TcpState::from_kernel(s.state)?;
                let owner = holders
                    .get(&s.inode)
                    .and_then(|h| h.first())
                    .map(|h| (h.pid, Comm::new(&h.comm)));
                Some(SeedSocket {
                    netns,
                    state,
                    saddr: s.saddr,
                    sport: s.sport,
                    daddr: s.daddr,
                    dport: s.dport,
                    owner,
                })
            })
            .collect()
    }

    /// What is alive, per namespace, for the namespaces asked about.
    pub fn alive(&self, namespaces: &HashSet<u32>) -> Vec<(u32, Alive)> {
        let paths = sockdiag::all_netns();
        namespaces
            .iter()
            .filter_map(|&ns| {
                // A namespace we cannot open is skipped, not judged empty:
                // its sockets stay until their own CLOSE arrives.
                let socks = self.dump(ns, &paths)?;
                let mut alive = Alive::default();
                for s in socks {
                    if let Some(st) = TcpState::from_kernel(s.state) {
                        alive.insert(ns, st, s.saddr, s.sport, s.daddr, s.dport);
                    }
                }
                Some((ns, alive))
            })
            .collect()
    }

    /// Replaces attributed owners with the process holding the socket's fd
    /// right now: one dump per namespace involved, one /proc pass.
    pub fn verify_owners(&self, anomalies: &mut [&mut AnomalyRecord]) {
        if anomalies.is_empty() {
            return;
        }
        let paths = sockdiag::all_netns();
        let mut by_tuple: HashMap<(u32, IpAddr, u16, IpAddr, u16), u32> = HashMap::new();
        let namespaces: HashSet<u32> = anomalies.iter().map(|a| a.netns).collect();
        let mut dumped = HashSet::new();
        for ns in namespaces {
            if let Some(socks) = self.dump(ns, &paths) {
                dumped.insert(ns);
                for s in socks {
                    by_tuple.insert((ns, s.saddr, s.sport, s.daddr, s.dport), s.inode);
                }
            }
        }
        let wanted: HashSet<u32> = anomalies
            .iter()
            .filter_map(|a| by_tuple.get(&(a.netns, a.saddr, a.sport, a.daddr, a.dport)))
            .copied()
            .filter(|&i| i != 0)
            .collect();
        let holders = owner::holders(&wanted);
        for a in anomalies.iter_mut() {
            let attributed = a.pid.zip(a.comm).map(|(pid, comm)| Owner { pid, comm });
            let Some(&inode) = by_tuple.get(&(a.netns, a.saddr, a.sport, a.daddr, a.dport)) else {
                // Not in the dump (gone, or namespace unreachable): keep
                // the attribution, flagged as unverified.
                continue;
            };
            match holders.get(&inode).and_then(|h| h.first()) {
                Some(h) => {
                    a.pid = Some(h.pid);
                    a.comm = Some(Comm::new(&h.comm));
                    a.owner_source = OwnerSource::Fd;
                    a.last_owner = None;
                }
                None => {
                    // Orphaned: nobody holds it. Say so; keep who did.
                    a.pid = None;
                    a.comm = None;
                    a.owner_source = OwnerSource::None;
                    a.last_owner = attributed;
                }
            }
        }
    }
}
