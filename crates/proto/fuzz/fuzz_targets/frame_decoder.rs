//! The buffering `Decoder` over arbitrary bytes, fed in arbitrary pieces under an arbitrary
//! limit: it must never panic, never buffer past the limit it was given, and every frame it
//! yields must re-encode to bytes that decode to the same frame.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use slipway_proto::{Decoder, Frame, HEADER_LEN, MAX_BODY_LEN};

const LIMITS: [u32; 4] = [MAX_BODY_LEN, 65536, 64, 0];

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let max_body = LIMITS[(data[0] & 3) as usize];
    let piece = 1 + data[1] as usize;
    let stream = &data[2..];
    let mut dec = Decoder::new(max_body);
    let mut buf = BytesMut::new();
    for chunk in stream.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => check_round_trip(&f),
                Ok(None) => break,
                Err(_) => return, // an error is final for the stream
            }
            assert!(buf.capacity() <= stream.len() + HEADER_LEN + max_body as usize + 64);
        }
    }
});

fn check_round_trip(f: &Frame) {
    let bytes = f.to_bytes();
    let mut dec = Decoder::new(MAX_BODY_LEN);
    let mut buf = BytesMut::from(&bytes[..]);
    let again = dec
        .decode(&mut buf)
        .expect("a decoded frame re-encodes validly");
    assert_eq!(again.as_ref(), Some(f));
    assert!(buf.is_empty());
}
