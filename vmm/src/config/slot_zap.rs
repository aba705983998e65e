//! What KVM drops when a memory slot goes away (a BAR's mmap at decode off, or before a move):
//! every guest page mapping (KVM's default) or only the deleted slot's.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `slot_zap = "all" | "slot"` in the file, `--slot-zap` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotZap {
    /// KVM's default (its `KVM_X86_QUIRK_SLOT_ZAP_ALL` quirk): every deletion invalidates all
    /// of the guest's page mappings, which the guest then faults back in. Kept as the default
    /// because KVM keeps it for compatibility: zapping only the slot once broke a guest with an
    /// assigned NVIDIA GPU, and the cause was never found.
    #[default]
    All,
    /// Only the deleted slot's mappings go (the quirk disabled, Linux 6.12 and later): a guest
    /// BAR move no longer makes the guest fault in its whole working set again.
    Slot,
}

impl SlotZap {
    pub fn is_all(&self) -> bool {
        *self == Self::All
    }
}

impl FromStr for SlotZap {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "all" => Ok(Self::All),
            "slot" => Ok(Self::Slot),
            _ => Err(format!("unknown value {s:?} (use all or slot)")),
        }
    }
}

impl fmt::Display for SlotZap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::All => "all",
            Self::Slot => "slot",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_values_parse_and_anything_else_is_named() {
        assert_eq!("all".parse(), Ok(SlotZap::All));
        assert_eq!("Slot".parse(), Ok(SlotZap::Slot));
        assert_eq!(
            "memslot".parse::<SlotZap>(),
            Err("unknown value \"memslot\" (use all or slot)".to_string())
        );
        assert_eq!(SlotZap::default().to_string(), "all");
    }
}
