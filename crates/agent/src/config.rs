//! Validated settings of one `replicate` run.
//!
//! Flags are parsed in two phases, as ripgrep does: clap produces raw strings and numbers
//! (`cli`), and this module turns them into typed, checked values. Everything here is pure
//! (the one file-system question, "does this path exist", is passed in) so every rule a user
//! can trip over is a unit test, and every error names the flag it is about.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use slipway_net::{tls::ServerTrust, Congestion};
use slipway_proto::{valid_id, MAX_WRITE_LEN};
use thiserror::Error;

use crate::throttle::Throttle;

/// A flag value that cannot be used. Always permanent: retrying will not fix an argument.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--{flag}: {value:?} is not a size (examples: 4096, 64KiB, 1MiB, 2GiB)")]
    BadSize { flag: &'static str, value: String },
    #[error("--{flag}: {value:?} is not a duration (examples: 10s, 500ms, 2m)")]
    BadDuration { flag: &'static str, value: String },
    #[error("--{flag}: {reason}")]
    OutOfRange { flag: &'static str, reason: String },
    #[error("--server: {0:?} is not HOST:PORT")]
    BadServer(String),
    #[error("--source-id: {0:?} is not a valid id (1-128 of A-Z a-z 0-9 . _ -, not starting with a dot)")]
    BadSourceId(String),
    #[error(
        "--disk {spec:?}: disk id {id:?} is not valid (1-128 of A-Z a-z 0-9 . _ -, not \
         starting with a dot); name it explicitly with PATH:DISK_ID"
    )]
    BadDiskId { spec: String, id: String },
    #[error("--disk {0:?}: no path")]
    EmptyDiskPath(String),
    #[error("--disk: disk id {0:?} is given twice")]
    DuplicateDiskId(String),
    #[error("--disk: at least one disk is needed")]
    NoDisks,
    #[error("--token: the token is empty or longer than {max} bytes")]
    BadToken { max: usize },
}

impl ConfigError {
    /// The flag the error is about, without the leading dashes (`"rescan-interval"`).
    pub fn flag(&self) -> &'static str {
        match self {
            ConfigError::BadSize { flag, .. }
            | ConfigError::BadDuration { flag, .. }
            | ConfigError::OutOfRange { flag, .. } => flag,
            ConfigError::BadServer(_) => "server",
            ConfigError::BadSourceId(_) => "source-id",
            ConfigError::BadDiskId { .. }
            | ConfigError::EmptyDiskPath(_)
            | ConfigError::DuplicateDiskId(_)
            | ConfigError::NoDisks => "disk",
            ConfigError::BadToken { .. } => "token",
        }
    }
}

/// Parses a bandwidth limit in megabits per second (`100`, `2.5`); `0` is no limit.
pub fn parse_bandwidth_limit(s: &str) -> Result<Option<f64>, ConfigError> {
    let bad = || ConfigError::OutOfRange {
        flag: "bandwidth-limit",
        reason: format!("{s:?} is not a rate in Mbit/s (examples: 100, 2.5; 0 for no limit)"),
    };
    let mbps: f64 = s.trim().parse().map_err(|_| bad())?;
    if !mbps.is_finite() || mbps < 0.0 {
        return Err(bad());
    }
    if mbps == 0.0 {
        return Ok(None);
    }
    if mbps < 0.01 {
        return Err(ConfigError::OutOfRange {
            flag: "bandwidth-limit",
            reason: format!("{s} Mbit/s is below the smallest limit, 0.01 Mbit/s"),
        });
    }
    Ok(Some(mbps))
}

/// Parses a duration in humantime syntax (`10s`, `1m 30s`, `250ms`).
pub fn parse_duration(flag: &'static str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s.trim()).map_err(|_| ConfigError::BadDuration {
        flag,
        value: s.to_owned(),
    })
}

fn size_flag(flag: &'static str, s: &str) -> Result<u64, ConfigError> {
    slipway_net::units::parse_size(s).map_err(|_| ConfigError::BadSize {
        flag,
        value: s.to_owned(),
    })
}

/// Where the server is: host (name or IP literal) and port, as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddr {
    pub host: String,
    pub port: u16,
}

impl ServerAddr {
    /// Parses `HOST:PORT`, `IP:PORT` or `[IPv6]:PORT`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::BadServer(s.to_owned());
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest.split_once("]:").ok_or_else(bad)?;
            (h, p)
        } else {
            let (h, p) = s.rsplit_once(':').ok_or_else(bad)?;
            if h.contains(':') {
                // A bare IPv6 address: the port cannot be told apart without brackets.
                return Err(bad());
            }
            (h, p)
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(ServerAddr {
            host: host.to_owned(),
            port,
        })
    }

    /// The name TLS checks the certificate against when none is given: the host when it is
    /// a DNS name; for an IP literal "localhost", the name the self-signed default carries.
    pub fn default_server_name(&self) -> String {
        if self.host.parse::<IpAddr>().is_ok() {
            "localhost".to_owned()
        } else {
            self.host.clone()
        }
    }

    /// `host:port` in the form `lookup_host` resolves.
    pub fn lookup_string(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.lookup_string())
    }
}

/// One `--disk` argument: which file or device, and the id the server knows it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub id: String,
}

impl DiskSpec {
    /// Parses `PATH` or `PATH:DISK_ID`.
    ///
    /// Device paths often hold colons themselves (`/dev/disk/by-path/pci-0000:00:1f.2-ata-1`),
    /// so a spec that names an existing file as a whole is a bare path; otherwise the part
    /// after the last colon is the disk id.
    pub fn parse(spec: &str, exists: impl Fn(&Path) -> bool) -> Result<Self, ConfigError> {
        let (path, id) = match spec.rsplit_once(':') {
            Some((p, id)) if !exists(Path::new(spec)) => (p, Some(id)),
            _ => (spec, None),
        };
        if path.is_empty() {
            return Err(ConfigError::EmptyDiskPath(spec.to_owned()));
        }
        let path = PathBuf::from(path);
        let id = match id {
            Some(id) => id.to_owned(),
            None => derive_disk_id(&path),
        };
        if !valid_id(&id) {
            return Err(ConfigError::BadDiskId {
                spec: spec.to_owned(),
                id,
            });
        }
        Ok(DiskSpec { path, id })
    }
}

/// The default disk id: the file name of `path`, with every character outside
/// `[A-Za-z0-9._-]` replaced by `_`. Not necessarily valid (".img", or too long); the caller
/// checks.
pub fn derive_disk_id(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Raw values of the `replicate` flags, as the command line gave them.
#[derive(Debug, Clone, Default)]
pub struct RawArgs {
    pub server: String,
    pub server_ca: Option<PathBuf>,
    pub server_fingerprint: Option<String>,
    pub server_name: Option<String>,
    pub source_id: String,
    pub token: String,
    pub disks: Vec<String>,
    pub follow: bool,
    pub rescan_interval: String,
    pub block_size: String,
    pub chunk_size: String,
    pub window: String,
    pub no_compress: bool,
    pub max_udp_payload: u16,
    pub congestion: Option<Congestion>,
    pub ack_journal: Option<PathBuf>,
    pub state_file: Option<PathBuf>,
    /// Follow mode: do not track writes in the kernel, reread the disks every interval.
    pub no_track: bool,
    /// Follow mode: do not freeze the source's filesystems around a consistency marker.
    pub no_freeze: bool,
    /// Longest freeze (default 1 s).
    pub max_freeze: Option<String>,
    pub freeze_pre_hook: Option<PathBuf>,
    pub freeze_post_hook: Option<PathBuf>,
    /// Most Mbit/s of write payload, all disks together (`None` or "0": no limit).
    pub bandwidth_limit: Option<String>,
    /// Where the running agent keeps its status for `slipway-agent status`.
    pub status_file: Option<PathBuf>,
}

/// Checked settings of a `replicate` run.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerAddr,
    pub server_name: String,
    pub trust: ServerTrust,
    pub source_id: String,
    pub token: String,
    pub disks: Vec<DiskSpec>,
    pub follow: bool,
    pub rescan_interval: Duration,
    /// Logical block size: the unit of zero detection and of every offset and length sent.
    pub block_size: u32,
    /// Read unit, largest write, and the granularity of follow-mode change detection.
    pub chunk_size: u32,
    /// Most unacked payload bytes kept in memory across all disks.
    pub window: u64,
    pub compress: bool,
    pub max_udp_payload: u16,
    pub congestion: Congestion,
    pub ack_journal: Option<PathBuf>,
    /// Where a cleanly stopped follow-mode run saves what the next run needs to resume
    /// instead of resyncing (see `persist`).
    pub state_file: Option<PathBuf>,
    /// Follow mode: track writes to block devices in the kernel (see `track`) where that is
    /// possible, and reread only what changed.
    pub track: bool,
    /// Follow mode: freeze the filesystems mounted from the source disks while a consistency
    /// marker is placed (see `freeze`), so a restore point is one instant across them.
    pub freeze: bool,
    /// A freeze is thawed after this long whatever happens (the point is then best-effort).
    pub max_freeze: Duration,
    /// Scripts run before the freeze and after the thaw (application consistency).
    pub freeze_pre_hook: Option<PathBuf>,
    pub freeze_post_hook: Option<PathBuf>,
    /// The source's bandwidth limit, shared by every disk's sender (see `throttle`); `None`:
    /// no limit.
    pub bandwidth: Option<Arc<Throttle>>,
    /// Where the status for `slipway-agent status` is written every few seconds (see
    /// `status`); `None`: nowhere.
    pub status_file: Option<PathBuf>,
}

/// Smallest and largest accepted `--block-size`.
pub const BLOCK_SIZE_RANGE: (u32, u32) = (512, 65536);

impl Config {
    /// Validates raw flag values. `exists` answers whether a path names an existing file; it
    /// only disambiguates `--disk` specs (see [`DiskSpec::parse`]).
    pub fn from_raw(raw: RawArgs, exists: impl Fn(&Path) -> bool) -> Result<Self, ConfigError> {
        let server = ServerAddr::parse(&raw.server)?;
        let server_name = match raw.server_name {
            Some(n) if !n.is_empty() => n,
            _ => server.default_server_name(),
        };
        let trust = match (raw.server_ca, raw.server_fingerprint) {
            (Some(ca), None) => ServerTrust::CaFile(ca),
            (None, Some(fp)) => {
                slipway_net::tls::parse_fingerprint(&fp).map_err(|e| ConfigError::OutOfRange {
                    flag: "server-fingerprint",
                    reason: e.to_string(),
                })?;
                ServerTrust::Fingerprint(fp)
            }
            _ => {
                return Err(ConfigError::OutOfRange {
                    flag: "server-ca",
                    reason: "give exactly one of --server-ca and --server-fingerprint".into(),
                })
            }
        };
        if !valid_id(&raw.source_id) {
            return Err(ConfigError::BadSourceId(raw.source_id));
        }
        if raw.token.is_empty() || raw.token.len() > slipway_proto::MAX_CREDENTIAL_LEN {
            return Err(ConfigError::BadToken {
                max: slipway_proto::MAX_CREDENTIAL_LEN,
            });
        }

        let block = size_flag("block-size", &raw.block_size)?;
        let (lo, hi) = BLOCK_SIZE_RANGE;
        if !block.is_power_of_two() || block < lo.into() || block > hi.into() {
            return Err(ConfigError::OutOfRange {
                flag: "block-size",
                reason: format!("{block} is not a power of two in {lo}..={hi}"),
            });
        }
        let chunk = size_flag("chunk-size", &raw.chunk_size)?;
        if chunk < block || chunk % block != 0 || chunk > u64::from(MAX_WRITE_LEN) {
            return Err(ConfigError::OutOfRange {
                flag: "chunk-size",
                reason: format!(
                    "{chunk} is not a multiple of the block size ({block}) of at most {MAX_WRITE_LEN}"
                ),
            });
        }
        let window = size_flag("window", &raw.window)?;
        if window < chunk {
            return Err(ConfigError::OutOfRange {
                flag: "window",
                reason: format!("{window} is smaller than one chunk ({chunk})"),
            });
        }
        let rescan_interval = parse_duration("rescan-interval", &raw.rescan_interval)?;
        let max_freeze = match &raw.max_freeze {
            Some(s) => parse_duration("max-freeze", s)?,
            None => Duration::from_secs(1),
        };
        if max_freeze.is_zero() || max_freeze > Duration::from_secs(60) {
            return Err(ConfigError::OutOfRange {
                flag: "max-freeze",
                reason: "must be more than 0 and at most 60s (writers on the source wait)".into(),
            });
        }
        if rescan_interval.is_zero() {
            return Err(ConfigError::OutOfRange {
                flag: "rescan-interval",
                reason: "must be longer than zero".into(),
            });
        }
        if raw.max_udp_payload < 1200 || raw.max_udp_payload > 65527 {
            return Err(ConfigError::OutOfRange {
                flag: "max-udp-payload",
                reason: format!("{} is not in 1200..=65527", raw.max_udp_payload),
            });
        }

        if raw.disks.is_empty() {
            return Err(ConfigError::NoDisks);
        }
        let mut disks: Vec<DiskSpec> = Vec::with_capacity(raw.disks.len());
        for spec in &raw.disks {
            let d = DiskSpec::parse(spec, &exists)?;
            if disks.iter().any(|o| o.id == d.id) {
                return Err(ConfigError::DuplicateDiskId(d.id));
            }
            disks.push(d);
        }

        if raw.state_file.is_some() && !raw.follow {
            return Err(ConfigError::OutOfRange {
                flag: "state-file",
                reason: "needs --follow (the saved state is follow mode's change table)".into(),
            });
        }
        let bandwidth = match &raw.bandwidth_limit {
            Some(s) => parse_bandwidth_limit(s)?.map(|m| Arc::new(Throttle::from_mbps(m))),
            None => None,
        };
        Ok(Config {
            server,
            server_name,
            trust,
            source_id: raw.source_id,
            token: raw.token,
            disks,
            follow: raw.follow,
            rescan_interval,
            block_size: block as u32,
            chunk_size: chunk as u32,
            window,
            compress: !raw.no_compress,
            max_udp_payload: raw.max_udp_payload,
            congestion: raw.congestion.unwrap_or(Congestion::Bbr),
            ack_journal: raw.ack_journal,
            state_file: raw.state_file,
            track: !raw.no_track,
            freeze: !raw.no_freeze,
            max_freeze,
            freeze_pre_hook: raw.freeze_pre_hook,
            freeze_post_hook: raw.freeze_post_hook,
            bandwidth,
            status_file: raw.status_file,
        })
    }

    /// The transport settings these flags ask for.
    pub fn tuning(&self) -> slipway_net::Tuning {
        slipway_net::Tuning {
            max_udp_payload: self.max_udp_payload,
            congestion: self.congestion,
            ..slipway_net::Tuning::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> RawArgs {
        RawArgs {
            server: "127.0.0.1:7700".into(),
            server_fingerprint: Some("ab".repeat(32)),
            source_id: "web-01".into(),
            token: "t0ken".into(),
            disks: vec!["/dev/sda".into()],
            rescan_interval: "10s".into(),
            block_size: "512".into(),
            chunk_size: "1MiB".into(),
            window: "128MiB".into(),
            max_udp_payload: 6500,
            ..RawArgs::default()
        }
    }

    fn never(_: &Path) -> bool {
        false
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("x", "10s").unwrap(), Duration::from_secs(10));
        assert_eq!(
            parse_duration("x", "1m 30s").unwrap(),
            Duration::from_secs(90)
        );
        assert_eq!(
            parse_duration("x", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert!(matches!(
            parse_duration("rescan-interval", "10"),
            Err(ConfigError::BadDuration {
                flag: "rescan-interval",
                ..
            })
        ));
    }

    #[test]
    fn server_addresses_and_default_names() {
        let a = ServerAddr::parse("replica.example.com:7700").unwrap();
        assert_eq!(a.host, "replica.example.com");
        assert_eq!(a.port, 7700);
        assert_eq!(a.default_server_name(), "replica.example.com");
        let a = ServerAddr::parse("10.0.0.5:7700").unwrap();
        assert_eq!(a.default_server_name(), "localhost");
        let a = ServerAddr::parse("[::1]:7700").unwrap();
        assert_eq!(a.host, "::1");
        assert_eq!(a.default_server_name(), "localhost");
        assert_eq!(a.lookup_string(), "[::1]:7700");
        for bad in [
            "host",
            "host:",
            ":7700",
            "host:0",
            "host:70000",
            "::1:7700",
            "[::1]7700",
        ] {
            assert!(ServerAddr::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn disk_ids_are_derived_from_the_file_name() {
        assert_eq!(derive_disk_id(Path::new("/dev/nvme0n1")), "nvme0n1");
        assert_eq!(
            derive_disk_id(Path::new("/tmp/my disk (1).img")),
            "my_disk__1_.img"
        );
        assert_eq!(derive_disk_id(Path::new("/tmp/dísk")), "d_sk");
        assert_eq!(derive_disk_id(Path::new("/")), "");
    }

    #[test]
    fn disk_specs() {
        let d = DiskSpec::parse("/dev/sda", never).unwrap();
        assert_eq!(d.path, PathBuf::from("/dev/sda"));
        assert_eq!(d.id, "sda");
        let d = DiskSpec::parse("/dev/sda:root", never).unwrap();
        assert_eq!(d.path, PathBuf::from("/dev/sda"));
        assert_eq!(d.id, "root");
        // A path with colons that exists as given is a bare path.
        let by_path = "/dev/disk/by-path/pci-0000:00:1f.2-ata-1";
        let d = DiskSpec::parse(by_path, |p| p == Path::new(by_path)).unwrap();
        assert_eq!(d.path, PathBuf::from(by_path));
        assert_eq!(d.id, "pci-0000_00_1f.2-ata-1");
        // ... and can still be named explicitly.
        let spec = format!("{by_path}:boot");
        let d = DiskSpec::parse(&spec, |p| p == Path::new(by_path)).unwrap();
        assert_eq!(d.path, PathBuf::from(by_path));
        assert_eq!(d.id, "boot");
        assert!(matches!(
            DiskSpec::parse("/tmp/.hidden", never),
            Err(ConfigError::BadDiskId { .. })
        ));
        assert!(matches!(
            DiskSpec::parse("/tmp/x:../up", never),
            Err(ConfigError::BadDiskId { .. })
        ));
        assert!(matches!(
            DiskSpec::parse(":id", never),
            Err(ConfigError::EmptyDiskPath(_))
        ));
    }

    #[test]
    fn a_good_command_line_validates() {
        let c = Config::from_raw(raw(), never).unwrap();
        assert_eq!(c.block_size, 512);
        assert_eq!(c.chunk_size, 1 << 20);
        assert_eq!(c.window, 128 << 20);
        assert_eq!(c.server_name, "localhost");
        assert!(c.compress);
        assert_eq!(c.congestion, Congestion::Bbr);
        assert_eq!(c.disks[0].id, "sda");
        assert_eq!(c.tuning().max_udp_payload, 6500);
    }

    #[test]
    fn each_bad_flag_is_named() {
        let check = |f: &dyn Fn(&mut RawArgs), flag: &str| {
            let mut r = raw();
            f(&mut r);
            let e = Config::from_raw(r, never).unwrap_err();
            assert!(e.to_string().contains(flag), "{e} should name {flag}");
        };
        check(&|r| r.block_size = "1000".into(), "--block-size");
        check(&|r| r.block_size = "256".into(), "--block-size");
        check(&|r| r.block_size = "128KiB".into(), "--block-size");
        check(&|r| r.chunk_size = "1000".into(), "--chunk-size");
        check(&|r| r.chunk_size = "8MiB".into(), "--chunk-size");
        check(&|r| r.chunk_size = "lots".into(), "--chunk-size");
        check(&|r| r.window = "512KiB".into(), "--window");
        check(&|r| r.rescan_interval = "0s".into(), "--rescan-interval");
        check(&|r| r.max_udp_payload = 1000, "--max-udp-payload");
        check(&|r| r.source_id = "a/b".into(), "--source-id");
        check(&|r| r.server = "nohost".into(), "--server");
        check(
            &|r| r.server_fingerprint = Some("zz".into()),
            "--server-fingerprint",
        );
        check(&|r| r.server_ca = Some("/ca.pem".into()), "--server-ca");
        check(&|r| r.token = String::new(), "--token");
        check(&|r| r.disks = vec![], "--disk");
        check(
            &|r| r.bandwidth_limit = Some("fast".into()),
            "--bandwidth-limit",
        );
        check(
            &|r| r.bandwidth_limit = Some("-5".into()),
            "--bandwidth-limit",
        );
        check(
            &|r| r.disks = vec!["/a/sda".into(), "/b/sda".into()],
            "--disk",
        );
    }

    #[test]
    fn bandwidth_limits() {
        assert_eq!(parse_bandwidth_limit("100").unwrap(), Some(100.0));
        assert_eq!(parse_bandwidth_limit(" 2.5 ").unwrap(), Some(2.5));
        assert_eq!(parse_bandwidth_limit("0").unwrap(), None);
        for bad in ["", "1e400", "NaN", "inf", "-1", "10Mbit", "0.001"] {
            let e = parse_bandwidth_limit(bad).unwrap_err();
            assert_eq!(e.flag(), "bandwidth-limit", "{bad:?}");
        }
        let mut r = raw();
        assert!(Config::from_raw(r.clone(), never)
            .unwrap()
            .bandwidth
            .is_none());
        r.bandwidth_limit = Some("40".into());
        let c = Config::from_raw(r, never).unwrap();
        assert!((c.bandwidth.unwrap().mbps() - 40.0).abs() < 1e-9);
    }

    #[test]
    fn explicit_server_name_wins() {
        let mut r = raw();
        r.server_name = Some("replica.internal".into());
        assert_eq!(
            Config::from_raw(r, never).unwrap().server_name,
            "replica.internal"
        );
    }
}
