//! The hello/welcome handshake as two small state machines, one per side.
//!
//! Neither side does I/O: the shell feeds the first frame read from the control stream to
//! `on_frame` and writes out what it returns. Authentication is a callback so the policy (token
//! derivation, client certificates) stays with the server and the machine stays testable.
//!
//! ```text
//! agent                                server
//!   ClientHandshake::hello_frame() ──▶ ServerHandshake::on_frame(Hello, authorize)
//!   ClientHandshake::on_frame()   ◀── Welcome | Error(BadVersion | Unauthorized | Malformed)
//! ```

use thiserror::Error;

use crate::frame::{ErrorCode, ErrorFrame, Frame, FrameType, Hello, Welcome};
use crate::{features, valid_id, MAX_WRITE_LEN, VERSION_MAX, VERSION_MIN};

/// What both sides agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub version: u16,
    pub features: u32,
    pub source_id: String,
    pub agent_run: u64,
    pub heartbeat_ms: u32,
    pub max_write: u32,
    /// The peer's self-description (agent or server version string).
    pub peer_version: String,
}

impl Negotiated {
    pub fn lz4(&self) -> bool {
        self.features & features::LZ4 != 0
    }
}

/// Why a handshake failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// expected {expected:?}, got {got:?}
    #[error("expected a {expected:?} frame, got {got:?}")]
    UnexpectedFrame { expected: FrameType, got: FrameType },
    /// no protocol version in common
    #[error("no protocol version in common: we speak {ours_min}..={ours_max}, peer {theirs_min}..={theirs_max}")]
    NoCommonVersion {
        ours_min: u16,
        ours_max: u16,
        theirs_min: u16,
        theirs_max: u16,
    },
    /// the source id is not valid
    #[error("source id {0:?} is not valid (1-128 of A-Z a-z 0-9 . _ -)")]
    BadSourceId(String),
    /// credential refused
    #[error("credential refused for source {0:?}")]
    Unauthorized(String),
    /// on_frame was called after the handshake ended
    #[error("the handshake is already over")]
    Finished,
    /// the server refused the hello
    #[error("server refused the hello: {0}")]
    Refused(ErrorFrame),
    /// the welcome does not fit what was asked
    #[error("bad welcome: {0}")]
    BadWelcome(&'static str),
}

/// Server side settings for the handshake.
#[derive(Debug, Clone)]
pub struct ServerParams {
    /// Features the server is willing to use.
    pub features: u32,
    pub heartbeat_ms: u32,
    pub max_write: u32,
    pub server_version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitFirst,
    Done,
}

/// Server half: accepts exactly one hello.
#[derive(Debug)]
pub struct ServerHandshake {
    params: ServerParams,
    state: State,
}

impl ServerHandshake {
    pub fn new(params: ServerParams) -> Self {
        ServerHandshake {
            params,
            state: State::AwaitFirst,
        }
    }

    /// Feeds the first control-stream frame. On success returns the welcome to send and what
    /// was agreed; on failure the error frame to send before closing, and why. The answer
    /// depends only on `frame`, the params and `authorize(source_id, credential)`, which is
    /// called only for a well-formed hello with a common version.
    pub fn on_frame(
        &mut self,
        frame: Frame,
        authorize: impl FnOnce(&str, &str) -> bool,
    ) -> Result<(Frame, Negotiated), (HandshakeError, Frame)> {
        if self.state == State::Done {
            let e = HandshakeError::Finished;
            return Err((
                e.clone(),
                Frame::Error(ErrorFrame::new(ErrorCode::Malformed, e.to_string())),
            ));
        }
        self.state = State::Done;
        let refuse = |code: ErrorCode, e: HandshakeError| {
            let f = Frame::Error(ErrorFrame::new(code, e.to_string()));
            Err((e, f))
        };
        let hello = match frame {
            Frame::Hello(h) => h,
            other => {
                return refuse(
                    ErrorCode::Malformed,
                    HandshakeError::UnexpectedFrame {
                        expected: FrameType::Hello,
                        got: other.frame_type(),
                    },
                )
            }
        };
        let version = hello.version_max.min(VERSION_MAX);
        if hello.version_min > hello.version_max || version < hello.version_min.max(VERSION_MIN) {
            return refuse(
                ErrorCode::BadVersion,
                HandshakeError::NoCommonVersion {
                    ours_min: VERSION_MIN,
                    ours_max: VERSION_MAX,
                    theirs_min: hello.version_min,
                    theirs_max: hello.version_max,
                },
            );
        }
        if !valid_id(&hello.source_id) {
            return refuse(
                ErrorCode::InvalidArgument,
                HandshakeError::BadSourceId(hello.source_id),
            );
        }
        if !authorize(&hello.source_id, &hello.credential) {
            return refuse(
                ErrorCode::Unauthorized,
                HandshakeError::Unauthorized(hello.source_id),
            );
        }
        let features = hello.features & self.params.features & features::ALL;
        let max_write = self.params.max_write.min(MAX_WRITE_LEN);
        let welcome = Welcome {
            version,
            features,
            heartbeat_ms: self.params.heartbeat_ms,
            max_write,
            server_version: self.params.server_version.clone(),
        };
        let n = Negotiated {
            version,
            features,
            source_id: hello.source_id,
            agent_run: hello.agent_run,
            heartbeat_ms: self.params.heartbeat_ms,
            max_write,
            peer_version: hello.agent_version,
        };
        Ok((Frame::Welcome(welcome), n))
    }
}

/// Agent half: sends one hello, accepts one welcome.
#[derive(Debug)]
pub struct ClientHandshake {
    hello: Hello,
    state: State,
}

impl ClientHandshake {
    /// `hello.version_min/max` are overwritten with this build's range.
    pub fn new(mut hello: Hello) -> Self {
        hello.version_min = VERSION_MIN;
        hello.version_max = VERSION_MAX;
        ClientHandshake {
            hello,
            state: State::AwaitFirst,
        }
    }

    /// The frame to send first. Unchanged by `on_frame`.
    pub fn hello_frame(&self) -> Frame {
        Frame::Hello(self.hello.clone())
    }

    /// Feeds the server's first frame.
    pub fn on_frame(&mut self, frame: Frame) -> Result<Negotiated, HandshakeError> {
        if self.state == State::Done {
            return Err(HandshakeError::Finished);
        }
        self.state = State::Done;
        let w = match frame {
            Frame::Welcome(w) => w,
            Frame::Error(e) => return Err(HandshakeError::Refused(e)),
            other => {
                return Err(HandshakeError::UnexpectedFrame {
                    expected: FrameType::Welcome,
                    got: other.frame_type(),
                })
            }
        };
        if w.version < self.hello.version_min || w.version > self.hello.version_max {
            return Err(HandshakeError::BadWelcome(
                "version outside the range we offered",
            ));
        }
        if w.features & !self.hello.features != 0 {
            return Err(HandshakeError::BadWelcome("features we did not ask for"));
        }
        if w.max_write == 0 || w.max_write > MAX_WRITE_LEN {
            return Err(HandshakeError::BadWelcome("max_write out of range"));
        }
        if w.heartbeat_ms == 0 {
            return Err(HandshakeError::BadWelcome("heartbeat interval of zero"));
        }
        Ok(Negotiated {
            version: w.version,
            features: w.features,
            source_id: self.hello.source_id.clone(),
            agent_run: self.hello.agent_run,
            heartbeat_ms: w.heartbeat_ms,
            max_write: w.max_write,
            peer_version: w.server_version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Ack;

    fn params() -> ServerParams {
        ServerParams {
            features: features::LZ4,
            heartbeat_ms: 5000,
            max_write: 1 << 20,
            server_version: "test".into(),
        }
    }

    fn hello(features: u32) -> Hello {
        Hello {
            version_min: 0,
            version_max: 0,
            features,
            agent_run: 77,
            source_id: "src-1".into(),
            credential: "good".into(),
            agent_version: "agent".into(),
        }
    }

    /// Runs both machines against each other, through the codec, as the shells would.
    fn pair(
        features: u32,
        server_features: u32,
        cred_ok: bool,
    ) -> (
        Result<Negotiated, HandshakeError>,
        Option<Result<Negotiated, HandshakeError>>,
    ) {
        let mut c = ClientHandshake::new(hello(features));
        let mut s = ServerHandshake::new(ServerParams {
            features: server_features,
            ..params()
        });
        let wire = c.hello_frame().to_bytes();
        let f = decode(&wire);
        match s.on_frame(f, |src, cred| src == "src-1" && cred == "good" && cred_ok) {
            Ok((welcome, n)) => {
                let back = decode(&welcome.to_bytes());
                (c.on_frame(back), Some(Ok(n)))
            }
            Err((e, errf)) => {
                let back = decode(&errf.to_bytes());
                (c.on_frame(back), Some(Err(e)))
            }
        }
    }

    fn decode(b: &[u8]) -> Frame {
        let mut d = crate::Decoder::new(crate::MAX_BODY_LEN);
        let mut buf = bytes::BytesMut::from(b);
        d.decode(&mut buf).unwrap().unwrap()
    }

    #[test]
    fn agrees_on_version_and_features() {
        let (client, server) = pair(features::LZ4, features::LZ4, true);
        let client = client.unwrap();
        let server = server.unwrap().unwrap();
        assert_eq!(client.version, 1);
        assert!(client.lz4() && server.lz4());
        assert_eq!(client.max_write, 1 << 20);
        assert_eq!(server.source_id, "src-1");
        assert_eq!(server.agent_run, 77);
        assert_eq!(client.peer_version, "test");
        assert_eq!(server.peer_version, "agent");
    }

    #[test]
    fn feature_off_on_either_side_is_off() {
        let (c, _) = pair(0, features::LZ4, true);
        assert!(!c.unwrap().lz4());
        let (c, _) = pair(features::LZ4, 0, true);
        assert!(!c.unwrap().lz4());
        // Unknown feature bits asked for by a newer agent are simply not granted.
        let (c, _) = pair(features::LZ4 | 1 << 31, features::ALL, true);
        assert_eq!(c.unwrap().features, features::LZ4);
    }

    #[test]
    fn wrong_credential_is_refused_with_unauthorized() {
        let (client, server) = pair(0, 0, false);
        match client {
            Err(HandshakeError::Refused(e)) => assert_eq!(e.code, ErrorCode::Unauthorized),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            server.unwrap().unwrap_err(),
            HandshakeError::Unauthorized("src-1".into())
        );
    }

    #[test]
    fn no_common_version() {
        let mut s = ServerHandshake::new(params());
        let mut h = hello(0);
        h.version_min = 2;
        h.version_max = 5;
        let mut called = false;
        let (e, f) = s
            .on_frame(Frame::Hello(h), |_, _| {
                called = true;
                true
            })
            .unwrap_err();
        assert!(matches!(e, HandshakeError::NoCommonVersion { .. }));
        assert!(matches!(
            f,
            Frame::Error(ErrorFrame {
                code: ErrorCode::BadVersion,
                ..
            })
        ));
        assert!(
            !called,
            "credentials are not checked for a hello we cannot speak"
        );
        // An inverted range is no range at all.
        let mut s = ServerHandshake::new(params());
        let mut h = hello(0);
        h.version_min = 1;
        h.version_max = 0;
        assert!(matches!(
            s.on_frame(Frame::Hello(h), |_, _| true),
            Err((HandshakeError::NoCommonVersion { .. }, _))
        ));
    }

    #[test]
    fn newer_agent_range_negotiates_down() {
        let mut s = ServerHandshake::new(params());
        let mut h = hello(0);
        h.version_min = 1;
        h.version_max = 9;
        let (w, n) = s.on_frame(Frame::Hello(h), |_, _| true).unwrap();
        assert_eq!(n.version, 1);
        assert!(matches!(w, Frame::Welcome(Welcome { version: 1, .. })));
    }

    #[test]
    fn bad_source_id_and_wrong_first_frame() {
        let mut s = ServerHandshake::new(params());
        let mut h = hello(0);
        h.version_min = 1;
        h.version_max = 1;
        h.source_id = "../etc".into();
        assert!(matches!(
            s.on_frame(Frame::Hello(h), |_, _| true),
            Err((HandshakeError::BadSourceId(_), _))
        ));
        let mut s = ServerHandshake::new(params());
        let (e, _) = s
            .on_frame(Frame::Ack(Ack { handle: 1, seq: 1 }), |_, _| true)
            .unwrap_err();
        assert_eq!(
            e,
            HandshakeError::UnexpectedFrame {
                expected: FrameType::Hello,
                got: FrameType::Ack
            }
        );
    }

    #[test]
    fn a_second_hello_is_refused() {
        let mut s = ServerHandshake::new(params());
        let mut h = hello(0);
        h.version_min = 1;
        h.version_max = 1;
        s.on_frame(Frame::Hello(h.clone()), |_, _| true).unwrap();
        assert!(matches!(
            s.on_frame(Frame::Hello(h), |_, _| true),
            Err((HandshakeError::Finished, _))
        ));
    }

    #[test]
    fn client_checks_the_welcome() {
        let w = |version, features, max_write, heartbeat_ms| {
            Frame::Welcome(Welcome {
                version,
                features,
                heartbeat_ms,
                max_write,
                server_version: "s".into(),
            })
        };
        let run = |f| ClientHandshake::new(hello(features::LZ4)).on_frame(f);
        assert!(run(w(1, features::LZ4, 4096, 1)).is_ok());
        assert!(matches!(
            run(w(2, 0, 4096, 1)),
            Err(HandshakeError::BadWelcome(_))
        ));
        assert!(matches!(
            run(w(1, 2, 4096, 1)),
            Err(HandshakeError::BadWelcome(_))
        ));
        assert!(matches!(
            run(w(1, 0, 0, 1)),
            Err(HandshakeError::BadWelcome(_))
        ));
        assert!(matches!(
            run(w(1, 0, MAX_WRITE_LEN + 1, 1)),
            Err(HandshakeError::BadWelcome(_))
        ));
        assert!(matches!(
            run(w(1, 0, 4096, 0)),
            Err(HandshakeError::BadWelcome(_))
        ));
        assert!(matches!(
            run(Frame::Heartbeat(1)),
            Err(HandshakeError::UnexpectedFrame { .. })
        ));
        let mut c = ClientHandshake::new(hello(0));
        c.on_frame(w(1, 0, 4096, 1)).unwrap();
        assert_eq!(c.on_frame(w(1, 0, 4096, 1)), Err(HandshakeError::Finished));
    }
}
