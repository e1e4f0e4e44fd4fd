//! The admin socket: `DATA_DIR/admin.sock`, mode 0600, one JSON request line in, one JSON
//! response line out.
//!
//! A Unix socket rather than another TCP port: file permissions are the access control (only the
//! service user or root can reach it), and the CLI finds the running server from the data dir it
//! was given, without any address to configure. Two guards, each enough on its own: the socket
//! never exists under its public name with a wider mode (it is bound inside a private 0700
//! directory, set to 0600, then renamed into place; a chmod after a bind in place would leave a
//! window), and every connection's peer credentials (`SO_PEERCRED`) are checked: only root and
//! the server's own user are served.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::status::StatusReport;
use crate::Inner;

/// Requests the CLI can make.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// Take a restore point of a source now; with `wait`, answer once it exists.
    RestorePointCreate {
        source: String,
        wait: bool,
    },
    /// Delete a restore point by id.
    RestorePointDelete {
        id: String,
    },
    /// List restore points (with remote snapshot states on the AWS backend).
    RestorePointList {
        source: Option<String>,
    },
    /// Verify a restore point's blocks against its manifest.
    RestorePointVerify {
        id: String,
    },
    /// Revoke an agent token by id: refused from now on, its connections closed.
    TokenRevoke {
        id: String,
    },
}

/// Answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Status {
        status: StatusReport,
    },
    RestorePointCreated {
        id: String,
        /// The manifest, when the request waited for it.
        manifest: Option<Box<slipway_store::snapshot::Manifest>>,
    },
    RestorePointDeleted {
        id: String,
        freed_bytes: u64,
    },
    RestorePointList {
        restore_points: Vec<serde_json::Value>,
    },
    RestorePointVerified {
        report: slipway_store::snapshot::VerifyReport,
    },
    TokenRevoked {
        id: String,
        /// False if the id was already revoked.
        newly: bool,
        /// Connections closed because they had presented it.
        closed: usize,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Error)]
pub enum AdminError {
    #[error("no server is running on data dir {dir} (cannot reach {sock}: {source})")]
    NotRunning {
        dir: String,
        sock: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the server on {sock}: {source}")]
    Io {
        sock: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the server sent an answer that is not understood: {0}")]
    BadAnswer(String),
    #[error("the server refused: {0}")]
    Refused(String),
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

/// Sends one request to the server running on `data_dir` (blocking; for the CLI).
pub fn request(data_dir: &Path, req: &Request, timeout: Duration) -> Result<Response, AdminError> {
    let sock = socket_path(data_dir);
    let s = std::os::unix::net::UnixStream::connect(&sock).map_err(|source| {
        AdminError::NotRunning {
            dir: data_dir.display().to_string(),
            sock: sock.display().to_string(),
            source,
        }
    })?;
    let io = |source| AdminError::Io {
        sock: sock.display().to_string(),
        source,
    };
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    (&s).write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).map_err(io)?;
    let resp: Response =
        serde_json::from_str(&answer).map_err(|e| AdminError::BadAnswer(e.to_string()))?;
    if let Response::Error { message } = resp {
        return Err(AdminError::Refused(message));
    }
    Ok(resp)
}

/// Binds the socket (replacing a stale one) with mode 0600 from the moment it has its name:
/// bound in a private 0700 directory, narrowed there, then renamed into place.
pub(crate) fn bind(data_dir: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let path = socket_path(data_dir);
    let private = data_dir.join(format!(".admin-{}", std::process::id()));
    match std::fs::remove_dir_all(&private) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("admin.sock");
    let bound = (|| {
        let l = UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, &path)?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir(&private);
    bound
}

/// Who may use the socket: root and the user the server runs as.
fn peer_allowed(peer_uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    peer_uid == 0 || peer_uid == me
}

pub(crate) async fn serve(listener: UnixListener, inner: Arc<Inner>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let uid = match sock.peer_cred() {
            Ok(c) => c.uid(),
            Err(e) => {
                tracing::warn!(error = %e, "admin socket: cannot read the peer's credentials; refused");
                continue;
            }
        };
        let inner = inner.clone();
        if !peer_allowed(uid) {
            inner.metrics.reject("unauthorized");
            tracing::warn!(uid, "admin socket: refused a connection from a user that is neither root nor the server's");
            tokio::spawn(refuse(sock, uid));
            continue;
        }
        tokio::spawn(async move {
            let _ = handle(sock, inner).await;
        });
    }
}

async fn refuse(sock: UnixStream, uid: u32) -> std::io::Result<()> {
    let (r, mut w) = sock.into_split();
    // Read the request first (and ignore it): closing with unread bytes would reset the
    // connection before the client reads why.
    let mut lines = tokio::io::BufReader::new(r).take(1 << 20).lines();
    let _ = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await;
    let resp = Response::Error {
        message: format!(
            "user {uid} may not use the admin socket (only root and the server's own user)"
        ),
    };
    let mut out = serde_json::to_string(&resp).expect("responses serialize");
    out.push('\n');
    w.write_all(out.as_bytes()).await?;
    w.shutdown().await
}

async fn handle(sock: UnixStream, inner: Arc<Inner>) -> std::io::Result<()> {
    let (r, mut w) = sock.into_split();
    let mut lines = tokio::io::BufReader::new(r).take(1 << 20).lines();
    let Some(line) = lines.next_line().await? else {
        return Ok(());
    };
    let resp = match serde_json::from_str::<Request>(&line) {
        Ok(req) => inner.admin(req).await,
        Err(e) => Response::Error {
            message: format!("bad request: {e}"),
        },
    };
    let mut out = serde_json::to_string(&resp).expect("responses serialize");
    out.push('\n');
    w.write_all(out.as_bytes()).await?;
    w.shutdown().await
}

use tokio::io::AsyncReadExt as _;
