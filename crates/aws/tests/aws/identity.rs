//! IMDSv2 through the SDK's metadata client, against the stand-in.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use aws_config::imds;
use aws_config::provider_config::ProviderConfig;
use slipway_aws::{https_client, instance_identity, instance_identity_from, InstanceIdentity};

use crate::support::http::call;
use crate::support::imds::Imds;

fn meta() -> BTreeMap<String, String> {
    [
        ("instance-id", "i-0123456789abcdef0"),
        ("placement/availability-zone", "eu-west-1b"),
        ("placement/region", "eu-west-1"),
        ("instance-type", "c6i.large"),
        ("local-ipv4", "10.1.2.3"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn expected() -> InstanceIdentity {
    InstanceIdentity {
        instance_id: "i-0123456789abcdef0".into(),
        region: "eu-west-1".into(),
        availability_zone: "eu-west-1b".into(),
        instance_type: "c6i.large".into(),
        private_ip: "10.1.2.3".into(),
    }
}

#[tokio::test]
async fn identity_from_imdsv2_with_a_session_token() {
    let imds = Imds::start(meta()).await;
    // The stand-in really is v2-only: a tokenless GET is refused.
    let port: u16 = imds.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let (status, _) = call(port, "GET", "/latest/meta-data/instance-id", b"")
        .await
        .unwrap();
    assert_eq!(status, 401);

    let client = imds::Client::builder()
        .configure(&ProviderConfig::default().with_http_client(https_client()))
        .endpoint(&imds.endpoint)
        .unwrap()
        .build();
    let id = instance_identity_from(&client).await.unwrap();
    assert_eq!(id, expected());
    assert!(imds.counters.tokens.load(Ordering::SeqCst) >= 1);
    assert_eq!(imds.counters.gets.load(Ordering::SeqCst), 5);
    assert_eq!(imds.counters.refused.load(Ordering::SeqCst), 1);

    // After a stop/modify-type/start the same instance reports its new type.
    imds.set("instance-type", "c6i.xlarge");
    let id = instance_identity_from(&client).await.unwrap();
    assert_eq!(id.instance_type, "c6i.xlarge");
}

#[tokio::test]
async fn missing_metadata_is_an_imds_error() {
    let mut m = meta();
    m.remove("local-ipv4");
    let imds = Imds::start(m).await;
    let client = imds::Client::builder()
        .configure(&ProviderConfig::default().with_http_client(https_client()))
        .endpoint(&imds.endpoint)
        .unwrap()
        .max_attempts(1)
        .build();
    let err = instance_identity_from(&client).await.unwrap_err();
    assert!(err.to_string().contains("local-ipv4"), "{err}");
}

/// `instance_identity()` (what the binary calls) honours `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
/// The variable is set for a child run of this test binary only, never in this process,
/// where other tests run in parallel.
#[tokio::test]
async fn identity_endpoint_from_the_environment() {
    let imds = Imds::start(meta()).await;
    let out = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "identity::child_reads_imds_from_env",
            "--nocapture",
        ])
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.endpoint)
        .env("SLIPWAY_TEST_IMDS_CHILD", "1")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("IMDS-CHILD-OK i-0123456789abcdef0"),
        "{stdout}"
    );
    assert_eq!(imds.counters.gets.load(Ordering::SeqCst), 5);
}

/// Runs as the child of the test above; does nothing in a normal run.
#[tokio::test]
async fn child_reads_imds_from_env() {
    if std::env::var("SLIPWAY_TEST_IMDS_CHILD").is_err() {
        return;
    }
    let id = instance_identity().await.unwrap();
    assert_eq!(id, expected());
    println!("IMDS-CHILD-OK {}", id.instance_id);
}
