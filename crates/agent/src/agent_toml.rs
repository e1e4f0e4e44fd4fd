//! The agent's config file (`replicate --config /etc/slipway/agent.toml`), and how it meets
//! the command line.
//!
//! Two phases, as the server's settings: the TOML is read into [`RawAgentToml`], which
//! mirrors the file (`deny_unknown_fields`, so a typo is caught with its key), then checked
//! into a [`Layer`]: every `replicate` flag as an optional value. The command line is a
//! `Layer` too; [`merge`] lays the command line over the file, remembering which key each
//! value came from, so an error about a value from the file names the file and the key
//! rather than a flag the operator never typed. The values then go through the same
//! validation as flags ([`crate::config::Config::from_raw`]).
//!
//! The credential is never read from this file (it is usually world-readable, and an
//! example of it gets copied around): `token_file` names a file of its own, mode 0600.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use slipway_net::Congestion;
use thiserror::Error;

use crate::config::{ConfigError, LogFormat, RawArgs};

/// Where the systemd unit points `--config`.
pub const DEFAULT_CONFIG: &str = "/etc/slipway/agent.toml";

/// A config file or a combination of settings that cannot be used. Permanent: exit code 2.
#[derive(Debug, Error)]
pub enum SettingsError {
    /// The file could not be read.
    #[error("config file {file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// A key of the file is unknown, of the wrong type, or its value is not usable.
    #[error("config file {file}: key `{key}`: {reason}")]
    Key {
        file: String,
        key: String,
        reason: String,
    },
    /// Something needed is given nowhere, or given twice in ways that contradict.
    #[error("{0}")]
    Missing(String),
    /// A flag's value is not usable.
    #[error(transparent)]
    Flag(#[from] ConfigError),
}

/// The file as written: every key optional, none unknown.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAgentToml {
    pub server: Option<String>,
    pub server_ca: Option<PathBuf>,
    pub server_fingerprint: Option<String>,
    pub server_name: Option<String>,
    pub source_id: Option<String>,
    /// Refused with a message saying to use `token_file` (a plain unknown-key error would
    /// not say why).
    pub token: Option<toml::Value>,
    pub token_file: Option<PathBuf>,
    /// `PATH[:DISK_ID]`, as `--disk`. None: every local disk (see `discover`).
    pub disks: Option<Vec<String>>,
    /// Without `disks`: only local disks matching one of these names or `*` patterns.
    pub include: Option<Vec<String>>,
    /// Without `disks`: local disks matching one of these are left out.
    pub exclude: Option<Vec<String>>,
    pub follow: Option<bool>,
    pub rescan_interval: Option<String>,
    #[serde(deserialize_with = "text_or_number")]
    pub block_size: Option<String>,
    #[serde(deserialize_with = "text_or_number")]
    pub chunk_size: Option<String>,
    #[serde(deserialize_with = "text_or_number")]
    pub window: Option<String>,
    pub no_compress: Option<bool>,
    pub no_track: Option<bool>,
    pub no_freeze: Option<bool>,
    pub max_freeze: Option<String>,
    pub freeze_pre_hook: Option<PathBuf>,
    pub freeze_post_hook: Option<PathBuf>,
    pub max_udp_payload: Option<u16>,
    pub congestion: Option<String>,
    pub state_file: Option<PathBuf>,
    pub log_format: Option<String>,
    /// Mbit/s, a number (`100`, `2.5`); 0: no limit.
    #[serde(deserialize_with = "text_or_number")]
    pub bandwidth_limit: Option<String>,
    pub status_file: Option<PathBuf>,
}

/// Accepts `1048576` as well as `"1MiB"` (and `2.5` for a rate), as text for the flag
/// parsers.
fn text_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a number or a string such as \"1MiB\"")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
    }
    d.deserialize_any(V)
}

/// Phase one: the TOML text into the raw struct; errors name the file and the key.
pub fn parse(text: &str, file: &str) -> Result<RawAgentToml, SettingsError> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        SettingsError::Key {
            file: file.to_string(),
            key: if key == "." {
                "(top level)".into()
            } else {
                key
            },
            reason: e.into_inner().message().trim().to_string(),
        }
    })
}

/// Every `replicate` setting, each optional: what one source (the command line, or the
/// file) says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Layer {
    pub server: Option<String>,
    pub server_ca: Option<PathBuf>,
    pub server_fingerprint: Option<String>,
    pub server_name: Option<String>,
    pub source_id: Option<String>,
    /// The credential itself: only from `--token` or `SLIPWAY_TOKEN`.
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub disks: Option<Vec<String>>,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub follow: Option<bool>,
    pub rescan_interval: Option<String>,
    pub block_size: Option<String>,
    pub chunk_size: Option<String>,
    pub window: Option<String>,
    pub no_compress: Option<bool>,
    pub no_track: Option<bool>,
    pub no_freeze: Option<bool>,
    pub max_freeze: Option<String>,
    pub freeze_pre_hook: Option<PathBuf>,
    pub freeze_post_hook: Option<PathBuf>,
    pub max_udp_payload: Option<u16>,
    pub congestion: Option<Congestion>,
    pub state_file: Option<PathBuf>,
    pub ack_journal: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub bandwidth_limit: Option<String>,
    pub status_file: Option<PathBuf>,
}

impl Layer {
    /// Phase two for the file: the checks that need the key (types the flags' own
    /// validation does not see, the refused `token`, patterns).
    pub fn from_file(raw: RawAgentToml, file: &str) -> Result<Layer, SettingsError> {
        let bad = |key: &str, reason: String| SettingsError::Key {
            file: file.to_string(),
            key: key.to_string(),
            reason,
        };
        if raw.token.is_some() {
            return Err(bad(
                "token",
                "the credential is not read from the config file (it is often readable by \
                 everyone, and copied around as an example): put it alone in a file of mode \
                 0600 and name that file with token_file"
                    .into(),
            ));
        }
        let congestion = raw
            .congestion
            .map(|c| c.parse::<Congestion>().map_err(|e| bad("congestion", e)))
            .transpose()?;
        let log_format = match raw.log_format.as_deref() {
            None => None,
            Some("text") => Some(LogFormat::Text),
            Some("json") => Some(LogFormat::Json),
            Some(other) => {
                return Err(bad(
                    "log_format",
                    format!("{other:?} is not \"text\" or \"json\""),
                ))
            }
        };
        for (key, list) in [("include", &raw.include), ("exclude", &raw.exclude)] {
            for p in list.iter().flatten() {
                crate::discover::check_pattern(p).map_err(|e| bad(key, e))?;
            }
            if list.is_some() && raw.disks.is_some() {
                return Err(bad(
                    key,
                    "applies to the local disks found when `disks` is not given; with `disks` \
                     it would be ignored: remove one of them"
                        .into(),
                ));
            }
        }
        if raw.disks.as_ref().is_some_and(Vec::is_empty) {
            return Err(bad(
                "disks",
                "is empty: list the disks, or leave the key out to replicate every local disk"
                    .into(),
            ));
        }
        if raw.server_ca.is_some() && raw.server_fingerprint.is_some() {
            return Err(bad(
                "server_fingerprint",
                "give exactly one of server_ca and server_fingerprint".into(),
            ));
        }
        Ok(Layer {
            server: raw.server,
            server_ca: raw.server_ca,
            server_fingerprint: raw.server_fingerprint,
            server_name: raw.server_name,
            source_id: raw.source_id,
            token: None,
            token_file: raw.token_file,
            disks: raw.disks,
            include: raw.include.unwrap_or_default(),
            exclude: raw.exclude.unwrap_or_default(),
            follow: raw.follow,
            rescan_interval: raw.rescan_interval,
            block_size: raw.block_size,
            chunk_size: raw.chunk_size,
            window: raw.window,
            no_compress: raw.no_compress,
            no_track: raw.no_track,
            no_freeze: raw.no_freeze,
            max_freeze: raw.max_freeze,
            freeze_pre_hook: raw.freeze_pre_hook,
            freeze_post_hook: raw.freeze_post_hook,
            max_udp_payload: raw.max_udp_payload,
            congestion,
            state_file: raw.state_file,
            ack_journal: None,
            log_format,
            bandwidth_limit: raw.bandwidth_limit,
            status_file: raw.status_file,
        })
    }

    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Layer, SettingsError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            file: file.clone(),
            source,
        })?;
        Self::from_file(parse(&text, &file)?, &file)
    }
}

/// Where the disks come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// Named (`--disk` or `disks`).
    Named(Vec<String>),
    /// Every local disk, filtered by the file's `include` and `exclude`.
    Discover {
        include: Vec<String>,
        exclude: Vec<String>,
    },
}

/// Where the credential comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `--token` or `SLIPWAY_TOKEN`.
    Given(String),
    /// A file (`--token-file`, or `token_file` of the config file: `from_file`).
    File { path: PathBuf, from_file: bool },
}

/// The command line laid over the file: the flag values with the defaults applied, and which
/// keys came from the file.
#[derive(Debug, Clone)]
pub struct Merged {
    /// Every value but the token and the disks, which need I/O (see [`Merged::finish`]).
    pub raw: RawArgs,
    pub token: TokenSource,
    pub disks: DiskSource,
    pub log_format: LogFormat,
    /// The config file, if any.
    pub file: Option<String>,
    /// The file's keys whose values are used (the command line did not override them).
    pub from_file: BTreeSet<&'static str>,
}

/// Defaults of the flags that have one.
pub const DEFAULT_RESCAN_INTERVAL: &str = "10s";
pub const DEFAULT_BLOCK_SIZE: &str = "512";
pub const DEFAULT_CHUNK_SIZE: &str = "1MiB";
pub const DEFAULT_WINDOW: &str = "128MiB";
pub const DEFAULT_MAX_FREEZE: &str = "1s";
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 6500;

/// Lays `cli` over `file` (named `file_name`): a flag given wins over the file's key. The
/// server trust is taken as a whole (a `--server-ca` on the command line replaces the file's
/// `server_fingerprint`), and so is the credential (`--token`/`SLIPWAY_TOKEN`, then
/// `--token-file`, then the file's `token_file`).
pub fn merge(cli: Layer, file: Option<(Layer, String)>) -> Result<Merged, SettingsError> {
    let (file, file_name) = match file {
        Some((l, n)) => (l, Some(n)),
        None => (Layer::default(), None),
    };
    let mut from_file = BTreeSet::new();
    macro_rules! pick {
        ($field:ident) => {
            match (cli.$field, file.$field) {
                (Some(v), _) => Some(v),
                (None, Some(v)) => {
                    from_file.insert(stringify!($field));
                    Some(v)
                }
                (None, None) => None,
            }
        };
    }
    let where_ = |flag: &str, key: &str| match &file_name {
        Some(f) => format!("--{flag} (or `{key}` in {f})"),
        None => format!("--{flag} (or `{key}` in a config file given with --config)"),
    };
    let missing = |flag: &str, key: &str| {
        SettingsError::Missing(format!("{} is required", where_(flag, key)))
    };

    let server = pick!(server).ok_or_else(|| missing("server", "server"))?;
    let source_id = pick!(source_id).ok_or_else(|| missing("source-id", "source_id"))?;
    let (server_ca, server_fingerprint) =
        if cli.server_ca.is_some() || cli.server_fingerprint.is_some() {
            (cli.server_ca, cli.server_fingerprint)
        } else {
            if file.server_ca.is_some() {
                from_file.insert("server_ca");
            }
            if file.server_fingerprint.is_some() {
                from_file.insert("server_fingerprint");
            }
            (file.server_ca, file.server_fingerprint)
        };
    if server_ca.is_none() && server_fingerprint.is_none() {
        return Err(SettingsError::Missing(format!(
            "the server is trusted through {} or {}: give one",
            where_("server-ca", "server_ca"),
            where_("server-fingerprint", "server_fingerprint")
        )));
    }
    let token = match (cli.token, cli.token_file, file.token_file) {
        (Some(t), _, _) => TokenSource::Given(t),
        (None, Some(path), _) => TokenSource::File {
            path,
            from_file: false,
        },
        (None, None, Some(path)) => {
            from_file.insert("token_file");
            TokenSource::File {
                path,
                from_file: true,
            }
        }
        (None, None, None) => {
            return Err(SettingsError::Missing(format!(
                "no credential: give {}, or set SLIPWAY_TOKEN",
                where_("token-file", "token_file")
            )))
        }
    };
    let disks = match (cli.disks.filter(|d| !d.is_empty()), file.disks) {
        (Some(d), _) => DiskSource::Named(d),
        (None, Some(d)) => {
            from_file.insert("disks");
            DiskSource::Named(d)
        }
        (None, None) => {
            if !file.include.is_empty() {
                from_file.insert("include");
            }
            if !file.exclude.is_empty() {
                from_file.insert("exclude");
            }
            DiskSource::Discover {
                include: file.include,
                exclude: file.exclude,
            }
        }
    };
    let raw = RawArgs {
        server,
        server_ca,
        server_fingerprint,
        server_name: pick!(server_name),
        source_id,
        token: String::new(),
        disks: Vec::new(),
        follow: pick!(follow).unwrap_or(false),
        rescan_interval: pick!(rescan_interval).unwrap_or_else(|| DEFAULT_RESCAN_INTERVAL.into()),
        block_size: pick!(block_size).unwrap_or_else(|| DEFAULT_BLOCK_SIZE.into()),
        chunk_size: pick!(chunk_size).unwrap_or_else(|| DEFAULT_CHUNK_SIZE.into()),
        window: pick!(window).unwrap_or_else(|| DEFAULT_WINDOW.into()),
        no_compress: pick!(no_compress).unwrap_or(false),
        max_udp_payload: pick!(max_udp_payload).unwrap_or(DEFAULT_MAX_UDP_PAYLOAD),
        congestion: pick!(congestion),
        ack_journal: cli.ack_journal,
        state_file: pick!(state_file),
        no_track: pick!(no_track).unwrap_or(false),
        no_freeze: pick!(no_freeze).unwrap_or(false),
        max_freeze: Some(pick!(max_freeze).unwrap_or_else(|| DEFAULT_MAX_FREEZE.into())),
        freeze_pre_hook: pick!(freeze_pre_hook),
        freeze_post_hook: pick!(freeze_post_hook),
        bandwidth_limit: pick!(bandwidth_limit),
        status_file: pick!(status_file),
    };
    let log_format = pick!(log_format).unwrap_or_default();
    Ok(Merged {
        raw,
        token,
        disks,
        log_format,
        file: file_name,
        from_file,
    })
}

/// The config-file key of a flag (`rescan-interval` → `rescan_interval`, `disk` → `disks`).
pub fn key_of_flag(flag: &str) -> String {
    match flag {
        "disk" => "disks".into(),
        f => f.replace('-', "_"),
    }
}

impl Merged {
    /// Resolves the credential and the disks with the I/O given (`read_token` reads a token
    /// file, `discover` lists the local disks), and validates everything. An error about a
    /// value that came from the file names the file and the key.
    pub fn finish(
        mut self,
        read_token: impl FnOnce(&Path) -> Result<String, String>,
        discover: impl FnOnce(&[String], &[String]) -> Result<Vec<PathBuf>, String>,
        exists: impl Fn(&Path) -> bool,
    ) -> Result<(crate::Config, LogFormat), SettingsError> {
        self.raw.token = match &self.token {
            TokenSource::Given(t) => t.clone(),
            TokenSource::File { path, from_file } => match read_token(path) {
                Ok(t) => t,
                Err(e) if *from_file => return Err(self.key_error("token_file", e)),
                Err(e) => return Err(SettingsError::Missing(format!("--token-file: {e}"))),
            },
        };
        self.raw.disks = match &self.disks {
            DiskSource::Named(d) => d.clone(),
            DiskSource::Discover { include, exclude } => {
                let found = discover(include, exclude).map_err(|e| {
                    SettingsError::Missing(format!("finding the local disks in /sys/block: {e}"))
                })?;
                if found.is_empty() {
                    let filter = if include.is_empty() && exclude.is_empty() {
                        String::new()
                    } else {
                        format!(" matching include = {include:?}, exclude = {exclude:?}")
                    };
                    return Err(SettingsError::Missing(format!(
                        "no disks to replicate: none named (--disk or `disks`) and no local \
                         whole disk in /sys/block{filter}"
                    )));
                }
                found.iter().map(|p| p.display().to_string()).collect()
            }
        };
        let format = self.log_format;
        match crate::Config::from_raw(self.raw.clone(), exists) {
            Ok(c) => Ok((c, format)),
            Err(e) => {
                let key = key_of_flag(e.flag());
                if self.from_file.contains(key.as_str()) {
                    let msg = e.to_string();
                    let prefix = format!("--{}", e.flag());
                    let reason = msg
                        .strip_prefix(&prefix)
                        .map(|r| r.trim_start_matches(':').trim_start())
                        .unwrap_or(&msg)
                        .to_string();
                    Err(self.key_error(&key, reason))
                } else {
                    Err(SettingsError::Flag(e))
                }
            }
        }
    }

    fn key_error(&self, key: &str, reason: String) -> SettingsError {
        SettingsError::Key {
            file: self.file.clone().unwrap_or_default(),
            key: key.to_string(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/slipway/agent.toml";

    fn file(text: &str) -> Result<Layer, SettingsError> {
        Layer::from_file(parse(text, FILE)?, FILE)
    }

    const GOOD: &str = r#"
server = "replica.internal:1500"
server_fingerprint = "abababababababababababababababababababababababababababababababab"
source_id = "web-01"
token_file = "/etc/slipway/agent.token"
follow = true
rescan_interval = "30s"
chunk_size = 1048576
window = "64MiB"
bandwidth_limit = 50
max_freeze = "2s"
freeze_pre_hook = "/usr/local/sbin/db-flush"
congestion = "cubic"
log_format = "json"
status_file = "/run/slipway-agent/status.json"
include = ["nvme*", "sda"]
exclude = ["nvme9n1"]
"#;

    fn no_io(m: Merged, found: &[&str]) -> Result<(crate::Config, LogFormat), SettingsError> {
        let found: Vec<PathBuf> = found.iter().map(PathBuf::from).collect();
        m.finish(|_| Ok("t0ken".into()), |_, _| Ok(found), |_| false)
    }

    #[test]
    fn a_file_alone_is_a_whole_config() {
        let l = file(GOOD).unwrap();
        let m = merge(Layer::default(), Some((l, FILE.into()))).unwrap();
        assert_eq!(
            m.disks,
            DiskSource::Discover {
                include: vec!["nvme*".into(), "sda".into()],
                exclude: vec!["nvme9n1".into()]
            }
        );
        assert_eq!(
            m.token,
            TokenSource::File {
                path: "/etc/slipway/agent.token".into(),
                from_file: true
            }
        );
        let (c, format) = no_io(m, &["/dev/nvme0n1", "/dev/sda"]).unwrap();
        assert_eq!(format, LogFormat::Json);
        assert_eq!(c.server.host, "replica.internal");
        assert_eq!(c.source_id, "web-01");
        assert_eq!(c.token, "t0ken");
        assert!(c.follow);
        assert_eq!(c.rescan_interval, std::time::Duration::from_secs(30));
        assert_eq!(c.chunk_size, 1 << 20);
        assert_eq!(c.window, 64 << 20);
        assert_eq!(c.block_size, 512, "default");
        assert!((c.bandwidth.as_ref().unwrap().mbps() - 50.0).abs() < 1e-9);
        assert_eq!(c.max_freeze, std::time::Duration::from_secs(2));
        assert_eq!(c.congestion, Congestion::Cubic);
        assert_eq!(
            c.disks.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            ["nvme0n1", "sda"]
        );
        assert_eq!(
            c.status_file.as_deref(),
            Some(Path::new("/run/slipway-agent/status.json"))
        );
    }

    #[test]
    fn flags_override_the_file() {
        let l = file(GOOD).unwrap();
        let cli = Layer {
            rescan_interval: Some("5s".into()),
            server_ca: Some("/etc/slipway/ca.pem".into()),
            token: Some("from-env".into()),
            disks: Some(vec!["/dev/vdb:data".into()]),
            bandwidth_limit: Some("0".into()),
            log_format: Some(LogFormat::Text),
            ..Layer::default()
        };
        let m = merge(cli, Some((l, FILE.into()))).unwrap();
        assert!(!m.from_file.contains("rescan_interval"));
        assert!(m.from_file.contains("chunk_size"));
        assert_eq!(m.token, TokenSource::Given("from-env".into()));
        assert_eq!(m.disks, DiskSource::Named(vec!["/dev/vdb:data".into()]));
        let (c, format) = no_io(m, &[]).unwrap();
        assert_eq!(format, LogFormat::Text);
        assert_eq!(c.rescan_interval, std::time::Duration::from_secs(5));
        // The trust is taken whole from the command line: no fingerprint and CA conflict.
        assert!(matches!(
            c.trust,
            slipway_net::tls::ServerTrust::CaFile(ref p) if p == Path::new("/etc/slipway/ca.pem")
        ));
        assert!(
            c.bandwidth.is_none(),
            "--bandwidth-limit 0 lifts the file's limit"
        );
        assert_eq!(c.disks[0].id, "data");
        // --token-file beats the file's token_file.
        let cli = Layer {
            token_file: Some("/root/t".into()),
            ..Layer::default()
        };
        let m = merge(cli, Some((file(GOOD).unwrap(), FILE.into()))).unwrap();
        assert_eq!(
            m.token,
            TokenSource::File {
                path: "/root/t".into(),
                from_file: false
            }
        );
    }

    #[test]
    fn a_token_in_the_file_is_refused() {
        let e = file(&format!("{GOOD}token = \"slw1.abc\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(FILE) && e.contains("`token`") && e.contains("token_file"),
            "{e}"
        );
        assert!(!e.contains("slw1.abc"), "the credential is not echoed: {e}");
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let check = |text: &str, key: &str| {
            let e = file(text)
                .and_then(|l| merge(Layer::default(), Some((l, FILE.into()))))
                .and_then(|m| no_io(m, &["/dev/sda"]).map(|_| ()))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("config file {FILE}: key `{key}`")),
                "{e} should name `{key}`"
            );
        };
        let base = |extra: &str| {
            format!(
                "server = \"r:1500\"\nsource_id = \"w\"\ntoken_file = \"/t\"\nserver_ca = \"/ca\"\n{extra}"
            )
        };
        check(&base("rescan_interval = \"soon\""), "rescan_interval");
        check(&base("rescan_interval = 10"), "rescan_interval");
        check(&base("window = \"lots\""), "window");
        check(&base("block_size = 1000"), "block_size");
        check(&base("bandwidth_limit = \"fast\""), "bandwidth_limit");
        check(&base("bandwidth_limit = -3"), "bandwidth_limit");
        check(&base("max_udp_payload = 100"), "max_udp_payload");
        check(&base("max_udp_payload = 100000"), "max_udp_payload");
        check(&base("congestion = \"vegas\""), "congestion");
        check(&base("log_format = \"xml\""), "log_format");
        check(&base("follow = \"yes\""), "follow");
        check(&base("disks = [\"/dev/sda:../x\"]"), "disks");
        check(&base("disks = []"), "disks");
        check(
            &base("disks = [\"/dev/sda\"]\nexclude = [\"sdb\"]"),
            "exclude",
        );
        check(&base("include = [\"/dev/sda\"]"), "include");
        check(&base("max_freeze = \"5m\""), "max_freeze");
        check(&base("state_file = \"/var/lib/s\""), "state_file");
        check(&base("server_fingerprint = \"ab\""), "server_fingerprint");
        check(&base("rescan-interval = \"5s\""), "rescan-interval");
        check("[server]\nhost = \"x\"", "server");
        check(
            "server = \"r:1500\"\nsource_id = \"a/b\"\ntoken_file = \"/t\"\nserver_ca = \"/ca\"",
            "source_id",
        );
        check(
            "server = \"nope\"\nsource_id = \"w\"\ntoken_file = \"/t\"\nserver_ca = \"/ca\"",
            "server",
        );
        let e = parse("server = ", FILE).unwrap_err().to_string();
        assert!(e.starts_with(&format!("config file {FILE}:")), "{e}");
        // A token file that cannot be used is named by its key too.
        let m = merge(
            Layer::default(),
            Some((file(&base("")).unwrap(), FILE.into())),
        )
        .unwrap();
        let e = m
            .finish(
                |_| Err("mode 644 lets other users read it".into()),
                |_, _| Ok(vec![]),
                |_| false,
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("config file {FILE}: key `token_file`")),
            "{e}"
        );
    }

    #[test]
    fn a_bad_flag_is_named_as_a_flag() {
        let cli = Layer {
            rescan_interval: Some("soon".into()),
            ..Layer::default()
        };
        let m = merge(cli, Some((file(GOOD).unwrap(), FILE.into()))).unwrap();
        let e = no_io(m, &["/dev/sda"]).unwrap_err().to_string();
        assert!(e.starts_with("--rescan-interval"), "{e}");
    }

    #[test]
    fn what_is_missing_is_said() {
        let e = merge(Layer::default(), None).unwrap_err().to_string();
        assert!(e.contains("--server") && e.contains("--config"), "{e}");
        let l = file("server = \"r:1\"\nsource_id = \"w\"\nserver_ca = \"/ca\"").unwrap();
        let e = merge(Layer::default(), Some((l, FILE.into())))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("token_file") && e.contains("SLIPWAY_TOKEN"),
            "{e}"
        );
        let l = file("server = \"r:1\"\nsource_id = \"w\"\ntoken_file = \"/t\"").unwrap();
        let e = merge(Layer::default(), Some((l, FILE.into())))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server_ca") && e.contains("server_fingerprint"),
            "{e}"
        );
        let l = file("server = \"r:1\"\nsource_id = \"w\"\ntoken_file = \"/t\"\nserver_ca = \"/ca\"\ninclude = [\"xvd*\"]").unwrap();
        let m = merge(Layer::default(), Some((l, FILE.into()))).unwrap();
        let e = no_io(m, &[]).unwrap_err().to_string();
        assert!(e.contains("no disks") && e.contains("xvd*"), "{e}");
    }

    #[test]
    fn the_example_file_is_a_valid_config() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/agent.toml.example");
        let l = Layer::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let m = merge(Layer::default(), Some((l, path.display().to_string()))).unwrap();
        no_io(m, &["/dev/nvme0n1"]).unwrap_or_else(|e| panic!("{e}"));
    }
}
