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
    }
}
