//! The launch conversion on AWS: makes the image of a test or cutover launch from *converted*
//! copies of a restore point's disks, so a machine from another hypervisor boots on Nitro.
//!
//! The copies are EBS volumes created from the restore point's snapshots in the availability
//! zone of the instance that runs this code (a replication server: it has slipway-convert, the
//! IAM rights, and it is where the operator runs `slipway launch` over SSM; see
//! docs/decisions.md). They are attached there, converted in place by the same
//! [`slipway_convert::convert`] as the local test launch, flushed, detached and snapshotted; the
//! image is then registered from those snapshots with the boot mode the conversion found.
//!
//! Why this shape: conversion needs a mounted root filesystem, and only an instance can mount
//! an EBS volume; EBS offers no way to write a snapshot's files in place. Working on volumes
//! made *from* the snapshots means the replica volumes and the restore point's own snapshots
//! are only ever read (by EBS, when it creates the volumes), never attached or written.
//!
//! Every intermediate volume is detached and deleted whatever happens after its CreateVolume
//! (conversion refused, a failed call, a timeout); the converted snapshots are deleted too when
//! no image gets registered from them. Resources carry `slipway:role` (`conversion` on the
//! volumes, `converted` on the snapshots), `slipway:source-id`, `slipway:disk-id`,
//! `slipway:restore-point`, `slipway:template` and `slipway:converted-from` (the restore point's
//! snapshot), so one left behind by a killed process can be found; [`Fleet::restore_points`]
//! skips `converted` snapshots, and the replication server never sees them (it lists only
//! snapshots carrying its own `slipway:server` tag).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use aws_sdk_ec2::client::Waiters;
use aws_sdk_ec2::types::{BootModeValues, ResourceType, VolumeType};
use aws_smithy_runtime_api::client::waiters::error::WaiterError;
use serde::Serialize;
use slipway_aws::tags as aws_tags;
use slipway_aws::DeviceResolver;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::error::FleetError;
use crate::fleet::{tag_spec, Fleet, TEMPLATE};
use crate::launch::{RestorePoint, RpDisk};
use crate::template::Template;

/// Value of `slipway:role` on the volumes a launch converts.
pub const ROLE_CONVERSION: &str = "conversion";
/// Value of `slipway:role` on the snapshots of converted volumes (the image's snapshots).
pub const ROLE_CONVERTED: &str = "converted";
/// Tag on converted volumes and snapshots: the restore point's snapshot they were made from.
pub const CONVERTED_FROM: &str = "slipway:converted-from";

/// Whether and where a launch converts the restore point (`slipway launch`, docs/launch.md).
#[derive(Debug, Clone)]
pub enum Conversion {
    /// `--no-convert`: the image is registered from the restore point's snapshots as they are
    /// (a source that already runs on EC2).
    Skip,
    /// Convert on an instance (this one).
    On(ConvertOn),
}

/// Where the conversion runs: the instance this process runs on, whose block devices the
/// converted volumes become.
#[derive(Clone)]
pub struct ConvertOn {
    /// The instance id (`--convert-on`); `None`: read from the instance metadata (IMDSv2).
    pub instance_id: Option<String>,
    /// Finds the block device of a volume attached to that instance: `ById` on Nitro,
    /// `FileMap` against the emulator.
    pub devices: Arc<dyn DeviceResolver>,
    /// Set to `true` (SIGINT/SIGTERM in the binary) to stop: the conversion stops at its next
    /// step (a running slipway-convert is let finish, as its mounts must be undone before the
    /// volumes are detached), deletes what it created, and the launch fails with
    /// [`FleetError::Interrupted`].
    pub interrupt: Option<watch::Receiver<bool>>,
}

impl ConvertOn {
    /// [`FleetError::Interrupted`] once the interrupt is set.
    pub(crate) fn check(&self) -> Result<(), FleetError> {
        match &self.interrupt {
            Some(rx) if *rx.borrow() => Err(FleetError::Interrupted),
            _ => Ok(()),
        }
    }

    /// `fut`, or [`FleetError::Interrupted`] as soon as the interrupt is set (`fut` dropped:
    /// only for waits, never for a step that must complete).
    async fn or_interrupt<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, FleetError>>,
    ) -> Result<T, FleetError> {
        self.check()?;
        let Some(mut rx) = self.interrupt.clone() else {
            return fut.await;
        };
        let interrupted = async move {
            // A dropped sender can never interrupt.
            if rx.wait_for(|v| *v).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = fut => r,
            () = interrupted => Err(FleetError::Interrupted),
        }
    }
}

impl fmt::Debug for ConvertOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConvertOn")
            .field("instance_id", &self.instance_id)
            .field("interrupt", &self.interrupt.as_ref().map(|r| *r.borrow()))
            .finish_non_exhaustive()
    }
}

/// What the conversion of a launch did (in the launch report).
#[derive(Debug, Clone, Serialize)]
pub struct ConversionRecord {
    /// The instance the volumes were attached to.
    pub instance_id: String,
    pub availability_zone: String,
    /// What slipway-convert found and changed.
    pub report: slipway_convert::Report,
    /// Per disk, the restore point's snapshot and the converted one the image uses.
    pub snapshots: Vec<ConvertedDisk>,
    /// The intermediate volumes, all deleted.
    pub volumes_deleted: Vec<String>,
    pub seconds: f64,
}

/// One disk of a converted launch.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertedDisk {
    pub disk: String,
    pub from_snapshot: String,
    pub snapshot: String,
}

/// The EC2 boot mode of an image whose boot disk has `mode`: UEFI only for a GPT disk with an
/// EFI system partition and no BIOS boot partition; a hybrid disk boots as legacy BIOS, which
/// every x86 instance type offers (as the local test launch picks SeaBIOS for it).
pub fn boot_mode(mode: slipway_convert::BootMode) -> BootModeValues {
    match mode {
        slipway_convert::BootMode::Uefi => BootModeValues::Uefi,
        slipway_convert::BootMode::LegacyBios | slipway_convert::BootMode::Hybrid => {
            BootModeValues::LegacyBios
        }
    }
}

/// The instance doing the conversion.
struct Host {
    instance_id: String,
    zone: String,
    /// Device names in use there.
    taken: Vec<String>,
}

/// What a conversion has created so far, for the cleanup.
#[derive(Default)]
struct Intermediate {
    /// (volume id, attached to the host)
    volumes: Vec<(String, bool)>,
    snapshots: Vec<String>,
}

impl Fleet {
    /// Converts `disks` (the restore point's, in its order: the conversion resolves a
    /// source's `/dev/sdb1` to the second) into new snapshots (see the module doc). Returns
    /// them in the order of `disks`, with the conversion's report.
    pub(crate) async fn convert_restore_point(
        &self,
        t: &Template,
        source: &str,
        rp: &RestorePoint,
        disks: &[&RpDisk],
        on: &ConvertOn,
    ) -> Result<ConversionRecord, FleetError> {
        let started = Instant::now();
        // Refused here, before any volume exists, rather than after minutes of copying.
        slipway_convert::require_privileges().map_err(|e| FleetError::Conversion {
            restore_point: rp.id.clone(),
            source: e,
        })?;
        let host = self.conversion_host(on).await?;
        info!(source, rp = %rp.id, instance = %host.instance_id, zone = %host.zone, "converting the restore point's disks on this instance");
        let mut work = Intermediate::default();
        let converted = self
            .convert_on(t, source, rp, disks, on, &host, &mut work)
            .await;
        let removed = self.remove_volumes(&host, &work.volumes).await;
        // All of them once `removed` is Ok (the report lists them only then).
        let volumes_deleted: Vec<String> = work.volumes.iter().map(|(v, _)| v.clone()).collect();
        let result = match (converted, removed) {
            (Ok(report), Ok(())) => on
                .or_interrupt(self.wait_snapshots(&work.snapshots))
                .await
                .map(|()| report),
            (Err(e), Ok(())) => Err(e),
            (converted, Err(cleanup)) => {
                error!(rp = %rp.id, volumes = ?volumes_deleted, error = %cleanup, "could not delete the conversion's volumes (tagged slipway:role=conversion): delete them by hand");
                // The conversion's own failure says more than the cleanup's.
                Err(converted.err().unwrap_or(cleanup))
            }
        };
        let report = match result {
            Ok(r) => r,
            Err(e) => {
                self.delete_snapshots(&work.snapshots).await;
                return Err(e);
            }
        };
        Ok(ConversionRecord {
            instance_id: host.instance_id,
            availability_zone: host.zone,
            report,
            snapshots: disks
                .iter()
                .zip(&work.snapshots)
                .map(|(d, s)| ConvertedDisk {
                    disk: d.disk.clone(),
                    from_snapshot: d.snapshot_id.clone(),
                    snapshot: s.clone(),
                })
                .collect(),
            volumes_deleted,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// The instance that converts: named, or this one (IMDSv2). It must be running.
    async fn conversion_host(&self, on: &ConvertOn) -> Result<Host, FleetError> {
        let id = match &on.instance_id {
            Some(id) => id.clone(),
            None => {
                slipway_aws::instance_identity()
                    .await
                    .map_err(|e| FleetError::ConversionHost(format!(
                        "the launch conversion runs on the EC2 instance this command runs on (a replication server), and its identity could not be read from the instance metadata: {e}; name it with --convert-on INSTANCE-ID, or skip the conversion with --no-convert"
                    )))?
                    .instance_id
            }
        };
        let out = self
            .ec2
            .describe_instances()
            .instance_ids(&id)
            .send()
            .await
            .map_err(|e| FleetError::sdk("DescribeInstances", e))?;
        let inst = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .next()
            .ok_or_else(|| FleetError::ConversionHost(format!("no instance {id}")))?;
        let state = inst
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap_or_default();
        if state != "running" {
            return Err(FleetError::ConversionHost(format!(
                "instance {id} is {state}: the conversion attaches volumes to it, it must be running"
            )));
        }
        let zone = inst
            .placement()
            .and_then(|p| p.availability_zone())
            .ok_or_else(|| FleetError::ConversionHost(format!("instance {id} has no zone")))?
            .to_string();
        let mut taken: Vec<String> = inst
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.device_name().map(str::to_string))
            .collect();
        taken.extend(inst.root_device_name().map(str::to_string));
        Ok(Host {
            instance_id: id,
            zone,
            taken,
        })
    }

    /// Create, attach, convert, detach, snapshot; records in `work` what it created.
    #[allow(clippy::too_many_arguments)]
    async fn convert_on(
        &self,
        t: &Template,
        source: &str,
        rp: &RestorePoint,
        disks: &[&RpDisk],
        on: &ConvertOn,
        host: &Host,
        work: &mut Intermediate,
    ) -> Result<slipway_convert::Report, FleetError> {
        let tags_of = |d: &RpDisk, role: &str| {
            let mut m = BTreeMap::new();
            m.insert(aws_tags::ROLE.to_string(), role.to_string());
            m.insert(aws_tags::SOURCE_ID.to_string(), source.to_string());
            m.insert(aws_tags::DISK_ID.to_string(), d.disk.clone());
            m.insert(aws_tags::RESTORE_POINT.to_string(), rp.id.clone());
            m.insert(TEMPLATE.to_string(), t.name.clone());
            m.insert(CONVERTED_FROM.to_string(), d.snapshot_id.clone());
            m
        };
        for d in disks {
            let out = self
                .ec2
                .create_volume()
                .snapshot_id(&d.snapshot_id)
                .availability_zone(&host.zone)
                .volume_type(VolumeType::Gp3)
                .tag_specifications(tag_spec(ResourceType::Volume, &tags_of(d, ROLE_CONVERSION)))
                .send()
                .await
                .map_err(|e| FleetError::sdk("CreateVolume", e))?;
            let id = out
                .volume_id()
                .ok_or_else(|| FleetError::Conflict("CreateVolume returned no volume id".into()))?;
            debug!(volume = id, from = %d.snapshot_id, "created a volume to convert");
            work.volumes.push((id.to_string(), false));
        }
        let ids: Vec<String> = work.volumes.iter().map(|(v, _)| v.clone()).collect();
        on.or_interrupt(async {
            self.ec2
                .wait_until_volume_available()
                .set_volume_ids(Some(ids.clone()))
                .wait(self.wait_timeout)
                .await
                .map_err(|e| self.waited("the conversion's volumes to become available", e))
        })
        .await?;

        let mut taken = host.taken.clone();
        let mut i = 0;
        while i < work.volumes.len() {
            on.check()?;
            let dev = slipway_aws::device_names()
                .find(|n| {
                    !taken
                        .iter()
                        .any(|t| slipway_aws::device_key(t) == slipway_aws::device_key(n))
                })
                .ok_or_else(|| {
                    FleetError::Conflict(format!(
                        "no free device name on {} to attach the conversion's volumes",
                        host.instance_id
                    ))
                })?;
            let id = work.volumes[i].0.clone();
            // Counted as attached before the call: a response lost after EC2 accepted it must
            // still be detached by the cleanup (a detach of a volume that is not attached
            // fails harmlessly and is logged).
            work.volumes[i].1 = true;
            match self
                .ec2
                .attach_volume()
                .volume_id(&id)
                .instance_id(&host.instance_id)
                .device(&dev)
                .send()
                .await
            {
                Ok(_) => {}
                // The server attached a replica under that name since the host was described
                // (the volumes took a while to become available): take the next free one.
                Err(e)
                    if aws_smithy_types::error::display::DisplayErrorContext(&e)
                        .to_string()
                        .contains("already in use") =>
                {
                    warn!(volume = %id, device = %dev, "device name taken meanwhile; trying the next");
                    taken.push(dev);
                    continue;
                }
                Err(e) => return Err(FleetError::sdk("AttachVolume", e)),
            }
            taken.push(dev);
            i += 1;
        }
        on.or_interrupt(async {
            self.ec2
                .wait_until_volume_in_use()
                .set_volume_ids(Some(ids.clone()))
                .wait(self.wait_timeout)
                .await
                .map_err(|e| self.waited("the conversion's volumes to be attached", e))
        })
        .await?;
        let mut paths: Vec<PathBuf> = Vec::new();
        for (id, d) in ids.iter().zip(disks) {
            paths.push(on.or_interrupt(self.device_of(on, id, d.size_gib)).await?);
        }

        info!(rp = %rp.id, devices = ?paths, "converting");
        let rp_id = rp.id.clone();
        let report = tokio::task::spawn_blocking(move || {
            let report = slipway_convert::convert(
                &paths,
                &slipway_convert::Options {
                    convert: true,
                    extra: Vec::new(),
                },
                &mut |line| info!("conversion: {line}"),
            )?;
            // What the loop devices wrote is on the volumes before they are detached.
            for p in &paths {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .and_then(|f| f.sync_all())
                    .map_err(|source| slipway_convert::ConvertError::Io {
                        what: "flushing",
                        path: p.clone(),
                        source,
                    })?;
            }
            Ok(report)
        })
        .await
        .map_err(|e| FleetError::Conflict(format!("the conversion task failed: {e}")))?
        .map_err(|source| FleetError::Conversion {
            restore_point: rp_id,
            source,
        })?;

        // Snapshots of detached volumes: nothing can write them between conversion and
        // snapshot.
        on.check()?;
        self.detach_all(host, work).await?;
        on.check()?;
        for ((id, _), d) in work.volumes.iter().zip(disks) {
            let out = self
                .ec2
                .create_snapshot()
                .volume_id(id)
                .description(format!(
                    "slipway: restore point {} of {source}, disk {}, converted for launch",
                    rp.id, d.disk
                ))
                .tag_specifications(tag_spec(
                    ResourceType::Snapshot,
                    &tags_of(d, ROLE_CONVERTED),
                ))
                .send()
                .await
                .map_err(|e| FleetError::sdk("CreateSnapshot", e))?;
            let sid = out.snapshot_id().ok_or_else(|| {
                FleetError::Conflict("CreateSnapshot returned no snapshot id".into())
            })?;
            work.snapshots.push(sid.to_string());
        }
        Ok(report)
    }

    /// The block device of an attached conversion volume (it shows up a moment after EC2
    /// reports the attachment; there is no event to wait for, so the resolver is polled).
    async fn device_of(
        &self,
        on: &ConvertOn,
        volume: &str,
        size_gib: i32,
    ) -> Result<PathBuf, FleetError> {
        let started = Instant::now();
        let size = u64::try_from(size_gib).unwrap_or(1) << 30;
        loop {
            match on.devices.resolve(volume, size) {
                Ok(p) => return Ok(p),
                Err(e) if started.elapsed() + self.poll_interval > self.wait_timeout => {
                    return Err(FleetError::ConversionHost(format!(
                        "volume {volume} is attached but its block device did not appear here: {e} (does --convert-on name the instance this command runs on?)"
                    )))
                }
                Err(e) => debug!(volume, error = %e, "block device not there yet"),
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    async fn detach_all(&self, host: &Host, work: &mut Intermediate) -> Result<(), FleetError> {
        let mut detaching = Vec::new();
        let mut first_error = None;
        // Every volume is asked for, whatever happened to the one before: a failed detach
        // must not leave the others attached to the server.
        for (id, attached) in work.volumes.iter_mut() {
            if !*attached {
                continue;
            }
            match self
                .ec2
                .detach_volume()
                .volume_id(id.as_str())
                .instance_id(&host.instance_id)
                .send()
                .await
            {
                Ok(_) => {
                    *attached = false;
                    detaching.push(id.clone());
                }
                Err(e) => {
                    let e = FleetError::sdk("DetachVolume", e);
                    warn!(volume = %id, error = %e, "detaching a conversion volume");
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        if detaching.is_empty() {
            return Ok(());
        }
        self.ec2
            .wait_until_volume_available()
            .set_volume_ids(Some(detaching))
            .wait(self.wait_timeout)
            .await
            .map_err(|e| self.waited("the conversion's volumes to be detached", e))?;
        Ok(())
    }

    /// Detaches (if attached) and deletes the conversion's volumes, waiting until they are gone.
    async fn remove_volumes(
        &self,
        host: &Host,
        volumes: &[(String, bool)],
    ) -> Result<(), FleetError> {
        if volumes.is_empty() {
            return Ok(());
        }
        let mut work = Intermediate {
            volumes: volumes.to_vec(),
            snapshots: Vec::new(),
        };
        // A detach that fails (the volume never got attached after all) must not keep the
        // others from being deleted: the delete below reports what is really stuck.
        if let Err(e) = self.detach_all(host, &mut work).await {
            warn!(error = %e, "detaching the conversion's volumes");
        }
        let ids: Vec<String> = volumes.iter().map(|(v, _)| v.clone()).collect();
        // EC2 deletes only available volumes: one still being created (an error right after
        // its CreateVolume) or detached is waited for first. A volume that will not become
        // available (an `error` volume) is left to DeleteVolume, which says why.
        if let Err(e) = self
            .ec2
            .wait_until_volume_available()
            .set_volume_ids(Some(ids.clone()))
            .wait(self.wait_timeout)
            .await
        {
            warn!(error = %self.waited("the conversion's volumes to be free", e), "deleting the conversion's volumes anyway");
        }
        let mut first_error = None;
        for id in &ids {
            if let Err(e) = self.ec2.delete_volume().volume_id(id).send().await {
                let e = FleetError::sdk("DeleteVolume", e);
                warn!(volume = %id, error = %e, "deleting a conversion volume");
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        self.ec2
            .wait_until_volume_deleted()
            .set_volume_ids(Some(ids))
            .wait(self.wait_timeout)
            .await
            .map_err(|e| self.waited("the conversion's volumes to be deleted", e))?;
        Ok(())
    }

    async fn wait_snapshots(&self, ids: &[String]) -> Result<(), FleetError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.ec2
            .wait_until_snapshot_completed()
            .set_snapshot_ids(Some(ids.to_vec()))
            .wait(self.wait_timeout)
            .await
            .map_err(|e| self.waited("the converted snapshots to complete", e))?;
        Ok(())
    }

    /// Best effort: converted snapshots that no image will use.
    pub(crate) async fn delete_snapshots(&self, ids: &[String]) {
        for id in ids {
            if let Err(e) = self.ec2.delete_snapshot().snapshot_id(id).send().await {
                error!(snapshot = %id, error = %FleetError::sdk("DeleteSnapshot", e), "could not delete a converted snapshot (tagged slipway:role=converted): delete it by hand");
            }
        }
    }

    /// A waiter's failure: a timeout after `wait_timeout`, or the error it stopped on.
    fn waited<O, E>(&self, what: &str, e: WaiterError<O, E>) -> FleetError
    where
        O: fmt::Debug,
        E: std::error::Error + Send + Sync + 'static,
    {
        match e {
            WaiterError::ExceededMaxWait(_) => FleetError::Timeout {
                what: what.to_string(),
                after: self.wait_timeout,
            },
            e => FleetError::Aws {
                op: format!("waiting for {what}"),
                message: aws_smithy_types::error::display::DisplayErrorContext(&e).to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_pure_uefi_disk_registers_as_uefi() {
        use slipway_convert::BootMode as B;
        assert_eq!(boot_mode(B::Uefi), BootModeValues::Uefi);
        assert_eq!(boot_mode(B::LegacyBios), BootModeValues::LegacyBios);
        assert_eq!(boot_mode(B::Hybrid), BootModeValues::LegacyBios);
    }
}
