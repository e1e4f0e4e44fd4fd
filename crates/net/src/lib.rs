//! QUIC plumbing shared by the server and the agent.
//!
//! Both ends must agree on the transport levers that matter for bulk block streams (packet size,
//! windows, congestion control, socket buffers), so they are built in one place from one
//! [`Tuning`]. TLS is always on and always 1.3: the server side loads or generates its
//! certificate, the agent side pins it by CA file or SHA-256 fingerprint.
//!
//! Architecture invariant: the only frame reader is [`read_frame`], which checks the header
//! (and with it the length) before it allocates the body.

// A peer's input never panics this crate: no `unwrap` outside tests (house style, quinn).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod tls;
pub mod units;

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use slipway_proto::{DecodeError, Frame, FrameHeader, Write, HEADER_LEN};
use thiserror::Error;

/// Congestion controller choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    Cubic,
    NewReno,
    Bbr,
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cubic" => Ok(Congestion::Cubic),
            "newreno" => Ok(Congestion::NewReno),
            "bbr" => Ok(Congestion::Bbr),
            _ => Err(format!("{s:?} is not one of cubic, newreno, bbr")),
        }
    }
}

/// Transport levers. Defaults suit a staging subnet reached over a WAN; see
/// docs/configuration.md for each.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Largest UDP payload probed by path-MTU discovery (and accepted by the endpoint).
    /// quinn sends up to 10 segments per GSO batch, which must fit 64 KiB: keep this ≤ 6500.
    pub max_udp_payload: u16,
    /// First packet size; 1200 is always safe.
    pub initial_mtu: u16,
    pub congestion: Congestion,
    /// Per-stream receive window (bytes).
    pub stream_window: u64,
    /// Per-connection receive window (bytes).
    pub connection_window: u64,
    /// Per-connection send buffer (bytes).
    pub send_window: u64,
    /// Close a connection that has been silent this long.
    pub idle_timeout: Duration,
    /// Send QUIC keep-alives this often.
    pub keep_alive: Duration,
    /// Requested SO_RCVBUF / SO_SNDBUF.
    pub socket_buffer: usize,
    /// Streams a peer may open at once.
    pub max_streams: u32,
    /// Ack-eliciting packets the peer may receive before it must acknowledge them (QUIC's
    /// ACK frequency extension, draft-ietf-quic-ack-frequency as quinn implements it; quinn's
    /// reordering threshold of 2 still acknowledges a gap of two or more packets at once, a
    /// packet reordered by one waits for the threshold or the 25 ms delayed-ACK timer and loss
    /// is then found by the sender's time threshold, 9/8 RTT). `None`: ask nothing, the peer
    /// acknowledges every second packet. The agent sends and the server receives, so this is
    /// what the server's acknowledgements cost: at 100 connections the server sent 31 % and
    /// 45 % fewer datagrams with thresholds 10 and 30, and spent 6 % less CPU per GiB with 16
    /// (docs/decisions.md).
    pub ack_eliciting_threshold: Option<u32>,
}

/// Default of [`Tuning::ack_eliciting_threshold`]: an ACK per 17 packets, about 110 KB at the
/// 6500-byte payloads used on loopback and in a VPC, still several per round trip of a WAN
/// window.
pub const ACK_ELICITING_THRESHOLD: u32 = 16;

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            max_udp_payload: 6500,
            initial_mtu: 1200,
            congestion: Congestion::Cubic,
            stream_window: 16 << 20,
            connection_window: 32 << 20,
            send_window: 32 << 20,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            socket_buffer: 16 << 20,
            max_streams: 64,
            ack_eliciting_threshold: Some(ACK_ELICITING_THRESHOLD),
        }
    }
}

impl Tuning {
    /// The quinn transport config for either side.
    pub fn transport(&self) -> quinn::TransportConfig {
        use quinn::congestion;
        let mut t = quinn::TransportConfig::default();
        let initial = self.initial_mtu.clamp(1200, self.max_udp_payload.max(1200));
        t.initial_mtu(initial);
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload.max(initial));
        t.mtu_discovery_config(Some(mtu));
        t.stream_receive_window(varint(self.stream_window));
        t.receive_window(varint(self.connection_window));
        t.send_window(self.send_window);
        t.max_concurrent_bidi_streams(self.max_streams.into());
        t.max_concurrent_uni_streams(0u32.into());
        t.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(self.idle_timeout).expect("idle timeout in range"),
        ));
        t.keep_alive_interval(Some(self.keep_alive));
        if let Some(n) = self.ack_eliciting_threshold {
            let mut ack = quinn::AckFrequencyConfig::default();
            ack.ack_eliciting_threshold(n.into());
            t.ack_frequency_config(Some(ack));
        }
        match self.congestion {
            Congestion::Cubic => {
                t.congestion_controller_factory(Arc::new(congestion::CubicConfig::default()))
            }
            Congestion::NewReno => {
                t.congestion_controller_factory(Arc::new(congestion::NewRenoConfig::default()))
            }
            Congestion::Bbr => {
                t.congestion_controller_factory(Arc::new(congestion::BbrConfig::default()))
            }
        };
        t
    }

    fn endpoint_config(&self, reset_key: Option<&[u8; 32]>) -> quinn::EndpointConfig {
        let mut e = match reset_key {
            // A key that survives restarts: peers of a crashed-and-restarted server get its
            // stateless resets and reconnect at once instead of waiting for the idle timeout.
            // Both halves must persist: quinn drops a packet whose connection id its generator
            // does not recognise before it considers a reset, and the default generator's key
            // is random per process, so the ids it hands out are keyed from `k` too.
            Some(k) => {
                let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k);
                let tag = ring::hmac::sign(&hmac, b"slipway quic connection ids");
                let cid_key = u64::from_le_bytes(tag.as_ref()[..8].try_into().expect("8 bytes"));
                let mut e = quinn::EndpointConfig::new(Arc::new(hmac));
                e.cid_generator(move || {
                    Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
                });
                e
            }
            None => quinn::EndpointConfig::default(),
        };
        e.max_udp_payload_size(self.max_udp_payload.max(1200))
            .expect("payload size in range");
        e
    }

    /// A bound UDP socket with the requested buffers.
    fn socket(&self, addr: SocketAddr) -> std::io::Result<UdpSocket> {
        let domain = socket2::Domain::for_address(addr);
        let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        if addr.is_ipv6() {
            s.set_only_v6(false).ok();
        }
        set_buffer(
            &s,
            libc::SO_RCVBUFFORCE,
            libc::SO_RCVBUF,
            self.socket_buffer,
        );
        set_buffer(
            &s,
            libc::SO_SNDBUFFORCE,
            libc::SO_SNDBUF,
            self.socket_buffer,
        );
        s.bind(&addr.into())?;
        Ok(s.into())
    }

    /// A server endpoint on `addr`.
    pub fn server_endpoint(
        &self,
        addr: SocketAddr,
        server: quinn::ServerConfig,
    ) -> std::io::Result<quinn::Endpoint> {
        self.server_endpoint_with(addr, server, None)
    }

    /// A server endpoint whose stateless-reset key is `reset_key` (keep it across restarts).
    pub fn server_endpoint_with(
        &self,
        addr: SocketAddr,
        server: quinn::ServerConfig,
        reset_key: Option<&[u8; 32]>,
    ) -> std::io::Result<quinn::Endpoint> {
        quinn::Endpoint::new(
            self.endpoint_config(reset_key),
            Some(server),
            self.socket(addr)?,
            Arc::new(quinn::TokioRuntime),
        )
    }

    /// A client endpoint on an ephemeral port of the family of `peer`.
    pub fn client_endpoint(&self, peer: SocketAddr) -> std::io::Result<quinn::Endpoint> {
        let local = if peer.is_ipv6() {
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
        };
        quinn::Endpoint::new(
            self.endpoint_config(None),
            None,
            self.socket(local)?,
            Arc::new(quinn::TokioRuntime),
        )
    }
}

fn varint(v: u64) -> quinn::VarInt {
    quinn::VarInt::from_u64(v.min((1 << 62) - 1)).expect("clamped")
}

/// Sets a socket buffer, using the privileged FORCE option when allowed (root, or
/// CAP_NET_ADMIN) so the size is not capped at net.core.*mem_max.
fn set_buffer(s: &socket2::Socket, force: libc::c_int, plain: libc::c_int, size: usize) {
    let v = size.min(i32::MAX as usize) as libc::c_int;
    for opt in [force, plain] {
        // SAFETY: setsockopt on a valid socket fd with a pointer to a live c_int and its size.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return;
        }
    }
}

/// Why a frame could not be read from a stream.
#[derive(Debug, Error)]
pub enum FrameIoError {
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    UnexpectedEnd,
    /// The transport failed (connection lost, stream reset).
    #[error("reading from the peer: {0}")]
    Read(#[from] quinn::ReadError),
    /// The bytes are not a valid frame.
    #[error("bad frame: {0}")]
    Decode(#[from] DecodeError),
    /// A frame began but did not finish in time.
    #[error("a frame stalled: not complete within {0:?} of its first byte")]
    Stalled(std::time::Duration),
}

/// Reads one frame. `Ok(None)` when the stream finished cleanly at a frame boundary. The header
/// is validated against `max_body` before any body byte is read or buffer allocated.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    max_body: u32,
) -> Result<Option<Frame>, FrameIoError> {
    read_frame_with(recv, max_body, true, MID_FRAME_TIMEOUT).await
}

/// Like [`read_frame`], refusing LZ4-compressed writes unless `lz4` was negotiated, with
/// `frame_timeout` instead of [`MID_FRAME_TIMEOUT`].
pub async fn read_frame_with(
    recv: &mut quinn::RecvStream,
    max_body: u32,
    lz4: bool,
    frame_timeout: std::time::Duration,
) -> Result<Option<Frame>, FrameIoError> {
    let mut head = [0u8; HEADER_LEN];
    // Between frames a stream may be idle as long as the connection lives; once a frame has
    // begun, all of it must arrive within `frame_timeout` (no slowloris holding a stream).
    let first = match recv.read(&mut head).await? {
        Some(n) => n,
        None => return Ok(None),
    };
    match tokio::time::timeout(
        frame_timeout,
        finish_frame(recv, head, first, max_body, lz4),
    )
    .await
    {
        Ok(r) => r.map(Some),
        Err(_) => Err(FrameIoError::Stalled(frame_timeout)),
    }
}

/// How long the rest of a frame may take once its first byte arrived (the server's
/// `replication.frame_timeout` default).
pub const MID_FRAME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

async fn finish_frame(
    recv: &mut quinn::RecvStream,
    mut head: [u8; HEADER_LEN],
    mut got: usize,
    max_body: u32,
    lz4: bool,
) -> Result<Frame, FrameIoError> {
    while got < HEADER_LEN {
        match recv.read(&mut head[got..]).await? {
            Some(n) => got += n,
            None => return Err(FrameIoError::UnexpectedEnd),
        }
    }
    let h = FrameHeader::parse(&head, max_body)?;
    if !lz4 && h.flags & slipway_proto::FLAG_LZ4 != 0 {
        return Err(DecodeError::BadFlags {
            ty: h.ty,
            flags: h.flags,
        }
        .into());
    }
    let body = read_body(recv, h.body_len as usize).await?;
    Ok(Frame::decode_body(h, body)?)
}

async fn read_body(recv: &mut quinn::RecvStream, len: usize) -> Result<Bytes, FrameIoError> {
    // Take quinn's own chunks when one covers the whole body: no copy.
    let mut buf = BytesMut::new();
    while buf.len() < len {
        match recv.read_chunk(len - buf.len(), true).await? {
            Some(c) => {
                if buf.is_empty() && c.bytes.len() == len {
                    return Ok(c.bytes);
                }
                if buf.is_empty() {
                    buf.reserve(len);
                }
                buf.extend_from_slice(&c.bytes);
            }
            None => return Err(FrameIoError::UnexpectedEnd),
        }
    }
    Ok(buf.freeze())
}

/// Writes one frame.
pub async fn write_frame(
    send: &mut quinn::SendStream,
    frame: &Frame,
) -> Result<(), quinn::WriteError> {
    send.write_all(&frame.to_bytes()).await
}

/// Writes a write frame without copying its payload, LZ4-compressing it when `lz4`.
pub async fn write_write(
    send: &mut quinn::SendStream,
    w: &Write,
    lz4: bool,
) -> Result<(), quinn::WriteError> {
    let mut chunks = w.encode_chunks(lz4);
    send.write_all_chunks(&mut chunks).await
}

/// SHA-256 of a DER certificate as lower-case hex: the fingerprint agents pin.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}
