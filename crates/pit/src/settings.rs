//! The `[pit]` settings: raw (as deserialized from TOML) and their validation.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::Tier;

/// The `[pit]` table exactly as written in the settings file or a replication template:
///
/// ```toml
/// [pit]
/// tiers = [ { every = "10m", keep = 6 }, { every = "1h", keep = 24 }, { every = "1d", keep = 7 } ]
/// ```
///
/// A missing table or a missing `tiers` key means the defaults above; unknown keys are errors.
/// Turn it into a [`crate::PitPolicy`] with [`crate::PitPolicy::from_raw`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPitSettings {
    /// Tiers, finest first.
    pub tiers: Vec<RawTier>,
}

/// One entry of `tiers`; both keys are required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    /// Slot length as a humantime duration: `"2s"`, `"10m"`, `"1h"`, `"1d"`.
    pub every: String,
    /// How many of the most recent slots keep a point.
    pub keep: u32,
}

impl Default for RawPitSettings {
    fn default() -> Self {
        RawPitSettings {
            // Spelled as an operator would write them; a test checks they parse to
            // DEFAULT_TIERS.
            tiers: [("10m", 6), ("1h", 24), ("1d", 7)]
                .into_iter()
                .map(|(every, keep)| RawTier {
                    every: every.to_owned(),
                    keep,
                })
                .collect(),
        }
    }
}

/// Why a set of tiers is not a usable policy. Each message starts with the key, relative to the
/// `[pit]` table, and reads as a sentence after it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PitError {
    /// `tiers` is empty.
    #[error("tiers: at least one tier is required")]
    NoTiers,
    /// `every` does not parse as a duration.
    #[error("tiers[{index}].every: {value:?} is not a duration ({reason}); write e.g. \"10m\", \"1h\", \"1d\"")]
    BadDuration {
        index: usize,
        value: String,
        reason: String,
    },
    /// `every` is under one second.
    #[error("tiers[{index}].every: {value:?} must be at least 1s")]
    TooShort { index: usize, value: String },
    /// `every` has a sub-second part.
    #[error("tiers[{index}].every: {value:?} must be a whole number of seconds")]
    FractionalSeconds { index: usize, value: String },
    /// `keep` is zero.
    #[error("tiers[{index}].keep: must be at least 1")]
    ZeroKeep { index: usize },
    /// `every` is not longer than the previous tier's.
    #[error(
        "tiers[{index}].every: {value:?} must be longer than tiers[{previous}].every \
         ({previous_every}); list tiers from finest to coarsest"
    )]
    NotIncreasing {
        index: usize,
        value: String,
        previous: usize,
        previous_every: String,
    },
    /// `every` is not a multiple of the previous tier's, so slots would not nest.
    #[error(
        "tiers[{index}].every: {value:?} is not a multiple of tiers[{previous}].every \
         ({previous_every}), so its slots would not nest"
    )]
    NotMultiple {
        index: usize,
        value: String,
        previous: usize,
        previous_every: String,
    },
}

/// Parses and validates raw settings into tiers.
pub(crate) fn parse(raw: &RawPitSettings) -> Result<Vec<Tier>, PitError> {
    let mut tiers = Vec::with_capacity(raw.tiers.len());
    let mut spelled = Vec::with_capacity(raw.tiers.len());
    for (index, t) in raw.tiers.iter().enumerate() {
        let every =
            humantime::parse_duration(t.every.trim()).map_err(|e| PitError::BadDuration {
                index,
                value: t.every.clone(),
                reason: e.to_string(),
            })?;
        tiers.push(Tier::new(every, t.keep));
        spelled.push(t.every.clone());
    }
    validate(&tiers, &spelled)?;
    Ok(tiers)
}

/// Checks tiers; `spelled[i]` is how tier `i`'s `every` was written, for messages.
pub(crate) fn validate(tiers: &[Tier], spelled: &[String]) -> Result<(), PitError> {
    if tiers.is_empty() {
        return Err(PitError::NoTiers);
    }
    let mut previous: Option<(usize, u64)> = None;
    for (index, (tier, value)) in tiers.iter().zip(spelled).enumerate() {
        let value = value.clone();
        if tier.every < Duration::from_secs(1) {
            return Err(PitError::TooShort { index, value });
        }
        if tier.every.subsec_nanos() != 0 {
            return Err(PitError::FractionalSeconds { index, value });
        }
        if tier.keep == 0 {
            return Err(PitError::ZeroKeep { index });
        }
        let secs = tier.every.as_secs();
        if let Some((p, p_secs)) = previous {
            let previous_every =
                humantime::format_duration(Duration::from_secs(p_secs)).to_string();
            if secs <= p_secs {
                return Err(PitError::NotIncreasing {
                    index,
                    value,
                    previous: p,
                    previous_every,
                });
            }
            if secs % p_secs != 0 {
                return Err(PitError::NotMultiple {
                    index,
                    value,
                    previous: p,
                    previous_every,
                });
            }
        }
        previous = Some((index, secs));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PitPolicy, DEFAULT_TIERS};

    fn raw(tiers: &[(&str, u32)]) -> RawPitSettings {
        RawPitSettings {
            tiers: tiers
                .iter()
                .map(|&(every, keep)| RawTier {
                    every: every.to_owned(),
                    keep,
                })
                .collect(),
        }
    }

    fn error(tiers: &[(&str, u32)]) -> String {
        PitPolicy::from_raw(&raw(tiers)).unwrap_err().to_string()
    }

    /// What the server's settings file holds around the `[pit]` table.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        pit: RawPitSettings,
    }

    #[test]
    fn defaults_are_drs_schedule() {
        let d = RawPitSettings::default();
        assert_eq!(d, raw(&[("10m", 6), ("1h", 24), ("1d", 7)]));
        assert_eq!(PitPolicy::from_raw(&d).unwrap(), PitPolicy::default());
        assert_eq!(
            PitPolicy::new(DEFAULT_TIERS.to_vec()).unwrap(),
            PitPolicy::default()
        );
    }

    #[test]
    fn toml_absent_table_or_key_means_defaults() {
        let f: File = toml::from_str("").unwrap();
        assert_eq!(f.pit, RawPitSettings::default());
        let f: File = toml::from_str("[pit]\n").unwrap();
        assert_eq!(f.pit, RawPitSettings::default());
    }

    #[test]
    fn toml_tiers_parse() {
        let f: File = toml::from_str(
            "[pit]\ntiers = [ { every = \"2s\", keep = 3 }, { every = \"10s\", keep = 2 } ]\n",
        )
        .unwrap();
        let p = PitPolicy::from_raw(&f.pit).unwrap();
        assert_eq!(
            p.tiers(),
            [
                Tier::new(Duration::from_secs(2), 3),
                Tier::new(Duration::from_secs(10), 2)
            ]
        );
        // Long units and spaces, as humantime writes them.
        let p = PitPolicy::from_raw(&raw(&[("1min 30s", 1), ("3m", 1), ("1week", 1)])).unwrap();
        assert_eq!(p.tiers()[2].every, Duration::from_secs(7 * 86_400));
    }

    #[test]
    fn toml_unknown_keys_are_rejected() {
        let e = toml::from_str::<File>("[pit]\ntier = []\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `tier`"), "{e}");
        let e =
            toml::from_str::<File>("[pit]\ntiers = [ { every = \"1m\", keep = 1, kept = 2 } ]\n")
                .unwrap_err();
        assert!(e.to_string().contains("unknown field `kept`"), "{e}");
        let e = toml::from_str::<File>("[pit]\ntiers = [ { every = \"1m\" } ]\n").unwrap_err();
        assert!(e.to_string().contains("missing field `keep`"), "{e}");
        let e = toml::from_str::<File>("[pit]\ntiers = [ { every = \"1m\", keep = -1 } ]\n")
            .unwrap_err();
        assert!(e.to_string().contains("keep"), "{e}");
    }

    #[test]
    fn validation_errors_name_the_tier_and_the_reason() {
        assert_eq!(error(&[]), "tiers: at least one tier is required");
        assert_eq!(
            error(&[("1m", 1), ("90s", 1)]),
            "tiers[1].every: \"90s\" is not a multiple of tiers[0].every (1m), \
             so its slots would not nest"
        );
        assert_eq!(
            error(&[("1h", 1), ("10m", 1)]),
            "tiers[1].every: \"10m\" must be longer than tiers[0].every (1h); \
             list tiers from finest to coarsest"
        );
        assert_eq!(
            error(&[("1h", 1), ("60m", 1)]),
            "tiers[1].every: \"60m\" must be longer than tiers[0].every (1h); \
             list tiers from finest to coarsest"
        );
        assert_eq!(
            error(&[("0s", 1)]),
            "tiers[0].every: \"0s\" must be at least 1s"
        );
        assert_eq!(
            error(&[("1s", 1), ("500ms", 1)]),
            "tiers[1].every: \"500ms\" must be at least 1s"
        );
        assert_eq!(
            error(&[("1500ms", 1)]),
            "tiers[0].every: \"1500ms\" must be a whole number of seconds"
        );
        assert_eq!(
            error(&[("1m", 1), ("1h", 0)]),
            "tiers[1].keep: must be at least 1"
        );
        let e = error(&[("1m", 1), ("1h", 1), ("ten minutes", 1)]);
        assert!(
            e.starts_with("tiers[2].every: \"ten minutes\" is not a duration ("),
            "{e}"
        );
        assert!(e.ends_with("write e.g. \"10m\", \"1h\", \"1d\""), "{e}");
        let e = error(&[("", 1)]);
        assert!(
            e.starts_with("tiers[0].every: \"\" is not a duration"),
            "{e}"
        );
        // humantime's month is 30.44 days: not a whole number of days.
        assert!(
            error(&[("1d", 7), ("1M", 12)]).contains("is not a multiple of tiers[0].every (1day)")
        );
        // The first error wins, in tier order.
        assert!(error(&[("1m", 0), ("90s", 1)]).starts_with("tiers[0].keep"));
    }

    #[test]
    fn code_built_policies_are_validated_the_same_way() {
        let e = PitPolicy::new(vec![
            Tier::new(Duration::from_secs(60), 1),
            Tier::new(Duration::from_secs(90), 1),
        ])
        .unwrap_err();
        assert_eq!(
            e,
            PitError::NotMultiple {
                index: 1,
                value: "1m 30s".into(),
                previous: 0,
                previous_every: "1m".into(),
            }
        );
        assert_eq!(PitPolicy::new(vec![]).unwrap_err(), PitError::NoTiers);
        assert!(matches!(
            PitPolicy::new(vec![Tier::new(Duration::from_millis(2500), 1)]),
            Err(PitError::FractionalSeconds { index: 0, .. })
        ));
        assert!(matches!(
            PitPolicy::new(vec![Tier::new(Duration::ZERO, 1)]),
            Err(PitError::TooShort { index: 0, .. })
        ));
    }
}
