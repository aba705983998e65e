//! The guest physical address map of an x86 p2pvmm guest.
//!
//! ```text
//! 0              .. 0x9fc00         RAM (real-mode area: boot structures)
//! 0x9fc00        .. 0x100000        reserved (EBDA, ACPI tables at 0xe0000)
//! 0x100000       .. low RAM end     RAM (kernel, initramfs)            low RAM end <= 3 GiB
//! 3 GiB          .. 3.5 GiB         32-bit PCI MMIO window (32-bit BARs)
//! 3.5 GiB        .. 3.75 GiB        PCI ECAM (256 buses x 1 MiB)
//! 0xfec00000                        IOAPIC
//! 0xfee00000                        LAPIC
//! 4 GiB          .. high RAM end    RAM that did not fit below the hole
//! 256 GiB-aligned window            64-bit prefetchable PCI MMIO window (large BARs)
//! ```
//!
//! Device DMA reaches guest RAM and peer BARs at these same addresses (IOVA = GPA), so the 64-bit
//! window is kept as low as a 256 GiB BAR allows: the host IOMMU may translate only 39 bits.

use vm_memory::GuestAddress;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Start of the extended BIOS data area; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel and everything after it may live.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// Zero page (`boot_params`) for the Linux boot protocol.
pub const ZERO_PAGE: u64 = 0x7000;
/// Top of the boot stack.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit entry.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// GDT and an empty IDT for the 64-bit entry.
pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;

/// RSDP (found by the guest's scan of 0xe0000..0x100000) followed by the other ACPI tables.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole: RAM never extends past it below 4 GiB.
pub const MMIO_HOLE_START: u64 = 3 * GIB;
/// 32-bit BAR window.
pub const MMIO32_START: u64 = MMIO_HOLE_START;
pub const MMIO32_SIZE: u64 = 512 * MIB;
/// PCI Express enhanced configuration access mechanism (MCFG).
pub const PCI_ECAM_START: u64 = MMIO32_START + MMIO32_SIZE;
pub const PCI_ECAM_SIZE: u64 = 256 * MIB;

pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM's real-mode TSS and identity map pages, inside the hole where no RAM is.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;

pub const FOUR_GIB: u64 = 4 * GIB;

/// The 64-bit window is at least this large and aligned to this size so that one BAR of this
/// size fits naturally aligned.
pub const MMIO64_MIN_SIZE: u64 = 256 * GIB;

// The fixed regions inside the hole must not overlap each other.
const _: () = assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);
const _: () = assert!(MMIO32_START >= MMIO_HOLE_START);
const _: () = assert!(KVM_IDENTITY_MAP_START > LAPIC_START);

/// Where RAM, the holes and the 64-bit window fall for a given amount of RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    /// RAM regions as (guest address, length), in address order.
    pub ram: Vec<(GuestAddress, u64)>,
    /// The 64-bit prefetchable MMIO window.
    pub mmio64: (GuestAddress, u64),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("memory size {0:#x} is not a multiple of 4 KiB")]
    Unaligned(u64),
    #[error(
        "guest physical address space of {phys_bits} bits cannot hold {ram_top:#x} bytes of RAM \
         and a {mmio64_size:#x}-byte 64-bit MMIO window (mmio64_size)"
    )]
    TooLarge {
        ram_top: u64,
        mmio64_size: u64,
        phys_bits: u8,
    },
    #[error("mmio64_size {0:#x} is not a non-zero multiple of {MMIO64_MIN_SIZE:#x}")]
    Mmio64Size(u64),
}

impl MemoryLayout {
    /// Lays out `ram_size` bytes of RAM for a guest with `phys_bits` physical address bits, with
    /// the smallest 64-bit MMIO window.
    #[cfg(test)]
    pub fn new(ram_size: u64, phys_bits: u8) -> Result<Self, LayoutError> {
        Self::with_mmio64(ram_size, phys_bits, MMIO64_MIN_SIZE)
    }

    /// Lays out `ram_size` bytes of RAM and a 64-bit MMIO window of `mmio64_size` bytes (a
    /// multiple of [`MMIO64_MIN_SIZE`], from the first such boundary above RAM) for a guest with
    /// `phys_bits` physical address bits.
    pub fn with_mmio64(
        ram_size: u64,
        phys_bits: u8,
        mmio64_size: u64,
    ) -> Result<Self, LayoutError> {
        if mmio64_size == 0 || !mmio64_size.is_multiple_of(MMIO64_MIN_SIZE) {
            return Err(LayoutError::Mmio64Size(mmio64_size));
        }
        if !ram_size.is_multiple_of(4 * KIB) {
            return Err(LayoutError::Unaligned(ram_size));
        }
        let low = ram_size.min(MMIO_HOLE_START);
        let mut ram = vec![(GuestAddress(0), low)];
        let high = ram_size - low;
        let ram_top = if high > 0 {
            ram.push((GuestAddress(FOUR_GIB), high));
            FOUR_GIB + high
        } else {
            FOUR_GIB
        };
        let base = ram_top.next_multiple_of(MMIO64_MIN_SIZE);
        let limit = 1u64.checked_shl(u32::from(phys_bits)).unwrap_or(u64::MAX);
        if base.checked_add(mmio64_size).is_none_or(|end| end > limit) {
            return Err(LayoutError::TooLarge {
                ram_top,
                mmio64_size,
                phys_bits,
            });
        }
        Ok(Self {
            ram,
            mmio64: (GuestAddress(base), mmio64_size),
        })
    }

    /// Total RAM.
    pub fn ram_size(&self) -> u64 {
        self.ram.iter().map(|(_, len)| len).sum()
    }

    /// End of the RAM region that starts at 0 (the part below the 32-bit hole).
    pub fn low_ram_end(&self) -> u64 {
        self.ram.first().map(|(_, len)| *len).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_fits_below_the_hole() {
        let layout = MemoryLayout::new(512 * MIB, 40).unwrap();
        assert_eq!(layout.ram, vec![(GuestAddress(0), 512 * MIB)]);
        assert_eq!(layout.mmio64, (GuestAddress(256 * GIB), 256 * GIB));
    }

    #[test]
    fn large_guest_spans_the_hole() {
        let layout = MemoryLayout::new(3584 * MIB, 39).unwrap();
        assert_eq!(
            layout.ram,
            vec![
                (GuestAddress(0), 3 * GIB),
                (GuestAddress(4 * GIB), 512 * MIB)
            ]
        );
        assert_eq!(layout.ram_size(), 3584 * MIB);
        assert_eq!(layout.low_ram_end(), 3 * GIB);
        // Ends exactly at 2^39: still inside a 39-bit IOMMU.
        assert_eq!(layout.mmio64.0 .0 + layout.mmio64.1, 1 << 39);
    }

    #[test]
    fn a_wider_64_bit_window_starts_at_the_same_boundary_and_must_fit_the_address_width() {
        let layout = MemoryLayout::with_mmio64(512 * MIB, 40, 512 * GIB).unwrap();
        // Its upper half lies beyond a 39-bit IOMMU: the lab's unreachable-BAR scenario.
        assert_eq!(layout.mmio64, (GuestAddress(256 * GIB), 512 * GIB));
        assert!(matches!(
            MemoryLayout::with_mmio64(512 * MIB, 39, 512 * GIB),
            Err(LayoutError::TooLarge { .. })
        ));
        assert_eq!(
            MemoryLayout::with_mmio64(512 * MIB, 40, 300 * GIB).unwrap_err(),
            LayoutError::Mmio64Size(300 * GIB)
        );
        assert!(MemoryLayout::with_mmio64(512 * MIB, 40, 0).is_err());
    }

    #[test]
    fn rejects_what_does_not_fit() {
        assert_eq!(
            MemoryLayout::new(1000, 40).unwrap_err(),
            LayoutError::Unaligned(1000)
        );
        assert!(matches!(
            MemoryLayout::new(512 * GIB, 39),
            Err(LayoutError::TooLarge { .. })
        ));
    }
}
