//! Restore points as EBS snapshots against the emulator.

use slipway_backend::{SnapshotBackend, SnapshotRequest, VolumeBackend, VolumeRequest};

use crate::support::{fast_settings, tag_map, MotoEnv, GIB};

fn rp(id: &str, source: &str, marker: u64, ms: u64, volumes: &[(&str, &str)]) -> SnapshotRequest {
    SnapshotRequest {
        rp_id: id.into(),
        source: source.into(),
        marker_id: marker,
        created_unix_ms: ms,
        trigger: "scheduled".into(),
        volumes: volumes
            .iter()
            .map(|(d, v)| (d.to_string(), v.to_string()))
            .collect(),
    }
}

#[tokio::test]
async fn restore_points_are_created_listed_and_deleted() {
    let env = MotoEnv::start().await;
    let mut settings = fast_settings();
    settings.tags.insert("team".into(), "dr".into());
    let describe_interval = settings.describe_interval;
    let clock = std::sync::Arc::new(slipway_aws::ManualClock::default());
    let mut b = env.backend(settings).await;
    b.set_clock(clock.clone());
    let server = env.identity.instance_id.clone();
    let vreq = |s: &str, d: &str| VolumeRequest {
        source: s.into(),
        disk: d.into(),
        size: GIB,
    };
    let a = b.ensure(&vreq("src-1", "disk-a")).await.unwrap();
    let bb = b.ensure(&vreq("src-1", "disk-b")).await.unwrap();
    // Another source's volume on the same server must stay out of src-1's snapshots.
    let other = b.ensure(&vreq("src-2", "disk-x")).await.unwrap();
    assert!(b
        .can_snapshot(&[a.volume_id.clone(), bb.volume_id.clone()])
        .await
        .unwrap());

    let vols = [
        ("disk-a", a.volume_id.as_str()),
        ("disk-b", bb.volume_id.as_str()),
    ];
    let made = b
        .create(&rp("rp-1", "src-1", 11, 1_000, &vols))
        .await
        .unwrap();
    assert_eq!(made.len(), 2);
    assert_eq!(made[0].disk, "disk-a");
    assert_eq!(made[0].volume_id, a.volume_id);
    assert_eq!(made[1].disk, "disk-b");
    assert_eq!(made[1].volume_id, bb.volume_id);

    // moto ignores ExcludeDataVolumeIds (and CopyTagsFromSource): its CreateSnapshots also
    // snapshotted src-2's volume, and the disk ids were not copied. The backend deletes a
    // snapshot of a volume it did not ask for and tags the disk id itself, so what is left is
    // what AWS itself would have made.
    let snaps = env.snapshots().await;
    assert_eq!(
        snaps.len(),
        2,
        "only src-1's volumes (and no root volume) were snapshotted"
    );
    assert!(snaps
        .iter()
        .all(|s| s.volume_id() != Some(other.volume_id.as_str())));
    for s in &snaps {
        let t = tag_map(s.tags());
        let disk = if s.volume_id() == Some(a.volume_id.as_str()) {
            "disk-a"
        } else {
            "disk-b"
        };
        assert_eq!(t["slipway:source-id"], "src-1");
        assert_eq!(t["slipway:disk-id"], disk);
        assert_eq!(t["slipway:restore-point"], "rp-1");
        assert_eq!(t["slipway:marker"], "11");
        assert_eq!(t["slipway:created-ms"], "1000");
        assert_eq!(t["slipway:trigger"], "scheduled");
        assert_eq!(t["slipway:server"], server);
        assert_eq!(t["team"], "dr");
    }

    b.create(&rp("rp-2", "src-1", 12, 2_000, &vols))
        .await
        .unwrap();
    b.create(&rp(
        "rp-x",
        "src-2",
        1,
        1_500,
        &[("disk-x", &other.volume_id)],
    ))
    .await
    .unwrap();

    let list = b.list(Some("src-1")).await.unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].rp_id, "rp-1");
    assert_eq!(list[0].source, "src-1");
    assert_eq!(list[0].marker_id, 11);
    assert_eq!(list[0].created_unix_ms, 1_000);
    assert_eq!(list[0].trigger, "scheduled");
    assert_eq!(list[0].snapshots.len(), 2);
    assert_eq!(list[0].snapshots[0].disk, "disk-a");
    assert_eq!(list[0].snapshots[0].snapshot_id, made[0].snapshot_id);
    // Listed from the shared cache: what this process created shows as `pending` until the
    // next DescribeSnapshots, one `describe_interval` later.
    assert_eq!(list[0].snapshots[0].state, "pending");
    clock.advance(describe_interval);
    let list = b.list(Some("src-1")).await.unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(
        list[0].snapshots[0].state, "completed",
        "moto completes at once"
    );
    assert_eq!(list[1].rp_id, "rp-2");
    let everything: Vec<String> = b
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.rp_id)
        .collect();
    assert_eq!(
        everything,
        ["rp-1", "rp-x", "rp-2"],
        "oldest first across sources"
    );

    // Pruning deletes exactly that restore point's snapshots, and twice is fine.
    b.delete("rp-1").await.unwrap();
    b.delete("rp-1").await.unwrap();
    let list = b.list(Some("src-1")).await.unwrap();
    assert_eq!(
        list.iter().map(|r| r.rp_id.as_str()).collect::<Vec<_>>(),
        ["rp-2"]
    );
    assert_eq!(env.snapshots().await.len(), 3);
    b.delete("no-such-rp").await.unwrap();
}

#[tokio::test]
async fn volumes_not_all_attached_here_get_one_snapshot_call_each() {
    let env = MotoEnv::start().await;
    let b = env.backend(fast_settings()).await;
    let vreq = |d: &str| VolumeRequest {
        source: "src-1".into(),
        disk: d.into(),
        size: GIB,
    };
    let a = b.ensure(&vreq("disk-a")).await.unwrap();
    let c = b.ensure(&vreq("disk-c")).await.unwrap();
    env.ec2
        .detach_volume()
        .volume_id(&c.volume_id)
        .instance_id(&env.identity.instance_id)
        .send()
        .await
        .unwrap();
    let made = b
        .create(&rp(
            "rp-1",
            "src-1",
            3,
            10,
            &[("disk-a", &a.volume_id), ("disk-c", &c.volume_id)],
        ))
        .await
        .unwrap();
    assert_eq!(made.len(), 2);
    let list = b.list(Some("src-1")).await.unwrap();
    assert_eq!(list.len(), 1);
    let disks: Vec<_> = list[0]
        .snapshots
        .iter()
        .map(|s| (s.disk.as_str(), s.volume_id.as_str()))
        .collect();
    assert_eq!(
        disks,
        [
            ("disk-a", a.volume_id.as_str()),
            ("disk-c", c.volume_id.as_str())
        ]
    );

    // A volume that does not exist fails the whole restore point and leaves nothing behind.
    let err = b
        .create(&rp(
            "rp-2",
            "src-1",
            4,
            20,
            &[
                ("disk-a", &a.volume_id),
                ("disk-z", "vol-0000000000000dead"),
            ],
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("disk-z"), "{err}");
    assert_eq!(b.list(Some("src-1")).await.unwrap().len(), 1);
}

/// A restore point whose snapshots carry `slipway:keep` (an operator's, or a finalized
/// cutover's) is listed with it and is never deleted: the delete reads the tags on its own
/// fresh describe, so a tag set after the server's last cached listing still stops it.
#[tokio::test]
async fn a_kept_restore_point_is_listed_as_kept_and_never_deleted() {
    let env = MotoEnv::start().await;
    let settings = fast_settings();
    let describe_interval = settings.describe_interval;
    let clock = std::sync::Arc::new(slipway_aws::ManualClock::default());
    let mut b = env.backend(settings).await;
    b.set_clock(clock.clone());
    let v = b
        .ensure(&VolumeRequest {
            source: "src-1".into(),
            disk: "disk-a".into(),
            size: GIB,
        })
        .await
        .unwrap();
    let vols = [("disk-a", v.volume_id.as_str())];
    let made = b
        .create(&rp("rp-1", "src-1", 1, 1_000, &vols))
        .await
        .unwrap();
    b.create(&rp("rp-2", "src-1", 2, 2_000, &vols))
        .await
        .unwrap();
    // Listed (and cached) before the tag exists.
    assert!(b.list(None).await.unwrap().iter().all(|r| r.keep.is_none()));
    env.ec2
        .create_tags()
        .resources(&made[0].snapshot_id)
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("slipway:keep")
                .value(slipway_backend::KEEP_FINALIZED)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let err = b.delete("rp-1").await.unwrap_err();
    assert!(
        matches!(&err, slipway_backend::BackendError::Kept(m) if m.contains("kept")),
        "{err:?}"
    );
    assert_eq!(env.snapshots().await.len(), 2, "nothing was deleted");
    // The next refresh of the shared listing shows it kept, and its source finalized.
    clock.advance(describe_interval);
    let list = b.list(None).await.unwrap();
    assert_eq!(list[0].rp_id, "rp-1");
    assert_eq!(
        list[0].keep.as_deref(),
        Some(slipway_backend::KEEP_FINALIZED)
    );
    assert!(list[0].finalizes());
    assert_eq!(list[1].keep, None);
    b.delete("rp-2").await.unwrap();
    assert_eq!(env.snapshots().await.len(), 1);
}
