//! Change detection for follow mode.
//!
//! The reference agent has no kernel hook to see writes as they happen, so it finds changes
//! by rereading: it remembers a 64-bit hash of every chunk as it was last sent and, on each
//! rescan, sends the chunks whose hash moved. xxh3 hashes at memory speed, so a rescan costs
//! the read of the disk and little more; the table costs 16 bytes per chunk (16 MiB per TiB
//! at 1 MiB chunks).

use xxhash_rust::xxh3::xxh3_64;

/// Hash of every chunk of one disk as last sent (`None`: never read).
#[derive(Debug, Clone)]
pub struct ChunkHashes {
    chunk: u64,
    hashes: Vec<Option<u64>>,
}

impl ChunkHashes {
    /// A table for a disk of `size` bytes read in chunks of `chunk` bytes.
    pub fn new(size: u64, chunk: u32) -> Self {
        let chunk = u64::from(chunk.max(1));
        ChunkHashes {
            chunk,
            hashes: vec![None; size.div_ceil(chunk) as usize],
        }
    }

    /// The hash this table keeps for chunk contents.
    pub fn hash(data: &[u8]) -> u64 {
        xxh3_64(data)
    }

    fn index(&self, offset: u64) -> usize {
        (offset / self.chunk) as usize
    }

    /// Whether the chunk at `offset`, now hashing to `hash`, differs from what was last sent
    /// (a chunk never recorded counts as changed).
    pub fn changed(&self, offset: u64, hash: u64) -> bool {
        self.hashes.get(self.index(offset)).copied().flatten() != Some(hash)
    }

    /// Records that the chunk at `offset` was sent with contents hashing to `hash`.
    pub fn record(&mut self, offset: u64, hash: u64) {
        let i = self.index(offset);
        if let Some(h) = self.hashes.get_mut(i) {
            *h = Some(hash);
        }
    }

    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Every chunk's hash, if every chunk has one (a full pass recorded them all).
    pub fn complete(&self) -> Option<Vec<u64>> {
        self.hashes.iter().copied().collect()
    }

    /// A table for a disk of `size` bytes in chunks of `chunk` bytes, from [`Self::complete`];
    /// `None` if the count does not fit that disk.
    pub fn from_complete(size: u64, chunk: u32, hashes: Vec<u64>) -> Option<Self> {
        let mut t = Self::new(size, chunk);
        if hashes.len() != t.hashes.len() {
            return None;
        }
        t.hashes = hashes.into_iter().map(Some).collect();
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets of the chunks of `disk` that a rescan would send, recording them as it goes.
    fn rescan(t: &mut ChunkHashes, disk: &[u8], chunk: usize) -> Vec<u64> {
        let mut sent = vec![];
        for (i, c) in disk.chunks(chunk).enumerate() {
            let off = (i * chunk) as u64;
            let h = ChunkHashes::hash(c);
            if t.changed(off, h) {
                t.record(off, h);
                sent.push(off);
            }
        }
        sent
    }

    #[test]
    fn only_changed_chunks_are_sent() {
        let chunk = 4096;
        let mut disk = vec![0u8; chunk * 4 + 100];
        let mut t = ChunkHashes::new(disk.len() as u64, chunk as u32);
        assert_eq!(t.len(), 5);
        // Nothing recorded yet: every chunk is new.
        assert_eq!(rescan(&mut t, &disk, chunk).len(), 5);
        assert_eq!(rescan(&mut t, &disk, chunk), Vec::<u64>::new());
        disk[chunk + 7] = 1;
        disk[4 * chunk + 99] = 2; // the short last chunk
        assert_eq!(
            rescan(&mut t, &disk, chunk),
            vec![chunk as u64, 4 * chunk as u64]
        );
        assert_eq!(rescan(&mut t, &disk, chunk), Vec::<u64>::new());
        // Changing a chunk back to zero is a change too.
        disk[chunk + 7] = 0;
        assert_eq!(rescan(&mut t, &disk, chunk), vec![chunk as u64]);
    }

    #[test]
    fn out_of_range_is_harmless() {
        let mut t = ChunkHashes::new(1000, 512);
        assert_eq!(t.len(), 2);
        t.record(1 << 20, 5);
        assert!(t.changed(1 << 20, 5));
        assert!(ChunkHashes::new(0, 512).is_empty());
    }
}
