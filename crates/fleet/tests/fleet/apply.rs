//! `apply` against the emulator.

use aws_sdk_ec2::types::InstanceAttributeName;
use slipway_fleet::{Action, ApplyOptions};

use std::sync::Arc;

use crate::support::{tags_of, Env, FakeProbe};

const APPLY: ApplyOptions = ApplyOptions { dry_run: false };
const DRY: ApplyOptions = ApplyOptions { dry_run: true };

async fn user_data(env: &Env, id: &str) -> String {
    let out = env
        .ec2
        .describe_instance_attribute()
        .instance_id(id)
        .attribute(InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let b64 = out.user_data().and_then(|u| u.value()).unwrap_or_default();
    String::from_utf8(aws_smithy_types::base64::decode(b64).unwrap()).unwrap()
}

fn live(instances: &[aws_sdk_ec2::types::Instance]) -> Vec<&aws_sdk_ec2::types::Instance> {
    instances
        .iter()
        .filter(|i| i.state().and_then(|s| s.name()).map(|n| n.as_str()) != Some("terminated"))
        .collect()
}

#[tokio::test]
async fn apply_launches_the_server_with_type_tags_and_user_data_and_a_second_apply_is_a_noop() {
    let env = Env::start().await;
    let t = env.template(3, "");

    // --dry-run plans, changes nothing.
    let plan = env.fleet.apply(&t, &DRY).await.unwrap();
    assert!(plan.dry_run);
    assert_eq!(
        plan.actions,
        [Action::Launch {
            index: 0,
            instance_type: "m5.large".into(),
            sources: vec!["src-00".into(), "src-01".into(), "src-02".into()],
        }]
    );
    assert!(env.instances().await.is_empty());
    let printed = plan.to_string();
    assert!(
        printed.contains("launch server 0 (m5.large) for src-00, src-01, src-02"),
        "{printed}"
    );

    let r = env.fleet.apply(&t, &APPLY).await.unwrap();
    assert!(r.changed());
    let all = env.instances().await;
    assert_eq!(all.len(), 1);
    let i = &all[0];
    assert_eq!(i.instance_type().unwrap().as_str(), "m5.large");
    assert_eq!(i.image_id(), Some("ami-12345678"));
    assert_eq!(i.subnet_id(), Some(env.subnet.as_str()));
    assert_eq!(i.state().unwrap().name().unwrap().as_str(), "running");
    let tags = tags_of(i);
    assert_eq!(tags["slipway:template"], "wave1");
    assert_eq!(tags["slipway:server-index"], "0");
    assert_eq!(tags["slipway:role"], "replication-server");
    assert_eq!(tags["slipway:server"], "wave1-0");
    assert_eq!(tags["slipway:sources.0"], "src-00=1,src-01=1,src-02=1");
    assert_eq!(tags["Project"], "exit");
    assert_eq!(tags["slipway:settings-sha256"], t.settings_hash(0));
    // Its identity volume (the data dir: TLS identity, token secret, disk metadata): small,
    // encrypted, tagged as server 0's, attached to it.
    let idv = env.identity_volumes().await;
    assert_eq!(idv.len(), 1, "{idv:?}");
    let v = &idv[0];
    let vtags = crate::support::aws_support::tag_map(v.tags());
    assert_eq!(vtags["slipway:role"], "identity");
    assert_eq!(vtags["slipway:template"], "wave1");
    assert_eq!(vtags["slipway:server-index"], "0");
    assert_eq!(vtags["slipway:server"], "wave1-0");
    assert_eq!(vtags["Project"], "exit");
    assert_eq!(v.encrypted(), Some(true));
    assert_eq!(v.size(), Some(1));
    assert_eq!(v.volume_type().unwrap().as_str(), "gp3");
    assert_eq!(v.availability_zone(), Some(crate::support::ZONE));
    assert_eq!(
        env.attachments(v.volume_id().unwrap()).await,
        [(i.instance_id().unwrap().to_string(), "attached".to_string())]
    );
    let ud = user_data(&env, i.instance_id().unwrap()).await;
    assert_eq!(ud, t.server_settings(0));
    assert!(ud.contains("backend = \"aws\""), "{ud}");
    assert!(ud.contains("server_tag = \"wave1-0\""), "{ud}");

    // Where agents connect: the private IP, port 1500, for every source.
    let ip = i.private_ip_address().unwrap();
    assert_eq!(r.agents.len(), 3);
    for (src, index, addr) in &r.agents {
        assert_eq!(*index, 0, "{src}");
        assert_eq!(addr.as_deref(), Some(format!("{ip}:1500").as_str()));
    }
    assert!(r.to_string().contains(&format!("{ip}:1500")), "{r}");

    // Idempotent.
    let again = env.fleet.apply(&t, &APPLY).await.unwrap();
    assert!(!again.changed(), "{again}");
    assert!(again.to_string().contains("no changes"), "{again}");
    assert_eq!(env.instances().await.len(), 1);
    assert_eq!(env.identity_volumes().await.len(), 1);
}

/// The user data as EC2 documents it on the wire: RunInstances' `UserData` and
/// ModifyInstanceAttribute's `UserData.Value` are both the base64 of the settings file,
/// encoded once. (moto decodes the blob by its model and accepts a doubly encoded value, so
/// the request itself is checked.)
#[tokio::test]
async fn user_data_on_the_wire_is_the_settings_base64_encoded_once() {
    let env = Env::start().await;
    let cap = &env.capture;
    let decode = |v: &str| {
        let bytes = aws_smithy_types::base64::decode(v)
            .unwrap_or_else(|e| panic!("user data on the wire is not base64 ({e}): {v}"));
        String::from_utf8(bytes).unwrap()
    };
    let param = |call: &[(String, String)], key: &str| {
        call.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {key} in {call:?}"))
    };

    let t = env.template(1, "");
    env.fleet.apply(&t, &APPLY).await.unwrap();
    let runs = cap.calls("RunInstances");
    assert_eq!(runs.len(), 1, "{:?}", cap.actions());
    assert_eq!(decode(&param(&runs[0], "UserData")), t.server_settings(0));

    let t2 = env.template(1, "bandwidth_mbps = 300");
    let r = env.fleet.apply(&t2, &APPLY).await.unwrap();
    assert!(
        matches!(r.actions[..], [Action::InPlace { settings: true, .. }]),
        "{r}"
    );
    let mods: Vec<_> = cap
        .calls("ModifyInstanceAttribute")
        .into_iter()
        .filter(|c| c.iter().any(|(k, _)| k == "UserData.Value"))
        .collect();
    assert_eq!(mods.len(), 1, "{:?}", cap.actions());
    assert_eq!(
        decode(&param(&mods[0], "UserData.Value")),
        t2.server_settings(0),
        "ModifyInstanceAttribute must carry base64(settings), not base64(base64(settings))"
    );
}

/// A server that did not apply its user data (it kept its old settings) is found by what it
/// reports, although its tag claims the new settings, and is updated again.
#[tokio::test]
async fn drift_is_judged_by_the_settings_the_server_reports_not_only_its_tag() {
    let mut env = Env::start().await;
    let t = env.template(1, "");
    env.fleet.apply(&t, &APPLY).await.unwrap();
    let id = env.instances().await[0].instance_id().unwrap().to_string();
    // By the tag alone, nothing to do.
    assert!(!env.fleet.apply(&t, &DRY).await.unwrap().changed());

    let probe = Arc::new(FakeProbe::default());
    env.fleet.settings_probe = Some(probe.clone());
    // No answer from the server: the tag decides, and the report says so.
    let r = env.fleet.apply(&t, &DRY).await.unwrap();
    assert!(!r.changed(), "{r}");
    assert!(
        r.to_string()
            .contains("judged by its slipway:settings-sha256 tag only"),
        "{r}"
    );

    // The server runs with other settings than the tag claims: update it in place.
    probe
        .running
        .lock()
        .unwrap()
        .insert(id.clone(), "00000000deadbeef".into());
    let r = env.fleet.apply(&t, &APPLY).await.unwrap();
    assert_eq!(
        r.actions,
        [Action::InPlace {
            index: 0,
            instance_id: id.clone(),
            instance_type: None,
            settings: true,
        }]
    );
    assert_eq!(user_data(&env, &id).await, t.server_settings(0));
    // Once it reports the template's settings, nothing more to do.
    probe
        .running
        .lock()
        .unwrap()
        .insert(id.clone(), t.settings_hash(0));
    let r = env.fleet.apply(&t, &APPLY).await.unwrap();
    assert!(!r.changed(), "{r}");
}

/// The default probe reads `slipway_settings_info` from the server's metrics endpoint.
#[tokio::test]
async fn the_metrics_probe_reads_the_fingerprint_a_server_exposes() {
    use slipway_fleet::SettingsProbe;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::start().await;
    let mut t = env.template(1, "");
    env.fleet.apply(&t, &APPLY).await.unwrap();
    let mut s = env.fleet.servers(&t).await.unwrap().remove(0);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    t.metrics_port = listener.local_addr().unwrap().port();
    s.private_ip = Some("127.0.0.1".into());
    let page = "# TYPE slipway_settings_info gauge\nslipway_settings_info{sha256=\"0011223344556677\"} 1\n";
    let server = tokio::spawn(async move {
        let (mut c, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let n = c.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /metrics "));
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
            page.len()
        );
        c.write_all(resp.as_bytes()).await.unwrap();
    });
    let probe = slipway_fleet::MetricsProbe::default();
    assert_eq!(
        probe.running_settings(&t, &s).await.as_deref(),
        Some("0011223344556677")
    );
    server.await.unwrap();
}

#[tokio::test]
async fn changing_the_instance_type_switches_in_place_and_the_volumes_stay_attached() {
    let env = Env::start().await;
    let t = env.template(2, "");
    env.fleet.apply(&t, &APPLY).await.unwrap();
    let server = env.instances().await[0].clone();
    let id = server.instance_id().unwrap().to_string();
    let ip = server.private_ip_address().unwrap().to_string();
    let v1 = env
        .replica_on("src-00", "disk0", "wave1-0", &id, "/dev/sdg")
        .await;
    let v2 = env
        .replica_on("src-01", "disk0", "wave1-0", &id, "/dev/sdh")
        .await;

    let t2 = env.template_with(2, "m5.xlarge", "ami-12345678", "");
    let plan = env.fleet.apply(&t2, &DRY).await.unwrap();
    assert_eq!(
        plan.actions,
        [Action::InPlace {
            index: 0,
            instance_id: id.clone(),
            instance_type: Some(("m5.large".into(), "m5.xlarge".into())),
            settings: false,
        }]
    );
    let r = env.fleet.apply(&t2, &APPLY).await.unwrap();
    assert_eq!(r.actions, plan.actions);

    let after = env.instances().await;
    assert_eq!(after.len(), 1, "same instance, no replacement");
    let i = &after[0];
    assert_eq!(i.instance_id(), Some(id.as_str()));
    assert_eq!(i.instance_type().unwrap().as_str(), "m5.xlarge");
    assert_eq!(i.state().unwrap().name().unwrap().as_str(), "running");
    assert_eq!(i.private_ip_address(), Some(ip.as_str()));
    for v in [&v1, &v2] {
        assert_eq!(
            env.attachments(v).await,
            [(id.clone(), "attached".to_string())],
            "{v}"
        );
    }
    assert_eq!(
        r.agents[0].2.as_deref(),
        Some(format!("{ip}:1500").as_str())
    );
    assert!(!env.fleet.apply(&t2, &APPLY).await.unwrap().changed());

    // A settings change goes the same way (stop, new user data, start).
    let t3 = env.template_with(2, "m5.xlarge", "ami-12345678", "bandwidth_mbps = 300");
    let r = env.fleet.apply(&t3, &APPLY).await.unwrap();
    assert!(
        matches!(
            r.actions[..],
            [Action::InPlace {
                settings: true,
                instance_type: None,
                ..
            }]
        ),
        "{r}"
    );
    assert_eq!(user_data(&env, &id).await, t3.server_settings(0));
    assert!(!env.fleet.apply(&t3, &APPLY).await.unwrap().changed());
}

#[tokio::test]
async fn a_changed_ami_replaces_the_server_and_moves_its_volumes() {
    let env = Env::start().await;
    let t = env.template(1, "");
    env.fleet.apply(&t, &APPLY).await.unwrap();
    let old = env.instances().await[0].clone();
    let old_id = old.instance_id().unwrap().to_string();
    // At /dev/sdf, the first name: a replica of a server from before identity volumes has
    // it, and the replacement reattaches it there (the identity volume must not take it).
    let v = env
        .replica_on("src-00", "disk0", "wave1-0", &old_id, "/dev/sdf")
        .await;
    let (identity, on) = env.identity_of(0).await;
    assert_eq!(on.as_deref(), Some(old_id.as_str()));

    let t2 = env.template_with(1, "m5.large", "ami-87654321", "");
    let r = env.fleet.apply(&t2, &APPLY).await.unwrap();
    assert!(
        matches!(&r.actions[..], [Action::Replace { index: 0, .. }]),
        "{r}"
    );
    let all = env.instances().await;
    let running = live(&all);
    assert_eq!(running.len(), 1);
    let new = running[0];
    assert_ne!(new.instance_id(), Some(old_id.as_str()));
    assert_eq!(new.image_id(), Some("ami-87654321"));
    assert_eq!(tags_of(new)["slipway:server-index"], "0");
    assert_eq!(tags_of(new)["slipway:sources.0"], "src-00=1");
    let new_id = new.instance_id().unwrap().to_string();
    assert_eq!(
        env.attachments(&v).await,
        [(new_id.clone(), "attached".to_string())]
    );
    // The server's identity follows it: the same identity volume, now on the new instance
    // (and no second one).
    assert_eq!(
        env.identity_of(0).await,
        (identity.clone(), Some(new_id.clone())),
        "the replacement must get the old server's identity volume"
    );
    assert_eq!(
        env.attachments(&identity).await,
        [(new_id, "attached".to_string())]
    );
    // The private IP is reused where EC2 frees it in time (moto never does): else the report
    // says where the agents must go now.
    if new.private_ip_address() != old.private_ip_address() {
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("server 0 has a new address") && w.contains("src-00")),
            "{r}"
        );
    }
    assert!(!env.fleet.apply(&t2, &APPLY).await.unwrap().changed());
}

#[tokio::test]
async fn forty_sources_need_three_servers_and_a_41st_fills_one_first() {
    let env = Env::start().await;
    let t = env.template(40, "max_disks_per_server = 15");
    let r = env.fleet.apply(&t, &APPLY).await.unwrap();
    let launches = r
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Launch { .. }))
        .count();
    assert_eq!(launches, 3, "{r}");
    let disks: Vec<u32> = r.servers.iter().map(|s| s.disks).collect();
    assert_eq!(disks, [15, 15, 10]);
    assert_eq!(env.instances().await.len(), 3);
    // Every source has an address, the one of its server.
    assert_eq!(r.agents.len(), 40);
    assert!(r
        .agents
        .iter()
        .all(|(_, _, a)| a.as_ref().is_some_and(|a| a.ends_with(":1500"))));

    let t41 = env.template(41, "max_disks_per_server = 15");
    let r = env.fleet.apply(&t41, &APPLY).await.unwrap();
    assert_eq!(
        r.actions,
        [Action::Assign {
            index: 2,
            added: vec!["src-40".into()],
            removed: vec![],
        }],
        "{r}"
    );
    assert_eq!(env.instances().await.len(), 3, "no new server");
    let disks: Vec<u32> = r.servers.iter().map(|s| s.disks).collect();
    assert_eq!(disks, [15, 15, 11]);
    let server2 = env
        .instances()
        .await
        .into_iter()
        .find(|i| tags_of(i)["slipway:server-index"] == "2")
        .unwrap();
    assert!(tags_of(&server2)["slipway:sources.0"].ends_with("src-39=1,src-40=1"));
    assert!(!env.fleet.apply(&t41, &APPLY).await.unwrap().changed());

    // Dropping the last 26 sources empties server 2 and most of 1: 2 retires, 1 shrinks.
    let t15 = env.template(15, "max_disks_per_server = 15");
    let r = env.fleet.apply(&t15, &APPLY).await.unwrap();
    assert!(
        r.actions
            .iter()
            .any(|a| matches!(a, Action::Retire { index: 2, .. })),
        "{r}"
    );
    assert!(
        r.actions
            .iter()
            .any(|a| matches!(a, Action::Retire { index: 1, .. })),
        "{r}"
    );
    assert_eq!(live(&env.instances().await).len(), 1);
}

#[tokio::test]
async fn changed_user_tags_are_synced_live_and_a_stopped_server_is_started() {
    let env = Env::start().await;
    let t = env.template(2, "");
    env.fleet.apply(&t, &APPLY).await.unwrap();
    let id = env.instances().await[0].instance_id().unwrap().to_string();
    // The fingerprint tag the server sets on its own instance at start: apply neither
    // compares it (no drift) nor removes it, through any of the tag syncs below.
    let fp = "ab".repeat(32);
    env.ec2
        .create_tags()
        .resources(&id)
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("slipway:tls-fingerprint")
                .value(&fp)
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(!env.fleet.apply(&t, &APPLY).await.unwrap().changed());
    let fingerprint_kept = |tags: &std::collections::BTreeMap<String, String>| {
        assert_eq!(
            tags.get("slipway:tls-fingerprint"),
            Some(&fp),
            "apply removed the server's own tag: {tags:?}"
        )
    };

    // User tags are part of the server's settings (its volumes and snapshots carry them), so a
    // change goes in place; the instance's tags follow, the sources stay recorded.
    let t2 = env.template_full(2, "m5.large", "ami-12345678", "", "Owner = \"ops\"");
    let r = env.fleet.apply(&t2, &APPLY).await.unwrap();
    assert!(
        matches!(
            r.actions[..],
            [Action::InPlace {
                settings: true,
                instance_type: None,
                ..
            }]
        ),
        "{r}"
    );
    let tags = tags_of(&env.instances().await[0]);
    assert_eq!(tags.get("Owner").map(String::as_str), Some("ops"));
    assert!(!tags.contains_key("Project"), "{tags:?}");
    assert_eq!(tags["slipway:sources.0"], "src-00=1,src-01=1");
    fingerprint_kept(&tags);
    assert!(!env.fleet.apply(&t2, &APPLY).await.unwrap().changed());

    // A tag edited by hand is put back live, without a restart.
    env.ec2
        .create_tags()
        .resources(&id)
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("Owner")
                .value("me")
                .build(),
        )
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("Extra")
                .value("x")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let r = env.fleet.apply(&t2, &APPLY).await.unwrap();
    assert_eq!(r.actions, [Action::Tags { index: 0 }], "{r}");
    let tags = tags_of(&env.instances().await[0]);
    assert_eq!(tags["Owner"], "ops");
    assert!(!tags.contains_key("Extra"));
    assert_eq!(tags["slipway:sources.0"], "src-00=1,src-01=1");
    fingerprint_kept(&tags);
    assert!(!env.fleet.apply(&t2, &APPLY).await.unwrap().changed());

    // Someone stopped the server: apply starts it.
    env.ec2
        .stop_instances()
        .instance_ids(&id)
        .send()
        .await
        .unwrap();
    let r = env.fleet.apply(&t2, &APPLY).await.unwrap();
    assert_eq!(
        r.actions,
        [Action::Start {
            index: 0,
            instance_id: id.clone()
        }]
    );
    assert_eq!(r.servers[0].state, "running");
    assert!(!env.fleet.apply(&t2, &APPLY).await.unwrap().changed());
}

#[tokio::test]
async fn a_source_that_outgrows_its_server_moves_with_its_volumes() {
    let mut env = Env::start().await;
    let t = env.template(15, "");
    env.fleet.apply(&t, &APPLY).await.unwrap();
    let s0 = env.instances().await[0].instance_id().unwrap().to_string();
    let v = env
        .replica_on("src-03", "disk0", "wave1-0", &s0, "/dev/sdg")
        .await;
    let other = env
        .replica_on("src-04", "disk0", "wave1-0", &s0, "/dev/sdh")
        .await;

    // src-03 now has 4 disks: server 0 would hold 18, so src-03 (and only it) moves.
    env.disks.insert("src-03".into(), 4);
    let t2 = env.template(15, "");
    let r = env.fleet.apply(&t2, &APPLY).await.unwrap();
    assert!(
        r.actions.contains(&Action::Move {
            source: "src-03".into(),
            from: 0,
            to: 1
        }),
        "{r}"
    );
    let all = env.instances().await;
    assert_eq!(all.len(), 2);
    let s1 = all
        .iter()
        .find(|i| tags_of(i)["slipway:server-index"] == "1")
        .unwrap();
    let s1_id = s1.instance_id().unwrap().to_string();
    assert_eq!(tags_of(s1)["slipway:sources.0"], "src-03=4");
    assert_eq!(env.attachments(&v).await, [(s1_id, "attached".to_string())]);
    assert_eq!(
        env.attachments(&other).await,
        [(s0.clone(), "attached".to_string())]
    );
    let vol = env
        .ec2
        .describe_volumes()
        .volume_ids(&v)
        .send()
        .await
        .unwrap();
    let vtags: std::collections::BTreeMap<_, _> = vol.volumes()[0]
        .tags()
        .iter()
        .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
        .collect();
    assert_eq!(vtags["slipway:server"], "wave1-1");
    let server0 = all
        .iter()
        .find(|i| i.instance_id() == Some(s0.as_str()))
        .unwrap();
    assert_eq!(server0.state().unwrap().name().unwrap().as_str(), "running");
    assert!(!tags_of(server0)["slipway:sources.0"].contains("src-03"));
    let agents: Vec<_> = r.agents.iter().filter(|a| a.0 == "src-03").collect();
    assert_eq!(agents[0].1, 1);
    assert!(!env.fleet.apply(&t2, &APPLY).await.unwrap().changed());
}

#[tokio::test]
async fn a_server_terminated_by_hand_is_relaunched_for_its_volumes_not_refilled_elsewhere() {
    let env = Env::start().await;
    let t = env.template(16, "");
    env.fleet.apply(&t, &APPLY).await.unwrap();
    let s1 = env
        .instances()
        .await
        .into_iter()
        .find(|i| tags_of(i)["slipway:server-index"] == "1")
        .unwrap();
    let s1_id = s1.instance_id().unwrap().to_string();
    let v = env
        .replica_on("src-15", "disk0", "wave1-1", &s1_id, "/dev/sdg")
        .await;
    let (identity, on) = env.identity_of(1).await;
    assert_eq!(on.as_deref(), Some(s1_id.as_str()));
    env.ec2
        .detach_volume()
        .volume_id(&v)
        .instance_id(&s1_id)
        .send()
        .await
        .unwrap();
    env.ec2
        .terminate_instances()
        .instance_ids(&s1_id)
        .send()
        .await
        .unwrap();

    // src-00 leaves the template, so server 0 has room for src-15; src-15's data is on
    // server 1's volumes, so server 1 comes back instead.
    let mut text = std::fs::read_to_string(env.dir.path().join("template.toml")).unwrap();
    text = text.replace("[[sources]]\nid = \"src-00\"\ndisks = 1\n", "");
    std::fs::write(env.dir.path().join("template.toml"), text).unwrap();
    let t2 = slipway_fleet::template::load(&env.dir.path().join("template.toml")).unwrap();
    let r = env.fleet.apply(&t2, &APPLY).await.unwrap();
    assert!(
        r.actions.iter().any(|a| matches!(a, Action::Launch { index: 1, sources, .. } if sources == &["src-15".to_string()])),
        "{r}"
    );
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("server 1 has no instance")),
        "{r}"
    );
    let s0_sources: Vec<&str> = r.servers[0].sources.iter().map(String::as_str).collect();
    assert!(!s0_sources.contains(&"src-15"), "{r}");
    // The relaunched server 1 is server 1 to its agents: the lost instance's identity volume.
    let s1_new = env
        .instances()
        .await
        .into_iter()
        .find(|i| {
            tags_of(i)["slipway:server-index"] == "1"
                && i.state().unwrap().name().unwrap().as_str() == "running"
        })
        .unwrap();
    assert_eq!(
        env.identity_of(1).await,
        (identity, Some(s1_new.instance_id().unwrap().to_string()))
    );
    assert!(!env.fleet.apply(&t2, &APPLY).await.unwrap().changed());
}
