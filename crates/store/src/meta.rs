//! Per-disk metadata: where the replica of one source disk stands.
//!
//! Written atomically ([`crate::fsutil::write_atomic`]) and only ever *after* the data it
//! describes was flushed, so after any crash it claims no more than the volume holds. It may lag
//! behind the data (it is rewritten at most once a second on the hot path); that is safe because
//! re-applying an in-order suffix of writes is idempotent, and the agent keeps every write it has
//! not seen acked.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;
use crate::StoreError;

/// Current metadata format.
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskMeta {
    pub format: u32,
    pub source_id: String,
    pub disk_id: String,
    /// Disk size in bytes, as the agent announced it when the volume was created.
    pub size: u64,
    pub block_size: u32,
    /// The agent run whose sequence numbers `durable_seq` counts.
    pub agent_run: u64,
    /// Every write of `agent_run` with a sequence `<=` this is on the volume, flushed.
    pub durable_seq: u64,
    /// A full pass of `agent_run` ended at this sequence (0: none yet).
    pub pass_seq: u64,
    /// The volume is a whole copy of the source as of some point of `agent_run`: a pass
    /// completed and is durable.
    pub synced: bool,
    /// Bytes durably written in this agent run.
    pub replicated_bytes: u64,
    /// Replication state name when last written (informational).
    pub state: String,
    /// Wall-clock time of the last update, Unix milliseconds.
    pub updated_unix_ms: u64,
    /// The stamp this metadata expects on its volume (see [`VolumeStamp`]); `None` before
    /// the first open that could stamp it, or where stamps cannot be kept (block devices).
    #[serde(default)]
    pub volume_stamp: Option<VolumeStamp>,
}

/// Ties a volume to its metadata, so a volume that is not the one the metadata describes
/// (swapped, restored from a backup or an older copy) is noticed instead of trusted.
///
/// `id` is random, drawn when the volume is first stamped; `generation` goes up by one at
/// every open of the disk. The stamp is written to the volume (durably) *before* the metadata
/// that records it, so a volume's generation is never below its metadata's: a lower one, a
/// different id, or no stamp where the metadata expects one means the volume is older than,
/// or other than, what the metadata says, and the server resynchronises the disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeStamp {
    pub id: String,
    pub generation: u64,
}

impl VolumeStamp {
    /// A stamp for a volume that has none yet.
    pub fn fresh() -> Self {
        VolumeStamp {
            id: format!("{:032x}", rand::random::<u128>()),
            generation: 1,
        }
    }

    /// The stamp for the next open.
    pub fn next(&self) -> Self {
        VolumeStamp {
            id: self.id.clone(),
            generation: self.generation + 1,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        format!("{}:{}", self.id, self.generation).into_bytes()
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(b).ok()?;
        let (id, generation) = s.split_once(':')?;
        Some(VolumeStamp {
            id: id.to_string(),
            generation: generation.parse().ok()?,
        })
    }

    /// Why a volume carrying `found` is not the one metadata expecting `self` describes.
    pub fn mismatch(&self, found: Option<&VolumeStamp>) -> Option<String> {
        match found {
            None => Some("the volume carries no stamp".into()),
            Some(f) if f.id != self.id => Some(format!(
                "the volume's stamp {} is not the {} its metadata expects",
                f.id, self.id
            )),
            Some(f) if f.generation < self.generation => Some(format!(
                "the volume is older than its metadata (generation {} < {})",
                f.generation, self.generation
            )),
            Some(_) => None,
        }
    }
}

impl DiskMeta {
    pub fn new(source_id: &str, disk_id: &str, size: u64, block_size: u32) -> Self {
        DiskMeta {
            format: FORMAT,
            source_id: source_id.into(),
            disk_id: disk_id.into(),
            size,
            block_size,
            agent_run: 0,
            durable_seq: 0,
            pass_seq: 0,
            synced: false,
            replicated_bytes: 0,
            state: "initiating".into(),
            updated_unix_ms: now_ms(),
            volume_stamp: None,
        }
    }

    /// Reads metadata; `Ok(None)` when the file does not exist.
    pub fn load(path: &Path) -> Result<Option<Self>, StoreError> {
        let raw = match std::fs::read(path) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(format!("reading {}", path.display()))(e)),
        };
        let m: DiskMeta = serde_json::from_slice(&raw).map_err(|e| StoreError::CorruptMeta {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if m.format != FORMAT {
            return Err(StoreError::CorruptMeta {
                path: path.display().to_string(),
                reason: format!("format {} is not {FORMAT}", m.format),
            });
        }
        Ok(Some(m))
    }

    /// Writes the metadata atomically and durably.
    pub fn store(&mut self, path: &Path) -> Result<(), StoreError> {
        self.updated_unix_ms = now_ms();
        let mut buf = serde_json::to_vec_pretty(self).expect("metadata serializes");
        buf.push(b'\n');
        write_atomic(path, &buf, 0o600)
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_and_corrupt() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("d.meta.json");
        assert_eq!(DiskMeta::load(&p).unwrap(), None);
        let mut m = DiskMeta::new("s", "d", 1 << 20, 512);
        m.durable_seq = 9;
        m.store(&p).unwrap();
        assert_eq!(DiskMeta::load(&p).unwrap().unwrap(), m);
        std::fs::write(&p, b"{\"format\":1").unwrap();
        assert!(matches!(
            DiskMeta::load(&p),
            Err(StoreError::CorruptMeta { .. })
        ));
        // Metadata written before stamps existed still loads (no stamp expected).
        std::fs::write(
            &p,
            br#"{"format":1,"source_id":"s","disk_id":"d","size":512,"block_size":512,"agent_run":1,"durable_seq":2,"pass_seq":0,"synced":false,"replicated_bytes":0,"state":"x","updated_unix_ms":0}"#,
        )
        .unwrap();
        assert_eq!(DiskMeta::load(&p).unwrap().unwrap().volume_stamp, None);
    }

    #[test]
    fn a_stamp_tells_an_older_or_other_volume() {
        let s = VolumeStamp::fresh();
        let n = s.next();
        assert_eq!(VolumeStamp::decode(&n.encode()), Some(n.clone()));
        assert_eq!(n.mismatch(Some(&n)), None);
        assert_eq!(
            s.mismatch(Some(&n)),
            None,
            "a volume may be ahead of its metadata"
        );
        assert!(n.mismatch(Some(&s)).unwrap().contains("older"));
        assert!(n.mismatch(None).unwrap().contains("no stamp"));
        let other = VolumeStamp::fresh();
        assert!(n.mismatch(Some(&other)).unwrap().contains("not the"));
        assert_eq!(VolumeStamp::decode(b"garbage"), None);
    }
}
