//! TLS over real QUIC on loopback: pinning, CA trust, mutual TLS, TLS 1.3 only.

use std::net::SocketAddr;
use std::path::Path;

use slipway_net::tls::{client_config, client_config_with, ServerIdentity, ServerTrust};
use slipway_net::Tuning;

fn write(p: &Path, s: &str) {
    std::fs::write(p, s).unwrap();
}

/// A CA, and a certificate for `name` signed by it; returns (ca pem, cert pem, key pem).
fn ca_and_leaf(name: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(vec![]).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&key, &ca_cert, &ca_key)
        .unwrap();
    (ca_cert.pem(), leaf.pem(), key.serialize_pem())
}

/// Starts a server endpoint that accepts one connection; returns its address.
async fn serve(cfg: quinn::ServerConfig) -> (quinn::Endpoint, SocketAddr) {
    let ep = Tuning::default()
        .server_endpoint("127.0.0.1:0".parse().unwrap(), cfg)
        .unwrap();
    let addr = ep.local_addr().unwrap();
    let e2 = ep.clone();
    tokio::spawn(async move {
        while let Some(inc) = e2.accept().await {
            tokio::spawn(async move {
                if let Ok(c) = inc.await {
                    c.closed().await;
                }
            });
        }
    });
    (ep, addr)
}

async fn connect(cfg: quinn::ClientConfig, addr: SocketAddr) -> Result<(), String> {
    let ep = Tuning::default().client_endpoint(addr).unwrap();
    let conn = ep
        .connect_with(cfg, addr, "localhost")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    // With mutual TLS a refused client certificate shows once the server has processed it.
    let r = tokio::time::timeout(std::time::Duration::from_millis(500), conn.closed()).await;
    match r {
        Ok(reason) => Err(reason.to_string()),
        Err(_) => Ok(()),
    }
}

#[tokio::test]
async fn pinning_ca_trust_and_mutual_tls() {
    let d = tempfile::tempdir().unwrap();
    let (id, _) = ServerIdentity::load_or_generate(d.path(), &["localhost".into()]).unwrap();
    let tuning = Tuning::default();

    // Pinned fingerprint: right one connects, wrong one does not.
    let (_ep, addr) = serve(id.server_config(&tuning).unwrap()).await;
    let good = client_config(&ServerTrust::Fingerprint(id.fingerprint()), &tuning).unwrap();
    connect(good, addr).await.unwrap();
    let bad = client_config(&ServerTrust::Fingerprint("00".repeat(32)), &tuning).unwrap();
    assert!(connect(bad, addr).await.is_err());
    // The self-signed certificate itself works as a CA file.
    let ca = client_config(&ServerTrust::CaFile(d.path().join("server.crt")), &tuning).unwrap();
    connect(ca, addr).await.unwrap();

    // Mutual TLS: a client certificate from the configured CA is required.
    let (ca_pem, leaf_pem, key_pem) = ca_and_leaf("agent-web-01");
    write(&d.path().join("client-ca.pem"), &ca_pem);
    write(&d.path().join("agent.crt"), &leaf_pem);
    write(&d.path().join("agent.key"), &key_pem);
    let mtls = id
        .server_config_with(&tuning, Some(&d.path().join("client-ca.pem")))
        .unwrap();
    let (_ep2, addr2) = serve(mtls).await;
    let trust = ServerTrust::Fingerprint(id.fingerprint());
    let anonymous = client_config(&trust, &tuning).unwrap();
    assert!(
        connect(anonymous, addr2).await.is_err(),
        "no client certificate"
    );
    let agent =
        ServerIdentity::load(&d.path().join("agent.crt"), &d.path().join("agent.key")).unwrap();
    let with_cert = client_config_with(&trust, &tuning, Some(&agent)).unwrap();
    connect(with_cert, addr2).await.unwrap();
    // A certificate from another CA is refused.
    let (_, other_leaf, other_key) = ca_and_leaf("intruder");
    write(&d.path().join("other.crt"), &other_leaf);
    write(&d.path().join("other.key"), &other_key);
    let other =
        ServerIdentity::load(&d.path().join("other.crt"), &d.path().join("other.key")).unwrap();
    let foreign = client_config_with(&trust, &tuning, Some(&other)).unwrap();
    assert!(
        connect(foreign, addr2).await.is_err(),
        "client certificate of another CA"
    );
}
