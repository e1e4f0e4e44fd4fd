//! deploy/iam-policy.json parses, and grants every action the backend calls, each scoped, and
//! what Session Manager needs (operators have no other way onto a server: no key pair, no SSH).

use std::collections::BTreeSet;
use std::path::PathBuf;

/// Every AWS action slipway-aws calls (keep in step with the code; docs/aws.md explains each).
const CALLED: &[&str] = &[
    "ec2:DescribeInstances",
    "ec2:DescribeInstanceTypes",
    "ec2:DescribeVolumes",
    "ec2:DescribeSnapshots",
    "ec2:CreateVolume",
    "ec2:CreateTags",
    "ec2:AttachVolume",
    "ec2:DetachVolume",
    "ec2:CreateSnapshot",
    "ec2:CreateSnapshots",
    "ec2:DeleteSnapshot",
    "ebs:ListSnapshotBlocks",
    "ebs:GetSnapshotBlock",
    "ebs:ListChangedBlocks",
];

/// What the SSM agent needs for Session Manager (the session part of
/// AmazonSSMManagedInstanceCore): register the instance, open the session channels, and the
/// message service older agents poll. None of them takes a resource or condition key that
/// would narrow it to this instance.
const SESSION_MANAGER: &[&str] = &[
    "ssm:UpdateInstanceInformation",
    "ssmmessages:CreateControlChannel",
    "ssmmessages:CreateDataChannel",
    "ssmmessages:OpenControlChannel",
    "ssmmessages:OpenDataChannel",
    "ec2messages:AcknowledgeMessage",
    "ec2messages:DeleteMessage",
    "ec2messages:FailMessage",
    "ec2messages:GetEndpoint",
    "ec2messages:GetMessages",
    "ec2messages:SendReply",
];

fn policy() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/iam-policy.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    match v {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().to_string()).collect(),
        other => panic!("expected a string or a list: {other}"),
    }
}

#[test]
fn iam_policy_is_valid_and_least_privilege() {
    let p = policy();
    assert_eq!(p["Version"], "2012-10-17");
    let statements = p["Statement"].as_array().unwrap();
    let mut granted = BTreeSet::new();
    let mut sids = BTreeSet::new();
    for s in statements {
        let sid = s["Sid"].as_str().expect("every statement has a Sid");
        assert!(sids.insert(sid.to_string()), "duplicate Sid {sid}");
        assert_eq!(s["Effect"], "Allow", "{sid}");
        let actions = strings(&s["Action"]);
        let resources = strings(&s["Resource"]);
        for a in &actions {
            assert!(!a.contains('*'), "{sid}: wildcard action {a}");
            granted.insert(a.clone());
        }
        // Only the Describe calls, which EC2 cannot scope to resources, get "*" — and they
        // are read-only. Everything else names resource types and carries a condition.
        if resources == ["*"] {
            assert!(
                actions.iter().all(|a| a.starts_with("ec2:Describe"))
                    || actions
                        .iter()
                        .all(|a| SESSION_MANAGER.contains(&a.as_str())),
                "{sid}"
            );
        } else {
            assert!(s["Condition"].is_object(), "{sid} has no condition");
        }
    }
    for a in CALLED {
        assert!(granted.contains(*a), "{a} is called but not granted");
    }
    for a in SESSION_MANAGER {
        assert!(
            granted.contains(*a),
            "{a} is not granted: operators could not open a Session Manager shell"
        );
    }
    for a in &granted {
        assert!(
            CALLED.contains(&a.as_str())
                || SESSION_MANAGER.contains(&a.as_str())
                || a.starts_with("kms:"),
            "{a} is granted but never called"
        );
    }
}

/// The statements that let the server attach its identity volume and tag its own instance
/// with its fingerprint: granted, and only that.
#[test]
fn iam_policy_lets_the_server_attach_its_identity_volume_and_publish_its_fingerprint() {
    let p = policy();
    let statements = p["Statement"].as_array().unwrap();
    let find = |sid: &str| {
        statements
            .iter()
            .find(|s| s["Sid"] == sid)
            .unwrap_or_else(|| panic!("no statement {sid}"))
    };
    let attach = find("AttachDetachReplicaVolumes");
    let roles = strings(&attach["Condition"]["StringEquals"]["aws:ResourceTag/slipway:role"]);
    assert!(roles.contains(&"identity".to_string()), "{roles:?}");
    let tag = find("PublishTlsFingerprintOnReplicationServers");
    assert_eq!(strings(&tag["Action"]), ["ec2:CreateTags"]);
    assert_eq!(strings(&tag["Resource"]), ["arn:aws:ec2:*:*:instance/*"]);
    assert_eq!(
        strings(&tag["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"]),
        [slipway_aws::tags::TLS_FINGERPRINT]
    );
    assert_eq!(
        tag["Condition"]["StringEquals"]["aws:ResourceTag/slipway:role"],
        "replication-server"
    );
}

/// Every `.rs` file under `dir`, however deep.
fn rust_files(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().and_then(|x| x.to_str()) == Some("rs") {
            out.push(path);
        }
    }
}

/// The AWS operations slipway-aws's sources call on an EC2 or EBS client — a field or a
/// local named `ec2` or `ebs` (`self.ec2.op()`, `ec2.op()`, across line breaks) — as
/// `service:PascalCaseOp`. Methods of the client that are no API call are left out.
fn operations_called_in_sources() -> BTreeSet<String> {
    const NOT_OPERATIONS: &[&str] = &["clone", "config", "as_ref"];
    let mut files = Vec::new();
    rust_files(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut found = BTreeSet::new();
    for path in files {
        // Comments out, whitespace out: `self.ec2\n    .describe_volumes()` becomes
        // `self.ec2.describe_volumes()`.
        let code: String = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<String>()
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        for (client, service) in [("ec2.", "ec2"), ("ebs.", "ebs")] {
            for (at, _) in code.match_indices(client) {
                // `ec2` as a name of its own, not the end of a longer one (`aws_sdk_ec2.`).
                let before = code[..at].chars().next_back();
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                    continue;
                }
                let rest = &code[at + client.len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name.is_empty()
                    || !rest[name.len()..].starts_with("()")
                    || NOT_OPERATIONS.contains(&name.as_str())
                {
                    continue;
                }
                let pascal: String = name
                    .split('_')
                    .map(|w| {
                        let mut c = w.chars();
                        c.next()
                            .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                            .unwrap_or_default()
                    })
                    .collect();
                found.insert(format!("{service}:{pascal}"));
            }
        }
    }
    found
}

/// The server's crate calls only what the server's policy grants. This is what keeps the
/// operator's EC2 calls (RunInstances, TerminateInstances, RegisterImage, DeregisterImage,
/// ModifyInstanceAttribute, …: crates/fleet) out of slipway-aws (docs/decisions.md): moved
/// here, they would fail this test, because the replication server must never make them.
#[test]
fn the_backend_calls_only_what_the_servers_policy_grants() {
    let called = operations_called_in_sources();
    assert!(
        called.contains("ec2:CreateSnapshots") && called.contains("ebs:GetSnapshotBlock"),
        "the source scan found too little: {called:?}"
    );
    let listed: BTreeSet<String> = CALLED.iter().map(|s| s.to_string()).collect();
    let unlisted: Vec<&String> = called.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "slipway-aws calls {unlisted:?}, which CALLED (and so the server's IAM policy) does not list"
    );
    let granted: BTreeSet<String> = policy()["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["Effect"] == "Allow")
        .flat_map(|s| strings(&s["Action"]))
        .collect();
    let ungranted: Vec<&String> = called.difference(&granted).collect();
    assert!(
        ungranted.is_empty(),
        "slipway-aws calls {ungranted:?}, which deploy/iam-policy.json does not grant"
    );
}
