//! Agent credentials: tokens derived from a server secret and bound to one source.
//!
//! `token = "slw1." + hex(nonce) + "." + hex(HMAC-SHA256(secret, "slipway-token-v1" ‖ source ‖ nonce))`
//!
//! The server stores no tokens at all — only the 32-byte secret (`DATA_DIR/tls/token.key`, mode
//! 0600) — and re-derives the MAC to check one, comparing in constant time. A token names no
//! source, yet it only verifies for the source it was issued to, so a leaked token of one
//! source cannot open another's disks. Tokens never appear in logs. Revoking every token means
//! rotating the secret (delete the key file and reissue).

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use thiserror::Error;

const PREFIX: &str = "slw1.";
const CONTEXT: &[u8] = b"slipway-token-v1";

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("token secret {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token secret {path} is not 64 hex digits")]
    BadSecret { path: PathBuf },
    #[error("source id {0:?} is not valid (1-128 of A-Z a-z 0-9 . _ -)")]
    BadSource(String),
}

/// The secret tokens are derived from.
#[derive(Clone)]
pub struct TokenKey([u8; 32]);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        TokenKey(b)
    }

    /// Loads `DATA_DIR/tls/token.key`, creating it (random, mode 0600) if absent.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, AuthError> {
        let dir = data_dir.join("tls");
        let path = dir.join("token.key");
        let io = |source| AuthError::Io {
            path: path.clone(),
            source,
        };
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                let mut b = [0u8; 32];
                hex::decode_to_slice(s.trim(), &mut b)
                    .map_err(|_| AuthError::BadSecret { path: path.clone() })?;
                Ok(TokenKey(b))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                slipway_store::fsutil::create_dir_all_durable(&dir)
                    .map_err(|e| io(std::io::Error::other(e.to_string())))?;
                let mut b = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut b);
                let text = format!("{}\n", hex::encode(b));
                // create_new: if two processes race, one loses and re-reads the winner's key.
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                {
                    Ok(mut f) => {
                        f.write_all(text.as_bytes()).map_err(io)?;
                        f.sync_all().map_err(io)?;
                        slipway_store::fsutil::fsync_dir(&dir)
                            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
                        Ok(TokenKey(b))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Self::load_or_create(data_dir)
                    }
                    Err(e) => Err(io(e)),
                }
            }
            Err(e) => Err(io(e)),
        }
    }

    fn mac(&self, source: &str, nonce: &[u8]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        m.update(CONTEXT);
        m.update(&(source.len() as u32).to_be_bytes());
        m.update(source.as_bytes());
        m.update(nonce);
        m
    }

    /// A 32-byte key for another purpose, derived from the secret (so it survives restarts
    /// without another file).
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        m.update(b"slipway-derive-v1");
        m.update(purpose.as_bytes());
        m.finalize().into_bytes().into()
    }

    /// Issues a new token for `source`.
    pub fn issue(&self, source: &str) -> Result<String, AuthError> {
        if !slipway_proto::valid_id(source) {
            return Err(AuthError::BadSource(source.into()));
        }
        let mut nonce = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut nonce);
        let tag = self.mac(source, &nonce).finalize().into_bytes();
        Ok(format!(
            "{PREFIX}{}.{}",
            hex::encode(nonce),
            hex::encode(tag)
        ))
    }

    /// Whether `token` was issued for `source` by this key. Constant time in the MAC.
    pub fn verify(&self, source: &str, token: &str) -> bool {
        let Some(rest) = token.strip_prefix(PREFIX) else {
            return false;
        };
        let Some((nonce_hex, tag_hex)) = rest.split_once('.') else {
            return false;
        };
        let (Ok(nonce), Ok(tag)) = (hex::decode(nonce_hex), hex::decode(tag_hex)) else {
            return false;
        };
        if nonce.len() != 16 || tag.len() != 32 {
            return false;
        }
        self.mac(source, &nonce).verify_slice(&tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_bind_to_their_source() {
        let k = TokenKey::from_bytes([7; 32]);
        let t = k.issue("web-01").unwrap();
        assert!(t.starts_with("slw1."));
        assert!(k.verify("web-01", &t));
        assert!(!k.verify("web-02", &t), "another source's token is refused");
        let other = TokenKey::from_bytes([8; 32]);
        assert!(
            !other.verify("web-01", &t),
            "another server's token is refused"
        );
        // Forged or damaged tokens.
        let mut forged = t.clone();
        let last = forged.pop().unwrap();
        forged.push(if last == '0' { '1' } else { '0' });
        assert!(!k.verify("web-01", &forged));
        for bad in ["", "slw1.", "slw1.zz.zz", "slw2.00.00", &t[..t.len() - 2]] {
            assert!(!k.verify("web-01", bad), "{bad}");
        }
        assert!(k.issue("../x").is_err());
        assert_ne!(
            k.issue("web-01").unwrap(),
            t,
            "each token has its own nonce"
        );
    }

    #[test]
    fn secret_persists_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let a = TokenKey::load_or_create(d.path()).unwrap();
        let b = TokenKey::load_or_create(d.path()).unwrap();
        let t = a.issue("s").unwrap();
        assert!(b.verify("s", &t));
        let mode = std::fs::metadata(d.path().join("tls/token.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(format!("{a:?}"), "TokenKey(..)");
    }
}
