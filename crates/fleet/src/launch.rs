//! Test and cutover launches from restore points.
//!
//! A restore point is the set of EBS snapshots tagged `slipway:restore-point` (one per disk,
//! with `slipway:source-id`, `slipway:disk-id`, `slipway:created-ms`, as slipway-aws writes
//! them). A launch registers an image from them (boot disk as the root device, the others as
//! data devices), then runs the target instance from it with block device mappings from the
//! same snapshots and the template's `[launch]` settings. The instance's tags are the record of
//! the launch: `slipway:role = launch`, `slipway:template`, `slipway:source-id`,
//! `slipway:restore-point`, `slipway:launch-mode`, `slipway:launched-ms`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_sdk_ec2::types::{
    ArchitectureValues, BlockDeviceMapping, EbsBlockDevice, HttpTokensState,
    InstanceMetadataOptionsRequest, InstanceNetworkInterfaceSpecification, InstanceType,
    ResourceType, VolumeType,
};
use slipway_aws::tags as aws_tags;
use tracing::info;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

impl RestorePoint {
    pub fn completed(&self) -> bool {
        !self.disks.is_empty() && self.disks.iter().all(|d| d.state == "completed")
    }
}

/// What a launch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchReport {
    pub source: String,
    pub mode: LaunchMode,
    pub restore_point: String,
    pub instance_id: String,
    pub image_id: String,
    pub private_ip: Option<String>,
    /// (device, snapshot id, disk id)
    pub devices: Vec<(String, String, String)>,
    /// Test instances of the source terminated before a cutover.
    pub terminated: Vec<String>,
}

impl fmt::Display for LaunchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for t in &self.terminated {
            writeln!(f, "terminated test instance {t} of {}", self.source)?;
        }
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
        for (dev, snap, disk) in &self.devices {
            writeln!(f, "  {dev:<12} {snap:<24} disk {disk}")?;
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Fleet {
    /// A source's restore points, oldest first (from snapshot tags; any server).
    pub async fn restore_points(&self, source: &str) -> Result<Vec<RestorePoint>, FleetError> {
        let snaps = self
            .ec2
            .describe_snapshots()
            .owner_ids("self")
            .filters(filter(&format!("tag:{}", aws_tags::SOURCE_ID), &[source]))
            .filters(filter("tag-key", &[aws_tags::RESTORE_POINT]))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| FleetError::sdk("DescribeSnapshots", e))?;
        let mut rps: BTreeMap<String, RestorePoint> = BTreeMap::new();
        for s in &snaps {
            let tags = tag_map(s.tags());
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
            let e = rps.entry(rp.clone()).or_insert_with(|| RestorePoint {
                id: rp.clone(),
                source: source.to_string(),
                created_unix_ms: created,
                disks: Vec::new(),
            });
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
        let mut out: Vec<RestorePoint> = rps.into_values().collect();
        for rp in &mut out {
            rp.disks.sort_by(|a, b| a.disk.cmp(&b.disk));
        }
        out.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
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
        let rps = self.restore_points(&source.id).await?;
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
        let mappings: Vec<BlockDeviceMapping> = devices
            .iter()
            .map(|(dev, d)| {
                BlockDeviceMapping::builder()
                    .device_name(dev)
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
            .collect();

        // A cutover replaces the test instances; two cutovers of one source are refused.
        let existing = self.launch_records(Some(&t.name), Some(&source.id)).await?;
        let live = |l: &&LaunchRecord| l.state != "terminated" && l.state != "shutting-down";
        if req.mode == LaunchMode::Cutover {
            if let Some(c) = existing.iter().filter(live).find(|l| l.mode == "cutover") {
                return Err(FleetError::Conflict(format!(
                    "source {} already has cutover instance {} ({}); terminate it first to launch another",
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
        if !terminated.is_empty() {
            info!(source = %source.id, instances = ?terminated, "terminating test instances before the cutover");
            self.terminate(&terminated).await?;
        }

        let image_id = self
            .image_for(
                t,
                &source.id,
                rp,
                &launch.architecture,
                &devices,
                &mappings,
                &launch.root_device_name,
            )
            .await?;

        let mut tags = launch.tags.clone();
        tags.entry("Name".into())
            .or_insert_with(|| format!("{}-{}", source.id, req.mode.as_str()));
        tags.insert(aws_tags::ROLE.into(), ROLE_LAUNCH.into());
        tags.insert(TEMPLATE.into(), t.name.clone());
        tags.insert(aws_tags::SOURCE_ID.into(), source.id.clone());
        tags.insert(aws_tags::RESTORE_POINT.into(), rp.id.clone());
        tags.insert(LAUNCH_MODE.into(), req.mode.as_str().into());
        tags.insert(LAUNCHED_MS.into(), now_ms().to_string());
        let mut volume_tags = launch.tags.clone();
        volume_tags.insert(TEMPLATE.into(), t.name.clone());
        volume_tags.insert(aws_tags::SOURCE_ID.into(), source.id.clone());
        volume_tags.insert(aws_tags::RESTORE_POINT.into(), rp.id.clone());
        volume_tags.insert(LAUNCH_MODE.into(), req.mode.as_str().into());

        let private_ip = launch.private_ips.get(&source.id).map(|ip| ip.to_string());
        let mut call = self
            .ec2
            .run_instances()
            .image_id(&image_id)
            .instance_type(InstanceType::from(launch.instance_type.as_str()))
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
                    .subnet_id(&launch.subnet)
                    .associate_public_ip_address(true)
                    .set_groups(Some(launch.security_groups.clone()))
                    .set_private_ip_address(private_ip.clone())
                    .build(),
            );
        } else {
            call = call
                .subnet_id(&launch.subnet)
                .set_security_group_ids(Some(launch.security_groups.clone()))
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
            image_id,
            private_ip: ip,
            devices: devices
                .iter()
                .map(|(dev, d)| (dev.clone(), d.snapshot_id.clone(), d.disk.clone()))
                .collect(),
            terminated,
        })
    }

    /// The image registered from a restore point (found again by name, else registered now).
    #[allow(clippy::too_many_arguments)]
    async fn image_for(
        &self,
        t: &Template,
        source: &str,
        rp: &RestorePoint,
        architecture: &str,
        _devices: &[(String, &RpDisk)],
        mappings: &[BlockDeviceMapping],
        root_device_name: &str,
    ) -> Result<String, FleetError> {
        let name = format!("slipway-{}-{source}-{}", t.name, rp.id);
        let name: String = name.chars().take(128).collect();
        let found = self
            .ec2
            .describe_images()
            .owners("self")
            .filters(filter("name", &[&name]))
            .send()
            .await
            .map_err(|e| FleetError::sdk("DescribeImages", e))?;
        if let Some(id) = found
            .images()
            .iter()
            .filter(|i| i.state().map(|s| s.as_str()) != Some("deregistered"))
            .find_map(|i| i.image_id())
        {
            return Ok(id.to_string());
        }
        let out = self
            .ec2
            .register_image()
            .name(&name)
            .description(format!(
                "slipway: source {source}, restore point {} (template {})",
                rp.id, t.name
            ))
            .architecture(ArchitectureValues::from(architecture))
            .root_device_name(root_device_name)
            .virtualization_type("hvm")
            .ena_support(true)
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
