//! Agent credentials: tokens derived from a server secret and bound to one source.
//!
//! `token = "slw2." + hex(nonce) + "." + expiry + "." + hex(HMAC-SHA256(secret, "slipway-token-v2" ‖ source ‖ nonce ‖ expiry))`
//!
//! `expiry` is the Unix time (seconds, decimal) after which the token is refused, `0` for
//! never. The server stores no tokens at all — only the 32-byte secret (`DATA_DIR/tls/token.key`,
//! mode 0600) — and re-derives the MAC to check one, comparing in constant time. A token names
//! no source, yet it only verifies for the source it was issued to, so a leaked token of one
//! source cannot open another's disks. Tokens never appear in logs; a token's *id* (its nonce)
//! is public and is what `slipway token revoke` takes: revoked ids are listed in
//! `DATA_DIR/tls/revoked-tokens`, which the server rereads whenever it changes. Revoking every
//! token at once means rotating the secret (delete the key file and reissue). Tokens of the
//! first format (`slw1.`, no expiry) still verify and can be revoked by id.

use std::path::{Path, PathBuf};

use rand::RngCore;
use ring::hmac;
use thiserror::Error;

const PREFIX: &str = "slw1.";
const CONTEXT: &[u8] = b"slipway-token-v1";
const PREFIX2: &str = "slw2.";
const CONTEXT2: &[u8] = b"slipway-token-v2";

/// Why a token was refused. The message goes back to the agent: it names no secret.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    #[error("the token is not valid for this source on this server")]
    Invalid,
    #[error("the token expired at Unix time {at} (issue a new one: slipway token issue)")]
    Expired { at: u64 },
    #[error("the token {id} was revoked")]
    Revoked { id: String },
}

/// A parsed token: its public id (the nonce in hex) and what its MAC covers.
struct Parsed {
    nonce: Vec<u8>,
    expires: Option<u64>,
    tag: Vec<u8>,
    v2: bool,
}

fn parse(token: &str) -> Option<Parsed> {
    let (v2, rest) = match token.strip_prefix(PREFIX2) {
        Some(r) => (true, r),
        None => (false, token.strip_prefix(PREFIX)?),
    };
    let mut parts = rest.split('.');
    let id = parts.next()?;
    let expires = if v2 {
        let e = parts.next()?;
        if e.is_empty() || !e.bytes().all(|b| b.is_ascii_digit()) || e.len() > 20 {
            return None;
        }
        Some(e.parse::<u64>().ok()?)
    } else {
        None
    };
    let tag_hex = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let (Ok(nonce), Ok(tag)) = (hex::decode(id), hex::decode(tag_hex)) else {
        return None;
    };
    if nonce.len() != 16 || tag.len() != 32 {
        return None;
    }
    Some(Parsed {
        nonce,
        expires,
        tag,
        v2,
    })
}

/// The public id of a token (to revoke it), if it is one of ours in form.
pub fn token_id(token: &str) -> Option<String> {
    // From the decoded nonce, not the text: hex in upper case verifies too, and must not
    // escape a revocation listed in lower case.
    parse(token).map(|p| hex::encode(&p.nonce))
}

/// Whether `id` has the form of a token id (32 hex digits).
pub fn valid_token_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Revoked token ids, as listed in `DATA_DIR/tls/revoked-tokens` (one id a line; `#` starts a
/// comment).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Revoked(std::collections::BTreeSet<String>);

impl Revoked {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("tls").join("revoked-tokens")
    }

    pub fn parse(text: &str) -> Self {
        Revoked(
            text.lines()
                .map(|l| {
                    l.split('#')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_ascii_lowercase()
                })
                .filter(|l| valid_token_id(l))
                .collect(),
        )
    }

    /// The list on disk; a missing file is an empty list.
    pub fn load(data_dir: &Path) -> Result<Self, AuthError> {
        let path = Self::path(data_dir);
        match std::fs::read_to_string(&path) {
            Ok(t) => Ok(Self::parse(&t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(AuthError::Io { path, source }),
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.0.contains(&id.to_ascii_lowercase())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds `id` to the list on disk (atomically, durably). Returns false if it was listed.
    pub fn revoke(data_dir: &Path, id: &str) -> Result<bool, AuthError> {
        let id = id.to_ascii_lowercase();
        if !valid_token_id(&id) {
            return Err(AuthError::BadTokenId(id));
        }
        let mut list = Self::load(data_dir)?;
        if !list.0.insert(id) {
            return Ok(false);
        }
        let mut text =
            String::from("# Revoked agent token ids (slipway token revoke), one a line.\n");
        for id in &list.0 {
            text.push_str(id);
            text.push('\n');
        }
        let path = Self::path(data_dir);
        slipway_store::fsutil::create_dir_all_durable(&data_dir.join("tls")).map_err(|e| {
            AuthError::Io {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        slipway_store::fsutil::write_atomic(&path, text.as_bytes(), 0o600).map_err(|e| {
            AuthError::Io {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        Ok(true)
    }
}

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
    #[error("{0:?} is not a token id (32 hex digits; `slipway token issue` prints it)")]
    BadTokenId(String),
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

    fn key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.0)
    }

    /// What a token's MAC covers: its context (format), the source (length-prefixed), the
    /// nonce and, from the second format on, the expiry.
    fn covered(source: &str, nonce: &[u8], expires: Option<u64>) -> Vec<u8> {
        let mut m = Vec::with_capacity(16 + 4 + source.len() + nonce.len() + 8);
        m.extend_from_slice(if expires.is_some() { CONTEXT2 } else { CONTEXT });
        m.extend_from_slice(&(source.len() as u32).to_be_bytes());
        m.extend_from_slice(source.as_bytes());
        m.extend_from_slice(nonce);
        if let Some(e) = expires {
            m.extend_from_slice(&e.to_be_bytes());
        }
        m
    }

    /// HMAC-SHA256 of what a token covers.
    fn mac(&self, source: &str, nonce: &[u8], expires: Option<u64>) -> hmac::Tag {
        hmac::sign(&self.key(), &Self::covered(source, nonce, expires))
    }

    /// A 32-byte key for another purpose, derived from the secret (so it survives restarts
    /// without another file).
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        let mut m = hmac::Context::with_key(&self.key());
        m.update(b"slipway-derive-v1");
        m.update(purpose.as_bytes());
        m.sign()
            .as_ref()
            .try_into()
            .expect("an HMAC-SHA256 tag is 32 bytes")
    }

    /// Issues a new token for `source` that never expires.
    pub fn issue(&self, source: &str) -> Result<String, AuthError> {
        self.issue_until(source, None)
    }

    /// Issues a new token for `source`, refused after Unix time `expires` (`None`: never).
    pub fn issue_until(&self, source: &str, expires: Option<u64>) -> Result<String, AuthError> {
        if !slipway_proto::valid_id(source) {
            return Err(AuthError::BadSource(source.into()));
        }
        let mut nonce = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut nonce);
        let e = expires.unwrap_or(0);
        let tag = self.mac(source, &nonce, Some(e));
        Ok(format!(
            "{PREFIX2}{}.{e}.{}",
            hex::encode(nonce),
            hex::encode(tag)
        ))
    }

    /// Whether `token` was issued for `source` by this key (constant time in the MAC), has
    /// not expired at `now_unix` and is not revoked. The MAC is checked first, so a forged
    /// token learns nothing about expiry or revocation.
    pub fn check(
        &self,
        source: &str,
        token: &str,
        now_unix: u64,
        revoked: &Revoked,
    ) -> Result<(), Refusal> {
        let p = parse(token).ok_or(Refusal::Invalid)?;
        let covered = if p.v2 { p.expires } else { None };
        // ring compares the recomputed tag in constant time.
        hmac::verify(
            &self.key(),
            &Self::covered(source, &p.nonce, covered),
            &p.tag,
        )
        .map_err(|_| Refusal::Invalid)?;
        if let Some(at) = p.expires.filter(|e| *e != 0) {
            if now_unix >= at {
                return Err(Refusal::Expired { at });
            }
        }
        let id = hex::encode(&p.nonce);
        if revoked.contains(&id) {
            return Err(Refusal::Revoked { id });
        }
        Ok(())
    }

    /// [`TokenKey::check`] with no clock and no revocations: only the MAC and the source.
    pub fn verify(&self, source: &str, token: &str) -> bool {
        self.check(source, token, 0, &Revoked::default()).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_bind_to_their_source() {
        let k = TokenKey::from_bytes([7; 32]);
        let t = k.issue("web-01").unwrap();
        assert!(t.starts_with("slw2."));
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
        for bad in [
            "",
            "slw1.",
            "slw1.zz.zz",
            "slw2.00.00",
            "slw3.00.00",
            &t[..t.len() - 2],
        ] {
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
    fn expired_and_revoked_tokens_are_refused_with_their_reason() {
        let d = tempfile::tempdir().unwrap();
        let k = TokenKey::from_bytes([7; 32]);
        let t = k.issue_until("s", Some(1_000)).unwrap();
        let none = Revoked::default();
        assert_eq!(k.check("s", &t, 999, &none), Ok(()));
        assert_eq!(
            k.check("s", &t, 1_000, &none),
            Err(Refusal::Expired { at: 1_000 })
        );
        // The expiry is covered by the MAC: pushing it out forges the token.
        let forged = t.replacen(".1000.", ".9000.", 1);
        assert_eq!(k.check("s", &forged, 999, &none), Err(Refusal::Invalid));
        // Another source's token stays Invalid, whatever its expiry.
        assert_eq!(k.check("x", &t, 5_000, &none), Err(Refusal::Invalid));

        let forever = k.issue("s").unwrap();
        assert_eq!(k.check("s", &forever, u64::MAX, &none), Ok(()));
        let id = token_id(&forever).unwrap();
        assert!(Revoked::revoke(d.path(), &id).unwrap());
        assert!(!Revoked::revoke(d.path(), &id).unwrap(), "listed once");
        let list = Revoked::load(d.path()).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(
            k.check("s", &forever, 0, &list),
            Err(Refusal::Revoked { id: id.clone() })
        );
        assert_eq!(k.check("s", &t, 0, &list), Ok(()), "only that one");
        // The same token with its id in upper case hex: still the same, still revoked.
        let (head, rest) = forever.split_at(5);
        let (nonce, tail) = rest.split_at(32);
        let upper = format!("{head}{}{tail}", nonce.to_ascii_uppercase());
        assert_eq!(token_id(&upper).as_deref(), Some(id.as_str()));
        assert_eq!(
            k.check("s", &upper, 0, &list),
            Err(Refusal::Revoked { id: id.clone() })
        );
        assert!(Revoked::revoke(d.path(), "not-an-id").is_err());

        // First-format tokens still verify, never expire, and can be revoked.
        // (Known answers, computed with Python's hmac module, pin the MAC: tokens issued before
        // the switch from the `hmac` crate to ring must still verify.)
        let kat = TokenKey([7; 32]);
        let mut n = [3u8; 16];
        n[0] = 9;
        assert_eq!(
            hex::encode(kat.mac("s", &n, None)),
            "57045b4347f446e3505b3deec7b147fff3c8661ffc2782574bd34e66914c35e7"
        );
        assert_eq!(
            hex::encode(kat.mac("s", &n, Some(1234))),
            "372cace8375df22bd215a9c5a8345a8cb552e74ce53ef6c55f4e777858784ec3"
        );
        assert_eq!(
            hex::encode(kat.derive("quic-stateless-reset")),
            "c500c6a54c07629d64a4ac4ad0415461f7aabfa488d958df403f034223405b7a"
        );
        let mut nonce = [3u8; 16];
        nonce[0] = 9;
        let tag = k.mac("s", &nonce, None);
        let v1 = format!("slw1.{}.{}", hex::encode(nonce), hex::encode(tag));
        assert_eq!(k.check("s", &v1, u64::MAX, &list), Ok(()));
        Revoked::revoke(d.path(), &token_id(&v1).unwrap()).unwrap();
        let list = Revoked::load(d.path()).unwrap();
        assert!(matches!(
            k.check("s", &v1, 0, &list),
            Err(Refusal::Revoked { .. })
        ));
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
