//! How many replica volumes an instance type can hold, known without asking AWS.
//!
//! Nitro instances share 28 attachment slots between network interfaces, EBS volumes and NVMe
//! instance-store volumes; the root volume, the server's identity volume (its data dir,
//! `slipway_aws::identity_volume`) and the primary network interface take one each, which
//! leaves 25 for replicas. Xen instances (previous generations) support up to 40 EBS volumes
//! by AWS's recommendation, so 38 besides the root and identity volumes. Newer types with a larger
//! dedicated EBS limit are treated as Nitro here; `apply` refines the bound with
//! DescribeInstanceTypes (`EbsInfo.MaximumEbsAttachments`) where AWS reports it.

/// Instance families built on the Xen hypervisor.
const XEN_FAMILIES: &[&str] = &[
    "t1", "t2", "m1", "m2", "m3", "m4", "c1", "c3", "c4", "r3", "r4", "i2", "i3", "d2", "x1",
    "x1e", "p2", "p3", "g2", "g3", "g3s", "f1", "h1", "cc2", "cr1", "hs1",
];

/// Whether `instance_type` runs on the Nitro system. Replication servers must: the server finds
/// a replica's block device by its volume id, which only Nitro's NVMe EBS devices carry
/// (`/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol…`); on Xen a volume is a bare
/// `/dev/xvdN`. `None` if the name is not `family.size`.
pub fn is_nitro(instance_type: &str) -> Option<bool> {
    let (family, size) = instance_type.split_once('.')?;
    if family.is_empty() || size.is_empty() {
        return None;
    }
    // `.metal` sizes of Xen families (i3.metal) and p3dn run on Nitro.
    Some(!(XEN_FAMILIES.contains(&family) && size != "metal"))
}

/// EBS attachments of a server that are not replicas: its root volume and its identity volume.
pub const NON_REPLICA_ATTACHMENTS: u32 = 2;

/// Replica volumes (root and identity volumes excluded) an instance of `instance_type` can have attached,
/// by the static rule above. `None` if the name is not `family.size`.
pub fn data_volume_limit(instance_type: &str) -> Option<u32> {
    let (family, size) = instance_type.split_once('.')?;
    if family.is_empty() || size.is_empty() {
        return None;
    }
    // `.metal` sizes of Xen families run on Nitro.
    if XEN_FAMILIES.contains(&family) && size != "metal" {
        Some(40 - NON_REPLICA_ATTACHMENTS)
    } else {
        Some(27 - NON_REPLICA_ATTACHMENTS)
    }
}

/// Replica volumes from DescribeInstanceTypes' `MaximumEbsAttachments` and whether the limit
/// is shared with network interfaces, for a server with its one (primary) interface: the
/// server's own rule ([`slipway_aws::attachment_limit`]) less the root and identity volumes,
/// so the planner and the server (which counts every attachment) never disagree.
pub fn data_volume_limit_from_aws(max_attachments: u32, shared_with_enis: bool) -> u32 {
    slipway_aws::attachment_limit(max_attachments, shared_with_enis, 1)
        .saturating_sub(NON_REPLICA_ATTACHMENTS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nitro_and_xen() {
        assert_eq!(data_volume_limit("m5.large"), Some(25));
        assert_eq!(data_volume_limit("c7i.2xlarge"), Some(25));
        assert_eq!(data_volume_limit("t2.micro"), Some(38));
        assert_eq!(data_volume_limit("i3.metal"), Some(25));
        assert_eq!(data_volume_limit("large"), None);
        assert_eq!(data_volume_limit("m5."), None);
        // What AWS reports for an m5.large (27, shared: the primary interface already taken
        // off) gives the static rule's 25, and the server's limit less its root and identity
        // volumes.
        assert_eq!(data_volume_limit_from_aws(27, true), 25);
        assert_eq!(
            data_volume_limit_from_aws(27, true),
            slipway_aws::attachment_limit(27, true, 1) - 2
        );
        assert_eq!(
            data_volume_limit_from_aws(27, true),
            data_volume_limit("m5.large").unwrap()
        );
        assert_eq!(data_volume_limit_from_aws(32, false), 30);
    }

    #[test]
    fn nitro_or_not() {
        assert_eq!(is_nitro("m5.large"), Some(true));
        assert_eq!(is_nitro("c7i.2xlarge"), Some(true));
        assert_eq!(is_nitro("p3dn.24xlarge"), Some(true));
        assert_eq!(is_nitro("i3.metal"), Some(true));
        assert_eq!(is_nitro("i3.large"), Some(false));
        assert_eq!(is_nitro("t2.micro"), Some(false));
        assert_eq!(is_nitro("m4.xlarge"), Some(false));
        assert_eq!(is_nitro("large"), None);
    }
}
