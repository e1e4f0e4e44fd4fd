//! TLS 1.3 for both ends, with the ring provider.
//!
//! The server presents one certificate. The embedded local default generates a self-signed one
//! on first start (`DATA_DIR/tls/server.crt`, key mode 0600); production points the settings at
//! its own. Agents either trust a CA file (normal webpki path validation against the server
//! name) or pin the SHA-256 fingerprint of the server's certificate, in which case the name is
//! not checked but the TLS 1.3 handshake signature still is — a pinned certificate without its
//! private key gets nobody in.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use thiserror::Error;

use crate::{fingerprint, Tuning};

/// TLS setup errors.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no {what}")]
    Missing { path: PathBuf, what: &'static str },
    #[error("generating a certificate: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("fingerprint {0:?} is not 64 hex digits (SHA-256)")]
    BadFingerprint(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's certificate chain and key.
#[derive(Debug)]
pub struct ServerIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl ServerIdentity {
    /// SHA-256 fingerprint of the end-entity certificate.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.chain[0])
    }

    /// Loads a PEM certificate chain and key.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |p: &Path| {
            fs::read(p).map_err(|source| TlsError::Io {
                what: "reading",
                path: p.to_owned(),
                source,
            })
        };
        let cert_pem = read(cert)?;
        let chain: Vec<_> = rustls_pemfile::certs(&mut &cert_pem[..])
            .collect::<Result<_, _>>()
            .map_err(|source| TlsError::Io {
                what: "parsing",
                path: cert.to_owned(),
                source,
            })?;
        if chain.is_empty() {
            return Err(TlsError::Missing {
                path: cert.to_owned(),
                what: "PEM certificate",
            });
        }
        let key_pem = read(key)?;
        let key_der = rustls_pemfile::private_key(&mut &key_pem[..])
            .map_err(|source| TlsError::Io {
                what: "parsing",
                path: key.to_owned(),
                source,
            })?
            .ok_or_else(|| TlsError::Missing {
                path: key.to_owned(),
                what: "PEM private key",
            })?;
        Ok(ServerIdentity {
            chain,
            key: key_der,
        })
    }

    /// Loads `dir/server.crt` and `dir/server.key`, generating a self-signed pair for `names`
    /// first if they do not exist. Returns whether it generated them.
    pub fn load_or_generate(dir: &Path, names: &[String]) -> Result<(Self, bool), TlsError> {
        let cert = dir.join("server.crt");
        let key = dir.join("server.key");
        if cert.exists() && key.exists() {
            return Ok((Self::load(&cert, &key)?, false));
        }
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| TlsError::Io { what, path, source }
        };
        fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let ck = rcgen::generate_simple_self_signed(names.to_vec())
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        let write = |p: &Path, data: &str, mode: u32| -> Result<(), TlsError> {
            let tmp = p.with_extension("tmp");
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&tmp)
                .map_err(io("creating", &tmp))?;
            f.write_all(data.as_bytes()).map_err(io("writing", &tmp))?;
            f.sync_all().map_err(io("fsyncing", &tmp))?;
            fs::rename(&tmp, p).map_err(io("renaming", p))
        };
        // Key first: a crash in between leaves no certificate without its key.
        write(&key, &ck.key_pair.serialize_pem(), 0o600)?;
        write(&cert, &ck.cert.pem(), 0o644)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok((Self::load(&cert, &key)?, true))
    }

    /// The quinn server config: TLS 1.3 only, ALPN `slipway/1`.
    pub fn server_config(&self, tuning: &Tuning) -> Result<quinn::ServerConfig, TlsError> {
        self.server_config_with(tuning, None)
    }

    /// Like [`ServerIdentity::server_config`]; with `client_ca`, every agent must present a
    /// client certificate issued by one of the CAs in that PEM file (mutual TLS).
    pub fn server_config_with(
        &self,
        tuning: &Tuning,
        client_ca: Option<&Path>,
    ) -> Result<quinn::ServerConfig, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let roots = load_roots(path)?;
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .map_err(|e| TlsError::Config(format!("{}: {e}", path.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut tls = builder
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![slipway_proto::ALPN.to_vec()];
        tls.max_early_data_size = 0;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        cfg.transport_config(Arc::new(tuning.transport()));
        Ok(cfg)
    }
}

/// How an agent recognises its server.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// PEM file of CA (or self-signed) certificates; the server name is verified.
    CaFile(PathBuf),
    /// SHA-256 of the server certificate, hex (colons allowed).
    Fingerprint(String),
}

/// The quinn client config for `trust`.
pub fn client_config(
    trust: &ServerTrust,
    tuning: &Tuning,
) -> Result<quinn::ClientConfig, TlsError> {
    client_config_with(trust, tuning, None)
}

/// Like [`client_config`], presenting `client_identity` (certificate chain and key) to servers
/// that require mutual TLS.
pub fn client_config_with(
    trust: &ServerTrust,
    tuning: &Tuning,
    client_identity: Option<&ServerIdentity>,
) -> Result<quinn::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let tls = match trust {
        ServerTrust::CaFile(path) => builder.with_root_certificates(load_roots(path)?),
        ServerTrust::Fingerprint(fp) => {
            let pin = parse_fingerprint(fp)?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                    pin,
                    provider: provider(),
                }))
        }
    };
    let mut tls = match client_identity {
        None => tls.with_no_client_auth(),
        Some(id) => tls
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?,
    };
    tls.alpn_protocols = vec![slipway_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(tuning.transport()));
    Ok(cfg)
}

/// Loads every PEM certificate of `path` as a trust anchor.
fn load_roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let pem = fs::read(path).map_err(|source| TlsError::Io {
        what: "reading",
        path: path.to_owned(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        let c = c.map_err(|source| TlsError::Io {
            what: "parsing",
            path: path.to_owned(),
            source,
        })?;
        roots
            .add(c)
            .map_err(|e| TlsError::Config(format!("{}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Missing {
            path: path.to_owned(),
            what: "PEM certificate",
        });
    }
    Ok(roots)
}

/// Parses a SHA-256 fingerprint written as hex, with or without colons.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], TlsError> {
    let clean: String = s.chars().filter(|c| *c != ':').collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(clean.to_ascii_lowercase(), &mut out)
        .map_err(|_| TlsError::BadFingerprint(s.to_owned()))?;
    Ok(out)
}

/// Accepts exactly the certificate whose SHA-256 is pinned, and still checks the handshake
/// signature made with its key.
#[derive(Debug)]
struct PinnedVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        let got: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        // Constant-time compare: the pin is not secret, but there is no reason to leak.
        let diff = got
            .iter()
            .zip(self.pin.iter())
            .fold(0u8, |a, (x, y)| a | (x ^ y));
        if diff == 0 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate fingerprint {} does not match the pinned {}",
                hex::encode(got),
                hex::encode(self.pin)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not allowed".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_once_then_load_with_key_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string()];
        let (a, gen) = ServerIdentity::load_or_generate(d.path(), &names).unwrap();
        assert!(gen);
        let (b, gen) = ServerIdentity::load_or_generate(d.path(), &names).unwrap();
        assert!(!gen);
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 64);
        let mode = fs::metadata(d.path().join("server.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        a.server_config(&Tuning::default()).unwrap();
    }

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hexs = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&hexs).unwrap(), [0xab; 32]);
        assert_eq!(parse_fingerprint(&colons).unwrap(), [0xab; 32]);
        assert!(parse_fingerprint("abc").is_err());
        assert!(client_config(&ServerTrust::Fingerprint("zz".into()), &Tuning::default()).is_err());
    }
}
