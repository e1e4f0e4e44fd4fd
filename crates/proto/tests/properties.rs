//! Property tests of the wire codec and the handshake machines: what a hostile or broken peer
//! can feed them, generated at random (proptest), run by `cargo test`.
//!
//! The fuzz targets under `crates/proto/fuzz` drive the same entry points with coverage
//! guidance (`make fuzz`); these properties are the part that runs on every `make test`.
//!
//! Properties:
//! * every frame a correct sender can produce decodes to itself (raw and LZ4), through the
//!   buffering [`Decoder`] and through [`FrameHeader::parse`] + [`Frame::decode_body`], however
//!   the bytes are split into reads;
//! * no byte string panics the decoder, and the decoder never asks for more than `max_body`;
//! * a strict prefix of a valid frame makes the decoder wait (`Ok(None)`), never yield a frame
//!   or an error;
//! * corrupting a byte of a valid frame yields an error or a frame, never a panic, and a
//!   corrupted Write payload never decodes with the wrong data (CRC-32);
//! * the handshake machines accept exactly what the protocol says, for any frame sequence.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use slipway_proto::frame::{DecodeError, FrameHeader};
use slipway_proto::handshake::ServerParams;
use slipway_proto::{
    features, Ack, ClientHandshake, Decoder, DiskOpen, DiskOpened, ErrorCode, ErrorFrame, Frame,
    FrameType, Hello, Marker, MarkerRequest, Phase, Progress, ResumeKind, ServerHandshake,
    StreamBind, Welcome, Write, WriteZeroes, HEADER_LEN, MAX_BODY_LEN, MAX_WRITE_LEN, VERSION_MAX,
    VERSION_MIN,
};

// ---------------------------------------------------------------------------------------------
// Generators

/// A string of at most `max_chars` chars: up to 4 bytes each, so `max_chars * 4` bytes.
fn string(max_chars: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..=max_chars).prop_map(String::from_iter)
}

/// A string that is a valid id most of the time, and anything short otherwise.
fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::collection::vec(
            prop::sample::select(
                b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-".to_vec()
            ),
            1..=40
        )
        .prop_map(|v| String::from_utf8(v).unwrap()),
        1 => string(32), // ≤ 128 bytes, the id limit
    ]
}

/// Payloads: random (incompressible), runs (compressible), or empty.
fn payload() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..4096).prop_map(Bytes::from),
        (any::<u8>(), 1usize..65536).prop_map(|(b, n)| Bytes::from(vec![b; n])),
        (prop::collection::vec(any::<u8>(), 1..64), 1usize..512)
            .prop_map(|(pat, n)| Bytes::from(pat.repeat(n))),
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(vec![
        ErrorCode::BadVersion,
        ErrorCode::Unauthorized,
        ErrorCode::Malformed,
        ErrorCode::BadChecksum,
        ErrorCode::OutOfBounds,
        ErrorCode::Misaligned,
        ErrorCode::UnknownDisk,
        ErrorCode::DiskError,
        ErrorCode::Superseded,
        ErrorCode::TooLarge,
        ErrorCode::BadSequence,
        ErrorCode::InvalidArgument,
        ErrorCode::DiskMismatch,
        ErrorCode::Draining,
        ErrorCode::Limit,
        ErrorCode::Internal,
    ])
}

fn phase() -> impl Strategy<Value = Phase> {
    prop::sample::select(vec![
        Phase::InitialSync,
        Phase::Rescan,
        Phase::Backlog,
        Phase::Continuous,
        Phase::Paused,
    ])
}

fn resume() -> impl Strategy<Value = ResumeKind> {
    prop::sample::select(vec![
        ResumeKind::Fresh,
        ResumeKind::Resume,
        ResumeKind::Resync,
    ])
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        any::<u16>(),
        any::<u16>(),
        any::<u32>(),
        any::<u64>(),
        id(),
        string(256),
        string(1024),
    )
        .prop_map(
            |(
                version_min,
                version_max,
                features,
                agent_run,
                source_id,
                credential,
                agent_version,
            )| {
                Hello {
                    version_min,
                    version_max,
                    features,
                    agent_run,
                    source_id,
                    credential,
                    agent_version,
                }
            },
        )
}

fn welcome() -> impl Strategy<Value = Welcome> {
    (
        any::<u16>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        string(1024),
    )
        .prop_map(
            |(version, features, heartbeat_ms, max_write, server_version)| Welcome {
                version,
                features,
                heartbeat_ms,
                max_write,
                server_version,
            },
        )
}

/// Every frame a correct sender can encode (string fields within their limits).
fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        hello().prop_map(Frame::Hello),
        welcome().prop_map(Frame::Welcome),
        (any::<u32>(), id(), any::<u64>(), any::<u32>()).prop_map(
            |(request_id, disk_id, size, block_size)| {
                Frame::DiskOpen(DiskOpen {
                    request_id,
                    disk_id,
                    size,
                    block_size,
                })
            }
        ),
        (any::<u32>(), any::<u32>(), resume(), any::<u64>()).prop_map(
            |(request_id, handle, resume, durable_seq)| Frame::DiskOpened(DiskOpened {
                request_id,
                handle,
                resume,
                durable_seq
            })
        ),
        any::<u32>().prop_map(|handle| Frame::StreamBind(StreamBind { handle })),
        (any::<u32>(), any::<u64>(), any::<u64>(), payload()).prop_map(
            |(handle, seq, offset, data)| {
                Frame::Write(Write {
                    handle,
                    seq,
                    offset,
                    data,
                })
            }
        ),
        (any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(handle, seq, offset, len)| {
                Frame::WriteZeroes(WriteZeroes {
                    handle,
                    seq,
                    offset,
                    len,
                })
            }
        ),
        (any::<u32>(), any::<u64>()).prop_map(|(handle, seq)| Frame::Ack(Ack { handle, seq })),
        (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(handle, seq, marker_id)| {
            Frame::Marker(Marker {
                handle,
                seq,
                marker_id,
            })
        }),
        any::<u64>().prop_map(Frame::Heartbeat),
        (error_code(), any::<u32>(), string(1024)).prop_map(|(code, handle, message)| {
            Frame::Error(ErrorFrame {
                code,
                handle,
                message,
            })
        }),
        (any::<u32>(), phase(), any::<u64>(), any::<u64>()).prop_map(
            |(handle, phase, backlog_bytes, pass_seq)| Frame::Progress(Progress {
                handle,
                phase,
                backlog_bytes,
                pass_seq
            })
        ),
        any::<u64>().prop_map(|marker_id| Frame::MarkerRequest(MarkerRequest { marker_id })),
    ]
}

/// The bytes of `f`; Writes LZ4-compressed (where that is smaller) when `lz4`.
fn encode(f: &Frame, lz4: bool) -> Vec<u8> {
    match f {
        Frame::Write(w) => {
            let [head, payload] = w.encode_chunks(lz4);
            let mut v = head.to_vec();
            v.extend_from_slice(&payload);
            v
        }
        other => other.to_bytes().to_vec(),
    }
}

/// Feeds `bytes` to a decoder in the pieces `cuts` describes; returns the frames and the
/// error that ended decoding, if any. Panics if the decoder buffers past `max_body`.
fn decode_in_pieces(
    bytes: &[u8],
    cuts: &[usize],
    max_body: u32,
) -> (Vec<Frame>, Option<DecodeError>) {
    let mut dec = Decoder::new(max_body);
    let mut buf = BytesMut::new();
    let mut frames = vec![];
    let mut at = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(bytes.len());
    points.sort_unstable();
    for p in points {
        if p < at {
            continue;
        }
        buf.extend_from_slice(&bytes[at..p]);
        at = p;
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
            // What is buffered for one frame never exceeds its header's allowance.
            assert!(buf.capacity() <= bytes.len() + HEADER_LEN + max_body as usize + 64);
        }
    }
    (frames, None)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        // Failures are reported with the minimal input; no regression files in the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Codec

proptest! {
    #![proptest_config(config())]

    /// encode → decode is the identity, for every frame, raw and LZ4, through both decoding
    /// entry points.
    #[test]
    fn frames_round_trip(f in frame(), lz4 in any::<bool>()) {
        let bytes = encode(&f, lz4);
        // Buffering decoder, all at once.
        let mut dec = Decoder::new(MAX_BODY_LEN);
        let mut buf = BytesMut::from(&bytes[..]);
        let got = dec.decode(&mut buf).unwrap();
        prop_assert_eq!(got.as_ref(), Some(&f));
        prop_assert!(buf.is_empty());
        prop_assert_eq!(dec.decode(&mut buf).unwrap(), None);
        // Header then body.
        let mut head = [0u8; HEADER_LEN];
        head.copy_from_slice(&bytes[..HEADER_LEN]);
        let h = FrameHeader::parse(&head, MAX_BODY_LEN).unwrap();
        prop_assert_eq!(h.ty, f.frame_type());
        prop_assert_eq!(h.body_len as usize, bytes.len() - HEADER_LEN);
        let again = Frame::decode_body(h, Bytes::copy_from_slice(&bytes[HEADER_LEN..])).unwrap();
        prop_assert_eq!(again, f);
    }

    /// A stream of frames split at arbitrary points decodes to the same frames, in order.
    #[test]
    fn frame_sequences_survive_any_split(
        frames in prop::collection::vec(frame(), 1..8),
        lz4 in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let mut bytes = vec![];
        for f in &frames {
            bytes.extend(encode(f, lz4));
        }
        let (got, err) = decode_in_pieces(&bytes, &cuts, MAX_BODY_LEN);
        prop_assert_eq!(err, None);
        prop_assert_eq!(got, frames);
    }

    /// Every strict prefix of a valid frame makes the decoder wait: no frame, no error.
    #[test]
    fn prefixes_wait(f in frame(), lz4 in any::<bool>(), cut in any::<prop::sample::Index>()) {
        let bytes = encode(&f, lz4);
        let n = cut.index(bytes.len()); // 0..len: strictly shorter
        let mut dec = Decoder::new(MAX_BODY_LEN);
        let mut buf = BytesMut::from(&bytes[..n]);
        prop_assert_eq!(dec.decode(&mut buf), Ok(None));
        // And once the rest arrives, the frame comes out whole.
        buf.extend_from_slice(&bytes[n..]);
        prop_assert_eq!(dec.decode(&mut buf).unwrap(), Some(f));
    }

    /// Arbitrary bytes, split arbitrarily, under an arbitrary limit: the decoder never panics,
    /// and every frame it yields re-encodes to a frame that decodes to itself.
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        max_body in prop_oneof![Just(MAX_BODY_LEN), Just(65536u32), Just(64u32), 0u32..4096],
    ) {
        let (frames, _err) = decode_in_pieces(&bytes, &cuts, max_body);
        for f in frames {
            // (An unknown error code decodes as Internal, which re-encodes as itself.)
            let again = Frame::decode_body(
                FrameHeader::parse(
                    encode(&f, false)[..HEADER_LEN].try_into().unwrap(),
                    MAX_BODY_LEN,
                ).unwrap(),
                Bytes::from(encode(&f, false)[HEADER_LEN..].to_vec()),
            ).unwrap();
            prop_assert_eq!(again, f);
        }
    }

    /// Arbitrary bytes that start with a well-formed header: the body decoder never panics
    /// and rejects bodies of the wrong length for fixed-size frames.
    #[test]
    fn arbitrary_bodies_never_panic(
        ty in 1u8..=0x0D,
        lz4 in any::<bool>(),
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let flags = if ty == FrameType::Write as u8 && lz4 { slipway_proto::FLAG_LZ4 } else { 0 };
        let mut head = [ty, flags, 0, 0, 0, 0, 0, 0];
        head[4..].copy_from_slice(&(body.len() as u32).to_be_bytes());
        let h = FrameHeader::parse(&head, MAX_BODY_LEN).unwrap();
        let fixed = match h.ty {
            FrameType::DiskOpened => Some(17),
            FrameType::StreamBind => Some(4),
            FrameType::WriteZeroes => Some(28),
            FrameType::Ack => Some(12),
            FrameType::Marker => Some(20),
            FrameType::Heartbeat => Some(8),
            FrameType::Progress => Some(21),
            FrameType::MarkerRequest => Some(8),
            _ => None,
        };
        let r = Frame::decode_body(h, Bytes::from(body.clone()));
        if let Some(n) = fixed {
            if body.len() != n {
                prop_assert!(r.is_err(), "{:?} body of {} bytes accepted", h.ty, body.len());
            }
        }
    }

    /// The header alone decides: a body length above the limit is refused before any body
    /// byte, whatever follows; unknown types, flags and reserved bits likewise.
    #[test]
    fn headers_are_checked_alone(head in any::<[u8; 8]>(), max_body in any::<u32>()) {
        let r = FrameHeader::parse(&head, max_body);
        let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        match r {
            Ok(h) => {
                prop_assert!(h.body_len <= max_body.min(MAX_BODY_LEN));
                prop_assert_eq!(head[2], 0);
                prop_assert_eq!(head[3], 0);
                prop_assert!(head[1] == 0 || (head[0] == FrameType::Write as u8 && head[1] == 1));
            }
            Err(DecodeError::TooLarge { len: l, max }) => {
                prop_assert_eq!(l, len);
                prop_assert!(len > max);
            }
            Err(_) => {}
        }
    }

    /// Flipping one byte of a valid Write never yields a Write with other data than was sent
    /// at the same offset: the CRC-32 (or a structural check) catches it.
    #[test]
    fn corrupted_writes_are_caught(
        data in prop::collection::vec(any::<u8>(), 1..4096),
        lz4 in any::<bool>(),
        at in any::<prop::sample::Index>(),
        xor in 1u8..=255,
    ) {
        let w = Write { handle: 1, seq: 2, offset: 4096, data: Bytes::from(data) };
        let mut bytes = encode(&Frame::Write(w.clone()), lz4);
        let i = at.index(bytes.len());
        bytes[i] ^= xor;
        let (frames, _) = decode_in_pieces(&bytes, &[], MAX_BODY_LEN);
        for f in frames {
            if let Frame::Write(got) = f {
                // Only the header fields that carry no data may change undetected.
                prop_assert_eq!(got.data, w.data.clone(), "corruption at byte {} slipped through", i);
            }
        }
    }

    /// A Write whose `len` exceeds 4 MiB is refused before anything is decompressed.
    #[test]
    fn oversized_write_len_is_refused(len in (MAX_WRITE_LEN + 1)..=u32::MAX, lz4 in any::<bool>()) {
        let mut body = vec![];
        body.extend_from_slice(&1u32.to_be_bytes());
        body.extend_from_slice(&1u64.to_be_bytes());
        body.extend_from_slice(&0u64.to_be_bytes());
        body.extend_from_slice(&len.to_be_bytes());
        body.extend_from_slice(&0u32.to_be_bytes());
        body.extend_from_slice(&[0u8; 16]);
        let mut head = [FrameType::Write as u8, u8::from(lz4), 0, 0, 0, 0, 0, 0];
        head[4..].copy_from_slice(&(body.len() as u32).to_be_bytes());
        let h = FrameHeader::parse(&head, MAX_BODY_LEN).unwrap();
        let r = Frame::decode_body(h, Bytes::from(body));
        let is_too_large = matches!(r, Err(DecodeError::TooLarge { .. }));
        prop_assert!(is_too_large, "{:?}", r);
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake

fn params(lz4: bool) -> ServerParams {
    ServerParams {
        features: if lz4 { features::LZ4 } else { 0 },
        heartbeat_ms: 5000,
        max_write: 1 << 20,
        server_version: "prop".into(),
    }
}

proptest! {
    #![proptest_config(config())]

    /// The server machine answers any first frame, calls `authorize` only for a well-formed
    /// Hello with a common version and a valid source id, and welcomes exactly when it says
    /// yes — with a version and features both sides support.
    #[test]
    fn server_handshake_accepts_exactly_what_it_should(
        first in prop_oneof![3 => hello().prop_map(Frame::Hello), 1 => frame()],
        rest in prop::collection::vec(frame(), 0..3),
        lz4 in any::<bool>(),
        allow in any::<bool>(),
    ) {
        let mut hs = ServerHandshake::new(params(lz4));
        let mut asked = false;
        let r = hs.on_frame(first.clone(), |_, _| { asked = true; allow });
        let eligible = match &first {
            Frame::Hello(h) => {
                let v = h.version_max.min(VERSION_MAX);
                h.version_min <= h.version_max
                    && v >= h.version_min.max(VERSION_MIN)
                    && slipway_proto::valid_id(&h.source_id)
            }
            _ => false,
        };
        prop_assert_eq!(asked, eligible);
        match r {
            Ok((Frame::Welcome(w), n)) => {
                prop_assert!(eligible && allow);
                let Frame::Hello(h) = &first else { unreachable!() };
                prop_assert!(w.version >= VERSION_MIN && w.version <= VERSION_MAX);
                prop_assert!(w.version >= h.version_min && w.version <= h.version_max);
                prop_assert_eq!(w.features & !h.features, 0);
                prop_assert_eq!(w.features & !features::ALL, 0);
                prop_assert!(lz4 || w.features & features::LZ4 == 0);
                prop_assert_eq!(&n.source_id, &h.source_id);
                // A welcome the real client accepts.
                let mut c = ClientHandshake::new(h.clone());
                prop_assert!(c.on_frame(Frame::Welcome(w)).is_ok());
            }
            Ok((other, _)) => prop_assert!(false, "welcomed with {:?}", other),
            Err((e, Frame::Error(f))) => {
                prop_assert!(!(eligible && allow), "refused an eligible hello: {}", e);
                let want = match &first {
                    Frame::Hello(h) if !(h.version_min <= h.version_max
                        && h.version_max.min(VERSION_MAX) >= h.version_min.max(VERSION_MIN)) => ErrorCode::BadVersion,
                    Frame::Hello(h) if !slipway_proto::valid_id(&h.source_id) => ErrorCode::InvalidArgument,
                    Frame::Hello(_) => ErrorCode::Unauthorized,
                    _ => ErrorCode::Malformed,
                };
                prop_assert_eq!(f.code, want);
            }
            Err((_, other)) => prop_assert!(false, "refused with {:?}", other),
        }
        // Whatever follows, the machine is over: no second welcome, authorize never called.
        for f in rest {
            let r = hs.on_frame(f, |_, _| panic!("authorize after the handshake"));
            prop_assert!(r.is_err());
        }
    }

    /// The client machine accepts only a Welcome inside what its Hello offered.
    #[test]
    fn client_handshake_accepts_only_a_fitting_welcome(
        h in hello(),
        answer in prop_oneof![3 => welcome().prop_map(Frame::Welcome), 1 => frame()],
        rest in prop::collection::vec(frame(), 0..3),
    ) {
        let mut c = ClientHandshake::new(h.clone());
        let offered = match c.hello_frame() {
            Frame::Hello(x) => x,
            _ => unreachable!(),
        };
        prop_assert_eq!((offered.version_min, offered.version_max), (VERSION_MIN, VERSION_MAX));
        let r = c.on_frame(answer.clone());
        let fits = match &answer {
            Frame::Welcome(w) => {
                w.version >= VERSION_MIN
                    && w.version <= VERSION_MAX
                    && w.features & !h.features == 0
                    && w.max_write > 0
                    && w.max_write <= MAX_WRITE_LEN
                    && w.heartbeat_ms > 0
            }
            _ => false,
        };
        prop_assert_eq!(r.is_ok(), fits, "{:?} -> {:?}", answer, r);
        for f in rest {
            prop_assert!(c.on_frame(f).is_err());
        }
    }
}
