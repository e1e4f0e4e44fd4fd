//! Test support: the emulator, the IMDS stand-in, the throttling proxy, and builders.

pub mod capture;
pub mod http;
pub mod imds;
pub mod moto;
pub mod proxy;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::config::Credentials;
use aws_sdk_ec2::types::{InstanceType, Placement, Tag, Volume};
use slipway_aws::{AwsBackend, AwsSettings, FileMap, InstanceIdentity};
use tempfile::TempDir;
use tokio::sync::MutexGuard;

pub const REGION: &str = "us-east-1";
pub const ZONE: &str = "us-east-1a";

/// An SDK configuration that talks to `endpoint` with dummy credentials.
pub async fn test_sdk(endpoint: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .http_client(slipway_aws::https_client())
        .region(Region::new(REGION))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
        .endpoint_url(endpoint)
        .load()
        .await
}

/// Settings with test-sized waits and backoffs.
pub fn fast_settings() -> AwsSettings {
    AwsSettings {
        poll_interval: Duration::from_millis(10),
        wait_timeout: Duration::from_secs(10),
        initial_backoff: Duration::from_millis(5),
        ..AwsSettings::default()
    }
}

/// A reset emulator with one running "replication server" instance.
pub struct MotoEnv {
    _guard: MutexGuard<'static, ()>,
    pub moto: moto::Moto,
    pub sdk: SdkConfig,
    /// A client for looking at what the backend did.
    pub ec2: aws_sdk_ec2::Client,
    pub identity: InstanceIdentity,
    pub dir: TempDir,
}

impl MotoEnv {
    pub async fn start() -> MotoEnv {
        let (guard, moto) = moto::exclusive().await;
        let sdk = test_sdk(&moto.endpoint()).await;
        let ec2 = aws_sdk_ec2::Client::new(&sdk);
        let mut env = MotoEnv {
            _guard: guard,
            moto,
            sdk,
            ec2,
            identity: InstanceIdentity {
                instance_id: String::new(),
                region: REGION.into(),
                availability_zone: ZONE.into(),
                instance_type: "m5.large".into(),
                private_ip: String::new(),
            },
            dir: tempfile::tempdir().unwrap(),
        };
        env.identity = env.run_instance().await;
        env
    }

    /// RunInstances of one m5.large in the test zone (moto accepts any AMI id).
    pub async fn run_instance(&self) -> InstanceIdentity {
        let out = self
            .ec2
            .run_instances()
            .image_id("ami-12345678")
            .min_count(1)
            .max_count(1)
            .instance_type(InstanceType::M5Large)
            .placement(Placement::builder().availability_zone(ZONE).build())
            .send()
            .await
            .unwrap();
        let i = &out.instances()[0];
        InstanceIdentity {
            instance_id: i.instance_id().unwrap().to_string(),
            region: REGION.into(),
            availability_zone: ZONE.into(),
            instance_type: "m5.large".into(),
            private_ip: i.private_ip_address().unwrap_or("10.0.0.1").to_string(),
        }
    }

    /// A backend for this instance, block devices as files under the test dir.
    pub async fn backend(&self, settings: AwsSettings) -> AwsBackend {
        self.backend_for(settings, self.identity.clone(), self.sdk.clone())
            .await
    }

    pub async fn backend_for(
        &self,
        settings: AwsSettings,
        identity: InstanceIdentity,
        sdk: SdkConfig,
    ) -> AwsBackend {
        let resolver = Arc::new(FileMap {
            dir: self.dir.path().join("devices"),
        });
        AwsBackend::new(settings, identity, resolver, sdk)
            .await
            .unwrap()
    }

    pub async fn volume(&self, id: &str) -> Volume {
        self.ec2
            .describe_volumes()
            .volume_ids(id)
            .send()
            .await
            .unwrap()
            .volumes()[0]
            .clone()
    }

    /// Every volume but root volumes.
    pub async fn data_volumes(&self) -> Vec<Volume> {
        self.ec2
            .describe_volumes()
            .send()
            .await
            .unwrap()
            .volumes()
            .iter()
            .filter(|v| {
                !v.attachments()
                    .iter()
                    .any(|a| a.device() == Some("/dev/sda1"))
            })
            .cloned()
            .collect()
    }

    /// The data volumes tagged as `source`'s replicas.
    pub async fn replicas_of(&self, source: &str) -> Vec<Volume> {
        self.data_volumes()
            .await
            .into_iter()
            .filter(|v| {
                tag_map(v.tags())
                    .get(slipway_aws::tags::SOURCE_ID)
                    .map(String::as_str)
                    == Some(source)
            })
            .collect()
    }

    /// Every snapshot this account owns.
    pub async fn snapshots(&self) -> Vec<aws_sdk_ec2::types::Snapshot> {
        self.ec2
            .describe_snapshots()
            .owner_ids("self")
            .send()
            .await
            .unwrap()
            .snapshots()
            .to_vec()
    }
}

/// A VPC with a staging subnet (replication servers), a target subnet (launched instances),
/// both in [`ZONE`], and a security group: what a replication template names. (Used by the
/// fleet and workspace e2e tests, which include this module.)
#[allow(dead_code)]
pub struct StagingNetwork {
    pub vpc: String,
    pub staging_subnet: String,
    pub target_subnet: String,
    pub security_group: String,
}

#[allow(dead_code)]
pub async fn staging_network(ec2: &aws_sdk_ec2::Client) -> StagingNetwork {
    let vpc = ec2
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .send()
        .await
        .unwrap()
        .vpc()
        .unwrap()
        .vpc_id()
        .unwrap()
        .to_string();
    let subnet = |cidr: &'static str| {
        let (ec2, vpc) = (ec2.clone(), vpc.clone());
        async move {
            ec2.create_subnet()
                .vpc_id(vpc)
                .cidr_block(cidr)
                .availability_zone(ZONE)
                .send()
                .await
                .unwrap()
                .subnet()
                .unwrap()
                .subnet_id()
                .unwrap()
                .to_string()
        }
    };
    let staging_subnet = subnet("10.0.1.0/24").await;
    let target_subnet = subnet("10.0.2.0/24").await;
    let security_group = ec2
        .create_security_group()
        .group_name("slipway-replication")
        .description("replication servers")
        .vpc_id(&vpc)
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_string();
    StagingNetwork {
        vpc,
        staging_subnet,
        target_subnet,
        security_group,
    }
}

pub fn tag_map(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_string(),
                t.value().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

pub const GIB: u64 = 1 << 30;
