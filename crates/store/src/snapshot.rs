//! The local snapshot store: restore points of the embedded default.
//!
//! Layout under `DATA_DIR/snapshots/<source>/`:
//!
//! ```text
//! blocks/<hh>/<sha256>      one file per distinct 512 KiB block content (content-addressed)
//! rp/<id>.json              one manifest per restore point (written atomically, last)
//! ```
//!
//! A manifest lists, for every disk, the SHA-256 of every 512 KiB block (`"0"` for an all-zero
//! block, which is stored nowhere). A restore point therefore *stores* only the blocks whose
//! contents no earlier restore point of the source already stored: that is what makes it
//! incremental, and unchanged blocks are not even read when the change map can be trusted.
//!
//! Deleting a restore point never breaks another one: blocks are shared by reference, so the
//! blocks a younger restore point still needs simply stay (the "fold" of a chain-of-diffs
//! design happens for free), and a mark-and-sweep removes only blocks no remaining manifest
//! names. Crash safety comes from ordering: block files are made durable (`syncfs`) before the
//! manifest that names them is written; a manifest is removed before its blocks are swept. A
//! crash leaves at worst unreferenced block files, which the next sweep removes — never a listed
//! restore point with a missing block.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::changes::{blocks_for, BLOCK};
use crate::fsutil::{create_dir_all_durable, fsync_dir, write_atomic};
use crate::StoreError;

/// Marker in a manifest for an all-zero block.
pub const ZERO: &str = "0";

/// One disk of a restore point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskManifest {
    pub id: String,
    pub size: u64,
    pub block_size: u32,
    /// Blocks read and hashed for this restore point (the rest were unchanged per the map).
    pub scanned_blocks: u64,
    /// Bytes of new block files this restore point added to the store.
    pub stored_bytes: u64,
    /// SHA-256 (hex) of each 512 KiB block, or [`ZERO`].
    pub blocks: Vec<String>,
}

/// A restore point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    pub source: String,
    /// When the point in time was fixed (all appliers held at the marker), Unix ms.
    pub created_unix_ms: u64,
    pub marker_id: u64,
    /// `scheduled` (by the PIT policy) or `on_demand`.
    pub trigger: String,
    pub parent: Option<String>,
    pub disks: Vec<DiskManifest>,
    /// Bytes of new block files this restore point added (sum over disks).
    pub size_bytes: u64,
    /// How long the appliers were held, ms.
    pub pause_ms: u64,
    /// Remote snapshots holding the data (AWS backend); empty on the local default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote: Vec<RemoteRef>,
    /// From the request to the manifest, ms.
    pub duration_ms: u64,
    /// How consistent the point is, as the agent reported it: `one-instant` (the source's
    /// filesystems were frozen while its data was read) or `crash-consistent-best-effort:
    /// <why>`. `None`: the agent did not say (an older agent), which is best-effort too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<String>,
}

/// One disk's remote snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteRef {
    pub disk: String,
    pub snapshot_id: String,
    pub volume_id: String,
}

impl Manifest {
    pub fn disk(&self, id: &str) -> Option<&DiskManifest> {
        self.disks.iter().find(|d| d.id == id)
    }
}

/// Which disk a manifest is built for.
#[derive(Debug, Clone, Copy)]
pub struct DiskShape<'a> {
    pub id: &'a str,
    pub size: u64,
    pub block_size: u32,
}

/// Result of verifying a restore point.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub blocks_checked: u64,
    pub bytes_checked: u64,
    /// One line per bad block: disk, index, what is wrong.
    pub problems: Vec<String>,
}

/// Restore points of all sources under one directory.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    root: PathBuf,
    /// Manifests only: the block data lives elsewhere (EBS snapshots), hashes are kept for
    /// verification.
    hash_only: bool,
}

fn io_at(what: &str, p: &Path) -> impl FnOnce(io::Error) -> StoreError {
    StoreError::io(format!("{what} {}", p.display()))
}

impl SnapshotStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        SnapshotStore {
            root: root.into(),
            hash_only: false,
        }
    }

    /// A store that keeps manifests (with every block's hash) but no block data: for restore
    /// points whose data is in remote snapshots. `stored_bytes` then counts the bytes of
    /// blocks that differ from the parent (what an incremental snapshot holds).
    pub fn hash_only(root: impl Into<PathBuf>) -> Self {
        SnapshotStore {
            root: root.into(),
            hash_only: true,
        }
    }

    pub fn is_hash_only(&self) -> bool {
        self.hash_only
    }

    fn source_dir(&self, source: &str) -> PathBuf {
        self.root.join(source)
    }

    fn rp_dir(&self, source: &str) -> PathBuf {
        self.source_dir(source).join("rp")
    }

    fn block_path(&self, source: &str, hash: &str) -> PathBuf {
        self.source_dir(source)
            .join("blocks")
            .join(&hash[..2])
            .join(hash)
    }

    /// Sources that have a snapshot directory.
    pub fn sources(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| slipway_id_ok(n))
            .collect();
        v.sort();
        v
    }

    /// Restore points of `source` (or of all sources), oldest first.
    pub fn list(&self, source: Option<&str>) -> Result<Vec<Manifest>, StoreError> {
        let sources = match source {
            Some(s) => vec![s.to_string()],
            None => self.sources(),
        };
        let mut out = vec![];
        for s in sources {
            let dir = self.rp_dir(&s);
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') || !name.ends_with(".json") {
                    continue; // temp files of an interrupted write
                }
                out.push(Self::read_manifest(&e.path())?);
            }
        }
        out.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        Ok(out)
    }

    fn read_manifest(p: &Path) -> Result<Manifest, StoreError> {
        let raw = fs::read(p).map_err(io_at("reading", p))?;
        serde_json::from_slice(&raw).map_err(|e| StoreError::CorruptMeta {
            path: p.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// Finds a restore point by id.
    pub fn get(&self, id: &str) -> Result<Option<Manifest>, StoreError> {
        if !slipway_id_ok(id) {
            return Ok(None);
        }
        for s in self.sources() {
            let p = self.rp_dir(&s).join(format!("{id}.json"));
            if p.exists() {
                return Self::read_manifest(&p).map(Some);
            }
        }
        Ok(None)
    }

    /// Newest restore point of a source.
    pub fn newest(&self, source: &str) -> Result<Option<Manifest>, StoreError> {
        Ok(self.list(Some(source))?.pop())
    }

    /// Builds one disk's manifest. Blocks not `changed` are taken from `parent` without being
    /// read; the others are obtained from `read(block_index)`, hashed, and stored if new.
    /// Block files are written but not yet durable: [`SnapshotStore::commit`] makes them so.
    pub fn build_disk(
        &self,
        source: &str,
        disk: DiskShape<'_>,
        parent: Option<&DiskManifest>,
        changed: impl Fn(u64) -> bool,
        mut read: impl FnMut(u64) -> io::Result<Vec<u8>>,
    ) -> Result<DiskManifest, StoreError> {
        let DiskShape {
            id: disk_id,
            size,
            block_size,
        } = disk;
        let n = blocks_for(size);
        let parent = parent.filter(|p| p.size == size && p.blocks.len() as u64 == n);
        let mut blocks = Vec::with_capacity(n as usize);
        let (mut scanned, mut stored) = (0, 0);
        for b in 0..n {
            if let Some(p) = parent {
                if !changed(b) {
                    blocks.push(p.blocks[b as usize].clone());
                    continue;
                }
            }
            let data = read(b).map_err(StoreError::io(format!(
                "reading block {b} of {source}/{disk_id} for a snapshot"
            )))?;
            scanned += 1;
            if data.iter().all(|x| *x == 0) {
                blocks.push(ZERO.to_string());
                continue;
            }
            let hash = hex::encode(Sha256::digest(&data));
            if self.hash_only {
                if parent.is_none_or(|p| p.blocks[b as usize] != hash) {
                    stored += data.len() as u64;
                }
            } else {
                stored += self.put_block(source, &hash, &data)?;
            }
            blocks.push(hash);
        }
        Ok(DiskManifest {
            id: disk_id.into(),
            size,
            block_size,
            scanned_blocks: scanned,
            stored_bytes: stored,
            blocks,
        })
    }

    /// Stores a block unless its content is already there; returns the bytes added.
    fn put_block(&self, source: &str, hash: &str, data: &[u8]) -> Result<u64, StoreError> {
        let p = self.block_path(source, hash);
        if p.exists() {
            return Ok(0);
        }
        let dir = p.parent().expect("block path has a parent");
        if !dir.is_dir() {
            create_dir_all_durable(dir)?;
        }
        let tmp = dir.join(format!(".{hash}.tmp"));
        fs::write(&tmp, data).map_err(io_at("writing", &tmp))?;
        fs::rename(&tmp, &p).map_err(io_at("renaming", &p))?;
        Ok(data.len() as u64)
    }

    /// Makes every block file durable, then writes the manifest atomically. Only after this
    /// returns does the restore point exist.
    pub fn commit(&self, m: &Manifest) -> Result<(), StoreError> {
        let dir = self.rp_dir(&m.source);
        create_dir_all_durable(&dir)?;
        syncfs(&self.source_dir(&m.source))?;
        let mut raw = serde_json::to_vec(m).expect("manifest serializes");
        raw.push(b'\n');
        write_atomic(&dir.join(format!("{}.json", m.id)), &raw, 0o600)
    }

    /// Deletes a restore point, then sweeps blocks no remaining restore point names.
    /// Returns the bytes freed.
    pub fn delete(&self, id: &str) -> Result<u64, StoreError> {
        let Some(m) = self.get(id)? else {
            return Err(StoreError::NotFound(id.to_string()));
        };
        let dir = self.rp_dir(&m.source);
        let p = dir.join(format!("{id}.json"));
        fs::remove_file(&p).map_err(io_at("removing", &p))?;
        fsync_dir(&dir)?;
        crate::failpoint("prune-before-sweep");
        self.sweep(&m.source)
    }

    /// Removes block files (and temp files) no manifest of `source` names. Returns bytes freed.
    pub fn sweep(&self, source: &str) -> Result<u64, StoreError> {
        let live: HashSet<String> = self
            .list(Some(source))?
            .iter()
            .flat_map(|m| m.disks.iter().flat_map(|d| d.blocks.iter().cloned()))
            .collect();
        let mut freed = 0;
        let blocks = self.source_dir(source).join("blocks");
        for sub in fs::read_dir(&blocks).into_iter().flatten().flatten() {
            for f in fs::read_dir(sub.path()).into_iter().flatten().flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if !live.contains(&name) {
                    freed += f.metadata().map(|m| m.len()).unwrap_or(0);
                    fs::remove_file(f.path()).map_err(io_at("removing", &f.path()))?;
                    crate::failpoint("prune-mid-sweep");
                }
            }
        }
        Ok(freed)
    }

    /// Bytes of block files held for a source.
    pub fn stored_bytes(&self, source: &str) -> u64 {
        let blocks = self.source_dir(source).join("blocks");
        fs::read_dir(blocks)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|sub| fs::read_dir(sub.path()).into_iter().flatten().flatten())
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    fn block_len(size: u64, b: u64) -> usize {
        (size - b * BLOCK).min(BLOCK) as usize
    }

    /// Writes a disk of a restore point to `out` as a raw image. Returns bytes of the image.
    pub fn export(&self, m: &Manifest, disk: &str, out: &Path) -> Result<u64, StoreError> {
        let d = m.disk(disk).ok_or_else(|| {
            StoreError::NotFound(format!("disk {disk} in restore point {}", m.id))
        })?;
        let f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(out)
            .map_err(io_at("creating", out))?;
        f.set_len(d.size).map_err(io_at("sizing", out))?;
        for (b, h) in d.blocks.iter().enumerate() {
            if h == ZERO {
                continue;
            }
            let data = self.read_block(&m.source, h, Self::block_len(d.size, b as u64))?;
            f.write_all_at(&data, b as u64 * BLOCK)
                .map_err(io_at("writing", out))?;
        }
        f.sync_all().map_err(io_at("fsyncing", out))?;
        Ok(d.size)
    }

    fn read_block(&self, source: &str, hash: &str, len: usize) -> Result<Vec<u8>, StoreError> {
        let p = self.block_path(source, hash);
        let data = fs::read(&p).map_err(io_at("reading block", &p))?;
        if data.len() != len {
            return Err(StoreError::CorruptMeta {
                path: p.display().to_string(),
                reason: format!("block is {} bytes, expected {len}", data.len()),
            });
        }
        Ok(data)
    }

    /// Re-reads every block of a restore point and checks its SHA-256.
    pub fn verify(&self, m: &Manifest) -> VerifyReport {
        let mut r = VerifyReport::default();
        for d in &m.disks {
            if d.blocks.len() as u64 != blocks_for(d.size) {
                r.problems.push(format!(
                    "disk {}: {} blocks listed for {} bytes",
                    d.id,
                    d.blocks.len(),
                    d.size
                ));
                continue;
            }
            for (b, h) in d.blocks.iter().enumerate() {
                if h == ZERO {
                    continue;
                }
                let len = Self::block_len(d.size, b as u64);
                match self.read_block(&m.source, h, len) {
                    Ok(data) => {
                        r.blocks_checked += 1;
                        r.bytes_checked += data.len() as u64;
                        let got = hex::encode(Sha256::digest(&data));
                        if &got != h {
                            r.problems.push(format!(
                                "disk {} block {b}: SHA-256 is {got}, manifest says {h}",
                                d.id
                            ));
                        }
                    }
                    Err(e) => r.problems.push(format!("disk {} block {b}: {e}", d.id)),
                }
            }
        }
        r
    }
}

fn slipway_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Flushes every dirty page and metadata change of the filesystem holding `dir`.
fn syncfs(dir: &Path) -> Result<(), StoreError> {
    let f = fs::File::open(dir).map_err(io_at("opening", dir))?;
    // SAFETY: syncfs on a valid open fd; no memory is passed.
    let r = unsafe { libc::syncfs(f.as_raw_fd()) };
    if r != 0 {
        return Err(io_at("syncfs", dir)(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(
        source: &str,
        id: &str,
        t: u64,
        parent: Option<&str>,
        disk: DiskManifest,
    ) -> Manifest {
        Manifest {
            format: 1,
            id: id.into(),
            source: source.into(),
            created_unix_ms: t,
            marker_id: t,
            trigger: "on_demand".into(),
            parent: parent.map(Into::into),
            size_bytes: disk.stored_bytes,
            disks: vec![disk],
            pause_ms: 0,
            remote: vec![],
            duration_ms: 0,
            consistency: None,
        }
    }

    fn shape(size: u64) -> DiskShape<'static> {
        DiskShape {
            id: "d",
            size,
            block_size: 512,
        }
    }

    fn image(blocks: u64, seed: u8) -> Vec<u8> {
        // Every block distinct (content addressing would share equal blocks).
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ seed as u64;
        (0..blocks * BLOCK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn incremental_export_verify_delete_never_breaks_younger() {
        let d = tempfile::tempdir().unwrap();
        let st = SnapshotStore::new(d.path());
        let size = 8 * BLOCK + 4096; // a partial last block
        let mut img = image(9, 3);
        img.truncate(size as usize);
        img[(2 * BLOCK) as usize..(3 * BLOCK) as usize].fill(0); // a zero block
        let read = |img: &Vec<u8>| {
            let img = img.clone();
            move |b: u64| {
                let s = (b * BLOCK) as usize;
                let e = (s + BLOCK as usize).min(img.len());
                Ok(img[s..e].to_vec())
            }
        };
        let d1 = st
            .build_disk("s", shape(size), None, |_| true, read(&img))
            .unwrap();
        assert_eq!(d1.blocks[2], ZERO);
        assert_eq!(d1.stored_bytes, size - BLOCK);
        let m1 = manifest("s", "rp-1", 1, None, d1.clone());
        st.commit(&m1).unwrap();

        // Change one block; only it is read and stored.
        let mut img2 = img.clone();
        img2[(5 * BLOCK) as usize] ^= 0xff;
        let d2 = st
            .build_disk("s", shape(size), Some(&d1), |b| b == 5, read(&img2))
            .unwrap();
        assert_eq!(d2.scanned_blocks, 1);
        assert_eq!(d2.stored_bytes, BLOCK);
        let m2 = manifest("s", "rp-2", 2, Some("rp-1"), d2);
        st.commit(&m2).unwrap();
        assert_eq!(st.list(Some("s")).unwrap().len(), 2);

        // Delete the older one: the younger still exports exactly and verifies.
        st.delete("rp-1").unwrap();
        let out = d.path().join("out.img");
        st.export(&m2, "d", &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), img2);
        let r = st.verify(&m2);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.blocks_checked, 8);
        // The block only rp-1 had is gone; what rp-2 shares stayed.
        assert_eq!(st.stored_bytes("s"), size - BLOCK);

        // A damaged block is reported.
        let h = &m2.disks[0].blocks[0];
        fs::write(st.block_path("s", h), vec![1u8; BLOCK as usize]).unwrap();
        assert_eq!(st.verify(&m2).problems.len(), 1);
        assert!(matches!(st.delete("nope"), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn orphans_of_an_interrupted_snapshot_are_swept() {
        let d = tempfile::tempdir().unwrap();
        let st = SnapshotStore::new(d.path());
        let img = image(2, 5);
        let read = move |b: u64| Ok(img[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].to_vec());
        // Built but never committed: as if killed before the manifest.
        st.build_disk("s", shape(2 * BLOCK), None, |_| true, read)
            .unwrap();
        assert!(st.list(Some("s")).unwrap().is_empty());
        assert_eq!(st.sweep("s").unwrap(), 2 * BLOCK);
        assert_eq!(st.stored_bytes("s"), 0);
    }
}
