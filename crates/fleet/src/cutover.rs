//! The launch lifecycle's commands on EC2: `slipway launch status`, `slipway launch terminate`
//! and `slipway cutover finalize` (docs/launch.md). The state itself is derived by the pure
//! [`crate::lifecycle::derive`]; this module reads its inputs from EC2 and writes the few
//! tags that record what leaves no other trace.
//!
//! Why images are deregistered here: a launch registers an image from a restore point's
//! snapshots (or from converted copies of them), and EC2 refuses to delete a snapshot that a
//! registered image uses (`InvalidSnapshot.InUse`), so an image left behind pins its restore
//! point against pruning forever. When a launch ends — `terminate`, a cutover replacing test
//! instances, a finalize — its image is deregistered unless a live instance still boots from
//! it (or the launch about to run will), and the image's *converted* snapshots
//! (`slipway:role = converted`) are deleted with it. A restore point's own snapshots are never
//! deleted here: an unconverted image maps them directly, and they stay for the server's
//! retention policy (and `slipway:keep` for the ones a finalize kept).
//!
//! What is tagged: `slipway:lifecycle` on the source's replica volumes (tags
//! `slipway:source-id` + `slipway:role = replica`), `ready-for-cutover` by `terminate`,
//! `cutover-complete` by `finalize`; and `slipway:keep = cutover-finalized` on every snapshot
//! of the restore points a finalize keeps, which is what makes the server stop replicating
//! the source and never prune them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use aws_sdk_ec2::types::Tag;
use serde::Serialize;
use slipway_aws::tags as aws_tags;
use tracing::{info, warn};

use crate::convert::ROLE_CONVERTED;
use crate::error::FleetError;
use crate::fleet::{filter, tag_map, Fleet, TEMPLATE};
use crate::launch::{LaunchRecord, RestorePoint};
use crate::lifecycle::{derive, next_step, Facts, Launched, LifecycleState, Recorded};
use crate::template::Template;

/// One launch still counted by the lifecycle (not terminated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveLaunch {
    pub instance_id: String,
    pub mode: String,
    pub state: String,
    pub restore_point: String,
    pub image_id: String,
    pub private_ip: Option<String>,
}

impl From<&LaunchRecord> for LiveLaunch {
    fn from(l: &LaunchRecord) -> Self {
        LiveLaunch {
            instance_id: l.instance_id.clone(),
            mode: l.mode.clone(),
            state: l.state.clone(),
            restore_point: l.restore_point.clone(),
            image_id: l.image_id.clone(),
            private_ip: l.private_ip.clone(),
        }
    }
}

/// A source's place in the lifecycle (`slipway launch status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceStatus {
    pub source: String,
    pub state: LifecycleState,
    /// What to do next.
    pub next: String,
    /// The newest restore point whose snapshots are all completed.
    pub newest_restore_point: Option<String>,
    pub newest_restore_point_unix_ms: Option<u64>,
    pub live_launches: Vec<LiveLaunch>,
    /// Restore points kept by a finalize.
    pub kept_restore_points: Vec<String>,
}

/// `slipway launch status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LifecycleStatus {
    pub template: String,
    pub sources: Vec<SourceStatus>,
}

impl fmt::Display for LifecycleStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<20} {:<20} {:<24} LIVE LAUNCHES",
            "SOURCE", "STATE", "NEWEST RESTORE POINT"
        )?;
        for s in &self.sources {
            let live: Vec<String> = s
                .live_launches
                .iter()
                .map(|l| {
                    format!(
                        "{} {} {} ({})",
                        l.mode, l.instance_id, l.state, l.restore_point
                    )
                })
                .collect();
            writeln!(
                f,
                "{:<20} {:<20} {:<24} {}",
                s.source,
                s.state.as_str(),
                s.newest_restore_point.as_deref().unwrap_or("-"),
                if live.is_empty() {
                    "-".to_string()
                } else {
                    live.join(", ")
                }
            )?;
            if !s.kept_restore_points.is_empty() {
                writeln!(f, "  kept: {}", s.kept_restore_points.join(", "))?;
            }
            writeln!(f, "  next: {}", s.next)?;
        }
        Ok(())
    }
}

/// What `terminate` and `finalize` did to launch images.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImageCleanup {
    pub deregistered: Vec<String>,
    /// Converted snapshots of the deregistered images, deleted.
    pub snapshots_deleted: Vec<String>,
    /// Images left registered: a live instance (named) still boots from them, or the launch
    /// about to run does.
    pub kept: Vec<KeptImage>,
    /// What could not be cleaned up and is left for the operator (converted snapshots EC2
    /// refused to delete): the command goes on with the rest.
    pub warnings: Vec<String>,
}

/// An image left registered and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeptImage {
    pub image_id: String,
    pub reason: String,
}

impl fmt::Display for ImageCleanup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for i in &self.deregistered {
            writeln!(f, "deregistered image {i}")?;
        }
        if !self.snapshots_deleted.is_empty() {
            writeln!(
                f,
                "deleted converted snapshots {}",
                self.snapshots_deleted.join(", ")
            )?;
        }
        for k in &self.kept {
            writeln!(f, "kept image {}: {}", k.image_id, k.reason)?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

/// `slipway launch terminate --source S [--instance I] [--cutover]`.
#[derive(Debug, Clone)]
pub struct TerminateRequest {
    pub source: String,
    /// Only this instance (a launch of the source); `None`: every live test instance.
    pub instance: Option<String>,
    /// Also a cutover instance: roll the cutover back.
    pub cutover: bool,
}

/// What `terminate` did.
#[derive(Debug, Clone, Serialize)]
pub struct TerminateReport {
    pub source: String,
    pub terminated: Vec<String>,
    pub images: ImageCleanup,
    /// Replica volumes tagged `slipway:lifecycle = ready-for-cutover` (none while another
    /// test instance of the source is still live).
    pub recorded_on: Vec<String>,
    /// Test instances of the source left live (`--instance` named another).
    pub still_live: Vec<String>,
    /// The state afterwards.
    pub state: LifecycleState,
}

impl fmt::Display for TerminateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terminated.is_empty() {
            writeln!(f, "no live instance of {} to terminate", self.source)?;
        }
        for i in &self.terminated {
            writeln!(f, "terminated {i} of {}", self.source)?;
        }
        write!(f, "{}", self.images)?;
        if !self.still_live.is_empty() {
            writeln!(
                f,
                "test instances {} still live: ready-for-cutover not recorded",
                self.still_live.join(", ")
            )?;
        } else if self.recorded_on.is_empty() {
            writeln!(
                f,
                "no replica volume of {} found: ready-for-cutover not recorded",
                self.source
            )?;
        } else {
            writeln!(
                f,
                "recorded ready-for-cutover on {}",
                self.recorded_on.join(", ")
            )?;
        }
        writeln!(f, "{} is {}", self.source, self.state)
    }
}

/// `slipway cutover finalize --source S [--keep RP]...`.
#[derive(Debug, Clone)]
pub struct FinalizeRequest {
    pub source: String,
    /// Restore points to keep besides the one the cutover instance was launched from.
    pub keep: Vec<String>,
}

/// What `finalize` did.
#[derive(Debug, Clone, Serialize)]
pub struct FinalizeReport {
    pub source: String,
    /// The source was finalized before this run (which then only completed what an
    /// interrupted run left undone, if anything).
    pub already_finalized: bool,
    /// The cutover instance, left running.
    pub cutover_instance: Option<String>,
    /// Restore points now carrying `slipway:keep = cutover-finalized`.
    pub kept: Vec<String>,
    /// Snapshots this run tagged.
    pub snapshots_tagged: Vec<String>,
    /// Replica volumes this run tagged `slipway:lifecycle = cutover-complete`.
    pub recorded_on: Vec<String>,
    pub images: ImageCleanup,
}

impl FinalizeReport {
    /// Whether this run changed anything.
    pub fn changed(&self) -> bool {
        !self.snapshots_tagged.is_empty()
            || !self.recorded_on.is_empty()
            || !self.images.deregistered.is_empty()
            || !self.images.snapshots_deleted.is_empty()
    }
}

impl fmt::Display for FinalizeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.already_finalized && !self.changed() {
            return writeln!(
                f,
                "{} is already finalized (kept: {}); nothing to do",
                self.source,
                self.kept.join(", ")
            );
        }
        if self.already_finalized {
            writeln!(
                f,
                "{} was finalized; completed what an earlier run left undone",
                self.source
            )?;
        } else {
            writeln!(
                f,
                "finalized the cutover of {}: its server stops replicating it",
                self.source
            )?;
        }
        writeln!(
            f,
            "kept restore points {} (slipway:keep = {})",
            self.kept.join(", "),
            aws_tags::KEEP_FINALIZED
        )?;
        if !self.recorded_on.is_empty() {
            writeln!(
                f,
                "recorded cutover-complete on {}",
                self.recorded_on.join(", ")
            )?;
        }
        write!(f, "{}", self.images)?;
        if let Some(i) = &self.cutover_instance {
            writeln!(f, "cutover instance {i} left as it is")?;
        }
        Ok(())
    }
}

/// What the lifecycle reads of one source.
#[derive(Debug, Default)]
struct SourceView {
    rps: Vec<RestorePoint>,
    launches: Vec<LaunchRecord>,
    /// Replica volume id → its `slipway:lifecycle` (empty if none).
    volumes: BTreeMap<String, String>,
}

impl SourceView {
    fn facts(&self) -> Facts {
        Facts {
            completed_restore_point: self.rps.iter().any(RestorePoint::completed),
            launches: self
                .launches
                .iter()
                .map(|l| Launched {
                    cutover: l.is_cutover(),
                    live: l.live(),
                })
                .collect(),
            recorded: Recorded::of(self.volumes.values().map(String::as_str)),
            finalized: self.finalized(),
        }
    }

    fn state(&self) -> LifecycleState {
        derive(&self.facts())
    }

    fn finalized(&self) -> bool {
        self.rps
            .iter()
            .any(|r| r.keep.as_deref() == Some(aws_tags::KEEP_FINALIZED))
    }

    fn kept(&self) -> Vec<String> {
        self.rps
            .iter()
            .filter(|r| r.keep.as_deref() == Some(aws_tags::KEEP_FINALIZED))
            .map(|r| r.id.clone())
            .collect()
    }

    fn status(&self, source: &str) -> SourceStatus {
        let state = self.state();
        let newest = self.rps.iter().rev().find(|r| r.completed());
        SourceStatus {
            source: source.to_string(),
            state,
            next: next_step(state).to_string(),
            newest_restore_point: newest.map(|r| r.id.clone()),
            newest_restore_point_unix_ms: newest.map(|r| r.created_unix_ms),
            live_launches: self
                .launches
                .iter()
                .filter(|l| l.live())
                .map(LiveLaunch::from)
                .collect(),
            kept_restore_points: self.kept(),
        }
    }
}

impl Fleet {
    /// The lifecycle inputs of `sources`: one DescribeSnapshots, one DescribeInstances and one
    /// DescribeVolumes (each paginated, per 200 sources), whatever their number.
    async fn views(
        &self,
        t: &Template,
        sources: &[&str],
    ) -> Result<BTreeMap<String, SourceView>, FleetError> {
        let mut out: BTreeMap<String, SourceView> = sources
            .iter()
            .map(|s| (s.to_string(), SourceView::default()))
            .collect();
        for (s, rps) in self.restore_points_of(sources).await? {
            if let Some(v) = out.get_mut(&s) {
                v.rps = rps;
            }
        }
        let one = match sources {
            [s] => Some(*s),
            _ => None,
        };
        for l in self.launch_records(Some(&t.name), one).await? {
            if let Some(v) = out.get_mut(&l.source) {
                v.launches.push(l);
            }
        }
        for chunk in sources.chunks(200) {
            let vols: Vec<_> = self
                .ec2
                .describe_volumes()
                .filters(filter(&format!("tag:{}", aws_tags::SOURCE_ID), chunk))
                .filters(filter(
                    &format!("tag:{}", aws_tags::ROLE),
                    &[aws_tags::ROLE_REPLICA],
                ))
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .map_err(|e| FleetError::sdk("DescribeVolumes", e))?;
            for vol in vols {
                let tags = tag_map(vol.tags());
                let (Some(s), Some(id)) = (tags.get(aws_tags::SOURCE_ID), vol.volume_id()) else {
                    continue;
                };
                if let Some(v) = out.get_mut(s) {
                    let rec = tags.get(aws_tags::LIFECYCLE).cloned().unwrap_or_default();
                    v.volumes.insert(id.to_string(), rec);
                }
            }
        }
        Ok(out)
    }

    async fn view(&self, t: &Template, source: &str) -> Result<SourceView, FleetError> {
        if t.source(source).is_none() {
            return Err(FleetError::NotFound(format!(
                "source {source} is not in template {}",
                t.name
            )));
        }
        Ok(self
            .views(t, &[source])
            .await?
            .remove(source)
            .unwrap_or_default())
    }

    /// `slipway launch status`: every source of the template, or one.
    pub async fn lifecycle(
        &self,
        t: &Template,
        source: Option<&str>,
    ) -> Result<LifecycleStatus, FleetError> {
        let sources: Vec<&str> = match source {
            Some(s) => {
                if t.source(s).is_none() {
                    return Err(FleetError::NotFound(format!(
                        "source {s} is not in template {}",
                        t.name
                    )));
                }
                vec![s]
            }
            None => t.sources.iter().map(|s| s.id.as_str()).collect(),
        };
        let views = self.views(t, &sources).await?;
        Ok(LifecycleStatus {
            template: t.name.clone(),
            sources: views.iter().map(|(s, v)| v.status(s)).collect(),
        })
    }

    /// `slipway launch terminate`: ends the source's tests (or, with `cutover`, rolls its
    /// cutover back), deregisters their images and records `ready-for-cutover`.
    pub async fn terminate_launches(
        &self,
        t: &Template,
        req: &TerminateRequest,
    ) -> Result<TerminateReport, FleetError> {
        let v = self.view(t, &req.source).await?;
        let state = v.state();
        if state == LifecycleState::CutoverComplete {
            return Err(FleetError::WrongState {
                source_id: req.source.clone(),
                state,
                hint:
                    "its cutover was finalized: its instances are no longer Slipway's to terminate"
                        .into(),
            });
        }
        // A launch whose mode tag is missing or unknown is not taken for a test: only
        // `--cutover` ends what is not known to be one.
        let covered = |l: &LaunchRecord| req.cutover || l.mode == "test";
        let targets: Vec<&LaunchRecord> = match &req.instance {
            Some(id) => {
                let l = v
                    .launches
                    .iter()
                    .find(|l| &l.instance_id == id)
                    .ok_or_else(|| {
                        FleetError::NotFound(format!(
                            "instance {id} is not a launch of source {} (template {})",
                            req.source, t.name
                        ))
                    })?;
                if !covered(l) {
                    return Err(FleetError::CutoverInstance {
                        source_id: req.source.clone(),
                        instance: id.clone(),
                    });
                }
                vec![l]
            }
            None => {
                if !req.cutover {
                    if let Some(c) = v.launches.iter().find(|l| l.live() && l.is_cutover()) {
                        // A plain terminate in cutover-in-progress would record
                        // ready-for-cutover under a live cutover: say what ends a cutover.
                        if !v.launches.iter().any(|l| l.live() && !l.is_cutover()) {
                            return Err(FleetError::CutoverInstance {
                                source_id: req.source.clone(),
                                instance: c.instance_id.clone(),
                            });
                        }
                    }
                }
                v.launches.iter().filter(|l| covered(l)).collect()
            }
        };
        if targets.is_empty() {
            return Err(FleetError::WrongState {
                source_id: req.source.clone(),
                state,
                hint: "it has no test launch to terminate: launch one with `slipway launch --mode test`"
                    .into(),
            });
        }
        // Terminated ones are among the targets too: their images may still be registered
        // (an instance terminated from the console, an earlier run cut short).
        let images = self.end_launches(t, &req.source, &targets, &[]).await?;
        // A rolled-back cutover's restore point goes back to the policy (the tag only where
        // its value is still the cutover's: DeleteTags with a value matches it).
        let rolled_back: Vec<String> = targets
            .iter()
            .filter(|l| l.is_cutover())
            .filter_map(|l| v.rps.iter().find(|r| r.id == l.restore_point))
            .flat_map(|r| r.disks.iter().map(|d| d.snapshot_id.clone()))
            .collect();
        for chunk in rolled_back.chunks(1000) {
            self.ec2
                .delete_tags()
                .set_resources(Some(chunk.to_vec()))
                .tags(
                    Tag::builder()
                        .key(aws_tags::KEEP)
                        .value(aws_tags::KEEP_CUTOVER)
                        .build(),
                )
                .send()
                .await
                .map_err(|e| FleetError::sdk("DeleteTags", e))?;
        }
        let terminated: Vec<String> = targets
            .iter()
            .filter(|l| l.live())
            .map(|l| l.instance_id.clone())
            .collect();
        // Ready for cutover once no test runs: not while `--instance` left another live.
        let still_live: Vec<String> = v
            .launches
            .iter()
            .filter(|l| l.live() && !l.is_cutover() && !terminated.contains(&l.instance_id))
            .map(|l| l.instance_id.clone())
            .collect();
        let volumes: Vec<String> = if still_live.is_empty() {
            v.volumes.keys().cloned().collect()
        } else {
            Vec::new()
        };
        self.tag(
            &volumes,
            aws_tags::LIFECYCLE,
            Recorded::ReadyForCutover.as_str(),
        )
        .await?;
        if volumes.is_empty() && still_live.is_empty() {
            warn!(source = %req.source, "no replica volume found: ready-for-cutover not recorded");
        }
        let after = self.view(t, &req.source).await?.state();
        Ok(TerminateReport {
            source: req.source.clone(),
            terminated,
            images,
            recorded_on: volumes,
            still_live,
            state: after,
        })
    }

    /// `slipway cutover finalize` (see the module doc). Idempotent: on a finalized source it
    /// completes what an interrupted run left undone and otherwise changes nothing.
    pub async fn finalize(
        &self,
        t: &Template,
        req: &FinalizeRequest,
    ) -> Result<FinalizeReport, FleetError> {
        let v = self.view(t, &req.source).await?;
        let state = v.state();
        let already = v.finalized();
        if !already && state != LifecycleState::CutoverInProgress {
            return Err(FleetError::WrongState {
                source_id: req.source.clone(),
                state,
                hint: format!(
                    "only a source with a live cutover instance can be finalized; {}",
                    next_step(state)
                ),
            });
        }
        // A test instance still live would be stranded: once finalized, nothing of the source
        // is Slipway's to terminate.
        if !already {
            if let Some(l) = v.launches.iter().find(|l| l.live() && !l.is_cutover()) {
                return Err(FleetError::WrongState {
                    source_id: req.source.clone(),
                    state,
                    hint: format!(
                        "test instance {} is still live: end it first with `slipway launch terminate --source {}` (the cutover instance stays)",
                        l.instance_id, req.source
                    ),
                });
            }
        }
        let cutovers: Vec<&LaunchRecord> = v.launches.iter().filter(|l| l.is_cutover()).collect();
        // The newest cutover: the live one (at most one), else (already finalized) the last.
        let cutover = cutovers
            .iter()
            .rev()
            .find(|l| l.live())
            .or(cutovers.last())
            .copied();

        let mut kept: Vec<String> = v.kept();
        let mut snapshots_tagged = Vec::new();
        if !already {
            let mut want: Vec<&str> = Vec::new();
            if let Some(c) = cutover {
                want.push(&c.restore_point);
            }
            want.extend(req.keep.iter().map(String::as_str));
            let mut rps: Vec<&RestorePoint> = Vec::new();
            for id in want {
                let rp = v.rps.iter().find(|r| r.id == id).ok_or_else(|| {
                    FleetError::NotFound(format!(
                        "no restore point {id} of source {} to keep",
                        req.source
                    ))
                })?;
                if !rp.completed() {
                    return Err(FleetError::Conflict(format!(
                        "restore point {id} of source {} is not complete: it cannot be kept",
                        req.source
                    )));
                }
                if !rps.iter().any(|r| r.id == rp.id) {
                    rps.push(rp);
                }
            }
            // First, as it is the point of no return: the server stops replicating the
            // source once one of its restore points carries the tag.
            let snaps: Vec<String> = rps
                .iter()
                .flat_map(|r| r.disks.iter().map(|d| d.snapshot_id.clone()))
                .collect();
            self.tag(&snaps, aws_tags::KEEP, aws_tags::KEEP_FINALIZED)
                .await?;
            info!(source = %req.source, restore_points = ?rps.iter().map(|r| &r.id).collect::<Vec<_>>(), "restore points kept: the source is finalized");
            snapshots_tagged = snaps;
            kept = rps.iter().map(|r| r.id.clone()).collect();
        } else if !req.keep.is_empty() {
            let extra: Vec<&String> = req.keep.iter().filter(|k| !kept.contains(k)).collect();
            if !extra.is_empty() {
                return Err(FleetError::WrongState {
                    source_id: req.source.clone(),
                    state,
                    hint: format!(
                        "it is already finalized, keeping {}; tag {} with {} = {} by hand to keep more",
                        kept.join(", "),
                        extra.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                        aws_tags::KEEP,
                        aws_tags::KEEP_FINALIZED
                    ),
                });
            }
        }

        let untagged: Vec<String> = v
            .volumes
            .iter()
            .filter(|(_, rec)| rec.as_str() != Recorded::CutoverComplete.as_str())
            .map(|(id, _)| id.clone())
            .collect();
        self.tag(
            &untagged,
            aws_tags::LIFECYCLE,
            Recorded::CutoverComplete.as_str(),
        )
        .await?;

        // The cutover's image: its instance runs on volumes of its own, so only other live
        // instances keep the image.
        let images = match cutover {
            Some(c) => {
                self.release_images(
                    t,
                    &req.source,
                    &BTreeSet::from([c.image_id.clone()]),
                    &[],
                    std::slice::from_ref(&c.instance_id),
                )
                .await?
            }
            None => ImageCleanup::default(),
        };
        Ok(FinalizeReport {
            source: req.source.clone(),
            already_finalized: already,
            cutover_instance: cutover.filter(|c| c.live()).map(|c| c.instance_id.clone()),
            kept,
            snapshots_tagged,
            recorded_on: untagged,
            images,
        })
    }

    /// Ends launches of `source`: terminates the live ones (and waits until they are), then
    /// releases their images, except `keep_images`.
    pub(crate) async fn end_launches(
        &self,
        t: &Template,
        source: &str,
        launches: &[&LaunchRecord],
        keep_images: &[String],
    ) -> Result<ImageCleanup, FleetError> {
        let live: Vec<String> = launches
            .iter()
            .filter(|l| l.live())
            .map(|l| l.instance_id.clone())
            .collect();
        if !live.is_empty() {
            info!(source, instances = ?live, "terminating launches");
            self.terminate(&live).await?;
        }
        let mut images: BTreeSet<String> = launches
            .iter()
            .filter(|l| !l.image_id.is_empty())
            .map(|l| l.image_id.clone())
            .collect();
        // Also the source's launch images found by their own tags: EC2 stops listing a
        // terminated instance after about an hour, so the image of a launch terminated from
        // the console (or by a run cut short) is found only this way. Each is still released
        // only if no live instance boots from it.
        images.extend(self.source_images(t, source).await?);
        self.release_images(t, source, &images, keep_images, &[])
            .await
    }

    /// Registered images of this template's launches of `source` (tags `slipway:template`,
    /// `slipway:source-id`, which `register` sets).
    async fn source_images(&self, t: &Template, source: &str) -> Result<Vec<String>, FleetError> {
        let found = self
            .ec2
            .describe_images()
            .owners("self")
            .filters(filter(&format!("tag:{TEMPLATE}"), &[&t.name]))
            .filters(filter(&format!("tag:{}", aws_tags::SOURCE_ID), &[source]))
            .send()
            .await
            .map_err(|e| FleetError::sdk("DescribeImages", e))?;
        Ok(found
            .images()
            .iter()
            .filter(|i| i.state().map(|s| s.as_str()) != Some("deregistered"))
            .filter_map(|i| i.image_id().map(str::to_string))
            .collect())
    }

    /// Deregisters each of `images` that is this template's image of `source` and that no
    /// live instance (but those in `ignore`) boots from, then deletes its converted snapshots.
    /// Images already gone are skipped.
    async fn release_images(
        &self,
        t: &Template,
        source: &str,
        images: &BTreeSet<String>,
        keep: &[String],
        ignore: &[String],
    ) -> Result<ImageCleanup, FleetError> {
        let mut out = ImageCleanup::default();
        for image in images {
            if keep.contains(image) {
                out.kept.push(KeptImage {
                    image_id: image.clone(),
                    reason: "the cutover being launched boots from it".into(),
                });
                continue;
            }
            let found = self
                .ec2
                .describe_images()
                .owners("self")
                .filters(filter("image-id", &[image]))
                .send()
                .await
                .map_err(|e| FleetError::sdk("DescribeImages", e))?;
            let Some(img) = found
                .images()
                .iter()
                .find(|i| i.state().map(|s| s.as_str()) != Some("deregistered"))
            else {
                continue;
            };
            let tags = tag_map(img.tags());
            if tags.get(TEMPLATE) != Some(&t.name)
                || tags.get(aws_tags::SOURCE_ID).map(String::as_str) != Some(source)
            {
                out.kept.push(KeptImage {
                    image_id: image.clone(),
                    reason: format!(
                        "not registered by a launch of {source} (template {})",
                        t.name
                    ),
                });
                continue;
            }
            let users = self.instances_using(image).await?;
            let users: Vec<String> = users.into_iter().filter(|i| !ignore.contains(i)).collect();
            if !users.is_empty() {
                out.kept.push(KeptImage {
                    image_id: image.clone(),
                    reason: format!("live instances boot from it: {}", users.join(", ")),
                });
                continue;
            }
            let mapped: Vec<String> = img
                .block_device_mappings()
                .iter()
                .filter_map(|m| m.ebs()?.snapshot_id().map(str::to_string))
                .collect();
            match self.ec2.deregister_image().image_id(image).send().await {
                Ok(_) => {}
                Err(e)
                    if crate::error::sdk_code(&e)
                        .is_some_and(|c| c.starts_with("InvalidAMIID.")) => {}
                Err(e) => return Err(FleetError::sdk("DeregisterImage", e)),
            }
            info!(source, image = %image, "deregistered the launch's image");
            out.deregistered.push(image.clone());
            match self.delete_converted(&mapped).await {
                Ok(d) => out.snapshots_deleted.extend(d),
                Err(e) => {
                    warn!(source, image = %image, error = %e, "converted snapshots left behind");
                    out.warnings.push(e.to_string());
                }
            }
        }
        Ok(out)
    }

    /// Live instances (any, not only launches) booted from `image`.
    async fn instances_using(&self, image: &str) -> Result<Vec<String>, FleetError> {
        let reservations: Vec<_> = self
            .ec2
            .describe_instances()
            .filters(filter("image-id", &[image]))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| FleetError::sdk("DescribeInstances", e))?;
        Ok(reservations
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| {
                i.state()
                    .and_then(|s| s.name())
                    .is_some_and(|n| crate::lifecycle::is_live(n.as_str()))
            })
            .filter_map(|i| i.instance_id().map(str::to_string))
            .collect())
    }

    /// Deletes those of `snapshots` that are converted copies (`slipway:role = converted`) and
    /// carry no `slipway:keep`; a restore point's own snapshots are left alone. Every deletion
    /// is tried; failures are returned together, naming what to delete by hand.
    async fn delete_converted(&self, snapshots: &[String]) -> Result<Vec<String>, FleetError> {
        if snapshots.is_empty() {
            return Ok(Vec::new());
        }
        let found: Vec<_> = self
            .ec2
            .describe_snapshots()
            .owner_ids("self")
            .filters(filter(
                "snapshot-id",
                &snapshots.iter().map(String::as_str).collect::<Vec<_>>(),
            ))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| FleetError::sdk("DescribeSnapshots", e))?;
        let mut deleted = Vec::new();
        let mut failed = Vec::new();
        for s in &found {
            let tags = tag_map(s.tags());
            let Some(id) = s.snapshot_id() else { continue };
            if tags.get(aws_tags::ROLE).map(String::as_str) != Some(ROLE_CONVERTED)
                || tags.contains_key(aws_tags::KEEP)
            {
                continue;
            }
            match self.ec2.delete_snapshot().snapshot_id(id).send().await {
                Ok(_) => deleted.push(id.to_string()),
                Err(e) => failed.push(format!("{id} ({})", FleetError::sdk("DeleteSnapshot", e))),
            }
        }
        if !failed.is_empty() {
            return Err(FleetError::Conflict(format!(
                "the image was deregistered but these converted snapshots could not be deleted (tagged slipway:role = converted; delete them by hand): {}",
                failed.join("; ")
            )));
        }
        Ok(deleted)
    }

    /// Tags resources with `key = value`, in calls of at most 1000 resources.
    pub(crate) async fn tag(
        &self,
        resources: &[String],
        key: &str,
        value: &str,
    ) -> Result<(), FleetError> {
        for chunk in resources.chunks(1000) {
            self.ec2
                .create_tags()
                .set_resources(Some(chunk.to_vec()))
                .tags(Tag::builder().key(key).value(value).build())
                .send()
                .await
                .map_err(|e| FleetError::sdk("CreateTags", e))?;
        }
        Ok(())
    }
}
