//! Register offsets and bit values from the PCI Local Bus, PCI-to-PCI Bridge and PCI Express Base
//! specifications, named as Linux's `pci_regs.h` names them so the guest side is easy to
//! cross-check.

/// Size of the PCI Express (extended) configuration space of one function.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Standard capabilities live in the first 256 bytes, after the 64-byte header.
pub const CAP_START: u16 = 0x40;
pub const LEGACY_CONFIG_END: u16 = 0x100;
/// Extended capabilities start here and must form a chain starting exactly at this offset.
pub const EXT_CAP_START: u16 = 0x100;

// Common header (types 0 and 1).
pub const VENDOR_ID: u16 = 0x00;
pub const DEVICE_ID: u16 = 0x02;
pub const COMMAND: u16 = 0x04;
pub const STATUS: u16 = 0x06;
pub const REVISION_ID: u16 = 0x08;
pub const CLASS_PROG: u16 = 0x09;
pub const HEADER_TYPE: u16 = 0x0e;
pub const BAR0: u16 = 0x10;
pub const CAPABILITY_LIST: u16 = 0x34;
pub const INTERRUPT_LINE: u16 = 0x3c;
pub const INTERRUPT_PIN: u16 = 0x3d;

// Type 0 only.
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
pub const SUBSYSTEM_ID: u16 = 0x2e;
/// Expansion ROM base address (a type-1 header has its own at 0x38).
pub const ROM_ADDRESS: u16 = 0x30;

// Type 1 (bridge) only.
pub const PRIMARY_BUS: u16 = 0x18;
pub const SECONDARY_BUS: u16 = 0x19;
pub const SUBORDINATE_BUS: u16 = 0x1a;
pub const IO_BASE: u16 = 0x1c;
pub const IO_LIMIT: u16 = 0x1d;
pub const SEC_STATUS: u16 = 0x1e;
pub const MEMORY_BASE: u16 = 0x20;
pub const MEMORY_LIMIT: u16 = 0x22;
pub const PREF_MEMORY_BASE: u16 = 0x24;
pub const PREF_MEMORY_LIMIT: u16 = 0x26;
pub const PREF_BASE_UPPER32: u16 = 0x28;
pub const PREF_LIMIT_UPPER32: u16 = 0x2c;
pub const BRIDGE_CONTROL: u16 = 0x3e;

pub const HEADER_TYPE_NORMAL: u8 = 0;
pub const HEADER_TYPE_BRIDGE: u8 = 1;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_MASTER: u16 = 1 << 2;
pub const COMMAND_PARITY: u16 = 1 << 6;
pub const COMMAND_SERR: u16 = 1 << 8;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// The command bits a guest can change on every emulated function.
pub const COMMAND_WRITABLE: u16 = COMMAND_IO
    | COMMAND_MEMORY
    | COMMAND_MASTER
    | COMMAND_PARITY
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE;

pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Error bits of the (secondary) status register, all write-1-to-clear: master data parity error
/// (8), signalled/received target abort (11, 12), received master abort (13), signalled system
/// error (14), detected parity error (15).
pub const STATUS_ERRORS_RW1C: u16 = 0xf900;

/// Bridge control bits a guest can change: parity, SERR, ISA, VGA, VGA16, master abort and
/// secondary bus reset.
pub const BRIDGE_CTL_WRITABLE: u16 = 0x007f;
pub const BRIDGE_CTL_BUS_RESET: u16 = 1 << 6;

pub const BAR_IO_SPACE: u32 = 1 << 0;
pub const BAR_MEM_TYPE_64: u32 = 2 << 1;
pub const BAR_MEM_PREFETCH: u32 = 1 << 3;

/// Bit 0 of the expansion ROM register: the ROM decodes (with the command register's memory
/// enable) only while it is set.
pub const ROM_ADDRESS_ENABLE: u32 = 1 << 0;
/// The ROM register's address bits, 31:11: ROMs are at least 2 KiB.
pub const ROM_ADDRESS_MASK: u32 = !0x7ff;

// Capability IDs.
pub const CAP_ID_MSI: u8 = 0x05;
pub const CAP_ID_VNDR: u8 = 0x09;
pub const CAP_ID_EXP: u8 = 0x10;
pub const CAP_ID_MSIX: u8 = 0x11;
pub const EXT_CAP_ID_VNDR: u16 = 0x0b;

/// Class code (class, subclass, prog-if) of a host bridge.
pub const CLASS_BRIDGE_HOST: u32 = 0x06_00_00;
/// Class code of a PCI-to-PCI bridge, which every PCIe port reports.
pub const CLASS_BRIDGE_PCI: u32 = 0x06_04_00;
