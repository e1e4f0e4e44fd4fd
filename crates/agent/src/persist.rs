//! What a cleanly stopped follow-mode run leaves for the next one (`--state-file`).
//!
//! Sequence numbers are scoped to one agent run, so a new process used to mean a new run and
//! a resync of every disk: the whole disk read and sent again. A source reboot or an agent
//! upgrade should not cost that. A run stopped by SIGTERM/SIGINT that got every write
//! acknowledged saves its run id, its next sequence number, and per disk the acknowledged
//! position and follow mode's table of chunk hashes. The next run presents the same run id;
//! if the server still holds that run (it answers `Resume`), the table is exactly what the
//! volume holds, and the first rescan sends only the chunks that changed while no agent ran.
//!
//! Why the table can be trusted: a rescan records a chunk's hash when its write is queued (a
//! held-back zero run is queued when the rescan stops), a full pass when it reads the chunk;
//! the state is saved only when nothing is queued or unacknowledged, every disk has finished a full
//! pass (which records every chunk) and none is due or running. A chunk a follow-mode rescan
//! had not reached when the stop came keeps the hash of what was last sent for it, which is
//! what the server has, so a rescan cut short is fine (on a large disk a stop almost always
//! lands in one). Anything else (a crash, a full pass cut short, writes still unacknowledged)
//! saves nothing, and the next run resyncs as before.
//!
//! The file is used once: it is removed before the next run connects, so a crash of that run
//! can never resume from a table it has since made stale. If the server answers `Resync` or
//! `Fresh` (another run replicated meanwhile, a new volume), the table is rebuilt by the full
//! pass as usual.

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::changes::ChunkHashes;
use crate::config::Config;

const VERSION: u32 = 1;

/// A saved run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRun {
    pub version: u32,
    pub source_id: String,
    pub agent_run: u64,
    /// The next sequence number the run would have handed out.
    pub next_seq: u64,
    pub block_size: u32,
    pub chunk_size: u32,
    pub disks: Vec<SavedDisk>,
}

/// One disk of a saved run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    pub id: String,
    pub path: PathBuf,
    pub size: u64,
    /// Highest sequence the server acknowledged as durable for this disk.
    pub acked: u64,
    /// `pass_seq` of the last completed pass (reported with `Continuous`).
    pub complete_seq: u64,
    /// The chunk hash table: 16 hex digits per chunk.
    pub hashes: String,
}

/// Errors reading a state file.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a state file of this agent: {reason}")]
    Invalid { path: String, reason: String },
    #[error("{path}: saved for another configuration: {reason}")]
    Mismatch { path: String, reason: String },
}

impl SavedDisk {
    /// The hash table, if it is whole and fits the disk.
    pub fn table(&self, chunk: u32) -> Option<ChunkHashes> {
        if !self.hashes.len().is_multiple_of(16) {
            return None;
        }
        let hashes = self
            .hashes
            .as_bytes()
            .chunks(16)
            .map(|h| {
                std::str::from_utf8(h)
                    .ok()
                    .and_then(|h| u64::from_str_radix(h, 16).ok())
            })
            .collect::<Option<Vec<u64>>>()?;
        ChunkHashes::from_complete(self.size, chunk, hashes)
    }
}

/// Encodes a complete hash table for [`SavedDisk::hashes`].
pub fn encode_table(hashes: &[u64]) -> String {
    let mut s = String::with_capacity(hashes.len() * 16);
    for h in hashes {
        let _ = write!(s, "{h:016x}");
    }
    s
}

impl SavedRun {
    pub fn new(cfg: &Config, agent_run: u64, next_seq: u64, disks: Vec<SavedDisk>) -> Self {
        SavedRun {
            version: VERSION,
            source_id: cfg.source_id.clone(),
            agent_run,
            next_seq,
            block_size: cfg.block_size,
            chunk_size: cfg.chunk_size,
            disks,
        }
    }

    /// Whether this state belongs to a run of `cfg` over disks of these sizes.
    fn check(&self, cfg: &Config, sizes: &[u64]) -> Result<(), String> {
        if self.source_id != cfg.source_id {
            return Err(format!(
                "source {:?}, not {:?}",
                self.source_id, cfg.source_id
            ));
        }
        if (self.block_size, self.chunk_size) != (cfg.block_size, cfg.chunk_size) {
            return Err(format!(
                "block/chunk size {}/{}, not {}/{}",
                self.block_size, self.chunk_size, cfg.block_size, cfg.chunk_size
            ));
        }
        if self.disks.len() != cfg.disks.len() {
            return Err(format!(
                "{} disks, not {}",
                self.disks.len(),
                cfg.disks.len()
            ));
        }
        for ((d, spec), size) in self.disks.iter().zip(&cfg.disks).zip(sizes) {
            if d.id != spec.id || d.path != spec.path || d.size != *size {
                return Err(format!(
                    "disk {} ({}, {} bytes), not {} ({}, {size} bytes)",
                    d.id,
                    d.path.display(),
                    d.size,
                    spec.id,
                    spec.path.display()
                ));
            }
            if d.acked >= self.next_seq || d.complete_seq > d.acked {
                return Err(format!("disk {}: inconsistent positions", d.id));
            }
            if d.table(self.chunk_size).is_none() {
                return Err(format!("disk {}: the hash table is incomplete", d.id));
            }
        }
        Ok(())
    }
}

/// Reads the state at `path` for a run of `cfg` over disks of `sizes` (in `cfg.disks`
/// order) and removes the file durably, so it is used at most once. `Ok(None)` if there is no
/// file. A file saved for another configuration is left in place.
pub fn take(path: &Path, cfg: &Config, sizes: &[u64]) -> Result<Option<SavedRun>, PersistError> {
    let p = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(PersistError::Io { path: p, source: e }),
    };
    let saved: SavedRun = serde_json::from_str(&text).map_err(|e| PersistError::Invalid {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    if saved.version != VERSION {
        return Err(PersistError::Invalid {
            path: p,
            reason: format!("version {}", saved.version),
        });
    }
    saved
        .check(cfg, sizes)
        .map_err(|reason| PersistError::Mismatch {
            path: p.clone(),
            reason,
        })?;
    remove_durably(path).map_err(|e| PersistError::Io { path: p, source: e })?;
    Ok(Some(saved))
}

/// Loads the state for this run if there is a usable one; says why not otherwise.
pub fn load(cfg: &Config, sizes: &[u64]) -> Option<SavedRun> {
    let path = cfg.state_file.as_deref()?;
    match take(path, cfg, sizes) {
        Ok(Some(s)) => {
            info!(path = %path.display(), run = s.agent_run, "resuming the run saved at the last clean stop");
            Some(s)
        }
        Ok(None) => None,
        Err(e) => {
            warn!("not resuming a saved run (every disk is resynced): {e}");
            None
        }
    }
}

/// The directory holding `path` (`.` for a bare file name), whose entry changes get fsynced.
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Writes `run` to `path` atomically (temporary file, fsync, rename, directory fsync).
pub fn save(path: &Path, run: &SavedRun) -> std::io::Result<()> {
    let dir = dir_of(path);
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "state".into())
    ));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec(run).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

fn remove_durably(path: &Path) -> std::io::Result<()> {
    std::fs::remove_file(path)?;
    std::fs::File::open(dir_of(path))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawArgs;

    fn cfg(dir: &Path, state: &Path) -> Config {
        let raw = RawArgs {
            server: "127.0.0.1:1500".into(),
            server_fingerprint: Some("ab".repeat(32)),
            source_id: "web".into(),
            token: "t".into(),
            disks: vec![dir.join("d0.img").display().to_string()],
            follow: true,
            rescan_interval: "1s".into(),
            block_size: "4096".into(),
            chunk_size: "1MiB".into(),
            window: "64MiB".into(),
            max_udp_payload: 1500,
            state_file: Some(state.to_path_buf()),
            ..RawArgs::default()
        };
        Config::from_raw(raw, |_| true).unwrap()
    }

    fn run(cfg: &Config, size: u64) -> SavedRun {
        let n = size.div_ceil(1 << 20) as usize;
        let hashes: Vec<u64> = (0..n as u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        SavedRun::new(
            cfg,
            42,
            100,
            vec![SavedDisk {
                id: cfg.disks[0].id.clone(),
                path: cfg.disks[0].path.clone(),
                size,
                acked: 99,
                complete_seq: 97,
                hashes: encode_table(&hashes),
            }],
        )
    }

    #[test]
    fn saved_state_is_read_once_and_its_table_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("agent.state");
        let c = cfg(d.path(), &state);
        let size = (5 << 20) + 4096;
        let r = run(&c, size);
        save(&state, &r).unwrap();
        let back = take(&state, &c, &[size]).unwrap().unwrap();
        assert_eq!(back, r);
        let t = back.disks[0].table(c.chunk_size).unwrap();
        assert_eq!(t.len(), 6);
        assert!(!t.changed(2 << 20, 2u64.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        assert!(t.changed(2 << 20, 7));
        assert!(!state.exists(), "used once");
        assert!(take(&state, &c, &[size]).unwrap().is_none());
    }

    #[test]
    fn a_state_of_another_configuration_is_refused_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("agent.state");
        let c = cfg(d.path(), &state);
        let size = 3 << 20;
        save(&state, &run(&c, size)).unwrap();
        // The disk changed size.
        let e = take(&state, &c, &[4 << 20]).unwrap_err().to_string();
        assert!(e.contains("saved for another configuration"), "{e}");
        assert!(state.exists());
        // Another source.
        let mut other = c.clone();
        other.source_id = "db".into();
        assert!(take(&state, &other, &[size]).is_err());
        // A truncated table.
        let mut r = run(&c, size);
        r.disks[0].hashes.truncate(16);
        save(&state, &r).unwrap();
        let e = take(&state, &c, &[size]).unwrap_err().to_string();
        assert!(e.contains("incomplete"), "{e}");
        // Garbage.
        std::fs::write(&state, "{").unwrap();
        let e = take(&state, &c, &[size]).unwrap_err().to_string();
        assert!(e.contains("not a state file"), "{e}");
    }

    #[test]
    fn state_file_needs_follow() {
        let d = tempfile::tempdir().unwrap();
        let mut raw = RawArgs {
            server: "127.0.0.1:1500".into(),
            server_fingerprint: Some("ab".repeat(32)),
            source_id: "web".into(),
            token: "t".into(),
            disks: vec!["/dev/sda".into()],
            rescan_interval: "1s".into(),
            block_size: "4096".into(),
            chunk_size: "1MiB".into(),
            window: "64MiB".into(),
            max_udp_payload: 1500,
            state_file: Some(d.path().join("s")),
            ..RawArgs::default()
        };
        let e = Config::from_raw(raw.clone(), |_| true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--state-file") && e.contains("--follow"), "{e}");
        raw.follow = true;
        assert!(Config::from_raw(raw, |_| true).is_ok());
    }
}
