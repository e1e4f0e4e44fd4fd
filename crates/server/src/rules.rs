//! The session's rules, as plain functions over plain state: what a connection may open, how a
//! disk resumes, which frames a stream accepts, when an ack goes out. No sockets, no clocks, no
//! files (the style of quinn-proto and the agent's `state.rs`), so every rule is unit- and
//! property-tested here; `session.rs` does only the I/O around them.
//!
//! Each check answers with the typed error frame the peer receives. Nothing refused here is
//! ever written: the session applies an op only after its frame was accepted.

use slipway_proto::{Ack, DiskOpen, ErrorCode, ErrorFrame, Frame, ResumeKind};

/// Smallest chunk a checksum resync may ask hashes for.
pub const MIN_HASH_CHUNK: u64 = 256 << 10;
/// Largest chunk a checksum resync may ask hashes for.
pub const MAX_HASH_CHUNK: u64 = 64 << 20;

/// Checks a DiskOpen on its own and against the disks the connection already has open
/// (`open`, by disk id): a valid id, a power-of-two block size in 512..=65536, a size that is a
/// positive multiple of it, the per-connection limit, and no disk twice.
pub fn check_open(d: &DiskOpen, open: &[&str], max_disks: u32) -> Result<(), ErrorFrame> {
    let invalid = |m: String| ErrorFrame::new(ErrorCode::InvalidArgument, m);
    if !slipway_proto::valid_id(&d.disk_id) {
        return Err(invalid(format!(
            "disk id {:?} is not valid (1-128 of A-Z a-z 0-9 . _ -)",
            d.disk_id
        )));
    }
    if !d.block_size.is_power_of_two() || !(512..=65536).contains(&d.block_size) {
        return Err(invalid(format!(
            "block size {} is not a power of two in 512..=65536",
            d.block_size
        )));
    }
    if d.size == 0 || !d.size.is_multiple_of(u64::from(d.block_size)) {
        return Err(invalid(format!(
            "disk size {} is not a positive multiple of the block size {}",
            d.size, d.block_size
        )));
    }
    if open.len() >= max_disks as usize {
        return Err(ErrorFrame::new(
            ErrorCode::Limit,
            format!("a connection may open at most {max_disks} disks"),
        ));
    }
    if open.contains(&d.disk_id.as_str()) {
        return Err(invalid(format!("disk {} is already open", d.disk_id)));
    }
    Ok(())
}

/// What the server holds of a disk it has seen before (its metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known {
    pub size: u64,
    pub block_size: u32,
    /// The agent run that wrote it last.
    pub agent_run: u64,
}

/// A disk known with another shape is refused: a source disk that changed size or block size
/// is a different disk, and its volume must not be overwritten by accident.
pub fn check_shape(known: Option<&Known>, d: &DiskOpen) -> Result<(), ErrorFrame> {
    match known {
        Some(k) if k.size != d.size || k.block_size != d.block_size => Err(ErrorFrame::new(
            ErrorCode::DiskMismatch,
            format!(
                "disk {} exists with {} bytes and block size {}, not {} and {}",
                d.disk_id, k.size, k.block_size, d.size, d.block_size
            ),
        )),
        _ => Ok(()),
    }
}

/// How an opened disk continues:
/// - a volume created just now is `Fresh` (all zero: the agent skips zero ranges);
/// - the same agent run over a volume it wrote, that matches its metadata, `Resume`s from the
///   durable position (the agent resends only what was not acked);
/// - anything else — a new agent run, a volume that does not match its metadata (`distrust`),
///   a volume without metadata — is a `Resync`: the agent compares checksums and sends what
///   differs.
pub fn resume_kind(known: Option<&Known>, created: bool, distrust: bool, run: u64) -> ResumeKind {
    match known {
        _ if created => ResumeKind::Fresh,
        Some(_) if distrust => ResumeKind::Resync,
        Some(k) if k.agent_run == run => ResumeKind::Resume,
        _ => ResumeKind::Resync,
    }
}

/// An op a disk stream accepted, ready for the applier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    Write { seq: u64, offset: u64, len: u64 },
    Zeroes { seq: u64, offset: u64, len: u64 },
    Marker { seq: u64, marker_id: u64 },
}

impl Accepted {
    pub fn seq(&self) -> u64 {
        match *self {
            Accepted::Write { seq, .. } | Accepted::Zeroes { seq, .. } => seq,
            Accepted::Marker { seq, .. } => seq,
        }
    }
}

/// The rules of one disk stream: its handle, the disk's bounds, strictly increasing
/// sequences from the position durable at open.
#[derive(Debug, Clone)]
pub struct StreamRules {
    pub handle: u32,
    pub size: u64,
    pub block_size: u32,
    pub max_write: u32,
    /// Highest sequence accepted (the durable position at open before any).
    pub last_seq: u64,
}

impl StreamRules {
    /// Checks one frame read from the stream; on `Ok` the sequence advances. The first refusal
    /// ends the stream (the session answers it and stops reading).
    pub fn on_frame(&mut self, frame: &Frame) -> Result<Accepted, ErrorFrame> {
        let h = self.handle;
        let (handle, accepted) = match frame {
            Frame::Write(w) => (
                w.handle,
                Accepted::Write {
                    seq: w.seq,
                    offset: w.offset,
                    len: w.data.len() as u64,
                },
            ),
            Frame::WriteZeroes(z) => (
                z.handle,
                Accepted::Zeroes {
                    seq: z.seq,
                    offset: z.offset,
                    len: z.len,
                },
            ),
            Frame::Marker(m) => (
                m.handle,
                Accepted::Marker {
                    seq: m.seq,
                    marker_id: m.marker_id,
                },
            ),
            other => {
                return Err(ErrorFrame::for_disk(
                    ErrorCode::Malformed,
                    h,
                    format!("{:?} is not allowed on a disk stream", other.frame_type()),
                ))
            }
        };
        if handle != h {
            return Err(ErrorFrame::for_disk(
                ErrorCode::UnknownDisk,
                h,
                format!("frame names handle {handle} on the stream of handle {h}"),
            ));
        }
        let seq = accepted.seq();
        if seq <= self.last_seq {
            return Err(ErrorFrame::for_disk(
                ErrorCode::BadSequence,
                h,
                format!("sequence {seq} is not above {}", self.last_seq),
            ));
        }
        match accepted {
            Accepted::Write { offset, len, .. } => {
                self.check_range(offset, len)?;
                if len > u64::from(self.max_write) {
                    return Err(ErrorFrame::for_disk(
                        ErrorCode::TooLarge,
                        h,
                        format!("write of {len} bytes exceeds max_write {}", self.max_write),
                    ));
                }
            }
            Accepted::Zeroes { offset, len, .. } => self.check_range(offset, len)?,
            Accepted::Marker { .. } => {}
        }
        self.last_seq = seq;
        Ok(accepted)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), ErrorFrame> {
        let h = self.handle;
        let bs = u64::from(self.block_size);
        if len == 0 || !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(ErrorFrame::for_disk(
                ErrorCode::Misaligned,
                h,
                format!(
                    "write of {len} bytes at {offset} is not a non-empty multiple of the block size {bs}"
                ),
            ));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(ErrorFrame::for_disk(
                ErrorCode::OutOfBounds,
                h,
                format!(
                    "write of {len} bytes at {offset} ends past the disk's {} bytes",
                    self.size
                ),
            )),
        }
    }
}

/// When a disk stream's acks go out: cumulative, only forward, only for durable sequences;
/// after the agent ended its side cleanly, until everything it sent is acked.
#[derive(Debug, Clone)]
pub struct AckRules {
    handle: u32,
    sent: u64,
    drain_to: Option<u64>,
}

impl AckRules {
    /// Starts at the position durable when the disk was opened (already known to the agent).
    pub fn new(handle: u32, durable_at_open: u64) -> Self {
        AckRules {
            handle,
            sent: durable_at_open,
            drain_to: None,
        }
    }

    /// The applier says `seq` is durable: the ack to send, if it moves forward.
    pub fn on_durable(&mut self, seq: u64) -> Option<Ack> {
        (seq > self.sent).then(|| {
            self.sent = seq;
            Ack {
                handle: self.handle,
                seq,
            }
        })
    }

    /// The agent finished its side after sending up to `last`.
    pub fn on_reader_end(&mut self, last: u64) {
        self.drain_to = Some(last);
    }

    /// Everything the agent sent is acked after its clean end: finish the stream.
    pub fn done(&self) -> bool {
        self.drain_to.is_some_and(|last| self.sent >= last)
    }
}

/// Which frames the control stream accepts after the handshake (agent → server); anything
/// else closes the connection with `Malformed`.
pub fn check_control(frame: &Frame) -> Result<(), ErrorFrame> {
    match frame {
        Frame::DiskOpen(_)
        | Frame::Progress(_)
        | Frame::HashRequest(_)
        | Frame::TrackingNote(_)
        | Frame::MarkerNote(_)
        | Frame::Heartbeat(_) => Ok(()),
        other => Err(ErrorFrame::new(
            ErrorCode::Malformed,
            format!(
                "{:?} is not allowed on the control stream",
                other.frame_type()
            ),
        )),
    }
}

/// A checksum resync's chunk: a multiple of the disk's block size, 256 KiB to 64 MiB (at most
/// 32 MiB of hashes for a TiB, queued if the agent does not read them).
pub fn check_hash_chunk(handle: u32, chunk: u64, block_size: u32) -> Result<(), ErrorFrame> {
    if chunk < MIN_HASH_CHUNK
        || !chunk.is_multiple_of(u64::from(block_size))
        || chunk > MAX_HASH_CHUNK
    {
        return Err(ErrorFrame::for_disk(
            ErrorCode::InvalidArgument,
            handle,
            format!(
                "hash chunk size {chunk} must be a multiple of the block size {block_size}, at least 256 KiB and at most 64 MiB"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;
    use slipway_proto::{Marker, Write, WriteZeroes};

    fn open(id: &str, size: u64, bs: u32) -> DiskOpen {
        DiskOpen {
            request_id: 1,
            disk_id: id.into(),
            size,
            block_size: bs,
        }
    }

    #[test]
    fn open_checks() {
        assert!(check_open(&open("sda", 1 << 20, 512), &[], 4).is_ok());
        let code = |d: &DiskOpen, o: &[&str]| check_open(d, o, 2).unwrap_err().code;
        assert_eq!(
            code(&open("a b", 4096, 512), &[]),
            ErrorCode::InvalidArgument
        );
        assert_eq!(code(&open("", 4096, 512), &[]), ErrorCode::InvalidArgument);
        assert_eq!(
            code(&open("d", 4096, 1000), &[]),
            ErrorCode::InvalidArgument
        );
        assert_eq!(code(&open("d", 4096, 256), &[]), ErrorCode::InvalidArgument);
        assert_eq!(
            code(&open("d", 4096, 1 << 17), &[]),
            ErrorCode::InvalidArgument
        );
        assert_eq!(code(&open("d", 0, 512), &[]), ErrorCode::InvalidArgument);
        assert_eq!(code(&open("d", 4000, 512), &[]), ErrorCode::InvalidArgument);
        assert_eq!(
            code(&open("d", 4096, 512), &["d"]),
            ErrorCode::InvalidArgument
        );
        assert_eq!(code(&open("d", 4096, 512), &["a", "b"]), ErrorCode::Limit);
        assert!(check_open(&open("d", 4096, 512), &["a"], 2).is_ok());
    }

    #[test]
    fn shape_checks() {
        let k = Known {
            size: 1 << 20,
            block_size: 512,
            agent_run: 7,
        };
        assert!(check_shape(None, &open("d", 4096, 4096)).is_ok());
        assert!(check_shape(Some(&k), &open("d", 1 << 20, 512)).is_ok());
        for d in [open("d", 2 << 20, 512), open("d", 1 << 20, 4096)] {
            assert_eq!(
                check_shape(Some(&k), &d).unwrap_err().code,
                ErrorCode::DiskMismatch
            );
        }
    }

    /// Every combination of the resume inputs, against the rule written out in full.
    #[test]
    fn resume_decision_exhaustive() {
        let run = 9;
        for known in [
            None,
            Some(Known {
                size: 4096,
                block_size: 512,
                agent_run: run,
            }),
            Some(Known {
                size: 4096,
                block_size: 512,
                agent_run: run + 1,
            }),
        ] {
            for created in [false, true] {
                for distrust in [false, true] {
                    let got = resume_kind(known.as_ref(), created, distrust, run);
                    let want = if created {
                        ResumeKind::Fresh
                    } else if known.is_some_and(|k| k.agent_run == run) && !distrust {
                        ResumeKind::Resume
                    } else {
                        ResumeKind::Resync
                    };
                    assert_eq!(got, want, "{known:?} created={created} distrust={distrust}");
                }
            }
        }
    }

    fn rules(last: u64) -> StreamRules {
        StreamRules {
            handle: 3,
            size: 1 << 20,
            block_size: 512,
            max_write: 64 << 10,
            last_seq: last,
        }
    }

    fn write(handle: u32, seq: u64, offset: u64, len: usize) -> Frame {
        Frame::Write(Write {
            handle,
            seq,
            offset,
            data: Bytes::from(vec![1u8; len]),
        })
    }

    #[test]
    fn stream_refusals_are_typed() {
        let code = |f: Frame| rules(10).on_frame(&f).unwrap_err().code;
        assert_eq!(code(write(4, 11, 0, 512)), ErrorCode::UnknownDisk);
        assert_eq!(code(write(3, 10, 0, 512)), ErrorCode::BadSequence);
        assert_eq!(code(write(3, 11, 100, 512)), ErrorCode::Misaligned);
        assert_eq!(code(write(3, 11, 0, 500)), ErrorCode::Misaligned);
        assert_eq!(code(write(3, 11, 0, 0)), ErrorCode::Misaligned);
        assert_eq!(
            code(write(3, 11, (1 << 20) - 512, 1024)),
            ErrorCode::OutOfBounds
        );
        assert_eq!(code(write(3, 11, 0, 128 << 10)), ErrorCode::TooLarge);
        let zeroes = |offset, len| {
            Frame::WriteZeroes(WriteZeroes {
                handle: 3,
                seq: 11,
                offset,
                len,
            })
        };
        assert_eq!(code(zeroes(u64::MAX - 511, 512)), ErrorCode::OutOfBounds);
        assert_eq!(code(zeroes(0, 0)), ErrorCode::Misaligned);
        // A zero range may be as large as the disk; a marker has no range.
        assert!(rules(10).on_frame(&zeroes(0, 1 << 20)).is_ok());
        assert_eq!(code(Frame::Heartbeat(1)), ErrorCode::Malformed);
        let m = Frame::Marker(Marker {
            handle: 3,
            seq: 11,
            marker_id: 5,
        });
        assert_eq!(
            rules(10).on_frame(&m).unwrap(),
            Accepted::Marker {
                seq: 11,
                marker_id: 5
            }
        );
    }

    #[test]
    fn control_frames() {
        assert!(check_control(&Frame::Heartbeat(1)).is_ok());
        assert_eq!(
            check_control(&write(1, 1, 0, 512)).unwrap_err().code,
            ErrorCode::Malformed
        );
        assert!(check_hash_chunk(1, 1 << 20, 4096).is_ok());
        for (chunk, bs) in [(128 << 10, 512), ((1 << 20) + 512, 4096), (128 << 20, 512)] {
            assert_eq!(
                check_hash_chunk(1, chunk, bs).unwrap_err().code,
                ErrorCode::InvalidArgument
            );
        }
    }

    proptest! {
        /// Sequencing: a stream accepts a frame exactly when its sequence is above every one
        /// accepted before (and above the durable position at open), whatever the order the
        /// peer sends them in; what it accepts is strictly increasing.
        #[test]
        fn sequences_accepted_iff_strictly_increasing(
            start in 0u64..1000,
            seqs in proptest::collection::vec(0u64..1100, 0..64),
        ) {
            let mut r = rules(start);
            let mut model = start;
            let mut accepted = vec![];
            for s in seqs {
                let got = r.on_frame(&write(3, s, 0, 512));
                if s > model {
                    prop_assert!(got.is_ok());
                    model = s;
                    accepted.push(s);
                } else {
                    prop_assert_eq!(got.unwrap_err().code, ErrorCode::BadSequence);
                }
                prop_assert_eq!(r.last_seq, model);
            }
            prop_assert!(accepted.windows(2).all(|w| w[0] < w[1]));
        }

        /// Bounds: an accepted write or zero range lies wholly inside the disk, aligned.
        #[test]
        fn accepted_ranges_are_inside_the_disk(
            offset in 0u64..(1 << 21),
            len in 0u64..(1 << 17),
            zero in any::<bool>(),
        ) {
            let mut r = rules(0);
            let f = if zero {
                Frame::WriteZeroes(WriteZeroes { handle: 3, seq: 1, offset, len })
            } else {
                write(3, 1, offset, len as usize)
            };
            if let Ok(a) = r.on_frame(&f) {
                let (o, l) = match a {
                    Accepted::Write { offset, len, .. } | Accepted::Zeroes { offset, len, .. } => (offset, len),
                    Accepted::Marker { .. } => unreachable!(),
                };
                prop_assert!(l > 0 && o % 512 == 0 && l % 512 == 0);
                prop_assert!(o + l <= 1 << 20);
                prop_assert!(zero || l <= 64 << 10);
            }
        }

        /// Acks: only forward, never for a sequence not reported durable, and the stream
        /// finishes only once the agent's last sequence is acked.
        #[test]
        fn acks_only_forward_and_drain_to_the_end(
            start in 0u64..100,
            durable in proptest::collection::vec(0u64..200, 0..32),
            last in 0u64..200,
        ) {
            let mut a = AckRules::new(3, start);
            a.on_reader_end(last);
            let mut sent = start;
            let mut max_durable = start;
            for d in durable {
                max_durable = max_durable.max(d);
                if let Some(ack) = a.on_durable(d) {
                    prop_assert!(ack.seq > sent && ack.seq <= max_durable);
                    sent = ack.seq;
                }
                prop_assert_eq!(a.done(), sent >= last);
            }
            prop_assert_eq!(sent, max_durable);
        }
    }
}
