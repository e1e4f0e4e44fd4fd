//! Hostile and broken input against the real server: each gets a typed error, nothing is
//! written, and the server stays up for everyone else.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use slipway_net::{read_frame, write_frame, write_write};
use slipway_proto::{DiskOpen, ErrorCode, Frame, StreamBind, Write, WriteZeroes, MAX_BODY_LEN};

use crate::support::*;

/// A refusal case: name, the bytes to send for a handle, the error expected.
type Case = (&'static str, Box<dyn Fn(u32) -> Vec<u8>>, ErrorCode);

struct Raw {
    conn: quinn::Connection,
    ctl_send: quinn::SendStream,
    ctl_recv: quinn::RecvStream,
    _ep: quinn::Endpoint,
}

async fn connect(server: &Server, source: &str, token: &str) -> (Raw, Frame) {
    let (ep, conn) = quic_connect(server).await;
    let (mut ctl_send, mut ctl_recv) = conn.open_bi().await.unwrap();
    let hello = hello_frame(source, token, rand::random(), "raw-test");
    write_frame(&mut ctl_send, &hello).await.unwrap();
    let answer = read_frame(&mut ctl_recv, MAX_BODY_LEN)
        .await
        .unwrap()
        .unwrap();
    (
        Raw {
            conn,
            ctl_send,
            ctl_recv,
            _ep: ep,
        },
        answer,
    )
}

impl Raw {
    async fn open(&mut self, disk: &str, size: u64, bs: u32) -> Frame {
        write_frame(
            &mut self.ctl_send,
            &Frame::DiskOpen(DiskOpen {
                request_id: 1,
                disk_id: disk.into(),
                size,
                block_size: bs,
            }),
        )
        .await
        .unwrap();
        read_frame(&mut self.ctl_recv, MAX_BODY_LEN)
            .await
            .unwrap()
            .unwrap()
    }

    /// Opens a disk stream bound to `handle`.
    async fn stream(&self, handle: u32) -> (quinn::SendStream, quinn::RecvStream) {
        let (mut s, r) = self.conn.open_bi().await.unwrap();
        write_frame(&mut s, &Frame::StreamBind(StreamBind { handle }))
            .await
            .unwrap();
        (s, r)
    }
}

/// Reads frames from a disk stream until an error frame or the end; returns the error code.
async fn next_error(r: &mut quinn::RecvStream) -> Option<ErrorCode> {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), read_frame(r, MAX_BODY_LEN)).await {
            Ok(Ok(Some(Frame::Error(e)))) => return Some(e.code),
            Ok(Ok(Some(_))) => continue,
            _ => return None,
        }
    }
}

fn handle_of(f: &Frame) -> u32 {
    match f {
        Frame::DiskOpened(o) => o.handle,
        other => panic!("expected DiskOpened, got {other:?}"),
    }
}

fn all_zero(path: &std::path::Path) -> bool {
    std::fs::read(path).unwrap().iter().all(|b| *b == 0)
}

#[test]
fn refusals_are_typed_nothing_is_written_and_the_server_stays_up() {
    let d = tempfile::tempdir().unwrap();
    let server = Server::start(&d.path().join("var"));
    let token = server.token("src-a");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Wrong token: the token of another source.
        let other = server.token("src-b");
        let (_, answer) = connect(&server, "src-a", &other).await;
        assert!(
            matches!(answer, Frame::Error(ref e) if e.code == ErrorCode::Unauthorized),
            "{answer:?}"
        );
        let (_, answer) = connect(&server, "src-a", "slw1.00.00").await;
        assert!(
            matches!(answer, Frame::Error(ref e) if e.code == ErrorCode::Unauthorized),
            "{answer:?}"
        );

        let (mut raw, answer) = connect(&server, "src-a", &token).await;
        assert!(matches!(answer, Frame::Welcome(_)), "{answer:?}");
        // Bad disk opens.
        for (disk, size, bs, want) in [
            ("../escape", 1 << 20, 512, ErrorCode::InvalidArgument),
            ("d", 1000, 512, ErrorCode::InvalidArgument),
            ("d", 1 << 20, 1000, ErrorCode::InvalidArgument),
        ] {
            match raw.open(disk, size, bs).await {
                Frame::Error(e) => assert_eq!(e.code, want, "{disk} {size} {bs}: {}", e.message),
                other => panic!("{other:?}"),
            }
        }
        let opened = raw.open("victim", 1 << 20, 512).await;
        let h = handle_of(&opened);
        let vol = server.volume("src-a", "victim");
        assert!(all_zero(&vol));

        let write = |seq, offset, len: usize| Write {
            handle: h,
            seq,
            offset,
            data: Bytes::from(vec![0xee; len]),
        };
        // Past the end of the disk.
        let (mut s, mut r) = raw.stream(h).await;
        write_write(&mut s, &write(1, (1 << 20) - 512, 1024), false)
            .await
            .unwrap();
        assert_eq!(next_error(&mut r).await, Some(ErrorCode::OutOfBounds));
        // Each refusal ends its stream; the handle can be bound only once per connection, so
        // the remaining cases reopen the disk on fresh connections.
        drop((s, r));
        let cases: Vec<Case> = vec![
            (
                "misaligned",
                Box::new(|h| {
                    frame_bytes(&Frame::Write(Write {
                        handle: h,
                        seq: 1,
                        offset: 100,
                        data: Bytes::from(vec![1; 512]),
                    }))
                }),
                ErrorCode::Misaligned,
            ),
            (
                "zeroes past the end",
                Box::new(|h| {
                    frame_bytes(&Frame::WriteZeroes(WriteZeroes {
                        handle: h,
                        seq: 1,
                        offset: 0,
                        len: 2 << 20,
                    }))
                }),
                ErrorCode::OutOfBounds,
            ),
            (
                "bad crc",
                Box::new(|h| {
                    let w = Write {
                        handle: h,
                        seq: 1,
                        offset: 0,
                        data: Bytes::from(vec![7; 4096]),
                    };
                    let [head, payload] = w.encode_chunks(false);
                    let mut b = head.to_vec();
                    b.extend_from_slice(&payload);
                    let n = b.len();
                    b[n - 1] ^= 1;
                    b
                }),
                ErrorCode::BadChecksum,
            ),
            (
                "lz4 without negotiating it",
                Box::new(|h| {
                    let w = Write {
                        handle: h,
                        seq: 1,
                        offset: 0,
                        data: Bytes::from(vec![3; 8192]),
                    };
                    let [head, payload] = w.encode_chunks(true);
                    assert_eq!(head[1], slipway_proto::FLAG_LZ4);
                    let mut b = head.to_vec();
                    b.extend_from_slice(&payload);
                    b
                }),
                ErrorCode::Malformed,
            ),
            (
                "oversized frame",
                Box::new(|_| vec![0x06, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
                ErrorCode::TooLarge,
            ),
            (
                "garbage",
                Box::new(|_| b"GET / HTTP/1.1\r\n\r\n".to_vec()),
                ErrorCode::Malformed,
            ),
            (
                "another handle",
                Box::new(|h| {
                    frame_bytes(&Frame::Write(Write {
                        handle: h + 100,
                        seq: 1,
                        offset: 0,
                        data: Bytes::from(vec![1; 512]),
                    }))
                }),
                ErrorCode::UnknownDisk,
            ),
            (
                "sequence going backwards",
                Box::new(|h| {
                    let mut b = frame_bytes(&Frame::WriteZeroes(WriteZeroes {
                        handle: h,
                        seq: 5,
                        offset: 0,
                        len: 512,
                    }));
                    b.extend(frame_bytes(&Frame::Write(Write {
                        handle: h,
                        seq: 4,
                        offset: 512,
                        data: Bytes::from(vec![1; 512]),
                    })));
                    b
                }),
                ErrorCode::BadSequence,
            ),
        ];
        for (name, bytes, want) in cases {
            let (mut raw, _) = connect(&server, "src-a", &token).await;
            let h = handle_of(&raw.open("victim", 1 << 20, 512).await);
            let (mut s, mut r) = raw.stream(h).await;
            s.write_all(&bytes(h)).await.unwrap();
            assert_eq!(next_error(&mut r).await, Some(want), "{name}");
        }
        // A stream bound to a handle this connection never opened.
        let (raw2, _) = connect(&server, "src-a", &token).await;
        let (_s, mut r) = raw2.stream(999).await;
        assert_eq!(next_error(&mut r).await, Some(ErrorCode::UnknownDisk));
        // Garbage on the control stream closes that connection only.
        let (mut raw3, _) = connect(&server, "src-a", &token).await;
        raw3.ctl_send
            .write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0])
            .await
            .unwrap();
        match read_frame(&mut raw3.ctl_recv, MAX_BODY_LEN).await {
            Ok(Some(Frame::Error(e))) => assert_eq!(e.code, ErrorCode::Malformed),
            other => panic!("{other:?}"),
        }
        // Raw garbage datagrams at the QUIC port.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..200u32 {
            let junk: Vec<u8> = (0..(i % 1400 + 1)).map(|j| (i * 31 + j) as u8).collect();
            udp.send_to(&junk, server.listen).unwrap();
        }

        // Nothing refused reached the volume.
        assert!(all_zero(&vol), "refused writes left data on the volume");

        // The server is healthy and still serves a well-behaved client.
        assert!(server.healthy());
        let (mut good, answer) = connect(&server, "src-a", &token).await;
        assert!(matches!(answer, Frame::Welcome(_)));
        let h = handle_of(&good.open("victim", 1 << 20, 512).await);
        let (mut s, mut r) = good.stream(h).await;
        write_write(&mut s, &write(1, 4096, 8192), false)
            .await
            .unwrap();
        let acked = tokio::time::timeout(Duration::from_secs(20), read_frame(&mut r, MAX_BODY_LEN))
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(acked, Some(Frame::Ack(ref a)) if a.seq == 1),
            "{acked:?}"
        );
        let data = std::fs::read(&vol).unwrap();
        assert!(data[4096..12288].iter().all(|b| *b == 0xee));
        assert!(data[..4096].iter().all(|b| *b == 0) && data[12288..].iter().all(|b| *b == 0));
    });
    // Refusals are counted by reason.
    let (_, metrics) = server.http_get("/metrics");
    for reason in [
        "unauthorized",
        "out_of_bounds",
        "misaligned",
        "bad_checksum",
        "too_large",
        "bad_sequence",
        "unknown_disk",
    ] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&format!("slipway_rejected_total{{reason=\"{reason}\"}}")))
            .unwrap_or_else(|| panic!("no counter for {reason}"));
        let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(v >= 1.0, "{line}");
    }
    assert!(server.log().contains("refus"));
    assert!(!server.log().contains(&token), "tokens are never logged");
}

fn frame_bytes(f: &Frame) -> Vec<u8> {
    let mut b = BytesMut::new();
    f.encode(&mut b);
    let _ = b.remaining_mut();
    b.to_vec()
}

/// Tokens expire and can be revoked one by one; each refusal tells the agent why, and a
/// revocation closes the connection that presented the token. The agent reads its token from
/// a private file (`--token-file`), so it never shows in `ps`.
/// Issues a token for `source` into `dir/token` (mode 0600, as the agent requires); returns the
/// file and the token's id.
fn token_file(
    server: &Server,
    dir: &std::path::Path,
    source: &str,
) -> (std::path::PathBuf, String) {
    use std::os::unix::fs::PermissionsExt;
    let (ok, token, err) = server.cli(&["token", "issue", "--source-id", source]);
    assert!(ok, "{err}");
    let id = err
        .split_whitespace()
        .nth(2)
        .expect("token id on stderr")
        .to_string();
    assert_eq!(id.len(), 32, "{err}");
    let file = dir.join("token");
    std::fs::write(&file, &token).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    (file, id)
}

#[test]
fn expired_and_revoked_tokens_are_refused_with_their_reason() {
    let d = tempfile::tempdir().unwrap();
    let server = Server::start(&d.path().join("var"));
    let src = d.path().join("disk.img");
    make_disk(&src, 2 << 20, 5);

    let (ok, expired, err) =
        server.cli(&["token", "issue", "--source-id", "exp", "--expires-in", "0s"]);
    assert!(ok, "{err}");
    let mut agent = Agent::start(&server, "exp", expired.trim(), &[&src], &[]);
    let st = agent.wait(Duration::from_secs(60));
    assert_eq!(st.code(), Some(2), "{}", agent.log_text());
    assert!(agent.log_text().contains("expired"), "{}", agent.log_text());

    let (token_file, id) = token_file(&server, d.path(), "rev");
    let mut agent = Agent::start(
        &server,
        "rev",
        "",
        &[&src],
        &[
            "--follow",
            "--rescan-interval",
            "1s",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    );
    wait_until("continuous", Duration::from_secs(60), || {
        server.disk_state("rev", "disk.img") == "continuous"
    });
    let (ok, out, err) = server.cli(&["token", "revoke", &id]);
    assert!(ok, "{err}");
    assert!(out.contains("1 connection(s) closed"), "{out}");
    let st = agent.wait(Duration::from_secs(60));
    assert_eq!(st.code(), Some(2), "{}", agent.log_text());
    assert!(agent.log_text().contains("revoked"), "{}", agent.log_text());
    assert!(server.healthy());
}

/// A token revoked while its connection is between the check of its hello and its
/// registration (held there by a failpoint) is not missed: the connection is closed as soon
/// as it registers, and the agent stops with the reason.
#[test]
fn a_token_revoked_during_the_handshake_closes_its_connection() {
    let d = tempfile::tempdir().unwrap();
    let server = Server::start_env(
        &d.path().join("var"),
        "127.0.0.1:0",
        &[],
        &[("SLIPWAY_FAILPOINT", "handshake-before-register")],
    );
    let src = d.path().join("disk.img");
    make_disk(&src, 2 << 20, 6);
    let (token_file, id) = token_file(&server, d.path(), "race");
    let mut agent = Agent::start(
        &server,
        "race",
        "",
        &[&src],
        &["--follow", "--token-file", token_file.to_str().unwrap()],
    );
    wait_until("the hello to be held", Duration::from_secs(30), || {
        server.log().contains("failpoint handshake-before-register")
    });
    // Revoked now: no session is registered yet, so the revocation closes nothing.
    let (ok, out, err) = server.cli(&["token", "revoke", &id]);
    assert!(ok, "{err}");
    assert!(out.contains("0 connection(s) closed"), "{out}");
    let st = agent.wait(Duration::from_secs(60));
    assert_eq!(st.code(), Some(2), "{}", agent.log_text());
    assert!(agent.log_text().contains("revoked"), "{}", agent.log_text());
    assert!(
        server.log().contains("token revoked during the handshake"),
        "{}",
        server.log()
    );
}

/// The admin socket serves only root and the server's own user: a socket opened up by
/// mistake (mode 0666 here) still refuses anyone else, with a clear error.
#[test]
fn the_admin_socket_refuses_other_users() {
    use std::os::unix::fs::PermissionsExt;
    if !is_root()
        || std::process::Command::new("setpriv")
            .arg("--version")
            .output()
            .is_err()
    {
        eprintln!("skipped: needs root and setpriv (util-linux)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let var = d.path().join("var");
    let server = Server::start(&var);
    let sock = var.join("admin.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is created private");
    for p in [d.path(), var.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", SLIPWAY])
        .args(["status", "--data-dir"])
        .arg(&var)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nobody was served");
    assert!(err.contains("may not use the admin socket"), "{err}");
    let (ok, _, err) = server.cli(&["status"]);
    assert!(ok, "root is served: {err}");
}
