//! Restore points as EBS snapshots: create (crash-consistent across the source's volumes where
//! EC2 allows), list from tags, delete, and the pending-snapshot limits.
//!
//! Listing and the pending counts are served from [`SnapCache`]: one DescribeSnapshots of
//! every restore-point snapshot of this server, repeated at most every `describe_interval`
//! (see `budget.rs`), kept current between refreshes with what this process created and
//! deleted. The scheduler asks for every connected source every second; without the cache
//! that was two DescribeSnapshots per source per second, and ten sources would exhaust the
//! account's describe bucket.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use aws_sdk_ec2::types::{
    CopyTagsFromSource, Filter, InstanceSpecification, ResourceType, Snapshot, Tag,
};
use slipway_backend::{RemoteRestorePoint, RemoteSnapshot, SnapshotRequest};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::backend::AwsBackend;
use crate::budget::Refresh;
use crate::error::{is_pending_snapshot_limit, sdk_code, AwsError};
use crate::tags;
use crate::volumes::pending_snapshot_limit;

fn filter(name: &str, values: &[&str]) -> Filter {
    let mut b = Filter::builder().name(name);
    for v in values {
        b = b.values(*v);
    }
    b.build()
}

fn tag_filter(key: &str, value: &str) -> Filter {
    filter(&format!("tag:{key}"), &[value])
}

/// This server's restore-point snapshots as the last shared DescribeSnapshots saw them, plus
/// what this process created or deleted since.
#[derive(Debug)]
pub(crate) struct SnapCache {
    snaps: Option<Vec<SnapInfo>>,
    refresh: Refresh,
}

impl SnapCache {
    pub(crate) fn new(refresh: Refresh) -> Self {
        SnapCache {
            snaps: None,
            refresh,
        }
    }
}

/// A snapshot as the backend needs it.
#[derive(Debug, Clone)]
pub(crate) struct SnapInfo {
    id: String,
    volume_id: String,
    state: String,
    tags: BTreeMap<String, String>,
    start_ns: i128,
}

impl SnapInfo {
    fn from_sdk(s: &Snapshot) -> Self {
        SnapInfo {
            id: s.snapshot_id().unwrap_or_default().to_string(),
            volume_id: s.volume_id().unwrap_or_default().to_string(),
            state: s
                .state()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            tags: tags::to_map(s.tags()),
            start_ns: s.start_time().map(|t| t.as_nanos()).unwrap_or(0),
        }
    }
}

/// (volume id, pending snapshots, limit) of the first volume at its limit.
pub(crate) type Full = (String, u32, u32);

impl AwsBackend {
    /// The restore-point tags every snapshot of `req` carries (the disk id is added per
    /// snapshot), then the user's tags.
    fn rp_tags(&self, req: &SnapshotRequest) -> Vec<(String, String)> {
        let mut t = vec![
            (tags::SOURCE_ID.to_string(), req.source.clone()),
            (tags::RESTORE_POINT.to_string(), req.rp_id.clone()),
            (tags::MARKER.to_string(), req.marker_id.to_string()),
            (
                tags::CREATED_MS.to_string(),
                req.created_unix_ms.to_string(),
            ),
            (tags::TRIGGER.to_string(), req.trigger.clone()),
            (tags::SERVER.to_string(), self.settings.server_tag.clone()),
        ];
        t.extend(
            self.settings
                .tags
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        t
    }

    fn description(req: &SnapshotRequest) -> String {
        format!(
            "slipway restore point {} of source {} (marker {})",
            req.rp_id, req.source, req.marker_id
        )
    }

    /// Volume types of the given volumes (cached from earlier calls, else DescribeVolumes).
    async fn volume_types_of(&self, ids: &[String]) -> Result<HashMap<String, String>, AwsError> {
        let known: HashMap<String, String> = {
            let types = self.volume_types.lock().unwrap_or_else(|p| p.into_inner());
            ids.iter()
                .filter_map(|i| types.get(i).map(|t| (i.clone(), t.clone())))
                .collect()
        };
        let missing: Vec<String> = ids
            .iter()
            .filter(|i| !known.contains_key(*i))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(known);
        }
        self.describe_volume_ids(&missing).await?;
        let types = self.volume_types.lock().unwrap_or_else(|p| p.into_inner());
        Ok(ids
            .iter()
            .filter_map(|i| types.get(i).map(|t| (i.clone(), t.clone())))
            .collect())
    }

    /// The first volume that has as many pending snapshots as it may (EBS: 5 for gp2/gp3/io*,
    /// 1 for st1/sc1; `max_pending_snapshots` may lower it), or `None` if every one can take a
    /// snapshot now.
    pub(crate) async fn pending_full(
        &self,
        volume_ids: &[String],
    ) -> Result<Option<Full>, AwsError> {
        if volume_ids.is_empty() {
            return Ok(None);
        }
        let types = self.volume_types_of(volume_ids).await?;
        // Only restore-point snapshots of this server count: others on these volumes are not
        // expected, and if there are some, EBS refuses the create and `create()` says so.
        let snaps = self.cached_snapshots().await?;
        let mut pending: HashMap<&str, u32> = HashMap::new();
        for s in &snaps {
            if s.state == "pending" {
                *pending.entry(s.volume_id.as_str()).or_default() += 1;
            }
        }
        for id in volume_ids {
            let vtype = types.get(id).map(String::as_str).unwrap_or("gp3");
            let mut limit = pending_snapshot_limit(vtype);
            if let Some(cap) = self.settings.max_pending_snapshots {
                limit = limit.min(cap);
            }
            let n = pending.get(id.as_str()).copied().unwrap_or(0);
            if n >= limit {
                info!(volume = %id, pending = n, limit, "snapshot limit reached; skipping");
                return Ok(Some((id.clone(), n, limit)));
            }
        }
        Ok(None)
    }

    /// `SnapshotBackend::create`.
    pub(crate) async fn create_snapshots(
        &self,
        req: &SnapshotRequest,
    ) -> Result<Vec<RemoteSnapshot>, AwsError> {
        if req.volumes.is_empty() {
            return Err(AwsError::permanent(
                "CreateSnapshots",
                format!("restore point {} has no volumes", req.rp_id),
            ));
        }
        let ids: Vec<String> = req.volumes.iter().map(|(_, v)| v.clone()).collect();
        let vols = self.describe_volume_ids(&ids).await?;
        let me = &self.identity.instance_id;
        let mut all_here = true;
        for (disk, id) in &req.volumes {
            let Some(v) = vols.iter().find(|v| &v.id == id) else {
                return Err(AwsError::permanent(
                    "CreateSnapshot",
                    format!("volume {id} of disk {disk} does not exist"),
                ));
            };
            all_here &= v.attachment_on(me) == Some("attached");
        }
        let snaps = if all_here {
            self.create_multi(req).await?
        } else {
            self.create_each(req).await?
        };
        self.remember_created(req, &snaps).await;
        info!(rp = %req.rp_id, source = %req.source, snapshots = snaps.len(), multi = all_here, "restore point snapshots started");
        Ok(snaps)
    }

    /// One CreateSnapshots call over this instance, every volume but the source's excluded:
    /// one crash-consistent point in time for all of its disks.
    async fn create_multi(&self, req: &SnapshotRequest) -> Result<Vec<RemoteSnapshot>, AwsError> {
        // The call snapshots "everything attached but the excluded": no attach may run between
        // reading the attachments and the call.
        let _g = self.attach_lock.lock().await;
        let me = self.describe_self().await?;
        let wanted: BTreeSet<&str> = req.volumes.iter().map(|(_, v)| v.as_str()).collect();
        let exclude: Vec<String> = me
            .mappings
            .iter()
            .filter(|(dev, vol)| {
                !wanted.contains(vol.as_str()) && me.root_device.as_deref() != Some(dev.as_str())
            })
            .map(|(_, vol)| vol.clone())
            .collect();
        let rp_tags = self.rp_tags(req);
        let out = self
            .ec2
            .create_snapshots()
            .instance_specification(
                InstanceSpecification::builder()
                    .instance_id(&self.identity.instance_id)
                    .exclude_boot_volume(true)
                    .set_exclude_data_volume_ids(Some(exclude))
                    .build(),
            )
            .description(Self::description(req))
            .copy_tags_from_source(CopyTagsFromSource::Volume)
            .tag_specifications(tags::spec(
                ResourceType::Snapshot,
                rp_tags.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            ))
            .send()
            .await
            .map_err(|e| self.snapshot_error("CreateSnapshots", &req.volumes[0].1, e))?;
        let mut created: Vec<(String, String, String, BTreeMap<String, String>)> = Vec::new();
        let mut extra = Vec::new();
        for s in out.snapshots() {
            let (Some(sid), Some(vid)) = (s.snapshot_id(), s.volume_id()) else {
                continue;
            };
            let state = s
                .state()
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|| "pending".into());
            if wanted.contains(vid) {
                created.push((sid.into(), vid.into(), state, tags::to_map(s.tags())));
            } else {
                extra.push(sid.to_string());
            }
        }
        for sid in extra {
            warn!(snapshot = %sid, rp = %req.rp_id, "CreateSnapshots included a volume of no disk of this source; deleting its snapshot");
            self.delete_snapshot(&sid).await?;
        }
        let missing: Vec<&str> = wanted
            .iter()
            .filter(|v| !created.iter().any(|c| c.1 == **v))
            .copied()
            .collect();
        if !missing.is_empty() {
            for c in &created {
                self.delete_snapshot(&c.0).await?;
            }
            return Err(AwsError::Conflict(format!(
                "CreateSnapshots did not snapshot volumes {missing:?} of restore point {}",
                req.rp_id
            )));
        }
        let mut result = Vec::with_capacity(req.volumes.len());
        for (disk, vid) in &req.volumes {
            let Some((sid, _, state, have)) = created.iter().find(|c| &c.1 == vid) else {
                continue;
            };
            // CopyTagsFromSource brings the volume's disk id along; where it did not (an
            // emulator, or a volume whose tags were edited), tag the snapshot here.
            if have.get(tags::DISK_ID) != Some(disk) {
                self.ec2
                    .create_tags()
                    .resources(sid)
                    .tags(Tag::builder().key(tags::DISK_ID).value(disk).build())
                    .send()
                    .await
                    .map_err(|e| AwsError::from_sdk("CreateTags", e))?;
            }
            result.push(RemoteSnapshot {
                disk: disk.clone(),
                snapshot_id: sid.clone(),
                volume_id: vid.clone(),
                state: state.clone(),
            });
        }
        Ok(result)
    }

    /// One CreateSnapshot per volume, all at once. If any fails, the ones made are deleted.
    async fn create_each(&self, req: &SnapshotRequest) -> Result<Vec<RemoteSnapshot>, AwsError> {
        let rp_tags = self.rp_tags(req);
        let mut set = JoinSet::new();
        for (i, (disk, vid)) in req.volumes.iter().enumerate() {
            let mut t = rp_tags.clone();
            t.push((tags::DISK_ID.to_string(), disk.clone()));
            let call = self
                .ec2
                .create_snapshot()
                .volume_id(vid)
                .description(Self::description(req))
                .tag_specifications(tags::spec(
                    ResourceType::Snapshot,
                    t.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                ));
            set.spawn(async move { (i, call.send().await) });
        }
        let mut made: Vec<Option<RemoteSnapshot>> = vec![None; req.volumes.len()];
        let mut first_err: Option<AwsError> = None;
        while let Some(joined) = set.join_next().await {
            let (i, res) = joined.map_err(|e| AwsError::Conflict(format!("snapshot task: {e}")))?;
            let (disk, vid) = &req.volumes[i];
            match res {
                Ok(out) => {
                    made[i] = out.snapshot_id().map(|sid| RemoteSnapshot {
                        disk: disk.clone(),
                        snapshot_id: sid.to_string(),
                        volume_id: vid.clone(),
                        state: out
                            .state()
                            .map(|s| s.as_str().to_string())
                            .unwrap_or_else(|| "pending".into()),
                    })
                }
                Err(e) => {
                    let e = self.snapshot_error("CreateSnapshot", vid, e);
                    // A pending-limit refusal says most about what to do next: keep that one.
                    if first_err.is_none() || matches!(e, AwsError::SnapshotsPending { .. }) {
                        first_err = Some(e);
                    }
                }
            }
        }
        if let Some(e) = first_err {
            for s in made.iter().flatten() {
                if let Err(de) = self.delete_snapshot(&s.snapshot_id).await {
                    warn!(snapshot = %s.snapshot_id, error = %de, "cannot delete the snapshot of a failed restore point");
                }
            }
            return Err(e);
        }
        made.into_iter()
            .enumerate()
            .map(|(i, s)| {
                s.ok_or_else(|| {
                    AwsError::permanent(
                        "CreateSnapshot",
                        format!("no snapshot id for volume {}", req.volumes[i].1),
                    )
                })
            })
            .collect()
    }

    fn snapshot_error<E, R>(
        &self,
        op: &str,
        volume_id: &str,
        e: aws_smithy_runtime_api::client::result::SdkError<E, R>,
    ) -> AwsError
    where
        E: aws_sdk_ec2::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + crate::error::HasStatus,
    {
        if is_pending_snapshot_limit(&e) {
            let vtype = self
                .volume_types
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(volume_id)
                .cloned()
                .unwrap_or_else(|| "gp3".into());
            let limit = pending_snapshot_limit(&vtype);
            AwsError::SnapshotsPending {
                volume_id: volume_id.to_string(),
                pending: limit,
                limit,
            }
        } else {
            AwsError::from_sdk(op, e)
        }
    }

    async fn forget_snapshot(&self, id: &str) {
        if let Some(snaps) = self.snap_cache.lock().await.snaps.as_mut() {
            snaps.retain(|s| s.id != id);
        }
    }

    /// DeleteSnapshot; a snapshot that is already gone is fine.
    async fn delete_snapshot(&self, id: &str) -> Result<(), AwsError> {
        match self.ec2.delete_snapshot().snapshot_id(id).send().await {
            Ok(_) => Ok(()),
            Err(e) if sdk_code(&e) == Some("InvalidSnapshot.NotFound") => Ok(()),
            Err(e) if sdk_code(&e) == Some("InvalidSnapshot.InUse") => {
                Err(AwsError::SnapshotInUse {
                    snapshot_ids: vec![id.to_string()],
                })
            }
            Err(e) => Err(AwsError::from_sdk("DeleteSnapshot", e)),
        }
    }

    /// Every restore-point snapshot of this server: the shared cache, refreshed by one
    /// DescribeSnapshots when `describe_interval` has passed (callers meanwhile wait for it,
    /// so concurrent callers share one call). A failed refresh backs off and, if an earlier
    /// answer exists, serves that.
    pub(crate) async fn cached_snapshots(&self) -> Result<Vec<SnapInfo>, AwsError> {
        let mut c = self.snap_cache.lock().await;
        let now = self.clock.now_ms();
        if c.refresh.due(now) {
            match self.restore_point_snapshots(vec![]).await {
                Ok(snaps) => {
                    c.snaps = Some(snaps);
                    c.refresh.succeeded(self.clock.now_ms());
                }
                Err(e) => {
                    c.refresh.failed(self.clock.now_ms());
                    if c.snaps.is_none() {
                        return Err(e);
                    }
                    warn!(error = %e, failures = c.refresh.failures(), "refreshing the restore-point snapshots failed; using the previous answer");
                }
            }
        }
        match &c.snaps {
            Some(s) => Ok(s.clone()),
            None => Err(AwsError::Unavailable {
                op: "DescribeSnapshots".into(),
                message: "restore-point snapshots not known yet (the last describe failed; retrying with backoff)".into(),
            }),
        }
    }

    /// Adds snapshots this process just created to the cache (as DescribeSnapshots would show
    /// them), so listing and pending counts see them before the next refresh.
    async fn remember_created(&self, req: &SnapshotRequest, made: &[RemoteSnapshot]) {
        let mut c = self.snap_cache.lock().await;
        let Some(snaps) = c.snaps.as_mut() else {
            return;
        };
        let base: BTreeMap<String, String> = self.rp_tags(req).into_iter().collect();
        for m in made {
            if snaps.iter().any(|s| s.id == m.snapshot_id) {
                continue;
            }
            let mut tags = base.clone();
            tags.insert(tags::DISK_ID.to_string(), m.disk.clone());
            snaps.push(SnapInfo {
                id: m.snapshot_id.clone(),
                volume_id: m.volume_id.clone(),
                state: m.state.clone(),
                tags,
                start_ns: i128::from(req.created_unix_ms) * 1_000_000,
            });
        }
    }

    /// This server's restore-point snapshots, every page.
    async fn restore_point_snapshots(&self, extra: Vec<Filter>) -> Result<Vec<SnapInfo>, AwsError> {
        let mut filters = vec![
            tag_filter(tags::SERVER, &self.settings.server_tag),
            filter("tag-key", &[tags::RESTORE_POINT]),
        ];
        filters.extend(extra);
        let snaps = self
            .ec2
            .describe_snapshots()
            .owner_ids("self")
            .set_filters(Some(filters))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| AwsError::from_sdk("DescribeSnapshots", e))?;
        Ok(snaps.iter().map(SnapInfo::from_sdk).collect())
    }

    /// `SnapshotBackend::list`.
    pub(crate) async fn list_restore_points(
        &self,
        source: Option<&str>,
    ) -> Result<Vec<RemoteRestorePoint>, AwsError> {
        let snaps = self
            .cached_snapshots()
            .await?
            .into_iter()
            .filter(|s| {
                source
                    .is_none_or(|src| s.tags.get(tags::SOURCE_ID).map(String::as_str) == Some(src))
            })
            .collect();
        Ok(group_restore_points(snaps))
    }

    /// `SnapshotBackend::delete`.
    pub(crate) async fn delete_restore_point(&self, rp_id: &str) -> Result<(), AwsError> {
        let snaps = self
            .restore_point_snapshots(vec![tag_filter(tags::RESTORE_POINT, rp_id)])
            .await?;
        // Checked on this fresh describe too, not only on the cached list the server's
        // policy reads: a keep tag set since the last refresh still stops the delete.
        if let Some(keep) = snaps.iter().find_map(|s| s.tags.get(tags::KEEP)) {
            return Err(AwsError::Kept {
                rp_id: rp_id.to_string(),
                keep: keep.clone(),
            });
        }
        // Every snapshot is tried: one an image uses is kept (EC2 refuses it), the others go,
        // and the restore point is reported in use so its manifest stays and the prune is
        // retried later.
        let mut in_use = Vec::new();
        for s in &snaps {
            match self.delete_snapshot(&s.id).await {
                Ok(()) => self.forget_snapshot(&s.id).await,
                Err(AwsError::SnapshotInUse { snapshot_ids }) => in_use.extend(snapshot_ids),
                Err(e) => return Err(e),
            }
        }
        // Also what the cache holds under this id (a snapshot the describe did not show yet).
        let cached: Vec<String> = self
            .snap_cache
            .lock()
            .await
            .snaps
            .iter()
            .flatten()
            .filter(|s| s.tags.get(tags::RESTORE_POINT).map(String::as_str) == Some(rp_id))
            .map(|s| s.id.clone())
            .collect();
        let cached: Vec<String> = cached
            .into_iter()
            .filter(|id| !in_use.contains(id))
            .collect();
        for id in cached {
            match self.delete_snapshot(&id).await {
                Ok(()) => self.forget_snapshot(&id).await,
                Err(AwsError::SnapshotInUse { snapshot_ids }) => in_use.extend(snapshot_ids),
                Err(e) => return Err(e),
            }
        }
        if !in_use.is_empty() {
            info!(rp = rp_id, snapshots = ?in_use, "restore point in use by an image; kept for now");
            return Err(AwsError::SnapshotInUse {
                snapshot_ids: in_use,
            });
        }
        info!(rp = rp_id, snapshots = snaps.len(), "restore point deleted");
        Ok(())
    }
}

/// Groups snapshots into restore points by their tags, oldest first. Snapshots with missing or
/// malformed tags are left out (with a warning); of several snapshots of one disk in one
/// restore point (a retried CreateSnapshot), the best state wins, then the oldest.
fn group_restore_points(snaps: Vec<SnapInfo>) -> Vec<RemoteRestorePoint> {
    let mut rps: BTreeMap<String, (RemoteRestorePoint, BTreeMap<String, SnapInfo>)> =
        BTreeMap::new();
    for s in snaps {
        let t = &s.tags;
        let parsed = (|| {
            Some((
                t.get(tags::RESTORE_POINT)?.clone(),
                t.get(tags::SOURCE_ID)?.clone(),
                t.get(tags::DISK_ID)?.clone(),
                t.get(tags::CREATED_MS)?.parse::<u64>().ok()?,
                t.get(tags::MARKER)?.parse::<u64>().ok()?,
                t.get(tags::TRIGGER).cloned().unwrap_or_default(),
            ))
        })();
        let Some((rp_id, source, disk, created, marker, trigger)) = parsed else {
            warn!(snapshot = %s.id, "restore-point snapshot with missing or malformed tags; ignored");
            continue;
        };
        let entry = rps.entry(rp_id.clone()).or_insert_with(|| {
            (
                RemoteRestorePoint {
                    rp_id,
                    source,
                    created_unix_ms: created,
                    marker_id: marker,
                    trigger,
                    snapshots: vec![],
                    keep: None,
                },
                BTreeMap::new(),
            )
        });
        // One snapshot of the point carrying the tag keeps the whole point.
        // A finalized cutover's keep wins over any other reason to keep.
        if let Some(k) = t.get(tags::KEEP) {
            if entry.0.keep.as_deref() != Some(tags::KEEP_FINALIZED) {
                entry.0.keep = Some(k.clone());
            }
        }
        let rank = |st: &str| match st {
            "completed" => 0,
            "pending" => 1,
            _ => 2,
        };
        match entry.1.get(&disk) {
            Some(prev)
                if (rank(&prev.state), prev.start_ns, &prev.id)
                    <= (rank(&s.state), s.start_ns, &s.id) => {}
            _ => {
                entry.1.insert(disk, s);
            }
        }
    }
    let mut out: Vec<RemoteRestorePoint> = rps
        .into_values()
        .map(|(mut rp, disks)| {
            rp.snapshots = disks
                .into_iter()
                .map(|(disk, s)| RemoteSnapshot {
                    disk,
                    snapshot_id: s.id,
                    volume_id: s.volume_id,
                    state: s.state,
                })
                .collect();
            rp
        })
        .collect();
    out.sort_by(|a, b| (a.created_unix_ms, &a.rp_id).cmp(&(b.created_unix_ms, &b.rp_id)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, rp: &str, disk: &str, created: u64, state: &str, start: i128) -> SnapInfo {
        let mut tags = BTreeMap::new();
        tags.insert(tags::RESTORE_POINT.to_string(), rp.to_string());
        tags.insert(tags::SOURCE_ID.to_string(), "src".to_string());
        tags.insert(tags::DISK_ID.to_string(), disk.to_string());
        tags.insert(tags::CREATED_MS.to_string(), created.to_string());
        tags.insert(tags::MARKER.to_string(), "7".to_string());
        tags.insert(tags::TRIGGER.to_string(), "scheduled".to_string());
        SnapInfo {
            id: id.into(),
            volume_id: format!("vol-{disk}"),
            state: state.into(),
            tags,
            start_ns: start,
        }
    }

    #[test]
    fn groups_oldest_first_and_dedupes_disks() {
        let mut bad = snap("snap-bad", "rp-x", "a", 1, "completed", 0);
        bad.tags.remove(tags::MARKER);
        let rps = group_restore_points(vec![
            snap("snap-3", "rp-2", "a", 2000, "pending", 5),
            snap("snap-1", "rp-1", "b", 1000, "completed", 1),
            snap("snap-2", "rp-1", "a", 1000, "error", 1),
            snap("snap-4", "rp-1", "a", 1000, "completed", 2),
            bad,
        ]);
        assert_eq!(rps.len(), 2);
        assert_eq!(rps[0].rp_id, "rp-1");
        assert_eq!(rps[0].marker_id, 7);
        assert_eq!(rps[0].trigger, "scheduled");
        let ids: Vec<_> = rps[0]
            .snapshots
            .iter()
            .map(|s| (s.disk.as_str(), s.snapshot_id.as_str()))
            .collect();
        assert_eq!(ids, [("a", "snap-4"), ("b", "snap-1")]);
        assert_eq!(rps[1].snapshots[0].state, "pending");
    }

    #[test]
    fn a_keep_tag_on_any_snapshot_keeps_the_point_and_finalized_wins() {
        let mut a = snap("snap-1", "rp-1", "a", 1000, "completed", 1);
        a.tags.insert(tags::KEEP.into(), "operator".into());
        let mut b = snap("snap-2", "rp-1", "b", 1000, "completed", 1);
        b.tags
            .insert(tags::KEEP.into(), tags::KEEP_FINALIZED.into());
        let c = snap("snap-3", "rp-2", "a", 2000, "completed", 1);
        let rps = group_restore_points(vec![a, b, c]);
        assert_eq!(rps[0].keep.as_deref(), Some(tags::KEEP_FINALIZED));
        assert!(rps[0].finalizes());
        assert_eq!(rps[1].keep, None);
        assert!(!rps[1].finalizes());
    }
}
