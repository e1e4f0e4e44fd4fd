//! moto's server mode as a child process, shared by the tests of this binary and serialized
//! between them (each test starts from `POST /moto-api/reset`).
//!
//! The emulator comes from `crates/aws/tests/setup-moto.sh` (a virtualenv with moto from PyPI),
//! or from `SLIPWAY_MOTO_SERVER` if that names a `moto_server` executable. The support module is
//! shared by the test binaries of slipway-aws, slipway-fleet and the workspace's e2e tests, so
//! the script is looked up from whichever crate compiles it. A small shell watchdog
//! kills it once this test process is gone, since a test binary has no "after all" hook.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, MutexGuard};

use super::http::call;

static MOTO: OnceLock<Result<Moto, String>> = OnceLock::new();
static SERIAL: Mutex<()> = Mutex::const_new(());

#[derive(Debug, Clone)]
pub struct Moto {
    pub port: u16,
    pub log: PathBuf,
    /// Where emulated attachments keep their data: a server under test maps volume ids to
    /// files here (`SLIPWAY_AWS_DEVICE_MAP_DIR`), and the emulator's launcher
    /// (`crates/aws/tests/moto_server.py`) reads a volume's file when EC2 accepts a snapshot of
    /// it, so the EBS direct APIs serve the snapshot's data.
    pub device_dir: PathBuf,
}

impl Moto {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn moto_server_path() -> Result<String, String> {
    if let Ok(p) = std::env::var("SLIPWAY_MOTO_SERVER") {
        if !p.is_empty() {
            return Ok(p);
        }
    }
    let rel = "crates/aws/tests/setup-moto.sh";
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|d| d.join(rel))
        .find(|p| p.exists())
        .ok_or_else(|| format!("no {rel} above {}", env!("CARGO_MANIFEST_DIR")))?;
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed ({})", script.display(), out.status));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .last()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .ok_or_else(|| format!("{} printed no path", script.display()))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// moto's server through `crates/aws/tests/moto_server.py` (moto plus snapshots that hold
/// their volume's data), run by the Python of moto's own virtualenv.
fn launcher(server: &str) -> Result<(PathBuf, PathBuf), String> {
    let rel = "crates/aws/tests/moto_server.py";
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|d| d.join(rel))
        .find(|p| p.exists())
        .ok_or_else(|| format!("no {rel} above {}", env!("CARGO_MANIFEST_DIR")))?;
    let python = Path::new(server).with_file_name("python3");
    if !python.exists() {
        return Err(format!(
            "{} has no python3 beside it to run {rel} with",
            server
        ));
    }
    Ok((python, script))
}

fn start() -> Result<Moto, String> {
    let server = moto_server_path()?;
    let (python, script) = launcher(&server)?;
    let port = free_port();
    let tmp = std::env::temp_dir();
    let log = tmp.join(format!("slipway-moto-{}-{port}.log", std::process::id()));
    let device_dir = tmp.join(format!(
        "slipway-moto-{}-{port}.devices",
        std::process::id()
    ));
    std::fs::create_dir_all(&device_dir).map_err(|e| format!("{}: {e}", device_dir.display()))?;
    // The watchdog: start moto, then poll for this process; when it is gone, stop moto and
    // remove its log and device files.
    let watchdog = r#"
        MOTO_EC2_LOAD_DEFAULT_AMIS=false SLIPWAY_MOTO_DEVICE_DIR="$5" "$0" "$4" -H 127.0.0.1 -p "$1" >"$2" 2>&1 &
        moto=$!
        while kill -0 "$3" 2>/dev/null && kill -0 "$moto" 2>/dev/null; do sleep 0.5; done
        kill "$moto" 2>/dev/null
        rm -rf "$2" "$5"
    "#;
    Command::new("bash")
        .arg("-c")
        .arg(watchdog)
        .arg(&python)
        .arg(port.to_string())
        .arg(&log)
        .arg(std::process::id().to_string())
        .arg(&script)
        .arg(&device_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", python.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    loop {
        if let Ok((200, _)) = rt.block_on(call(port, "POST", "/moto-api/reset", b"")) {
            return Ok(Moto {
                port,
                log,
                device_dir,
            });
        }
        if started.elapsed() > Duration::from_secs(60) {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!(
                "moto_server did not answer on port {port} within 60 s:\n{tail}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The shared emulator (started on first use).
pub fn moto() -> Moto {
    match MOTO.get_or_init(|| std::thread::spawn(start).join().unwrap()) {
        Ok(m) => m.clone(),
        Err(e) => panic!("AWS emulator unavailable: {e}"),
    }
}

/// Exclusive use of the emulator, reset to empty.
pub async fn exclusive() -> (MutexGuard<'static, ()>, Moto) {
    let guard = SERIAL.lock().await;
    let m = tokio::task::spawn_blocking(moto).await.unwrap();
    let (status, body) = call(m.port, "POST", "/moto-api/reset", b"").await.unwrap();
    assert_eq!(
        status,
        200,
        "moto reset: {} (log: {})",
        String::from_utf8_lossy(&body),
        m.log.display()
    );
    // The previous test's volumes are gone from the emulator: so are their files.
    if let Ok(entries) = std::fs::read_dir(&m.device_dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    (guard, m)
}
