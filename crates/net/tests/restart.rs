//! A server that crashes and comes back on the same port with the same key answers its old
//! connections' packets with a stateless reset, so a client learns of the crash at once
//! instead of after the idle timeout. Real QUIC over loopback; the "crash" is a runtime torn
//! down without any graceful close.

use std::net::SocketAddr;
use std::time::Duration;

use slipway_net::tls::{client_config, ServerIdentity, ServerTrust};
use slipway_net::Tuning;

/// Runs a server endpoint on its own runtime; shutting that runtime down drops the endpoint
/// and its connections without sending anything, as `kill -9` would.
fn server(
    id: &ServerIdentity,
    addr: SocketAddr,
    key: Option<&[u8; 32]>,
) -> (tokio::runtime::Runtime, SocketAddr) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let tuning = Tuning::default();
    let cfg = id.server_config(&tuning).unwrap();
    let key = key.copied();
    let ep = rt
        .block_on(async { tuning.server_endpoint_with(addr, cfg, key.as_ref()) })
        .unwrap();
    let local = ep.local_addr().unwrap();
    rt.spawn(async move {
        while let Some(inc) = ep.accept().await {
            tokio::spawn(async move {
                if let Ok(c) = inc.await {
                    // Hold the connection open until the runtime goes away.
                    std::future::pending::<()>().await;
                    drop(c);
                }
            });
        }
    });
    (rt, local)
}

/// Connects, crashes the server, starts a new one on the same port (same key or not), sends a
/// stream frame and returns how the client's connection ends.
fn crash_and_restart(same_key: bool) -> quinn::ConnectionError {
    let d = tempfile::tempdir().unwrap();
    let (id, _) = ServerIdentity::load_or_generate(d.path(), &["localhost".into()]).unwrap();
    let key = [7u8; 32];
    let (first, addr) = server(&id, "127.0.0.1:0".parse().unwrap(), Some(&key));

    let client_rt = tokio::runtime::Runtime::new().unwrap();
    // A short idle timeout bounds the control case; the reset must beat it in the other.
    let tuning = Tuning {
        idle_timeout: Duration::from_secs(5),
        keep_alive: Duration::from_secs(1),
        ..Tuning::default()
    };
    let cfg = client_config(&ServerTrust::Fingerprint(id.fingerprint()), &tuning).unwrap();
    let ep = client_rt
        .block_on(async { tuning.client_endpoint(addr) })
        .unwrap();
    let conn = client_rt
        .block_on(async { ep.connect_with(cfg, addr, "localhost").unwrap().await })
        .unwrap();

    drop(first);
    let other = [9u8; 32];
    let (_second, again) = server(&id, addr, Some(if same_key { &key } else { &other }));
    assert_eq!(again, addr);

    client_rt.block_on(async {
        // Data in flight makes the client send short-header packets to the new server.
        if let Ok((mut s, _r)) = conn.open_bi().await {
            let _ = s.write_all(&[1u8; 4096]).await;
        }
        conn.closed().await
    })
}

#[test]
fn a_restarted_server_with_the_same_key_resets_old_connections() {
    let e = crash_and_restart(true);
    assert!(
        matches!(e, quinn::ConnectionError::Reset),
        "expected a stateless reset, got {e:?}"
    );
}

#[test]
fn without_the_key_the_client_only_times_out() {
    // The control: a server with another key cannot produce a reset the client accepts, so
    // the client waits out its idle timeout (what agents did before the key persisted).
    let e = crash_and_restart(false);
    assert!(
        matches!(e, quinn::ConnectionError::TimedOut),
        "expected an idle timeout, got {e:?}"
    );
}
