//! The crate graph against docs/ARCHITECTURE.md's invariants: each crate compiles only what its
//! job needs (no AWS SDK outside `crates/aws` and `crates/fleet`, no server behind the agent or
//! the AWS backend, no I/O crate behind the protocol and the PIT policy).
//!
//! The graph is `cargo metadata --all-features`' resolve (every optional dependency switched
//! on: the worst case), normal and build dependencies followed transitively; dev-dependencies
//! are not followed, as they compile only into tests. Each rule names the architecture
//! invariant it checks, so a failure says which one a change broke.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// The AWS SDK, by crate name.
fn is_aws_sdk(name: &str) -> bool {
    name.starts_with("aws-sdk-") || name.starts_with("aws-smithy-") || name == "aws-config"
}

/// Crates that do I/O or read the clock for a living (an async runtime, sockets, syscalls).
const IO: &[&str] = &["tokio", "mio", "quinn", "socket2", "libc", "nix", "rustix"];

/// A rule: `krate` must not depend, directly or not, on anything `forbidden` matches.
struct Rule {
    krate: &'static str,
    invariant: &'static str,
    forbidden: fn(&str) -> bool,
}

fn rules() -> Vec<Rule> {
    vec![
        Rule {
            krate: "slipway-proto",
            invariant: "proto does no I/O and reads no clock",
            forbidden: |d| IO.contains(&d) || (d.starts_with("slipway-") && d != "slipway-proto"),
        },
        Rule {
            krate: "slipway-pit",
            invariant: "pit reads no clock and touches no file",
            forbidden: |d| IO.contains(&d) || (d.starts_with("slipway-") && d != "slipway-pit"),
        },
        Rule {
            krate: "slipway-backend",
            invariant: "the backend traits do no I/O and depend on no other slipway crate",
            forbidden: |d| {
                IO.contains(&d)
                    || is_aws_sdk(d)
                    || (d.starts_with("slipway-") && d != "slipway-backend")
            },
        },
        Rule {
            krate: "slipway-store",
            invariant: "the store publishes events and never calls its owner's code",
            forbidden: |d| {
                matches!(
                    d,
                    "slipway-server" | "slipway-net" | "slipway-agent" | "slipway-settings"
                ) || is_aws_sdk(d)
            },
        },
        Rule {
            krate: "slipway-net",
            invariant: "net is QUIC plumbing shared by server and agent, neither's logic",
            forbidden: |d| {
                matches!(d, "slipway-server" | "slipway-store" | "slipway-agent") || is_aws_sdk(d)
            },
        },
        Rule {
            krate: "slipway-settings",
            invariant: "the settings are read by the server and the templates, not the reverse",
            forbidden: |d| matches!(d, "slipway-server" | "slipway-fleet") || is_aws_sdk(d),
        },
        Rule {
            krate: "slipway-server",
            invariant: "the server never depends on the AWS SDK",
            forbidden: |d| {
                matches!(d, "slipway-aws" | "slipway-fleet" | "slipway-agent") || is_aws_sdk(d)
            },
        },
        Rule {
            krate: "slipway-agent",
            invariant: "building the agent builds neither the server nor the AWS SDK",
            forbidden: |d| {
                matches!(
                    d,
                    "slipway-server"
                        | "slipway-store"
                        | "slipway-settings"
                        | "slipway-backend"
                        | "slipway-aws"
                        | "slipway-fleet"
                ) || is_aws_sdk(d)
            },
        },
        Rule {
            krate: "slipway-aws",
            invariant: "crates/aws implements the backend traits without compiling the server",
            forbidden: |d| matches!(d, "slipway-server" | "slipway-agent" | "slipway-fleet"),
        },
        Rule {
            krate: "slipway-fleet",
            invariant: "crates/fleet renders settings without compiling the server",
            forbidden: |d| matches!(d, "slipway-server" | "slipway-agent"),
        },
        Rule {
            krate: "slipway-convert",
            invariant: "conversion works on the images it is given, knowing no other slipway crate",
            forbidden: |d| (d.starts_with("slipway-") && d != "slipway-convert") || is_aws_sdk(d),
        },
        Rule {
            krate: "slipway-drill",
            invariant: "the local test launch boots copies in QEMU, not through the server or AWS",
            forbidden: |d| {
                matches!(
                    d,
                    "slipway-server" | "slipway-agent" | "slipway-aws" | "slipway-fleet"
                ) || is_aws_sdk(d)
            },
        },
        Rule {
            krate: "slipway-bench",
            invariant: "the bench drives the real binaries; its load generator speaks the \
                        protocol (proto, net) but links no server, store or agent code",
            forbidden: |d| {
                matches!(
                    d,
                    "slipway-server" | "slipway-store" | "slipway-agent" | "slipway-settings"
                ) || is_aws_sdk(d)
            },
        },
    ]
}

/// Crate name → names of the crates it compiles (normal and build dependencies, transitively).
fn closure() -> BTreeMap<String, BTreeSet<String>> {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--all-features"])
        .args(["--manifest-path", manifest])
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let name_of: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    // Direct edges by package id, dev-dependencies left out.
    let mut edges: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().expect("resolve.nodes") {
        let deps = node["deps"].as_array().expect("deps");
        let normal = deps.iter().filter(|d| {
            d["dep_kinds"]
                .as_array()
                .expect("dep_kinds")
                .iter()
                .any(|k| k["kind"].is_null() || k["kind"] == "build")
        });
        edges.insert(
            node["id"].as_str().unwrap(),
            normal.map(|d| d["pkg"].as_str().unwrap()).collect(),
        );
    }
    let mut all = BTreeMap::new();
    for member in meta["workspace_members"]
        .as_array()
        .expect("workspace_members")
    {
        let root = member.as_str().unwrap();
        let mut seen = BTreeSet::new();
        let mut todo = vec![root];
        while let Some(id) = todo.pop() {
            for &dep in edges.get(id).map(Vec::as_slice).unwrap_or_default() {
                if seen.insert(dep) {
                    todo.push(dep);
                }
            }
        }
        all.insert(
            name_of[root].to_string(),
            seen.iter().map(|id| name_of[id].to_string()).collect(),
        );
    }
    all
}

#[test]
fn every_crate_compiles_only_what_its_invariant_allows() {
    let graph = closure();
    let mut broken = Vec::new();
    for rule in rules() {
        // A renamed crate must not turn its rule into one that checks nothing.
        let deps = graph
            .get(rule.krate)
            .unwrap_or_else(|| panic!("{} is not a workspace member", rule.krate));
        let bad: Vec<&String> = deps.iter().filter(|d| (rule.forbidden)(d)).collect();
        if !bad.is_empty() {
            broken.push(format!(
                "{} depends on {bad:?}, against \"{}\" (docs/ARCHITECTURE.md)",
                rule.krate, rule.invariant
            ));
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
    // The rules cover every crate of the workspace but the binary that wires them and the
    // test-only power-cut filesystem.
    let ruled: BTreeSet<&str> = rules().iter().map(|r| r.krate).collect();
    let unruled: Vec<&String> = graph
        .keys()
        .filter(|k| !ruled.contains(k.as_str()) && *k != "slipway" && *k != "slipway-powercut")
        .collect();
    assert!(
        unruled.is_empty(),
        "no crate-graph rule for {unruled:?}: add one from docs/ARCHITECTURE.md"
    );
}
