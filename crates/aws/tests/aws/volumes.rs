//! Replica volumes against the emulator: create, find again, adopt, attachment limit.

use aws_sdk_ec2::types::{VolumeAttachmentState, VolumeType};
use slipway_aws::AwsSettings;
use slipway_backend::{BackendError, VolumeBackend, VolumeRequest};

use crate::support::{fast_settings, tag_map, MotoEnv, GIB};

fn req(source: &str, disk: &str, size: u64) -> VolumeRequest {
    VolumeRequest {
        source: source.into(),
        disk: disk.into(),
        size,
    }
}

fn attached_to(v: &aws_sdk_ec2::types::Volume) -> Vec<(String, String)> {
    v.attachments()
        .iter()
        .filter(|a| a.state() == Some(&VolumeAttachmentState::Attached))
        .map(|a| {
            (
                a.instance_id().unwrap_or_default().to_string(),
                a.device().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn ensure_creates_a_tagged_encrypted_volume_and_finds_it_again() {
    let env = MotoEnv::start().await;
    let mut settings = fast_settings();
    settings.tags.insert("cost-center".into(), "dr".into());
    settings.gp3_iops = Some(4000);
    settings.gp3_throughput = Some(250);
    let b = env.backend(settings).await;
    let me = env.identity.instance_id.clone();
    assert_eq!(
        b.attachment_slots(),
        Some((1, 27)),
        "root volume of an m5.large (27 EBS attachments)"
    );

    // Small disk: gp3, size rounded up to whole GiB.
    let h = b
        .ensure(&req("src-1", "disk-a", 10 * GIB + 1))
        .await
        .unwrap();
    assert!(h.created);
    assert_eq!((h.source.as_str(), h.disk.as_str()), ("src-1", "disk-a"));
    let v = env.volume(&h.volume_id).await;
    assert_eq!(v.size(), Some(11));
    assert_eq!(v.volume_type(), Some(&VolumeType::Gp3));
    assert_eq!(v.encrypted(), Some(true));
    assert_eq!(v.iops(), Some(4000));
    assert_eq!(v.throughput(), Some(250));
    assert_eq!(v.availability_zone(), Some("us-east-1a"));
    let tags = tag_map(v.tags());
    assert_eq!(tags["slipway:source-id"], "src-1");
    assert_eq!(tags["slipway:disk-id"], "disk-a");
    assert_eq!(tags["slipway:role"], "replica");
    assert_eq!(tags["slipway:server"], me);
    assert_eq!(tags["cost-center"], "dr");
    assert_eq!(attached_to(&v), [(me.clone(), "/dev/sdf".to_string())]);
    // The block device stand-in has the volume's size.
    assert_eq!(std::fs::metadata(&h.path).unwrap().len(), 11 * GIB);
    assert_eq!(b.attachment_slots(), Some((2, 27)));

    // Same disk again: the same volume, not created.
    let again = b
        .ensure(&req("src-1", "disk-a", 10 * GIB + 1))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.volume_id, h.volume_id);
    assert_eq!(again.path, h.path);

    // Large disk: st1 on the next device name.
    let large = b.ensure(&req("src-1", "disk-b", 600 * GIB)).await.unwrap();
    let v = env.volume(&large.volume_id).await;
    assert_eq!(v.volume_type(), Some(&VolumeType::St1));
    assert_eq!(v.size(), Some(600));
    assert_eq!(v.iops(), None, "gp3 settings apply to gp3 only");
    assert_eq!(attached_to(&v), [(me.clone(), "/dev/sdg".to_string())]);
    assert_eq!(env.data_volumes().await.len(), 2);
    // Both are found by their source tag, as the fleet and the e2e tests find them.
    assert_eq!(env.replicas_of("src-1").await.len(), 2);
    assert!(env.replicas_of("src-2").await.is_empty());

    // A disk that grew beyond its volume is refused, not silently cut.
    let err = b
        .ensure(&req("src-1", "disk-a", 20 * GIB))
        .await
        .unwrap_err();
    assert!(
        matches!(err, BackendError::Permanent(ref m) if m.contains("ModifyVolume")),
        "{err}"
    );
}

#[tokio::test]
async fn volume_type_rules() {
    let env = MotoEnv::start().await;
    let b = env
        .backend(AwsSettings {
            volume_type_large: "gp3".into(),
            large_threshold_gib: 100,
            ..fast_settings()
        })
        .await;
    let small = b.ensure(&req("s", "small", 99 * GIB)).await.unwrap();
    let large = b.ensure(&req("s", "large", 100 * GIB)).await.unwrap();
    assert_eq!(
        env.volume(&small.volume_id).await.volume_type(),
        Some(&VolumeType::Gp3)
    );
    assert_eq!(
        env.volume(&large.volume_id).await.volume_type(),
        Some(&VolumeType::Gp3)
    );

    let fixed = env
        .backend(AwsSettings {
            fixed_volume_type: Some("st1".into()),
            ..fast_settings()
        })
        .await;
    let h = fixed.ensure(&req("s", "tiny", GIB)).await.unwrap();
    let v = env.volume(&h.volume_id).await;
    assert_eq!(v.volume_type(), Some(&VolumeType::St1));
    assert_eq!(v.size(), Some(125), "st1 volumes are at least 125 GiB");
}

#[tokio::test]
async fn adopt_after_restart_and_on_a_replacement_instance() {
    let env = MotoEnv::start().await;
    let settings = AwsSettings {
        server_tag: "staging-1".into(),
        ..fast_settings()
    };
    let first = env.backend(settings.clone()).await;
    let a = first
        .ensure(&req("src-1", "disk-a", 5 * GIB))
        .await
        .unwrap();
    let b = first
        .ensure(&req("src-1", "disk-b", 6 * GIB))
        .await
        .unwrap();
    // Someone else's replica (another server tag, not attached here) is not ours to adopt.
    let other = env
        .backend(AwsSettings {
            server_tag: "staging-2".into(),
            ..fast_settings()
        })
        .await;
    let foreign = other.ensure(&req("src-9", "disk-z", GIB)).await.unwrap();
    env.ec2
        .detach_volume()
        .volume_id(&foreign.volume_id)
        .instance_id(&env.identity.instance_id)
        .send()
        .await
        .unwrap();
    drop(first);

    // Restart on the same instance: both found, nothing created, still attached here.
    let restarted = env.backend(settings.clone()).await;
    let mut handles = restarted.adopt().await.unwrap();
    handles.sort_by(|x, y| x.disk.cmp(&y.disk));
    let ids: Vec<_> = handles
        .iter()
        .map(|h| (h.disk.as_str(), h.volume_id.as_str(), h.created))
        .collect();
    assert_eq!(
        ids,
        [
            ("disk-a", a.volume_id.as_str(), false),
            ("disk-b", b.volume_id.as_str(), false)
        ]
    );
    assert_eq!(handles[0].path, a.path);

    // A replacement instance with the same server tag, the old one stopped: the volumes move.
    let new_instance = env.run_instance().await;
    env.ec2
        .stop_instances()
        .instance_ids(&env.identity.instance_id)
        .send()
        .await
        .unwrap();
    let replacement = env
        .backend_for(settings, new_instance.clone(), env.sdk.clone())
        .await;
    let handles = replacement.adopt().await.unwrap();
    assert_eq!(handles.len(), 2);
    for h in &handles {
        assert!(!h.created);
        let v = env.volume(&h.volume_id).await;
        let att = attached_to(&v);
        assert_eq!(att.len(), 1, "{att:?}");
        assert_eq!(att[0].0, new_instance.instance_id);
        assert!(h.path.exists());
    }
    // The foreign replica stayed where it was.
    assert!(attached_to(&env.volume(&foreign.volume_id).await).is_empty());
    assert_eq!(replacement.attachment_slots(), Some((3, 27)));
}

#[tokio::test]
async fn a_replica_attached_to_a_running_server_is_not_taken() {
    let env = MotoEnv::start().await;
    let settings = AwsSettings {
        server_tag: "staging-1".into(),
        ..fast_settings()
    };
    let first = env.backend(settings.clone()).await;
    let held = first.ensure(&req("src-1", "disk-a", GIB)).await.unwrap();
    // A second replica of the server tag, free (its old server let it go).
    let free = first.ensure(&req("src-1", "disk-b", GIB)).await.unwrap();
    env.ec2
        .detach_volume()
        .volume_id(&free.volume_id)
        .instance_id(&env.identity.instance_id)
        .send()
        .await
        .unwrap();
    let second_instance = env.run_instance().await;
    let second_id = second_instance.instance_id.clone();
    let second = env
        .backend_for(settings, second_instance, env.sdk.clone())
        .await;
    // Adoption goes volume by volume: the free one is adopted, the held one is left where it
    // is (and reported), and adoption as a whole does not fail.
    let adopted = second.adopt().await.unwrap();
    let ids: Vec<&str> = adopted.iter().map(|h| h.volume_id.as_str()).collect();
    assert_eq!(ids, [free.volume_id.as_str()]);
    assert_eq!(
        env.volume(&held.volume_id).await.attachments()[0].instance_id(),
        Some(env.identity.instance_id.as_str())
    );
    assert_eq!(
        env.volume(&free.volume_id).await.attachments()[0].instance_id(),
        Some(second_id.as_str())
    );
    // When its agent opens it, the held disk says why.
    let err = second
        .ensure(&req("src-1", "disk-a", GIB))
        .await
        .unwrap_err();
    assert!(
        matches!(err, BackendError::Permanent(ref m) if m.contains("running")),
        "{err}"
    );
}

#[tokio::test]
async fn no_attachment_slot_once_the_limit_is_reached() {
    let env = MotoEnv::start().await;
    let b = env
        .backend(AwsSettings {
            attachment_limit: Some(3),
            ..fast_settings()
        })
        .await;
    b.ensure(&req("s", "d1", GIB)).await.unwrap();
    b.ensure(&req("s", "d2", GIB)).await.unwrap();
    assert_eq!(b.attachment_slots(), Some((3, 3)));
    let err = b.ensure(&req("s", "d3", GIB)).await.unwrap_err();
    assert_eq!(err, BackendError::NoAttachmentSlot { used: 3, limit: 3 });
    assert!(err.to_string().contains("3 of 3"), "{err}");
    // No volume was created that could not be attached.
    assert_eq!(env.data_volumes().await.len(), 2);
    // Existing disks still resolve.
    assert!(!b.ensure(&req("s", "d1", GIB)).await.unwrap().created);
}

/// Two disks opened at once with one attachment slot left: the slot is checked and taken
/// under the attach lock, so exactly one gets a volume and no volume is created that could not
/// be attached.
#[tokio::test]
async fn the_last_slot_goes_to_one_of_two_disks_opened_at_once() {
    let env = MotoEnv::start().await;
    let b = env
        .backend(AwsSettings {
            attachment_limit: Some(2),
            ..fast_settings()
        })
        .await;
    assert_eq!(
        b.attachment_slots(),
        Some((1, 2)),
        "the root volume takes one"
    );
    let (q1, q2) = (req("s", "d1", GIB), req("s", "d2", GIB));
    let (r1, r2) = tokio::join!(b.ensure(&q1), b.ensure(&q2));
    let oks = [&r1, &r2].iter().filter(|r| r.is_ok()).count();
    assert_eq!(oks, 1, "{r1:?} {r2:?}");
    let refused = if r1.is_err() { r1 } else { r2 };
    assert_eq!(
        refused.unwrap_err(),
        BackendError::NoAttachmentSlot { used: 2, limit: 2 }
    );
    assert_eq!(
        env.data_volumes().await.len(),
        1,
        "no volume was created that could not be attached"
    );
}
