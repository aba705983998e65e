//! Where the guest's serial console (COM1) goes.
//!
//! One string grammar — `stdout`, `off` or `file=PATH` — is used both on the
//! command line and in the TOML file, so users only learn one spelling and
//! a value can be copied between the two unchanged.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{de, ser, Deserialize, Deserializer, Serialize, Serializer};

/// Destination of the guest's serial console output.
///
/// Written as `stdout`, `off` or `file=PATH` (keywords are
/// case-insensitive), in TOML as e.g. `serial = "file=/tmp/guest.log"`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialConfig {
    /// Guest console on the VMM's stdout: the most useful default when
    /// booting a kernel by hand.
    #[default]
    Stdout,
    /// Discard guest console output (e.g. for benchmarks or when the guest
    /// is reached over the network instead).
    Off,
    /// Append guest console output to this file (created if missing).
    File(PathBuf),
}

/// Why a serial mode string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseSerialError {
    /// Not one of the known modes.
    #[error("unknown serial mode {0:?} (use stdout, off or file=PATH)")]
    Unknown(String),
    /// `file=` without a path.
    #[error("file= needs a path (e.g. file=/tmp/guest.log)")]
    EmptyPath,
}

const FILE_PREFIX: &str = "file=";

impl FromStr for SerialConfig {
    type Err = ParseSerialError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("stdout") {
            return Ok(Self::Stdout);
        }
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self::Off);
        }
        // `get` rather than slicing: `s` may have a multi-byte char at byte 5.
        match s.get(..FILE_PREFIX.len()) {
            Some(prefix) if prefix.eq_ignore_ascii_case(FILE_PREFIX) => {
                let path = &s[FILE_PREFIX.len()..];
                if path.is_empty() {
                    Err(ParseSerialError::EmptyPath)
                } else {
                    Ok(Self::File(PathBuf::from(path)))
                }
            }
            _ => Err(ParseSerialError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for SerialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdout => f.write_str("stdout"),
            Self::Off => f.write_str("off"),
            Self::File(path) => write!(f, "{FILE_PREFIX}{}", path.display()),
        }
    }
}

impl Serialize for SerialConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // `Display` would replace invalid UTF-8 silently; a config that no
        // longer names the same file is worse than an error.
        if let Self::File(path) = self {
            if path.to_str().is_none() {
                return Err(ser::Error::custom(format!(
                    "serial file path {path:?} is not valid UTF-8"
                )));
            }
        }
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SerialConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(SerialVisitor)
    }
}

/// A visitor rather than `String::deserialize` so that a wrong type (say a
/// `[serial]` table) is answered with the accepted spellings, not just
/// "expected a string".
struct SerialVisitor;

impl de::Visitor<'_> for SerialVisitor {
    type Value = SerialConfig;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#""stdout", "off" or "file=PATH""#)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<SerialConfig, E> {
        v.parse().map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_modes() {
        assert_eq!("stdout".parse(), Ok(SerialConfig::Stdout));
        assert_eq!("OFF".parse(), Ok(SerialConfig::Off));
        assert_eq!(
            "file=/tmp/guest.log".parse(),
            Ok(SerialConfig::File("/tmp/guest.log".into()))
        );
        // Only the keyword is case-insensitive, never the path.
        assert_eq!(
            "File=/tmp/A=B".parse(),
            Ok(SerialConfig::File("/tmp/A=B".into()))
        );
    }

    #[test]
    fn rejects_unknown_modes() {
        assert_eq!(
            "tty".parse::<SerialConfig>(),
            Err(ParseSerialError::Unknown("tty".into()))
        );
        assert_eq!(
            "file=".parse::<SerialConfig>(),
            Err(ParseSerialError::EmptyPath)
        );
        assert_eq!(
            "fileé=x".parse::<SerialConfig>(),
            Err(ParseSerialError::Unknown("fileé=x".into()))
        );
        assert_eq!(
            ParseSerialError::Unknown("tty".into()).to_string(),
            r#"unknown serial mode "tty" (use stdout, off or file=PATH)"#
        );
    }

    #[test]
    fn wrong_toml_type_lists_the_accepted_forms() {
        let table = toml::Value::Table(toml::Table::new());
        let err = table.try_into::<SerialConfig>().unwrap_err();
        assert_eq!(
            err.message(),
            r#"invalid type: map, expected "stdout", "off" or "file=PATH""#
        );
    }

    #[test]
    fn display_round_trips() {
        for mode in [
            SerialConfig::Stdout,
            SerialConfig::Off,
            SerialConfig::File("/var/log/guest.log".into()),
        ] {
            assert_eq!(mode.to_string().parse(), Ok(mode));
        }
    }
}
