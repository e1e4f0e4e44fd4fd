//! [`AwsBackend`]: the server's volume and snapshot traits on EC2 and EBS.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::timeout::TimeoutConfig;
use aws_config::{Region, SdkConfig};
use slipway_server::backend::{
    BackendError, RemoteRestorePoint, RemoteSnapshot, SnapshotBackend, SnapshotRequest,
    VolumeBackend, VolumeHandle, VolumeRequest,
};
use tracing::{info, warn};

use crate::device::DeviceResolver;
use crate::error::AwsError;
use crate::identity::InstanceIdentity;
use crate::settings::AwsSettings;

/// Attachments a Nitro instance allows when DescribeInstanceTypes cannot say: 28 shared
/// between network interfaces, EBS volumes and NVMe instance store, less the primary network
/// interface.
pub const FALLBACK_ATTACHMENT_LIMIT: u32 = 27;

/// One async lock per (source, disk).
type DiskLocks = HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>;

/// EBS volumes and snapshots of one replication server (this instance).
///
/// Cheap to share behind an `Arc`; every method may be called concurrently. Calls for the same
/// source disk are serialized, and so is the choice of device names.
pub struct AwsBackend {
    pub(crate) settings: AwsSettings,
    pub(crate) identity: InstanceIdentity,
    pub(crate) resolver: Arc<dyn DeviceResolver>,
    pub(crate) ec2: aws_sdk_ec2::Client,
    pub(crate) ebs: aws_sdk_ebs::Client,
    /// EBS attachments allowed on this instance (root volume included).
    pub(crate) limit: u32,
    /// EBS attachments in use as last seen (root volume included).
    pub(crate) used: AtomicU32,
    /// Held while choosing a device name and calling AttachVolume, and around CreateSnapshots
    /// (whose volume set is "everything attached", so it must not change underneath).
    pub(crate) attach_lock: tokio::sync::Mutex<()>,
    /// Device names of attachments requested but not yet reported attached.
    pub(crate) reserved: Mutex<BTreeSet<String>>,
    /// One lock per (source, disk): ensure() and adopt() never race on the same disk.
    pub(crate) disk_locks: Mutex<DiskLocks>,
    /// Volume id → volume type, for the pending-snapshot limits.
    pub(crate) volume_types: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for AwsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsBackend")
            .field("instance", &self.identity.instance_id)
            .field("server_tag", &self.settings.server_tag)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl AwsBackend {
    /// Builds the EC2 and EBS clients from `sdk` (with the retry strategy of `settings`, a 5 s
    /// connect and a 60 s per-attempt timeout, and the instance's region if `sdk` has none),
    /// checks that the instance exists and works out its attachment limit.
    pub async fn new(
        settings: AwsSettings,
        identity: InstanceIdentity,
        resolver: Arc<dyn DeviceResolver>,
        sdk: SdkConfig,
    ) -> Result<Self, AwsError> {
        let retry = settings.retry_config();
        // Bound every attempt, so a connection that hangs becomes a retry, not a stuck call.
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(Duration::from_secs(60))
            .build();
        let region = sdk
            .region()
            .cloned()
            .unwrap_or_else(|| Region::new(identity.region.clone()));
        let ec2 = aws_sdk_ec2::Client::from_conf(
            aws_sdk_ec2::config::Builder::from(&sdk)
                .region(region.clone())
                .retry_config(retry.clone())
                .timeout_config(timeouts.clone())
                .build(),
        );
        let ebs = aws_sdk_ebs::Client::from_conf(
            aws_sdk_ebs::config::Builder::from(&sdk)
                .region(region)
                .retry_config(retry)
                .timeout_config(timeouts)
                .build(),
        );
        Self::from_clients(settings, identity, resolver, ec2, ebs).await
    }

    /// Like [`new`](Self::new) with clients configured by the caller (tests use mocked ones).
    pub async fn from_clients(
        mut settings: AwsSettings,
        identity: InstanceIdentity,
        resolver: Arc<dyn DeviceResolver>,
        ec2: aws_sdk_ec2::Client,
        ebs: aws_sdk_ebs::Client,
    ) -> Result<Self, AwsError> {
        if settings.server_tag.is_empty() {
            settings.server_tag = identity.instance_id.clone();
        }
        let mut backend = AwsBackend {
            settings,
            identity,
            resolver,
            ec2,
            ebs,
            limit: FALLBACK_ATTACHMENT_LIMIT,
            used: AtomicU32::new(0),
            attach_lock: tokio::sync::Mutex::new(()),
            reserved: Mutex::new(BTreeSet::new()),
            disk_locks: Mutex::new(HashMap::new()),
            volume_types: Mutex::new(HashMap::new()),
        };
        let me = backend.describe_self().await?;
        backend.limit = match backend.settings.attachment_limit {
            Some(l) => l,
            None => backend.derive_attachment_limit(me.network_interfaces).await,
        };
        backend
            .used
            .store(me.mappings.len() as u32, Ordering::Relaxed);
        info!(
            instance = %backend.identity.instance_id,
            server_tag = %backend.settings.server_tag,
            used = me.mappings.len(),
            limit = backend.limit,
            "AWS backend ready"
        );
        Ok(backend)
    }

    /// The `slipway:server` tag value of this server's volumes and snapshots.
    pub fn server_tag(&self) -> &str {
        &self.settings.server_tag
    }

    /// This instance.
    pub fn identity(&self) -> &InstanceIdentity {
        &self.identity
    }

    /// The attachment limit from DescribeInstanceTypes: `MaximumEbsAttachments`, less the
    /// network interfaces beyond the primary one where the limit is shared with them.
    async fn derive_attachment_limit(&self, network_interfaces: u32) -> u32 {
        let out = self
            .ec2
            .describe_instance_types()
            .instance_types(self.identity.instance_type.as_str().into())
            .send()
            .await;
        let info = match out {
            Ok(o) => o
                .instance_types()
                .first()
                .and_then(|t| t.ebs_info().cloned()),
            Err(e) => {
                let e = AwsError::from_sdk("DescribeInstanceTypes", e);
                warn!(error = %e, "cannot read the instance type's EBS attachment limit; assuming {FALLBACK_ATTACHMENT_LIMIT} (set aws.attachment_limit to override)");
                return FALLBACK_ATTACHMENT_LIMIT;
            }
        };
        let Some(max) = info
            .as_ref()
            .and_then(|i| i.maximum_ebs_attachments())
            .filter(|m| *m > 0)
        else {
            warn!(instance_type = %self.identity.instance_type, "DescribeInstanceTypes has no MaximumEbsAttachments; assuming {FALLBACK_ATTACHMENT_LIMIT}");
            return FALLBACK_ATTACHMENT_LIMIT;
        };
        let shared = info
            .as_ref()
            .and_then(|i| i.attachment_limit_type())
            .is_some_and(|t| t.as_str() == "shared");
        let extra_enis = network_interfaces.saturating_sub(1);
        let limit = if shared {
            (max as u32).saturating_sub(extra_enis).max(1)
        } else {
            max as u32
        };
        info!(instance_type = %self.identity.instance_type, max, shared, extra_enis, limit, "EBS attachment limit");
        limit
    }

    pub(crate) fn disk_lock(&self, source: &str, disk: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.disk_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks
            .entry((source.to_string(), disk.to_string()))
            .or_default()
            .clone()
    }
}

#[async_trait]
impl VolumeBackend for AwsBackend {
    fn name(&self) -> &'static str {
        "aws"
    }

    async fn adopt(&self) -> Result<Vec<VolumeHandle>, BackendError> {
        Ok(self.adopt_volumes().await?)
    }

    async fn ensure(&self, req: &VolumeRequest) -> Result<VolumeHandle, BackendError> {
        Ok(self.ensure_volume(req).await?)
    }

    fn attachment_slots(&self) -> Option<(u32, u32)> {
        Some((self.used.load(Ordering::Relaxed), self.limit))
    }
}

#[async_trait]
impl SnapshotBackend for AwsBackend {
    async fn can_snapshot(&self, volume_ids: &[String]) -> Result<bool, BackendError> {
        Ok(self.pending_full(volume_ids).await?.is_none())
    }

    async fn create(&self, req: &SnapshotRequest) -> Result<Vec<RemoteSnapshot>, BackendError> {
        Ok(self.create_snapshots(req).await?)
    }

    async fn list(&self, source: Option<&str>) -> Result<Vec<RemoteRestorePoint>, BackendError> {
        Ok(self.list_restore_points(source).await?)
    }

    async fn delete(&self, rp_id: &str) -> Result<(), BackendError> {
        Ok(self.delete_restore_point(rp_id).await?)
    }

    async fn block_hashes(&self, snapshot_id: &str) -> Result<Vec<(u64, String)>, BackendError> {
        Ok(self.snapshot_block_hashes(snapshot_id).await?)
    }

    async fn changed_bytes(&self, first: &str, second: &str) -> Result<u64, BackendError> {
        Ok(self.snapshot_changed_bytes(first, second).await?)
    }
}
