//! Byte sizes as people write them ("512M", "4GiB") and as TOML stores them
//! (plain integers).
//!
//! Units are always binary (K = 1024) because guest RAM is carved into pages
//! and huge pages; a decimal "4G" would give the guest an unaligned,
//! surprising amount of memory. Only whole numbers are accepted so that the
//! size the user typed is exactly the size the guest gets.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Unit suffixes with their multipliers, largest first so that formatting
/// picks the most compact exact representation.
const UNITS: [(&str, u64); 4] = [
    ("T", 1 << 40),
    ("G", 1 << 30),
    ("M", 1 << 20),
    ("K", 1 << 10),
];

/// A number of bytes.
///
/// Parsed from an integer with an optional K, M, G or T suffix (binary
/// multiples, case-insensitive, optionally followed by "iB" or "B"); a plain
/// number means bytes. In TOML it may also be a bare integer of bytes.
/// Displays as the shortest exact form, e.g. `ByteSize(3 << 29)` is "1536M",
/// so the output can be parsed back unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

/// Why a size string was rejected; the text is meant to follow
/// `invalid --memory "..."` in an error message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseSizeError {
    /// Nothing (or only whitespace) was given.
    #[error("empty size (e.g. 512M or 4G)")]
    Empty,
    /// The string does not start with a digit, e.g. "-1G" or "M".
    #[error("expected a whole number with an optional K, M, G or T suffix (e.g. 512M)")]
    NotANumber,
    /// "1.5G": rejected rather than rounded so the guest gets what was typed.
    #[error("fractional sizes are not supported; use a smaller unit (e.g. 1536M, not 1.5G)")]
    Fractional,
    /// The text after the number is not a known unit.
    #[error("unknown size suffix {0:?} (use K, M, G or T)")]
    UnknownSuffix(String),
    /// The value does not fit in 64 bits.
    #[error("size does not fit in 64 bits")]
    Overflow,
}

impl ByteSize {
    /// Approximate, human-oriented rendering with one decimal ("23.4G").
    ///
    /// Used for values that are not round, such as the host's total memory,
    /// where the exact `Display` form would be an unreadable byte count.
    pub fn approx(self) -> String {
        for (suffix, multiplier) in UNITS {
            if self.0 >= multiplier {
                // u128 so that rounding cannot overflow for sizes near u64::MAX.
                let tenths =
                    (u128::from(self.0) * 10 + u128::from(multiplier) / 2) / u128::from(multiplier);
                let (whole, fraction) = (tenths / 10, tenths % 10);
                return if fraction == 0 {
                    format!("{whole}{suffix}")
                } else {
                    format!("{whole}.{fraction}{suffix}")
                };
            }
        }
        self.0.to_string()
    }
}

/// Maps the text after the number ("", "M", "mib", "GB", ...) to a multiplier.
fn suffix_multiplier(suffix: &str) -> Result<u64, ParseSizeError> {
    let upper = suffix.to_ascii_uppercase();
    let unit = upper.strip_suffix('B').unwrap_or(&upper);
    // "Ki"/"KiB" are the IEC spellings; a lone "i" (as in "512iB") is not a unit.
    let unit = match unit.strip_suffix('I') {
        Some(prefix) if !prefix.is_empty() => prefix,
        _ => unit,
    };
    if unit.is_empty() {
        return Ok(1);
    }
    UNITS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|&(_, multiplier)| multiplier)
        .ok_or_else(|| ParseSizeError::UnknownSuffix(suffix.to_string()))
}

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ParseSizeError::Empty);
        }
        let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, rest) = s.split_at(digits_end);
        if digits.is_empty() {
            return Err(ParseSizeError::NotANumber);
        }
        if rest.starts_with(['.', ',']) {
            return Err(ParseSizeError::Fractional);
        }
        // `digits` is non-empty ASCII digits, so overflow is the only failure.
        let number: u64 = digits.parse().map_err(|_| ParseSizeError::Overflow)?;
        let multiplier = suffix_multiplier(rest.trim_start())?;
        number
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or(ParseSizeError::Overflow)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (suffix, multiplier) in UNITS {
            if self.0 >= multiplier && self.0.is_multiple_of(multiplier) {
                return write!(f, "{}{suffix}", self.0 / multiplier);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// Serialized as the compact string so a dumped config reads like a
/// hand-written one and parses back to the same value.
impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Accepts both `memory = "2G"` and `memory = 2147483648`.
impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ByteSizeVisitor)
    }
}

struct ByteSizeVisitor;

impl Visitor<'_> for ByteSizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size such as \"512M\" or \"4G\", or an integer number of bytes")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
        v.parse().map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
        Ok(ByteSize(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
        u64::try_from(v)
            .map(ByteSize)
            .map_err(|_| E::custom(format!("size cannot be negative ({v})")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn parse(s: &str) -> Result<u64, ParseSizeError> {
        s.parse::<ByteSize>().map(|b| b.0)
    }

    #[test]
    fn parses_suffixes_case_insensitively() {
        assert_eq!(parse("512M"), Ok(512 * MIB));
        assert_eq!(parse("4G"), Ok(4 * GIB));
        assert_eq!(parse("1024K"), Ok(MIB));
        assert_eq!(parse("3584M"), Ok(3584 * MIB));
        assert_eq!(parse("2GiB"), Ok(2 * GIB));
        assert_eq!(parse("2gib"), Ok(2 * GIB));
        assert_eq!(parse("2gb"), Ok(2 * GIB));
        assert_eq!(parse("8Ki"), Ok(8192));
        assert_eq!(parse("1T"), Ok(1 << 40));
        assert_eq!(parse(" 256 MiB "), Ok(256 * MIB));
    }

    #[test]
    fn plain_number_is_bytes() {
        assert_eq!(parse("4096"), Ok(4096));
        assert_eq!(parse("4096B"), Ok(4096));
        assert_eq!(parse("0"), Ok(0));
    }

    #[test]
    fn rejects_malformed_sizes() {
        assert_eq!(parse("12Q"), Err(ParseSizeError::UnknownSuffix("Q".into())));
        assert_eq!(parse("1.5G"), Err(ParseSizeError::Fractional));
        assert_eq!(parse(""), Err(ParseSizeError::Empty));
        assert_eq!(parse("   "), Err(ParseSizeError::Empty));
        assert_eq!(parse("G"), Err(ParseSizeError::NotANumber));
        assert_eq!(parse("-1G"), Err(ParseSizeError::NotANumber));
        assert_eq!(
            parse("512iB"),
            Err(ParseSizeError::UnknownSuffix("iB".into()))
        );
        assert_eq!(
            parse("1e9"),
            Err(ParseSizeError::UnknownSuffix("e9".into()))
        );
        assert_eq!(parse("16777216T"), Err(ParseSizeError::Overflow));
        assert_eq!(parse("99999999999999999999"), Err(ParseSizeError::Overflow));
    }

    #[test]
    fn unknown_suffix_message_names_the_suffix() {
        let err = parse("12Q").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"unknown size suffix "Q" (use K, M, G or T)"#
        );
    }

    #[test]
    fn display_is_compact_and_round_trips() {
        assert_eq!(ByteSize(512 * MIB).to_string(), "512M");
        assert_eq!(ByteSize(4 * GIB).to_string(), "4G");
        assert_eq!(ByteSize(3 * GIB / 2).to_string(), "1536M");
        assert_eq!(ByteSize(1 << 40).to_string(), "1T");
        assert_eq!(ByteSize(4096).to_string(), "4K");
        assert_eq!(ByteSize(4097).to_string(), "4097");
        assert_eq!(ByteSize(0).to_string(), "0");
        for value in [0, 1, 4097, 4096, 3584 * MIB, 5 * GIB, u64::MAX] {
            let text = ByteSize(value).to_string();
            assert_eq!(parse(&text), Ok(value), "round trip of {text}");
        }
    }

    #[test]
    fn approx_uses_one_decimal() {
        assert_eq!(ByteSize(25_126_117_376).approx(), "23.4G");
        assert_eq!(ByteSize(64 * GIB).approx(), "64G");
        assert_eq!(ByteSize(1536 * MIB).approx(), "1.5G");
        assert_eq!(ByteSize(1000).approx(), "1000");
    }

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    struct Holder {
        memory: ByteSize,
    }

    #[test]
    fn deserializes_from_toml_string_or_integer() {
        let from_str: Holder = toml::from_str(r#"memory = "2G""#).unwrap();
        assert_eq!(from_str.memory, ByteSize(2 * GIB));
        let from_int: Holder = toml::from_str("memory = 1048576").unwrap();
        assert_eq!(from_int.memory, ByteSize(MIB));
        let negative = toml::from_str::<Holder>("memory = -1").unwrap_err();
        assert!(
            negative.message().contains("cannot be negative"),
            "{negative}"
        );
        let bad = toml::from_str::<Holder>(r#"memory = "12Q""#).unwrap_err();
        assert!(
            bad.message().contains(r#"unknown size suffix "Q""#),
            "{bad}"
        );
    }

    #[test]
    fn serializes_as_compact_string() {
        let text = toml::to_string(&Holder {
            memory: ByteSize(3584 * MIB),
        })
        .unwrap();
        assert_eq!(text.trim(), r#"memory = "3584M""#);
    }
}
