//! Replication templates: one TOML file (and optionally a sources file beside it), parsed in two
//! phases like the server's settings. Phase one deserializes into [`RawTemplate`] that mirrors
//! the file exactly (`deny_unknown_fields`), phase two validates into [`Template`]; every error
//! names the file, the key and the reason. Every key is documented in
//! `docs/replication-template.md`.
//!
//! The `[server]` table and the template keys that concern the server (bandwidth, PIT policy,
//! volume rules, encryption, tags) are rendered into the server's own settings file
//! ([`Template::server_settings`]), carried to the instance as its user data, and checked here
//! with the server's own validation, so a template that validates renders a file the server
//! accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use slipway_aws::{AwsSettings, RawAwsSettings};
use slipway_pit::{PitPolicy, RawPitSettings};

use crate::error::FleetError;
use crate::limits::data_volume_limit;

/// Default of `max_disks_per_server`, as AWS MGN's replication servers.
pub const DEFAULT_MAX_DISKS_PER_SERVER: u32 = 15;
/// The data directory the AMI prepares.
pub const SERVER_DATA_DIR: &str = "/var/lib/slipway";
/// Where a server's capture spill files go unless `[server.replication] spill_dir` says
/// otherwise: the root disk (the data dir is the 1 GiB identity volume).
pub const SERVER_SPILL_DIR: &str = "/var/tmp/slipway-spill";
/// Where agents connect unless `[server] listen` says otherwise.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:1500";
/// Where Prometheus scrapes unless `[server] metrics_listen` says otherwise.
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9500";

/// The template exactly as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTemplate {
    pub name: Option<String>,
    pub region: Option<String>,
    pub staging_subnet: Option<String>,
    pub security_groups: Option<Vec<String>>,
    pub instance_type: Option<String>,
    pub dedicated: Option<bool>,
    pub ami: Option<String>,
    pub iam_instance_profile: Option<String>,
    pub max_disks_per_server: Option<u32>,
    pub bandwidth_mbps: Option<u64>,
    pub private_ip_routing: Option<bool>,
    pub public_ip: Option<bool>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub volumes: RawVolumes,
    pub pit: Option<RawPitSettings>,
    pub server: Option<toml::Table>,
    pub sources: Option<Vec<RawSource>>,
    pub sources_file: Option<String>,
    pub launch: Option<RawLaunch>,
}

/// `[volumes]`: the replica volume rules, as the server's `[aws]` keys of the same names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVolumes {
    pub volume_type_small: Option<String>,
    pub volume_type_large: Option<String>,
    pub large_threshold_gib: Option<u64>,
    pub fixed_volume_type: Option<String>,
    pub gp3_iops: Option<i32>,
    pub gp3_throughput: Option<i32>,
    pub kms_key_id: Option<String>,
}

/// One `[[sources]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub id: String,
    pub disks: u32,
    pub boot_disk: Option<String>,
}

/// A sources file: only `[[sources]]` entries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSourcesFile {
    #[serde(default)]
    sources: Vec<RawSource>,
}

/// `[launch]`: the target instances of test and cutover launches.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLaunch {
    pub instance_type: Option<String>,
    pub subnet: Option<String>,
    pub security_groups: Option<Vec<String>>,
    pub iam_instance_profile: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub private_ips: BTreeMap<String, String>,
    pub public_ip: Option<bool>,
    pub architecture: Option<String>,
    pub root_device_name: Option<String>,
    /// `[launch.sources.<source id>]`: what differs for one source's launches.
    #[serde(default)]
    pub sources: BTreeMap<String, RawLaunchSource>,
}

/// `[launch.sources.<source id>]`: one source's launch settings over the `[launch]` defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLaunchSource {
    pub instance_type: Option<String>,
    pub subnet: Option<String>,
    pub security_groups: Option<Vec<String>>,
    /// Merged over `[launch] tags` (a key given in both takes this value).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The same as `[launch] private_ips.<source id>` (give one or the other).
    pub private_ip: Option<String>,
}

/// A source server of the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub id: String,
    /// Number of disks the agent replicates.
    pub disks: u32,
    /// Disk id that boots a launched instance; `None`: the first disk id in sort order.
    pub boot_disk: Option<String>,
}

/// The validated `[launch]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSettings {
    pub instance_type: String,
    pub subnet: String,
    pub security_groups: Vec<String>,
    pub iam_instance_profile: Option<String>,
    pub tags: BTreeMap<String, String>,
    /// Private IPv4 address per source id.
    pub private_ips: BTreeMap<String, Ipv4Addr>,
    pub public_ip: bool,
    /// `x86_64` or `arm64`: the architecture of the image registered from the boot disk.
    pub architecture: String,
    pub root_device_name: String,
    /// Per source id, what its launches set differently (`[launch.sources.<id>]`; its
    /// `private_ip` is in [`LaunchSettings::private_ips`]).
    pub overrides: BTreeMap<String, LaunchOverride>,
}

/// One source's launch settings over the `[launch]` defaults (validated).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchOverride {
    pub instance_type: Option<String>,
    pub subnet: Option<String>,
    pub security_groups: Option<Vec<String>>,
    pub tags: BTreeMap<String, String>,
}

/// The launch settings of one source: the `[launch]` defaults with its overrides applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchTarget {
    pub instance_type: String,
    pub subnet: String,
    pub security_groups: Vec<String>,
    pub tags: BTreeMap<String, String>,
    pub private_ip: Option<Ipv4Addr>,
}

impl LaunchSettings {
    /// What a launch of `source` uses: each key of `[launch.sources.<source>]` replaces the
    /// default, except `tags`, merged key by key over `[launch] tags`.
    pub fn target(&self, source: &str) -> LaunchTarget {
        let o = self.overrides.get(source);
        let mut tags = self.tags.clone();
        if let Some(o) = o {
            tags.extend(o.tags.clone());
        }
        LaunchTarget {
            instance_type: o
                .and_then(|o| o.instance_type.clone())
                .unwrap_or_else(|| self.instance_type.clone()),
            subnet: o
                .and_then(|o| o.subnet.clone())
                .unwrap_or_else(|| self.subnet.clone()),
            security_groups: o
                .and_then(|o| o.security_groups.clone())
                .unwrap_or_else(|| self.security_groups.clone()),
            tags,
            private_ip: self.private_ips.get(source).copied(),
        }
    }
}

/// A validated replication template.
#[derive(Debug, Clone)]
pub struct Template {
    /// The file it was read from (for messages).
    pub file: PathBuf,
    pub name: String,
    pub region: String,
    pub staging_subnet: String,
    pub security_groups: Vec<String>,
    pub instance_type: String,
    /// One replication server per source (else shared, up to `max_disks_per_server`).
    pub dedicated: bool,
    pub ami: String,
    pub iam_instance_profile: Option<String>,
    pub max_disks_per_server: u32,
    pub bandwidth_mbps: u64,
    /// Agents connect to the server's private IP (else its public IP).
    pub private_ip_routing: bool,
    /// Give replication servers a public IPv4 address.
    pub public_ip: bool,
    /// User tags on servers, replica volumes and snapshots.
    pub tags: BTreeMap<String, String>,
    /// The volume rules, encryption and tags as the server will see them.
    pub aws: AwsSettings,
    pub pit: RawPitSettings,
    /// The server's settings, without the `[aws].server_tag` set per server.
    server: toml::Table,
    /// UDP port agents connect to (from the rendered `listen`).
    pub agent_port: u16,
    /// The servers' metrics port (`[server] metrics_listen`), where `apply` reads the
    /// settings fingerprint each server runs with.
    pub metrics_port: u16,
    pub sources: Vec<Source>,
    pub launch: Option<LaunchSettings>,
}

/// Phase one and two from a file: reads it (and its sources file), validates it.
pub fn load(path: &Path) -> Result<Template, FleetError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| FleetError::Read {
        file: file.clone(),
        source,
    })?;
    let raw = parse(&text, &file)?;
    validate(raw, path)
}

/// Phase one: TOML into [`RawTemplate`], errors with the key path.
pub fn parse(text: &str, file: &str) -> Result<RawTemplate, FleetError> {
    parse_as(text, file)
}

fn parse_as<T: serde::de::DeserializeOwned>(text: &str, file: &str) -> Result<T, FleetError> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        FleetError::Template {
            file: file.to_string(),
            key: if key == "." {
                "(top level)".into()
            } else {
                key
            },
            reason: e.into_inner().message().trim().to_string(),
        }
    })
}

/// A source or disk id as the server accepts it: 1–128 of `A-Z a-z 0-9 . _ -`, not starting
/// with `.`.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn check_tags(tags: &BTreeMap<String, String>) -> Result<(), String> {
    if tags.len() > 30 {
        return Err(format!(
            "{} tags; at most 30 (AWS allows 50 per resource and Slipway uses the rest)",
            tags.len()
        ));
    }
    for (k, v) in tags {
        let lower = k.to_ascii_lowercase();
        if k.is_empty() || k.chars().count() > 128 {
            return Err(format!("key `{k}` must have 1 to 128 characters"));
        }
        if lower.starts_with("aws:") || lower.starts_with("slipway:") {
            return Err(format!(
                "key `{k}`: the prefixes `aws:` and `slipway:` are reserved"
            ));
        }
        if v.chars().count() > 256 {
            return Err(format!("value of `{k}` is over 256 characters"));
        }
    }
    Ok(())
}

fn check_prefixed(value: &str, prefix: &str) -> Result<(), String> {
    let rest = value.strip_prefix(prefix).unwrap_or("");
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(format!("{value:?} is not an id like \"{prefix}0123abcd\""));
    }
    Ok(())
}

fn check_groups(groups: &[String]) -> Result<(), String> {
    if groups.is_empty() {
        return Err("needs at least one security group".into());
    }
    if groups.len() > 5 {
        return Err(format!("{} security groups; EC2 allows 5", groups.len()));
    }
    let mut seen = BTreeSet::new();
    for g in groups {
        check_prefixed(g, "sg-")?;
        if !seen.insert(g) {
            return Err(format!("{g} is listed twice"));
        }
    }
    Ok(())
}

fn check_instance_type(t: &str) -> Result<(), String> {
    let ok = t.split_once('.').is_some_and(|(f, s)| {
        !f.is_empty()
            && !s.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-'))
    });
    if ok {
        Ok(())
    } else {
        Err(format!("{t:?} is not an instance type like \"m5.large\""))
    }
}

fn check_profile(p: &str) -> Result<(), String> {
    if p.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if p.starts_with("arn:") && !p.contains(":instance-profile/") {
        return Err(format!("{p:?} is not an instance profile ARN"));
    }
    Ok(())
}

/// Merges `over` into `base`, table by table.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Phase two: typed, checked values. `path` locates the sources file and names the template in
/// errors.
pub fn validate(raw: RawTemplate, path: &Path) -> Result<Template, FleetError> {
    let file = path.display().to_string();
    let bad = |key: &str, reason: String| FleetError::Template {
        file: file.clone(),
        key: key.to_string(),
        reason,
    };
    let required = |key: &str, v: Option<String>| -> Result<String, FleetError> {
        match v {
            Some(s) if !s.trim().is_empty() => Ok(s),
            Some(_) => Err(bad(key, "must not be empty".into())),
            None => Err(bad(key, "is required".into())),
        }
    };

    let name = required("name", raw.name)?;
    if name.len() > 64
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    {
        return Err(bad(
            "name",
            format!("{name:?} must be 1 to 64 of A-Z a-z 0-9 - _, starting with a letter or digit"),
        ));
    }
    let region = required("region", raw.region)?;
    if !region
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || !region.contains('-')
    {
        return Err(bad(
            "region",
            format!("{region:?} is not a region like \"eu-west-1\""),
        ));
    }
    let staging_subnet = required("staging_subnet", raw.staging_subnet)?;
    check_prefixed(&staging_subnet, "subnet-").map_err(|r| bad("staging_subnet", r))?;
    let security_groups = raw
        .security_groups
        .ok_or_else(|| bad("security_groups", "is required".into()))?;
    check_groups(&security_groups).map_err(|r| bad("security_groups", r))?;
    let instance_type = required("instance_type", raw.instance_type)?;
    check_instance_type(&instance_type).map_err(|r| bad("instance_type", r))?;
    if crate::limits::is_nitro(&instance_type) == Some(false) {
        return Err(bad(
            "instance_type",
            format!(
                "{instance_type} is a Xen-based (previous generation) type: its EBS volumes appear as /dev/xvd* without their volume id, so the replication server could never find its replicas; choose a Nitro type (m5, m6i, m7i, c5, r5, t3, …)"
            ),
        ));
    }
    let ami = required("ami", raw.ami)?;
    check_prefixed(&ami, "ami-").map_err(|r| bad("ami", r))?;
    let iam_instance_profile = match raw.iam_instance_profile {
        Some(p) => {
            check_profile(&p).map_err(|r| bad("iam_instance_profile", r))?;
            Some(p)
        }
        None => None,
    };
    let dedicated = raw.dedicated.unwrap_or(false);
    let limit = data_volume_limit(&instance_type).unwrap_or(25);
    let max_disks_per_server = raw
        .max_disks_per_server
        .unwrap_or(DEFAULT_MAX_DISKS_PER_SERVER.min(limit));
    if max_disks_per_server == 0 || max_disks_per_server > limit {
        return Err(bad(
            "max_disks_per_server",
            format!(
                "{max_disks_per_server} is outside 1..={limit} ({instance_type} can attach {limit} volumes besides its root and identity volumes)"
            ),
        ));
    }
    let bandwidth_mbps = raw.bandwidth_mbps.unwrap_or(0);
    if bandwidth_mbps > 1_000_000 {
        return Err(bad(
            "bandwidth_mbps",
            format!("{bandwidth_mbps} is outside 0..=1000000"),
        ));
    }
    let private_ip_routing = raw.private_ip_routing.unwrap_or(true);
    let public_ip = raw.public_ip.unwrap_or(false);
    if !private_ip_routing && !public_ip {
        return Err(bad(
            "public_ip",
            "must be true when private_ip_routing = false: agents then reach the servers at their public IP".into(),
        ));
    }
    check_tags(&raw.tags).map_err(|r| bad("tags", r))?;

    // The volume rules, encryption and tags, validated by the AWS backend's own rules.
    let v = raw.volumes;
    let raw_aws = RawAwsSettings {
        region: Some(region.clone()),
        volume_type_small: v.volume_type_small,
        volume_type_large: v.volume_type_large,
        large_threshold_gib: v.large_threshold_gib,
        fixed_volume_type: v.fixed_volume_type,
        gp3_iops: v.gp3_iops,
        gp3_throughput: v.gp3_throughput,
        kms_key_id: v.kms_key_id,
        tags: raw.tags.clone(),
        ..RawAwsSettings::default()
    };
    let aws = AwsSettings::validate(raw_aws.clone()).map_err(|e| match e {
        slipway_aws::AwsError::Settings { key, reason } => {
            let key = match key.as_str() {
                "region" | "tags" => key,
                k => format!("volumes.{k}"),
            };
            bad(&key, reason)
        }
        e => bad("volumes", e.to_string()),
    })?;

    let pit = raw.pit.unwrap_or_default();
    PitPolicy::from_raw(&pit).map_err(|e| bad("pit", e.to_string()))?;

    // Sources, inline or from a file beside the template.
    let (raw_sources, sources_file, sources_key) = match (raw.sources, raw.sources_file) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "sources_file",
                "set either `sources` or `sources_file`, not both".into(),
            ))
        }
        (Some(s), None) => (s, file.clone(), "sources"),
        (None, Some(f)) => {
            if f.trim().is_empty() {
                return Err(bad("sources_file", "must not be empty".into()));
            }
            let p = path.parent().unwrap_or(Path::new(".")).join(&f);
            let name = p.display().to_string();
            let text = std::fs::read_to_string(&p)
                .map_err(|e| bad("sources_file", format!("cannot read {name}: {e}")))?;
            let parsed: RawSourcesFile = parse_as(&text, &name)?;
            (parsed.sources, name, "sources")
        }
        (None, None) => (Vec::new(), file.clone(), "sources"),
    };
    let src_bad = |i: usize, field: &str, reason: String| FleetError::Template {
        file: sources_file.clone(),
        key: format!("{sources_key}[{i}].{field}"),
        reason,
    };
    let mut sources = Vec::with_capacity(raw_sources.len());
    let mut seen = BTreeSet::new();
    let per_server = if dedicated {
        limit
    } else {
        max_disks_per_server
    };
    for (i, s) in raw_sources.into_iter().enumerate() {
        if !valid_id(&s.id) {
            return Err(src_bad(
                i,
                "id",
                format!(
                    "{:?} must be 1 to 128 of A-Z a-z 0-9 . _ -, not starting with .",
                    s.id
                ),
            ));
        }
        if !seen.insert(s.id.clone()) {
            return Err(src_bad(i, "id", format!("{:?} is listed twice", s.id)));
        }
        if s.disks == 0 || s.disks > per_server {
            let why = if dedicated {
                format!("{instance_type} can attach {limit} volumes besides its root and identity volumes")
            } else {
                format!("max_disks_per_server is {max_disks_per_server}")
            };
            return Err(src_bad(
                i,
                "disks",
                format!("{} is outside 1..={per_server} ({why})", s.disks),
            ));
        }
        if let Some(b) = &s.boot_disk {
            if !valid_id(b) {
                return Err(src_bad(i, "boot_disk", format!("{b:?} is not a disk id")));
            }
        }
        sources.push(Source {
            id: s.id,
            disks: s.disks,
            boot_disk: s.boot_disk,
        });
    }

    let launch = match raw.launch {
        None => None,
        Some(l) => Some(validate_launch(l, &sources, &bad)?),
    };

    // The server's settings file: defaults for an EC2 server, the operator's [server] table,
    // then what the template itself decides.
    let mut server = toml::Table::new();
    server.insert("data_dir".into(), SERVER_DATA_DIR.into());
    server.insert("listen".into(), DEFAULT_LISTEN.into());
    server.insert("metrics_listen".into(), DEFAULT_METRICS_LISTEN.into());
    server.insert("log_format".into(), "json".into());
    if let Some(over) = raw.server {
        for reserved in ["backend", "aws", "pit"] {
            if over.contains_key(reserved) {
                let instead = match reserved {
                    "backend" => "the template always renders backend = \"aws\"",
                    "aws" => "set the volume rules in [volumes], tags in [tags]",
                    _ => "set the policy in the template's own [pit] table",
                };
                return Err(bad(
                    &format!("server.{reserved}"),
                    format!("is set by the template: {instead}"),
                ));
            }
        }
        if over
            .get("replication")
            .and_then(|r| r.as_table())
            .is_some_and(|r| r.contains_key("bandwidth_mbps"))
        {
            return Err(bad(
                "server.replication.bandwidth_mbps",
                "is set by the template: use the top-level `bandwidth_mbps`".into(),
            ));
        }
        merge(&mut server, over);
    }
    server.insert("backend".into(), "aws".into());
    let replication = server
        .entry("replication")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(replication) = replication.as_table_mut() else {
        return Err(bad("server.replication", "must be a table".into()));
    };
    replication.insert(
        "bandwidth_mbps".into(),
        toml::Value::Integer(bandwidth_mbps as i64),
    );
    // Capture spill files on the root disk, not on the small identity volume that holds the
    // data dir (slipway.service's PrivateTmp= gives it a writable /var/tmp of its own).
    replication
        .entry("spill_dir")
        .or_insert_with(|| SERVER_SPILL_DIR.into());
    server.insert(
        "pit".into(),
        toml::Value::try_from(&pit).map_err(|e| bad("pit", e.to_string()))?,
    );
    server.insert("aws".into(), aws_table(&raw_aws));

    let mut t = Template {
        file: path.to_path_buf(),
        name,
        region,
        staging_subnet,
        security_groups,
        instance_type,
        dedicated,
        ami,
        iam_instance_profile,
        max_disks_per_server,
        bandwidth_mbps,
        private_ip_routing,
        public_ip,
        tags: raw.tags,
        aws,
        pit,
        server,
        agent_port: 0,
        metrics_port: 0,
        sources,
        launch,
    };
    // Check the rendered file with the server's own two phases (and the AWS backend's).
    let rendered = t.server_settings(0);
    let server_err = |key: String, reason: String| bad(&format!("server.{key}"), reason);
    let raw_settings =
        slipway_settings::Settings::parse(&rendered, &file).map_err(|e| match e {
            slipway_settings::SettingsError::Parse { key, reason, .. }
            | slipway_settings::SettingsError::Invalid { key, reason, .. } => {
                server_err(key, reason)
            }
            e => bad("server", e.to_string()),
        })?;
    let settings =
        slipway_settings::Settings::validate(raw_settings, &file).map_err(|e| match e {
            slipway_settings::SettingsError::Parse { key, reason, .. }
            | slipway_settings::SettingsError::Invalid { key, reason, .. } => {
                server_err(key, reason)
            }
            e => bad("server", e.to_string()),
        })?;
    if settings.listen.ip().is_loopback() {
        return Err(bad(
            "server.listen",
            format!(
                "{} is a loopback address: agents could not reach it",
                settings.listen
            ),
        ));
    }
    t.agent_port = settings.listen.port();
    t.metrics_port = settings.metrics_listen.port();
    if t.agent_port == 0 {
        return Err(bad(
            "server.listen",
            "port 0 picks a random port: agents need a fixed one".into(),
        ));
    }
    Ok(t)
}

fn validate_launch(
    l: RawLaunch,
    sources: &[Source],
    bad: &dyn Fn(&str, String) -> FleetError,
) -> Result<LaunchSettings, FleetError> {
    let instance_type = l
        .instance_type
        .ok_or_else(|| bad("launch.instance_type", "is required".into()))?;
    check_instance_type(&instance_type).map_err(|r| bad("launch.instance_type", r))?;
    let subnet = l
        .subnet
        .ok_or_else(|| bad("launch.subnet", "is required".into()))?;
    check_prefixed(&subnet, "subnet-").map_err(|r| bad("launch.subnet", r))?;
    let security_groups = l
        .security_groups
        .ok_or_else(|| bad("launch.security_groups", "is required".into()))?;
    check_groups(&security_groups).map_err(|r| bad("launch.security_groups", r))?;
    if let Some(p) = &l.iam_instance_profile {
        check_profile(p).map_err(|r| bad("launch.iam_instance_profile", r))?;
    }
    check_tags(&l.tags).map_err(|r| bad("launch.tags", r))?;
    let mut private_ips = BTreeMap::new();
    let mut used = BTreeSet::new();
    for (source, ip) in l.private_ips {
        let key = format!("launch.private_ips.{source}");
        if !sources.iter().any(|s| s.id == source) {
            return Err(bad(
                &key,
                format!("{source:?} is not a source of this template"),
            ));
        }
        let addr: Ipv4Addr = ip
            .parse()
            .map_err(|_| bad(&key, format!("{ip:?} is not an IPv4 address")))?;
        if !used.insert(addr) {
            return Err(bad(&key, format!("{addr} is given to two sources")));
        }
        private_ips.insert(source, addr);
    }
    let mut overrides = BTreeMap::new();
    for (source, o) in l.sources {
        let key = |k: &str| format!("launch.sources.{source}.{k}");
        if !sources.iter().any(|s| s.id == source) {
            return Err(bad(
                &format!("launch.sources.{source}"),
                format!("{source:?} is not a source of this template"),
            ));
        }
        if let Some(t) = &o.instance_type {
            check_instance_type(t).map_err(|r| bad(&key("instance_type"), r))?;
        }
        if let Some(s) = &o.subnet {
            check_prefixed(s, "subnet-").map_err(|r| bad(&key("subnet"), r))?;
        }
        if let Some(g) = &o.security_groups {
            check_groups(g).map_err(|r| bad(&key("security_groups"), r))?;
        }
        // Checked merged: the instance gets both sets.
        let mut merged = l.tags.clone();
        merged.extend(o.tags.clone());
        check_tags(&merged).map_err(|r| bad(&key("tags"), format!("with launch.tags: {r}")))?;
        if let Some(ip) = &o.private_ip {
            if private_ips.contains_key(&source) {
                return Err(bad(
                    &key("private_ip"),
                    format!("set either this or launch.private_ips.{source}, not both"),
                ));
            }
            let addr: Ipv4Addr = ip
                .parse()
                .map_err(|_| bad(&key("private_ip"), format!("{ip:?} is not an IPv4 address")))?;
            if !used.insert(addr) {
                return Err(bad(
                    &key("private_ip"),
                    format!("{addr} is given to two sources"),
                ));
            }
            private_ips.insert(source.clone(), addr);
        }
        overrides.insert(
            source,
            LaunchOverride {
                instance_type: o.instance_type,
                subnet: o.subnet,
                security_groups: o.security_groups,
                tags: o.tags,
            },
        );
    }
    let architecture = l.architecture.unwrap_or_else(|| "x86_64".into());
    if !matches!(architecture.as_str(), "x86_64" | "arm64" | "i386") {
        return Err(bad(
            "launch.architecture",
            format!("{architecture:?} is not one of x86_64, arm64, i386"),
        ));
    }
    let root_device_name = l.root_device_name.unwrap_or_else(|| "/dev/sda1".into());
    if !root_device_name.starts_with("/dev/") || root_device_name.len() <= 5 {
        return Err(bad(
            "launch.root_device_name",
            format!("{root_device_name:?} is not a device name like /dev/sda1 or /dev/xvda"),
        ));
    }
    Ok(LaunchSettings {
        instance_type,
        subnet,
        security_groups,
        iam_instance_profile: l.iam_instance_profile,
        tags: l.tags,
        private_ips,
        public_ip: l.public_ip.unwrap_or(false),
        architecture,
        root_device_name,
        overrides,
    })
}

/// The `[aws]` table of the rendered settings (only the keys the template sets).
fn aws_table(raw: &RawAwsSettings) -> toml::Value {
    let mut t = toml::Table::new();
    let mut put = |k: &str, v: Option<toml::Value>| {
        if let Some(v) = v {
            t.insert(k.into(), v);
        }
    };
    put("region", raw.region.clone().map(Into::into));
    put(
        "volume_type_small",
        raw.volume_type_small.clone().map(Into::into),
    );
    put(
        "volume_type_large",
        raw.volume_type_large.clone().map(Into::into),
    );
    put(
        "large_threshold_gib",
        raw.large_threshold_gib
            .map(|v| toml::Value::Integer(v as i64)),
    );
    put(
        "fixed_volume_type",
        raw.fixed_volume_type.clone().map(Into::into),
    );
    put(
        "gp3_iops",
        raw.gp3_iops.map(|v| toml::Value::Integer(v.into())),
    );
    put(
        "gp3_throughput",
        raw.gp3_throughput.map(|v| toml::Value::Integer(v.into())),
    );
    put("kms_key_id", raw.kms_key_id.clone().map(Into::into));
    if !raw.tags.is_empty() {
        let tags: toml::Table = raw
            .tags
            .iter()
            .map(|(k, v)| (k.clone(), toml::Value::String(v.clone())))
            .collect();
        put("tags", Some(toml::Value::Table(tags)));
    }
    toml::Value::Table(t)
}

impl Template {
    /// The `slipway:server` tag of server `index`'s volumes and snapshots: stable across
    /// instance replacements, so a replacement adopts the replicas.
    pub fn server_tag(&self, index: u32) -> String {
        format!("{}-{index}", self.name)
    }

    /// The settings file of replication server `index` (its user data): the server's TOML
    /// with `backend = "aws"`.
    pub fn server_settings(&self, index: u32) -> String {
        let mut table = self.server.clone();
        if let Some(toml::Value::Table(aws)) = table.get_mut("aws") {
            aws.insert("server_tag".into(), self.server_tag(index).into());
        }
        let body = toml::to_string(&table).expect("a TOML table serializes");
        format!(
            "# slipway replication server settings, rendered by `slipway template apply`\n\
             # template: {}  server: {}\n\
             # The AMI's slipway-userdata.service writes this to /etc/slipway/slipway.toml at boot.\n\
             {body}",
            self.name,
            self.server_tag(index)
        )
    }

    /// SHA-256 (hex, 16 digits) of the settings of server `index`: the instance's
    /// `slipway:settings-sha256` tag, compared on every apply.
    pub fn settings_hash(&self, index: u32) -> String {
        slipway_settings::settings_sha256(&self.server_settings(index))
    }

    /// One paragraph for `slipway template validate`: what the template describes.
    pub fn summary(&self) -> String {
        let disks: u32 = self.sources.iter().map(|s| s.disks).sum();
        let sharing = if self.dedicated {
            "one server per source".to_string()
        } else {
            format!("up to {} disks per server", self.max_disks_per_server)
        };
        let mut out = format!(
            "template {} ({}) is valid: {} sources, {disks} disks; {} replication servers ({}) in {} ({}), {sharing}; agents connect to port {} over the {} IP",
            self.name,
            self.file.display(),
            self.sources.len(),
            self.instance_type,
            self.ami,
            self.staging_subnet,
            self.region,
            self.agent_port,
            if self.private_ip_routing { "private" } else { "public" },
        );
        match &self.launch {
            Some(l) => out.push_str(&format!("; launches: {} in {}", l.instance_type, l.subnet)),
            None => out.push_str("; no [launch] section (slipway launch will refuse)"),
        }
        out
    }

    /// A source of the template by id.
    pub fn source(&self, id: &str) -> Option<&Source> {
        self.sources.iter().find(|s| s.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const MINIMAL: &str = r#"
name = "prod"
region = "eu-west-1"
staging_subnet = "subnet-0abc"
security_groups = ["sg-0123"]
instance_type = "m5.large"
ami = "ami-0123456789"
"#;

    fn load_str(text: &str) -> Result<Template, FleetError> {
        let raw = parse(text, "/etc/slipway/t.toml")?;
        validate(raw, Path::new("/etc/slipway/t.toml"))
    }

    fn err(text: &str) -> String {
        load_str(text).unwrap_err().to_string()
    }

    #[test]
    fn minimal_template_has_the_documented_defaults() {
        let t = load_str(MINIMAL).unwrap();
        assert_eq!(t.max_disks_per_server, 15);
        assert!(!t.dedicated);
        assert!(t.private_ip_routing);
        assert!(!t.public_ip);
        assert_eq!(t.bandwidth_mbps, 0);
        assert_eq!(t.agent_port, 1500);
        assert!(t.sources.is_empty());
        assert!(t.launch.is_none());
        assert_eq!(t.pit, RawPitSettings::default());
        assert_eq!(
            t.summary(),
            "template prod (/etc/slipway/t.toml) is valid: 0 sources, 0 disks; m5.large replication servers (ami-0123456789) in subnet-0abc (eu-west-1), up to 15 disks per server; agents connect to port 1500 over the private IP; no [launch] section (slipway launch will refuse)"
        );
    }

    #[test]
    fn rendered_settings_are_the_servers_toml_with_the_aws_backend() {
        let text = format!(
            "{MINIMAL}bandwidth_mbps = 200\ntags = {{ Project = \"m\" }}\n\
             [volumes]\nkms_key_id = \"alias/slipway\"\nfixed_volume_type = \"gp3\"\n\
             [pit]\ntiers = [{{ every = \"15m\", keep = 4 }}]\n\
             [server]\nlog_format = \"text\"\n[server.quic]\ncongestion = \"bbr\"\n"
        );
        let t = load_str(&text).unwrap();
        let s = t.server_settings(3);
        let raw = slipway_settings::Settings::parse(&s, "ud").unwrap();
        let v = slipway_settings::Settings::validate(raw, "ud").unwrap();
        assert_eq!(v.backend, slipway_settings::BackendKind::Aws);
        assert_eq!(v.listen.to_string(), "0.0.0.0:1500");
        assert_eq!(v.metrics_listen.to_string(), "0.0.0.0:9500");
        assert_eq!(v.data_dir, PathBuf::from("/var/lib/slipway"));
        // Spill files stay off the data dir, which is the small identity volume.
        assert_eq!(v.spill_dir, PathBuf::from("/var/tmp/slipway-spill"));
        assert!(!v.spill_dir.starts_with(&v.data_dir));
        assert_eq!(v.bandwidth_bytes_per_sec, 25_000_000);
        assert_eq!(v.log_format, slipway_settings::LogFormat::Text);
        let (aws, _) = v.aws.unwrap();
        let raw_aws: RawAwsSettings = toml::Value::Table(aws).try_into().unwrap();
        let aws = AwsSettings::validate(raw_aws).unwrap();
        assert_eq!(aws.server_tag, "prod-3");
        assert_eq!(aws.kms_key_id.as_deref(), Some("alias/slipway"));
        assert_eq!(aws.fixed_volume_type.as_deref(), Some("gp3"));
        assert_eq!(aws.tags.get("Project").map(String::as_str), Some("m"));
        assert_eq!(aws.region.as_deref(), Some("eu-west-1"));
        assert!(s.contains("every = \"15m\""), "{s}");
        assert_ne!(t.settings_hash(3), t.settings_hash(4));
        assert_eq!(t.settings_hash(3), t.settings_hash(3));
    }

    #[test]
    fn an_operators_spill_dir_is_kept() {
        let t = load_str(&format!(
            "{MINIMAL}[server.replication]\nspill_dir = \"/mnt/scratch/spill\"\n"
        ))
        .unwrap();
        let raw = slipway_settings::Settings::parse(&t.server_settings(0), "ud").unwrap();
        let v = slipway_settings::Settings::validate(raw, "ud").unwrap();
        assert_eq!(v.spill_dir, PathBuf::from("/mnt/scratch/spill"));
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let cases: &[(&str, &str)] = &[
            ("region = \"eu-west-1\"", "key `name`: is required"),
            (
                "name = \"x\"\nregion = \"eu-west-1\"\nstaging_subnet = \"subnet-1\"\nsecurity_groups = [\"sg-1\"]\ninstance_type = \"m5.large\"\nami = \"ami-1\"\nbogus = 1",
                "key `bogus`: unknown field `bogus`",
            ),
            (
                &format!("{MINIMAL}max_disks_per_server = 40"),
                "key `max_disks_per_server`: 40 is outside 1..=25 (m5.large can attach 25 volumes besides its root and identity volumes)",
            ),
            (&format!("{MINIMAL}bandwidth_mbps = \"fast\""), "key `bandwidth_mbps`: invalid type"),
            (&format!("{MINIMAL}private_ip_routing = false"), "key `public_ip`: must be true"),
            (&format!("{MINIMAL}[volumes]\nvolume_type_large = \"io2\""), "key `volumes.volume_type_large`: `io2` is not one of"),
            (&format!("{MINIMAL}[volumes]\nvolume_typ = \"gp3\""), "key `volumes.volume_typ`: unknown field"),
            (&format!("{MINIMAL}tags = {{ \"slipway:x\" = \"1\" }}"), "key `tags`: key `slipway:x`"),
            (&format!("{MINIMAL}[pit]\ntiers = []"), "key `pit`: tiers: at least one tier is required"),
            (&format!("{MINIMAL}[server]\nbackend = \"local\""), "key `server.backend`: is set by the template"),
            (&format!("{MINIMAL}[server.quic]\ncongestion = \"vegas\""), "key `server.quic.congestion`: \"vegas\" is not one of"),
            (&format!("{MINIMAL}[server]\nlisten = \"127.0.0.1:1500\""), "key `server.listen`: 127.0.0.1:1500 is a loopback address"),
            (&format!("{MINIMAL}[server.replication]\nbandwidth_mbps = 5"), "key `server.replication.bandwidth_mbps`: is set by the template"),
            (&format!("{MINIMAL}[[sources]]\nid = \"a\"\ndisks = 16"), "key `sources[0].disks`: 16 is outside 1..=15 (max_disks_per_server is 15)"),
            (&format!("{MINIMAL}[[sources]]\nid = \"a\"\ndisks = 1\n[[sources]]\nid = \"a\"\ndisks = 1"), "key `sources[1].id`: \"a\" is listed twice"),
            (&format!("{MINIMAL}[[sources]]\nid = \"../x\"\ndisks = 1"), "key `sources[0].id`"),
            (&format!("{MINIMAL}sources_file = \"s.toml\"\n[[sources]]\nid = \"a\"\ndisks = 1"), "key `sources_file`: set either"),
            (&format!("{MINIMAL}[launch]\nsubnet = \"subnet-1\"\nsecurity_groups = [\"sg-1\"]"), "key `launch.instance_type`: is required"),
            (&format!("{MINIMAL}[[sources]]\nid = \"a\"\ndisks = 1\n[launch]\ninstance_type = \"m5.large\"\nsubnet = \"subnet-1\"\nsecurity_groups = [\"sg-1\"]\nprivate_ips = {{ b = \"10.0.0.1\" }}"), "key `launch.private_ips.b`: \"b\" is not a source"),
            (&MINIMAL.replace("subnet-0abc", "sub-1"), "key `staging_subnet`: \"sub-1\" is not an id like \"subnet-0123abcd\""),
            (&MINIMAL.replace("[\"sg-0123\"]", "[]"), "key `security_groups`: needs at least one"),
            (&MINIMAL.replace("m5.large", "large"), "key `instance_type`: \"large\" is not an instance type"),
            (&MINIMAL.replace("m5.large", "m4.large"), "key `instance_type`: m4.large is a Xen-based (previous generation) type"),
            (&MINIMAL.replace("m5.large", "t2.medium"), "choose a Nitro type"),
            ("this is not toml", "key `(top level)`"),
        ];
        for (text, want) in cases {
            let e = err(text);
            assert!(e.starts_with("template /etc/slipway/t.toml: key `"), "{e}");
            assert!(e.contains(want), "{text}\n  got: {e}\n want: {want}");
        }
    }

    const LAUNCH: &str = "[[sources]]\nid = \"web\"\ndisks = 1\n[[sources]]\nid = \"db\"\ndisks = 1\n\
        [launch]\ninstance_type = \"m5.large\"\nsubnet = \"subnet-1\"\nsecurity_groups = [\"sg-1\"]\n\
        tags = { Env = \"prod\", Team = \"web\" }\n";

    #[test]
    fn a_sources_launch_settings_override_the_defaults_and_merge_tags() {
        let t = load_str(&format!(
            "{MINIMAL}{LAUNCH}[launch.sources.db]\ninstance_type = \"r5.2xlarge\"\n\
             subnet = \"subnet-2\"\nsecurity_groups = [\"sg-2\", \"sg-3\"]\n\
             tags = {{ Team = \"dba\", Backup = \"daily\" }}\nprivate_ip = \"10.0.1.5\"\n"
        ))
        .unwrap();
        let l = t.launch.unwrap();
        let db = l.target("db");
        assert_eq!(db.instance_type, "r5.2xlarge");
        assert_eq!(db.subnet, "subnet-2");
        assert_eq!(db.security_groups, ["sg-2", "sg-3"]);
        assert_eq!(
            db.tags.iter().collect::<Vec<_>>(),
            [
                (&"Backup".to_string(), &"daily".to_string()),
                (&"Env".to_string(), &"prod".to_string()),
                (&"Team".to_string(), &"dba".to_string())
            ]
        );
        assert_eq!(db.private_ip, Some("10.0.1.5".parse().unwrap()));
        // A source without overrides gets the defaults.
        let web = l.target("web");
        assert_eq!(web.instance_type, "m5.large");
        assert_eq!(web.subnet, "subnet-1");
        assert_eq!(web.security_groups, ["sg-1"]);
        assert_eq!(web.tags, l.tags);
        assert_eq!(web.private_ip, None);
        // Only the keys given are overridden.
        let t = load_str(&format!(
            "{MINIMAL}{LAUNCH}[launch.sources.web]\ninstance_type = \"c5.large\"\n"
        ))
        .unwrap();
        let web = t.launch.unwrap().target("web");
        assert_eq!(
            (web.instance_type.as_str(), web.subnet.as_str()),
            ("c5.large", "subnet-1")
        );
    }

    #[test]
    fn bad_source_launch_settings_name_the_key() {
        let cases: &[(&str, &str)] = &[
            (
                "[launch.sources.nope]\ninstance_type = \"m5.large\"\n",
                "key `launch.sources.nope`: \"nope\" is not a source of this template",
            ),
            (
                "[launch.sources.db]\ninstance_typ = \"m5.large\"\n",
                "unknown field `instance_typ`",
            ),
            (
                "[launch.sources.db]\ninstance_type = \"large\"\n",
                "key `launch.sources.db.instance_type`: \"large\" is not an instance type",
            ),
            (
                "[launch.sources.db]\nsubnet = \"sub-2\"\n",
                "key `launch.sources.db.subnet`",
            ),
            (
                "[launch.sources.db]\nsecurity_groups = []\n",
                "key `launch.sources.db.security_groups`: needs at least one",
            ),
            (
                "[launch.sources.db]\ntags = { \"slipway:x\" = \"1\" }\n",
                "key `launch.sources.db.tags`: with launch.tags: key `slipway:x`",
            ),
            (
                "[launch.sources.db]\nprivate_ip = \"10.0.1\"\n",
                "key `launch.sources.db.private_ip`: \"10.0.1\" is not an IPv4 address",
            ),
            (
                "private_ips = { db = \"10.0.1.5\" }\n[launch.sources.db]\nprivate_ip = \"10.0.1.6\"\n",
                "key `launch.sources.db.private_ip`: set either this or launch.private_ips.db",
            ),
            (
                "private_ips = { web = \"10.0.1.5\" }\n[launch.sources.db]\nprivate_ip = \"10.0.1.5\"\n",
                "key `launch.sources.db.private_ip`: 10.0.1.5 is given to two sources",
            ),
        ];
        for (extra, want) in cases {
            let e = err(&format!("{MINIMAL}{LAUNCH}{extra}"));
            assert!(e.contains(want), "{extra}\n  got: {e}\n want: {want}");
        }
    }

    #[test]
    fn dedicated_sources_may_have_more_disks_than_max() {
        let t = load_str(&format!(
            "{MINIMAL}dedicated = true\n[[sources]]\nid = \"db\"\ndisks = 20"
        ))
        .unwrap();
        assert!(t.dedicated);
        assert_eq!(t.sources[0].disks, 20);
        let e = err(&format!(
            "{MINIMAL}dedicated = true\n[[sources]]\nid = \"db\"\ndisks = 27"
        ));
        assert!(
            e.contains("sources[0].disks") && e.contains("m5.large can attach 25"),
            "{e}"
        );
    }

    #[test]
    fn sources_file_is_read_beside_the_template() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("sources.toml"),
            "[[sources]]\nid = \"web-01\"\ndisks = 2\n[[sources]]\nid = \"web-02\"\ndisks = 1\nboot_disk = \"root\"\n",
        )
        .unwrap();
        let tpath = dir.path().join("t.toml");
        std::fs::write(
            &tpath,
            format!("{MINIMAL}sources_file = \"sources.toml\"\n"),
        )
        .unwrap();
        let t = load(&tpath).unwrap();
        assert_eq!(t.sources.len(), 2);
        assert_eq!(t.sources[1].boot_disk.as_deref(), Some("root"));

        std::fs::write(
            dir.path().join("sources.toml"),
            "[[sources]]\nid = \"a\"\ndisk = 2\n",
        )
        .unwrap();
        let e = load(&tpath).unwrap_err().to_string();
        let sf = dir.path().join("sources.toml").display().to_string();
        assert!(
            e.starts_with(&format!("template {sf}: key `sources[0].disk`")),
            "{e}"
        );

        std::fs::remove_file(dir.path().join("sources.toml")).unwrap();
        let e = load(&tpath).unwrap_err().to_string();
        assert!(e.contains("key `sources_file`: cannot read"), "{e}");
    }

    #[test]
    fn example_template_in_deploy_validates() {
        let p =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/replication-template.toml");
        let t = load(&p).unwrap_or_else(|e| panic!("{e}"));
        assert!(!t.sources.is_empty());
        let l = t.launch.unwrap();
        assert_eq!(l.target("db-01").instance_type, "r5.xlarge");
        assert_eq!(l.target("web-01").instance_type, "m5.xlarge");
    }
}
