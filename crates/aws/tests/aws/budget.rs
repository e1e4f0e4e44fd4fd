//! The AWS API budget against the emulator: 40 sources over a simulated hour of the default
//! PIT schedule cost under one describe call per second, whatever the number of sources.
//!
//! The loop replays the calls the server's snapshot scheduler (`restore.rs`, `schedule`) makes
//! through the `SnapshotBackend` trait: every second, for every connected source, the
//! restore points for the policy (`list`, once for `due` and once for the prune), and when
//! the policy says so `can_snapshot` then `create`, and `delete` for what it prunes. Time is
//! simulated: the backend's describe budget runs on a `ManualClock`, restore-point times on
//! the simulated epoch; the AWS calls are real (the SDK against moto). Every request is
//! counted by the backend's own interceptor, which is also what `/metrics` exports.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::types::VolumeType;
use slipway_aws::{AwsSettings, ManualClock};
use slipway_backend::{SnapshotBackend, SnapshotRequest};
use slipway_pit::{PitPolicy, RestorePoint};

use crate::support::{fast_settings, MotoEnv, ZONE};

const SOURCES: usize = 40;
const HOUR: u64 = 3600;
/// Simulated epoch of the run (Unix seconds).
const EPOCH: u64 = 1_800_000_000;

#[tokio::test]
async fn forty_sources_over_an_hour_cost_under_one_describe_per_second() {
    let env = MotoEnv::start().await;
    // Replica volumes that are not attached here, so each restore point is one
    // CreateSnapshot (moto's CreateSnapshots would snapshot all 40 volumes every time).
    let mut volumes = Vec::new();
    for i in 0..SOURCES {
        let v = env
            .ec2
            .create_volume()
            .availability_zone(ZONE)
            .size(1)
            .volume_type(VolumeType::Gp3)
            .send()
            .await
            .unwrap();
        volumes.push((format!("src-{i:02}"), v.volume_id().unwrap().to_string()));
    }
    let clock = Arc::new(ManualClock::default());
    let mut b = env
        .backend(AwsSettings {
            describe_interval: Duration::from_secs(30),
            ..fast_settings()
        })
        .await;
    b.set_clock(clock.clone());
    let m = b.api_metrics().clone();
    let at_start = m.describe_requests();
    let pit = PitPolicy::default();
    let points = |rps: Vec<slipway_backend::RemoteRestorePoint>| -> Vec<RestorePoint> {
        rps.into_iter()
            .map(|r| RestorePoint {
                id: r.rp_id,
                taken_at: r.created_unix_ms / 1000,
                scheduled: r.trigger == "scheduled",
            })
            .collect()
    };

    let (mut created, mut pruned, mut marker) = (0u64, 0u64, 0u64);
    for s in 0..HOUR {
        let now = EPOCH + s;
        for (source, vol) in &volumes {
            let existing = points(b.list(Some(source)).await.unwrap());
            if pit.due(now, &existing) && b.can_snapshot(std::slice::from_ref(vol)).await.unwrap() {
                marker += 1;
                b.create(&SnapshotRequest {
                    rp_id: format!("rp-{source}-{now}"),
                    source: source.clone(),
                    marker_id: marker,
                    created_unix_ms: now * 1000,
                    trigger: "scheduled".into(),
                    volumes: vec![("disk0".into(), vol.clone())],
                })
                .await
                .unwrap();
                created += 1;
            }
            let existing = points(b.list(Some(source)).await.unwrap());
            for id in pit.plan_prune(now, &existing) {
                b.list(None).await.unwrap();
                b.delete(&id).await.unwrap();
                pruned += 1;
            }
        }
        // Fail early (and fast) if the budget is broken: never more than one describe per
        // elapsed second beyond a burst for the first restore points.
        let so_far = m.describe_requests() - at_start;
        assert!(
            so_far <= (s + 1).max(600),
            "{so_far} describe calls after {} simulated seconds",
            s + 1
        );
        clock.advance(Duration::from_secs(1));
    }
    let describes = m.describe_requests() - at_start;
    let per_second = describes as f64 / HOUR as f64;
    eprintln!(
        "API budget: {SOURCES} sources, one simulated hour of the default PIT policy: \
         {created} restore points, {pruned} pruned, {describes} describe calls = \
         {per_second:.3}/s (DescribeSnapshots {}, DescribeVolumes {}, DescribeInstances {})",
        m.count("DescribeSnapshots", "ok"),
        m.count("DescribeVolumes", "ok"),
        m.count("DescribeInstances", "ok"),
    );
    assert!(per_second <= 1.0, "{per_second} describe calls per second");
    // Every source got its six points of the hour (every 10 minutes), none twice.
    assert_eq!(created, SOURCES as u64 * 6);
    for (source, _) in &volumes {
        assert_eq!(b.list(Some(source)).await.unwrap().len(), 6, "{source}");
    }
    assert_eq!(m.count("DescribeSnapshots", "throttled"), 0);
}
