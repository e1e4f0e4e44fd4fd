//! The tags Slipway puts on EBS volumes and snapshots, the only state it keeps in AWS.
//!
//! Volumes: [`SOURCE_ID`], [`DISK_ID`], [`ROLE`]` = `[`ROLE_REPLICA`], [`SERVER`] and the
//! user's tags. A server's identity volume (its data dir, `crate::identity_volume`):
//! [`ROLE`]` = `[`ROLE_IDENTITY`], [`TEMPLATE`], [`SERVER_INDEX`], [`SERVER`]. The server's
//! instance: [`TLS_FINGERPRINT`], set by the server itself at start. Snapshots: the volume's tags (copied by CreateSnapshots, set explicitly by
//! CreateSnapshot) plus [`RESTORE_POINT`], [`MARKER`], [`CREATED_MS`], [`TRIGGER`], and [`KEEP`] on the
//! restore points a finalized cutover kept. Replica volumes of a source in its launch
//! lifecycle: [`LIFECYCLE`].

use std::collections::BTreeMap;

use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};

/// Source server id the volume or snapshot belongs to.
pub const SOURCE_ID: &str = "slipway:source-id";
/// Disk id within the source.
pub const DISK_ID: &str = "slipway:disk-id";
/// What the resource is to Slipway; volumes carry [`ROLE_REPLICA`].
pub const ROLE: &str = "slipway:role";
/// Value of [`ROLE`] on replica volumes.
pub const ROLE_REPLICA: &str = "replica";
/// Value of [`ROLE`] on a server's identity volume (its data dir: TLS identity, token secret,
/// disk metadata), which follows the server across replacements.
pub const ROLE_IDENTITY: &str = "identity";
/// The replication template a server instance (and its identity volume) belongs to.
pub const TEMPLATE: &str = "slipway:template";
/// The server's index within its template (instance and identity volume).
pub const SERVER_INDEX: &str = "slipway:server-index";
/// On the server's instance: the SHA-256 fingerprint of its TLS certificate, which agents pin.
pub const TLS_FINGERPRINT: &str = "slipway:tls-fingerprint";
/// Identifies the replication server (settings `aws.server_tag`, default the instance id).
pub const SERVER: &str = "slipway:server";
/// Restore point id a snapshot belongs to.
pub const RESTORE_POINT: &str = "slipway:restore-point";
/// Consistency marker id of the restore point.
pub const MARKER: &str = "slipway:marker";
/// Creation time of the restore point, Unix milliseconds.
pub const CREATED_MS: &str = "slipway:created-ms";
/// `scheduled` or `on_demand`.
pub const TRIGGER: &str = "slipway:trigger";
/// On a restore point's snapshots: kept whatever the PIT policy says (never pruned by the
/// server). Value [`KEEP_FINALIZED`] when `slipway cutover finalize` kept it.
pub const KEEP: &str = "slipway:keep";
/// Value of [`KEEP`] on the restore points a finalized cutover kept. A source with such a
/// restore point is finalized: its server refuses it and takes no more restore points.
pub const KEEP_FINALIZED: &str = slipway_backend::KEEP_FINALIZED;
/// Value of [`KEEP`] on the restore point a live cutover was launched from: the server's
/// policy must not prune it before `slipway cutover finalize` keeps it for good (a converted
/// cutover's image maps only converted copies, so nothing else pins it). A rollback
/// (`slipway launch terminate --cutover`) removes it.
pub const KEEP_CUTOVER: &str = "cutover";
/// On a source's replica volumes: where the source is in its launch lifecycle, as the last
/// lifecycle command recorded it (`ready-for-cutover`, `cutover-complete`); see
/// `slipway_fleet::lifecycle`.
pub const LIFECYCLE: &str = "slipway:lifecycle";

/// A tag specification for a create call.
pub(crate) fn spec<'a>(
    resource: ResourceType,
    tags: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> TagSpecification {
    let mut b = TagSpecification::builder().resource_type(resource);
    for (k, v) in tags {
        b = b.tags(Tag::builder().key(k).value(v).build());
    }
    b.build()
}

/// Tags of an AWS resource as a map.
pub(crate) fn to_map(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_string(),
                t.value().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}
