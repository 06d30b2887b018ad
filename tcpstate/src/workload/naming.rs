//! What a cgroup path says about who runs in it, in the words a fleet uses: the systemd unit,
//! the container and the pod. Pure string work on the paths systemd, docker, containerd
//! (cri-containerd), cri-o, podman and the kubelet create, in both of their drivers' layouts
//! (systemd slices and scopes, and cgroupfs directories).

/// The names derived from one cgroup path. Each is None when the path does not say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    /// The innermost systemd `.service` or `.scope`; under a user's service manager
    /// prefixed with it (`user@1000.service/payments-api.service`).
    pub unit: Option<String>,
    /// The outermost container's full 64-hex id.
    pub container_id: Option<String>,
    /// The Kubernetes pod's UID, with dashes (the systemd driver writes underscores).
    pub pod_uid: Option<String>,
}

/// Derives [`Names`] from a path in the unified hierarchy (`/system.slice/x.service`).
pub fn names_of(path: &str) -> Names {
    let mut n = Names::default();
    // A user's own units (`systemctl --user`) run under their service manager,
    // `user@UID.service`, and may share a name with a system unit or another user's: named
    // alone, a user's payments-api.service would be counted and filtered as the system's.
    let mut manager: Option<&str> = None;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        if part.ends_with(".service") || part.ends_with(".scope") {
            n.unit = Some(match manager {
                Some(m) => format!("{m}/{part}"),
                None => part.to_owned(),
            });
        }
        if manager.is_none() && is_user_manager(part) {
            manager = Some(part);
        }
        if n.container_id.is_none() {
            n.container_id = container_id(part).map(str::to_owned);
        }
        if n.pod_uid.is_none() {
            n.pod_uid = pod_uid(part);
        }
    }
    n
}

/// `user@UID.service`: a user's systemd instance.
fn is_user_manager(part: &str) -> bool {
    part.strip_prefix("user@")
        .and_then(|p| p.strip_suffix(".service"))
        .is_some_and(|uid| !uid.is_empty() && uid.bytes().all(|b| b.is_ascii_digit()))
}

/// `docker-ID.scope`, `cri-containerd-ID.scope`, `crio-ID.scope`, `libpod-ID.scope` (systemd
/// driver), or a bare 64-hex directory (cgroupfs driver: `/docker/ID`, `/kubepods/.../ID`,
/// `/libpod_parent/libpod-ID`). The runtimes' monitors (`crio-conmon-ID.scope`,
/// `libpod-conmon-ID.scope`) are not the container.
fn container_id(part: &str) -> Option<&str> {
    let id = part.strip_suffix(".scope").unwrap_or(part);
    let id = ["docker-", "cri-containerd-", "crio-", "libpod-"]
        .iter()
        .find_map(|p| id.strip_prefix(p))
        .unwrap_or(id);
    is_container_id(id).then_some(id)
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `kubepods-pod<UID>.slice` (Guaranteed), `kubepods-burstable-pod<UID>.slice`,
/// `kubepods-besteffort-pod<UID>.slice` (systemd driver, dashes written as underscores), or
/// `pod<UID>` under `/kubepods[/burstable|/besteffort]` (cgroupfs driver).
fn pod_uid(part: &str) -> Option<String> {
    let uid = match part.strip_suffix(".slice") {
        Some(slice) => {
            let rest = slice.strip_prefix("kubepods-")?;
            let rest = rest
                .strip_prefix("burstable-")
                .or_else(|| rest.strip_prefix("besteffort-"))
                .unwrap_or(rest);
            rest.strip_prefix("pod")?
        }
        None => part.strip_prefix("pod")?,
    };
    let uid = uid.replace('_', "-");
    is_uid(&uid).then_some(uid)
}

/// 8-4-4-4-12 hex digits.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a9c1e5b7d4f6a8c0e2b4d6f8a0c2e4b6d8f0a2c4e6b8d0f2a4c6e8b0d2f4a";
    const UID: &str = "0c6f1a2b-3d4e-4f50-8a9b-0c1d2e3f4a5b";

    fn n(unit: Option<&str>, container: Option<&str>, pod: Option<&str>) -> Names {
        Names {
            unit: unit.map(str::to_owned),
            container_id: container.map(str::to_owned),
            pod_uid: pod.map(str::to_owned),
        }
    }

    #[test]
    fn systemd_services_and_scopes() {
        assert_eq!(
            names_of("/system.slice/payments-api.service"),
            n(Some("payments-api.service"), None, None)
        );
        assert_eq!(
            names_of("/user.slice/user-1000.slice/session-3.scope"),
            n(Some("session-3.scope"), None, None)
        );
        // A unit's own sub-cgroup (systemd's Delegate=) still names the unit.
        assert_eq!(
            names_of("/system.slice/nginx.service/workers"),
            n(Some("nginx.service"), None, None)
        );
        assert_eq!(names_of("/"), Names::default());
        // A user's own service is not the system's of the same name.
        let user = "/user.slice/user-65534.slice/user@65534.service";
        assert_eq!(
            names_of(&format!("{user}/app.slice/payments-api.service")),
            n(Some("user@65534.service/payments-api.service"), None, None)
        );
        assert_eq!(
            names_of(&format!("{user}/init.scope")),
            n(Some("user@65534.service/init.scope"), None, None)
        );
        assert_eq!(names_of(user), n(Some("user@65534.service"), None, None));
        // Rootless podman under the user's manager: the container, and whose it is.
        let scope = format!("libpod-{ID}.scope");
        assert_eq!(
            names_of(&format!("{user}/user.slice/{scope}")),
            n(Some(&format!("user@65534.service/{scope}")), Some(ID), None)
        );
        // Only user@DIGITS.service is a user's manager.
        assert_eq!(
            names_of("/system.slice/user@x.service/a.service"),
            n(Some("a.service"), None, None)
        );
        assert_eq!(names_of("/system.slice"), Names::default());
    }

    #[test]
    fn docker_both_drivers() {
        let scope = format!("docker-{ID}.scope");
        assert_eq!(
            names_of(&format!("/system.slice/{scope}")),
            n(Some(&scope), Some(ID), None)
        );
        assert_eq!(names_of(&format!("/docker/{ID}")), n(None, Some(ID), None));
        // systemd running inside the container: the container is the outer one.
        assert_eq!(
            names_of(&format!("/system.slice/{scope}/init.scope")),
            n(Some("init.scope"), Some(ID), None)
        );
    }

    #[test]
    fn kubernetes_with_containerd_and_crio_every_qos_class() {
        let under = UID.replace('-', "_");
        for (qos, slice) in [
            ("guaranteed", format!("kubepods-pod{under}.slice")),
            (
                "burstable",
                format!("kubepods-burstable.slice/kubepods-burstable-pod{under}.slice"),
            ),
            (
                "besteffort",
                format!("kubepods-besteffort.slice/kubepods-besteffort-pod{under}.slice"),
            ),
        ] {
            for runtime in ["cri-containerd", "crio"] {
                let scope = format!("{runtime}-{ID}.scope");
                let path = format!("/kubepods.slice/{slice}/{scope}");
                assert_eq!(
                    names_of(&path),
                    n(Some(&scope), Some(ID), Some(UID)),
                    "{qos}"
                );
            }
        }
        // cgroupfs driver.
        for qos in ["", "burstable/", "besteffort/"] {
            let path = format!("/kubepods/{qos}pod{UID}/{ID}");
            assert_eq!(names_of(&path), n(None, Some(ID), Some(UID)), "{path}");
        }
        // The pod's own cgroup, before any container: the pod alone.
        assert_eq!(
            names_of(&format!("/kubepods.slice/kubepods-pod{under}.slice")),
            n(None, None, Some(UID))
        );
    }

    #[test]
    fn podman_and_the_runtimes_monitors() {
        let scope = format!("libpod-{ID}.scope");
        assert_eq!(
            names_of(&format!("/machine.slice/{scope}")),
            n(Some(&scope), Some(ID), None)
        );
        assert_eq!(
            names_of(&format!("/libpod_parent/libpod-{ID}")),
            n(None, Some(ID), None)
        );
        for monitor in ["libpod-conmon", "crio-conmon"] {
            let scope = format!("{monitor}-{ID}.scope");
            assert_eq!(
                names_of(&format!("/machine.slice/{scope}")),
                n(Some(&scope), None, None)
            );
        }
    }

    #[test]
    fn look_alikes_are_not_ids() {
        // Too short, upper case, not hex, a pod that is not a UID.
        for path in [
            "/docker/3f2a9c1e",
            &format!("/docker/{}", ID.to_uppercase()),
            &format!("/docker/{}g", &ID[..63]),
            "/kubepods/podnotauid",
            "/kubepods.slice/kubepods-podx.slice",
        ] {
            let got = names_of(path);
            assert_eq!((got.container_id, got.pod_uid), (None, None), "{path}");
        }
    }
}
