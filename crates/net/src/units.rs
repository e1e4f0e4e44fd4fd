//! Byte sizes as people write them: the one parser for every size the agent's flags,
//! `agent.toml` and the server's settings accept. (The one formatter is indicatif's
//! `HumanBytes`, which the agent's progress bars use and both CLIs print with.)
//!
//! Why here: both ends of the link take their transport sizes (windows, chunk sizes, memory
//! bounds) from one [`Tuning`](crate::Tuning) and its configuration, and this crate is the only
//! one the agent and the server share besides the wire codec. One parser means `64K` means
//! the same thing in `agent.toml` as in `slipway.toml`.

use thiserror::Error;

/// A size that [`parse_size`] could not read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SizeError {
    #[error("{0:?} is not a size like \"16MiB\" (a whole number with an optional unit)")]
    NotASize(String),
    #[error(
        "{value:?} has an unknown unit {unit:?} (use B, KiB, MiB, GiB, TiB or KB, MB, GB, TB)"
    )]
    UnknownUnit { value: String, unit: String },
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Parses a byte size: a whole number with an optional unit, spaces allowed between.
/// `K`, `M`, `G`, `T` (with or without `iB`) are powers of 1024; `KB`, `MB`, `GB`, `TB` are
/// powers of 1000; `B` (or nothing) is bytes.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(SizeError::NotASize(s.to_owned()));
    }
    let n: u64 = t[..digits]
        .parse()
        .map_err(|_| SizeError::TooLarge(s.to_owned()))?;
    let unit = t[digits..].trim_start();
    let mult: u64 = match unit {
        "" | "B" | "b" => 1,
        "K" | "k" | "KiB" | "kiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        u => {
            return Err(SizeError::UnknownUnit {
                value: s.to_owned(),
                unit: u.to_owned(),
            })
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| SizeError::TooLarge(s.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        for (s, v) in [
            ("4096", 4096),
            ("0", 0),
            ("10B", 10),
            ("64K", 64 << 10),
            ("64 KiB", 64 << 10),
            ("1MiB", 1 << 20),
            ("16M", 16 << 20),
            ("2GiB", 2 << 30),
            ("1T", 1 << 40),
            ("1MB", 1_000_000),
            ("10MB", 10_000_000),
            (" 3 GB ", 3_000_000_000),
        ] {
            assert_eq!(parse_size(s), Ok(v), "{s:?}");
        }
    }

    #[test]
    fn bad_sizes_are_typed_errors() {
        for bad in ["", "MiB", "ten", "-1", "1.5MiB", "0x10", "1 XB", "1MiBs"] {
            assert!(
                matches!(
                    parse_size(bad),
                    Err(SizeError::NotASize(_) | SizeError::UnknownUnit { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_size("5 parsecs"),
            Err(SizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("16777216T"),
            Err(SizeError::TooLarge(_))
        ));
        assert!(matches!(
            parse_size("99999999999999999999GiB"),
            Err(SizeError::TooLarge(_))
        ));
    }
}
