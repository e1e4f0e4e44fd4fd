//! [`Fleet`]: the replication servers of a template on EC2 — read what runs, plan, reconcile.
//!
//! The only state is in EC2 tags: each server instance carries `slipway:template`,
//! `slipway:role = replication-server`, `slipway:server-index`, `slipway:server` (the tag of
//! its volumes), `slipway:settings-sha256` (of its user data) and `slipway:sources.N` (the
//! sources assigned to it, `id=disks,…` in chunks of at most 256 characters).
//!
//! Each server also has an identity volume (`slipway:role = identity` with the same
//! `slipway:template` and `slipway:server-index`): its data dir — TLS identity, token secret,
//! disk metadata — on a small encrypted EBS volume of its own. `apply` creates it before
//! the server's first launch and attaches it to every instance that is that server (first
//! launch, replacement, relaunch after a loss), so agents keep the fingerprint they pin, their
//! tokens and their disks' positions (`slipway_aws::identity_volume`).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use aws_sdk_ec2::types::{
    AttributeValue, Filter, HttpTokensState, IamInstanceProfileSpecification,
    InstanceMetadataOptionsRequest, InstanceNetworkInterfaceSpecification, InstanceType,
    ResourceType, SecureBlobAttributeValue, Tag, TagSpecification, VolumeType,
};
use aws_smithy_runtime_api::client::waiters::error::WaiterError;
use aws_smithy_types::Blob;
use slipway_aws::tags as aws_tags;
use tracing::{info, warn};

use crate::error::{sdk_code, FleetError};
use crate::planner::{self, Capacity, CurrentServer, Plan, SourceDemand};
use crate::probe::{MetricsProbe, SettingsProbe};
use crate::template::Template;

/// Tag: the template an instance (and its identity volume) belongs to.
pub const TEMPLATE: &str = aws_tags::TEMPLATE;
/// Tag: the server's index within its template (instance and identity volume).
pub const SERVER_INDEX: &str = aws_tags::SERVER_INDEX;
/// Value of `slipway:role` on replication servers (the IAM policy keys on it).
pub const ROLE_SERVER: &str = "replication-server";
/// Tag: SHA-256 prefix of the server's user data.
pub const SETTINGS_SHA: &str = "slipway:settings-sha256";
/// Tag prefix: sources assigned to the server, `slipway:sources.0`, `.1`, …
pub const SOURCES_PREFIX: &str = "slipway:sources.";

/// EC2 access for fleet operations, with the bounds of its waits.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub(crate) ec2: aws_sdk_ec2::Client,
    /// Interval between state polls.
    pub poll_interval: Duration,
    /// Bound on each wait for an instance or volume state.
    pub wait_timeout: Duration,
    /// Asks running servers which settings they run with (`None`: trust the tag alone).
    pub settings_probe: Option<Arc<dyn SettingsProbe>>,
}

/// A replication server as EC2 shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerState {
    pub index: u32,
    pub instance_id: String,
    pub state: String,
    pub instance_type: String,
    pub image_id: String,
    pub subnet_id: String,
    pub security_groups: Vec<String>,
    pub private_ip: Option<String>,
    pub public_ip: Option<String>,
    /// The `slipway:settings-sha256` tag: what apply last wrote into the user data.
    pub settings_hash: Option<String>,
    /// The fingerprint the running server reports (`slipway_settings_info`), when `apply`
    /// could read it.
    pub running_settings: Option<String>,
    pub sources: Vec<SourceDemand>,
    pub tags: BTreeMap<String, String>,
}

/// What `apply` does beyond `--dry-run`.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Only compute and print the plan.
    pub dry_run: bool,
}

/// One step of an apply, in the order it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// RunInstances for a new server.
    Launch {
        index: u32,
        instance_type: String,
        sources: Vec<String>,
    },
    /// Stop, ModifyInstanceAttribute (type and/or user data), start: keeps the instance, its
    /// private IP, its root disk and its attachments.
    InPlace {
        index: u32,
        instance_id: String,
        instance_type: Option<(String, String)>,
        settings: bool,
    },
    /// Launch a new instance for the server and move its replica volumes to it.
    Replace {
        index: u32,
        instance_id: String,
        reasons: Vec<String>,
    },
    /// A source's replica volumes go to another server.
    Move { source: String, from: u32, to: u32 },
    /// Sources assigned to or removed from a server (tags only).
    Assign {
        index: u32,
        added: Vec<String>,
        removed: Vec<String>,
    },
    /// Security groups of a running server changed (ModifyInstanceAttribute, live).
    SecurityGroups { index: u32, groups: Vec<String> },
    /// User tags changed (CreateTags/DeleteTags, live).
    Tags { index: u32 },
    /// A server left with no source is terminated (its replica volumes stay).
    Retire { index: u32, instance_id: String },
    /// A server found stopped (by hand, or an interrupted switch) is started again.
    Start { index: u32, instance_id: String },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Launch {
                index,
                instance_type,
                sources,
            } => write!(
                f,
                "launch server {index} ({instance_type}) for {}",
                list(sources)
            ),
            Action::InPlace {
                index,
                instance_id,
                instance_type,
                settings,
            } => {
                write!(f, "server {index} ({instance_id}): stop, ")?;
                if let Some((from, to)) = instance_type {
                    write!(f, "instance type {from} -> {to}, ")?;
                }
                if *settings {
                    write!(f, "new settings (user data), ")?;
                }
                write!(f, "start (same instance, private IP and volumes)")
            }
            Action::Replace {
                index,
                instance_id,
                reasons,
            } => write!(
                f,
                "server {index} ({instance_id}): replace ({}): stop, detach replica volumes, terminate, launch, attach",
                reasons.join("; ")
            ),
            Action::Move { source, from, to } => write!(
                f,
                "move source {source} from server {from} to server {to} (stop {from}, detach, attach to {to}, start {from})"
            ),
            Action::Assign {
                index,
                added,
                removed,
            } => {
                write!(f, "server {index}: ")?;
                if !added.is_empty() {
                    write!(f, "assign {}", list(added))?;
                }
                if !removed.is_empty() {
                    if !added.is_empty() {
                        write!(f, "; ")?;
                    }
                    write!(f, "unassign {}", list(removed))?;
                }
                Ok(())
            }
            Action::SecurityGroups { index, groups } => {
                write!(f, "server {index}: security groups -> {}", groups.join(", "))
            }
            Action::Tags { index } => write!(f, "server {index}: update tags"),
            Action::Start { index, instance_id } => {
                write!(f, "server {index} ({instance_id}) is stopped: start it")
            }
            Action::Retire { index, instance_id } => write!(
                f,
                "retire server {index} ({instance_id}): no source left; terminate (replica volumes are kept)"
            ),
        }
    }
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "no source yet".into()
    } else if v.len() <= 6 {
        v.join(", ")
    } else {
        format!("{}, … ({} sources)", v[..5].join(", "), v.len())
    }
}

/// A server in a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReport {
    pub index: u32,
    pub instance_id: Option<String>,
    pub instance_type: String,
    pub state: String,
    /// `IP:port` agents connect to (private or public IP per `private_ip_routing`).
    pub address: Option<String>,
    pub sources: Vec<String>,
    pub disks: u32,
}

/// What `apply` did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub template: String,
    pub dry_run: bool,
    pub actions: Vec<Action>,
    pub servers: Vec<ServerReport>,
    /// `(source, server index, address)`: where each source's agent connects.
    pub agents: Vec<(String, u32, Option<String>)>,
    /// Drift the template does not reconcile (told, never acted on).
    pub warnings: Vec<String>,
}

impl ApplyReport {
    /// Whether anything was (or would be) changed.
    pub fn changed(&self) -> bool {
        !self.actions.is_empty()
    }
}

impl fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run { "plan" } else { "applied" };
        if self.actions.is_empty() {
            writeln!(f, "template {}: no changes", self.template)?;
        } else {
            writeln!(
                f,
                "template {}: {verb} ({} step{})",
                self.template,
                self.actions.len(),
                if self.actions.len() == 1 { "" } else { "s" }
            )?;
            for (i, a) in self.actions.iter().enumerate() {
                writeln!(f, "  {}. {a}", i + 1)?;
            }
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "{:<6} {:<21} {:<12} {:<10} {:<21} {:>5}  SOURCES",
            "SERVER", "INSTANCE", "TYPE", "STATE", "AGENTS CONNECT TO", "DISKS"
        )?;
        for s in &self.servers {
            writeln!(
                f,
                "{:<6} {:<21} {:<12} {:<10} {:<21} {:>5}  {}",
                s.index,
                s.instance_id.as_deref().unwrap_or("(to launch)"),
                s.instance_type,
                s.state,
                s.address.as_deref().unwrap_or("-"),
                s.disks,
                list(&s.sources)
            )?;
        }
        if !self.agents.is_empty() {
            writeln!(f)?;
            writeln!(f, "{:<32} {:<6} AGENT --server", "SOURCE", "SERVER")?;
            for (src, index, addr) in &self.agents {
                writeln!(
                    f,
                    "{:<32} {:<6} {}",
                    src,
                    index,
                    addr.as_deref().unwrap_or("(known once launched)")
                )?;
            }
        }
        Ok(())
    }
}

pub(crate) fn filter(name: &str, values: &[&str]) -> Filter {
    let mut b = Filter::builder().name(name);
    for v in values {
        b = b.values(*v);
    }
    b.build()
}

pub(crate) fn tag_map(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_string(),
                t.value().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

pub(crate) fn tag_spec(
    resource: ResourceType,
    tags: &BTreeMap<String, String>,
) -> TagSpecification {
    let mut b = TagSpecification::builder().resource_type(resource);
    for (k, v) in tags {
        b = b.tags(Tag::builder().key(k).value(v).build());
    }
    b.build()
}

/// `slipway:sources.N` tags for a list of sources: `id=disks` joined by commas, in chunks of at
/// most 256 characters (the EC2 limit of a tag value).
pub fn encode_sources(sources: &[SourceDemand]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chunk = String::new();
    for s in sources {
        let item = format!("{}={}", s.id, s.disks);
        if !chunk.is_empty() && chunk.len() + 1 + item.len() > 256 {
            out.insert(
                format!("{SOURCES_PREFIX}{}", out.len()),
                std::mem::take(&mut chunk),
            );
        }
        if !chunk.is_empty() {
            chunk.push(',');
        }
        chunk.push_str(&item);
    }
    if !chunk.is_empty() {
        out.insert(format!("{SOURCES_PREFIX}{}", out.len()), chunk);
    }
    out
}

/// The sources recorded in `slipway:sources.N` tags, in order. Malformed entries are skipped.
pub fn decode_sources(tags: &BTreeMap<String, String>) -> Vec<SourceDemand> {
    let mut chunks: Vec<(u32, &str)> = tags
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(SOURCES_PREFIX)?.parse().ok()?, v.as_str())))
        .collect();
    chunks.sort();
    chunks
        .iter()
        .flat_map(|(_, v)| v.split(','))
        .filter_map(|item| {
            let (id, disks) = item.split_once('=')?;
            Some(SourceDemand::new(id, disks.parse().ok()?))
        })
        .collect()
}

/// Why a server must be replaced, changed in place, or has live drift.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    pub replace: Vec<String>,
    pub instance_type: Option<(String, String)>,
    pub settings: bool,
    pub security_groups: bool,
}

/// Compares a running server with the template (pure).
pub fn drift(t: &Template, s: &ServerState) -> Drift {
    let mut d = Drift::default();
    if s.image_id != t.ami {
        d.replace.push(format!("AMI {} -> {}", s.image_id, t.ami));
    }
    if s.subnet_id != t.staging_subnet {
        d.replace
            .push(format!("subnet {} -> {}", s.subnet_id, t.staging_subnet));
    }
    if s.instance_type != t.instance_type {
        d.instance_type = Some((s.instance_type.clone(), t.instance_type.clone()));
    }
    let want = t.settings_hash(s.index);
    // The tag only says what was written; what the server reports is what it applied.
    if s.settings_hash.as_deref() != Some(want.as_str())
        || s.running_settings.as_deref().is_some_and(|r| r != want)
    {
        d.settings = true;
    }
    let mut have = s.security_groups.clone();
    have.sort();
    let mut want = t.security_groups.clone();
    want.sort();
    d.security_groups = have != want;
    d
}

/// Tags the server sets on its own instance (its TLS fingerprint, published at start): the
/// fleet neither compares nor removes them.
fn server_owned(key: &str) -> bool {
    key == aws_tags::TLS_FINGERPRINT
}

/// The tags a server instance carries (sources excluded).
fn server_tags(t: &Template, index: u32) -> BTreeMap<String, String> {
    let mut tags = BTreeMap::new();
    tags.insert(
        "Name".to_string(),
        format!("slipway-{}", t.server_tag(index)),
    );
    tags.extend(t.tags.clone());
    tags.insert(TEMPLATE.into(), t.name.clone());
    tags.insert(aws_tags::ROLE.into(), ROLE_SERVER.into());
    tags.insert(SERVER_INDEX.into(), index.to_string());
    tags.insert(aws_tags::SERVER.into(), t.server_tag(index));
    tags.insert(SETTINGS_SHA.into(), t.settings_hash(index));
    tags
}

impl Fleet {
    /// EC2 in `region` through the default credential chain (environment, profile, SSO,
    /// instance profile); `AWS_ENDPOINT_URL` is honoured.
    pub async fn connect(region: &str) -> Fleet {
        let sdk = slipway_aws::sdk_config(Some(region.to_string())).await;
        Fleet::new(&sdk)
    }

    /// EC2 through `sdk` (tests point it at the emulator).
    pub fn new(sdk: &SdkConfig) -> Fleet {
        Fleet {
            ec2: aws_sdk_ec2::Client::new(sdk),
            poll_interval: Duration::from_secs(2),
            wait_timeout: Duration::from_secs(600),
            settings_probe: Some(Arc::new(MetricsProbe::default())),
        }
    }

    /// EC2 through an existing client (tests give it the SDK's mock client).
    pub fn with_client(ec2: aws_sdk_ec2::Client) -> Fleet {
        Fleet {
            ec2,
            poll_interval: Duration::from_secs(2),
            wait_timeout: Duration::from_secs(600),
            settings_probe: None,
        }
    }

    /// The EC2 client (for callers that need to look at what was done).
    pub fn ec2(&self) -> &aws_sdk_ec2::Client {
        &self.ec2
    }

    /// The template's replication servers that are not terminated, by index.
    pub async fn servers(&self, t: &Template) -> Result<Vec<ServerState>, FleetError> {
        let reservations = self
            .ec2
            .describe_instances()
            .filters(filter(&format!("tag:{TEMPLATE}"), &[&t.name]))
            .filters(filter(&format!("tag:{}", aws_tags::ROLE), &[ROLE_SERVER]))
            .filters(filter(
                "instance-state-name",
                &["pending", "running", "stopping", "stopped"],
            ))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| FleetError::sdk("DescribeInstances", e))?;
        let mut out: Vec<ServerState> = Vec::new();
        for r in &reservations {
            for i in r.instances() {
                let tags = tag_map(i.tags());
                let id = i.instance_id().unwrap_or_default().to_string();
                let Some(index) = tags.get(SERVER_INDEX).and_then(|v| v.parse::<u32>().ok()) else {
                    warn!(instance = %id, "replication server without a valid {SERVER_INDEX} tag; left alone");
                    continue;
                };
                if let Some(other) = out.iter().find(|s| s.index == index) {
                    return Err(FleetError::Conflict(format!(
                        "instances {} and {id} both claim server {index} of template {}; terminate the one that is not serving (check `slipway status` on each)",
                        other.instance_id, t.name
                    )));
                }
                out.push(ServerState {
                    index,
                    instance_id: id,
                    state: i
                        .state()
                        .and_then(|s| s.name())
                        .map(|n| n.as_str().to_string())
                        .unwrap_or_default(),
                    instance_type: i
                        .instance_type()
                        .map(|t| t.as_str().to_string())
                        .unwrap_or_default(),
                    image_id: i.image_id().unwrap_or_default().to_string(),
                    subnet_id: i.subnet_id().unwrap_or_default().to_string(),
                    security_groups: i
                        .security_groups()
                        .iter()
                        .filter_map(|g| g.group_id().map(str::to_string))
                        .collect(),
                    private_ip: i.private_ip_address().map(str::to_string),
                    public_ip: i.public_ip_address().map(str::to_string),
                    settings_hash: tags.get(SETTINGS_SHA).cloned(),
                    running_settings: None,
                    sources: decode_sources(&tags),
                    tags,
                });
            }
        }
        out.sort_by_key(|s| s.index);
        Ok(out)
    }

    /// Fills each running server's `running_settings` from the probe; a server that does not
    /// answer is judged by its tag, with a warning.
    async fn probe_settings(
        &self,
        t: &Template,
        current: &mut [ServerState],
        warnings: &mut Vec<String>,
    ) {
        let Some(probe) = &self.settings_probe else {
            return;
        };
        for s in current.iter_mut().filter(|s| s.state == "running") {
            s.running_settings = probe.running_settings(t, s).await;
            match &s.running_settings {
                None => warnings.push(format!(
                    "server {} ({}): could not read the settings it runs with from its metrics endpoint (port {}); judged by its {SETTINGS_SHA} tag only",
                    s.index, s.instance_id, t.metrics_port
                )),
                Some(r) if Some(r) != s.settings_hash.as_ref() => warn!(
                    instance = %s.instance_id,
                    running = %r,
                    tag = ?s.settings_hash,
                    "the server runs with other settings than its tag says"
                ),
                Some(_) => {}
            }
        }
    }

    /// The assignment plan for the template given what runs now.
    pub fn plan(t: &Template, current: &[ServerState]) -> Plan {
        Self::plan_with(t, current, &[])
    }

    /// The plan, with `lost` servers: indices with no instance whose sources still have replica
    /// volumes tagged for them (an instance terminated by hand, or an apply interrupted between
    /// terminating and relaunching a server). They keep their sources and are launched again,
    /// so the new instance adopts the volumes by its server tag.
    pub fn plan_with(t: &Template, current: &[ServerState], lost: &[CurrentServer]) -> Plan {
        let sources: Vec<SourceDemand> = t
            .sources
            .iter()
            .map(|s| SourceDemand::new(s.id.clone(), s.disks))
            .collect();
        let mut all: Vec<CurrentServer> = current
            .iter()
            .map(|s| CurrentServer {
                index: s.index,
                sources: s.sources.clone(),
            })
            .collect();
        all.extend(lost.iter().cloned());
        let mut plan = planner::plan(
            &sources,
            &all,
            Capacity {
                max_disks: t.max_disks_per_server,
                dedicated: t.dedicated,
            },
        );
        for s in &mut plan.servers {
            if lost.iter().any(|l| l.index == s.index) {
                s.launch = true;
            }
        }
        plan.retire.retain(|i| !lost.iter().any(|l| l.index == *i));
        plan
    }

    /// Lost servers (see [`plan_with`](Self::plan_with)), from the replica volumes of the
    /// template's sources that no running server records.
    async fn lost_servers(
        &self,
        t: &Template,
        current: &[ServerState],
    ) -> Result<Vec<CurrentServer>, FleetError> {
        let recorded: std::collections::BTreeSet<&str> = current
            .iter()
            .flat_map(|s| s.sources.iter().map(|d| d.id.as_str()))
            .collect();
        let unrecorded: Vec<&crate::template::Source> = t
            .sources
            .iter()
            .filter(|s| !recorded.contains(s.id.as_str()))
            .collect();
        let prefix = format!("{}-", t.name);
        let mut by_index: BTreeMap<u32, Vec<SourceDemand>> = BTreeMap::new();
        for chunk in unrecorded.chunks(100) {
            let ids: Vec<&str> = chunk.iter().map(|s| s.id.as_str()).collect();
            let vols = self
                .ec2
                .describe_volumes()
                .filters(filter(
                    &format!("tag:{}", aws_tags::ROLE),
                    &[aws_tags::ROLE_REPLICA],
                ))
                .filters(filter(&format!("tag:{}", aws_tags::SOURCE_ID), &ids))
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .map_err(|e| FleetError::sdk("DescribeVolumes", e))?;
            for v in &vols {
                let tags = tag_map(v.tags());
                let (Some(src), Some(index)) = (
                    tags.get(aws_tags::SOURCE_ID),
                    tags.get(aws_tags::SERVER)
                        .and_then(|st| st.strip_prefix(&prefix))
                        .and_then(|i| i.parse::<u32>().ok()),
                ) else {
                    continue;
                };
                if current.iter().any(|c| c.index == index) {
                    continue;
                }
                let Some(source) = chunk.iter().find(|s| &s.id == src) else {
                    continue;
                };
                let list = by_index.entry(index).or_default();
                if !list.iter().any(|d| d.id == source.id) {
                    list.push(SourceDemand::new(source.id.clone(), source.disks));
                }
            }
        }
        // A source with volumes under two lost indices: the lower one keeps it.
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for (index, mut sources) in by_index {
            sources.retain(|d| seen.insert(d.id.clone()));
            sources.sort_by_key(|d| t.sources.iter().position(|s| s.id == d.id));
            if !sources.is_empty() {
                out.push(CurrentServer { index, sources });
            }
        }
        Ok(out)
    }

    /// Reconciles the template's replication servers with the template (see the module doc
    /// and `docs/replication-template.md`). Idempotent: a second apply finds nothing to do.
    pub async fn apply(
        &self,
        t: &Template,
        opts: &ApplyOptions,
    ) -> Result<ApplyReport, FleetError> {
        self.check_capacity(t).await?;
        let mut current = self.servers(t).await?;
        let mut warnings = Vec::new();
        // Servers in transition (a stop or start by hand, an interrupted apply): plan on what
        // they settle to; a dry run only says so.
        let moving: Vec<(String, &str)> = current
            .iter()
            .filter_map(|s| match s.state.as_str() {
                "pending" => Some((s.instance_id.clone(), "running")),
                "stopping" => Some((s.instance_id.clone(), "stopped")),
                _ => None,
            })
            .collect();
        if !moving.is_empty() {
            if opts.dry_run {
                for (id, to) in &moving {
                    warnings.push(format!(
                        "instance {id} is on its way to {to}; the plan assumes it got there"
                    ));
                }
            } else {
                for (id, to) in &moving {
                    self.wait_instance(id, to).await?;
                }
                current = self.servers(t).await?;
            }
        }
        self.probe_settings(t, &mut current, &mut warnings).await;
        let lost = self.lost_servers(t, &current).await?;
        for l in &lost {
            warnings.push(format!(
                "server {} has no instance but replica volumes of {}: launching it again",
                l.index,
                l.sources
                    .iter()
                    .map(|d| d.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let plan = Self::plan_with(t, &current, &lost);
        let actions = Self::actions(t, &current, &plan);
        for s in &current {
            let want_public = t.public_ip;
            if want_public != s.public_ip.is_some() && s.state == "running" {
                warnings.push(format!(
                    "server {} ({}): public_ip = {want_public} but the instance {} a public IP; it changes only when the server is replaced",
                    s.index,
                    s.instance_id,
                    if s.public_ip.is_some() { "has" } else { "has no" }
                ));
            }
        }
        if opts.dry_run {
            return Ok(self.report(t, true, actions, &current, &plan, warnings));
        }
        let mut by_index: BTreeMap<u32, ServerState> =
            current.iter().map(|s| (s.index, s.clone())).collect();
        for a in &actions {
            info!(template = %t.name, "{a}");
            match a {
                Action::Launch { index, .. } => {
                    let srcs = plan
                        .servers
                        .iter()
                        .find(|s| s.index == *index)
                        .map(|s| s.sources.clone())
                        .unwrap_or_default();
                    let s = self.launch_server(t, *index, &srcs, None).await?;
                    by_index.insert(*index, s);
                }
                Action::InPlace {
                    index,
                    instance_type,
                    settings,
                    ..
                } => {
                    let s = by_index[index].clone();
                    let s = self
                        .update_in_place(
                            t,
                            &s,
                            instance_type.as_ref().map(|x| x.1.as_str()),
                            *settings,
                        )
                        .await?;
                    by_index.insert(*index, s);
                }
                Action::Replace { index, .. } => {
                    let s = by_index[index].clone();
                    let s = self.replace(t, &s, &mut warnings).await?;
                    by_index.insert(*index, s);
                }
                Action::Move { source, from, to } => {
                    let (f, to_s) = (by_index[from].clone(), by_index[to].clone());
                    self.move_source(t, source, &f, &to_s).await?;
                }
                Action::Assign { index, .. } => {
                    let s = by_index[index].clone();
                    let want = plan
                        .servers
                        .iter()
                        .find(|p| p.index == *index)
                        .map(|p| p.sources.clone())
                        .unwrap_or_default();
                    self.set_source_tags(&s, &want).await?;
                }
                Action::SecurityGroups { index, groups } => {
                    let s = &by_index[index];
                    self.ec2
                        .modify_instance_attribute()
                        .instance_id(&s.instance_id)
                        .set_groups(Some(groups.clone()))
                        .send()
                        .await
                        .map_err(|e| FleetError::sdk("ModifyInstanceAttribute", e))?;
                }
                Action::Tags { index } => {
                    let s = by_index[index].clone();
                    let mut want = server_tags(t, *index);
                    want.extend(
                        s.tags
                            .iter()
                            .filter(|(k, _)| {
                                k.starts_with(SOURCES_PREFIX) || k.as_str() == SETTINGS_SHA
                            })
                            .map(|(k, v)| (k.clone(), v.clone())),
                    );
                    self.sync_tags(&s, &want).await?;
                }
                Action::Start { index, instance_id } => {
                    self.start(instance_id).await?;
                    let s = self.server_by_id(t, instance_id).await?;
                    by_index.insert(*index, s);
                }
                Action::Retire { index, instance_id } => {
                    self.terminate(std::slice::from_ref(instance_id)).await?;
                    by_index.remove(index);
                }
            }
        }
        // What runs now, for the report.
        let now = self.servers(t).await?;
        let plan_now = Self::plan(t, &now);
        Ok(self.report(t, false, actions, &now, &plan_now, warnings))
    }

    /// Fails if the instance type cannot attach `max_disks_per_server` volumes besides its root
    /// and identity volumes, when DescribeInstanceTypes says how many it can.
    async fn check_capacity(&self, t: &Template) -> Result<(), FleetError> {
        let out = match self
            .ec2
            .describe_instance_types()
            .instance_types(InstanceType::from(t.instance_type.as_str()))
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) if sdk_code(&e).is_some_and(|c| c.starts_with("InvalidInstanceType")) => {
                return Err(FleetError::Template {
                    file: t.file.display().to_string(),
                    key: "instance_type".into(),
                    reason: format!("{} is not offered in {}", t.instance_type, t.region),
                })
            }
            Err(e) => {
                warn!(error = %FleetError::sdk("DescribeInstanceTypes", e), "cannot check the instance type's EBS attachment limit");
                return Ok(());
            }
        };
        let Some(ebs) = out.instance_types().first().and_then(|i| i.ebs_info()) else {
            return Ok(());
        };
        let Some(max) = ebs.maximum_ebs_attachments().filter(|m| *m > 0) else {
            return Ok(());
        };
        let shared = ebs
            .attachment_limit_type()
            .is_some_and(|t| t.as_str() == "shared");
        let limit = crate::limits::data_volume_limit_from_aws(max as u32, shared);
        let need = if t.dedicated {
            t.sources.iter().map(|s| s.disks).max().unwrap_or(0)
        } else {
            t.max_disks_per_server
        };
        if need > limit {
            return Err(FleetError::Template {
                file: t.file.display().to_string(),
                key: if t.dedicated { "sources" } else { "max_disks_per_server" }.into(),
                reason: format!(
                    "{need} disks per server, but {} can attach only {limit} volumes besides its root and identity volumes",
                    t.instance_type
                ),
            });
        }
        Ok(())
    }

    /// The steps that take `current` to `plan` (pure).
    pub fn actions(t: &Template, current: &[ServerState], plan: &Plan) -> Vec<Action> {
        let mut actions = Vec::new();
        for s in &plan.servers {
            if s.launch {
                actions.push(Action::Launch {
                    index: s.index,
                    instance_type: t.instance_type.clone(),
                    sources: s.sources.iter().map(|d| d.id.clone()).collect(),
                });
            }
        }
        let retiring: Vec<u32> = plan.retire.clone();
        for c in current {
            if retiring.contains(&c.index) {
                continue;
            }
            let d = drift(t, c);
            if !d.replace.is_empty() {
                actions.push(Action::Replace {
                    index: c.index,
                    instance_id: c.instance_id.clone(),
                    reasons: d.replace,
                });
            } else if d.instance_type.is_some() || d.settings {
                actions.push(Action::InPlace {
                    index: c.index,
                    instance_id: c.instance_id.clone(),
                    instance_type: d.instance_type,
                    settings: d.settings,
                });
            } else if c.state == "stopped" {
                actions.push(Action::Start {
                    index: c.index,
                    instance_id: c.instance_id.clone(),
                });
            }
        }
        for m in &plan.moves {
            actions.push(Action::Move {
                source: m.source.clone(),
                from: m.from,
                to: m.to,
            });
        }
        for c in current {
            if retiring.contains(&c.index) {
                continue;
            }
            let want = plan
                .servers
                .iter()
                .find(|p| p.index == c.index)
                .map(|p| p.sources.clone())
                .unwrap_or_default();
            if want != c.sources {
                let added = want
                    .iter()
                    .filter(|w| !c.sources.iter().any(|s| s.id == w.id))
                    .map(|w| w.id.clone())
                    .collect();
                let removed = c
                    .sources
                    .iter()
                    .filter(|s| !want.iter().any(|w| w.id == s.id))
                    .map(|s| s.id.clone())
                    .collect();
                actions.push(Action::Assign {
                    index: c.index,
                    added,
                    removed,
                });
            }
            let d = drift(t, c);
            if d.replace.is_empty() {
                if d.security_groups {
                    actions.push(Action::SecurityGroups {
                        index: c.index,
                        groups: t.security_groups.clone(),
                    });
                }
                let want_tags = server_tags(t, c.index);
                let have: BTreeMap<String, String> = c
                    .tags
                    .iter()
                    .filter(|(k, _)| {
                        !k.starts_with(SOURCES_PREFIX)
                            && k.as_str() != SETTINGS_SHA
                            && !server_owned(k)
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let mut want_cmp = want_tags.clone();
                want_cmp.remove(SETTINGS_SHA);
                // An in-place update rewrites every tag anyway.
                if have != want_cmp && !(d.settings || d.instance_type.is_some()) {
                    actions.push(Action::Tags { index: c.index });
                }
            }
        }
        for r in &plan.retire {
            if let Some(c) = current.iter().find(|c| c.index == *r) {
                actions.push(Action::Retire {
                    index: *r,
                    instance_id: c.instance_id.clone(),
                });
            }
        }
        actions
    }

    fn report(
        &self,
        t: &Template,
        dry_run: bool,
        actions: Vec<Action>,
        current: &[ServerState],
        plan: &Plan,
        warnings: Vec<String>,
    ) -> ApplyReport {
        let mut servers = Vec::new();
        let mut agents = Vec::new();
        for p in &plan.servers {
            let c = current.iter().find(|c| c.index == p.index);
            let ip = c.and_then(|c| {
                if t.private_ip_routing {
                    c.private_ip.clone()
                } else {
                    c.public_ip.clone()
                }
            });
            let address = ip.map(|ip| format!("{ip}:{}", t.agent_port));
            servers.push(ServerReport {
                index: p.index,
                instance_id: c.map(|c| c.instance_id.clone()),
                instance_type: c
                    .map(|c| c.instance_type.clone())
                    .unwrap_or_else(|| t.instance_type.clone()),
                state: c.map(|c| c.state.clone()).unwrap_or_else(|| "-".into()),
                address: address.clone(),
                sources: p.sources.iter().map(|s| s.id.clone()).collect(),
                disks: p.disks(),
            });
        }
        for src in &t.sources {
            if let Some(index) = plan.server_of(&src.id) {
                let addr = servers
                    .iter()
                    .find(|s| s.index == index)
                    .and_then(|s| s.address.clone());
                agents.push((src.id.clone(), index, addr));
            }
        }
        ApplyReport {
            template: t.name.clone(),
            dry_run,
            actions,
            servers,
            agents,
            warnings,
        }
    }

    /// RunInstances for server `index` and wait until it runs.
    async fn launch_server(
        &self,
        t: &Template,
        index: u32,
        sources: &[SourceDemand],
        private_ip: Option<&str>,
    ) -> Result<ServerState, FleetError> {
        let mut tags = server_tags(t, index);
        tags.extend(encode_sources(sources));
        let mut volume_tags = t.tags.clone();
        volume_tags.insert(TEMPLATE.into(), t.name.clone());
        volume_tags.insert(SERVER_INDEX.into(), index.to_string());
        volume_tags.insert(
            "Name".into(),
            format!("slipway-{}-root", t.server_tag(index)),
        );
        // The server's data dir (TLS identity, token secret, disk metadata) lives on its
        // identity volume, which exists before the instance does: its boot finds it by tag.
        let identity = self.ensure_identity_volume(t, index).await?;
        let user_data = aws_smithy_types::base64::encode(t.server_settings(index));
        let mut call = self
            .ec2
            .run_instances()
            .image_id(&t.ami)
            .instance_type(InstanceType::from(t.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .user_data(user_data)
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_put_response_hop_limit(1)
                    .build(),
            )
            .tag_specifications(tag_spec(ResourceType::Instance, &tags))
            .tag_specifications(tag_spec(ResourceType::Volume, &volume_tags));
        if t.public_ip {
            let mut ni = InstanceNetworkInterfaceSpecification::builder()
                .device_index(0)
                .subnet_id(&t.staging_subnet)
                .associate_public_ip_address(true)
                .set_groups(Some(t.security_groups.clone()));
            if let Some(ip) = private_ip {
                ni = ni.private_ip_address(ip);
            }
            call = call.network_interfaces(ni.build());
        } else {
            call = call
                .subnet_id(&t.staging_subnet)
                .set_security_group_ids(Some(t.security_groups.clone()))
                .set_private_ip_address(private_ip.map(str::to_string));
        }
        if let Some(p) = &t.iam_instance_profile {
            call = call.iam_instance_profile(profile_spec(p));
        }
        let out = self.run_instances(call, private_ip.is_some()).await?;
        let id = out
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .ok_or_else(|| FleetError::Conflict("RunInstances returned no instance".into()))?
            .to_string();
        info!(template = %t.name, index, instance = %id, "launched replication server");
        self.wait_instance(&id, "running").await?;
        self.attach_identity(&identity, &id).await?;
        self.server_by_id(t, &id).await
    }

    /// The identity volume of server `index` (tagged `slipway:role = identity`,
    /// `slipway:template`, `slipway:server-index`): the existing one — so a relaunched or
    /// replacement server keeps the identity its agents know — or, for a server that never
    /// had one, a new encrypted 1 GiB gp3 volume in the staging subnet's zone. Of several
    /// (an apply interrupted between two creates), the oldest, as the server picks it.
    async fn ensure_identity_volume(&self, t: &Template, index: u32) -> Result<String, FleetError> {
        let index_s = index.to_string();
        let vols = self
            .ec2
            .describe_volumes()
            .filters(filter(
                &format!("tag:{}", aws_tags::ROLE),
                &[aws_tags::ROLE_IDENTITY],
            ))
            .filters(filter(&format!("tag:{}", aws_tags::TEMPLATE), &[&t.name]))
            .filters(filter(
                &format!("tag:{}", aws_tags::SERVER_INDEX),
                &[&index_s],
            ))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| FleetError::sdk("DescribeVolumes", e))?;
        let mut usable: Vec<_> = vols
            .iter()
            .filter(|v| {
                !matches!(
                    v.state().map(|s| s.as_str()),
                    Some("deleting" | "deleted" | "error")
                )
            })
            .filter_map(|v| {
                Some((
                    v.create_time().map(|t| t.as_nanos()),
                    v.volume_id()?.to_string(),
                ))
            })
            .collect();
        usable.sort();
        if let Some((_, id)) = usable.into_iter().next() {
            info!(template = %t.name, index, volume = %id, "server keeps its identity volume");
            return Ok(id);
        }
        let zone = self.subnet_zone(&t.staging_subnet).await?;
        let mut tags = t.tags.clone();
        tags.insert(
            "Name".into(),
            format!("slipway-{}-identity", t.server_tag(index)),
        );
        tags.insert(aws_tags::ROLE.into(), aws_tags::ROLE_IDENTITY.into());
        tags.insert(aws_tags::TEMPLATE.into(), t.name.clone());
        tags.insert(aws_tags::SERVER_INDEX.into(), index_s);
        tags.insert(aws_tags::SERVER.into(), t.server_tag(index));
        let out = self
            .ec2
            .create_volume()
            .availability_zone(&zone)
            .size(slipway_aws::identity_volume::IDENTITY_VOLUME_GIB)
            .volume_type(VolumeType::Gp3)
            .encrypted(true)
            .set_kms_key_id(t.aws.kms_key_id.clone())
            .tag_specifications(tag_spec(ResourceType::Volume, &tags))
            .send()
            .await
            .map_err(|e| FleetError::sdk("CreateVolume", e))?;
        let id = out
            .volume_id()
            .ok_or_else(|| FleetError::Conflict("CreateVolume returned no volume id".into()))?
            .to_string();
        info!(template = %t.name, index, volume = %id, %zone, "created the server's identity volume");
        self.wait_volume(&id, "available", |s, _| s == "available")
            .await?;
        Ok(id)
    }

    /// The availability zone of a subnet.
    async fn subnet_zone(&self, subnet: &str) -> Result<String, FleetError> {
        let out = self
            .ec2
            .describe_subnets()
            .subnet_ids(subnet)
            .send()
            .await
            .map_err(|e| FleetError::sdk("DescribeSubnets", e))?;
        out.subnets()
            .first()
            .and_then(|s| s.availability_zone())
            .map(str::to_string)
            .ok_or_else(|| FleetError::NotFound(format!("subnet {subnet} not found")))
    }

    /// Attaches the identity volume to `instance` on a free device name, unless it is there
    /// already (the server's boot attaches it by tag too, whichever comes first). Detaches it
    /// from a stopped or terminated previous server; refuses while another server runs with
    /// it.
    async fn attach_identity(&self, volume: &str, instance: &str) -> Result<(), FleetError> {
        let want = format!("{instance}:attached");
        for _ in 0..3 {
            let (_, att) = self.volume_state(volume).await?;
            if att.iter().any(|a| a.starts_with(&format!("{instance}:"))) {
                return self
                    .wait_volume(volume, "attached", |_, a| a.contains(&want))
                    .await;
            }
            if let Some(other) = att.first().and_then(|a| a.split(':').next()) {
                match self.instance_state(other).await?.as_str() {
                    "stopped" | "terminated" => self.detach(volume, other).await?,
                    state => {
                        return Err(FleetError::Conflict(format!(
                            "identity volume {volume} is attached to instance {other}, which is {state}: two servers must not share one identity"
                        )))
                    }
                }
            }
            // The last free name, not the first: a replacement reattaches replicas under the
            // names they had (a server from before identity volumes has one at /dev/sdf), and
            // the server picks replica names from the start of the list.
            let taken = self.devices_of(instance).await?;
            let device = slipway_aws::device_names()
                .filter(|n| !taken.iter().any(|t| same_device(t, n)))
                .last()
                .ok_or_else(|| {
                    FleetError::Conflict(format!("no free device name on {instance}"))
                })?;
            match self.attach(volume, instance, &device).await {
                Ok(()) => {
                    info!(volume, instance, %device, "identity volume attached");
                    return Ok(());
                }
                // The server attached it meanwhile (or took the device name): look again.
                Err(e) => {
                    warn!(volume, instance, error = %e, "attaching the identity volume; looking again")
                }
            }
        }
        Err(FleetError::Conflict(format!(
            "could not attach identity volume {volume} to {instance}"
        )))
    }

    /// The identity volume attached to an instance, if any.
    async fn identity_on(&self, id: &str) -> Result<Option<String>, FleetError> {
        let vols = self
            .ec2
            .describe_volumes()
            .filters(filter("attachment.instance-id", &[id]))
            .filters(filter(
                &format!("tag:{}", aws_tags::ROLE),
                &[aws_tags::ROLE_IDENTITY],
            ))
            .send()
            .await
            .map_err(|e| FleetError::sdk("DescribeVolumes", e))?;
        Ok(vols
            .volumes()
            .first()
            .and_then(|v| v.volume_id())
            .map(str::to_string))
    }

    /// RunInstances; with a fixed private IP, retried while EC2 still holds the address
    /// (`InvalidIPAddress.InUse` shortly after the previous holder terminated).
    pub(crate) async fn run_instances(
        &self,
        call: aws_sdk_ec2::operation::run_instances::builders::RunInstancesFluentBuilder,
        fixed_ip: bool,
    ) -> Result<aws_sdk_ec2::operation::run_instances::RunInstancesOutput, FleetError> {
        let started = Instant::now();
        loop {
            match call.clone().send().await {
                Ok(out) => return Ok(out),
                Err(e)
                    if fixed_ip
                        && sdk_code(&e) == Some("InvalidIPAddress.InUse")
                        && started.elapsed() < self.wait_timeout =>
                {
                    info!("private IP still in use; retrying RunInstances");
                    tokio::time::sleep(self.poll_interval.max(Duration::from_millis(100))).await;
                }
                Err(e) => return Err(FleetError::sdk("RunInstances", e)),
            }
        }
    }

    async fn server_by_id(&self, t: &Template, id: &str) -> Result<ServerState, FleetError> {
        self.servers(t)
            .await?
            .into_iter()
            .find(|s| s.instance_id == id)
            .ok_or_else(|| FleetError::Conflict(format!("instance {id} vanished")))
    }

    /// The state name of an instance (`terminated` if EC2 no longer knows it).
    pub(crate) async fn instance_state(&self, id: &str) -> Result<String, FleetError> {
        match self.ec2.describe_instances().instance_ids(id).send().await {
            Ok(out) => Ok(out
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .find(|i| i.instance_id() == Some(id))
                .and_then(|i| i.state())
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_string())
                .unwrap_or_else(|| "terminated".into())),
            Err(e) if sdk_code(&e) == Some("InvalidInstanceID.NotFound") => Ok("terminated".into()),
            Err(e) => Err(FleetError::sdk("DescribeInstances", e)),
        }
    }

    /// Waits until the instance reaches `want` (`running`, `stopped` or `terminated`) with the
    /// SDK's waiters: EC2's own acceptors (e.g. `running` fails on `shutting-down`, `stopping`
    /// or `terminated`) and backoff (15 s to 2 min between describes, after a first one at
    /// once), bounded by `wait_timeout`. Instances take tens of seconds to change state, so the
    /// waiters' floor costs little here and spares the account's describe budget.
    pub(crate) async fn wait_instance(&self, id: &str, want: &str) -> Result<(), FleetError> {
        use aws_sdk_ec2::client::Waiters;
        let bound = self.wait_timeout;
        let r = match want {
            "running" => self
                .ec2
                .wait_until_instance_running()
                .instance_ids(id)
                .wait(bound)
                .await
                .map(drop),
            "stopped" => self
                .ec2
                .wait_until_instance_stopped()
                .instance_ids(id)
                .wait(bound)
                .await
                .map(drop),
            // EC2's InstanceTerminated waiter fails on `pending` and `stopping`, but a
            // terminate of a just-launched or stopping instance does end in `terminated`
            // (a cutover terminating a test instance still booting): poll for that one.
            "terminated" => return self.poll_terminated(id).await,
            other => {
                return Err(FleetError::Conflict(format!(
                "cannot wait for instance {id} to be {other:?} (only running, stopped, terminated)"
            )))
            }
        };
        r.map_err(|e| match e {
            WaiterError::ExceededMaxWait(_) => FleetError::Timeout {
                what: format!("instance {id} to be {want}"),
                after: bound,
            },
            WaiterError::FailureState(f) => {
                let state = match f.final_poll().as_result() {
                    Ok(out) => out
                        .reservations()
                        .iter()
                        .flat_map(|r| r.instances())
                        .find_map(|i| i.state().and_then(|s| s.name()))
                        .map(|n| n.as_str().to_string())
                        .unwrap_or_else(|| "gone".into()),
                    Err(e) => e.to_string(),
                };
                FleetError::Conflict(format!("instance {id} is {state} while waiting for {want}"))
            }
            e => FleetError::Conflict(format!(
                "waiting for instance {id} to be {want}: {}",
                aws_smithy_types::error::display::DisplayErrorContext(&e)
            )),
        })
    }

    /// Polls until the instance is terminated (or gone), every `poll_interval`.
    async fn poll_terminated(&self, id: &str) -> Result<(), FleetError> {
        let started = Instant::now();
        loop {
            let state = self.instance_state(id).await?;
            if state == "terminated" {
                return Ok(());
            }
            if started.elapsed() > self.wait_timeout {
                return Err(FleetError::Timeout {
                    what: format!("instance {id} to be terminated (it is {state})"),
                    after: self.wait_timeout,
                });
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    /// Stops an instance (the server drains on SIGTERM: final flush, agents reconnect later)
    /// and waits until it has stopped.
    pub(crate) async fn stop(&self, id: &str) -> Result<(), FleetError> {
        if self.instance_state(id).await? != "stopped" {
            self.ec2
                .stop_instances()
                .instance_ids(id)
                .send()
                .await
                .map_err(|e| FleetError::sdk("StopInstances", e))?;
        }
        self.wait_instance(id, "stopped").await
    }

    pub(crate) async fn start(&self, id: &str) -> Result<(), FleetError> {
        self.ec2
            .start_instances()
            .instance_ids(id)
            .send()
            .await
            .map_err(|e| FleetError::sdk("StartInstances", e))?;
        self.wait_instance(id, "running").await
    }

    /// Terminates instances and waits until they are gone.
    pub(crate) async fn terminate(&self, ids: &[String]) -> Result<(), FleetError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.ec2
            .terminate_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await
            .map_err(|e| FleetError::sdk("TerminateInstances", e))?;
        for id in ids {
            self.wait_instance(id, "terminated").await?;
        }
        Ok(())
    }

    /// The instance-type switch (and settings change): stop — the server drains —, modify the
    /// type and/or user data, start. Same instance id, private IP, root disk and attachments
    /// (identity volume included): agents reconnect and resume.
    async fn update_in_place(
        &self,
        t: &Template,
        s: &ServerState,
        instance_type: Option<&str>,
        settings: bool,
    ) -> Result<ServerState, FleetError> {
        let id = &s.instance_id;
        self.stop(id).await?;
        if let Some(ty) = instance_type {
            self.ec2
                .modify_instance_attribute()
                .instance_id(id)
                .instance_type(AttributeValue::builder().value(ty).build())
                .send()
                .await
                .map_err(|e| FleetError::sdk("ModifyInstanceAttribute", e))?;
            info!(instance = %id, instance_type = ty, "instance type changed");
        }
        if settings {
            self.ec2
                .modify_instance_attribute()
                .instance_id(id)
                .user_data(
                    SecureBlobAttributeValue::builder()
                        // The raw settings: `UserData.Value` is a blob, which the SDK
                        // base64-encodes on the wire, the form EC2 documents. (RunInstances'
                        // `UserData` is a string and takes the base64 text.) Encoding it here
                        // too would give the instance base64 text as its user data.
                        .value(Blob::new(t.server_settings(s.index)))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| FleetError::sdk("ModifyInstanceAttribute", e))?;
        }
        self.start(id).await?;
        let mut tags = server_tags(t, s.index);
        tags.extend(encode_sources(&s.sources));
        self.sync_tags(s, &tags).await?;
        self.server_by_id(t, id).await
    }

    /// Replica volumes attached to an instance: (volume id, device).
    async fn replicas_on(&self, id: &str) -> Result<Vec<(String, String)>, FleetError> {
        let vols = self
            .ec2
            .describe_volumes()
            .filters(filter("attachment.instance-id", &[id]))
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
        Ok(vols
            .iter()
            .filter_map(|v| {
                let a = v
                    .attachments()
                    .iter()
                    .find(|a| a.instance_id() == Some(id))?;
                Some((v.volume_id()?.to_string(), a.device()?.to_string()))
            })
            .collect())
    }

    async fn volume_state(&self, id: &str) -> Result<(String, Vec<String>), FleetError> {
        let out = self
            .ec2
            .describe_volumes()
            .volume_ids(id)
            .send()
            .await
            .map_err(|e| FleetError::sdk("DescribeVolumes", e))?;
        let v = out
            .volumes()
            .first()
            .ok_or_else(|| FleetError::Conflict(format!("volume {id} vanished")))?;
        Ok((
            v.state()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            v.attachments()
                .iter()
                .filter_map(|a| {
                    Some(format!(
                        "{}:{}",
                        a.instance_id()?,
                        a.state().map(|s| s.as_str()).unwrap_or("")
                    ))
                })
                .collect(),
        ))
    }

    async fn wait_volume(
        &self,
        id: &str,
        what: &str,
        done: impl Fn(&str, &[String]) -> bool,
    ) -> Result<(), FleetError> {
        let started = Instant::now();
        loop {
            let (state, att) = self.volume_state(id).await?;
            if done(&state, &att) {
                return Ok(());
            }
            if started.elapsed() > self.wait_timeout {
                return Err(FleetError::Timeout {
                    what: format!("volume {id} to be {what} (it is {state})"),
                    after: self.wait_timeout,
                });
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    async fn detach(&self, volume: &str, instance: &str) -> Result<(), FleetError> {
        self.ec2
            .detach_volume()
            .volume_id(volume)
            .instance_id(instance)
            .send()
            .await
            .map_err(|e| FleetError::sdk("DetachVolume", e))?;
        self.wait_volume(volume, "detached", |s, a| s == "available" && a.is_empty())
            .await
    }

    async fn attach(&self, volume: &str, instance: &str, device: &str) -> Result<(), FleetError> {
        self.ec2
            .attach_volume()
            .volume_id(volume)
            .instance_id(instance)
            .device(device)
            .send()
            .await
            .map_err(|e| FleetError::sdk("AttachVolume", e))?;
        let want = format!("{instance}:attached");
        self.wait_volume(volume, "attached", |_, a| a.contains(&want))
            .await
    }

    /// Device names in use on an instance (root included).
    async fn devices_of(&self, id: &str) -> Result<Vec<String>, FleetError> {
        let out = self
            .ec2
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
            .map_err(|e| FleetError::sdk("DescribeInstances", e))?;
        Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .flat_map(|i| {
                let mut d: Vec<String> = i
                    .block_device_mappings()
                    .iter()
                    .filter_map(|m| m.device_name().map(str::to_string))
                    .collect();
                d.extend(i.root_device_name().map(str::to_string));
                d
            })
            .collect())
    }

    /// The replacement path (a changed AMI or subnet): stop the old instance (the server
    /// drains), detach its replica and identity volumes, terminate it, launch the new one with
    /// the same index, server tag and (same subnet) private IP — the launch attaches the
    /// identity volume —, attach the replicas at the same devices.
    async fn replace(
        &self,
        t: &Template,
        s: &ServerState,
        warnings: &mut Vec<String>,
    ) -> Result<ServerState, FleetError> {
        self.stop(&s.instance_id).await?;
        let vols = self.replicas_on(&s.instance_id).await?;
        for (v, _) in &vols {
            self.detach(v, &s.instance_id).await?;
        }
        // The identity volume goes too: the new instance's launch attaches it.
        if let Some(v) = self.identity_on(&s.instance_id).await? {
            self.detach(&v, &s.instance_id).await?;
        }
        self.terminate(std::slice::from_ref(&s.instance_id)).await?;
        let keep_ip = (s.subnet_id == t.staging_subnet)
            .then_some(s.private_ip.as_deref())
            .flatten();
        let new = match self.launch_server(t, s.index, &s.sources, keep_ip).await {
            Ok(n) => n,
            Err(e) if keep_ip.is_some() => {
                // EC2 may hold the address a little after the termination: launch anyway, and
                // say so (agents must be pointed at the new address).
                warn!(index = s.index, ip = ?keep_ip, error = %e, "cannot reuse the private IP; launching with a new one");
                self.launch_server(t, s.index, &s.sources, None).await?
            }
            Err(e) => return Err(e),
        };
        if new.private_ip != s.private_ip {
            warnings.push(format!(
                "server {} has a new address {}: agents of {} must be restarted with --server {}:{}",
                s.index,
                new.private_ip.as_deref().unwrap_or("-"),
                s.sources
                    .iter()
                    .map(|d| d.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                new.private_ip.as_deref().unwrap_or("-"),
                t.agent_port
            ));
        }
        for (v, dev) in &vols {
            self.attach(v, &new.instance_id, dev).await?;
        }
        info!(template = %t.name, index = s.index, old = %s.instance_id, new = %new.instance_id, volumes = vols.len(), "replication server replaced");
        Ok(new)
    }

    /// Moves a source's replica volumes from one server to another: stop `from` (it drains),
    /// detach them, retag them for `to`, attach them to `to`, start `from` again.
    async fn move_source(
        &self,
        t: &Template,
        source: &str,
        from: &ServerState,
        to: &ServerState,
    ) -> Result<(), FleetError> {
        let vols = self
            .ec2
            .describe_volumes()
            .filters(filter(&format!("tag:{}", aws_tags::SOURCE_ID), &[source]))
            .filters(filter(
                &format!("tag:{}", aws_tags::ROLE),
                &[aws_tags::ROLE_REPLICA],
            ))
            .filters(filter(
                &format!("tag:{}", aws_tags::SERVER),
                &[&t.server_tag(from.index)],
            ))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| FleetError::sdk("DescribeVolumes", e))?;
        let attached: Vec<String> = vols
            .iter()
            .filter(|v| {
                v.attachments()
                    .iter()
                    .any(|a| a.instance_id() == Some(from.instance_id.as_str()))
            })
            .filter_map(|v| v.volume_id().map(str::to_string))
            .collect();
        let was_running = from.state == "running";
        if !attached.is_empty() {
            self.stop(&from.instance_id).await?;
            for v in &attached {
                self.detach(v, &from.instance_id).await?;
            }
        }
        let mut taken = self.devices_of(&to.instance_id).await?;
        for v in &vols {
            let Some(id) = v.volume_id() else { continue };
            self.ec2
                .create_tags()
                .resources(id)
                .tags(
                    Tag::builder()
                        .key(aws_tags::SERVER)
                        .value(t.server_tag(to.index))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| FleetError::sdk("CreateTags", e))?;
            let dev = slipway_aws::device_names()
                .find(|d| !taken.iter().any(|t| same_device(t, d)))
                .ok_or_else(|| {
                    FleetError::Conflict(format!(
                        "no free device name on {} for volume {id}",
                        to.instance_id
                    ))
                })?;
            self.attach(id, &to.instance_id, &dev).await?;
            taken.push(dev);
        }
        if !attached.is_empty() && was_running {
            self.start(&from.instance_id).await?;
        }
        info!(
            source,
            from = from.index,
            to = to.index,
            volumes = vols.len(),
            "source moved"
        );
        Ok(())
    }

    /// Sets the `slipway:sources.N` tags of a server to `sources`.
    async fn set_source_tags(
        &self,
        s: &ServerState,
        sources: &[SourceDemand],
    ) -> Result<(), FleetError> {
        let mut want: BTreeMap<String, String> = s
            .tags
            .iter()
            .filter(|(k, _)| !k.starts_with(SOURCES_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        want.extend(encode_sources(sources));
        self.sync_tags(s, &want).await
    }

    /// Makes the instance's tags exactly `want` (user tags removed from the template are
    /// deleted; tags starting with `aws:` are left alone).
    async fn sync_tags(
        &self,
        s: &ServerState,
        want: &BTreeMap<String, String>,
    ) -> Result<(), FleetError> {
        let stale: Vec<Tag> = s
            .tags
            .keys()
            .filter(|k| !want.contains_key(*k) && !k.starts_with("aws:") && !server_owned(k))
            .map(|k| Tag::builder().key(k).build())
            .collect();
        let changed: Vec<Tag> = want
            .iter()
            .filter(|(k, v)| s.tags.get(*k) != Some(v))
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        if !changed.is_empty() {
            self.ec2
                .create_tags()
                .resources(&s.instance_id)
                .set_tags(Some(changed))
                .send()
                .await
                .map_err(|e| FleetError::sdk("CreateTags", e))?;
        }
        if !stale.is_empty() {
            self.ec2
                .delete_tags()
                .resources(&s.instance_id)
                .set_tags(Some(stale))
                .send()
                .await
                .map_err(|e| FleetError::sdk("DeleteTags", e))?;
        }
        Ok(())
    }
}

/// An instance profile given by name or ARN.
pub(crate) fn profile_spec(p: &str) -> IamInstanceProfileSpecification {
    if p.starts_with("arn:") {
        IamInstanceProfileSpecification::builder().arn(p).build()
    } else {
        IamInstanceProfileSpecification::builder().name(p).build()
    }
}

/// `/dev/sdf` and `/dev/xvdf` are the same slot.
fn same_device(a: &str, b: &str) -> bool {
    fn key(n: &str) -> String {
        let n = n.strip_prefix("/dev/").unwrap_or(n);
        let n = n.trim_end_matches(|c: char| c.is_ascii_digit());
        match n.strip_prefix("xvd") {
            Some(rest) if rest.len() == 1 => format!("sd{rest}"),
            _ => n.to_string(),
        }
    }
    key(a) == key(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_tags_round_trip_in_chunks() {
        let srcs: Vec<SourceDemand> = (0..15)
            .map(|i| SourceDemand::new(format!("{}-{i}", "s".repeat(60)), i % 3 + 1))
            .collect();
        let tags = encode_sources(&srcs);
        assert!(tags.len() > 1);
        assert!(tags.values().all(|v| v.len() <= 256));
        assert_eq!(decode_sources(&tags), srcs);
        assert!(encode_sources(&[]).is_empty());
    }

    fn instance_in(state: aws_sdk_ec2::types::InstanceStateName) -> aws_smithy_mocks::Rule {
        use aws_sdk_ec2::operation::describe_instances::DescribeInstancesOutput;
        use aws_sdk_ec2::types::{Instance, InstanceState, Reservation};
        aws_smithy_mocks::mock!(aws_sdk_ec2::Client::describe_instances).then_output(move || {
            DescribeInstancesOutput::builder()
                .reservations(
                    Reservation::builder()
                        .instances(
                            Instance::builder()
                                .instance_id("i-1")
                                .state(InstanceState::builder().name(state.clone()).build())
                                .build(),
                        )
                        .build(),
                )
                .build()
        })
    }

    /// The SDK's waiter carries EC2's acceptors: an instance that is stopping will not become
    /// running, and the wait says so at the first describe (a plain poll for `running`
    /// would describe it every `poll_interval` until `wait_timeout`).
    #[tokio::test]
    async fn a_wait_for_running_fails_at_once_on_a_stopping_instance() {
        use aws_sdk_ec2::types::InstanceStateName;
        use aws_smithy_mocks::{mock_client, RuleMode};
        let stopping = instance_in(InstanceStateName::Stopping);
        let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&stopping]);
        let mut f = Fleet::with_client(ec2);
        f.wait_timeout = Duration::from_secs(5);
        let e = f.wait_instance("i-1", "running").await.unwrap_err();
        assert!(
            matches!(&e, FleetError::Conflict(m) if m.contains("stopping")),
            "{e}"
        );
        assert_eq!(stopping.num_calls(), 1);

        let running = instance_in(InstanceStateName::Running);
        let ec2 = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, [&running]);
        Fleet::with_client(ec2)
            .wait_instance("i-1", "running")
            .await
            .unwrap();
        assert_eq!(running.num_calls(), 1);
    }

    /// A cutover terminates test instances that may still be booting: EC2's terminated
    /// waiter would fail on `pending`; the wait goes on until the instance is terminated.
    #[tokio::test]
    async fn a_wait_for_terminated_goes_on_through_pending() {
        use aws_sdk_ec2::types::InstanceStateName;
        use aws_smithy_mocks::{mock_client, RuleMode};
        let pending = instance_in(InstanceStateName::Pending);
        let terminated = instance_in(InstanceStateName::Terminated);
        let ec2 = mock_client!(aws_sdk_ec2, RuleMode::Sequential, [&pending, &terminated]);
        let mut f = Fleet::with_client(ec2);
        f.poll_interval = Duration::from_millis(10);
        f.wait_instance("i-1", "terminated").await.unwrap();
        assert_eq!((pending.num_calls(), terminated.num_calls()), (1, 1));
    }

    #[test]
    fn device_aliases() {
        assert!(same_device("/dev/xvdf", "/dev/sdf"));
        assert!(same_device("/dev/sda1", "/dev/sda"));
        assert!(!same_device("/dev/sdf", "/dev/sdg"));
    }
}
