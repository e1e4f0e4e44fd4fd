//! Turning chunks read from a disk into write operations.
//!
//! This is where bandwidth is won or lost: a fresh replica volume is already all zero, so a
//! first pass that skips zero blocks sends only what is allocated; a volume of unknown content
//! must be overwritten everywhere, but a zero range of any length costs one small frame. The
//! planner is pure (bytes in, operations out) so the coalescing rules are unit-tested, and it
//! slices the chunk's [`Bytes`] rather than copying it when most of the chunk is sent.

use bytes::Bytes;

/// One operation for the wire, before it has a sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlannedOp {
    Write { offset: u64, data: Bytes },
    Zeroes { offset: u64, len: u64 },
}

impl PlannedOp {
    /// Payload bytes held in memory (zero for `Zeroes`).
    pub fn data_len(&self) -> u64 {
        match self {
            PlannedOp::Write { data, .. } => data.len() as u64,
            PlannedOp::Zeroes { .. } => 0,
        }
    }
}

/// What the replica volume is known to hold before a pass, which decides what zero blocks
/// cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroPolicy {
    /// The volume is all zero: zero blocks are skipped.
    Skip,
    /// The volume may hold anything: zero runs are sent as `WriteZeroes`, coalesced across
    /// chunks while they are contiguous.
    Send,
    /// Follow mode, where only changed chunks are planned: a chunk goes whole, as one
    /// `WriteZeroes` if it is now all zero, else as writes of all of it. One large op per
    /// change is cheaper for the server than many small ones, and LZ4 makes the zero blocks
    /// inside a write nearly free on the wire.
    WholeChunk,
}

/// Whether every byte is zero. Word-at-a-time so it runs at memory speed on zero data and
/// stops at the first non-zero word on real data.
pub fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(64);
    for c in &mut words {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            let mut x = [0u8; 8];
            x.copy_from_slice(w);
            acc |= u64::from_ne_bytes(x);
        }
        if acc != 0 {
            return false;
        }
    }
    words.remainder().iter().all(|&x| x == 0)
}

/// Plans the operations for consecutive chunks of one pass.
///
/// Feed chunks with [`Planner::chunk`], in increasing offset order; call [`Planner::finish`]
/// at the end of the pass. With [`ZeroPolicy::Send`] a zero run that reaches the end of a
/// chunk is held back so the next chunk can extend it; `finish` (or the next operation at
/// another offset) releases it, so operations always come out in increasing offset order.
#[derive(Debug)]
pub struct Planner {
    block: usize,
    zeroes: ZeroPolicy,
    /// Zero run not yet emitted: (offset, len).
    pending_zero: Option<(u64, u64)>,
}

impl Planner {
    /// `block_size` is the unit of zero detection; every chunk is a whole number of blocks
    /// (a short last block is treated as a block of its own).
    pub fn new(block_size: u32, zeroes: ZeroPolicy) -> Self {
        Planner {
            block: block_size.max(1) as usize,
            zeroes,
            pending_zero: None,
        }
    }

    /// Plans `data`, read at `offset`, appending to `out`. No write payload is longer than
    /// `max_write` (rounded down to whole blocks, at least one block).
    ///
    /// Payloads are slices of `data` when they make up most of it; when only a little of the
    /// chunk is sent they are copied out, so that retaining a few blocks does not pin the
    /// whole chunk buffer in memory. Returns whether the new writes share `data`'s buffer
    /// (which then lives as long as the last of them).
    pub fn chunk(
        &mut self,
        offset: u64,
        data: &Bytes,
        max_write: usize,
        out: &mut Vec<PlannedOp>,
    ) -> bool {
        let max_write = (max_write / self.block * self.block).max(self.block);
        let first = out.len();
        if self.zeroes == ZeroPolicy::WholeChunk {
            if is_zero(data) {
                self.zero_run(offset, data.len() as u64, out);
                return false;
            }
            self.flush(out);
            self.writes(offset, data, 0, data.len(), max_write, out);
            return true;
        }
        let mut pos = 0;
        while pos < data.len() {
            let zero = is_zero(&data[pos..(pos + self.block).min(data.len())]);
            let mut end = (pos + self.block).min(data.len());
            while end < data.len() {
                let next = (end + self.block).min(data.len());
                if is_zero(&data[end..next]) != zero {
                    break;
                }
                end = next;
            }
            if zero {
                self.zero_run(offset + pos as u64, (end - pos) as u64, out);
            } else {
                self.flush(out);
                self.writes(offset, data, pos, end, max_write, out);
            }
            pos = end;
        }
        let sent: usize = out[first..].iter().map(|o| o.data_len() as usize).sum();
        if sent == 0 {
            return false;
        }
        if sent <= data.len() / 2 {
            for op in &mut out[first..] {
                if let PlannedOp::Write { data, .. } = op {
                    *data = Bytes::copy_from_slice(data);
                }
            }
            return false;
        }
        true
    }

    /// Writes of `data[start..end]`, at most `max_write` each.
    fn writes(
        &self,
        offset: u64,
        data: &Bytes,
        start: usize,
        end: usize,
        max_write: usize,
        out: &mut Vec<PlannedOp>,
    ) {
        let mut s = start;
        while s < end {
            let e = (s + max_write).min(end);
            out.push(PlannedOp::Write {
                offset: offset + s as u64,
                data: data.slice(s..e),
            });
            s = e;
        }
    }

    /// Ends the pass (or a contiguous stretch of it): emits the held-back zero run, if any.
    pub fn finish(&mut self, out: &mut Vec<PlannedOp>) {
        self.flush(out);
    }

    fn zero_run(&mut self, offset: u64, len: u64, out: &mut Vec<PlannedOp>) {
        if self.zeroes == ZeroPolicy::Skip {
            return;
        }
        match &mut self.pending_zero {
            Some((o, l)) if *o + *l == offset => *l += len,
            _ => {
                self.flush(out);
                self.pending_zero = Some((offset, len));
            }
        }
    }

    fn flush(&mut self, out: &mut Vec<PlannedOp>) {
        if let Some((offset, len)) = self.pending_zero.take() {
            out.push(PlannedOp::Zeroes { offset, len });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: usize = 512;

    /// A chunk from a pattern: one char per block, '0' zero, anything else non-zero.
    fn chunk(pattern: &str) -> Bytes {
        let mut v = Vec::new();
        for c in pattern.chars() {
            let fill = if c == '0' { 0u8 } else { c as u8 };
            v.resize(v.len() + B, fill);
        }
        Bytes::from(v)
    }

    /// Ops as (kind, offset in blocks, length in blocks).
    fn shape(ops: &[PlannedOp]) -> Vec<(char, u64, u64)> {
        ops.iter()
            .map(|o| match o {
                PlannedOp::Write { offset, data } => {
                    ('W', offset / B as u64, data.len() as u64 / B as u64)
                }
                PlannedOp::Zeroes { offset, len } => ('Z', offset / B as u64, len / B as u64),
            })
            .collect()
    }

    fn plan(policy: ZeroPolicy, chunks: &[&str], max_write: usize) -> Vec<(char, u64, u64)> {
        let mut p = Planner::new(B as u32, policy);
        let mut out = vec![];
        let mut off = 0;
        for c in chunks {
            let data = chunk(c);
            p.chunk(off, &data, max_write, &mut out);
            off += data.len() as u64;
        }
        p.finish(&mut out);
        shape(&out)
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4096]));
        for i in [0, 7, 63, 64, 100, 4095] {
            let mut v = vec![0u8; 4096];
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
        }
        let mut v = vec![0u8; 77];
        assert!(is_zero(&v));
        v[76] = 9;
        assert!(!is_zero(&v));
    }

    #[test]
    fn fresh_skips_zero_blocks_and_coalesces_data() {
        assert_eq!(
            plan(ZeroPolicy::Skip, &["aa0bb", "b00cc"], 1 << 20),
            vec![('W', 0, 2), ('W', 3, 2), ('W', 5, 1), ('W', 8, 2)]
        );
        assert_eq!(plan(ZeroPolicy::Skip, &["0000", "0000"], 1 << 20), vec![]);
    }

    #[test]
    fn fresh_data_runs_do_not_cross_chunks() {
        // Each chunk is its own buffer; a run never spans two.
        assert_eq!(
            plan(ZeroPolicy::Skip, &["aaaa", "aaaa"], 1 << 20),
            vec![('W', 0, 4), ('W', 4, 4)]
        );
    }

    #[test]
    fn resync_sends_every_range_and_coalesces_zeroes_across_chunks() {
        assert_eq!(
            plan(ZeroPolicy::Send, &["a000", "0000", "00bb", "0000"], 1 << 20),
            vec![('W', 0, 1), ('Z', 1, 9), ('W', 10, 2), ('Z', 12, 4)]
        );
        assert_eq!(
            plan(ZeroPolicy::Send, &["0000", "0000"], 1 << 20),
            vec![('Z', 0, 8)]
        );
    }

    #[test]
    fn resync_covers_the_whole_range_in_order() {
        let shapes = plan(ZeroPolicy::Send, &["a0b0", "0c00", "dd0e", "0000"], 1 << 20);
        let mut next = 0;
        for (_, off, len) in &shapes {
            assert_eq!(*off, next, "{shapes:?}");
            next += len;
        }
        assert_eq!(next, 16);
        // Adjacent ops alternate: a zero run is never split, nor a data run inside a chunk.
        for w in shapes.windows(2) {
            assert_ne!(w[0].0, w[1].0, "{shapes:?}");
        }
    }

    #[test]
    fn writes_are_split_at_max_write_rounded_to_blocks() {
        assert_eq!(
            plan(ZeroPolicy::Skip, &["aaaaa"], 2 * B + 100),
            vec![('W', 0, 2), ('W', 2, 2), ('W', 4, 1)]
        );
        // A limit below one block still makes progress, one block at a time.
        assert_eq!(
            plan(ZeroPolicy::Skip, &["aa"], 10),
            vec![('W', 0, 1), ('W', 1, 1)]
        );
        // Zero runs have no length limit.
        assert_eq!(plan(ZeroPolicy::Send, &["00000"], B), vec![('Z', 0, 5)]);
    }

    #[test]
    fn non_contiguous_chunks_do_not_merge_zero_runs() {
        // Follow mode plans only changed chunks; a gap ends the held-back zero run.
        let mut p = Planner::new(B as u32, ZeroPolicy::Send);
        let mut out = vec![];
        p.chunk(0, &chunk("00"), 1 << 20, &mut out);
        p.chunk(10 * B as u64, &chunk("00"), 1 << 20, &mut out);
        p.finish(&mut out);
        assert_eq!(shape(&out), vec![('Z', 0, 2), ('Z', 10, 2)]);
    }

    #[test]
    fn changed_chunks_go_whole() {
        // Follow mode: one write for a chunk with data (zero blocks included), one zero op
        // for a chunk that is now all zero, coalesced with an adjacent one.
        assert_eq!(
            plan(
                ZeroPolicy::WholeChunk,
                &["a0b0", "0000", "0000", "00c0"],
                1 << 20
            ),
            vec![('W', 0, 4), ('Z', 4, 8), ('W', 12, 4)]
        );
        assert_eq!(
            plan(ZeroPolicy::WholeChunk, &["aaaa"], 2 * B),
            vec![('W', 0, 2), ('W', 2, 2)]
        );
        let mut p = Planner::new(B as u32, ZeroPolicy::WholeChunk);
        let mut out = vec![];
        p.chunk(0, &chunk("00"), 1 << 20, &mut out);
        p.chunk(10 * B as u64, &chunk("00"), 1 << 20, &mut out);
        p.finish(&mut out);
        assert_eq!(shape(&out), vec![('Z', 0, 2), ('Z', 10, 2)]);
    }

    #[test]
    fn payloads_match_the_source_bytes() {
        let data = chunk("a0bc");
        let mut p = Planner::new(B as u32, ZeroPolicy::Skip);
        let mut out = vec![];
        p.chunk(4096, &data, 1 << 20, &mut out);
        for op in &out {
            let PlannedOp::Write { offset, data: d } = op else {
                panic!()
            };
            let s = (*offset - 4096) as usize;
            assert_eq!(&d[..], &data[s..s + d.len()]);
        }
    }

    #[test]
    fn mostly_sent_chunks_share_the_buffer_sparse_ones_copy() {
        let data = chunk("aaa0");
        let mut p = Planner::new(B as u32, ZeroPolicy::Skip);
        let mut out = vec![];
        assert!(p.chunk(0, &data, 1 << 20, &mut out));
        let PlannedOp::Write { data: d, .. } = &out[0] else {
            panic!()
        };
        assert_eq!(d.as_ptr(), data.as_ptr(), "sliced, not copied");

        let data = chunk("a000");
        let mut out = vec![];
        assert!(!p.chunk(0, &data, 1 << 20, &mut out));
        let PlannedOp::Write { data: d, .. } = &out[0] else {
            panic!()
        };
        assert_ne!(
            d.as_ptr(),
            data.as_ptr(),
            "copied out of a mostly-empty chunk"
        );
        assert_eq!(&d[..], &data[..B]);
    }

    #[test]
    fn short_last_block() {
        let mut v = vec![0u8; B + 100];
        v[B + 50] = 1;
        let data = Bytes::from(v);
        let mut p = Planner::new(B as u32, ZeroPolicy::Send);
        let mut out = vec![];
        p.chunk(0, &data, 1 << 20, &mut out);
        p.finish(&mut out);
        assert_eq!(
            out,
            vec![
                PlannedOp::Zeroes {
                    offset: 0,
                    len: B as u64
                },
                PlannedOp::Write {
                    offset: B as u64,
                    data: data.slice(B..)
                }
            ]
        );
    }
}
