//! Guest RAM settings: `memory = "4G"`, or with huge pages
//! `memory = "size=4G,hugepages=on,hugepage_size=2M"` (the same text as `--memory`).
//!
//! Huge pages back guest RAM with a hugetlb memfd (`MFD_HUGETLB`): fewer pages to pin and map
//! for device DMA, and large pages for the guest. The pages must be reserved on the host
//! beforehand (`/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages`); p2pvmm checks that
//! enough are free before it starts rather than let a guest access fault later.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::size::ByteSize;

fn size(s: &str) -> Result<ByteSize, String> {
    s.parse()
        .map_err(|e: super::size::ParseSizeError| e.to_string())
}

/// The huge page size guest RAM comes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePageSize {
    Size2M,
    Size1G,
}

impl HugePageSize {
    pub fn bytes(self) -> u64 {
        match self {
            HugePageSize::Size2M => 2 << 20,
            HugePageSize::Size1G => 1 << 30,
        }
    }

    /// The `memfd_create` flags for a hugetlb file of this page size.
    pub fn memfd_flags(self) -> libc::c_uint {
        libc::MFD_HUGETLB
            | match self {
                HugePageSize::Size2M => libc::MFD_HUGE_2MB,
                HugePageSize::Size1G => libc::MFD_HUGE_1GB,
            }
    }
}

impl fmt::Display for HugePageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        ByteSize(self.bytes()).fmt(f)
    }
}

impl FromStr for HugePageSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match size(s)?.0 {
            0x20_0000 => Ok(HugePageSize::Size2M),
            0x4000_0000 => Ok(HugePageSize::Size1G),
            _ => Err(format!("hugepage_size {s:?}: use 2M or 1G")),
        }
    }
}

/// Guest RAM: its size and, optionally, the huge pages it is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryConfig {
    pub size: ByteSize,
    /// `None`: ordinary pages (with transparent huge pages where the host allows).
    pub hugepages: Option<HugePageSize>,
}

impl MemoryConfig {
    pub fn of_size(size: ByteSize) -> Self {
        Self {
            size,
            hugepages: None,
        }
    }
}

impl FromStr for MemoryConfig {
    type Err = String;

    /// `4G`, or `size=4G[,hugepages=on|off][,hugepage_size=2M|1G]`.
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.contains('=') {
            return Ok(Self::of_size(size(s)?));
        }
        let (mut bytes, mut on, mut page) = (None, false, None);
        for item in s.split(',') {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not key=value"))?;
            match key.trim() {
                "size" => bytes = Some(size(value.trim())?),
                "hugepages" => {
                    on = match value.trim() {
                        "on" | "true" => true,
                        "off" | "false" => false,
                        other => return Err(format!("hugepages={other:?}: use on or off")),
                    }
                }
                "hugepage_size" => page = Some(value.trim().parse::<HugePageSize>()?),
                other => {
                    return Err(format!(
                        "unknown key {other:?} (use size, hugepages, hugepage_size)"
                    ))
                }
            }
        }
        let size = bytes.ok_or("size= is missing")?;
        let hugepages = match (on, page) {
            (true, page) => Some(page.unwrap_or(HugePageSize::Size2M)),
            (false, None) => None,
            (false, Some(_)) => return Err("hugepage_size needs hugepages=on".to_owned()),
        };
        Ok(Self { size, hugepages })
    }
}

impl fmt::Display for MemoryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.hugepages {
            None => self.size.fmt(f),
            Some(page) => write!(f, "size={},hugepages=on,hugepage_size={page}", self.size),
        }
    }
}

/// Serialized as the flag's text, so a dumped config parses back to the same value.
impl Serialize for MemoryConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Accepts `memory = "2G"`, `memory = 2147483648` and `memory = "size=2G,hugepages=on"`.
impl<'de> Deserialize<'de> for MemoryConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(MemoryVisitor)
    }
}

struct MemoryVisitor;

impl Visitor<'_> for MemoryVisitor {
    type Value = MemoryConfig;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a size such as \"512M\", an integer number of bytes, or \
             \"size=4G,hugepages=on[,hugepage_size=2M|1G]\"",
        )
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<MemoryConfig, E> {
        v.parse().map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<MemoryConfig, E> {
        Ok(MemoryConfig::of_size(ByteSize(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<MemoryConfig, E> {
        u64::try_from(v)
            .map(|v| MemoryConfig::of_size(ByteSize(v)))
            .map_err(|_| E::custom(format!("size cannot be negative ({v})")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn a_plain_size_has_no_huge_pages() {
        assert_eq!("4G".parse(), Ok(MemoryConfig::of_size(ByteSize(4 * GIB))));
    }

    #[test]
    fn hugepages_default_to_2m_and_take_1g() {
        let on: MemoryConfig = "size=4G,hugepages=on".parse().unwrap();
        assert_eq!(on.hugepages, Some(HugePageSize::Size2M));
        let big: MemoryConfig = "size=4G,hugepages=on,hugepage_size=1G".parse().unwrap();
        assert_eq!(
            (big.size, big.hugepages),
            (ByteSize(4 * GIB), Some(HugePageSize::Size1G))
        );
        let off: MemoryConfig = "size=4G,hugepages=off".parse().unwrap();
        assert_eq!(off, MemoryConfig::of_size(ByteSize(4 * GIB)));
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        let err = |s: &str| s.parse::<MemoryConfig>().unwrap_err();
        assert!(err("size=4G,hugepage_size=4M").contains("use 2M or 1G"));
        assert!(err("size=4G,hugepages=maybe").contains("\"maybe\""));
        assert!(err("size=4G,hugepage_size=1G").contains("needs hugepages=on"));
        assert!(err("hugepages=on").contains("size= is missing"));
        assert!(err("size=4G,shared=on").contains("unknown key \"shared\""));
        assert!(err("size=4G,on").contains("not key=value"));
    }

    #[test]
    fn the_text_parses_back_to_the_same_value() {
        for text in ["512M", "size=4G,hugepages=on,hugepage_size=1G"] {
            let m: MemoryConfig = text.parse().unwrap();
            assert_eq!(m.to_string().parse(), Ok(m), "{text}");
        }
    }
}
