//! The operations of one disk that the server has not yet acknowledged as durable.
//!
//! This queue is the agent's half of the durability contract: an operation leaves it only
//! when a cumulative ack (or a resume point) covers it, so after any connection loss the
//! unacked suffix can be resent in order and nothing is forgotten. It is also the send queue:
//! a disk stream walks it from a cursor instead of owning a copy, which keeps exactly one
//! reference to each payload and makes a resend after reconnect a matter of resetting the
//! cursor.

use std::collections::VecDeque;

use bytes::Bytes;
use slipway_proto::{Frame, Marker, Write, WriteZeroes};

/// What an operation does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    Write { offset: u64, data: Bytes },
    Zeroes { offset: u64, len: u64 },
    Marker { marker_id: u64 },
}

/// An operation with its place in the source's global order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub seq: u64,
    pub kind: OpKind,
    /// Bytes of the shared memory window this op holds until it is released. Usually its
    /// payload length; the last write cut from a chunk buffer also carries the rest of that
    /// buffer, which is freed only when the last slice of it goes.
    pub charge: u64,
}

impl Op {
    /// Bytes of the disk this op rewrites (payload or zero range; nothing for a marker).
    pub fn disk_len(&self) -> u64 {
        match &self.kind {
            OpKind::Write { data, .. } => data.len() as u64,
            OpKind::Zeroes { len, .. } => *len,
            OpKind::Marker { .. } => 0,
        }
    }

    /// Payload bytes carried on the wire (before compression).
    pub fn payload_len(&self) -> u64 {
        match &self.kind {
            OpKind::Write { data, .. } => data.len() as u64,
            _ => 0,
        }
    }

    /// The frame that carries this op on the stream bound to `handle`.
    pub fn frame(&self, handle: u32) -> Frame {
        match &self.kind {
            OpKind::Write { offset, data } => Frame::Write(Write {
                handle,
                seq: self.seq,
                offset: *offset,
                data: data.clone(),
            }),
            OpKind::Zeroes { offset, len } => Frame::WriteZeroes(WriteZeroes {
                handle,
                seq: self.seq,
                offset: *offset,
                len: *len,
            }),
            OpKind::Marker { marker_id } => Frame::Marker(Marker {
                handle,
                seq: self.seq,
                marker_id: *marker_id,
            }),
        }
    }
}

/// What a release took out of the queue.
#[derive(Debug, Default)]
pub struct Released {
    pub ops: Vec<Op>,
    /// Window bytes to give back.
    pub charge: u64,
}

/// Unacked operations of one disk, in increasing sequence order.
#[derive(Debug, Default)]
pub struct Retained {
    ops: VecDeque<Op>,
    charge: u64,
    disk_bytes: u64,
}

impl Retained {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an op. Sequence numbers must increase.
    pub fn push(&mut self, op: Op) {
        debug_assert!(!matches!(self.ops.back(), Some(b) if b.seq >= op.seq));
        self.charge += op.charge;
        self.disk_bytes += op.disk_len();
        self.ops.push_back(op);
    }

    /// Takes out every op with `seq <= upto` (a cumulative ack or a resume point).
    pub fn release(&mut self, upto: u64) -> Released {
        let n = self.ops.partition_point(|o| o.seq <= upto);
        let mut r = Released {
            ops: Vec::with_capacity(n),
            charge: 0,
        };
        for op in self.ops.drain(..n) {
            r.charge += op.charge;
            self.disk_bytes -= op.disk_len();
            r.ops.push(op);
        }
        self.charge -= r.charge;
        r
    }

    /// Forgets everything (a pass restarts from scratch). Returns the window bytes freed.
    pub fn clear(&mut self) -> u64 {
        self.ops.clear();
        self.disk_bytes = 0;
        std::mem::take(&mut self.charge)
    }

    /// Forgets every write and zero range, and the markers up to `durable` (a pass restarts
    /// from scratch; markers carry no data and stay). Returns the window bytes freed.
    pub fn clear_keeping_markers(&mut self, durable: u64) -> u64 {
        self.ops
            .retain(|o| matches!(o.kind, OpKind::Marker { .. }) && o.seq > durable);
        self.disk_bytes = 0;
        std::mem::take(&mut self.charge)
    }

    /// Copies (cheaply: payloads are shared) up to `max` ops with `seq > after` into `out`.
    pub fn after(&self, after: u64, max: usize, out: &mut Vec<Op>) {
        let start = self.ops.partition_point(|o| o.seq <= after);
        out.extend(self.ops.range(start..).take(max).cloned());
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn first_seq(&self) -> Option<u64> {
        self.ops.front().map(|o| o.seq)
    }

    pub fn last_seq(&self) -> Option<u64> {
        self.ops.back().map(|o| o.seq)
    }

    /// Window bytes held.
    pub fn charge(&self) -> u64 {
        self.charge
    }

    /// Disk bytes still to be made durable (payloads and zero ranges).
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    /// Largest write payload held.
    pub fn max_payload(&self) -> u64 {
        self.ops.iter().map(Op::payload_len).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(seq: u64, len: usize) -> Op {
        Op {
            seq,
            kind: OpKind::Write {
                offset: seq * 4096,
                data: Bytes::from(vec![1u8; len]),
            },
            charge: len as u64,
        }
    }

    fn z(seq: u64, len: u64) -> Op {
        Op {
            seq,
            kind: OpKind::Zeroes { offset: 0, len },
            charge: 0,
        }
    }

    fn m(seq: u64) -> Op {
        Op {
            seq,
            kind: OpKind::Marker { marker_id: 9 },
            charge: 0,
        }
    }

    fn seqs(r: &Retained) -> Vec<u64> {
        let mut v = vec![];
        r.after(0, usize::MAX, &mut v);
        v.iter().map(|o| o.seq).collect()
    }

    #[test]
    fn release_on_cumulative_ack() {
        let mut r = Retained::new();
        r.push(w(2, 100));
        r.push(z(5, 1000));
        r.push(m(6));
        r.push(w(9, 50));
        assert_eq!(r.charge(), 150);
        assert_eq!(r.disk_bytes(), 1150);
        // Acks name any seq, not only ones of this disk: 4 releases 2.
        let rel = r.release(4);
        assert_eq!(rel.ops.len(), 1);
        assert_eq!(rel.charge, 100);
        assert_eq!(seqs(&r), vec![5, 6, 9]);
        // An old ack releases nothing.
        assert_eq!(r.release(3).ops.len(), 0);
        let rel = r.release(6);
        assert_eq!(
            rel.ops.iter().map(|o| o.seq).collect::<Vec<_>>(),
            vec![5, 6]
        );
        assert_eq!(rel.charge, 0);
        assert_eq!(r.disk_bytes(), 50);
        let rel = r.release(u64::MAX);
        assert_eq!(rel.charge, 50);
        assert!(r.is_empty());
        assert_eq!(r.charge(), 0);
        assert_eq!(r.disk_bytes(), 0);
    }

    #[test]
    fn resume_drops_what_is_durable_and_resends_the_rest_in_order() {
        let mut r = Retained::new();
        for s in [3, 4, 7, 8, 10] {
            r.push(w(s, 10));
        }
        // The server says 7 is durable: 3, 4, 7 go, 8 and 10 are resent.
        r.release(7);
        let mut out = vec![];
        r.after(0, usize::MAX, &mut out);
        assert_eq!(out.iter().map(|o| o.seq).collect::<Vec<_>>(), vec![8, 10]);
        assert_eq!(r.charge(), 20);
    }

    #[test]
    fn cursor_walks_in_batches() {
        let mut r = Retained::new();
        for s in 1..=5 {
            r.push(w(s, 1));
        }
        let mut out = vec![];
        r.after(0, 2, &mut out);
        assert_eq!(out.iter().map(|o| o.seq).collect::<Vec<_>>(), vec![1, 2]);
        out.clear();
        r.after(2, 2, &mut out);
        assert_eq!(out.iter().map(|o| o.seq).collect::<Vec<_>>(), vec![3, 4]);
        out.clear();
        r.after(5, 2, &mut out);
        assert!(out.is_empty());
        // Shared payloads, not copies.
        let mut a = vec![];
        r.after(0, 1, &mut a);
        let mut b = vec![];
        r.after(0, 1, &mut b);
        let (OpKind::Write { data: x, .. }, OpKind::Write { data: y, .. }) =
            (&a[0].kind, &b[0].kind)
        else {
            panic!()
        };
        assert_eq!(x.as_ptr(), y.as_ptr());
    }

    #[test]
    fn clear_returns_the_window() {
        let mut r = Retained::new();
        r.push(w(1, 10));
        r.push(w(2, 20));
        assert_eq!(r.max_payload(), 20);
        assert_eq!(r.clear(), 30);
        assert!(r.is_empty());
        assert_eq!(r.charge(), 0);
        assert_eq!(r.first_seq(), None);
    }

    #[test]
    fn a_restart_keeps_only_undelivered_markers() {
        let mut r = Retained::new();
        r.push(m(1));
        r.push(w(2, 10));
        r.push(m(3));
        r.push(z(4, 512));
        assert_eq!(r.clear_keeping_markers(1), 10);
        assert_eq!(seqs(&r), vec![3]);
        assert_eq!((r.charge(), r.disk_bytes()), (0, 0));
    }

    #[test]
    fn frames_carry_the_handle_and_seq() {
        match w(4, 8).frame(3) {
            Frame::Write(f) => {
                assert_eq!(
                    (f.handle, f.seq, f.offset, f.data.len()),
                    (3, 4, 4 * 4096, 8)
                )
            }
            f => panic!("{f:?}"),
        }
        assert_eq!(
            m(6).frame(3),
            Frame::Marker(Marker {
                handle: 3,
                seq: 6,
                marker_id: 9
            })
        );
        assert_eq!(
            z(5, 512).frame(1),
            Frame::WriteZeroes(WriteZeroes {
                handle: 1,
                seq: 5,
                offset: 0,
                len: 512
            })
        );
    }
}
