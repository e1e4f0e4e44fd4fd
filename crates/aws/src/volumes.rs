//! One EBS volume per source disk: find it by its tags, or create it; attach it here; find its
//! block device.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use aws_sdk_ec2::types::{Filter, ResourceType, Volume, VolumeType};
use aws_smithy_types::DateTime;
use slipway_backend::{VolumeHandle, VolumeRequest};
use tracing::{debug, info, warn};

use crate::backend::AwsBackend;
use crate::error::{sdk_code, AwsError};
use crate::tags;

/// The EBS snapshot block size, the unit of the EBS direct APIs.
pub const EBS_BLOCK_SIZE: u64 = 512 * 1024;

const GIB: u64 = 1 << 30;

/// Size in GiB of the volume for a disk of `size_bytes`: rounded up to a whole GiB and to the
/// type's minimum (125 GiB for st1 and sc1, 1 GiB otherwise).
pub fn volume_size_gib(size_bytes: u64, volume_type: &str) -> u64 {
    let min = match volume_type {
        "st1" | "sc1" => 125,
        _ => 1,
    };
    size_bytes.div_ceil(GIB).max(min)
}

/// Snapshots of one volume that EBS lets be pending at once: 1 for st1 and sc1, 5 otherwise.
pub fn pending_snapshot_limit(volume_type: &str) -> u32 {
    match volume_type {
        "st1" | "sc1" => 1,
        _ => 5,
    }
}

/// Device names tried for attachments, in order: `/dev/sdf` … `/dev/sdz` (the names AWS
/// recommends for EBS data volumes on Linux), then the two-letter names AWS lists as available,
/// `/dev/xvdba` … `/dev/xvddz`. On Nitro the name is only a label (the NVMe device is found by
/// volume id), but it must be unique on the instance.
pub fn device_names() -> impl Iterator<Item = String> {
    let single = ('f'..='z').map(|c| format!("/dev/sd{c}"));
    let double = ('b'..='d').flat_map(|a| ('a'..='z').map(move |b| format!("/dev/xvd{a}{b}")));
    single.chain(double)
}

/// The device a name refers to: `/dev/xvdf` and `/dev/sdf` are the same slot, `/dev/sda1` is
/// `sda`.
pub fn device_key(name: &str) -> String {
    let n = name.strip_prefix("/dev/").unwrap_or(name);
    let n = n.trim_end_matches(|c: char| c.is_ascii_digit());
    match n.strip_prefix("xvd") {
        Some(rest) if rest.len() == 1 => format!("sd{rest}"),
        _ => n.to_string(),
    }
}

/// A slot taken for a volume being created; given back when dropped.
struct HeldSlot<'a>(&'a std::sync::atomic::AtomicU32);

impl Drop for HeldSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the backend needs to know about a volume.
#[derive(Debug, Clone)]
pub(crate) struct VolInfo {
    pub id: String,
    pub state: String,
    pub size_gib: u64,
    pub volume_type: String,
    pub tags: BTreeMap<String, String>,
    /// (instance id, device, attachment state)
    pub attachments: Vec<(String, String, String)>,
    pub create_time: Option<DateTime>,
}

impl VolInfo {
    fn from_sdk(v: &Volume) -> Self {
        VolInfo {
            id: v.volume_id().unwrap_or_default().to_string(),
            state: v
                .state()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            size_gib: v.size().unwrap_or(0).max(0) as u64,
            volume_type: v
                .volume_type()
                .map(|t| t.as_str().to_string())
                .unwrap_or_default(),
            tags: tags::to_map(v.tags()),
            attachments: v
                .attachments()
                .iter()
                .map(|a| {
                    (
                        a.instance_id().unwrap_or_default().to_string(),
                        a.device().unwrap_or_default().to_string(),
                        a.state()
                            .map(|s| s.as_str().to_string())
                            .unwrap_or_default(),
                    )
                })
                .collect(),
            create_time: v.create_time().cloned(),
        }
    }

    /// The attachment state on `instance`, if attached there.
    pub fn attachment_on(&self, instance: &str) -> Option<&str> {
        self.attachments
            .iter()
            .find(|(i, _, _)| i == instance)
            .map(|(_, _, s)| s.as_str())
    }

    fn source_disk(&self) -> Option<(String, String)> {
        Some((
            self.tags.get(tags::SOURCE_ID)?.clone(),
            self.tags.get(tags::DISK_ID)?.clone(),
        ))
    }

    pub(crate) fn usable(&self) -> bool {
        !matches!(self.state.as_str(), "deleting" | "deleted" | "error")
    }
}

/// This instance as DescribeInstances shows it.
#[derive(Debug, Clone)]
pub(crate) struct SelfInfo {
    /// (device name, volume id) of every EBS attachment, root included.
    pub mappings: Vec<(String, String)>,
    pub root_device: Option<String>,
    pub network_interfaces: u32,
    /// The instance's tags (`slipway:template`, `slipway:server-index` find its identity
    /// volume).
    pub tags: BTreeMap<String, String>,
}

/// One step of a wait loop.
pub(crate) enum Step<T> {
    Done(T),
    Wait,
    Fail(AwsError),
}

pub(crate) fn filter(name: &str, values: &[&str]) -> Filter {
    let mut b = Filter::builder().name(name);
    for v in values {
        b = b.values(*v);
    }
    b.build()
}

impl AwsBackend {
    /// DescribeVolumes with filters, every page.
    pub(crate) async fn describe_volumes(
        &self,
        filters: Vec<Filter>,
    ) -> Result<Vec<VolInfo>, AwsError> {
        let vols = self
            .ec2
            .describe_volumes()
            .set_filters(Some(filters))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| AwsError::from_sdk("DescribeVolumes", e))?;
        let vols: Vec<VolInfo> = vols.iter().map(VolInfo::from_sdk).collect();
        self.remember_types(&vols);
        Ok(vols)
    }

    /// DescribeVolumes of given ids; ids AWS does not know are left out (right after
    /// CreateVolume the id may not be visible yet: EC2 is eventually consistent).
    pub(crate) async fn describe_volume_ids(
        &self,
        ids: &[String],
    ) -> Result<Vec<VolInfo>, AwsError> {
        let out = self
            .ec2
            .describe_volumes()
            .set_volume_ids(Some(ids.to_vec()))
            .send()
            .await;
        let out = match out {
            Ok(o) => o,
            // One unknown id fails the whole call: ask for each on its own to keep the others.
            Err(e) if sdk_code(&e) == Some("InvalidVolume.NotFound") => {
                let mut found = Vec::new();
                if ids.len() > 1 {
                    for id in ids {
                        found.extend(
                            Box::pin(self.describe_volume_ids(std::slice::from_ref(id))).await?,
                        );
                    }
                }
                return Ok(found);
            }
            Err(e) => return Err(AwsError::from_sdk("DescribeVolumes", e)),
        };
        let vols: Vec<VolInfo> = out.volumes().iter().map(VolInfo::from_sdk).collect();
        self.remember_types(&vols);
        Ok(vols)
    }

    fn remember_types(&self, vols: &[VolInfo]) {
        let mut types = self.volume_types.lock().unwrap_or_else(|p| p.into_inner());
        for v in vols.iter().filter(|v| !v.volume_type.is_empty()) {
            types.insert(v.id.clone(), v.volume_type.clone());
        }
    }

    async fn describe_volume(&self, id: &str) -> Result<Option<VolInfo>, AwsError> {
        Ok(self
            .describe_volume_ids(&[id.to_string()])
            .await?
            .into_iter()
            .find(|v| v.id == id))
    }

    /// DescribeInstances of this instance.
    pub(crate) async fn describe_self(&self) -> Result<SelfInfo, AwsError> {
        let me = &self.identity.instance_id;
        let out = self
            .ec2
            .describe_instances()
            .instance_ids(me)
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("DescribeInstances", e))?;
        let inst = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(me.as_str()))
            .ok_or_else(|| {
                AwsError::permanent(
                    "DescribeInstances",
                    format!("this instance {me} is not known to EC2"),
                )
            })?;
        Ok(SelfInfo {
            mappings: inst
                .block_device_mappings()
                .iter()
                .filter_map(|m| {
                    Some((
                        m.device_name()?.to_string(),
                        m.ebs()?.volume_id()?.to_string(),
                    ))
                })
                .collect(),
            root_device: inst.root_device_name().map(str::to_string),
            network_interfaces: inst.network_interfaces().len().max(1) as u32,
            tags: tags::to_map(inst.tags()),
        })
    }

    /// The state name of another instance (`running`, `stopped`, …); `terminated` if EC2 no
    /// longer knows it.
    async fn instance_state(&self, id: &str) -> Result<String, AwsError> {
        let out = self.ec2.describe_instances().instance_ids(id).send().await;
        let out = match out {
            Ok(o) => o,
            Err(e) if sdk_code(&e) == Some("InvalidInstanceID.NotFound") => {
                return Ok("terminated".into())
            }
            Err(e) => return Err(AwsError::from_sdk("DescribeInstances", e)),
        };
        Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(id))
            .and_then(|i| i.state())
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap_or_else(|| "terminated".into()))
    }

    /// Polls a volume until `step` says done or fails, or the wait bound passes.
    pub(crate) async fn wait_volume<T>(
        &self,
        id: &str,
        what: &str,
        step: impl Fn(Option<&VolInfo>) -> Step<T>,
    ) -> Result<T, AwsError> {
        let started = Instant::now();
        let bound = self.settings.wait_timeout;
        loop {
            let v = self.describe_volume(id).await?;
            match step(v.as_ref()) {
                Step::Done(t) => return Ok(t),
                Step::Fail(e) => return Err(e),
                Step::Wait => {}
            }
            if started.elapsed() + self.settings.poll_interval > bound {
                return Err(AwsError::Timeout {
                    what: format!("{id} to be {what}"),
                    after: bound,
                });
            }
            debug!(volume = id, state = ?v.map(|v| v.state), "waiting for {what}");
            tokio::time::sleep(self.settings.poll_interval).await;
        }
    }

    /// Finds the replica volume of a source disk: tagged with its source and disk, of this
    /// server (or attached here). Several (a crash between two creates): the oldest.
    pub(crate) async fn find_replica(
        &self,
        source: &str,
        disk: &str,
    ) -> Result<Option<VolInfo>, AwsError> {
        let vols = self
            .describe_volumes(vec![
                filter(&format!("tag:{}", tags::SOURCE_ID), &[source]),
                filter(&format!("tag:{}", tags::DISK_ID), &[disk]),
                filter(&format!("tag:{}", tags::ROLE), &[tags::ROLE_REPLICA]),
            ])
            .await?;
        let me = &self.identity.instance_id;
        let mut mine: Vec<VolInfo> = vols
            .into_iter()
            .filter(|v| v.usable())
            .filter(|v| {
                v.tags.get(tags::SERVER) == Some(&self.settings.server_tag)
                    || v.attachment_on(me).is_some()
            })
            .collect();
        mine.sort_by(|a, b| {
            (a.create_time.map(|t| t.as_nanos()), &a.id)
                .cmp(&(b.create_time.map(|t| t.as_nanos()), &b.id))
        });
        if mine.len() > 1 {
            let others: Vec<&str> = mine[1..].iter().map(|v| v.id.as_str()).collect();
            warn!(source, disk, using = %mine[0].id, ?others, "several replica volumes for one disk; using the oldest (delete the others once checked)");
        }
        Ok(mine.into_iter().next())
    }

    /// CreateVolume for a source disk and wait until it is available.
    async fn create_replica(&self, req: &VolumeRequest) -> Result<VolInfo, AwsError> {
        let s = &self.settings;
        let volume_type = s.volume_type_for(req.size.div_ceil(GIB)).to_string();
        let size_gib = volume_size_gib(req.size, &volume_type);
        let size = i32::try_from(size_gib).map_err(|_| {
            AwsError::permanent("CreateVolume", format!("{size_gib} GiB is too large"))
        })?;
        let mut tag_list: Vec<(&str, &str)> = vec![
            (tags::SOURCE_ID, &req.source),
            (tags::DISK_ID, &req.disk),
            (tags::ROLE, tags::ROLE_REPLICA),
            (tags::SERVER, &s.server_tag),
        ];
        tag_list.extend(s.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut call = self
            .ec2
            .create_volume()
            .availability_zone(&self.identity.availability_zone)
            .size(size)
            .volume_type(VolumeType::from(volume_type.as_str()))
            .encrypted(true)
            .set_kms_key_id(s.kms_key_id.clone())
            .tag_specifications(tags::spec(ResourceType::Volume, tag_list));
        if volume_type == "gp3" {
            call = call.set_iops(s.gp3_iops).set_throughput(s.gp3_throughput);
        }
        let out = call
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("CreateVolume", e))?;
        let id = out
            .volume_id()
            .ok_or_else(|| AwsError::permanent("CreateVolume", "no volume id in the answer"))?
            .to_string();
        info!(source = %req.source, disk = %req.disk, volume = %id, size_gib, %volume_type, "created replica volume");
        self.wait_volume(&id, "available", |v| match v.map(|v| v.state.as_str()) {
            Some("available") => Step::Done(v.cloned()),
            None | Some("creating") => Step::Wait,
            Some(other) => Step::Fail(AwsError::Conflict(format!(
                "new volume {id} went to state {other} instead of available"
            ))),
        })
        .await?
        .ok_or_else(|| AwsError::Conflict(format!("volume {id} vanished")))
    }

    /// Makes sure `vol` is attached to this instance, detaching it from a stopped previous
    /// server first. Returns the volume as it is once attached.
    /// `own_slot`: the caller holds a slot for this volume (it just created it).
    pub(crate) async fn attach_here(
        &self,
        vol: VolInfo,
        own_slot: bool,
    ) -> Result<VolInfo, AwsError> {
        let me = self.identity.instance_id.clone();
        let id = vol.id.clone();
        let mut vol = vol;
        loop {
            if let Some(state) = vol.attachment_on(&me) {
                if state == "detaching" {
                    vol = self.wait_detached(&id).await?;
                    continue;
                }
                return self.wait_attached(&id).await;
            }
            if let Some((other, device, state)) = vol.attachments.first().cloned() {
                let other_state = self.instance_state(&other).await?;
                match other_state.as_str() {
                    "stopped" | "terminated" if state != "detaching" => {
                        info!(volume = %id, from = %other, instance_state = %other_state, "detaching replica volume from the previous server");
                        self.ec2
                            .detach_volume()
                            .volume_id(&id)
                            .instance_id(&other)
                            .device(&device)
                            .force(false)
                            .send()
                            .await
                            .map_err(|e| AwsError::from_sdk("DetachVolume", e))?;
                        vol = self.wait_detached(&id).await?;
                    }
                    "stopped" | "terminated" | "stopping" | "shutting-down" => {
                        vol = self.wait_detached_or_stopped(&id, &other).await?;
                    }
                    _ => {
                        return Err(AwsError::Conflict(format!(
                            "volume {id} is attached to instance {other}, which is {other_state}: stop that server before this one adopts its volumes"
                        )))
                    }
                }
                continue;
            }
            match vol.state.as_str() {
                "available" => {
                    self.attach_available(&id, own_slot).await?;
                    return self.wait_attached(&id).await;
                }
                "creating" | "in-use" => {
                    // in-use with no attachment listed: EC2 is catching up.
                    vol = self
                        .wait_volume(&id, "available", |v| match v {
                            Some(v) if v.state == "available" || !v.attachments.is_empty() => {
                                Step::Done(v.clone())
                            }
                            _ => Step::Wait,
                        })
                        .await?;
                }
                other => {
                    return Err(AwsError::Conflict(format!(
                        "volume {id} is {other}; it cannot be attached"
                    )))
                }
            }
        }
    }

    async fn wait_detached(&self, id: &str) -> Result<VolInfo, AwsError> {
        self.wait_volume(id, "detached", |v| match v {
            Some(v) if v.attachments.is_empty() && v.state == "available" => Step::Done(v.clone()),
            Some(_) => Step::Wait,
            None => Step::Fail(AwsError::Conflict(format!("volume {id} vanished"))),
        })
        .await
    }

    /// Waits until a volume is free or its (stopping) instance has stopped, whichever first.
    async fn wait_detached_or_stopped(&self, id: &str, other: &str) -> Result<VolInfo, AwsError> {
        let started = Instant::now();
        loop {
            let v = self
                .describe_volume(id)
                .await?
                .ok_or_else(|| AwsError::Conflict(format!("volume {id} vanished")))?;
            if v.attachments.is_empty() {
                return Ok(v);
            }
            if v.attachments.iter().any(|(_, _, s)| s != "detaching")
                && self.instance_state(other).await? == "stopped"
            {
                return Ok(v);
            }
            if started.elapsed() + self.settings.poll_interval > self.settings.wait_timeout {
                return Err(AwsError::Timeout {
                    what: format!("{id} to be released by instance {other}"),
                    after: self.settings.wait_timeout,
                });
            }
            tokio::time::sleep(self.settings.poll_interval).await;
        }
    }

    /// Attachments in use (those EC2 lists plus ours in flight) and the device names taken.
    /// Refreshes the slots gauge.
    fn slots_in_use(&self, me: &SelfInfo) -> (u32, BTreeSet<String>) {
        let reserved = self
            .reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut taken: BTreeSet<String> = me.mappings.iter().map(|(d, _)| device_key(d)).collect();
        if let Some(root) = &me.root_device {
            taken.insert(device_key(root));
        }
        let in_flight = reserved.iter().filter(|d| !taken.contains(*d)).count();
        taken.extend(reserved);
        let used = (me.mappings.len() + in_flight) as u32 + self.creating.load(Ordering::SeqCst);
        self.used.store(used, Ordering::Relaxed);
        (used, taken)
    }

    /// Chooses a free device name and calls AttachVolume.
    async fn attach_available(&self, id: &str, own_slot: bool) -> Result<(), AwsError> {
        let _g = self.attach_lock.lock().await;
        let me = self.describe_self().await?;
        let (used, taken) = self.slots_in_use(&me);
        // The slot held for this volume since before its creation is the one it takes.
        let used = used - u32::from(own_slot && used > 0);
        if used >= self.limit {
            return Err(AwsError::NoAttachmentSlot {
                used,
                limit: self.limit,
            });
        }
        let device = device_names()
            .find(|n| !taken.contains(&device_key(n)))
            .ok_or(AwsError::NoAttachmentSlot {
                used,
                limit: self.limit,
            })?;
        self.ec2
            .attach_volume()
            .volume_id(id)
            .instance_id(&self.identity.instance_id)
            .device(&device)
            .send()
            .await
            .map_err(|e| {
                if sdk_code(&e) == Some("AttachmentLimitExceeded") {
                    AwsError::NoAttachmentSlot {
                        used,
                        limit: self.limit,
                    }
                } else {
                    AwsError::from_sdk("AttachVolume", e)
                }
            })?;
        self.reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(device_key(&device));
        self.used.store(used + 1, Ordering::Relaxed);
        info!(volume = id, %device, "attaching volume");
        Ok(())
    }

    async fn wait_attached(&self, id: &str) -> Result<VolInfo, AwsError> {
        let me = self.identity.instance_id.clone();
        let r = self
            .wait_volume(id, "attached", |v| match v {
                Some(v) => match v.attachment_on(&me) {
                    Some("attached") => Step::Done(v.clone()),
                    Some("detaching" | "detached") => Step::Fail(AwsError::Conflict(format!(
                        "volume {id} is being detached from this instance"
                    ))),
                    _ => Step::Wait,
                },
                None => Step::Fail(AwsError::Conflict(format!("volume {id} vanished"))),
            })
            .await;
        if let Ok(v) = &r {
            if let Some((_, dev, _)) = v.attachments.iter().find(|(i, _, _)| *i == me) {
                self.reserved
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&device_key(dev));
            }
        }
        r
    }

    /// Polls the device resolver until the volume's block device shows up.
    pub(crate) async fn resolve_device(&self, vol: &VolInfo) -> Result<PathBuf, AwsError> {
        let started = Instant::now();
        let size = vol.size_gib * GIB;
        loop {
            match self.resolver.resolve(&vol.id, size) {
                Ok(p) => return Ok(p),
                Err(e) => {
                    if started.elapsed() + self.settings.poll_interval > self.settings.wait_timeout
                    {
                        return Err(e);
                    }
                    debug!(volume = %vol.id, error = %e, "block device not there yet");
                }
            }
            tokio::time::sleep(self.settings.poll_interval).await;
        }
    }

    /// `VolumeBackend::ensure`.
    pub(crate) async fn ensure_volume(
        &self,
        req: &VolumeRequest,
    ) -> Result<VolumeHandle, AwsError> {
        let lock = self.disk_lock(&req.source, &req.disk);
        let _g = lock.lock().await;
        let (vol, created) = match self.find_replica(&req.source, &req.disk).await? {
            Some(v) => {
                if v.size_gib * GIB < req.size {
                    return Err(AwsError::Conflict(format!(
                        "replica volume {} of {}/{} has {} GiB, less than the disk's {} bytes (grow it with ModifyVolume)",
                        v.id, req.source, req.disk, v.size_gib, req.size
                    )));
                }
                (v, false)
            }
            None => {
                // Never create a volume that cannot be attached: the slot is checked and
                // taken under the attach lock, so two disks opened at once cannot both count
                // the last free slot, and held until this volume's attachment is requested.
                {
                    let _a = self.attach_lock.lock().await;
                    let me = self.describe_self().await?;
                    let (used, _) = self.slots_in_use(&me);
                    if used >= self.limit {
                        return Err(AwsError::NoAttachmentSlot {
                            used,
                            limit: self.limit,
                        });
                    }
                    self.creating.fetch_add(1, Ordering::SeqCst);
                }
                let slot = HeldSlot(&self.creating);
                let made = self.create_replica(req).await;
                match made {
                    Ok(v) => {
                        let attached = self.attach_here(v, true).await;
                        drop(slot);
                        (attached?, true)
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let vol = if created {
            vol
        } else {
            self.attach_here(vol, false).await?
        };
        let path = self.resolve_device(&vol).await?;
        Ok(VolumeHandle {
            source: req.source.clone(),
            disk: req.disk.clone(),
            volume_id: vol.id,
            path,
            created,
        })
    }

    /// `VolumeBackend::adopt`: every replica of this server, or attached here, attached here.
    pub(crate) async fn adopt_volumes(&self) -> Result<Vec<VolumeHandle>, AwsError> {
        let role = filter(&format!("tag:{}", tags::ROLE), &[tags::ROLE_REPLICA]);
        let mut vols = self
            .describe_volumes(vec![
                role.clone(),
                filter(
                    &format!("tag:{}", tags::SERVER),
                    &[&self.settings.server_tag],
                ),
            ])
            .await?;
        vols.extend(
            self.describe_volumes(vec![
                role,
                filter("attachment.instance-id", &[&self.identity.instance_id]),
            ])
            .await?,
        );
        let mut by_disk: BTreeMap<(String, String), VolInfo> = BTreeMap::new();
        for v in vols {
            if !v.usable() {
                warn!(volume = %v.id, state = %v.state, "replica volume not adoptable");
                continue;
            }
            let Some(key) = v.source_disk() else {
                warn!(volume = %v.id, "replica volume without source/disk tags; left alone");
                continue;
            };
            match by_disk.get(&key) {
                Some(prev) if prev.id == v.id => {}
                Some(prev) => {
                    let older = (v.create_time.map(|t| t.as_nanos()), &v.id)
                        < (prev.create_time.map(|t| t.as_nanos()), &prev.id);
                    warn!(source = %key.0, disk = %key.1, a = %prev.id, b = %v.id, "several replica volumes for one disk; adopting the oldest");
                    if older {
                        by_disk.insert(key, v);
                    }
                }
                None => {
                    by_disk.insert(key, v);
                }
            }
        }
        // Volume by volume: one that cannot be adopted (held by a running server, a device
        // that does not show up) is reported and left out, and the others serve. Its disk
        // tries again, with the same error if it persists, when its agent opens it.
        let mut handles = Vec::with_capacity(by_disk.len());
        for ((source, disk), v) in by_disk {
            let lock = self.disk_lock(&source, &disk);
            let _g = lock.lock().await;
            let id = v.id.clone();
            let adopted = match self.attach_here(v, false).await {
                Ok(v) => self.resolve_device(&v).await.map(|p| (v, p)),
                Err(e) => Err(e),
            };
            let (v, path) = match adopted {
                Ok(x) => x,
                Err(e) => {
                    warn!(%source, %disk, volume = %id, error = %e, "replica volume not adopted; the other disks serve, this one is tried again when its agent opens it");
                    continue;
                }
            };
            info!(%source, %disk, volume = %v.id, path = %path.display(), "adopted replica volume");
            handles.push(VolumeHandle {
                source,
                disk,
                volume_id: v.id,
                path,
                created: false,
            });
        }
        Ok(handles)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_gib_and_type_minimum() {
        assert_eq!(volume_size_gib(0, "gp3"), 1);
        assert_eq!(volume_size_gib(1, "gp3"), 1);
        assert_eq!(volume_size_gib(GIB, "gp3"), 1);
        assert_eq!(volume_size_gib(GIB + 1, "gp3"), 2);
        assert_eq!(volume_size_gib(10 * GIB, "st1"), 125);
        assert_eq!(volume_size_gib(600 * GIB, "st1"), 600);
        assert_eq!(volume_size_gib(GIB, "sc1"), 125);
    }

    #[test]
    fn pending_limits_by_type() {
        for t in ["gp2", "gp3", "io1", "io2"] {
            assert_eq!(pending_snapshot_limit(t), 5);
        }
        assert_eq!(pending_snapshot_limit("st1"), 1);
        assert_eq!(pending_snapshot_limit("sc1"), 1);
    }

    #[test]
    fn device_names_are_unique_and_ordered() {
        let names: Vec<String> = device_names().collect();
        assert_eq!(names[0], "/dev/sdf");
        assert_eq!(names[20], "/dev/sdz");
        assert_eq!(names[21], "/dev/xvdba");
        assert_eq!(names.len(), 21 + 3 * 26);
        let keys: BTreeSet<String> = names.iter().map(|n| device_key(n)).collect();
        assert_eq!(keys.len(), names.len());
    }

    #[test]
    fn device_keys_match_aliases() {
        assert_eq!(device_key("/dev/xvdf"), "sdf");
        assert_eq!(device_key("/dev/sdf"), "sdf");
        assert_eq!(device_key("/dev/sda1"), "sda");
        assert_eq!(device_key("/dev/xvda"), "sda");
        assert_eq!(device_key("/dev/xvdba"), "xvdba");
    }
}
