//! Change tracking at 512 KiB blocks (the EBS snapshot block size).
//!
//! A [`ChangeMap`] records which blocks of a volume were written since a named base restore
//! point. It is persisted on a clean close only; while an applier runs, the file on disk says
//! "untrusted", so after a `kill -9` or power cut the map is treated as *every block changed*.
//! That costs one full read-and-hash at the next restore point and never misses a block — the
//! snapshot store compares hashes against the parent anyway, so it still stores only blocks
//! whose contents really changed.

use std::path::Path;

use crate::fsutil::write_atomic;
use crate::StoreError;

/// The block size of change tracking and snapshots: 512 KiB.
pub const BLOCK: u64 = 512 * 1024;

const MAGIC: &[u8; 8] = b"SLWCHG01";

/// Number of blocks covering `size` bytes.
pub fn blocks_for(size: u64) -> u64 {
    size.div_ceil(BLOCK)
}

/// A bitset of changed blocks relative to a base restore point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeMap {
    /// Restore point the changes are relative to (`None`: no restore point yet).
    pub base: Option<String>,
    /// False when the map cannot be trusted (unclean stop): every block counts as changed.
    pub trusted: bool,
    nblocks: u64,
    bits: Vec<u64>,
}

impl ChangeMap {
    /// An empty, trusted map for `size` bytes relative to `base`.
    pub fn new(size: u64, base: Option<String>) -> Self {
        let nblocks = blocks_for(size);
        ChangeMap {
            base,
            trusted: true,
            nblocks,
            bits: vec![0; nblocks.div_ceil(64) as usize],
        }
    }

    /// A map that claims nothing: every block counts as changed.
    pub fn untrusted(size: u64) -> Self {
        ChangeMap {
            trusted: false,
            ..Self::new(size, None)
        }
    }

    pub fn nblocks(&self) -> u64 {
        self.nblocks
    }

    /// Marks the blocks touched by `len` bytes at `offset`.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / BLOCK;
        let last = ((offset + len - 1) / BLOCK).min(self.nblocks.saturating_sub(1));
        for b in first..=last {
            self.bits[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    /// Whether block `b` may have changed since the base.
    pub fn is_changed(&self, b: u64) -> bool {
        !self.trusted || (b < self.nblocks && self.bits[(b / 64) as usize] & (1 << (b % 64)) != 0)
    }

    /// Whether the map can say block by block what changed relative to `parent`.
    pub fn usable_against(&self, parent: Option<&str>) -> bool {
        self.trusted && parent.is_some() && self.base.as_deref() == parent
    }

    /// Blocks that changed (every block when untrusted).
    pub fn changed_blocks(&self) -> Vec<u64> {
        (0..self.nblocks).filter(|b| self.is_changed(*b)).collect()
    }

    pub fn changed_count(&self) -> u64 {
        if !self.trusted {
            return self.nblocks;
        }
        self.bits.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Adds every change of `other` (same size) to this map.
    pub fn merge(&mut self, other: &ChangeMap) {
        self.trusted &= other.trusted;
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= *b;
        }
    }

    /// Serialized form: magic, trusted, base, nblocks, bits, CRC-32 of all before.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.bits.len() * 8);
        out.extend_from_slice(MAGIC);
        out.push(self.trusted as u8);
        let base = self.base.as_deref().unwrap_or("");
        out.extend_from_slice(&(base.len() as u16).to_be_bytes());
        out.extend_from_slice(base.as_bytes());
        out.extend_from_slice(&self.nblocks.to_be_bytes());
        for w in &self.bits {
            out.extend_from_slice(&w.to_be_bytes());
        }
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    fn decode(b: &[u8], size: u64) -> Option<Self> {
        if b.len() < 8 + 1 + 2 + 8 + 4 || &b[..8] != MAGIC {
            return None;
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32(body).to_be_bytes() != crc {
            return None;
        }
        let trusted = body[8] == 1;
        let blen = u16::from_be_bytes([body[9], body[10]]) as usize;
        let base = std::str::from_utf8(body.get(11..11 + blen)?)
            .ok()?
            .to_string();
        let rest = body.get(11 + blen..)?;
        let nblocks = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
        if nblocks != blocks_for(size) || rest.len() != 8 + nblocks.div_ceil(64) as usize * 8 {
            return None;
        }
        let bits = rest[8..]
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        Some(ChangeMap {
            base: (!base.is_empty()).then_some(base),
            trusted,
            nblocks,
            bits,
        })
    }

    /// Loads the map for a volume of `size` bytes. A missing, damaged or unclean file yields an
    /// untrusted map (every block changed).
    pub fn load(path: &Path, size: u64) -> Self {
        match std::fs::read(path) {
            Ok(b) => Self::decode(&b, size).unwrap_or_else(|| Self::untrusted(size)),
            Err(_) => Self::untrusted(size),
        }
    }

    /// Writes the map atomically. `clean = false` records it as untrusted (the state on disk
    /// while an applier may be changing the volume).
    pub fn store(&self, path: &Path, clean: bool) -> Result<(), StoreError> {
        let mut m = self.clone();
        m.trusted &= clean;
        write_atomic(path, &m.encode(), 0o600)
    }
}

fn crc32(b: &[u8]) -> u32 {
    crc32fast::hash(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_ranges_across_blocks() {
        let mut m = ChangeMap::new(10 * BLOCK + 100, Some("rp1".into()));
        assert_eq!(m.nblocks(), 11);
        m.mark(BLOCK - 512, 1024); // straddles blocks 0 and 1
        m.mark(10 * BLOCK, 100); // the partial last block
        assert_eq!(m.changed_blocks(), vec![0, 1, 10]);
        assert!(m.usable_against(Some("rp1")));
        assert!(!m.usable_against(Some("rp2")));
        assert!(!m.usable_against(None));
    }

    #[test]
    fn persists_clean_and_falls_back_when_unclean_or_damaged() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.changes");
        let size = 100 * BLOCK;
        let mut m = ChangeMap::new(size, Some("rp-1".into()));
        m.mark(5 * BLOCK, 1);
        m.store(&p, true).unwrap();
        assert_eq!(ChangeMap::load(&p, size), m);
        // Unclean: stored while running.
        m.store(&p, false).unwrap();
        let l = ChangeMap::load(&p, size);
        assert!(!l.trusted && l.changed_count() == 100);
        // Damaged or wrong size.
        m.store(&p, true).unwrap();
        let mut raw = std::fs::read(&p).unwrap();
        raw[20] ^= 1;
        std::fs::write(&p, &raw).unwrap();
        assert!(!ChangeMap::load(&p, size).trusted);
        m.store(&p, true).unwrap();
        assert!(!ChangeMap::load(&p, size * 2).trusted);
        assert!(!ChangeMap::load(&d.path().join("missing"), size).trusted);
    }

    #[test]
    fn merge_keeps_every_change() {
        let mut a = ChangeMap::new(64 * BLOCK, None);
        let mut b = ChangeMap::new(64 * BLOCK, None);
        a.mark(0, 1);
        b.mark(63 * BLOCK, 1);
        a.merge(&b);
        assert_eq!(a.changed_blocks(), vec![0, 63]);
        crc32(b"123456789");
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}
