//! Test and cutover launches from restore points against the emulator.

use std::collections::BTreeMap;

use slipway_fleet::{Conversion, LaunchMode, LaunchRequest};

use crate::support::{tags_of, Env};

/// Snapshot id of each volume attached to `instance`, by device.
async fn volume_snapshots(env: &Env, instance: &str) -> BTreeMap<String, String> {
    let vols = env
        .ec2
        .describe_volumes()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("attachment.instance-id")
                .values(instance)
                .build(),
        )
        .send()
        .await
        .unwrap();
    vols.volumes()
        .iter()
        .map(|v| {
            (
                v.attachments()[0].device().unwrap().to_string(),
                v.snapshot_id().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn req(source: &str, mode: LaunchMode, rp: Option<&str>) -> LaunchRequest {
    LaunchRequest {
        source: source.into(),
        mode,
        restore_point: rp.map(str::to_string),
        // The emulator's snapshots hold no disk to convert: these tests are about the launch.
        conversion: Conversion::Skip,
    }
}

#[tokio::test]
async fn a_test_launch_builds_the_instance_from_the_chosen_restore_points_snapshots() {
    let env = Env::start().await;
    let t = env.template(2, "");
    let old = env
        .restore_point("src-00", "rp-old", 1_000, &["disk0", "disk1"])
        .await;
    let new = env
        .restore_point("src-00", "rp-new", 2_000, &["disk0", "disk1"])
        .await;
    // Another source's newer restore point is never picked.
    env.restore_point("src-01", "rp-other", 3_000, &["disk0"])
        .await;

    let rps = env.fleet.restore_points("src-00").await.unwrap();
    assert_eq!(
        rps.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["rp-old", "rp-new"]
    );

    // Default: the newest completed restore point.
    let r = env
        .fleet
        .launch(&t, &req("src-00", LaunchMode::Test, None))
        .await
        .unwrap();
    assert_eq!(r.restore_point, "rp-new");
    let got = volume_snapshots(&env, &r.instance_id).await;
    let want: BTreeMap<String, String> = [
        ("/dev/sda1".to_string(), new["disk0"].clone()),
        ("/dev/sdf".to_string(), new["disk1"].clone()),
    ]
    .into();
    assert_eq!(got, want);
    let i = env
        .instances()
        .await
        .into_iter()
        .find(|i| i.instance_id() == Some(r.instance_id.as_str()))
        .unwrap();
    assert_eq!(i.instance_type().unwrap().as_str(), "m5.xlarge");
    assert_eq!(i.subnet_id(), Some(env.target_subnet.as_str()));
    let tags = tags_of(&i);
    assert_eq!(tags["slipway:role"], "launch");
    assert_eq!(tags["slipway:source-id"], "src-00");
    assert_eq!(tags["slipway:restore-point"], "rp-new");
    assert_eq!(tags["slipway:launch-mode"], "test");
    assert_eq!(tags["Environment"], "migrated");
    assert!(
        r.to_string()
            .contains("test launch of src-00 from restore point rp-new"),
        "{r}"
    );

    // An explicit, older restore point.
    let r2 = env
        .fleet
        .launch(&t, &req("src-00", LaunchMode::Test, Some("rp-old")))
        .await
        .unwrap();
    let got = volume_snapshots(&env, &r2.instance_id).await;
    assert_eq!(got["/dev/sda1"], old["disk0"]);
    assert_eq!(got["/dev/sdf"], old["disk1"]);

    // Unknown restore point, unknown source: clear errors.
    let e = env
        .fleet
        .launch(&t, &req("src-00", LaunchMode::Test, Some("rp-nope")))
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "no restore point rp-nope of source src-00");
    let e = env
        .fleet
        .launch(&t, &req("web-99", LaunchMode::Test, None))
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "source web-99 is not in template wave1");
    let e = env
        .fleet
        .launch(&t, &req("src-01", LaunchMode::Test, Some("rp-new")))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("no restore point rp-new of source src-01"),
        "{e}"
    );
}

#[tokio::test]
async fn a_cutover_terminates_the_test_instances_and_is_recorded() {
    let env = Env::start().await;
    let t = env.template(2, "");
    env.restore_point("src-00", "rp-1", 1_000, &["disk0"]).await;
    env.restore_point("src-01", "rp-9", 1_000, &["disk0"]).await;
    let test = env
        .fleet
        .launch(&t, &req("src-00", LaunchMode::Test, None))
        .await
        .unwrap();
    let other = env
        .fleet
        .launch(&t, &req("src-01", LaunchMode::Test, None))
        .await
        .unwrap();

    let cut = env
        .fleet
        .launch(&t, &req("src-00", LaunchMode::Cutover, None))
        .await
        .unwrap();
    assert_eq!(cut.terminated, std::slice::from_ref(&test.instance_id));
    let state = |id: String| {
        let env = &env;
        async move {
            env.instances()
                .await
                .into_iter()
                .find(|i| i.instance_id() == Some(id.as_str()))
                .and_then(|i| {
                    i.state()
                        .and_then(|s| s.name())
                        .map(|n| n.as_str().to_string())
                })
                .unwrap()
        }
    };
    assert_eq!(state(test.instance_id.clone()).await, "terminated");
    assert_eq!(state(cut.instance_id.clone()).await, "running");
    // Another source's test instance is left alone.
    assert_eq!(state(other.instance_id.clone()).await, "running");

    // `launch list` reads the record back from the tags.
    let list = env.fleet.launches(Some("wave1")).await.unwrap();
    let mut rows: Vec<(&str, &str, &str)> = list
        .launches
        .iter()
        .map(|l| (l.source.as_str(), l.mode.as_str(), l.state.as_str()))
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        [
            ("src-00", "cutover", "running"),
            ("src-00", "test", "terminated"),
            ("src-01", "test", "running")
        ]
    );
    assert!(list.to_string().contains(&cut.instance_id), "{list}");

    // A second cutover of the same source is refused.
    let e = env
        .fleet
        .launch(&t, &req("src-00", LaunchMode::Cutover, None))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("already has cutover instance"),
        "{e}"
    );
}
