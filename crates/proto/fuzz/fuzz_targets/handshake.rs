//! Arbitrary frame sequences into both handshake machines. The bytes are decoded into frames
//! (control-stream limit); the first goes to a `ServerHandshake`, all of them to a
//! `ClientHandshake`. Properties: no panic; `authorize` is consulted only for a well-formed
//! Hello; a Welcome is produced only when authorize said yes, and the real client accepts it;
//! after the first frame both machines refuse everything.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use slipway_proto::handshake::ServerParams;
use slipway_proto::{
    features, ClientHandshake, Decoder, Frame, Hello, ServerHandshake, MAX_WRITE_LEN, VERSION_MAX,
    VERSION_MIN,
};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let allow = data[0] & 1 == 1;
    let lz4 = data[0] & 2 == 2;
    let client_features = u32::from(data[1]);
    let mut dec = Decoder::new(64 * 1024);
    let mut buf = BytesMut::from(&data[2..]);
    let mut frames = vec![];
    while let Ok(Some(f)) = dec.decode(&mut buf) {
        frames.push(f);
        if frames.len() == 16 {
            break;
        }
    }
    let Some(first) = frames.first().cloned() else {
        return;
    };

    // Server side.
    let mut server = ServerHandshake::new(ServerParams {
        features: if lz4 { features::LZ4 } else { 0 },
        heartbeat_ms: 5000,
        max_write: MAX_WRITE_LEN,
        server_version: "fuzz".into(),
    });
    let mut asked = false;
    let r = server.on_frame(first.clone(), |_, _| {
        asked = true;
        allow
    });
    match (&first, &r) {
        (Frame::Hello(h), Ok((Frame::Welcome(w), n))) => {
            assert!(asked && allow);
            assert!(w.version >= h.version_min.max(VERSION_MIN));
            assert!(w.version <= h.version_max.min(VERSION_MAX));
            assert_eq!(w.features & !h.features, 0);
            assert!(slipway_proto::valid_id(&n.source_id));
            let mut c = ClientHandshake::new(h.clone());
            assert!(c.on_frame(Frame::Welcome(w.clone())).is_ok());
        }
        (_, Ok(_)) => panic!("welcomed a non-hello or with a non-welcome"),
        (Frame::Hello(_), Err(_)) => assert!(!(asked && allow)),
        (_, Err((_, Frame::Error(_)))) => assert!(!asked),
        (_, Err((_, f))) => panic!("refused with a non-error frame {f:?}"),
    }
    for f in frames.iter().skip(1) {
        assert!(server
            .on_frame(f.clone(), |_, _| panic!("authorize after the handshake"))
            .is_err());
    }

    // Client side: the same frames as the server's answers.
    let mut client = ClientHandshake::new(Hello {
        version_min: 0,
        version_max: 0,
        features: client_features,
        agent_run: 1,
        source_id: "fuzz".into(),
        credential: "x".into(),
        agent_version: "fuzz".into(),
    });
    let ok = client.on_frame(first.clone());
    if let Ok(n) = &ok {
        let Frame::Welcome(w) = &first else {
            panic!("negotiated from a non-welcome");
        };
        assert!(w.version >= VERSION_MIN && w.version <= VERSION_MAX);
        assert_eq!(n.features & !client_features, 0);
        assert!(n.max_write > 0 && n.max_write <= MAX_WRITE_LEN);
        assert!(n.heartbeat_ms > 0);
    }
    for f in frames.iter().skip(1) {
        assert!(client.on_frame(f.clone()).is_err());
    }
});
