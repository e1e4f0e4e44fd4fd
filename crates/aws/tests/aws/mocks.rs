//! What the emulator cannot model, with the SDK's own test doubles (aws-smithy-mocks): states
//! that take time (moto jumps straight to `available`/`attached`), pending snapshots (moto
//! completes them at once), and the EBS direct APIs (moto's ListChangedBlocks is wrong and it
//! validates nothing).

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_ebs::operation::get_snapshot_block::GetSnapshotBlockOutput;
use aws_sdk_ebs::operation::list_changed_blocks::ListChangedBlocksOutput;
use aws_sdk_ebs::operation::list_snapshot_blocks::ListSnapshotBlocksOutput;
use aws_sdk_ebs::types::{Block, ChangedBlock, ChecksumAlgorithm};
use aws_sdk_ec2::operation::attach_volume::AttachVolumeOutput;
use aws_sdk_ec2::operation::create_snapshot::{CreateSnapshotError, CreateSnapshotOutput};
use aws_sdk_ec2::operation::create_volume::CreateVolumeOutput;
use aws_sdk_ec2::operation::delete_snapshot::DeleteSnapshotOutput;
use aws_sdk_ec2::operation::describe_instances::DescribeInstancesOutput;
use aws_sdk_ec2::operation::describe_snapshots::DescribeSnapshotsOutput;
use aws_sdk_ec2::operation::describe_volumes::DescribeVolumesOutput;
use aws_sdk_ec2::operation::detach_volume::DetachVolumeOutput;
use aws_sdk_ec2::types::{
    EbsInstanceBlockDevice, Instance, InstanceBlockDeviceMapping, InstanceState, InstanceStateName,
    Reservation, Snapshot, SnapshotState, Tag, Volume, VolumeAttachment, VolumeAttachmentState,
    VolumeState, VolumeType,
};
use aws_smithy_mocks::{mock, mock_client, Rule, RuleMode};
use aws_smithy_types::byte_stream::ByteStream;
use aws_smithy_types::error::ErrorMetadata;
use aws_smithy_types::retry::RetryConfig;
use sha2::{Digest, Sha256};
use slipway_aws::{AwsBackend, AwsSettings, FileMap, InstanceIdentity};
use slipway_backend::{
    BackendError, SnapshotBackend, SnapshotRequest, VolumeBackend, VolumeRequest,
};

use crate::support::{fast_settings, GIB};

type Ec2 = aws_sdk_ec2::Client;
type Ebs = aws_sdk_ebs::Client;

const ME: &str = "i-0mockmockmock0001";
const BLOCK: usize = 512 * 1024;

fn identity() -> InstanceIdentity {
    InstanceIdentity {
        instance_id: ME.into(),
        region: "us-east-1".into(),
        availability_zone: "us-east-1a".into(),
        instance_type: "m5.large".into(),
        private_ip: "10.0.0.9".into(),
    }
}

fn settings() -> AwsSettings {
    AwsSettings {
        attachment_limit: Some(27),
        poll_interval: Duration::from_millis(5),
        ..fast_settings()
    }
}

fn instance(id: &str, state: InstanceStateName, mappings: &[(&str, &str)]) -> Instance {
    let mut b = Instance::builder()
        .instance_id(id)
        .root_device_name("/dev/xvda")
        .state(InstanceState::builder().name(state).build());
    for (dev, vol) in mappings {
        b = b.block_device_mappings(
            InstanceBlockDeviceMapping::builder()
                .device_name(*dev)
                .ebs(EbsInstanceBlockDevice::builder().volume_id(*vol).build())
                .build(),
        );
    }
    b.build()
}

/// DescribeInstances of this instance: just its root volume.
fn describe_me() -> Rule {
    mock!(Ec2::describe_instances)
        .match_requests(|r| r.instance_ids() == [ME])
        .then_output(|| {
            DescribeInstancesOutput::builder()
                .reservations(
                    Reservation::builder()
                        .instances(instance(
                            ME,
                            InstanceStateName::Running,
                            &[("/dev/xvda", "vol-root")],
                        ))
                        .build(),
                )
                .build()
        })
}

fn volume(
    id: &str,
    state: VolumeState,
    vtype: VolumeType,
    attached: Option<(&str, VolumeAttachmentState)>,
) -> Volume {
    let mut b = Volume::builder()
        .volume_id(id)
        .state(state)
        .size(10)
        .volume_type(vtype)
        .tags(Tag::builder().key("slipway:source-id").value("src").build())
        .tags(Tag::builder().key("slipway:disk-id").value("d0").build())
        .tags(Tag::builder().key("slipway:role").value("replica").build())
        .tags(Tag::builder().key("slipway:server").value(ME).build());
    if let Some((inst, st)) = attached {
        b = b.attachments(
            VolumeAttachment::builder()
                .volume_id(id)
                .instance_id(inst)
                .device("/dev/sdf")
                .state(st)
                .build(),
        );
    }
    b.build()
}

fn volumes(v: Volume) -> DescribeVolumesOutput {
    DescribeVolumesOutput::builder().volumes(v).build()
}

fn no_ebs() -> Ebs {
    mock_client!(aws_sdk_ebs, RuleMode::MatchAny, &[] as &[&Rule])
}

async fn backend(settings: AwsSettings, ec2: Ec2, ebs: Ebs, dir: &std::path::Path) -> AwsBackend {
    AwsBackend::from_clients(
        settings,
        identity(),
        Arc::new(FileMap {
            dir: dir.to_path_buf(),
        }),
        ec2,
        ebs,
    )
    .await
    .unwrap()
}

fn vreq() -> VolumeRequest {
    VolumeRequest {
        source: "src".into(),
        disk: "d0".into(),
        size: 10 * GIB,
    }
}

#[tokio::test]
async fn ensure_waits_through_creating_and_attaching() {
    let dir = tempfile::tempdir().unwrap();
    let me = describe_me();
    let find = mock!(Ec2::describe_volumes)
        .match_requests(|r| r.volume_ids().is_empty())
        .then_output(|| DescribeVolumesOutput::builder().build());
    let create = mock!(Ec2::create_volume)
        .match_requests(|r| {
            r.encrypted() == Some(true)
                && r.size() == Some(10)
                && r.availability_zone() == Some("us-east-1a")
        })
        .then_output(|| CreateVolumeOutput::builder().volume_id("vol-new").build());
    let states = mock!(Ec2::describe_volumes)
        .match_requests(|r| r.volume_ids() == ["vol-new"])
        .sequence()
        .output(|| {
            volumes(volume(
                "vol-new",
                VolumeState::Creating,
                VolumeType::Gp3,
                None,
            ))
        })
        .times(3)
        .output(|| {
            volumes(volume(
                "vol-new",
                VolumeState::Available,
                VolumeType::Gp3,
                None,
            ))
        })
        .output(|| {
            volumes(volume(
                "vol-new",
                VolumeState::InUse,
                VolumeType::Gp3,
                Some((ME, VolumeAttachmentState::Attaching)),
            ))
        })
        .times(2)
        .output(|| {
            volumes(volume(
                "vol-new",
                VolumeState::InUse,
                VolumeType::Gp3,
                Some((ME, VolumeAttachmentState::Attached)),
            ))
        })
        .build();
    let attach = mock!(Ec2::attach_volume)
        .match_requests(|r| r.device() == Some("/dev/sdf") && r.instance_id() == Some(ME))
        .then_output(|| AttachVolumeOutput::builder().build());
    let ec2 = mock_client!(
        aws_sdk_ec2,
        RuleMode::MatchAny,
        [&me, &find, &create, &states, &attach]
    );
    let b = backend(settings(), ec2, no_ebs(), dir.path()).await;

    let h = b.ensure(&vreq()).await.unwrap();
    assert!(h.created);
    assert_eq!(h.volume_id, "vol-new");
    assert_eq!(std::fs::metadata(&h.path).unwrap().len(), 10 * GIB);
    assert_eq!(create.num_calls(), 1);
    assert_eq!(attach.num_calls(), 1);
    assert_eq!(
        states.num_calls(),
        7,
        "3 × creating, available, 2 × attaching, attached"
    );
    assert_eq!(b.attachment_slots(), Some((2, 27)));
}

#[tokio::test]
async fn waiting_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let me = describe_me();
    let find = mock!(Ec2::describe_volumes)
        .match_requests(|r| r.volume_ids().is_empty())
        .then_output(|| DescribeVolumesOutput::builder().build());
    let create = mock!(Ec2::create_volume)
        .then_output(|| CreateVolumeOutput::builder().volume_id("vol-slow").build());
    let stuck = mock!(Ec2::describe_volumes)
        .match_requests(|r| r.volume_ids() == ["vol-slow"])
        .then_output(|| {
            volumes(volume(
                "vol-slow",
                VolumeState::Creating,
                VolumeType::Gp3,
                None,
            ))
        });
    let ec2 = mock_client!(
        aws_sdk_ec2,
        RuleMode::MatchAny,
        [&me, &find, &create, &stuck]
    );
    let b = backend(
        AwsSettings {
            wait_timeout: Duration::from_millis(300),
            poll_interval: Duration::from_millis(20),
            ..settings()
        },
        ec2,
        no_ebs(),
        dir.path(),
    )
    .await;
    let started = Instant::now();
    let err = b.ensure(&vreq()).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(err, BackendError::Unavailable(ref m) if m.contains("timed out") && m.contains("vol-slow")),
        "{err}"
    );
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(stuck.num_calls() >= 10, "{}", stuck.num_calls());
}

#[tokio::test]
async fn adopt_detaches_from_a_stopped_server_then_attaches_here() {
    let dir = tempfile::tempdir().unwrap();
    let me = describe_me();
    let old = mock!(Ec2::describe_instances)
        .match_requests(|r| r.instance_ids() == ["i-old"])
        .then_output(|| {
            DescribeInstancesOutput::builder()
                .reservations(
                    Reservation::builder()
                        .instances(instance("i-old", InstanceStateName::Stopped, &[]))
                        .build(),
                )
                .build()
        });
    let by_tag = mock!(Ec2::describe_volumes)
        .match_requests(|r| {
            r.volume_ids().is_empty()
                && r.filters()
                    .iter()
                    .any(|f| f.name() == Some("tag:slipway:server"))
        })
        .then_output(|| {
            volumes(volume(
                "vol-a",
                VolumeState::InUse,
                VolumeType::Gp3,
                Some(("i-old", VolumeAttachmentState::Attached)),
            ))
        });
    let attached_here = mock!(Ec2::describe_volumes)
        .match_requests(|r| r.volume_ids().is_empty())
        .then_output(|| DescribeVolumesOutput::builder().build());
    let detach = mock!(Ec2::detach_volume)
        .match_requests(|r| r.instance_id() == Some("i-old") && r.force() == Some(false))
        .then_output(|| DetachVolumeOutput::builder().build());
    let states = mock!(Ec2::describe_volumes)
        .match_requests(|r| r.volume_ids() == ["vol-a"])
        .sequence()
        .output(|| {
            volumes(volume(
                "vol-a",
                VolumeState::InUse,
                VolumeType::Gp3,
                Some(("i-old", VolumeAttachmentState::Detaching)),
            ))
        })
        .times(2)
        .output(|| {
            volumes(volume(
                "vol-a",
                VolumeState::Available,
                VolumeType::Gp3,
                None,
            ))
        })
        .output(|| {
            volumes(volume(
                "vol-a",
                VolumeState::InUse,
                VolumeType::Gp3,
                Some((ME, VolumeAttachmentState::Attaching)),
            ))
        })
        .output(|| {
            volumes(volume(
                "vol-a",
                VolumeState::InUse,
                VolumeType::Gp3,
                Some((ME, VolumeAttachmentState::Attached)),
            ))
        })
        .build();
    let attach = mock!(Ec2::attach_volume).then_output(|| AttachVolumeOutput::builder().build());
    let ec2 = mock_client!(
        aws_sdk_ec2,
        RuleMode::MatchAny,
        [
            &me,
            &old,
            &by_tag,
            &attached_here,
            &detach,
            &states,
            &attach
        ]
    );
    let b = backend(settings(), ec2, no_ebs(), dir.path()).await;
    let handles = b.adopt().await.unwrap();
    assert_eq!(handles.len(), 1);
    assert_eq!(
        (
            handles[0].source.as_str(),
            handles[0].disk.as_str(),
            handles[0].created
        ),
        ("src", "d0", false)
    );
    assert_eq!(detach.num_calls(), 1);
    assert_eq!(attach.num_calls(), 1);
    assert_eq!(states.num_calls(), 5);
}

fn snapshots_of(list: Vec<(&'static str, SnapshotState)>) -> DescribeSnapshotsOutput {
    let mut b = DescribeSnapshotsOutput::builder();
    for (i, (vol, st)) in list.into_iter().enumerate() {
        b = b.snapshots(
            Snapshot::builder()
                .snapshot_id(format!("snap-{i}"))
                .volume_id(vol)
                .state(st)
                .build(),
        );
    }
    b.build()
}

async fn can_snapshot_with(
    pending: Vec<(&'static str, SnapshotState)>,
    max_pending: Option<u32>,
) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let me = describe_me();
    let types = mock!(Ec2::describe_volumes).then_output(|| {
        DescribeVolumesOutput::builder()
            .volumes(volume(
                "vol-gp3",
                VolumeState::InUse,
                VolumeType::Gp3,
                Some((ME, VolumeAttachmentState::Attached)),
            ))
            .volumes(volume(
                "vol-st1",
                VolumeState::InUse,
                VolumeType::St1,
                Some((ME, VolumeAttachmentState::Attached)),
            ))
            .build()
    });
    let snaps = mock!(Ec2::describe_snapshots)
        // The pending counts come from the one DescribeSnapshots of this server's restore
        // points that serves every source.
        .match_requests(|r| {
            r.owner_ids() == ["self"]
                && r.filters()
                    .iter()
                    .any(|f| f.name() == Some("tag:slipway:server"))
        })
        .then_output(move || snapshots_of(pending.clone()));
    let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&me, &types, &snaps]);
    let b = backend(
        AwsSettings {
            max_pending_snapshots: max_pending,
            ..settings()
        },
        ec2,
        no_ebs(),
        dir.path(),
    )
    .await;
    let r = b
        .can_snapshot(&["vol-gp3".to_string(), "vol-st1".to_string()])
        .await
        .unwrap();
    assert_eq!(snaps.num_calls(), 1);
    r
}

#[tokio::test]
async fn pending_snapshot_limits_per_volume_type() {
    use SnapshotState::{Completed, Pending};
    let gp3 = |n: usize, st: SnapshotState| vec![("vol-gp3", st); n];
    assert!(can_snapshot_with(vec![], None).await);
    assert!(
        can_snapshot_with(gp3(4, Pending), None).await,
        "gp3: 4 of 5 pending"
    );
    assert!(
        !can_snapshot_with(gp3(5, Pending), None).await,
        "gp3: 5 of 5 pending"
    );
    assert!(
        !can_snapshot_with(vec![("vol-st1", Pending)], None).await,
        "st1: 1 of 1"
    );
    assert!(
        can_snapshot_with(gp3(7, Completed), None).await,
        "completed ones do not count"
    );
    assert!(
        !can_snapshot_with(gp3(2, Pending), Some(2)).await,
        "max_pending_snapshots caps it"
    );
}

#[tokio::test]
async fn a_refused_snapshot_is_snapshots_pending_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let me = describe_me();
    // Neither volume is attached here: one CreateSnapshot each.
    let vols = mock!(Ec2::describe_volumes).then_output(|| {
        DescribeVolumesOutput::builder()
            .volumes(volume(
                "vol-gp3",
                VolumeState::Available,
                VolumeType::Gp3,
                None,
            ))
            .volumes(volume(
                "vol-st1",
                VolumeState::Available,
                VolumeType::St1,
                None,
            ))
            .build()
    });
    let ok = mock!(Ec2::create_snapshot)
        .match_requests(|r| r.volume_id() == Some("vol-gp3"))
        .then_output(|| {
            CreateSnapshotOutput::builder()
                .snapshot_id("snap-ok")
                .state(SnapshotState::Pending)
                .build()
        });
    let refused = mock!(Ec2::create_snapshot)
        .match_requests(|r| r.volume_id() == Some("vol-st1"))
        .then_error(|| {
            CreateSnapshotError::generic(
                ErrorMetadata::builder()
                    .code("PendingSnapshotLimitExceeded")
                    .message("too many pending snapshots")
                    .build(),
            )
        });
    let delete = mock!(Ec2::delete_snapshot)
        .match_requests(|r| r.snapshot_id() == Some("snap-ok"))
        .then_output(|| DeleteSnapshotOutput::builder().build());
    let ec2 = mock_client!(
        aws_sdk_ec2,
        RuleMode::MatchAny,
        [&me, &vols, &ok, &refused, &delete]
    );
    let b = backend(settings(), ec2, no_ebs(), dir.path()).await;
    let err = b
        .create(&SnapshotRequest {
            rp_id: "rp-1".into(),
            source: "src".into(),
            marker_id: 1,
            created_unix_ms: 1,
            trigger: "scheduled".into(),
            volumes: vec![
                ("d0".into(), "vol-gp3".into()),
                ("d1".into(), "vol-st1".into()),
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(
        err,
        BackendError::SnapshotsPending {
            volume_id: "vol-st1".into(),
            pending: 1,
            limit: 1
        }
    );
    assert_eq!(
        delete.num_calls(),
        1,
        "the snapshot that was made is deleted again"
    );
}

/// A restore point one of whose snapshots an image uses (a launch registered it): EC2 refuses
/// that DeleteSnapshot with `InvalidSnapshot.InUse`. The other snapshot is still deleted and
/// the restore point is reported in use (kept, retried later), not as a failure.
#[tokio::test]
async fn a_snapshot_in_use_by_an_image_is_kept_and_the_restore_point_reported_in_use() {
    use aws_sdk_ec2::operation::delete_snapshot::DeleteSnapshotError;
    let dir = tempfile::tempdir().unwrap();
    let me = describe_me();
    let snaps = mock!(Ec2::describe_snapshots)
        .match_requests(|r| {
            r.filters()
                .iter()
                .any(|f| f.name() == Some("tag:slipway:restore-point"))
        })
        .then_output(|| {
            snapshots_of(vec![
                ("vol-a", SnapshotState::Completed),
                ("vol-b", SnapshotState::Completed),
            ])
        });
    let in_use = mock!(Ec2::delete_snapshot)
        .match_requests(|r| r.snapshot_id() == Some("snap-0"))
        .then_error(|| {
            DeleteSnapshotError::generic(
                ErrorMetadata::builder()
                    .code("InvalidSnapshot.InUse")
                    .message("The snapshot snap-0 is currently in use by ami-1")
                    .build(),
            )
        });
    let deleted = mock!(Ec2::delete_snapshot)
        .match_requests(|r| r.snapshot_id() == Some("snap-1"))
        .then_output(|| DeleteSnapshotOutput::builder().build());
    let ec2 = mock_client!(
        aws_sdk_ec2,
        RuleMode::MatchAny,
        [&me, &snaps, &in_use, &deleted]
    );
    let b = backend(settings(), ec2, no_ebs(), dir.path()).await;
    let err = b.delete("rp-1").await.unwrap_err();
    assert!(
        matches!(&err, BackendError::InUse(m) if m.contains("snap-0") && !m.contains("snap-1")),
        "{err:?}"
    );
    assert_eq!(in_use.num_calls(), 1);
    assert_eq!(
        deleted.num_calls(),
        1,
        "the other snapshot is still deleted"
    );
}

fn block_data(index: i32) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(index as u32) as u8)
        .collect()
}

fn ebs_blocks(corrupt: bool) -> (Ebs, Rule, Rule) {
    let list = mock!(Ebs::list_snapshot_blocks)
        .match_requests(|r| r.snapshot_id() == Some("snap-1"))
        .then_compute_output(|r| match r.next_token() {
            None => ListSnapshotBlocksOutput::builder()
                .blocks(Block::builder().block_index(0).block_token("t0").build())
                .blocks(Block::builder().block_index(3).block_token("t3").build())
                .block_size(BLOCK as i32)
                .next_token("page-2")
                .build(),
            Some(_) => ListSnapshotBlocksOutput::builder()
                .blocks(Block::builder().block_index(7).block_token("t7").build())
                .block_size(BLOCK as i32)
                .build(),
        });
    let get = mock!(Ebs::get_snapshot_block).then_compute_output(move |r| {
        let index = r.block_index().unwrap();
        assert_eq!(r.block_token(), Some(format!("t{index}").as_str()));
        let data = block_data(index);
        let mut sum = Sha256::digest(&data).to_vec();
        if corrupt && index == 3 {
            sum[0] ^= 1;
        }
        let mut out = GetSnapshotBlockOutput::builder()
            .block_data(ByteStream::from(data))
            .data_length(BLOCK as i32);
        // EBS sends the checksum; check it where present.
        if index != 7 {
            out = out
                .checksum(aws_smithy_types::base64::encode(&sum))
                .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256);
        }
        out.build()
    });
    let ebs = mock_client!(aws_sdk_ebs, RuleMode::MatchAny, [&list, &get]);
    (ebs, list, get)
}

#[tokio::test]
async fn block_hashes_over_two_pages() {
    let dir = tempfile::tempdir().unwrap();
    let me = describe_me();
    let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&me]);
    let (ebs, list, get) = ebs_blocks(false);
    let b = backend(settings(), ec2, ebs, dir.path()).await;
    let hashes = b.block_hashes("snap-1").await.unwrap();
    let expected: Vec<(u64, String)> = [0, 3, 7]
        .into_iter()
        .map(|i| (i as u64, hex::encode(Sha256::digest(block_data(i)))))
        .collect();
    assert_eq!(hashes, expected);
    assert_eq!(list.num_calls(), 2);
    assert_eq!(get.num_calls(), 3);
}

#[tokio::test]
async fn a_block_that_does_not_match_its_checksum_fails_verification() {
    let dir = tempfile::tempdir().unwrap();
    let me = describe_me();
    let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&me]);
    let (ebs, _, _) = ebs_blocks(true);
    let b = backend(settings(), ec2, ebs, dir.path()).await;
    let err = b.block_hashes("snap-1").await.unwrap_err();
    assert!(
        matches!(err, BackendError::Permanent(ref m) if m.contains("block 3") && m.contains("checksum")),
        "{err}"
    );
}

#[tokio::test]
async fn changed_bytes_sums_every_page() {
    let dir = tempfile::tempdir().unwrap();
    let me = describe_me();
    let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&me]);
    let changed = mock!(Ebs::list_changed_blocks)
        .match_requests(|r| {
            r.first_snapshot_id() == Some("snap-1") && r.second_snapshot_id() == Some("snap-2")
        })
        .then_compute_output(|r| {
            let mut b = ListChangedBlocksOutput::builder().block_size(BLOCK as i32);
            let (range, next) = match r.next_token() {
                None => (0..3, Some("p2")),
                Some(_) => (10..12, None),
            };
            for i in range {
                b = b.changed_blocks(
                    ChangedBlock::builder()
                        .block_index(i)
                        .first_block_token("a")
                        .second_block_token("b")
                        .build(),
                );
            }
            b.set_next_token(next.map(str::to_string)).build()
        });
    let ebs = mock_client!(aws_sdk_ebs, RuleMode::MatchAny, [&changed]);
    let b = backend(settings(), ec2, ebs, dir.path()).await;
    assert_eq!(
        b.changed_bytes("snap-1", "snap-2").await.unwrap(),
        5 * BLOCK as u64
    );
    assert_eq!(changed.num_calls(), 2);
}

#[tokio::test]
async fn ebs_throttling_is_retried_then_surfaces_as_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let me = describe_me();
    let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&me]);
    let retry = |c: aws_sdk_ebs::config::Builder| {
        c.retry_config(
            RetryConfig::standard()
                .with_max_attempts(3)
                .with_initial_backoff(Duration::from_millis(1)),
        )
    };
    let flaky = mock!(Ebs::list_changed_blocks)
        .sequence()
        .http_status(503, None)
        .times(2)
        .output(|| {
            ListChangedBlocksOutput::builder()
                .block_size(BLOCK as i32)
                .changed_blocks(ChangedBlock::builder().block_index(1).build())
                .build()
        })
        .build();
    let ebs = mock_client!(aws_sdk_ebs, RuleMode::MatchAny, [&flaky], retry);
    let b = backend(settings(), ec2.clone(), ebs, dir.path()).await;
    assert_eq!(b.changed_bytes("a", "b").await.unwrap(), BLOCK as u64);
    assert_eq!(flaky.num_calls(), 3);

    let down = mock!(Ebs::list_changed_blocks)
        .sequence()
        .http_status(503, None)
        .repeatedly()
        .build();
    let ebs = mock_client!(aws_sdk_ebs, RuleMode::MatchAny, [&down], retry);
    let b = backend(settings(), ec2, ebs, dir.path()).await;
    let err = b.changed_bytes("a", "b").await.unwrap_err();
    assert!(matches!(err, BackendError::Unavailable(_)), "{err}");
    assert_eq!(down.num_calls(), 3);
}
