//! The tags Slipway puts on EBS volumes and snapshots, the only state it keeps in AWS.
//!
//! Volumes: [`SOURCE_ID`], [`DISK_ID`], [`ROLE`]` = `[`ROLE_REPLICA`], [`SERVER`] and the
//! user's tags. Snapshots: the volume's tags (copied by CreateSnapshots, set explicitly by
//! CreateSnapshot) plus [`RESTORE_POINT`], [`MARKER`], [`CREATED_MS`], [`TRIGGER`].

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
