//! Who decompresses a bzImage's kernel: p2pvmm, before the guest starts, or the bzImage's own
//! decompressor in the guest (`arch/kernel_payload.rs` says why the host is faster).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `kernel_decompress = "host" | "guest"` in the file, `--kernel-decompress` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelDecompress {
    /// p2pvmm decompresses the payload and enters the `vmlinux` directly; it falls back to the
    /// guest when it cannot (old boot protocol, an lzma/lzo/lz4/bzip2 payload, a corrupt one).
    #[default]
    Host,
    /// The bzImage is entered as it is: slower under nested virtualisation, but the guest's
    /// decompressor randomises the kernel's address (KASLR).
    Guest,
}

impl KernelDecompress {
    pub fn is_host(&self) -> bool {
        *self == Self::Host
    }
}

impl FromStr for KernelDecompress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "host" => Ok(Self::Host),
            "guest" => Ok(Self::Guest),
            _ => Err(format!("unknown value {s:?} (use host or guest)")),
        }
    }
}

impl fmt::Display for KernelDecompress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Host => "host",
            Self::Guest => "guest",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_parse_and_anything_else_is_named() {
        assert_eq!("host".parse(), Ok(KernelDecompress::Host));
        assert_eq!("Guest".parse(), Ok(KernelDecompress::Guest));
        assert_eq!(
            "kvm".parse::<KernelDecompress>(),
            Err("unknown value \"kvm\" (use host or guest)".to_string())
        );
        assert_eq!(KernelDecompress::default().to_string(), "host");
    }
}
