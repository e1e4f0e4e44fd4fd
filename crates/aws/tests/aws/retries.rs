//! Throttling and 5xx answers injected between the SDK and the emulator.

use slipway_aws::AwsSettings;
use slipway_backend::{
    BackendError, SnapshotBackend, SnapshotRequest, VolumeBackend, VolumeRequest,
};

use crate::support::proxy::ThrottleProxy;
use crate::support::{fast_settings, test_sdk, MotoEnv, GIB};

#[tokio::test]
async fn ensure_and_snapshot_survive_thirty_percent_throttling() {
    let env = MotoEnv::start().await;
    let proxy = ThrottleProxy::start(env.moto.port, 30, 7).await;
    let sdk = test_sdk(&proxy.endpoint).await;
    let b = env
        .backend_for(fast_settings(), env.identity.clone(), sdk)
        .await;
    let mut vols = Vec::new();
    for disk in ["disk-a", "disk-b", "disk-c"] {
        let h = b
            .ensure(&VolumeRequest {
                source: "src-1".into(),
                disk: disk.into(),
                size: GIB,
            })
            .await
            .unwrap();
        vols.push((disk.to_string(), h.volume_id));
    }
    let again = b
        .ensure(&VolumeRequest {
            source: "src-1".into(),
            disk: "disk-a".into(),
            size: GIB,
        })
        .await
        .unwrap();
    assert!(!again.created);
    for (i, rp) in ["rp-1", "rp-2"].iter().enumerate() {
        b.create(&SnapshotRequest {
            rp_id: rp.to_string(),
            source: "src-1".into(),
            marker_id: i as u64,
            created_unix_ms: 1000 + i as u64,
            trigger: "scheduled".into(),
            volumes: vols.clone(),
        })
        .await
        .unwrap();
    }
    let list = b.list(Some("src-1")).await.unwrap();
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|r| r.snapshots.len() == 3));
    b.delete("rp-1").await.unwrap();
    assert_eq!(b.list(Some("src-1")).await.unwrap().len(), 1);

    // Nothing was done twice: three volumes, three snapshots left.
    assert_eq!(env.data_volumes().await.len(), 3);
    let injected = proxy.injected();
    let requests = proxy.requests();
    eprintln!("throttling: {injected} of {requests} requests answered with an error and retried");
    assert!(requests >= 20, "{requests}");
    // The backend's interceptor saw every attempt, retries included: each injected error as
    // throttled (RequestLimitExceeded) or server_error (Unavailable), each forwarded one ok.
    let m = b.api_metrics();
    let sum = |outcome: &str| m.outcome_total(outcome);
    let (throttled, server_error) = (sum("throttled"), sum("server_error"));
    assert!(
        throttled > 0 && server_error > 0,
        "{throttled} {server_error}"
    );
    assert_eq!((throttled + server_error) as usize, injected);
    assert_eq!(sum("ok") as usize + injected, requests);
    assert!(
        injected * 100 >= requests * 15 && injected * 100 <= requests * 45,
        "{injected} of {requests}"
    );
}

#[tokio::test]
async fn retries_run_out_as_unavailable() {
    let env = MotoEnv::start().await;
    let b = env.backend(fast_settings()).await;
    // Everything through a proxy that always throttles.
    let proxy = ThrottleProxy::start(env.moto.port, 100, 1).await;
    let throttled = slipway_aws::AwsBackend::new(
        AwsSettings {
            max_attempts: 3,
            attachment_limit: Some(10),
            ..fast_settings()
        },
        env.identity.clone(),
        std::sync::Arc::new(slipway_aws::FileMap {
            dir: env.dir.path().join("devices"),
        }),
        test_sdk(&proxy.endpoint).await,
    )
    .await;
    let err = throttled.unwrap_err();
    assert!(
        matches!(
            slipway_backend::BackendError::from(err.clone()),
            BackendError::Unavailable(_)
        ),
        "{err}"
    );
    assert_eq!(
        proxy.requests(),
        3,
        "max_attempts = 3 calls of DescribeInstances"
    );
    drop(b);
}
