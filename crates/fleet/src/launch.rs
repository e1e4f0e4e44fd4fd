//! Test and cutover launches from restore points.
//!
//! A restore point is the set of EBS snapshots tagged `slipway:restore-point` (one per disk,
//! with `slipway:source-id`, `slipway:disk-id`, `slipway:created-ms`, as slipway-aws writes
//! them). A launch registers an image from them (boot disk as the root device, the others as
//! data devices), then runs the target instance from it with block device mappings from the
//! same snapshots and the template's `[launch]` settings. The instance's tags are the record of
//! the launch: `slipway:role = launch`, `slipway:template`, `slipway:source-id`,
//! `slipway:restore-point`, `slipway:launch-mode`, `slipway:launched-ms`.
//!
//! Unless the request says [`Conversion::Skip`] (`--no-convert`), the image is registered
//! not from the restore point's snapshots but from converted copies of them, with the boot
//! mode the conversion found (`crate::convert`): a machine from another hypervisor needs NVMe
//! and ENA drivers and a root named by UUID to boot on Nitro. The image's name says which
//! (`…-converted`), so a converted and an unconverted image of one restore point never stand in
//! for each other.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_sdk_ec2::types::{
    ArchitectureValues, BlockDeviceMapping, BootModeValues, EbsBlockDevice, HttpTokensState,
    InstanceMetadataOptionsRequest, InstanceNetworkInterfaceSpecification, InstanceType,
    ResourceType, VolumeType,
};
use serde::Serialize;
use slipway_aws::tags as aws_tags;
use tracing::info;

use crate::convert::{Conversion, ConversionRecord, ROLE_CONVERTED};
use crate::error::FleetError;
use crate::fleet::{filter, profile_spec, tag_map, tag_spec, Fleet, TEMPLATE};
use crate::template::Template;

/// Value of `slipway:role` on launched target instances.
pub const ROLE_LAUNCH: &str = "launch";
/// Tag: `test` or `cutover`.
pub const LAUNCH_MODE: &str = "slipway:launch-mode";
/// Tag: launch time, Unix milliseconds.
pub const LAUNCHED_MS: &str = "slipway:launched-ms";

/// Test (the source keeps running, the instance is disposable) or cutover (the real thing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LaunchMode {
    Test,
    Cutover,
}

impl LaunchMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LaunchMode::Test => "test",
            LaunchMode::Cutover => "cutover",
        }
    }
}

impl std::str::FromStr for LaunchMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "test" => Ok(LaunchMode::Test),
            "cutover" => Ok(LaunchMode::Cutover),
            o => Err(format!("{o:?} is not one of test, cutover")),
        }
    }
}

/// What to launch.
#[derive(Debug, Clone)]
pub struct LaunchRequest {
    pub source: String,
    pub mode: LaunchMode,
    /// Restore point id; `None`: the newest one whose snapshots are all completed.
    pub restore_point: Option<String>,
    /// Convert the disks for Nitro first (and where), or not (`--no-convert`).
    pub conversion: Conversion,
}

/// One disk of a restore point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpDisk {
    pub disk: String,
    pub snapshot_id: String,
    pub state: String,
    pub size_gib: i32,
}

/// A restore point as its snapshots' tags describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePoint {
    pub id: String,
    pub source: String,
    pub created_unix_ms: u64,
    pub disks: Vec<RpDisk>,
    /// `slipway:keep` on any of its snapshots (`cutover-finalized`: a finalize kept it).
    pub keep: Option<String>,
}

impl RestorePoint {
    pub fn completed(&self) -> bool {
        !self.disks.is_empty() && self.disks.iter().all(|d| d.state == "completed")
    }
}

/// What a launch did (`slipway launch --json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct LaunchReport {
    pub source: String,
    pub mode: LaunchMode,
    pub restore_point: String,
    pub instance_id: String,
    pub image_id: String,
    pub private_ip: Option<String>,
    /// The instance's disks: device name, the snapshot it was made from, the source disk.
    pub devices: Vec<LaunchDevice>,
    /// Test instances of the source terminated before a cutover.
    pub terminated: Vec<String>,
    /// What happened to those test instances' images.
    pub released_images: crate::cutover::ImageCleanup,
    /// Whether the image is made of converted disks (by this launch or, if the image was
    /// found again by name, by an earlier one).
    pub converted: bool,
    /// The conversion this launch ran; `None` with `--no-convert` or a reused image.
    pub conversion: Option<ConversionRecord>,
    /// The image was registered by an earlier launch of the same restore point (found by name).
    pub reused_image: bool,
    /// The image's boot mode (`legacy-bios`, `uefi`); `None`: not set, the instance type's
    /// default (legacy BIOS on x86).
    pub boot_mode: Option<String>,
}

/// One disk of a launched instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LaunchDevice {
    pub device: String,
    pub snapshot_id: String,
    pub disk: String,
    pub size_gib: i32,
}

/// The image a launch boots, and what the launch learnt making or finding it.
struct LaunchImage {
    id: String,
    devices: Vec<LaunchDevice>,
    converted: bool,
    conversion: Option<ConversionRecord>,
    reused: bool,
    boot_mode: Option<String>,
}

/// The image's (and the instance's) block device mappings: every disk a gp3 volume deleted
/// with the instance.
fn block_device_mappings(devices: &[LaunchDevice]) -> Vec<BlockDeviceMapping> {
    devices
        .iter()
        .map(|d| {
            BlockDeviceMapping::builder()
                .device_name(&d.device)
                .ebs(
                    EbsBlockDevice::builder()
                        .snapshot_id(&d.snapshot_id)
                        .volume_size(d.size_gib)
                        .volume_type(VolumeType::Gp3)
                        .delete_on_termination(true)
                        .build(),
                )
                .build()
        })
        .collect()
}

impl fmt::Display for LaunchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for t in &self.terminated {
            writeln!(f, "terminated test instance {t} of {}", self.source)?;
        }
        write!(f, "{}", self.released_images)?;
        writeln!(
            f,
            "{} launch of {} from restore point {}: instance {} (image {}), private IP {}",
            self.mode.as_str(),
            self.source,
            self.restore_point,
            self.instance_id,
            self.image_id,
            self.private_ip.as_deref().unwrap_or("-")
        )?;
        for d in &self.devices {
            writeln!(
                f,
                "  {:<12} {:<24} disk {}",
                d.device, d.snapshot_id, d.disk
            )?;
        }
        let boot = self.boot_mode.as_deref().unwrap_or("instance type default");
        match &self.conversion {
            Some(c) => {
                let r = &c.report;
                match &r.distro {
                    Some(d) => writeln!(
                        f,
                        "converted on {} ({}) in {:.0} s: {}, root on disk {} partition {} ({}); boot mode {boot}",
                        c.instance_id,
                        c.availability_zone,
                        c.seconds,
                        d.pretty_name.as_deref().unwrap_or(&d.id),
                        r.root.disk,
                        r.root.partition,
                        r.root.fs
                    )?,
                    None => writeln!(f, "converted on {}; boot mode {boot}", c.instance_id)?,
                }
                for ch in &r.changes {
                    writeln!(f, "  changed {}: {}", ch.path, ch.detail)?;
                }
                for n in &r.notes {
                    writeln!(f, "  note: {n}")?;
                }
                writeln!(
                    f,
                    "  intermediate volumes deleted: {}",
                    c.volumes_deleted.join(", ")
                )?;
            }
            None if self.converted => writeln!(
                f,
                "image {} reused: converted by an earlier launch; boot mode {boot}",
                self.image_id
            )?,
            None => writeln!(f, "not converted (--no-convert); boot mode {boot}")?,
        }
        Ok(())
    }
}

/// A launch as recorded in its instance's tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchRecord {
    pub template: String,
    pub source: String,
    pub mode: String,
    pub restore_point: String,
    pub instance_id: String,
    pub state: String,
    pub instance_type: String,
    pub private_ip: Option<String>,
    pub launched_unix_ms: u64,
    /// The image the instance was launched from (its `ImageId`).
    pub image_id: String,
}

impl LaunchRecord {
    /// Still counts as a launch: not terminated nor shutting down.
    pub fn live(&self) -> bool {
        crate::lifecycle::is_live(&self.state)
    }

    pub fn is_cutover(&self) -> bool {
        self.mode == LaunchMode::Cutover.as_str()
    }
}

/// `slipway launch list`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LaunchList {
    pub launches: Vec<LaunchRecord>,
}

impl fmt::Display for LaunchList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.launches.is_empty() {
            return writeln!(f, "no launches");
        }
        writeln!(
            f,
            "{:<20} {:<20} {:<8} {:<24} {:<21} {:<12} {:<12} {:<15} LAUNCHED (unix ms)",
            "TEMPLATE",
            "SOURCE",
            "MODE",
            "RESTORE POINT",
            "INSTANCE",
            "STATE",
            "TYPE",
            "PRIVATE IP"
        )?;
        for l in &self.launches {
            writeln!(
                f,
                "{:<20} {:<20} {:<8} {:<24} {:<21} {:<12} {:<12} {:<15} {}",
                l.template,
                l.source,
                l.mode,
                l.restore_point,
                l.instance_id,
                l.state,
                l.instance_type,
                l.private_ip.as_deref().unwrap_or("-"),
                l.launched_unix_ms
            )?;
        }
        Ok(())
    }
}

/// The name of a launch's image: found again by it on the next launch of the restore point.
/// Truncated before the suffix (AMI names are at most 128 characters), so that a converted
/// and an unconverted image of one restore point never share a name.
pub(crate) fn image_name(template: &str, source: &str, rp: &str, converted: bool) -> String {
    let suffix = if converted { "-converted" } else { "" };
    let base: String = format!("slipway-{template}-{source}-{rp}")
        .chars()
        .take(128 - suffix.len())
        .collect();
    format!("{base}{suffix}")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Fleet {
    /// A source's restore points, oldest first (from snapshot tags; any server).
    pub async fn restore_points(&self, source: &str) -> Result<Vec<RestorePoint>, FleetError> {
        Ok(self
            .restore_points_of(&[source])
            .await?
            .remove(source)
            .unwrap_or_default())
    }

    /// The restore points of several sources, oldest first per source: one DescribeSnapshots
    /// (paginated) per 200 sources, EC2's limit of values in a filter.
    pub async fn restore_points_of(
        &self,
        sources: &[&str],
    ) -> Result<BTreeMap<String, Vec<RestorePoint>>, FleetError> {
        let mut snaps = Vec::new();
        for chunk in sources.chunks(200) {
            let page: Vec<_> = self
                .ec2
                .describe_snapshots()
                .owner_ids("self")
                .filters(filter(&format!("tag:{}", aws_tags::SOURCE_ID), chunk))
                .filters(filter("tag-key", &[aws_tags::RESTORE_POINT]))
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .map_err(|e| FleetError::sdk("DescribeSnapshots", e))?;
            snaps.extend(page);
        }
        // By (source, restore point id).
        let mut rps: BTreeMap<(String, String), RestorePoint> = BTreeMap::new();
        for s in &snaps {
            let tags = tag_map(s.tags());
            let Some(source) = tags.get(aws_tags::SOURCE_ID) else {
                continue;
            };
            // A launch's converted copy of a restore point's disk is not part of it.
            if tags.get(aws_tags::ROLE).map(String::as_str) == Some(ROLE_CONVERTED) {
                continue;
            }
            let (Some(rp), Some(disk), Some(sid)) = (
                tags.get(aws_tags::RESTORE_POINT),
                tags.get(aws_tags::DISK_ID),
                s.snapshot_id(),
            ) else {
                continue;
            };
            let created = tags
                .get(aws_tags::CREATED_MS)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let e = rps
                .entry((source.clone(), rp.clone()))
                .or_insert_with(|| RestorePoint {
                    id: rp.clone(),
                    source: source.clone(),
                    created_unix_ms: created,
                    disks: Vec::new(),
                    keep: None,
                });
            if let Some(k) = tags.get(aws_tags::KEEP) {
                // `cutover-finalized` over any other value: it is the one that finalizes.
                if e.keep.as_deref() != Some(aws_tags::KEEP_FINALIZED) {
                    e.keep = Some(k.clone());
                }
            }
            let state = s
                .state()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default();
            let d = RpDisk {
                disk: disk.clone(),
                snapshot_id: sid.to_string(),
                state,
                size_gib: s.volume_size().unwrap_or(1),
            };
            // A retried snapshot of the same disk: a completed one wins.
            match e.disks.iter_mut().find(|x| x.disk == d.disk) {
                Some(x) if x.state != "completed" && d.state == "completed" => *x = d,
                Some(_) => {}
                None => e.disks.push(d),
            }
        }
        let mut out: BTreeMap<String, Vec<RestorePoint>> = BTreeMap::new();
        for ((source, _), mut rp) in rps {
            rp.disks.sort_by(|a, b| a.disk.cmp(&b.disk));
            out.entry(source).or_default().push(rp);
        }
        for rps in out.values_mut() {
            rps.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        }
        Ok(out)
    }

    /// Launches a target instance for a source from a restore point (see the module doc).
    /// A cutover first terminates the source's test instances.
    pub async fn launch(
        &self,
        t: &Template,
        req: &LaunchRequest,
    ) -> Result<LaunchReport, FleetError> {
        let launch = t.launch.as_ref().ok_or_else(|| {
            FleetError::NotFound(format!(
                "template {} has no [launch] section: add one to say where target instances go",
                t.file.display()
            ))
        })?;
        let source = t.source(&req.source).ok_or_else(|| {
            FleetError::NotFound(format!(
                "source {} is not in template {}",
                req.source, t.name
            ))
        })?;
        let target = launch.target(&source.id);
        let rps = self.restore_points(&source.id).await?;
        if let Some(kept) = rps
            .iter()
            .find(|r| r.keep.as_deref() == Some(aws_tags::KEEP_FINALIZED))
        {
            return Err(FleetError::WrongState {
                source_id: source.id.clone(),
                state: crate::LifecycleState::CutoverComplete,
                hint: format!(
                    "its cutover was finalized (restore point {} kept); it is not launched again",
                    kept.id
                ),
            });
        }
        let rp = match &req.restore_point {
            Some(id) => rps.iter().find(|r| &r.id == id).ok_or_else(|| {
                FleetError::NotFound(format!("no restore point {id} of source {}", source.id))
            })?,
            None => rps.iter().rev().find(|r| r.completed()).ok_or_else(|| {
                FleetError::NotFound(format!(
                    "source {} has no completed restore point yet ({} in progress)",
                    source.id,
                    rps.len()
                ))
            })?,
        };
        if !rp.completed() {
            return Err(FleetError::Conflict(format!(
                "restore point {} is not complete yet (snapshots: {}); wait or pick another",
                rp.id,
                rp.disks
                    .iter()
                    .map(|d| format!("{} {}", d.snapshot_id, d.state))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let boot = match &source.boot_disk {
            Some(b) => rp.disks.iter().find(|d| &d.disk == b).ok_or_else(|| {
                FleetError::NotFound(format!(
                    "restore point {} has no disk {b} (boot_disk of source {})",
                    rp.id, source.id
                ))
            })?,
            None => &rp.disks[0],
        };
        // Device per disk: the boot disk is the root device, the others /dev/sdf, /dev/sdg, …
        let mut devices: Vec<(String, &RpDisk)> = vec![(launch.root_device_name.clone(), boot)];
        let mut names = slipway_aws::device_names();
        for d in rp.disks.iter().filter(|d| d.disk != boot.disk) {
            let name = names.next().ok_or_else(|| {
                FleetError::Conflict(format!("restore point {} has too many disks", rp.id))
            })?;
            devices.push((name, d));
        }
        // A cutover replaces the test instances; two cutovers of one source are refused.
        let existing = self.launch_records(Some(&t.name), Some(&source.id)).await?;
        let live = |l: &&LaunchRecord| l.live();
        if req.mode == LaunchMode::Cutover {
            if let Some(c) = existing.iter().filter(live).find(|l| l.is_cutover()) {
                return Err(FleetError::Conflict(format!(
                    "source {} already has cutover instance {} ({}); finalize it, or roll it back with `slipway launch terminate --cutover`, to launch another",
                    source.id, c.instance_id, c.state
                )));
            }
        }
        let terminated: Vec<String> = if req.mode == LaunchMode::Cutover {
            existing
                .iter()
                .filter(live)
                .filter(|l| l.mode == "test")
                .map(|l| l.instance_id.clone())
                .collect()
        } else {
            Vec::new()
        };
        // A cutover's restore point is kept out of the server's policy from now on (it must
        // still exist when the cutover is finalized, and a converted image does not pin it);
        // finalize turns the tag into `cutover-finalized`, a rollback removes it.
        if req.mode == LaunchMode::Cutover {
            let snaps: Vec<String> = rp.disks.iter().map(|d| d.snapshot_id.clone()).collect();
            self.tag(&snaps, aws_tags::KEEP, aws_tags::KEEP_CUTOVER)
                .await?;
        }
        // The image before any test instance is terminated: a conversion that refuses the
        // source leaves everything as it was.
        let image = self
            .image_for(
                t,
                &source.id,
                rp,
                &launch.architecture,
                &devices,
                &launch.root_device_name,
                &req.conversion,
            )
            .await?;
        let mappings = block_device_mappings(&image.devices);
        // Interrupted during the conversion's last wait: the image stays, nothing is run.
        if let Conversion::On(on) = &req.conversion {
            on.check()?;
        }

        let mut released_images = crate::cutover::ImageCleanup::default();
        if !terminated.is_empty() {
            info!(source = %source.id, instances = ?terminated, "terminating test instances before the cutover");
            // Their images go with them, as with `slipway launch terminate`, except the one
            // this cutover is about to boot (the test's own, found again by name, when the
            // cutover is of the restore point the test was).
            let ended: Vec<&LaunchRecord> = existing
                .iter()
                .filter(|l| terminated.contains(&l.instance_id))
                .collect();
            released_images = self
                .end_launches(t, &source.id, &ended, std::slice::from_ref(&image.id))
                .await?;
        }

        let mut tags = target.tags.clone();
        tags.entry("Name".into())
            .or_insert_with(|| format!("{}-{}", source.id, req.mode.as_str()));
        tags.insert(aws_tags::ROLE.into(), ROLE_LAUNCH.into());
        tags.insert(TEMPLATE.into(), t.name.clone());
        tags.insert(aws_tags::SOURCE_ID.into(), source.id.clone());
        tags.insert(aws_tags::RESTORE_POINT.into(), rp.id.clone());
        tags.insert(LAUNCH_MODE.into(), req.mode.as_str().into());
        tags.insert(LAUNCHED_MS.into(), now_ms().to_string());
        let mut volume_tags = target.tags.clone();
        volume_tags.insert(TEMPLATE.into(), t.name.clone());
        volume_tags.insert(aws_tags::SOURCE_ID.into(), source.id.clone());
        volume_tags.insert(aws_tags::RESTORE_POINT.into(), rp.id.clone());
        volume_tags.insert(LAUNCH_MODE.into(), req.mode.as_str().into());

        let private_ip = target.private_ip.map(|ip| ip.to_string());
        let mut call = self
            .ec2
            .run_instances()
            .image_id(&image.id)
            .instance_type(InstanceType::from(target.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .set_block_device_mappings(Some(mappings))
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .build(),
            )
            .tag_specifications(tag_spec(ResourceType::Instance, &tags))
            .tag_specifications(tag_spec(ResourceType::Volume, &volume_tags));
        if launch.public_ip {
            call = call.network_interfaces(
                InstanceNetworkInterfaceSpecification::builder()
                    .device_index(0)
                    .subnet_id(&target.subnet)
                    .associate_public_ip_address(true)
                    .set_groups(Some(target.security_groups.clone()))
                    .set_private_ip_address(private_ip.clone())
                    .build(),
            );
        } else {
            call = call
                .subnet_id(&target.subnet)
                .set_security_group_ids(Some(target.security_groups.clone()))
                .set_private_ip_address(private_ip.clone());
        }
        if let Some(p) = &launch.iam_instance_profile {
            call = call.iam_instance_profile(profile_spec(p));
        }
        let out = self.run_instances(call, private_ip.is_some()).await?;
        let inst = out
            .instances()
            .first()
            .ok_or_else(|| FleetError::Conflict("RunInstances returned no instance".into()))?;
        let id = inst.instance_id().unwrap_or_default().to_string();
        info!(source = %source.id, mode = req.mode.as_str(), rp = %rp.id, instance = %id, "launched");
        self.wait_instance(&id, "running").await?;
        let ip = self
            .launch_records(Some(&t.name), Some(&source.id))
            .await?
            .into_iter()
            .find(|l| l.instance_id == id)
            .and_then(|l| l.private_ip);
        Ok(LaunchReport {
            source: source.id.clone(),
            mode: req.mode,
            restore_point: rp.id.clone(),
            instance_id: id,
            image_id: image.id,
            private_ip: ip,
            devices: image.devices,
            terminated,
            released_images,
            converted: image.converted,
            conversion: image.conversion,
            reused_image: image.reused,
            boot_mode: image.boot_mode,
        })
    }

    /// The image of a launch: found again by name (registered by an earlier launch of the
    /// same restore point, converted or not as this one), else registered now — from the
    /// restore point's snapshots, or from converted copies of them.
    #[allow(clippy::too_many_arguments)]
    async fn image_for(
        &self,
        t: &Template,
        source: &str,
        rp: &RestorePoint,
        architecture: &str,
        devices: &[(String, &RpDisk)],
        root_device_name: &str,
        conversion: &Conversion,
    ) -> Result<LaunchImage, FleetError> {
        let converted = matches!(conversion, Conversion::On(_));
        let name = image_name(&t.name, source, &rp.id, converted);
        let found = self
            .ec2
            .describe_images()
            .owners("self")
            .filters(filter("name", &[&name]))
            .send()
            .await
            .map_err(|e| FleetError::sdk("DescribeImages", e))?;
        if let Some(i) = found
            .images()
            .iter()
            .find(|i| i.state().map(|s| s.as_str()) != Some("deregistered"))
        {
            // The image's own snapshots (converted ones for a converted image).
            let by_device: BTreeMap<&str, &str> = i
                .block_device_mappings()
                .iter()
                .filter_map(|m| Some((m.device_name()?, m.ebs()?.snapshot_id()?)))
                .collect();
            return Ok(LaunchImage {
                id: i.image_id().unwrap_or_default().to_string(),
                devices: devices
                    .iter()
                    .map(|(dev, d)| LaunchDevice {
                        device: dev.clone(),
                        snapshot_id: by_device
                            .get(dev.as_str())
                            .map_or_else(|| d.snapshot_id.clone(), |s| s.to_string()),
                        disk: d.disk.clone(),
                        size_gib: d.size_gib,
                    })
                    .collect(),
                converted,
                conversion: None,
                reused: true,
                boot_mode: i.boot_mode().map(|b| b.as_str().to_string()),
            });
        }

        let (conversion, boot_mode, devices) = match conversion {
            Conversion::Skip => (
                None,
                None,
                devices
                    .iter()
                    .map(|(dev, d)| LaunchDevice {
                        device: dev.clone(),
                        snapshot_id: d.snapshot_id.clone(),
                        disk: d.disk.clone(),
                        size_gib: d.size_gib,
                    })
                    .collect::<Vec<_>>(),
            ),
            Conversion::On(on) => {
                // In the restore point's order, as the local test launch gives them: the
                // source's `/dev/sdb1` is the restore point's second disk either way.
                let disks: Vec<&RpDisk> = rp.disks.iter().collect();
                let c = self
                    .convert_restore_point(t, source, rp, &disks, on)
                    .await?;
                let mode = crate::convert::boot_mode(c.report.boot_mode);
                // One converted snapshot per disk of the restore point, so one per device.
                let devs: Option<Vec<LaunchDevice>> = devices
                    .iter()
                    .map(|(dev, d)| {
                        let s = c.snapshots.iter().find(|s| s.disk == d.disk)?;
                        Some(LaunchDevice {
                            device: dev.clone(),
                            snapshot_id: s.snapshot.clone(),
                            disk: d.disk.clone(),
                            size_gib: d.size_gib,
                        })
                    })
                    .collect();
                let Some(devs) = devs else {
                    let ids: Vec<String> = c.snapshots.iter().map(|s| s.snapshot.clone()).collect();
                    self.delete_snapshots(&ids).await;
                    return Err(FleetError::Conflict(format!(
                        "the conversion of restore point {} did not snapshot every disk",
                        rp.id
                    )));
                };
                (Some(c), Some(mode), devs)
            }
        };
        let registered = self
            .register(
                t,
                source,
                rp,
                &name,
                architecture,
                root_device_name,
                &block_device_mappings(&devices),
                boot_mode.clone(),
            )
            .await;
        let id = match registered {
            Ok(id) => id,
            Err(e) => {
                if let Some(c) = &conversion {
                    let ids: Vec<String> = c.snapshots.iter().map(|s| s.snapshot.clone()).collect();
                    self.delete_snapshots(&ids).await;
                }
                return Err(e);
            }
        };
        Ok(LaunchImage {
            id,
            devices,
            converted,
            conversion,
            reused: false,
            boot_mode: boot_mode.map(|b| b.as_str().to_string()),
        })
    }

    /// RegisterImage, tagged with the template, source and restore point.
    #[allow(clippy::too_many_arguments)]
    async fn register(
        &self,
        t: &Template,
        source: &str,
        rp: &RestorePoint,
        name: &str,
        architecture: &str,
        root_device_name: &str,
        mappings: &[BlockDeviceMapping],
        boot_mode: Option<BootModeValues>,
    ) -> Result<String, FleetError> {
        let out = self
            .ec2
            .register_image()
            .name(name)
            .description(format!(
                "slipway: source {source}, restore point {} (template {}){}",
                rp.id,
                t.name,
                if boot_mode.is_some() {
                    ", converted for EC2"
                } else {
                    ""
                }
            ))
            .architecture(ArchitectureValues::from(architecture))
            .root_device_name(root_device_name)
            .virtualization_type("hvm")
            .ena_support(true)
            .set_boot_mode(boot_mode)
            .set_block_device_mappings(Some(mappings.to_vec()))
            .send()
            .await
            .map_err(|e| FleetError::sdk("RegisterImage", e))?;
        let id = out
            .image_id()
            .ok_or_else(|| FleetError::Conflict("RegisterImage returned no image id".into()))?
            .to_string();
        let mut tags = BTreeMap::new();
        tags.insert(TEMPLATE.to_string(), t.name.clone());
        tags.insert(aws_tags::SOURCE_ID.to_string(), source.to_string());
        tags.insert(aws_tags::RESTORE_POINT.to_string(), rp.id.clone());
        self.ec2
            .create_tags()
            .resources(&id)
            .set_tags(Some(
                tags.iter()
                    .map(|(k, v)| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build())
                    .collect(),
            ))
            .send()
            .await
            .map_err(|e| FleetError::sdk("CreateTags", e))?;
        Ok(id)
    }

    /// Launches recorded in instance tags, oldest first; optionally of one template / source.
    pub async fn launch_records(
        &self,
        template: Option<&str>,
        source: Option<&str>,
    ) -> Result<Vec<LaunchRecord>, FleetError> {
        let mut call = self
            .ec2
            .describe_instances()
            .filters(filter(&format!("tag:{}", aws_tags::ROLE), &[ROLE_LAUNCH]));
        if let Some(t) = template {
            call = call.filters(filter(&format!("tag:{TEMPLATE}"), &[t]));
        }
        if let Some(s) = source {
            call = call.filters(filter(&format!("tag:{}", aws_tags::SOURCE_ID), &[s]));
        }
        let reservations = call
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| FleetError::sdk("DescribeInstances", e))?;
        let mut out = Vec::new();
        for r in &reservations {
            for i in r.instances() {
                let tags = tag_map(i.tags());
                let get = |k: &str| tags.get(k).cloned().unwrap_or_default();
                out.push(LaunchRecord {
                    template: get(TEMPLATE),
                    source: get(aws_tags::SOURCE_ID),
                    mode: get(LAUNCH_MODE),
                    restore_point: get(aws_tags::RESTORE_POINT),
                    instance_id: i.instance_id().unwrap_or_default().to_string(),
                    state: i
                        .state()
                        .and_then(|s| s.name())
                        .map(|n| n.as_str().to_string())
                        .unwrap_or_default(),
                    instance_type: i
                        .instance_type()
                        .map(|t| t.as_str().to_string())
                        .unwrap_or_default(),
                    private_ip: i.private_ip_address().map(str::to_string),
                    launched_unix_ms: get(LAUNCHED_MS).parse().unwrap_or(0),
                    image_id: i.image_id().unwrap_or_default().to_string(),
                });
            }
        }
        out.sort_by(|a, b| {
            (a.launched_unix_ms, &a.instance_id).cmp(&(b.launched_unix_ms, &b.instance_id))
        });
        Ok(out)
    }

    /// `slipway launch list`.
    pub async fn launches(&self, template: Option<&str>) -> Result<LaunchList, FleetError> {
        Ok(LaunchList {
            launches: self.launch_records(template, None).await?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converted_and_unconverted_images_never_share_a_name() {
        let long_template = "t".repeat(64);
        let long_source = "s".repeat(128);
        for (t, src) in [
            ("prod", "web-01"),
            (long_template.as_str(), long_source.as_str()),
        ] {
            let plain = image_name(t, src, "rp-1796628273853-f894", false);
            let conv = image_name(t, src, "rp-1796628273853-f894", true);
            assert_ne!(plain, conv);
            assert!(plain.len() <= 128 && conv.len() <= 128);
            assert!(conv.ends_with("-converted"));
        }
    }
}
