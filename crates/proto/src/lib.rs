//! Slipway wire protocol, version 1.
//!
//! This crate is the protocol and nothing else: it never touches a socket, a file or a clock.
//! The server and the agent are thin async shells that read bytes from QUIC streams, hand them
//! to [`FrameHeader::parse`] / [`Frame::decode_body`] (or the buffering [`Decoder`]), and act on
//! the typed [`Frame`]s that come out. Keeping it I/O-free means every malformed input a hostile
//! peer can send is reachable from unit tests and fuzz targets without a network.
//!
//! The byte layout is specified in `docs/protocol.md`; the tests in [`frame`] pin it.
//!
//! Architecture invariant: nothing in here allocates more than the frame length a caller
//! allowed (`max_body`) before that length has been checked.

// A peer's input never panics this crate: no `unwrap` outside tests (house style, quinn).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod frame;
pub mod handshake;

pub use frame::DecodeError;
pub use frame::{
    Ack, ChunkHashes, Decoder, DiskOpen, DiskOpened, ErrorCode, ErrorFrame, Frame, FrameHeader,
    FrameType, HashRequest, Hello, Marker, MarkerNote, MarkerRequest, Phase, Progress, ResumeKind,
    SourceLimits, StreamBind, Tracking, TrackingNote, Welcome, Write, WriteZeroes, FLAG_LZ4,
    HEADER_LEN, MAX_HASHES_PER_FRAME, NO_HANDLE,
};
pub use handshake::{ClientHandshake, HandshakeError, Negotiated, ServerHandshake, ServerParams};

/// ALPN protocol identifier negotiated in the TLS handshake.
pub const ALPN: &[u8] = b"slipway/1";

/// Protocol versions this build speaks (inclusive range).
pub const VERSION_MIN: u16 = 1;
/// Highest protocol version this build speaks.
pub const VERSION_MAX: u16 = 1;

/// Largest payload of one write frame (uncompressed), 4 MiB.
pub const MAX_WRITE_LEN: u32 = 4 << 20;

/// Largest body any frame may have: a maximal write plus its fixed fields and LZ4's worst-case
/// expansion. Decoders are always given a `max_body` no larger than this.
pub const MAX_BODY_LEN: u32 = MAX_WRITE_LEN + MAX_WRITE_LEN / 255 + 1024;

/// Feature bits exchanged in hello/welcome.
pub mod features {
    /// Write payloads may be LZ4 block-compressed (per frame, flag [`super::FLAG_LZ4`]).
    pub const LZ4: u32 = 1 << 0;
    /// Checksum resync: the agent may ask for the hashes of what a volume holds
    /// ([`super::HashRequest`]) and send only the chunks that differ.
    pub const HASHES: u32 = 1 << 1;
    /// The agent says how consistent each marker's point is ([`super::MarkerNote`]).
    pub const MARKER_NOTES: u32 = 1 << 2;
    /// The agent says how it finds each disk's changes ([`super::TrackingNote`]).
    pub const TRACKING_NOTES: u32 = 1 << 3;
    /// The server sends the limits its settings set for the source ([`super::SourceLimits`]).
    pub const SOURCE_LIMITS: u32 = 1 << 4;
    /// All features this build understands.
    pub const ALL: u32 = LZ4 | HASHES | MARKER_NOTES | TRACKING_NOTES | SOURCE_LIMITS;
}

/// Longest source or disk id, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest credential, in bytes.
pub const MAX_CREDENTIAL_LEN: usize = 1024;
/// Longest human-readable message (errors, versions), in bytes.
pub const MAX_MESSAGE_LEN: usize = 4096;

/// Checks a source or disk id: 1..=128 bytes of `[A-Za-z0-9._-]`, not starting with a dot.
///
/// Ids become file names on the server, so this is the line that keeps a peer out of other
/// directories (`..`, `/`) — both ends call it.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_id("web-01"));
        assert!(valid_id("disk_0.a"));
        assert!(!valid_id(""));
        assert!(!valid_id(".."));
        assert!(!valid_id(".hidden"));
        assert!(!valid_id("a/b"));
        assert!(!valid_id("a b"));
        assert!(!valid_id(&"x".repeat(129)));
        assert!(valid_id(&"x".repeat(128)));
    }
}
