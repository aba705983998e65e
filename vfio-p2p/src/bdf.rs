//! PCI addresses of host devices (`DDDD:BB:DD.F`), as sysfs and VFIO spell them.
//!
//! Every error about a host device names its BDF, so the type is small, `Copy` and prints exactly
//! like the sysfs directory name the user gave us.

use std::fmt;
use std::str::FromStr;

/// A host PCI address: segment (domain), bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(into = "String")]
pub struct Bdf {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

/// A string that is not a `DDDD:BB:DD.F` PCI address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a PCI address of the form DDDD:BB:DD.F")]
pub struct BdfParseError(pub String);

impl FromStr for Bdf {
    type Err = BdfParseError;

    /// Parses the sysfs spelling. The domain is optional (`00:03.0` means `0000:00:03.0`), as in
    /// `lspci`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || BdfParseError(s.to_string());
        let (rest, function) = s.rsplit_once('.').ok_or_else(err)?;
        let mut parts = rest.rsplitn(3, ':');
        let device = parts.next().ok_or_else(err)?;
        let bus = parts.next().ok_or_else(err)?;
        let domain = parts.next().unwrap_or("0");
        let hex = |t: &str, max: u32| {
            if t.is_empty() || t.len() > 4 {
                return None;
            }
            u32::from_str_radix(t, 16).ok().filter(|v| *v <= max)
        };
        Ok(Bdf {
            domain: hex(domain, 0xffff).ok_or_else(err)? as u16,
            bus: hex(bus, 0xff).ok_or_else(err)? as u8,
            device: hex(device, 0x1f).ok_or_else(err)? as u8,
            function: hex(function, 0x7).ok_or_else(err)? as u8,
        })
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl From<Bdf> for String {
    fn from(bdf: Bdf) -> String {
        bdf.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_sysfs_spelling_and_prints_it_back() {
        let bdf: Bdf = "0000:00:03.0".parse().unwrap();

        assert_eq!(
            bdf,
            Bdf {
                domain: 0,
                bus: 0,
                device: 3,
                function: 0
            }
        );
        assert_eq!(bdf.to_string(), "0000:00:03.0");
    }

    #[test]
    fn domain_is_optional_and_hex_is_case_insensitive() {
        let bdf: Bdf = "3A:1f.7".parse().unwrap();

        assert_eq!(bdf.to_string(), "0000:3a:1f.7");
    }

    #[test]
    fn rejects_out_of_range_device_and_function() {
        assert!("0000:00:20.0".parse::<Bdf>().is_err());
        assert!("0000:00:03.8".parse::<Bdf>().is_err());
        assert!("vfio0".parse::<Bdf>().is_err());
        assert!("0000:00:.0".parse::<Bdf>().is_err());
    }
}
