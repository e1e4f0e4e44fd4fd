//! [`AwsBackend`]: the server's volume and snapshot traits on EC2 and EBS.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::metrics::AwsApiMetrics;
use async_trait::async_trait;
use aws_config::timeout::TimeoutConfig;
use aws_config::{Region, SdkConfig};
use slipway_backend::{
    BackendError, RemoteRestorePoint, RemoteSnapshot, SnapshotBackend, SnapshotRequest,
    VolumeBackend, VolumeHandle, VolumeRequest,
};
use tracing::{info, warn};

use crate::api::ApiInterceptor;
use crate::budget::{Clock, Refresh, SystemClock};
use crate::device::DeviceResolver;
use crate::error::AwsError;
use crate::identity::InstanceIdentity;
use crate::settings::AwsSettings;
use crate::snapshots::SnapCache;

/// Attachments a Nitro instance allows when DescribeInstanceTypes cannot say: 28 shared
/// between network interfaces, EBS volumes and NVMe instance store, less the primary network
/// interface.
pub const FALLBACK_ATTACHMENT_LIMIT: u32 = 27;

/// EBS attachments (root volume included) an instance allows, from DescribeInstanceTypes'
/// `MaximumEbsAttachments` and `AttachmentLimitType`, given its network interfaces. The one
/// rule the server (its slot check) and the fleet planner (`max_disks_per_server`) both use.
///
/// AWS reports `MaximumEbsAttachments` of a shared-limit type with the primary network
/// interface already taken off (27 for an m5.large, of 28 slots); every further interface
/// takes one more. A dedicated limit is the EBS limit alone.
pub fn attachment_limit(max_ebs_attachments: u32, shared: bool, network_interfaces: u32) -> u32 {
    if shared {
        max_ebs_attachments
            .saturating_sub(network_interfaces.saturating_sub(1))
            .max(1)
    } else {
        max_ebs_attachments
    }
}

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
    /// Slots held for volumes being created (checked and taken under `attach_lock`), until
    /// their attachment is requested.
    pub(crate) creating: AtomicU32,
    /// One lock per (source, disk): ensure() and adopt() never race on the same disk.
    pub(crate) disk_locks: Mutex<DiskLocks>,
    /// Volume id → volume type, for the pending-snapshot limits.
    pub(crate) volume_types: Mutex<HashMap<String, String>>,
    /// Every request of `ec2` and `ebs` is counted here (when built by [`AwsBackend::new`]).
    pub(crate) api_metrics: AwsApiMetrics,
    /// Time of the describe budget (a manual clock in tests).
    pub(crate) clock: Arc<dyn Clock>,
    /// This server's restore-point snapshots, from one shared DescribeSnapshots.
    pub(crate) snap_cache: tokio::sync::Mutex<SnapCache>,
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
        let metrics = AwsApiMetrics::new();
        let counted = ApiInterceptor {
            metrics: metrics.clone(),
        };
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
                .interceptor(counted.clone())
                .build(),
        );
        let ebs = aws_sdk_ebs::Client::from_conf(
            aws_sdk_ebs::config::Builder::from(&sdk)
                .region(region)
                .retry_config(retry)
                .timeout_config(timeouts)
                .interceptor(counted)
                .build(),
        );
        Self::build(settings, identity, resolver, ec2, ebs, metrics).await
    }

    /// Like [`new`](Self::new) with clients configured by the caller (tests use mocked ones);
    /// their requests are not counted unless they carry an [`ApiInterceptor`] on
    /// [`api_metrics`](Self::api_metrics).
    pub async fn from_clients(
        settings: AwsSettings,
        identity: InstanceIdentity,
        resolver: Arc<dyn DeviceResolver>,
        ec2: aws_sdk_ec2::Client,
        ebs: aws_sdk_ebs::Client,
    ) -> Result<Self, AwsError> {
        Self::build(settings, identity, resolver, ec2, ebs, AwsApiMetrics::new()).await
    }

    async fn build(
        mut settings: AwsSettings,
        identity: InstanceIdentity,
        resolver: Arc<dyn DeviceResolver>,
        ec2: aws_sdk_ec2::Client,
        ebs: aws_sdk_ebs::Client,
        api_metrics: AwsApiMetrics,
    ) -> Result<Self, AwsError> {
        if settings.server_tag.is_empty() {
            settings.server_tag = identity.instance_id.clone();
        }
        let settings_describe_interval = settings.describe_interval;
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
            creating: AtomicU32::new(0),
            disk_locks: Mutex::new(HashMap::new()),
            volume_types: Mutex::new(HashMap::new()),
            api_metrics,
            clock: Arc::new(SystemClock::default()),
            snap_cache: tokio::sync::Mutex::new(SnapCache::new(Refresh::new(
                settings_describe_interval,
            ))),
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

    /// The request metrics of this backend's clients (the server registers them).
    pub fn api_metrics(&self) -> &AwsApiMetrics {
        &self.api_metrics
    }

    /// Replaces the clock of the describe budget (tests simulate time with a
    /// [`ManualClock`](crate::ManualClock)).
    pub fn set_clock(&mut self, clock: Arc<dyn Clock>) {
        self.clock = clock;
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
        let limit = attachment_limit(max as u32, shared, network_interfaces);
        info!(instance_type = %self.identity.instance_type, max, shared, network_interfaces, limit, "EBS attachment limit");
        limit
    }

    /// CreateTags `slipway:tls-fingerprint = fingerprint` on this instance, so an operator
    /// reads the fingerprint agents must pin from EC2 (console, `aws ec2 describe-tags`)
    /// without a shell on the server.
    pub async fn tag_fingerprint(&self, fingerprint: &str) -> Result<(), AwsError> {
        self.ec2
            .create_tags()
            .resources(&self.identity.instance_id)
            .tags(
                aws_sdk_ec2::types::Tag::builder()
                    .key(crate::tags::TLS_FINGERPRINT)
                    .value(fingerprint)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("CreateTags", e))?;
        info!(instance = %self.identity.instance_id, %fingerprint, "published the TLS fingerprint as an instance tag");
        Ok(())
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

    async fn publish_fingerprint(&self, fingerprint: &str) -> Result<(), BackendError> {
        Ok(self.tag_fingerprint(fingerprint).await?)
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
