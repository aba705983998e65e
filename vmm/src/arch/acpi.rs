//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT, DSDT and MCFG, written at 0xe0000
//! where the guest's RSDP scan (and `boot_params.acpi_rsdp_addr`) finds them.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::legacy::{ACPI_PM_PORT, ACPI_RESET_VALUE, ACPI_S5_TYPE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    ACPI_END, ACPI_START, IOAPIC_START, LAPIC_START, PCI_ECAM_SIZE, PCI_ECAM_START,
};

const OEM_ID: [u8; 6] = *b"P2PVMM";
const OEM_REVISION: u32 = 1;
/// FADT IA-PC boot architecture flags: no VGA, no CMOS RTC.
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;
const SERIAL_PORT: u16 = 0x3f8;
const SERIAL_IRQ: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables ({size} bytes) do not fit in {ACPI_START:#x}..{ACPI_END:#x}")]
    TooLarge { size: u64 },
    #[error("writing ACPI tables to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Lays the tables out one after another, 8-byte aligned, RSDP first.
struct TableWriter<'a> {
    mem: &'a GuestMemoryMmap,
    next: u64,
}

impl TableWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<u64, AcpiError> {
        let addr = self.next;
        let end = addr + bytes.len() as u64;
        if end > ACPI_END {
            return Err(AcpiError::TooLarge {
                size: end - ACPI_START,
            });
        }
        self.mem.write_slice(bytes, GuestAddress(addr))?;
        self.next = end.next_multiple_of(8);
        Ok(addr)
    }
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

/// Writes every table for a guest with `cpus` vCPUs (APIC IDs 0..cpus); `platform_aml` (the PCI
/// root complex) goes into the DSDT, and MCFG covers buses 0..=`last_bus`.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    cpus: u8,
    platform_aml: &[u8],
    last_bus: u8,
) -> Result<(), AcpiError> {
    let mut writer = TableWriter {
        mem,
        next: ACPI_START + Rsdp::len() as u64,
    };
    let dsdt = writer.write(&dsdt(platform_aml))?;
    let fadt = writer.write(&bytes(&fadt(dsdt)))?;
    let madt = writer.write(&bytes(&madt(cpus)))?;
    let mcfg = writer.write(&bytes(&mcfg(last_bus)))?;
    let mut xsdt = XSDT::new(OEM_ID, *b"P2PVXSDT", OEM_REVISION);
    for table in [fadt, madt, mcfg] {
        xsdt.add_entry(table);
    }
    let xsdt = writer.write(&bytes(&xsdt))?;
    mem.write_slice(&bytes(&Rsdp::new(OEM_ID, xsdt)), GuestAddress(ACPI_START))?;
    Ok(())
}

/// `_S5_` (so the guest can power off), the COM1 console and the platform's devices.
fn dsdt(platform_aml: &[u8]) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"P2PVDSDT", OEM_REVISION);
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&ACPI_S5_TYPE]));
    let com1_io = aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]);
    let mut body = Vec::new();
    s5.to_aml_bytes(&mut body);
    com1.to_aml_bytes(&mut body);
    body.extend_from_slice(platform_aml);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// Hardware-reduced FADT: power-off and reset go through the sleep control and reset registers.
fn fadt(dsdt: u64) -> acpi_tables::fadt::FADT {
    let io = |port: u64| GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port);
    let mut fadt = FADTBuilder::new(OEM_ID, *b"P2PVFACP", OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.sleep_control_reg = io(ACPI_PM_PORT);
    fadt.sleep_status_reg = io(ACPI_PM_PORT + 1);
    fadt.reset_reg = io(ACPI_PM_PORT + 2);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.iapc_boot_arch = (IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"P2PVMM\0\0").into();
    fadt.finalize()
}

fn madt(cpus: u8) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        *b"P2PVMADT",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    madt
}

/// ECAM for buses 0..=`last_bus` only: Linux maps 1 MiB per bus MCFG announces.
fn mcfg(last_bus: u8) -> MCFG {
    let mut mcfg = MCFG::new(OEM_ID, *b"P2PVMCFG", OEM_REVISION);
    let last_bus = last_bus.min(((PCI_ECAM_SIZE >> 20) - 1) as u8);
    mcfg.add_ecam(PCI_ECAM_START, 0, 0, last_bus);
    mcfg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(table: &[u8]) -> bool {
        table.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_found_from_the_rsdp_and_checksum() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write_tables(&mem, 2, &[], 255).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(ACPI_START)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp));
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let mut header = [0u8; 36];
        mem.read_slice(&mut header, GuestAddress(xsdt_addr))
            .unwrap();
        assert_eq!(&header[..4], b"XSDT");
        let len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
        let mut xsdt = vec![0u8; len];
        mem.read_slice(&mut xsdt, GuestAddress(xsdt_addr)).unwrap();
        assert!(checksum_ok(&xsdt));
        let mut signatures = Vec::new();
        for entry in xsdt[36..].chunks(8) {
            let addr = u64::from_le_bytes(entry.try_into().unwrap());
            let mut sig = [0u8; 4];
            mem.read_slice(&mut sig, GuestAddress(addr)).unwrap();
            signatures.push(sig);
        }
        assert_eq!(signatures, [*b"FACP", *b"APIC", *b"MCFG"]);
    }

    #[test]
    fn mcfg_ends_at_the_last_bus_in_use() {
        let mcfg = bytes(&mcfg(7));
        assert!(checksum_ok(&mcfg));
        // Header (36) + reserved (8), then base (8), segment (2), start bus, end bus.
        assert_eq!(
            u64::from_le_bytes(mcfg[44..52].try_into().unwrap()),
            PCI_ECAM_START
        );
        assert_eq!((mcfg[54], mcfg[55]), (0, 7));
    }

    #[test]
    fn madt_lists_every_vcpu() {
        let madt = bytes(&madt(3));
        assert!(checksum_ok(&madt));
        // Header (44 bytes), then 3 local APICs (8 bytes each) and one IOAPIC (12 bytes).
        assert_eq!(madt.len(), 44 + 3 * 8 + 12);
        assert_eq!(madt[44 + 2 * 8 + 3], 2, "third APIC ID");
    }
}
