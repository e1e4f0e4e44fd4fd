//! From an attached volume id to the block device the server opens.

use std::fs::OpenOptions;
use std::path::PathBuf;

use crate::error::AwsError;

/// Finds (or, in tests, makes) the block device of a volume attached to this instance.
///
/// `resolve` is polled by the backend until it succeeds or the wait bound passes, since the
/// device node appears a moment after EC2 reports the attachment: return an error while it is
/// not there yet.
pub trait DeviceResolver: Send + Sync {
    fn resolve(&self, volume_id: &str, size_bytes: u64) -> Result<PathBuf, AwsError>;
}

/// Production: on Nitro instances udev links every EBS volume as
/// `<dir>/nvme-Amazon_Elastic_Block_Store_vol<hex>` (the volume id without its dash; the NVMe
/// serial number is the volume id). The link path is returned, as it is stable across
/// reboots where `/dev/nvmeXn1` is not.
#[derive(Debug, Clone)]
pub struct ById {
    pub dir: PathBuf,
}

impl ById {
    /// The by-id name of a volume: `vol-0123abcd` → `nvme-Amazon_Elastic_Block_Store_vol0123abcd`.
    pub fn link_name(volume_id: &str) -> String {
        format!(
            "nvme-Amazon_Elastic_Block_Store_{}",
            volume_id.replacen("vol-", "vol", 1)
        )
    }
}

impl DeviceResolver for ById {
    fn resolve(&self, volume_id: &str, _size_bytes: u64) -> Result<PathBuf, AwsError> {
        let path = self.dir.join(Self::link_name(volume_id));
        match std::fs::metadata(&path) {
            Ok(_) => Ok(path),
            Err(e) => Err(AwsError::Device {
                volume_id: volume_id.to_string(),
                message: format!("{}: {e}", path.display()),
            }),
        }
    }
}

/// Tests: a sparse file `<dir>/<volume id>.img` per volume, created on first use and grown
/// (never shrunk) to the volume's size — what an attached, all-zero volume looks like.
#[derive(Debug, Clone)]
pub struct FileMap {
    pub dir: PathBuf,
}

impl DeviceResolver for FileMap {
    fn resolve(&self, volume_id: &str, size_bytes: u64) -> Result<PathBuf, AwsError> {
        let dev = |e: std::io::Error| AwsError::Device {
            volume_id: volume_id.to_string(),
            message: e.to_string(),
        };
        if volume_id.is_empty() || volume_id.contains(['/', '\0']) || volume_id.starts_with('.') {
            return Err(AwsError::Device {
                volume_id: volume_id.to_string(),
                message: "not a volume id".into(),
            });
        }
        std::fs::create_dir_all(&self.dir).map_err(dev)?;
        let path = self.dir.join(format!("{volume_id}.img"));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(dev)?;
        if f.metadata().map_err(dev)?.len() < size_bytes {
            f.set_len(size_bytes).map_err(dev)?;
        }
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_id_name_drops_the_dash() {
        assert_eq!(
            ById::link_name("vol-0abc123def4567890"),
            "nvme-Amazon_Elastic_Block_Store_vol0abc123def4567890"
        );
    }

    #[test]
    fn by_id_finds_the_link_or_says_where_it_looked() {
        let dir = tempfile::tempdir().unwrap();
        let r = ById {
            dir: dir.path().to_path_buf(),
        };
        let err = r.resolve("vol-01", 1).unwrap_err();
        assert!(
            err.to_string()
                .contains("nvme-Amazon_Elastic_Block_Store_vol01"),
            "{err}"
        );
        std::fs::write(
            dir.path().join("nvme-Amazon_Elastic_Block_Store_vol01"),
            b"",
        )
        .unwrap();
        assert_eq!(
            r.resolve("vol-01", 1).unwrap(),
            dir.path().join("nvme-Amazon_Elastic_Block_Store_vol01")
        );
    }

    #[test]
    fn file_map_grows_never_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let r = FileMap {
            dir: dir.path().join("devs"),
        };
        let p = r.resolve("vol-1", 1 << 30).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 30);
        assert_eq!(r.resolve("vol-1", 1 << 20).unwrap(), p);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 30);
        assert!(r.resolve("../x", 1).is_err());
    }
}
