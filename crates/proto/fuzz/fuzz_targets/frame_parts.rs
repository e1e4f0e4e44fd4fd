//! `FrameHeader::parse` on the first 8 bytes, then `Frame::decode_body` on exactly the body
//! the header announces (as `slipway_net::read_frame` does): never a panic; a header accepted
//! only within the limit; a decoded frame re-encodes to the same bytes' meaning.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use slipway_proto::{Frame, FrameHeader, HEADER_LEN, MAX_BODY_LEN};

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER_LEN + 1 {
        return;
    }
    let lz4_ok = data[0] & 1 == 1;
    let mut head = [0u8; HEADER_LEN];
    head.copy_from_slice(&data[1..1 + HEADER_LEN]);
    let rest = &data[1 + HEADER_LEN..];
    let Ok(h) = FrameHeader::parse(&head, MAX_BODY_LEN) else {
        return;
    };
    assert!(h.body_len <= MAX_BODY_LEN);
    if !lz4_ok && h.flags & slipway_proto::FLAG_LZ4 != 0 {
        return; // refused by read_frame_with before the body
    }
    if rest.len() < h.body_len as usize {
        return; // the stream would wait for more
    }
    let body = Bytes::copy_from_slice(&rest[..h.body_len as usize]);
    if let Ok(f) = Frame::decode_body(h, body) {
        assert_eq!(f.frame_type(), h.ty);
        let bytes = f.to_bytes();
        let mut head2 = [0u8; HEADER_LEN];
        head2.copy_from_slice(&bytes[..HEADER_LEN]);
        let h2 = FrameHeader::parse(&head2, MAX_BODY_LEN).expect("re-encoded header parses");
        let again = Frame::decode_body(h2, bytes.slice(HEADER_LEN..)).expect("re-encoded body");
        assert_eq!(again, f);
    }
});
