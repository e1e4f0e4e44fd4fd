//! deploy/: the CloudFormation template (cfn-lint, and its IAM policy identical to
//! deploy/iam-policy.json), the Prometheus configuration and rules (promtool), the Grafana
//! dashboard (a schema check of our own: structure, layout, and every metric it queries is one
//! the server exports). A missing validator fails the test: .ci/run installs them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Runs a validator; a missing one fails with where to get it.
fn validator(tool: &str, args: &[&str], install: &str) -> (bool, String) {
    let exe = std::env::var(format!(
        "SLIPWAY_{}",
        tool.to_ascii_uppercase().replace('-', "_")
    ))
    .unwrap_or_else(|_| tool.to_string());
    let out = Command::new(&exe)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{tool} cannot run ({e}): .ci/run installs it ({install}); or set SLIPWAY_{}",
                tool.to_ascii_uppercase().replace('-', "_")
            )
        });
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn cloudformation_template_passes_cfn_lint() {
    let (ok, out) = validator(
        "cfn-lint",
        &["deploy/cloudformation.yaml"],
        "pip install cfn-lint into a venv on PATH",
    );
    assert!(ok, "cfn-lint deploy/cloudformation.yaml:\n{out}");
}

#[test]
fn cloudformation_policy_is_deploy_iam_policy_and_ports_are_open() {
    let cfn = read("deploy/cloudformation.yaml");
    // The policy is embedded as JSON under `PolicyDocument:` up to the next key of the role.
    let mut lines = cfn.lines().skip_while(|l| l.trim() != "PolicyDocument:");
    lines.next().expect("a PolicyDocument");
    let json: String = lines
        .take_while(|l| l.starts_with("            ") || l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    let embedded: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}\n{json}"));
    let policy: Value = serde_json::from_str(&read("deploy/iam-policy.json")).unwrap();
    assert_eq!(
        embedded, policy,
        "deploy/cloudformation.yaml's policy differs from deploy/iam-policy.json"
    );

    for (proto, port) in [("udp", 1500), ("tcp", 1500), ("tcp", 9500)] {
        let rule =
            format!("IpProtocol: {proto}\n          FromPort: {port}\n          ToPort: {port}");
        assert!(cfn.contains(&rule), "no {proto}/{port} ingress rule");
    }
    assert!(cfn.contains("HttpTokens: required"));
    assert!(cfn.contains("Value: replication-server"));
}

#[test]
fn prometheus_config_and_rules_pass_promtool() {
    let (ok, out) = validator(
        "promtool",
        &["check", "config", "deploy/prometheus.yml"],
        "apt-get install prometheus",
    );
    assert!(ok, "promtool check config:\n{out}");
    assert!(out.contains("1 rule files found"), "{out}");
    let cfg = read("deploy/prometheus.yml");
    assert!(cfg.contains("ec2_sd_configs:"));
    assert!(cfg.contains("- name: tag:slipway:role\n            values: [replication-server]"));
    let port = slipway_fleet::template::DEFAULT_METRICS_LISTEN
        .rsplit(':')
        .next()
        .unwrap();
    assert!(cfg.contains(&format!("port: {port}")));
    // The rules query only metrics the server exports.
    check_metrics(
        "deploy/prometheus-rules.yml",
        &read("deploy/prometheus-rules.yml"),
    );
}

/// The alert rules evaluated by `promtool test rules` on made-up series: the attachment-slot
/// alert fires for the server one slot short of its limit only, and a stalled disk alerts
/// after its `for`.
#[test]
fn alert_rules_fire_on_the_series_they_are_meant_for() {
    let d = tempfile::tempdir().unwrap();
    let rules = repo().join("deploy/prometheus-rules.yml");
    let test = d.path().join("rules-test.yml");
    std::fs::write(
        &test,
        format!(
            r#"rule_files:
  - {rules}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'slipway_ebs_attachment_slots{{instance="a:9500",kind="used"}}'
        values: '26x10'
      - series: 'slipway_ebs_attachment_slots{{instance="a:9500",kind="limit"}}'
        values: '27x10'
      - series: 'slipway_ebs_attachment_slots{{instance="b:9500",kind="used"}}'
        values: '3x10'
      - series: 'slipway_ebs_attachment_slots{{instance="b:9500",kind="limit"}}'
        values: '27x10'
      - series: 'slipway_disk_state{{source="web",disk="d0",state="stalled"}}'
        values: '0 0 1x10'
    alert_rule_test:
      - eval_time: 10m
        alertname: SlipwayAttachmentSlotsNearlyFull
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "a:9500"}}
            exp_annotations:
              summary: "a:9500 has at most one EBS attachment slot left: the next source disk cannot be attached here (add a server or lower max_disks_per_server)"
      - eval_time: 4m
        alertname: SlipwayDiskStalled
        exp_alerts: []
      - eval_time: 8m
        alertname: SlipwayDiskStalled
        exp_alerts:
          - exp_labels: {{severity: warning, source: web, disk: d0, state: stalled}}
            exp_annotations:
              summary: "web/d0 is stalled (see slipway status)"
"#,
            rules = rules.display()
        ),
    )
    .unwrap();
    let (ok, out) = validator(
        "promtool",
        &["test", "rules", test.to_str().unwrap()],
        "apt-get install prometheus",
    );
    assert!(ok, "promtool test rules:\n{out}");
}

/// The restore-point and AWS alerts on made-up series: two failed restore points of one
/// source in 30 minutes alert, one (retried at the next tick) does not; a server with 9% of
/// its AWS requests throttled for 10 minutes alerts, one with under 1% does not; a server
/// making two describe calls a second for half an hour is over its budget, one making one is
/// not.
#[test]
fn restore_point_and_aws_alerts_fire_on_the_series_they_are_meant_for() {
    let d = tempfile::tempdir().unwrap();
    let rules = repo().join("deploy/prometheus-rules.yml");
    let test = d.path().join("rules-test.yml");
    std::fs::write(
        &test,
        format!(
            r#"rule_files:
  - {rules}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'slipway_restore_points_failed_total{{instance="a:9500",source="web"}}'
        values: '0x20 1x5 2x40'
      - series: 'slipway_restore_points_failed_total{{instance="a:9500",source="db"}}'
        values: '0x20 1x45'
      - series: 'slipway_aws_requests_total{{instance="a:9500",op="DescribeSnapshots",outcome="ok"}}'
        values: '0+60x60'
      - series: 'slipway_aws_requests_total{{instance="a:9500",op="CreateSnapshots",outcome="throttled"}}'
        values: '0x20 0+6x40'
      - series: 'slipway_aws_requests_total{{instance="b:9500",op="DescribeSnapshots",outcome="ok"}}'
        values: '0+120x60'
      - series: 'slipway_aws_requests_total{{instance="b:9500",op="DescribeSnapshots",outcome="throttled"}}'
        values: '0+1x60'
    alert_rule_test:
      - eval_time: 40m
        alertname: SlipwayRestorePointsFailing
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "a:9500", source: web}}
            exp_annotations:
              summary: "2 restore points of web failed on a:9500 in the last 30 minutes"
      - eval_time: 25m
        alertname: SlipwayAwsThrottled
        exp_alerts: []
      - eval_time: 40m
        alertname: SlipwayAwsThrottled
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "a:9500"}}
            exp_annotations:
              summary: "9.091% of a:9500's AWS API requests are throttled (RequestLimitExceeded): the account's request budget is exhausted"
      - eval_time: 60m
        alertname: SlipwayAwsDescribeBudget
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "b:9500"}}
            exp_annotations:
              summary: "b:9500 makes 2.017 AWS describe calls per second (budget: 1)"
"#,
            rules = rules.display()
        ),
    )
    .unwrap();
    let (ok, out) = validator(
        "promtool",
        &["test", "rules", test.to_str().unwrap()],
        "apt-get install prometheus",
    );
    assert!(ok, "promtool test rules:\n{out}");
}

/// Metric names a text mentions (`slipway_…`).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("slipway_") {
        let start = i + at;
        let mut end = start;
        while end < b.len()
            && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'_')
        {
            end += 1;
        }
        out.insert(text[start..end].to_string());
        i = end;
    }
    out
}

/// Every metric `text` queries is defined in crates/server/src/metrics.rs or, for the AWS
/// API metrics the server registers from its backend, crates/aws/src/metrics.rs.
fn check_metrics(what: &str, text: &str) -> BTreeSet<String> {
    let defined = read("crates/server/src/metrics.rs") + &read("crates/aws/src/metrics.rs");
    let names = metric_names(text);
    for n in &names {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| n.strip_suffix(s))
            .unwrap_or(n);
        assert!(
            defined.contains(&format!("\"{base}\"")),
            "{what} queries {n}, which the server does not export"
        );
    }
    names
}

#[test]
fn grafana_dashboard_matches_its_schema_and_the_servers_metrics() {
    let text = read("deploy/grafana-dashboard.json");
    let d: Value = serde_json::from_str(&text).expect("valid JSON");
    let s = |v: &Value, k: &str| -> String {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("missing string `{k}` in {v}"))
            .to_string()
    };
    assert!(!s(&d, "title").is_empty());
    assert!(!s(&d, "uid").is_empty() && s(&d, "uid").len() <= 40);
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 30));
    let vars: BTreeSet<String> = d["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| s(v, "name"))
        .collect();
    let panels = d["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let mut ids = BTreeSet::new();
    let mut cells: BTreeSet<(u64, u64)> = BTreeSet::new();
    let mut exprs = String::new();
    for p in panels {
        let title = s(p, "title");
        assert!(
            ids.insert(p["id"].as_u64().expect("numeric panel id")),
            "duplicate id in {title}"
        );
        assert!(
            [
                "timeseries",
                "stat",
                "gauge",
                "table",
                "heatmap",
                "bargauge"
            ]
            .contains(&s(p, "type").as_str()),
            "{title}: panel type"
        );
        let g = &p["gridPos"];
        let n = |k: &str| {
            g[k].as_u64()
                .unwrap_or_else(|| panic!("{title}: gridPos.{k}"))
        };
        let (x, y, w, h) = (n("x"), n("y"), n("w"), n("h"));
        assert!(
            w >= 1 && h >= 1 && x + w <= 24,
            "{title}: gridPos outside the 24-column grid"
        );
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(
                    cells.insert((cx, cy)),
                    "{title} overlaps another panel at ({cx},{cy})"
                );
            }
        }
        assert!(p.get("datasource").is_some(), "{title}: datasource");
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: targets"));
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            s(t, "refId");
            let e = s(t, "expr");
            for var in e.split('$').skip(1) {
                let name: String = var
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    name.starts_with("__") || vars.contains(&name),
                    "{title}: ${name} is not a dashboard variable"
                );
            }
            exprs.push_str(&e);
            exprs.push('\n');
        }
    }
    let used = check_metrics("deploy/grafana-dashboard.json", &exprs);
    for m in [
        "slipway_disk_durable_bytes_total",
        "slipway_disk_backlog_bytes",
        "slipway_disk_lag_seconds",
        "slipway_ack_latency_seconds_bucket",
        "slipway_restore_point_newest_age_seconds",
    ] {
        assert!(used.contains(m), "the dashboard does not chart {m}");
    }
}
