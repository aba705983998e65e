//! The expansion ROM image the lab gives L1's edu (QEMU's `romfile`), shared by the ROM test
//! and the hammer: built here, so a test knows every byte L2 must read back.

/// The ROM file's size: a power of two, so QEMU's ROM BAR, VFIO's region 6 and p2pvmm's ROM BAR
/// are all exactly the file.
pub const ROM_LEN: usize = 64 << 10;
pub const EDU_VENDOR: u16 = 0x1234;
pub const EDU_DEVICE: u16 = 0x11e8;
/// Where the PCI data structure starts; Linux wants it 4-byte aligned.
pub const PCIR_AT: usize = 0x1c;
/// PCIR code type 1 (Open Firmware): the L1 SeaBIOS deploys and runs only x86 (type 0) images,
/// so it leaves this one alone, while Linux's sysfs reader does not look at the code type.
pub const CODE_TYPE: u8 = 1;

/// A minimal PCI option ROM image for edu, with a recognisable pattern after the headers:
/// the 0x55AA signature, the image length in 512-byte units, a far return where x86 firmware
/// would call an init entry, the pointer at 0x18 to a "PCIR" structure (edu's IDs, structure
/// length, class, image length, code type, last-image indicator), and a final byte that makes
/// the image sum to 0 (the legacy option ROM checksum). `drivers/pci/rom.c` checks the
/// signature, the PCIR signature, alignment and length, and sums the image lengths up to the
/// last image: that is how many bytes the sysfs `rom` file returns.
pub fn edu_option_rom() -> Vec<u8> {
    let mut rom: Vec<u8> = (0..ROM_LEN)
        .map(|i| (i as u32).wrapping_mul(0x9e37_79b1).rotate_left(7) as u8)
        .collect();
    let blocks = (ROM_LEN / 512) as u16;
    rom[..4].copy_from_slice(&[0x55, 0xaa, blocks as u8, 0xcb]);
    rom[0x18..0x1a].copy_from_slice(&(PCIR_AT as u16).to_le_bytes());
    let mut pcir = Vec::new();
    pcir.extend_from_slice(b"PCIR");
    pcir.extend_from_slice(&EDU_VENDOR.to_le_bytes());
    pcir.extend_from_slice(&EDU_DEVICE.to_le_bytes());
    pcir.extend_from_slice(&0u16.to_le_bytes()); // no device list
    pcir.extend_from_slice(&0x18u16.to_le_bytes()); // structure length
    pcir.push(3); // structure revision (PCI 3.0)
    pcir.extend_from_slice(&[0x00, 0xff, 0x00]); // class code, as edu's
    pcir.extend_from_slice(&blocks.to_le_bytes()); // image length
    pcir.extend_from_slice(&1u16.to_le_bytes()); // code revision
    pcir.push(CODE_TYPE);
    pcir.push(0x80); // indicator: last image
    pcir.extend_from_slice(&0u16.to_le_bytes()); // max runtime image length
    rom[PCIR_AT..PCIR_AT + pcir.len()].copy_from_slice(&pcir);
    let marker = b"p2pvmm lab: edu expansion ROM";
    rom[0x40..0x40 + marker.len()].copy_from_slice(marker);
    rom[ROM_LEN - 1] = 0;
    let sum = rom.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    rom[ROM_LEN - 1] = sum.wrapping_neg();
    rom
}

/// FNV-1a (64 bit) of `bytes`: how the L2 hammer reports what it read without a hash crate.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
