//! How many replica volumes an instance type can hold, known without asking AWS.
//!
//! Nitro instances share 28 attachment slots between network interfaces, EBS volumes and NVMe
//! instance-store volumes; the root volume and the primary network interface take one each,
//! which leaves 26 for replicas. Xen instances (previous generations) support up to 40 EBS
//! volumes by AWS's recommendation, so 39 besides the root volume. Newer types with a larger
//! dedicated EBS limit are treated as Nitro here; `apply` refines the bound with
//! DescribeInstanceTypes (`EbsInfo.MaximumEbsAttachments`) where AWS reports it.

/// Instance families built on the Xen hypervisor.
const XEN_FAMILIES: &[&str] = &[
    "t1", "t2", "m1", "m2", "m3", "m4", "c1", "c3", "c4", "r3", "r4", "i2", "i3", "d2", "x1",
    "x1e", "p2", "p3", "g2", "g3", "g3s", "f1", "h1", "cc2", "cr1", "hs1",
];

/// Replica volumes (root volume excluded) an instance of `instance_type` can have attached,
/// by the static rule above. `None` if the name is not `family.size`.
pub fn data_volume_limit(instance_type: &str) -> Option<u32> {
    let (family, size) = instance_type.split_once('.')?;
    if family.is_empty() || size.is_empty() {
        return None;
    }
    // `.metal` sizes of Xen families run on Nitro.
    if XEN_FAMILIES.contains(&family) && size != "metal" {
        Some(39)
    } else {
        Some(26)
    }
}

/// Replica volumes from DescribeInstanceTypes' `MaximumEbsAttachments` (root included) and
/// whether the limit is shared with network interfaces (then one is the primary interface).
pub fn data_volume_limit_from_aws(max_attachments: u32, shared_with_enis: bool) -> u32 {
    let eni = u32::from(shared_with_enis);
    max_attachments.saturating_sub(1 + eni)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nitro_and_xen() {
        assert_eq!(data_volume_limit("m5.large"), Some(26));
        assert_eq!(data_volume_limit("c7i.2xlarge"), Some(26));
        assert_eq!(data_volume_limit("t2.micro"), Some(39));
        assert_eq!(data_volume_limit("i3.metal"), Some(26));
        assert_eq!(data_volume_limit("large"), None);
        assert_eq!(data_volume_limit("m5."), None);
        assert_eq!(data_volume_limit_from_aws(28, true), 26);
        assert_eq!(data_volume_limit_from_aws(128, false), 127);
    }
}
