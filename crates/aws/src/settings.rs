//! The `[aws]` section of the server settings, parsed in two phases like the rest: a raw struct
//! that mirrors the file (`deny_unknown_fields`, every key optional), then validated
//! [`AwsSettings`] with each error naming its key.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use aws_smithy_types::retry::RetryConfig;
use serde::Deserialize;

use crate::error::AwsError;

/// EBS volume types a replica may use. io1/io2 need provisioned IOPS per volume and magnetic
/// `standard` is a previous generation: neither is offered.
pub const SUPPORTED_VOLUME_TYPES: &[&str] = &["gp2", "gp3", "st1", "sc1"];

/// The `[aws]` table exactly as written in the settings file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RawAwsSettings {
    pub region: Option<String>,
    pub volume_type_small: Option<String>,
    pub volume_type_large: Option<String>,
    pub large_threshold_gib: Option<u64>,
    pub fixed_volume_type: Option<String>,
    pub gp3_iops: Option<i32>,
    pub gp3_throughput: Option<i32>,
    pub kms_key_id: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub server_tag: Option<String>,
    pub device_dir: Option<String>,
    pub attachment_limit: Option<u32>,
    pub max_pending_snapshots: Option<u32>,
    pub max_attempts: Option<u32>,
    /// Durations as humantime strings (`"500ms"`, `"5m"`), like every duration in the file.
    pub initial_backoff: Option<String>,
    pub wait_timeout: Option<String>,
    pub poll_interval: Option<String>,
    pub describe_interval: Option<String>,
}

/// Validated settings of the AWS backend (defaults in `docs/aws.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsSettings {
    /// Region; `None`: the SDK's default chain (environment, profile, then IMDS).
    pub region: Option<String>,
    /// Volume type of disks below `large_threshold_gib`.
    pub volume_type_small: String,
    /// Volume type of disks of `large_threshold_gib` or more (`st1` or `gp3`).
    pub volume_type_large: String,
    pub large_threshold_gib: u64,
    /// One type for every disk, overriding the small/large rule.
    pub fixed_volume_type: Option<String>,
    /// Provisioned IOPS of gp3 volumes (AWS default 3000 when unset).
    pub gp3_iops: Option<i32>,
    /// Provisioned throughput of gp3 volumes in MiB/s (AWS default 125 when unset).
    pub gp3_throughput: Option<i32>,
    /// KMS key for volume encryption; `None`: the account's default EBS key. Encryption is
    /// always on.
    pub kms_key_id: Option<String>,
    /// User tags added to every volume and snapshot.
    pub tags: BTreeMap<String, String>,
    /// Value of the `slipway:server` tag that marks this server's volumes and snapshots.
    /// Empty: the instance id (set a stable name if a replacement instance must adopt them).
    pub server_tag: String,
    /// Where the block devices of attached volumes appear.
    pub device_dir: PathBuf,
    /// EBS attachments this instance allows, root volume included; `None`: from
    /// DescribeInstanceTypes (see `docs/aws.md`).
    pub attachment_limit: Option<u32>,
    /// Caps the pending snapshots per volume below EBS's own limit (5, or 1 for st1/sc1).
    pub max_pending_snapshots: Option<u32>,
    /// Attempts per AWS call, the first included (standard retry mode, jittered exponential
    /// backoff).
    pub max_attempts: u32,
    /// First backoff of the retry strategy.
    pub initial_backoff: Duration,
    /// Bound on each wait for a volume or attachment state.
    pub wait_timeout: Duration,
    /// Interval between state polls while waiting.
    pub poll_interval: Duration,
    /// How often the one DescribeSnapshots that serves every source's restore points is
    /// repeated at most (doubling, up to 16×, after a failure).
    pub describe_interval: Duration,
}

impl Default for AwsSettings {
    fn default() -> Self {
        AwsSettings {
            region: None,
            volume_type_small: "gp3".into(),
            volume_type_large: "st1".into(),
            large_threshold_gib: 500,
            fixed_volume_type: None,
            gp3_iops: None,
            gp3_throughput: None,
            kms_key_id: None,
            tags: BTreeMap::new(),
            server_tag: String::new(),
            device_dir: PathBuf::from("/dev/disk/by-id"),
            attachment_limit: None,
            max_pending_snapshots: None,
            max_attempts: 8,
            initial_backoff: Duration::from_millis(500),
            wait_timeout: Duration::from_secs(300),
            poll_interval: Duration::from_secs(2),
            describe_interval: Duration::from_secs(30),
        }
    }
}

impl AwsSettings {
    /// Validates the raw `[aws]` table; every error names its key.
    pub fn validate(raw: RawAwsSettings) -> Result<Self, AwsError> {
        let bad = |key: &str, reason: String| AwsError::Settings {
            key: key.to_string(),
            reason,
        };
        let d = AwsSettings::default();
        let vtype = |key: &str, v: Option<String>, default: &str| -> Result<String, AwsError> {
            let v = v.unwrap_or_else(|| default.to_string());
            if SUPPORTED_VOLUME_TYPES.contains(&v.as_str()) {
                Ok(v)
            } else {
                Err(bad(
                    key,
                    format!("`{v}` is not one of {}", SUPPORTED_VOLUME_TYPES.join(", ")),
                ))
            }
        };
        let volume_type_small = vtype("volume_type_small", raw.volume_type_small, "gp3")?;
        let volume_type_large = vtype("volume_type_large", raw.volume_type_large, "st1")?;
        let fixed_volume_type = match raw.fixed_volume_type {
            Some(v) => Some(vtype("fixed_volume_type", Some(v), "")?),
            None => None,
        };
        let large_threshold_gib = raw.large_threshold_gib.unwrap_or(d.large_threshold_gib);
        if large_threshold_gib == 0 {
            return Err(bad("large_threshold_gib", "must be at least 1".into()));
        }
        if let Some(iops) = raw.gp3_iops {
            if !(3000..=80_000).contains(&iops) {
                return Err(bad("gp3_iops", format!("{iops} is outside 3000..=80000")));
            }
        }
        if let Some(t) = raw.gp3_throughput {
            if !(125..=2000).contains(&t) {
                return Err(bad(
                    "gp3_throughput",
                    format!("{t} MiB/s is outside 125..=2000"),
                ));
            }
        }
        let nonempty = |key: &str, v: Option<String>| -> Result<Option<String>, AwsError> {
            match v {
                Some(s) if s.trim().is_empty() => Err(bad(key, "must not be empty".into())),
                other => Ok(other),
            }
        };
        let region = nonempty("region", raw.region)?;
        let kms_key_id = nonempty("kms_key_id", raw.kms_key_id)?;
        if raw.tags.len() > 40 {
            return Err(bad(
                "tags",
                format!(
                    "{} tags; at most 40 (EBS allows 50 per resource and Slipway uses the rest)",
                    raw.tags.len()
                ),
            ));
        }
        for (k, v) in &raw.tags {
            let lower = k.to_ascii_lowercase();
            if k.is_empty() || k.chars().count() > 128 {
                return Err(bad(
                    "tags",
                    format!("key `{k}` must have 1 to 128 characters"),
                ));
            }
            if lower.starts_with("aws:") || lower.starts_with("slipway:") {
                return Err(bad(
                    "tags",
                    format!("key `{k}`: the prefixes `aws:` and `slipway:` are reserved"),
                ));
            }
            if v.chars().count() > 256 {
                return Err(bad(
                    "tags",
                    format!("value of `{k}` is over 256 characters"),
                ));
            }
        }
        let server_tag = raw.server_tag.unwrap_or_default();
        if server_tag.chars().count() > 256 {
            return Err(bad("server_tag", "over 256 characters".into()));
        }
        let device_dir = PathBuf::from(raw.device_dir.unwrap_or_else(|| "/dev/disk/by-id".into()));
        if !device_dir.is_absolute() {
            return Err(bad("device_dir", "must be an absolute path".into()));
        }
        if raw.attachment_limit == Some(0) {
            return Err(bad("attachment_limit", "must be at least 1".into()));
        }
        if raw.max_pending_snapshots == Some(0) {
            return Err(bad("max_pending_snapshots", "must be at least 1".into()));
        }
        let max_attempts = raw.max_attempts.unwrap_or(d.max_attempts);
        if !(1..=20).contains(&max_attempts) {
            return Err(bad(
                "max_attempts",
                format!("{max_attempts} is outside 1..=20"),
            ));
        }
        let duration = |key: &str, v: Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(text) => humantime::parse_duration(&text)
                .map_err(|e| bad(key, format!("{text:?} is not a duration like \"5s\": {e}"))),
        };
        let initial_backoff = duration("initial_backoff", raw.initial_backoff, d.initial_backoff)?;
        if initial_backoff.is_zero() || initial_backoff > Duration::from_secs(20) {
            return Err(bad(
                "initial_backoff",
                "must be above 0 and at most 20s".into(),
            ));
        }
        let wait_timeout = duration("wait_timeout", raw.wait_timeout, d.wait_timeout)?;
        if wait_timeout < Duration::from_secs(1) {
            return Err(bad("wait_timeout", "must be at least 1s".into()));
        }
        let poll_interval = duration("poll_interval", raw.poll_interval, d.poll_interval)?;
        if poll_interval.is_zero() || poll_interval > wait_timeout {
            return Err(bad(
                "poll_interval",
                "must be above 0 and at most wait_timeout".into(),
            ));
        }
        let describe_interval = duration(
            "describe_interval",
            raw.describe_interval,
            d.describe_interval,
        )?;
        if describe_interval < Duration::from_secs(1)
            || describe_interval > Duration::from_secs(600)
        {
            return Err(bad(
                "describe_interval",
                "must be between 1s and 10m".into(),
            ));
        }
        Ok(AwsSettings {
            region,
            volume_type_small,
            volume_type_large,
            large_threshold_gib,
            fixed_volume_type,
            gp3_iops: raw.gp3_iops,
            gp3_throughput: raw.gp3_throughput,
            kms_key_id,
            tags: raw.tags,
            server_tag,
            device_dir,
            attachment_limit: raw.attachment_limit,
            max_pending_snapshots: raw.max_pending_snapshots,
            max_attempts,
            initial_backoff,
            wait_timeout,
            poll_interval,
            describe_interval,
        })
    }

    /// Parses and validates an `[aws]` table given as TOML text (the table's body).
    pub fn from_toml(text: &str) -> Result<Self, AwsError> {
        let raw: RawAwsSettings = toml::from_str(text).map_err(|e| AwsError::Settings {
            key: "*".into(),
            reason: e.to_string(),
        })?;
        Self::validate(raw)
    }

    /// The volume type of a disk of `size_gib`: the fixed type if set, else small or large by
    /// the threshold (as AWS MGN's replication settings do it).
    pub fn volume_type_for(&self, size_gib: u64) -> &str {
        if let Some(t) = &self.fixed_volume_type {
            t
        } else if size_gib >= self.large_threshold_gib {
            &self.volume_type_large
        } else {
            &self.volume_type_small
        }
    }

    /// The SDK retry strategy: standard mode (exponential backoff with full jitter, a retry
    /// quota shared by the client) with `max_attempts` and `initial_backoff`.
    pub fn retry_config(&self) -> RetryConfig {
        RetryConfig::standard()
            .with_max_attempts(self.max_attempts)
            .with_initial_backoff(self.initial_backoff)
            .with_max_backoff(Duration::from_secs(20))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_doc() {
        let s = AwsSettings::from_toml("").unwrap();
        assert_eq!(s, AwsSettings::default());
        assert_eq!(s.volume_type_for(10), "gp3");
        assert_eq!(s.volume_type_for(499), "gp3");
        assert_eq!(s.volume_type_for(500), "st1");
    }

    #[test]
    fn fixed_type_wins() {
        let s = AwsSettings::from_toml("fixed_volume_type = \"gp2\"\nvolume_type_large = \"gp3\"")
            .unwrap();
        assert_eq!(s.volume_type_for(1), "gp2");
        assert_eq!(s.volume_type_for(10_000), "gp2");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("volume_type_large = \"io2\"", "volume_type_large"),
            ("fixed_volume_type = \"standard\"", "fixed_volume_type"),
            ("gp3_iops = 100", "gp3_iops"),
            ("gp3_throughput = 5000", "gp3_throughput"),
            ("kms_key_id = \"  \"", "kms_key_id"),
            ("tags = { \"slipway:x\" = \"1\" }", "tags"),
            ("tags = { \"AWS:x\" = \"1\" }", "tags"),
            ("device_dir = \"dev\"", "device_dir"),
            ("attachment_limit = 0", "attachment_limit"),
            ("max_attempts = 0", "max_attempts"),
            ("poll_interval = \"0s\"", "poll_interval"),
            ("poll_interval = \"2\"", "poll_interval"),
            ("wait_timeout = \"10ms\"", "wait_timeout"),
            ("initial_backoff = \"1m\"", "initial_backoff"),
            ("large_threshold_gib = 0", "large_threshold_gib"),
        ];
        for (text, key) in cases {
            match AwsSettings::from_toml(text) {
                Err(AwsError::Settings { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn durations_are_humantime_strings() {
        let s = AwsSettings::from_toml(
            "wait_timeout = \"10m\"\npoll_interval = \"500ms\"\ninitial_backoff = \"50ms\"",
        )
        .unwrap();
        assert_eq!(s.wait_timeout, Duration::from_secs(600));
        assert_eq!(s.poll_interval, Duration::from_millis(500));
        assert_eq!(s.initial_backoff, Duration::from_millis(50));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = AwsSettings::from_toml("volume_typ_small = \"gp3\"").unwrap_err();
        assert!(e.to_string().contains("volume_typ_small"), "{e}");
    }
}
