//! Frames: the typed messages of protocol v1 and their byte encoding.
//!
//! Every frame is an 8-byte header followed by a body:
//!
//! ```text
//! 0        1        2        4                8
//! +--------+--------+--------+----------------+------------------
//! | type   | flags  | 0x0000 | body length    | body (length bytes)
//! +--------+--------+--------+----------------+------------------
//! ```
//!
//! All integers are big-endian. Strings are a `u16` byte length and UTF-8 bytes. The header is
//! checked on its own (type known, flags allowed for the type, reserved bits zero, length within
//! the caller's limit) before a single body byte is read, so an oversized or garbage frame is
//! refused without buffering it.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::{MAX_BODY_LEN, MAX_CREDENTIAL_LEN, MAX_ID_LEN, MAX_MESSAGE_LEN, MAX_WRITE_LEN};

/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 8;

/// Write frame flag: the payload is an LZ4 block; `len` is its decompressed size.
pub const FLAG_LZ4: u8 = 0x01;

/// Handle value meaning "no disk" in error frames.
pub const NO_HANDLE: u32 = u32::MAX;

/// Fixed part of a write body: handle, seq, offset, len, crc.
const WRITE_FIXED: usize = 4 + 8 + 8 + 4 + 4;

/// The frame types of protocol v1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    Hello = 0x01,
    Welcome = 0x02,
    DiskOpen = 0x03,
    DiskOpened = 0x04,
    StreamBind = 0x05,
    Write = 0x06,
    WriteZeroes = 0x07,
    Ack = 0x08,
    Marker = 0x09,
    Heartbeat = 0x0A,
    Error = 0x0B,
    Progress = 0x0C,
    MarkerRequest = 0x0D,
    HashRequest = 0x0E,
    ChunkHashes = 0x0F,
    MarkerNote = 0x10,
    TrackingNote = 0x11,
    SourceLimits = 0x12,
}

impl FrameType {
    fn from_u8(v: u8) -> Option<Self> {
        use FrameType::*;
        Some(match v {
            0x01 => Hello,
            0x02 => Welcome,
            0x03 => DiskOpen,
            0x04 => DiskOpened,
            0x05 => StreamBind,
            0x06 => Write,
            0x07 => WriteZeroes,
            0x08 => Ack,
            0x09 => Marker,
            0x0A => Heartbeat,
            0x0B => Error,
            0x0C => Progress,
            0x0D => MarkerRequest,
            0x0E => HashRequest,
            0x0F => ChunkHashes,
            0x10 => MarkerNote,
            0x11 => TrackingNote,
            0x12 => SourceLimits,
            _ => return None,
        })
    }

    /// Flags this frame type may carry.
    fn allowed_flags(self) -> u8 {
        match self {
            FrameType::Write => FLAG_LZ4,
            _ => 0,
        }
    }
}

/// Why bytes could not be decoded into a frame. Every variant is a protocol violation by the
/// peer; the receiver answers with an error frame ([`ErrorCode::Malformed`],
/// [`ErrorCode::TooLarge`] or [`ErrorCode::BadChecksum`]) and closes the stream.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// frame type {0:#04x} is unknown
    #[error("frame type {0:#04x} is unknown")]
    UnknownType(u8),
    /// flags {flags:#04x} are not allowed on a {ty:?} frame
    #[error("flags {flags:#04x} are not allowed on a {ty:?} frame")]
    BadFlags { ty: FrameType, flags: u8 },
    /// reserved header bits are not zero
    #[error("reserved header bits are not zero")]
    Reserved,
    /// frame body of {len} bytes exceeds the limit of {max} bytes
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u32, max: u32 },
    /// frame body ended early
    #[error("{ty:?} frame body is truncated: {what}")]
    Truncated { ty: FrameType, what: &'static str },
    /// frame body has bytes after its last field
    #[error("{ty:?} frame has {extra} bytes after its last field")]
    Trailing { ty: FrameType, extra: usize },
    /// a string field is not valid
    #[error("{ty:?} frame field {field} is invalid: {reason}")]
    BadField {
        ty: FrameType,
        field: &'static str,
        reason: &'static str,
    },
    /// the payload's CRC-32 does not match
    #[error("write payload CRC-32 mismatch: frame says {expected:#010x}, data has {actual:#010x}")]
    BadChecksum { expected: u32, actual: u32 },
    /// the LZ4 payload does not decompress to the announced length
    #[error("LZ4 payload does not decompress to {len} bytes")]
    Decompress { len: u32 },
}

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub ty: FrameType,
    pub flags: u8,
    pub body_len: u32,
}

impl FrameHeader {
    /// Parses and checks a header. `max_body` is the receiver's limit (at most
    /// [`MAX_BODY_LEN`]); a longer body is refused here, before it is read.
    pub fn parse(b: &[u8; HEADER_LEN], max_body: u32) -> Result<Self, DecodeError> {
        let ty = FrameType::from_u8(b[0]).ok_or(DecodeError::UnknownType(b[0]))?;
        let flags = b[1];
        if flags & !ty.allowed_flags() != 0 {
            return Err(DecodeError::BadFlags { ty, flags });
        }
        if b[2] != 0 || b[3] != 0 {
            return Err(DecodeError::Reserved);
        }
        let body_len = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        let max = max_body.min(MAX_BODY_LEN);
        if body_len > max {
            return Err(DecodeError::TooLarge { len: body_len, max });
        }
        Ok(FrameHeader {
            ty,
            flags,
            body_len,
        })
    }

    fn write(ty: FrameType, flags: u8, body_len: usize, out: &mut BytesMut) {
        debug_assert!(body_len <= MAX_BODY_LEN as usize);
        out.put_u8(ty as u8);
        out.put_u8(flags);
        out.put_u16(0);
        out.put_u32(body_len as u32);
    }
}

/// Agent → server, first frame on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version_min: u16,
    pub version_max: u16,
    /// Feature bits the agent would like ([`crate::features`]).
    pub features: u32,
    /// Random per agent process: writes are resumable only within one run.
    pub agent_run: u64,
    pub source_id: String,
    pub credential: String,
    pub agent_version: String,
}

/// Server → agent, the answer to a good hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub version: u16,
    /// Features both ends use from now on.
    pub features: u32,
    /// The agent sends a heartbeat at least this often.
    pub heartbeat_ms: u32,
    /// Largest write payload the server accepts.
    pub max_write: u32,
    pub server_version: String,
}

/// Agent → server on the control stream: open (or create) the volume of one source disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOpen {
    pub request_id: u32,
    pub disk_id: String,
    pub size: u64,
    pub block_size: u32,
}

/// What the agent must send after a disk open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ResumeKind {
    /// A new, all-zero volume: send the blocks that are not zero.
    Fresh = 0,
    /// Same agent run as before: resend retained writes with `seq > durable_seq`.
    Resume = 1,
    /// The volume holds data this agent run cannot account for: send every block, zero ranges
    /// as [`WriteZeroes`].
    Resync = 2,
}

/// Server → agent on the control stream: the disk is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOpened {
    pub request_id: u32,
    /// Handle that write frames and the stream bind name.
    pub handle: u32,
    pub resume: ResumeKind,
    /// Highest sequence durably applied to this disk in this agent run.
    pub durable_seq: u64,
}

/// Agent → server, first frame on each disk stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamBind {
    pub handle: u32,
}

/// Agent → server on a disk stream: write `data` at `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub handle: u32,
    pub seq: u64,
    pub offset: u64,
    /// Uncompressed payload; its CRC-32 travels in the frame and is checked on decode.
    pub data: Bytes,
}

/// Agent → server on a disk stream: zero `len` bytes at `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteZeroes {
    pub handle: u32,
    pub seq: u64,
    pub offset: u64,
    pub len: u64,
}

/// Server → agent on a disk stream: every write of this disk with sequence `<= seq` is on
/// stable storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub handle: u32,
    pub seq: u64,
}

/// Agent → server on a disk stream: consistency marker `marker_id` sits at sequence `seq` of
/// the source's global write order (every write before it on every disk has a lower seq).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    pub handle: u32,
    pub seq: u64,
    pub marker_id: u64,
}

/// Server → agent on the control stream: place a consistency marker with this id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkerRequest {
    pub marker_id: u64,
}

/// Agent → server on the control stream (feature [`crate::features::HASHES`]): send the
/// xxh3-64 hash of every `chunk_size` bytes of the volume behind `handle`, in order (the last
/// chunk may be short), as [`ChunkHashes`] frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashRequest {
    pub handle: u32,
    pub chunk_size: u32,
}

/// Most hashes in one [`ChunkHashes`] frame (32 KiB of them).
pub const MAX_HASHES_PER_FRAME: usize = 4096;

/// Server → agent on the control stream: the hashes of chunks `first..first + hashes.len()`
/// of the volume behind `handle`, as it was when the request was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHashes {
    pub handle: u32,
    pub first: u64,
    pub hashes: Vec<u64>,
}

/// Agent → server on the control stream (feature [`crate::features::MARKER_NOTES`]): how
/// consistent the point of marker `marker_id` is, sent before the marker itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkerNote {
    pub marker_id: u64,
    /// True: the source's filesystems were frozen while the marker's data was read (one
    /// instant across them). False: crash-consistent at best, for `reason`.
    pub one_instant: bool,
    /// How long the source was frozen, microseconds (0: no freeze).
    pub freeze_us: u64,
    pub reason: String,
}

/// How the agent finds a disk's changes in follow mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Tracking {
    /// Not following (one pass), or not known yet.
    None = 0,
    /// The kernel reports every write (tracefs): only what changed is read.
    Kernel = 1,
    /// The disk is reread every rescan interval.
    Rescan = 2,
}

impl Tracking {
    pub fn as_str(self) -> &'static str {
        match self {
            Tracking::None => "none",
            Tracking::Kernel => "kernel",
            Tracking::Rescan => "rescan",
        }
    }
}

/// Agent → server on the control stream (feature [`crate::features::TRACKING_NOTES`]): how
/// the agent finds the changes of the disk behind `handle`, and why not in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackingNote {
    pub handle: u32,
    pub tracking: Tracking,
    pub reason: String,
}

/// Server → agent on the control stream (feature [`crate::features::SOURCE_LIMITS`]): the
/// limits the server's settings set for this source, sent after the handshake and again when
/// they change. The agent applies the stricter of these and its own configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceLimits {
    /// Replication bandwidth of the whole source, bits per second (0: no limit).
    pub bandwidth_bps: u64,
}

/// Replication phase the agent reports for a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    InitialSync = 0,
    Rescan = 1,
    Backlog = 2,
    Continuous = 3,
    Paused = 4,
}

/// Agent → server on the control stream: where the agent stands with a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub handle: u32,
    pub phase: Phase,
    /// Bytes known changed at the source that the agent has not yet seen acked.
    pub backlog_bytes: u64,
    /// With [`Phase::Continuous`]: the pass that brought the disk up to date ended with this
    /// sequence; once it is durable the replica is a whole copy.
    pub pass_seq: u64,
}

/// Error codes carried by [`ErrorFrame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// No protocol version in common.
    BadVersion = 1,
    /// Unknown source, bad credential, or a disk of another source.
    Unauthorized = 2,
    /// A frame could not be decoded or came in the wrong place.
    Malformed = 3,
    /// A write's CRC-32 did not match its payload.
    BadChecksum = 4,
    /// A write reaches past the end of the disk.
    OutOfBounds = 5,
    /// Offset or length is not a multiple of the disk's logical block size.
    Misaligned = 6,
    /// A handle that this connection did not open.
    UnknownDisk = 7,
    /// The volume failed a write or flush; the disk is in the error state.
    DiskError = 8,
    /// Another connection took over this disk or source.
    Superseded = 9,
    /// A frame longer than allowed.
    TooLarge = 10,
    /// Sequence numbers went backwards.
    BadSequence = 11,
    /// Bad disk open arguments (id, size, block size).
    InvalidArgument = 12,
    /// The disk exists with another size or block size.
    DiskMismatch = 13,
    /// The server is shutting down or draining: reconnect later.
    Draining = 14,
    /// Too many disks, streams or connections.
    Limit = 15,
    /// Anything else.
    Internal = 16,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Option<Self> {
        use ErrorCode::*;
        Some(match v {
            1 => BadVersion,
            2 => Unauthorized,
            3 => Malformed,
            4 => BadChecksum,
            5 => OutOfBounds,
            6 => Misaligned,
            7 => UnknownDisk,
            8 => DiskError,
            9 => Superseded,
            10 => TooLarge,
            11 => BadSequence,
            12 => InvalidArgument,
            13 => DiskMismatch,
            14 => Draining,
            15 => Limit,
            16 => Internal,
            _ => return None,
        })
    }

    /// Whether an agent may retry (reconnect) after this error. Permanent errors need a human.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            ErrorCode::BadVersion
                | ErrorCode::Unauthorized
                | ErrorCode::InvalidArgument
                | ErrorCode::DiskMismatch
                | ErrorCode::OutOfBounds
                | ErrorCode::Misaligned
        )
    }

    /// Stable lower-case name, used in logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            BadVersion => "bad_version",
            Unauthorized => "unauthorized",
            Malformed => "malformed",
            BadChecksum => "bad_checksum",
            OutOfBounds => "out_of_bounds",
            Misaligned => "misaligned",
            UnknownDisk => "unknown_disk",
            DiskError => "disk_error",
            Superseded => "superseded",
            TooLarge => "too_large",
            BadSequence => "bad_sequence",
            InvalidArgument => "invalid_argument",
            DiskMismatch => "disk_mismatch",
            Draining => "draining",
            Limit => "limit",
            Internal => "internal",
        }
    }
}

impl From<&DecodeError> for ErrorCode {
    fn from(e: &DecodeError) -> Self {
        match e {
            DecodeError::TooLarge { .. } => ErrorCode::TooLarge,
            DecodeError::BadChecksum { .. } => ErrorCode::BadChecksum,
            _ => ErrorCode::Malformed,
        }
    }
}

/// Either direction: something went wrong. `handle` names the disk, or is [`NO_HANDLE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub handle: u32,
    pub message: String,
}

impl ErrorFrame {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        truncate_utf8(&mut message, MAX_MESSAGE_LEN);
        ErrorFrame {
            code,
            handle: NO_HANDLE,
            message,
        }
    }

    pub fn for_disk(code: ErrorCode, handle: u32, message: impl Into<String>) -> Self {
        ErrorFrame {
            handle,
            ..ErrorFrame::new(code, message)
        }
    }
}

impl std::fmt::Display for ErrorFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code.as_str())
    }
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// Every message of protocol v1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    DiskOpen(DiskOpen),
    DiskOpened(DiskOpened),
    StreamBind(StreamBind),
    Write(Write),
    WriteZeroes(WriteZeroes),
    Ack(Ack),
    Marker(Marker),
    Heartbeat(u64),
    Error(ErrorFrame),
    Progress(Progress),
    MarkerRequest(MarkerRequest),
    HashRequest(HashRequest),
    ChunkHashes(ChunkHashes),
    MarkerNote(MarkerNote),
    TrackingNote(TrackingNote),
    SourceLimits(SourceLimits),
}

impl Frame {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::Welcome(_) => FrameType::Welcome,
            Frame::DiskOpen(_) => FrameType::DiskOpen,
            Frame::DiskOpened(_) => FrameType::DiskOpened,
            Frame::StreamBind(_) => FrameType::StreamBind,
            Frame::Write(_) => FrameType::Write,
            Frame::WriteZeroes(_) => FrameType::WriteZeroes,
            Frame::Ack(_) => FrameType::Ack,
            Frame::Marker(_) => FrameType::Marker,
            Frame::Heartbeat(_) => FrameType::Heartbeat,
            Frame::Error(_) => FrameType::Error,
            Frame::Progress(_) => FrameType::Progress,
            Frame::MarkerRequest(_) => FrameType::MarkerRequest,
            Frame::HashRequest(_) => FrameType::HashRequest,
            Frame::ChunkHashes(_) => FrameType::ChunkHashes,
            Frame::MarkerNote(_) => FrameType::MarkerNote,
            Frame::TrackingNote(_) => FrameType::TrackingNote,
            Frame::SourceLimits(_) => FrameType::SourceLimits,
        }
    }

    /// Appends the encoded frame to `out`. Writes are sent uncompressed; use
    /// [`Write::encode_chunks`] to compress and to avoid copying the payload.
    ///
    /// # Panics
    /// If a string field is longer than its limit or a write longer than
    /// [`MAX_WRITE_LEN`]: those are bugs of the sender, never input from a peer.
    pub fn encode(&self, out: &mut BytesMut) {
        if let Frame::Write(w) = self {
            for c in w.encode_chunks(false) {
                out.extend_from_slice(&c);
            }
            return;
        }
        let mut body = BytesMut::with_capacity(64);
        match self {
            Frame::Hello(h) => {
                body.put_u16(h.version_min);
                body.put_u16(h.version_max);
                body.put_u32(h.features);
                body.put_u64(h.agent_run);
                put_str(&mut body, &h.source_id, MAX_ID_LEN);
                put_str(&mut body, &h.credential, MAX_CREDENTIAL_LEN);
                put_str(&mut body, &h.agent_version, MAX_MESSAGE_LEN);
            }
            Frame::Welcome(w) => {
                body.put_u16(w.version);
                body.put_u32(w.features);
                body.put_u32(w.heartbeat_ms);
                body.put_u32(w.max_write);
                put_str(&mut body, &w.server_version, MAX_MESSAGE_LEN);
            }
            Frame::DiskOpen(d) => {
                body.put_u32(d.request_id);
                put_str(&mut body, &d.disk_id, MAX_ID_LEN);
                body.put_u64(d.size);
                body.put_u32(d.block_size);
            }
            Frame::DiskOpened(d) => {
                body.put_u32(d.request_id);
                body.put_u32(d.handle);
                body.put_u8(d.resume as u8);
                body.put_u64(d.durable_seq);
            }
            Frame::StreamBind(b) => body.put_u32(b.handle),
            Frame::Write(_) => unreachable!("handled above"),
            Frame::WriteZeroes(z) => {
                body.put_u32(z.handle);
                body.put_u64(z.seq);
                body.put_u64(z.offset);
                body.put_u64(z.len);
            }
            Frame::Ack(a) => {
                body.put_u32(a.handle);
                body.put_u64(a.seq);
            }
            Frame::Marker(m) => {
                body.put_u32(m.handle);
                body.put_u64(m.seq);
                body.put_u64(m.marker_id);
            }
            Frame::Heartbeat(n) => body.put_u64(*n),
            Frame::Error(e) => {
                body.put_u16(e.code as u16);
                body.put_u32(e.handle);
                put_str(&mut body, &e.message, MAX_MESSAGE_LEN);
            }
            Frame::Progress(p) => {
                body.put_u32(p.handle);
                body.put_u8(p.phase as u8);
                body.put_u64(p.backlog_bytes);
                body.put_u64(p.pass_seq);
            }
            Frame::MarkerRequest(m) => body.put_u64(m.marker_id),
            Frame::HashRequest(h) => {
                body.put_u32(h.handle);
                body.put_u32(h.chunk_size);
            }
            Frame::TrackingNote(n) => {
                body.put_u32(n.handle);
                body.put_u8(n.tracking as u8);
                put_str(&mut body, &n.reason, MAX_MESSAGE_LEN);
            }
            Frame::SourceLimits(l) => body.put_u64(l.bandwidth_bps),
            Frame::MarkerNote(n) => {
                body.put_u64(n.marker_id);
                body.put_u8(u8::from(n.one_instant));
                body.put_u64(n.freeze_us);
                put_str(&mut body, &n.reason, MAX_MESSAGE_LEN);
            }
            Frame::ChunkHashes(c) => {
                assert!(c.hashes.len() <= MAX_HASHES_PER_FRAME, "too many hashes");
                body.put_u32(c.handle);
                body.put_u64(c.first);
                body.put_u32(c.hashes.len() as u32);
                for h in &c.hashes {
                    body.put_u64(*h);
                }
            }
        }
        FrameHeader::write(self.frame_type(), 0, body.len(), out);
        out.extend_from_slice(&body);
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out.freeze()
    }

    /// Decodes a body whose header was accepted by [`FrameHeader::parse`].
    pub fn decode_body(h: FrameHeader, mut b: Bytes) -> Result<Frame, DecodeError> {
        debug_assert_eq!(b.len(), h.body_len as usize);
        let ty = h.ty;
        let mut r = Reader { ty, b: &mut b };
        let frame = match ty {
            FrameType::Hello => Frame::Hello(Hello {
                version_min: r.u16("version_min")?,
                version_max: r.u16("version_max")?,
                features: r.u32("features")?,
                agent_run: r.u64("agent_run")?,
                source_id: r.string("source_id", MAX_ID_LEN)?,
                credential: r.string("credential", MAX_CREDENTIAL_LEN)?,
                agent_version: r.string("agent_version", MAX_MESSAGE_LEN)?,
            }),
            FrameType::Welcome => Frame::Welcome(Welcome {
                version: r.u16("version")?,
                features: r.u32("features")?,
                heartbeat_ms: r.u32("heartbeat_ms")?,
                max_write: r.u32("max_write")?,
                server_version: r.string("server_version", MAX_MESSAGE_LEN)?,
            }),
            FrameType::DiskOpen => Frame::DiskOpen(DiskOpen {
                request_id: r.u32("request_id")?,
                disk_id: r.string("disk_id", MAX_ID_LEN)?,
                size: r.u64("size")?,
                block_size: r.u32("block_size")?,
            }),
            FrameType::DiskOpened => Frame::DiskOpened(DiskOpened {
                request_id: r.u32("request_id")?,
                handle: r.u32("handle")?,
                resume: match r.u8("resume")? {
                    0 => ResumeKind::Fresh,
                    1 => ResumeKind::Resume,
                    2 => ResumeKind::Resync,
                    _ => return Err(r.bad("resume", "unknown resume kind")),
                },
                durable_seq: r.u64("durable_seq")?,
            }),
            FrameType::StreamBind => Frame::StreamBind(StreamBind {
                handle: r.u32("handle")?,
            }),
            FrameType::Write => {
                let handle = r.u32("handle")?;
                let seq = r.u64("seq")?;
                let offset = r.u64("offset")?;
                let len = r.u32("len")?;
                let crc = r.u32("crc")?;
                if len > MAX_WRITE_LEN {
                    return Err(DecodeError::TooLarge {
                        len,
                        max: MAX_WRITE_LEN,
                    });
                }
                let payload = r.b.split_to(r.b.len());
                let data = if h.flags & FLAG_LZ4 != 0 {
                    let v = lz4_flex::block::decompress(&payload, len as usize)
                        .map_err(|_| DecodeError::Decompress { len })?;
                    if v.len() != len as usize {
                        return Err(DecodeError::Decompress { len });
                    }
                    Bytes::from(v)
                } else {
                    if payload.len() != len as usize {
                        return Err(DecodeError::BadField {
                            ty,
                            field: "len",
                            reason: "does not match the payload length",
                        });
                    }
                    payload
                };
                let actual = crc32fast::hash(&data);
                if actual != crc {
                    return Err(DecodeError::BadChecksum {
                        expected: crc,
                        actual,
                    });
                }
                Frame::Write(Write {
                    handle,
                    seq,
                    offset,
                    data,
                })
            }
            FrameType::WriteZeroes => Frame::WriteZeroes(WriteZeroes {
                handle: r.u32("handle")?,
                seq: r.u64("seq")?,
                offset: r.u64("offset")?,
                len: r.u64("len")?,
            }),
            FrameType::Ack => Frame::Ack(Ack {
                handle: r.u32("handle")?,
                seq: r.u64("seq")?,
            }),
            FrameType::Marker => Frame::Marker(Marker {
                handle: r.u32("handle")?,
                seq: r.u64("seq")?,
                marker_id: r.u64("marker_id")?,
            }),
            FrameType::Heartbeat => Frame::Heartbeat(r.u64("nonce")?),
            FrameType::Error => {
                let raw = r.u16("code")?;
                let code = ErrorCode::from_u16(raw).unwrap_or(ErrorCode::Internal);
                Frame::Error(ErrorFrame {
                    code,
                    handle: r.u32("handle")?,
                    message: r.string("message", MAX_MESSAGE_LEN)?,
                })
            }
            FrameType::Progress => Frame::Progress(Progress {
                handle: r.u32("handle")?,
                phase: match r.u8("phase")? {
                    0 => Phase::InitialSync,
                    1 => Phase::Rescan,
                    2 => Phase::Backlog,
                    3 => Phase::Continuous,
                    4 => Phase::Paused,
                    _ => return Err(r.bad("phase", "unknown phase")),
                },
                backlog_bytes: r.u64("backlog_bytes")?,
                pass_seq: r.u64("pass_seq")?,
            }),
            FrameType::MarkerRequest => Frame::MarkerRequest(MarkerRequest {
                marker_id: r.u64("marker_id")?,
            }),
            FrameType::TrackingNote => Frame::TrackingNote(TrackingNote {
                handle: r.u32("handle")?,
                tracking: match r.u8("tracking")? {
                    0 => Tracking::None,
                    1 => Tracking::Kernel,
                    2 => Tracking::Rescan,
                    _ => return Err(r.bad("tracking", "unknown tracking mode")),
                },
                reason: r.string("reason", MAX_MESSAGE_LEN)?,
            }),
            FrameType::SourceLimits => Frame::SourceLimits(SourceLimits {
                bandwidth_bps: r.u64("bandwidth_bps")?,
            }),
            FrameType::MarkerNote => Frame::MarkerNote(MarkerNote {
                marker_id: r.u64("marker_id")?,
                one_instant: match r.u8("one_instant")? {
                    0 => false,
                    1 => true,
                    _ => return Err(r.bad("one_instant", "not 0 or 1")),
                },
                freeze_us: r.u64("freeze_us")?,
                reason: r.string("reason", MAX_MESSAGE_LEN)?,
            }),
            FrameType::HashRequest => Frame::HashRequest(HashRequest {
                handle: r.u32("handle")?,
                chunk_size: r.u32("chunk_size")?,
            }),
            FrameType::ChunkHashes => {
                let handle = r.u32("handle")?;
                let first = r.u64("first")?;
                let n = r.u32("count")? as usize;
                if n > MAX_HASHES_PER_FRAME {
                    return Err(r.bad("count", "more hashes than a frame may carry"));
                }
                if r.b.len() != n * 8 {
                    return Err(r.bad("count", "does not match the body length"));
                }
                let mut hashes = Vec::with_capacity(n);
                for _ in 0..n {
                    hashes.push(r.u64("hash")?);
                }
                Frame::ChunkHashes(ChunkHashes {
                    handle,
                    first,
                    hashes,
                })
            }
        };
        if !b.is_empty() {
            return Err(DecodeError::Trailing { ty, extra: b.len() });
        }
        Ok(frame)
    }
}

impl Write {
    /// Encodes the frame as two chunks — header with fixed fields, then the payload — so a
    /// sender can hand the payload to the transport without copying it. With `lz4`, the
    /// payload is compressed when that makes it smaller, and sent raw otherwise.
    pub fn encode_chunks(&self, lz4: bool) -> [Bytes; 2] {
        assert!(self.data.len() <= MAX_WRITE_LEN as usize, "write too large");
        let crc = crc32fast::hash(&self.data);
        let mut flags = 0;
        let mut payload = self.data.clone();
        if lz4 && !self.data.is_empty() && worth_compressing(&self.data) {
            let c = lz4_flex::block::compress(&self.data);
            if c.len() < self.data.len() {
                payload = Bytes::from(c);
                flags = FLAG_LZ4;
            }
        }
        let mut head = BytesMut::with_capacity(HEADER_LEN + WRITE_FIXED);
        FrameHeader::write(
            FrameType::Write,
            flags,
            WRITE_FIXED + payload.len(),
            &mut head,
        );
        head.put_u32(self.handle);
        head.put_u64(self.seq);
        head.put_u64(self.offset);
        head.put_u32(self.data.len() as u32);
        head.put_u32(crc);
        [head.freeze(), payload]
    }
}

/// Size of the sample that decides whether a large payload is worth compressing.
const LZ4_PROBE: usize = 64 * 1024;

/// Compressing a megabyte of random data costs more CPU than the wire saves: probe the first
/// 64 KiB and compress the whole payload only if the sample shrinks by at least 1/16.
fn worth_compressing(data: &[u8]) -> bool {
    if data.len() <= LZ4_PROBE {
        return true;
    }
    let sample = lz4_flex::block::compress(&data[..LZ4_PROBE]);
    sample.len() < LZ4_PROBE - LZ4_PROBE / 16
}

fn put_str(out: &mut BytesMut, s: &str, max: usize) {
    assert!(s.len() <= max, "string field longer than {max} bytes");
    out.put_u16(s.len() as u16);
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    ty: FrameType,
    b: &'a mut Bytes,
}

impl Reader<'_> {
    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.b.remaining() < n {
            Err(DecodeError::Truncated { ty: self.ty, what })
        } else {
            Ok(())
        }
    }
    fn bad(&self, field: &'static str, reason: &'static str) -> DecodeError {
        DecodeError::BadField {
            ty: self.ty,
            field,
            reason,
        }
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.b.get_u8())
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.need(2, what)?;
        Ok(self.b.get_u16())
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.b.get_u32())
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.need(8, what)?;
        Ok(self.b.get_u64())
    }
    fn string(&mut self, what: &'static str, max: usize) -> Result<String, DecodeError> {
        let n = self.u16(what)? as usize;
        if n > max {
            return Err(self.bad(what, "too long"));
        }
        self.need(n, what)?;
        let raw = self.b.split_to(n);
        String::from_utf8(raw.to_vec()).map_err(|_| self.bad(what, "not UTF-8"))
    }
}

/// Buffers bytes from a stream and yields whole frames.
///
/// Push bytes into a `BytesMut` and call [`Decoder::decode`] until it returns `Ok(None)`; the
/// answer changes only when more bytes arrive. An error is final for the stream.
#[derive(Debug)]
pub struct Decoder {
    max_body: u32,
    header: Option<FrameHeader>,
}

impl Decoder {
    pub fn new(max_body: u32) -> Self {
        Decoder {
            max_body,
            header: None,
        }
    }

    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let h = match self.header {
            Some(h) => h,
            None => {
                if buf.len() < HEADER_LEN {
                    return Ok(None);
                }
                let mut raw = [0u8; HEADER_LEN];
                raw.copy_from_slice(&buf[..HEADER_LEN]);
                let h = FrameHeader::parse(&raw, self.max_body)?;
                buf.advance(HEADER_LEN);
                self.header = Some(h);
                h
            }
        };
        if buf.len() < h.body_len as usize {
            buf.reserve(h.body_len as usize - buf.len());
            return Ok(None);
        }
        self.header = None;
        let body = buf.split_to(h.body_len as usize).freeze();
        Frame::decode_body(h, body).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Hello(Hello {
                version_min: 1,
                version_max: 3,
                features: 1,
                agent_run: 0xdead_beef_0102_0304,
                source_id: "web-01".into(),
                credential: "slw1.abc.def".into(),
                agent_version: "slipway-agent 0.1.0".into(),
            }),
            Frame::Welcome(Welcome {
                version: 1,
                features: 1,
                heartbeat_ms: 5000,
                max_write: MAX_WRITE_LEN,
                server_version: "slipway 0.1.0".into(),
            }),
            Frame::DiskOpen(DiskOpen {
                request_id: 7,
                disk_id: "nvme0n1".into(),
                size: 1 << 40,
                block_size: 4096,
            }),
            Frame::DiskOpened(DiskOpened {
                request_id: 7,
                handle: 3,
                resume: ResumeKind::Resync,
                durable_seq: 99,
            }),
            Frame::StreamBind(StreamBind { handle: 3 }),
            Frame::Write(Write {
                handle: 3,
                seq: 100,
                offset: 8192,
                data: Bytes::from(vec![7u8; 4096]),
            }),
            Frame::WriteZeroes(WriteZeroes {
                handle: 3,
                seq: 101,
                offset: 0,
                len: 1 << 30,
            }),
            Frame::Ack(Ack {
                handle: 3,
                seq: 101,
            }),
            Frame::Marker(Marker {
                handle: 3,
                seq: 102,
                marker_id: 5,
            }),
            Frame::Heartbeat(42),
            Frame::Error(ErrorFrame::for_disk(
                ErrorCode::OutOfBounds,
                3,
                "past the end",
            )),
            Frame::Progress(Progress {
                handle: 3,
                phase: Phase::Continuous,
                backlog_bytes: 0,
                pass_seq: 101,
            }),
            Frame::MarkerRequest(MarkerRequest { marker_id: 5 }),
            Frame::HashRequest(HashRequest {
                handle: 3,
                chunk_size: 1 << 20,
            }),
            Frame::TrackingNote(TrackingNote {
                handle: 2,
                tracking: Tracking::Rescan,
                reason: "not root".into(),
            }),
            Frame::SourceLimits(SourceLimits {
                bandwidth_bps: 40_000_000,
            }),
            Frame::MarkerNote(MarkerNote {
                marker_id: 8,
                one_instant: false,
                freeze_us: 1234,
                reason: "vfat on /boot/efi cannot be frozen".into(),
            }),
            Frame::ChunkHashes(ChunkHashes {
                handle: 3,
                first: 4096,
                hashes: vec![1, u64::MAX, 0x0123_4567_89ab_cdef],
            }),
            Frame::ChunkHashes(ChunkHashes {
                handle: 3,
                first: 0,
                hashes: vec![],
            }),
        ]
    }

    fn decode_one(bytes: &[u8]) -> Result<Frame, DecodeError> {
        let mut d = Decoder::new(MAX_BODY_LEN);
        let mut buf = BytesMut::from(bytes);
        let f = d.decode(&mut buf)?.expect("whole frame");
        assert!(buf.is_empty());
        Ok(f)
    }

    #[test]
    fn round_trip_every_frame() {
        for f in all_frames() {
            let b = f.to_bytes();
            assert_eq!(decode_one(&b).unwrap(), f, "{:?}", f.frame_type());
        }
    }

    #[test]
    fn round_trip_byte_at_a_time() {
        let mut stream = BytesMut::new();
        for f in all_frames() {
            f.encode(&mut stream);
        }
        let mut d = Decoder::new(MAX_BODY_LEN);
        let mut buf = BytesMut::new();
        let mut got = vec![];
        for b in stream.iter() {
            buf.put_u8(*b);
            while let Some(f) = d.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, all_frames());
    }

    #[test]
    fn lz4_write_round_trip_and_raw_fallback() {
        let w = Write {
            handle: 1,
            seq: 1,
            offset: 0,
            data: Bytes::from(vec![0xabu8; 65536]),
        };
        let [head, payload] = w.encode_chunks(true);
        assert_eq!(head[1], FLAG_LZ4);
        assert!(payload.len() < 1024, "compressible data compresses");
        let mut all = head.to_vec();
        all.extend_from_slice(&payload);
        assert_eq!(decode_one(&all).unwrap(), Frame::Write(w));

        // Incompressible data is sent raw even when LZ4 was negotiated.
        let mut x: u32 = 1;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let w = Write {
            handle: 1,
            seq: 2,
            offset: 0,
            data: Bytes::from(noise),
        };
        let [head, payload] = w.encode_chunks(true);
        assert_eq!(head[1], 0);
        assert_eq!(payload, w.data);
    }

    #[test]
    fn large_payloads_are_compressed_only_when_a_sample_shrinks() {
        let mut x: u32 = 7;
        let mut noise = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect()
        };
        // Random: sent raw without compressing the whole megabyte.
        let w = Write {
            handle: 1,
            seq: 1,
            offset: 0,
            data: Bytes::from(noise(1 << 20)),
        };
        assert_eq!(w.encode_chunks(true)[0][1], 0);
        // Compressible text: compressed.
        let text: Vec<u8> = b"slipway replicates blocks. "
            .iter()
            .copied()
            .cycle()
            .take(1 << 20)
            .collect();
        let w = Write {
            handle: 1,
            seq: 2,
            offset: 0,
            data: Bytes::from(text),
        };
        let [head, payload] = w.encode_chunks(true);
        assert_eq!(head[1], FLAG_LZ4);
        assert!(payload.len() < (1 << 20) / 10);
    }

    #[test]
    fn header_layout_is_pinned() {
        let b = Frame::Ack(Ack { handle: 2, seq: 9 }).to_bytes();
        assert_eq!(
            &b[..],
            &[0x08, 0, 0, 0, 0, 0, 0, 12, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 9]
        );
        let w = Write {
            handle: 1,
            seq: 2,
            offset: 512,
            data: Bytes::from_static(b"abcd"),
        };
        let [head, _] = w.encode_chunks(false);
        let crc = crc32fast::hash(b"abcd").to_be_bytes();
        let mut want = vec![0x06, 0, 0, 0, 0, 0, 0, 32];
        want.extend_from_slice(&[0, 0, 0, 1]);
        want.extend_from_slice(&2u64.to_be_bytes());
        want.extend_from_slice(&512u64.to_be_bytes());
        want.extend_from_slice(&4u32.to_be_bytes());
        want.extend_from_slice(&crc);
        assert_eq!(&head[..], &want[..]);
    }

    #[test]
    fn short_input_waits_then_truncated_body_fails() {
        let b = Frame::Heartbeat(1).to_bytes();
        let mut d = Decoder::new(MAX_BODY_LEN);
        let mut buf = BytesMut::from(&b[..5]);
        assert_eq!(d.decode(&mut buf), Ok(None));
        // A header announcing a body too short for its fields.
        let bad = [0x0A, 0, 0, 0, 0, 0, 0, 4, 1, 2, 3, 4];
        assert!(matches!(
            decode_one(&bad),
            Err(DecodeError::Truncated {
                ty: FrameType::Heartbeat,
                ..
            })
        ));
    }

    #[test]
    fn oversized_is_refused_from_the_header_alone() {
        let mut d = Decoder::new(1024);
        let mut buf = BytesMut::from(&[0x06u8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            d.decode(&mut buf),
            Err(DecodeError::TooLarge {
                len: u32::MAX,
                max: 1024
            })
        );
        // The decoder's limit never exceeds the protocol's.
        let h = [0x06u8, 0, 0, 0, 0x7f, 0, 0, 0];
        assert!(matches!(
            FrameHeader::parse(&h, u32::MAX),
            Err(DecodeError::TooLarge { max, .. }) if max == MAX_BODY_LEN
        ));
    }

    #[test]
    fn write_len_above_protocol_limit() {
        let mut body = BytesMut::new();
        body.put_u32(1);
        body.put_u64(1);
        body.put_u64(0);
        body.put_u32(MAX_WRITE_LEN + 1);
        body.put_u32(0);
        let h = FrameHeader {
            ty: FrameType::Write,
            flags: FLAG_LZ4,
            body_len: body.len() as u32,
        };
        assert!(matches!(
            Frame::decode_body(h, body.freeze()),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn bad_crc() {
        let w = Write {
            handle: 1,
            seq: 1,
            offset: 0,
            data: Bytes::from(vec![1u8; 512]),
        };
        let [head, payload] = w.encode_chunks(false);
        let mut all = head.to_vec();
        all.extend_from_slice(&payload);
        let last = all.len() - 1;
        all[last] ^= 0x40;
        assert!(matches!(
            decode_one(&all),
            Err(DecodeError::BadChecksum { .. })
        ));
    }

    #[test]
    fn corrupt_lz4_is_an_error_not_a_panic() {
        let w = Write {
            handle: 1,
            seq: 1,
            offset: 0,
            data: Bytes::from(vec![9u8; 8192]),
        };
        let [head, payload] = w.encode_chunks(true);
        let mut p = payload.to_vec();
        for b in p.iter_mut() {
            *b = b.wrapping_mul(31).wrapping_add(7);
        }
        let mut all = head.to_vec();
        all.extend_from_slice(&p);
        let e = decode_one(&all).unwrap_err();
        assert!(
            matches!(
                e,
                DecodeError::Decompress { .. } | DecodeError::BadChecksum { .. }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn raw_write_length_mismatch() {
        let w = Write {
            handle: 1,
            seq: 1,
            offset: 0,
            data: Bytes::from(vec![1u8; 512]),
        };
        let [head, payload] = w.encode_chunks(false);
        let mut all = head.to_vec();
        all.extend_from_slice(&payload[..511]);
        all[7] -= 1; // body length follows the shorter payload; `len` still says 512
        assert!(matches!(
            decode_one(&all),
            Err(DecodeError::BadField { field: "len", .. })
        ));
    }

    #[test]
    fn unknown_type_flags_reserved() {
        assert_eq!(
            decode_one(&[0x7f, 0, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::UnknownType(0x7f))
        );
        assert!(matches!(
            decode_one(&[0x0A, 0x01, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::BadFlags { .. })
        ));
        assert_eq!(
            decode_one(&[0x0A, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::Reserved)
        );
    }

    #[test]
    fn trailing_bytes() {
        let mut b = Frame::Heartbeat(1).to_bytes().to_vec();
        b.push(0);
        b[7] += 1;
        assert_eq!(
            decode_one(&b),
            Err(DecodeError::Trailing {
                ty: FrameType::Heartbeat,
                extra: 1
            })
        );
    }

    #[test]
    fn bad_strings_and_enums() {
        // Non-UTF-8 disk id.
        let mut body = BytesMut::new();
        body.put_u32(1);
        body.put_u16(2);
        body.extend_from_slice(&[0xff, 0xfe]);
        body.put_u64(4096);
        body.put_u32(512);
        let h = FrameHeader {
            ty: FrameType::DiskOpen,
            flags: 0,
            body_len: body.len() as u32,
        };
        assert!(matches!(
            Frame::decode_body(h, body.freeze()),
            Err(DecodeError::BadField {
                field: "disk_id",
                reason: "not UTF-8",
                ..
            })
        ));
        // A string longer than its limit.
        let mut body = BytesMut::new();
        body.put_u32(1);
        body.put_u16(MAX_ID_LEN as u16 + 1);
        body.extend_from_slice(&[b'a'; MAX_ID_LEN + 1]);
        let h = FrameHeader {
            ty: FrameType::DiskOpen,
            flags: 0,
            body_len: body.len() as u32,
        };
        assert!(matches!(
            Frame::decode_body(h, body.freeze()),
            Err(DecodeError::BadField {
                reason: "too long",
                ..
            })
        ));
        // Unknown phase.
        let mut b = Frame::Progress(Progress {
            handle: 1,
            phase: Phase::Backlog,
            backlog_bytes: 0,
            pass_seq: 0,
        })
        .to_bytes()
        .to_vec();
        b[HEADER_LEN + 4] = 9;
        assert!(matches!(
            decode_one(&b),
            Err(DecodeError::BadField { field: "phase", .. })
        ));
    }

    #[test]
    fn error_messages_are_truncated_on_a_char_boundary() {
        let e = ErrorFrame::new(ErrorCode::Internal, "é".repeat(MAX_MESSAGE_LEN));
        assert!(e.message.len() <= MAX_MESSAGE_LEN);
        let f = Frame::Error(e);
        assert_eq!(decode_one(&f.to_bytes()).unwrap(), f);
    }

    #[test]
    fn decode_error_maps_to_error_codes() {
        assert_eq!(
            ErrorCode::from(&DecodeError::TooLarge { len: 1, max: 0 }),
            ErrorCode::TooLarge
        );
        assert_eq!(
            ErrorCode::from(&DecodeError::BadChecksum {
                expected: 0,
                actual: 1
            }),
            ErrorCode::BadChecksum
        );
        assert_eq!(
            ErrorCode::from(&DecodeError::UnknownType(0)),
            ErrorCode::Malformed
        );
    }

    /// Every prefix and every single-byte corruption of every frame decodes to a frame or a
    /// typed error; nothing panics.
    #[test]
    fn corruption_never_panics() {
        for f in all_frames() {
            let b = f.to_bytes();
            for cut in 0..b.len() {
                let mut d = Decoder::new(MAX_BODY_LEN);
                let mut buf = BytesMut::from(&b[..cut]);
                let _ = d.decode(&mut buf);
            }
            for i in 0..b.len().min(64) {
                for x in [0x01u8, 0x80, 0xff] {
                    let mut c = b.to_vec();
                    c[i] ^= x;
                    let mut d = Decoder::new(MAX_BODY_LEN);
                    let mut buf = BytesMut::from(&c[..]);
                    let _ = d.decode(&mut buf);
                }
            }
        }
    }
}
