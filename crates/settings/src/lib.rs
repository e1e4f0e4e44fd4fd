//! Server settings: one TOML file, parsed in two phases.
//!
//! Phase one deserializes into `Raw*` structs that mirror the file exactly
//! (`deny_unknown_fields`, every field defaulted), so a typo is caught with its key path.
//! Phase two validates into [`Settings`] with typed values (addresses, durations, sizes), each
//! error naming the file, the key and the reason — the operator should never have to guess
//! which line is wrong. Command-line flags override the file after phase one.
//!
//! A crate of its own (the server re-exports it as `slipway_server::settings`) because the
//! replication templates of `crates/fleet` render a server's settings and check them with this
//! very validation: they need the settings, not the server, its QUIC sessions and its metrics.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use slipway_net::units::parse_size;
use slipway_net::{Congestion, Tuning};
use thiserror::Error;

/// A settings file that cannot be used.
#[derive(Debug, Error)]
pub enum SettingsError {
    /// The file could not be read.
    #[error("settings file {file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or a key has the wrong type or is unknown.
    #[error("settings file {file}: key `{key}`: {reason}")]
    Parse {
        file: String,
        key: String,
        reason: String,
    },
    /// A value is out of range or inconsistent.
    #[error("settings file {file}: key `{key}`: {reason}")]
    Invalid {
        file: String,
        key: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSettings {
    pub data_dir: Option<String>,
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub log_format: Option<String>,
    /// `local` (default) or `aws`.
    pub backend: Option<String>,
    pub tls: RawTls,
    pub replication: RawReplication,
    pub quic: RawQuic,
    pub pit: slipway_pit::RawPitSettings,
    /// Per-source settings pushed to that source's agent (`[sources.NAME]`).
    pub sources: BTreeMap<String, RawSource>,
    /// The AWS backend's settings, validated by the binary with `slipway-aws` (the server
    /// crate does not know the SDK).
    pub aws: Option<toml::Table>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTls {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub names: Option<Vec<String>>,
    /// PEM file of CAs whose client certificates agents must present (mutual TLS).
    pub client_ca: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawReplication {
    pub bandwidth_mbps: Option<u64>,
    pub compression: Option<bool>,
    pub heartbeat: Option<String>,
    pub max_write: Option<String>,
    pub disk_queue: Option<String>,
    pub memory_limit: Option<String>,
    pub stall_after: Option<String>,
    pub frame_timeout: Option<String>,
    pub max_disks_per_connection: Option<u32>,
    pub capture_memory: Option<String>,
    /// Where capture spill files go (default `data_dir/spill`).
    pub spill_dir: Option<String>,
    pub max_snapshot_hold: Option<String>,
    /// Default bandwidth limit pushed to every source's agent, Mbit/s (0: none); a
    /// `[sources.NAME]` entry overrides it for that source.
    pub source_bandwidth_mbps: Option<f64>,
}

/// `[sources.NAME]`: what the server tells that source's agent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSource {
    /// The source's replication bandwidth, Mbit/s (0: none; the agent's own limit still
    /// applies, the stricter wins).
    pub bandwidth_mbps: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawQuic {
    pub max_udp_payload: Option<u16>,
    pub initial_mtu: Option<u16>,
    pub congestion: Option<String>,
    pub stream_window: Option<String>,
    pub connection_window: Option<String>,
    pub send_window: Option<String>,
    pub idle_timeout: Option<String>,
    pub keep_alive: Option<String>,
    pub socket_buffer: Option<String>,
    pub receive_memory: Option<String>,
}

/// Where volumes and restore points live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Sparse files and the local snapshot store under the data dir.
    Local,
    /// One EBS volume per source disk, EBS snapshots as restore points.
    Aws,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub log_format: LogFormat,
    /// Certificate and key; `None` means generate under `data_dir/tls`.
    pub tls_cert: Option<(PathBuf, PathBuf)>,
    pub tls_names: Vec<String>,
    /// Mutual TLS: agents must present a client certificate issued by one of these CAs.
    pub tls_client_ca: Option<PathBuf>,
    pub backend: BackendKind,
    /// The raw `[aws]` table (validated by the binary) and the file it came from.
    pub aws: Option<(toml::Table, String)>,
    /// Server-wide receive throttle in bytes per second (0 = unthrottled).
    pub bandwidth_bytes_per_sec: u64,
    pub compression: bool,
    pub heartbeat: Duration,
    pub max_write: u32,
    pub disk_queue_bytes: u64,
    pub memory_limit_bytes: u64,
    pub stall_after: Duration,
    /// Once a frame's first byte has arrived, all of it must within this.
    pub frame_timeout: Duration,
    pub max_disks_per_connection: u32,
    /// Per disk being captured for a restore point: bytes of copy-on-write blocks kept in
    /// memory before they spill to [`spill_dir`](Self::spill_dir).
    pub capture_memory_bytes: u64,
    /// Directory of the capture spill files (unlinked at creation, so nothing in it survives
    /// the server): `replication.spill_dir`, default `data_dir/spill`. Kept apart from the data
    /// dir on EC2 servers, whose data dir is a small identity volume.
    pub spill_dir: PathBuf,
    /// Bound on the remote snapshot requests of a restore point, made while the source's
    /// writes are held at the marker: past it the point fails (retried at a later tick) and
    /// the writes go on.
    pub max_snapshot_hold: Duration,
    pub tuning: Tuning,
    /// All connections' QUIC receive windows together: each live connection's window is an
    /// equal share of this (at most `tuning.connection_window`, at least 1 MiB), so the bytes
    /// the server's QUIC buffers may hold do not grow with the number of agents.
    pub quic_receive_memory: u64,
    pub pit: slipway_pit::PitPolicy,
    /// Bandwidth limit pushed to agents, bits per second (0: none), unless
    /// [`Settings::source_bandwidth_bps`] has an entry for the source.
    pub default_source_bandwidth_bps: u64,
    /// Per-source bandwidth limits pushed to agents, bits per second (0: none).
    pub source_bandwidth_bps: BTreeMap<String, u64>,
    /// [`settings_sha256`] of the settings file this server runs with (`None`: defaults).
    /// Reported in status and `slipway_settings_info`, so `slipway template apply` can tell
    /// what an instance really applied rather than trust its tag.
    pub settings_sha256: Option<String>,
}

/// The fingerprint of a settings file: the first 8 bytes of its SHA-256, in hex. The
/// replication template's `slipway:settings-sha256` tag is this of the rendered user data.
pub fn settings_sha256(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(text.as_bytes())[..8])
}

/// Command-line overrides (flags beat the file).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
}

/// Mbit/s from a settings key as bits per second: finite, 0 (none) or at least 0.1 Mbit/s,
/// at most 1 Tbit/s.
fn mbps_to_bps(mbps: f64) -> Result<u64, String> {
    if !mbps.is_finite() || mbps < 0.0 {
        return Err(format!("{mbps} is not a bandwidth in Mbit/s (0 for none)"));
    }
    if mbps > 0.0 && mbps < 0.1 {
        return Err(format!(
            "{mbps} Mbit/s is below 0.1 Mbit/s; use 0 for no limit"
        ));
    }
    if mbps > 1_000_000.0 {
        return Err(format!(
            "{mbps} Mbit/s is more than 1 Tbit/s; use 0 for no limit"
        ));
    }
    Ok((mbps * 1e6).round() as u64)
}

impl Settings {
    /// The bandwidth limit the server's settings set for `source`, bits per second (0: none).
    pub fn bandwidth_for(&self, source: &str) -> u64 {
        self.source_bandwidth_bps
            .get(source)
            .copied()
            .unwrap_or(self.default_source_bandwidth_bps)
    }

    /// Defaults of the embedded local mode.
    pub fn local_default() -> Self {
        Self::validate(RawSettings::default(), "<defaults>").expect("defaults are valid")
    }

    /// Reads `file` (or the defaults when `None`), applies `over`, validates.
    pub fn load(file: Option<&Path>, over: &Overrides) -> Result<Self, SettingsError> {
        let (mut raw, name, sha) = match file {
            Some(p) => {
                let name = p.display().to_string();
                let text = std::fs::read_to_string(p).map_err(|source| SettingsError::Read {
                    file: name.clone(),
                    source,
                })?;
                (
                    Self::parse(&text, &name)?,
                    name,
                    Some(settings_sha256(&text)),
                )
            }
            None => (RawSettings::default(), "<defaults>".to_string(), None),
        };
        if let Some(d) = &over.data_dir {
            raw.data_dir = Some(d.display().to_string());
        }
        if let Some(l) = &over.listen {
            raw.listen = Some(l.clone());
        }
        if let Some(l) = &over.metrics_listen {
            raw.metrics_listen = Some(l.clone());
        }
        let mut settings = Self::validate(raw, &name)?;
        settings.settings_sha256 = sha;
        Ok(settings)
    }

    /// Phase one: TOML into the raw structs, errors with the key path.
    pub fn parse(text: &str, file: &str) -> Result<RawSettings, SettingsError> {
        let de = toml::Deserializer::new(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            SettingsError::Parse {
                file: file.to_string(),
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                reason: inner.message().trim().to_string(),
            }
        })
    }

    /// Phase two: typed, checked values.
    pub fn validate(raw: RawSettings, file: &str) -> Result<Self, SettingsError> {
        let bad = |key: &str, reason: String| SettingsError::Invalid {
            file: file.to_string(),
            key: key.to_string(),
            reason,
        };
        let addr = |key: &str, v: Option<&String>, default: &str| -> Result<SocketAddr, _> {
            let s = v.map(String::as_str).unwrap_or(default);
            s.parse()
                .map_err(|_| bad(key, format!("{s:?} is not an address like 127.0.0.1:1500")))
        };
        let dur = |key: &str, v: Option<&String>, default: &str| -> Result<Duration, _> {
            let s = v.map(String::as_str).unwrap_or(default);
            humantime::parse_duration(s)
                .map_err(|e| bad(key, format!("{s:?} is not a duration like \"10s\": {e}")))
        };
        let size = |key: &str, v: Option<&String>, default: &str| -> Result<u64, _> {
            let s = v.map(String::as_str).unwrap_or(default);
            parse_size(s).map_err(|e| bad(key, e.to_string()))
        };

        let data_dir = PathBuf::from(raw.data_dir.as_deref().unwrap_or("./var"));
        if data_dir.as_os_str().is_empty() {
            return Err(bad("data_dir", "must not be empty".into()));
        }
        let listen = addr("listen", raw.listen.as_ref(), "127.0.0.1:1500")?;
        let metrics_listen = addr(
            "metrics_listen",
            raw.metrics_listen.as_ref(),
            "127.0.0.1:9500",
        )?;
        let log_format = match raw.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            o => return Err(bad("log_format", format!("{o:?} is not one of text, json"))),
        };
        let tls_cert = match (&raw.tls.cert, &raw.tls.key) {
            (None, None) => None,
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (Some(_), None) => {
                return Err(bad("tls.key", "is required when tls.cert is set".into()))
            }
            (None, Some(_)) => {
                return Err(bad("tls.cert", "is required when tls.key is set".into()))
            }
        };
        let tls_names = raw
            .tls
            .names
            .clone()
            .unwrap_or_else(|| vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]);
        if tls_names.is_empty() {
            return Err(bad("tls.names", "needs at least one name".into()));
        }

        let backend = match raw.backend.as_deref().unwrap_or("local") {
            "local" => BackendKind::Local,
            "aws" => BackendKind::Aws,
            o => return Err(bad("backend", format!("{o:?} is not one of local, aws"))),
        };
        if backend == BackendKind::Local && raw.aws.is_some() {
            return Err(bad(
                "aws",
                "is set but backend is \"local\"; set backend = \"aws\" to use it".into(),
            ));
        }
        let r = &raw.replication;
        let mbps = r.bandwidth_mbps.unwrap_or(0);
        if mbps > 1_000_000 {
            return Err(bad(
                "replication.bandwidth_mbps",
                format!("{mbps} Mbit/s is more than 1 Tbit/s; use 0 for unthrottled"),
            ));
        }
        let max_write = size("replication.max_write", r.max_write.as_ref(), "4MiB")?;
        if max_write < 4096 || max_write > slipway_proto::MAX_WRITE_LEN as u64 {
            return Err(bad(
                "replication.max_write",
                format!("{max_write} is outside 4KiB..=4MiB"),
            ));
        }
        let disk_queue = size("replication.disk_queue", r.disk_queue.as_ref(), "32MiB")?;
        if disk_queue < max_write {
            return Err(bad(
                "replication.disk_queue",
                format!("{disk_queue} bytes cannot hold one write of max_write ({max_write})"),
            ));
        }
        let memory_limit = size(
            "replication.memory_limit",
            r.memory_limit.as_ref(),
            "256MiB",
        )?;
        if memory_limit < disk_queue {
            return Err(bad(
                "replication.memory_limit",
                format!("{memory_limit} bytes is less than one disk_queue ({disk_queue})"),
            ));
        }
        let heartbeat = dur("replication.heartbeat", r.heartbeat.as_ref(), "5s")?;
        if heartbeat < Duration::from_millis(100) || heartbeat > Duration::from_secs(600) {
            return Err(bad(
                "replication.heartbeat",
                "must be between 100ms and 10m".into(),
            ));
        }
        let stall_after = dur("replication.stall_after", r.stall_after.as_ref(), "60s")?;
        let frame_timeout = dur(
            "replication.frame_timeout",
            r.frame_timeout.as_ref(),
            "120s",
        )?;
        if frame_timeout < Duration::from_secs(1) || frame_timeout > Duration::from_secs(3600) {
            return Err(bad(
                "replication.frame_timeout",
                "must be between 1s and 1h".into(),
            ));
        }
        let max_snapshot_hold = dur(
            "replication.max_snapshot_hold",
            r.max_snapshot_hold.as_ref(),
            "2s",
        )?;
        if max_snapshot_hold < Duration::from_millis(100)
            || max_snapshot_hold > Duration::from_secs(60)
        {
            return Err(bad(
                "replication.max_snapshot_hold",
                "must be between 100ms and 60s".into(),
            ));
        }
        let max_disks = r.max_disks_per_connection.unwrap_or(64);
        if max_disks == 0 || max_disks > 1024 {
            return Err(bad(
                "replication.max_disks_per_connection",
                format!("{max_disks} is outside 1..=1024"),
            ));
        }

        let capture_memory = size(
            "replication.capture_memory",
            r.capture_memory.as_ref(),
            "64MiB",
        )?;
        let spill_dir = match r.spill_dir.as_deref() {
            None => data_dir.join("spill"),
            Some("") => return Err(bad("replication.spill_dir", "must not be empty".into())),
            Some(d) => PathBuf::from(d),
        };

        let q = &raw.quic;
        let d = Tuning::default();
        let max_udp_payload = q.max_udp_payload.unwrap_or(d.max_udp_payload);
        if !(1200..=9000).contains(&max_udp_payload) {
            return Err(bad(
                "quic.max_udp_payload",
                format!("{max_udp_payload} is outside 1200..=9000"),
            ));
        }
        let initial_mtu = q.initial_mtu.unwrap_or(d.initial_mtu);
        if initial_mtu < 1200 || initial_mtu > max_udp_payload {
            return Err(bad(
                "quic.initial_mtu",
                format!("{initial_mtu} is outside 1200..=max_udp_payload ({max_udp_payload})"),
            ));
        }
        let congestion: Congestion = q
            .congestion
            .as_deref()
            .unwrap_or("cubic")
            .parse()
            .map_err(|e| bad("quic.congestion", e))?;
        let idle_timeout = dur("quic.idle_timeout", q.idle_timeout.as_ref(), "30s")?;
        let keep_alive = dur("quic.keep_alive", q.keep_alive.as_ref(), "5s")?;
        if keep_alive >= idle_timeout {
            return Err(bad(
                "quic.keep_alive",
                "must be shorter than quic.idle_timeout".into(),
            ));
        }
        let tuning = Tuning {
            max_udp_payload,
            initial_mtu,
            congestion,
            stream_window: size("quic.stream_window", q.stream_window.as_ref(), "16MiB")?,
            connection_window: size(
                "quic.connection_window",
                q.connection_window.as_ref(),
                "32MiB",
            )?,
            send_window: size("quic.send_window", q.send_window.as_ref(), "8MiB")?,
            idle_timeout,
            keep_alive,
            socket_buffer: size("quic.socket_buffer", q.socket_buffer.as_ref(), "16MiB")? as usize,
            max_streams: max_disks + 1,
            ack_eliciting_threshold: Some(slipway_net::ACK_ELICITING_THRESHOLD),
        };

        let quic_receive_memory = size("quic.receive_memory", q.receive_memory.as_ref(), "256MiB")?;
        if quic_receive_memory < tuning.connection_window.min(1 << 20) {
            return Err(bad(
                "quic.receive_memory",
                format!("{quic_receive_memory} bytes is less than one connection's smallest window (1 MiB)"),
            ));
        }

        let pit =
            slipway_pit::PitPolicy::from_raw(&raw.pit).map_err(|e| bad("pit", e.to_string()))?;
        let default_source_bandwidth_bps = mbps_to_bps(r.source_bandwidth_mbps.unwrap_or(0.0))
            .map_err(|e| bad("replication.source_bandwidth_mbps", e))?;
        let mut source_bandwidth_bps = BTreeMap::new();
        for (name, src) in &raw.sources {
            if !slipway_proto::valid_id(name) {
                return Err(bad(
                    &format!("sources.{name}"),
                    "is not a valid source id".into(),
                ));
            }
            if let Some(m) = src.bandwidth_mbps {
                let bps = mbps_to_bps(m)
                    .map_err(|e| bad(&format!("sources.{name}.bandwidth_mbps"), e))?;
                source_bandwidth_bps.insert(name.clone(), bps);
            }
        }

        Ok(Settings {
            data_dir,
            listen,
            metrics_listen,
            log_format,
            tls_cert,
            tls_names,
            tls_client_ca: raw.tls.client_ca.as_ref().map(PathBuf::from),
            backend,
            aws: raw.aws.clone().map(|t| (t, file.to_string())),
            bandwidth_bytes_per_sec: mbps * 1_000_000 / 8,
            compression: r.compression.unwrap_or(true),
            heartbeat,
            max_write: max_write as u32,
            disk_queue_bytes: disk_queue,
            memory_limit_bytes: memory_limit,
            stall_after,
            frame_timeout,
            max_disks_per_connection: max_disks,
            capture_memory_bytes: capture_memory,
            spill_dir,
            max_snapshot_hold,
            tuning,
            quic_receive_memory,
            pit,
            default_source_bandwidth_bps,
            source_bandwidth_bps,
            settings_sha256: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quic_receive_memory_defaults_and_is_checked() {
        let d = tempfile::tempdir().unwrap();
        let s = Settings::load(None, &Overrides::default()).unwrap();
        assert_eq!(s.quic_receive_memory, 256 << 20);
        let p = d.path().join("s.toml");
        std::fs::write(&p, "[quic]\nreceive_memory = \"64MiB\"\n").unwrap();
        assert_eq!(
            Settings::load(Some(&p), &Overrides::default())
                .unwrap()
                .quic_receive_memory,
            64 << 20
        );
        std::fs::write(&p, "[quic]\nreceive_memory = \"512KiB\"\n").unwrap();
        let e = Settings::load(Some(&p), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("quic.receive_memory"), "{e}");
    }

    #[test]
    fn a_loaded_file_carries_the_fingerprint_of_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("slipway.toml");
        let text = "# rendered\nlisten = \"0.0.0.0:1500\"\n";
        std::fs::write(&p, text).unwrap();
        let s = Settings::load(Some(&p), &Overrides::default()).unwrap();
        assert_eq!(
            s.settings_sha256.as_deref(),
            Some(settings_sha256(text).as_str())
        );
        assert_eq!(settings_sha256(text).len(), 16);
        assert_ne!(
            settings_sha256(text),
            settings_sha256("listen = \"0.0.0.0:1500\"\n")
        );
        assert_eq!(Settings::local_default().settings_sha256, None);
    }

    fn load(text: &str) -> Result<Settings, SettingsError> {
        let raw = Settings::parse(text, "/etc/slipway/slipway.toml")?;
        Settings::validate(raw, "/etc/slipway/slipway.toml")
    }

    #[test]
    fn defaults() {
        let s = Settings::local_default();
        assert_eq!(s.listen.to_string(), "127.0.0.1:1500");
        assert_eq!(s.metrics_listen.to_string(), "127.0.0.1:9500");
        assert_eq!(s.data_dir, PathBuf::from("./var"));
        assert_eq!(s.spill_dir, PathBuf::from("./var/spill"));
        assert_eq!(s.bandwidth_bytes_per_sec, 0);
        assert!(s.compression);
        assert_eq!(s.frame_timeout, slipway_net::MID_FRAME_TIMEOUT);
        assert_eq!(
            s.capture_memory_bytes,
            slipway_store::applier::DEFAULT_CAPTURE_MEMORY
        );
    }

    #[test]
    fn full_file() {
        let s = load(
            r#"
            data_dir = "/var/lib/slipway"
            listen = "0.0.0.0:1500"
            [replication]
            bandwidth_mbps = 100
            compression = false
            capture_memory = "4MiB"
            spill_dir = "/var/tmp/slipway-spill"
            [quic]
            congestion = "bbr"
            stream_window = "8MiB"
            [pit]
            tiers = [ { every = "2s", keep = 3 } ]
            "#,
        )
        .unwrap();
        assert_eq!(s.bandwidth_bytes_per_sec, 12_500_000);
        assert_eq!(s.tuning.congestion, Congestion::Bbr);
        assert_eq!(s.tuning.stream_window, 8 << 20);
        assert!(!s.compression);
        assert_eq!(s.capture_memory_bytes, 4 << 20);
        assert_eq!(s.spill_dir, PathBuf::from("/var/tmp/slipway-spill"));
    }

    #[test]
    fn source_bandwidth_limits() {
        let s = load(
            r#"
            [replication]
            source_bandwidth_mbps = 50
            [sources.web]
            bandwidth_mbps = 2.5
            [sources.db]
            bandwidth_mbps = 0
            [sources.other]
            "#,
        )
        .unwrap();
        assert_eq!(s.bandwidth_for("web"), 2_500_000);
        assert_eq!(s.bandwidth_for("db"), 0, "0 lifts the default for db");
        assert_eq!(s.bandwidth_for("other"), 50_000_000);
        assert_eq!(s.bandwidth_for("unlisted"), 50_000_000);
        assert_eq!(Settings::local_default().bandwidth_for("web"), 0);
        for (text, key) in [
            (
                "[sources.web]\nbandwidth_mbps = -1\n",
                "sources.web.bandwidth_mbps",
            ),
            (
                "[sources.web]\nbandwidth_mbps = 0.01\n",
                "sources.web.bandwidth_mbps",
            ),
            ("[sources.web]\nbandwidth_mps = 1\n", "bandwidth_mps"),
            ("[sources.\"a b\"]\nbandwidth_mbps = 1\n", "sources.a b"),
            (
                "[replication]\nsource_bandwidth_mbps = 2e6\n",
                "replication.source_bandwidth_mbps",
            ),
        ] {
            let e = load(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let e = load("[replication]\nbandwith_mbps = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/slipway/slipway.toml"), "{e}");
        assert!(e.contains("bandwith_mbps"), "{e}");
        assert!(e.contains("unknown field"), "{e}");

        let e = load("[replication]\nbandwidth_mbps = \"fast\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("replication.bandwidth_mbps"), "{e}");

        let e = load("[quic]\ncongestion = \"vegas\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `quic.congestion`"), "{e}");
        assert!(e.contains("vegas"), "{e}");

        let e = load("listen = \"nowhere\"\n").unwrap_err().to_string();
        assert!(e.contains("key `listen`"), "{e}");

        let e = load("[replication]\nheartbeat = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("replication.heartbeat") && e.contains("duration"),
            "{e}"
        );

        let e = load("[replication]\nframe_timeout = \"100ms\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("replication.frame_timeout") && e.contains("between 1s and 1h"),
            "{e}"
        );
        assert_eq!(
            load("[replication]\nframe_timeout = \"3s\"\n")
                .unwrap()
                .frame_timeout,
            Duration::from_secs(3)
        );

        let e = load("[quic]\nmax_udp_payload = 100\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("quic.max_udp_payload"), "{e}");

        let e = load("[tls]\ncert = \"/x.pem\"\n").unwrap_err().to_string();
        assert!(e.contains("tls.key"), "{e}");

        let e = load("[replication]\ncapture_memory = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `replication.capture_memory`"), "{e}");

        let e = load("[pit]\ntiers = []\n").unwrap_err().to_string();
        assert!(e.contains("key `pit`"), "{e}");

        let e = load("backend = \"gcp\"\n").unwrap_err().to_string();
        assert!(e.contains("key `backend`") && e.contains("gcp"), "{e}");

        let e = load("[aws]\nregion = \"us-east-1\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `aws`"), "{e}");

        let e = load("this is not toml").unwrap_err().to_string();
        assert!(e.contains("/etc/slipway/slipway.toml"), "{e}");
    }

    #[test]
    fn overrides_beat_the_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("s.toml");
        std::fs::write(&f, "listen = \"127.0.0.1:1\"\n").unwrap();
        let s = Settings::load(
            Some(&f),
            &Overrides {
                listen: Some("127.0.0.1:2".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(s.listen.port(), 2);
        let e = Settings::load(Some(&d.path().join("missing.toml")), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.toml"), "{e}");
    }
}
