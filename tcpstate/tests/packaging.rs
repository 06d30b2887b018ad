//! What ships beside the binary for fleets: the Prometheus alert rules pass their own unit
//! tests, and every query of the Grafana dashboard and the rules parses and names only
//! metrics a live daemon exports.

mod common;

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use common::{Daemon, free_port, http_get, require_bpf};
use serde_json::Value;

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect(
            "promtool (Debian package prometheus) must be installed: cargo xtask setup does it",
        );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}: {text}");
    text
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    let dir = packaging().join("prometheus");
    promtool(&["check", "rules", "tcpstate.rules.yml"], &dir);
    let out = promtool(&["test", "rules", "tcpstate.rules.test.yml"], &dir);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Every PromQL expression in the dashboard, its Grafana variables given values.
fn dashboard_queries() -> Vec<String> {
    let text =
        std::fs::read_to_string(packaging().join("grafana/tcpstate.json")).expect("dashboard");
    let d: Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut exprs = Vec::new();
    for panel in d["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().expect("targets") {
            let e = t["expr"].as_str().expect("expr");
            exprs.push(
                e.replace("$__rate_interval", "5m")
                    .replace("$instance", ".*")
                    .replace("$state", "CLOSE_WAIT"),
            );
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    exprs
}

/// `tcpstate_*` names a text uses.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("tcpstate_") {
        let start = i + at;
        let before = start.checked_sub(1).map(|j| b[j]);
        let mut end = start;
        while end < b.len()
            && (b[end].is_ascii_lowercase() || b[end] == b'_' || b[end].is_ascii_digit())
        {
            end += 1;
        }
        // Not part of a longer word (a file name such as tcpstate.rules.yml has no `_`).
        if before
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'/'))
        {
            out.insert(text[start..end].to_owned());
        }
        i = end;
    }
    out
}

#[test]
fn dashboard_queries_parse_as_promql() {
    let exprs = dashboard_queries();
    // promtool parses rules, not bare queries: each query becomes a recording rule.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let quoted = serde_json::to_string(e).expect("quote");
        let _ = writeln!(
            rules,
            "      - record: dashboard:query{i}\n        expr: {quoted}"
        );
    }
    let dir = std::env::temp_dir().join(format!("tcpstate-dashboard-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    std::fs::write(dir.join("dashboard.rules.yml"), rules).expect("write");
    let out = promtool(&["check", "rules", "dashboard.rules.yml"], &dir);
    assert!(
        out.contains(&format!("{} rules found", exprs.len())),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The names the dashboard and the alert rules use all come out of a live `/metrics`.
#[test]
fn dashboard_and_rules_use_only_exported_metrics() {
    if !require_bpf() {
        return;
    }
    let mport = free_port();
    let daemon = Daemon::start(&["--metrics-addr", &format!("127.0.0.1:{mport}")]);
    let metrics = http_get(mport, "/metrics");
    drop(daemon.stop());
    let mut exported = BTreeSet::new();
    for l in metrics.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            exported.insert(name.to_owned());
            if kind == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    exported.insert(format!("{name}{s}"));
                }
            }
        }
    }
    assert!(exported.contains("tcpstate_workload_sockets"), "{metrics}");
    let mut used = BTreeSet::new();
    for e in dashboard_queries() {
        used.extend(names_in(&e));
    }
    let text =
        std::fs::read_to_string(packaging().join("grafana/tcpstate.json")).expect("dashboard");
    used.extend(names_in(&text));
    let rules =
        std::fs::read_to_string(packaging().join("prometheus/tcpstate.rules.yml")).expect("rules");
    used.extend(names_in(&rules));
    assert!(used.len() >= 15, "{used:?}");
    let unknown: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        unknown.is_empty(),
        "not exported: {unknown:?}\nexported: {exported:?}"
    );
}
