//! The I/O-free core: one file's unsynced changes, kept apart from its backing file.
//!
//! Writes, hole punches and size changes land in an [`Overlay`]; reads see the overlay over the
//! backing file (read-your-writes); [`Overlay::apply`] — what an `fsync`/`fdatasync` of the
//! file does — writes them to the backing file and syncs it, and dropping the overlay is a
//! power cut for that file. The backing store is a trait so the logic is tested without FUSE
//! and without files.

use std::collections::BTreeMap;
use std::io;

/// What an overlay needs of the file underneath it.
pub trait Backing {
    /// Current length of the backing file.
    fn file_len(&self) -> io::Result<u64>;
    /// Reads at `off`; may return fewer bytes than asked at the end of the file.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// `fdatasync` (`data_only`) or `fsync`.
    fn sync(&self, data_only: bool) -> io::Result<()>;
}

/// A file's changes since its last sync.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// Written bytes by offset: non-empty, non-overlapping.
    extents: BTreeMap<u64, Vec<u8>>,
    /// The file's length as its users see it, once something changed it.
    size: Option<u64>,
    /// The lowest length the file was truncated to since the last sync: backing bytes at or
    /// past it are gone (they read as zeros if the file grew again).
    cut_to: Option<u64>,
}

impl Overlay {
    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty() && self.size.is_none() && self.cut_to.is_none()
    }

    /// Bytes of written data pending.
    pub fn pending_bytes(&self) -> u64 {
        self.extents.values().map(|v| v.len() as u64).sum()
    }

    /// The length users see, given the backing file's.
    pub fn size(&self, base_len: u64) -> u64 {
        self.size.unwrap_or(base_len)
    }

    /// Records a write of `data` at `off`.
    pub fn write(&mut self, off: u64, data: &[u8], base_len: u64) {
        if data.is_empty() {
            return;
        }
        let end = off + data.len() as u64;
        self.size = Some(self.size(base_len).max(end));
        self.put(off, data.to_vec());
    }

    /// Zeros `[off, off+len)` within the current length (a hole punch with KEEP_SIZE), or
    /// beyond it too when `extend` (zeroing a range that grows the file).
    pub fn zero(&mut self, off: u64, len: u64, extend: bool, base_len: u64) {
        let size = self.size(base_len);
        let end = if extend {
            off + len
        } else {
            (off + len).min(size)
        };
        if end <= off {
            return;
        }
        if extend && end > size {
            self.size = Some(end);
        } else if self.size.is_none() {
            self.size = Some(size);
        }
        self.put(off, vec![0; (end - off) as usize]);
    }

    /// Sets the length (`ftruncate`).
    pub fn truncate(&mut self, new: u64, base_len: u64) {
        let size = self.size(base_len);
        if new < size {
            self.cut_to = Some(self.cut_to.map_or(new, |c| c.min(new)));
            // Drop or trim extents past the new end.
            let past: Vec<u64> = self.extents.range(new..).map(|(k, _)| *k).collect();
            for k in past {
                self.extents.remove(&k);
            }
            if let Some((&k, v)) = self.extents.range_mut(..new).next_back() {
                if k + v.len() as u64 > new {
                    v.truncate((new - k) as usize);
                }
            }
        }
        self.size = Some(new);
    }

    /// Reads up to `len` bytes at `off` as users see the file (short at its end).
    pub fn read(&self, b: &dyn Backing, off: u64, len: usize) -> io::Result<Vec<u8>> {
        let base_len = b.file_len()?;
        let size = self.size(base_len);
        if off >= size {
            return Ok(Vec::new());
        }
        let end = (off + len as u64).min(size);
        let mut out = vec![0u8; (end - off) as usize];
        // Backing bytes are valid below its length and below any truncation since the sync.
        let valid = base_len.min(self.cut_to.unwrap_or(u64::MAX));
        if off < valid {
            let want = (valid.min(end) - off) as usize;
            let mut got = 0;
            while got < want {
                let n = b.read_at(&mut out[got..want], off + got as u64)?;
                if n == 0 {
                    break;
                }
                got += n;
            }
        }
        // Extents that overlap [off, end): the one starting before `off` and those inside.
        let first = self
            .extents
            .range(..=off)
            .next_back()
            .map(|(k, _)| *k)
            .unwrap_or(off);
        for (&k, v) in self.extents.range(first..end) {
            let (s, e) = (k.max(off), (k + v.len() as u64).min(end));
            if s < e {
                out[(s - off) as usize..(e - off) as usize]
                    .copy_from_slice(&v[(s - k) as usize..(e - k) as usize]);
            }
        }
        Ok(out)
    }

    /// Makes the pending changes durable: applies them to the backing file and syncs it. The
    /// overlay is empty afterwards; on an error it is kept whole (reads stay right).
    pub fn apply(&mut self, b: &dyn Backing, data_only: bool) -> io::Result<()> {
        if !self.is_empty() {
            if let Some(c) = self.cut_to {
                if c < b.file_len()? {
                    b.set_len(c)?;
                }
            }
            for (&k, v) in &self.extents {
                b.write_all_at(v, k)?;
            }
            if let Some(s) = self.size {
                if s != b.file_len()? {
                    b.set_len(s)?;
                }
            }
        }
        b.sync(data_only)?;
        *self = Overlay::default();
        Ok(())
    }

    /// Inserts an extent, replacing what it overlaps and merging with touching neighbours.
    fn put(&mut self, off: u64, mut data: Vec<u8>) {
        let end = off + data.len() as u64;
        let mut start = off;
        // An extent starting before `off` that reaches it: keep its head, maybe its tail.
        if let Some((&k, v)) = self.extents.range(..off).next_back() {
            let kend = k + v.len() as u64;
            if kend >= off {
                let mut head = self.extents.remove(&k).expect("present");
                let tail = if kend > end {
                    head[(end - k) as usize..].to_vec()
                } else {
                    Vec::new()
                };
                head.truncate((off - k) as usize);
                head.extend_from_slice(&data);
                head.extend_from_slice(&tail);
                data = head;
                start = k;
            }
        }
        // Extents starting inside [off, end]: drop them, keeping the tail of the last.
        let inside: Vec<u64> = self.extents.range(off..=end).map(|(k, _)| *k).collect();
        for k in inside {
            let v = self.extents.remove(&k).expect("present");
            let kend = k + v.len() as u64;
            let data_end = start + data.len() as u64;
            if kend > data_end {
                data.extend_from_slice(&v[(data_end - k) as usize..]);
            }
        }
        self.extents.insert(start, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A backing file in memory that counts syncs.
    #[derive(Default)]
    struct Mem {
        data: RefCell<Vec<u8>>,
        syncs: RefCell<u32>,
    }

    impl Backing for Mem {
        fn file_len(&self) -> io::Result<u64> {
            Ok(self.data.borrow().len() as u64)
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
            let d = self.data.borrow();
            let off = off as usize;
            if off >= d.len() {
                return Ok(0);
            }
            let n = buf.len().min(d.len() - off);
            buf[..n].copy_from_slice(&d[off..off + n]);
            Ok(n)
        }
        fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            let mut d = self.data.borrow_mut();
            let end = off as usize + buf.len();
            if d.len() < end {
                d.resize(end, 0);
            }
            d[off as usize..end].copy_from_slice(buf);
            Ok(())
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.data.borrow_mut().resize(len as usize, 0);
            Ok(())
        }
        fn sync(&self, _: bool) -> io::Result<()> {
            *self.syncs.borrow_mut() += 1;
            Ok(())
        }
    }

    fn all(o: &Overlay, b: &Mem) -> Vec<u8> {
        o.read(b, 0, 1 << 20).unwrap()
    }

    #[test]
    fn reads_see_writes_and_the_backing_keeps_only_synced_data() {
        let b = Mem::default();
        b.write_all_at(&[1; 16], 0).unwrap();
        let mut o = Overlay::default();
        o.write(4, &[2; 4], 16);
        o.write(20, &[3; 4], 16); // past the end: grows, with a zero gap
        let mut want = vec![1u8; 16];
        want[4..8].fill(2);
        want.extend_from_slice(&[0, 0, 0, 0, 3, 3, 3, 3]);
        assert_eq!(all(&o, &b), want);
        assert_eq!(*b.data.borrow(), vec![1; 16], "nothing reached the backing");
        // A power cut: the overlay is dropped; the backing is as it was.
        let cut = Overlay::default();
        assert_eq!(all(&cut, &b), vec![1; 16]);
        // fsync: the backing now holds what users saw, and it was synced.
        o.apply(&b, true).unwrap();
        assert!(o.is_empty());
        assert_eq!(*b.data.borrow(), want);
        assert_eq!(*b.syncs.borrow(), 1);
        assert_eq!(all(&o, &b), want);
    }

    #[test]
    fn overlapping_writes_last_one_wins() {
        let b = Mem::default();
        let mut o = Overlay::default();
        o.write(0, &[1; 10], 0);
        o.write(5, &[2; 10], 0);
        o.write(2, &[3; 2], 0);
        o.write(12, &[4; 1], 0);
        o.write(9, &[5; 2], 0); // inside one merged extent
        let mut want = vec![1u8; 15];
        want[5..15].fill(2);
        want[2..4].fill(3);
        want[12] = 4;
        want[9..11].fill(5);
        assert_eq!(all(&o, &b), want);
        assert_eq!(o.extents.len(), 1, "touching writes merge: {:?}", o.extents);
        // Reads of a middle range.
        assert_eq!(o.read(&b, 3, 4).unwrap(), want[3..7].to_vec());
        assert_eq!(o.read(&b, 14, 10).unwrap(), want[14..].to_vec());
        assert_eq!(o.read(&b, 15, 10).unwrap(), Vec::<u8>::new());
        o.apply(&b, false).unwrap();
        assert_eq!(*b.data.borrow(), want);
    }

    #[test]
    fn disjoint_writes_stay_apart_and_a_spanning_write_swallows_them() {
        let b = Mem::default();
        b.set_len(64).unwrap();
        let mut o = Overlay::default();
        o.write(0, &[1; 4], 64);
        o.write(10, &[2; 4], 64);
        o.write(20, &[3; 4], 64);
        assert_eq!(o.extents.len(), 3);
        o.write(2, &[9; 20], 64); // covers the middle one, cuts into both others
        assert_eq!(o.extents.len(), 1);
        let got = all(&o, &b);
        assert_eq!(&got[..2], &[1, 1]);
        assert!(got[2..22].iter().all(|x| *x == 9));
        assert_eq!(&got[22..24], &[3, 3]);
        assert_eq!(got.len(), 64);
        assert_eq!(o.pending_bytes(), 24);
    }

    #[test]
    fn truncate_then_grow_reads_zeros_where_old_data_was() {
        let b = Mem::default();
        b.write_all_at(&[7; 32], 0).unwrap();
        let mut o = Overlay::default();
        o.write(8, &[1; 16], 32);
        o.truncate(12, 32);
        assert_eq!(all(&o, &b), [vec![7; 8], vec![1; 4]].concat());
        o.truncate(20, 32);
        o.write(18, &[2; 1], 32);
        let want = [vec![7; 8], vec![1; 4], vec![0; 6], vec![2], vec![0]].concat();
        assert_eq!(all(&o, &b), want);
        assert_eq!(
            *b.data.borrow(),
            vec![7; 32],
            "the backing is untouched until a sync"
        );
        o.apply(&b, true).unwrap();
        assert_eq!(*b.data.borrow(), want);
    }

    #[test]
    fn a_size_change_alone_is_pending_until_a_sync() {
        let b = Mem::default();
        b.write_all_at(&[5; 8], 0).unwrap();
        let mut o = Overlay::default();
        o.truncate(0, 8);
        assert_eq!(all(&o, &b), Vec::<u8>::new());
        assert!(!o.is_empty());
        o.apply(&b, true).unwrap();
        assert_eq!(b.file_len().unwrap(), 0);
        let mut o = Overlay::default();
        o.truncate(1 << 12, 0); // a new volume sized with set_len
        assert_eq!(o.read(&b, 0, 1 << 13).unwrap(), vec![0; 1 << 12]);
        o.apply(&b, true).unwrap();
        assert_eq!(b.file_len().unwrap(), 1 << 12);
    }

    #[test]
    fn hole_punches_are_unsynced_data_too() {
        let b = Mem::default();
        b.write_all_at(&[3; 16], 0).unwrap();
        let mut o = Overlay::default();
        o.zero(4, 100, false, 16); // KEEP_SIZE: clipped to the length
        assert_eq!(all(&o, &b), [vec![3; 4], vec![0; 12]].concat());
        assert_eq!(o.size(16), 16);
        assert_eq!(*b.data.borrow(), vec![3; 16]);
        o.zero(30, 2, true, 16); // a zeroing that grows the file
        assert_eq!(o.size(16), 32);
        o.apply(&b, true).unwrap();
        assert_eq!(*b.data.borrow(), [vec![3; 4], vec![0; 28]].concat());
    }

    #[test]
    fn matches_a_model_under_random_operations() {
        // A tiny xorshift so the test needs no crate.
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = move |n: u64| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % n
        };
        for _ in 0..200 {
            let b = Mem::default();
            let mut o = Overlay::default();
            let mut model: Vec<u8> = Vec::new(); // what users see
            let mut durable: Vec<u8> = Vec::new(); // what a cut leaves
            for step in 0..60 {
                let base = b.file_len().unwrap();
                match rnd(10) {
                    0..=4 => {
                        let off = rnd(200);
                        let len = rnd(40) as usize + 1;
                        let v = vec![(step + 1) as u8; len];
                        o.write(off, &v, base);
                        let end = off as usize + len;
                        if model.len() < end {
                            model.resize(end, 0);
                        }
                        model[off as usize..end].copy_from_slice(&v);
                    }
                    5 => {
                        let n = rnd(220);
                        o.truncate(n, base);
                        model.resize(n as usize, 0);
                    }
                    6 => {
                        let (off, len) = (rnd(200), rnd(50));
                        o.zero(off, len, false, base);
                        let end = ((off + len) as usize).min(model.len());
                        if (off as usize) < end {
                            model[off as usize..end].fill(0);
                        }
                    }
                    7 => {
                        o.apply(&b, rnd(2) == 0).unwrap();
                        durable = model.clone();
                    }
                    8 => {
                        // A power cut.
                        o = Overlay::default();
                        model = durable.clone();
                    }
                    _ => {
                        let (off, len) = (rnd(240), rnd(64) as usize);
                        let got = o.read(&b, off, len).unwrap();
                        let s = (off as usize).min(model.len());
                        let e = (off as usize + len).min(model.len());
                        assert_eq!(got, model[s..e].to_vec());
                    }
                }
                assert_eq!(all(&o, &b), model, "step {step}");
                assert_eq!(
                    *b.data.borrow(),
                    durable,
                    "step {step}: the backing is durable"
                );
            }
        }
    }
}
