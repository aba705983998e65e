use std::sync::Mutex;

use super::*;
use crate::bus::{Bus, BusRange};

/// A controller whose eject handler records the slot numbers it got.
fn controller() -> (Arc<AcpiHotplug>, Arc<Mutex<Vec<u32>>>) {
    let ejected = Arc::new(Mutex::new(Vec::new()));
    let seen = ejected.clone();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let hotplug = AcpiHotplug::new(irq, Box::new(move |n| seen.lock().unwrap().push(n)));
    (Arc::new(hotplug), ejected)
}

fn read32(hp: &AcpiHotplug, offset: u64) -> u32 {
    let mut data = [0; 4];
    hp.guest_read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn write32(hp: &AcpiHotplug, offset: u64, value: u32) {
    hp.guest_write(offset, &value.to_le_bytes());
}

/// Edges signalled since the last call (the eventfd counter).
fn edges(hp: &AcpiHotplug) -> u64 {
    hp.irq.read().unwrap_or(0)
}

#[test]
fn the_block_fits_below_the_pci_io_window_and_clear_of_0xcf8() {
    let block = BusRange::new(HOTPLUG_IO_BASE, HOTPLUG_IO_LEN);
    assert!((0x0a00..0x1000).contains(&block.base) && block.end() <= 0x1000);
    assert!(!block.overlaps(&BusRange::new(0xcf8, 8)));
    assert!(!block.overlaps(&BusRange::new(crate::legacy::ACPI_PM_PORT, 3)));
    // An ISA line that is neither the serial port's nor one of the PCI INTx GSIs.
    const { assert!(HOTPLUG_GED_GSI < 16 && HOTPLUG_GED_GSI != 4) };
}

#[test]
fn an_insert_sets_its_bit_and_the_pci_event_and_signals_the_irq() {
    let (hp, _) = controller();
    hp.notify_inserted(3).unwrap();
    assert_eq!(edges(&hp), 1);
    assert_eq!(read32(&hp, REG_PCIU), 1 << 3);
    assert_eq!(read32(&hp, REG_PCID), 0);
    assert_eq!(read32(&hp, REG_GEDS), GED_PCI_HOTPLUG);
}

#[test]
fn writing_back_what_was_read_acknowledges_only_those_bits() {
    let (hp, _) = controller();
    hp.notify_inserted(1).unwrap();
    let seen = read32(&hp, REG_PCIU);
    hp.notify_inserted(2).unwrap();
    write32(&hp, REG_PCIU, seen);
    assert_eq!(read32(&hp, REG_PCIU), 1 << 2, "the later insert survives");
    write32(&hp, REG_GEDS, GED_PCI_HOTPLUG);
    assert_eq!(read32(&hp, REG_GEDS), 0);
    assert_eq!(edges(&hp), 2, "one edge per event");
}

#[test]
fn an_eject_request_sets_its_bit_and_signals_the_irq() {
    let (hp, ejected) = controller();
    hp.request_eject(31).unwrap();
    assert_eq!(edges(&hp), 1);
    assert_eq!(read32(&hp, REG_PCID), 1 << 31);
    assert_eq!(read32(&hp, REG_GEDS), GED_PCI_HOTPLUG);
    assert!(ejected.lock().unwrap().is_empty(), "only the guest ejects");
}

#[test]
fn the_eject_register_calls_the_handler_with_the_slot_number() {
    let (hp, ejected) = controller();
    hp.request_eject(5).unwrap();
    write32(&hp, REG_B0EJ, 5);
    assert_eq!(*ejected.lock().unwrap(), vec![5]);
    assert_eq!(hp.pending_ejects(), 0, "the request is answered");
    assert_eq!(read32(&hp, REG_B0EJ), 0);
}

#[test]
fn bad_slot_numbers_are_refused_on_both_sides() {
    let (hp, ejected) = controller();
    for n in [0, 32, u32::MAX] {
        assert!(matches!(hp.notify_inserted(n), Err(HotplugError::InvalidSlot(x)) if x == n));
        assert!(matches!(
            hp.request_eject(n),
            Err(HotplugError::InvalidSlot(_))
        ));
        write32(&hp, REG_B0EJ, n);
    }
    assert!(ejected.lock().unwrap().is_empty());
    assert_eq!(edges(&hp), 0);
    assert_eq!(hp.pending_events(), 0);
}

#[test]
fn the_power_button_is_its_own_event() {
    let (hp, _) = controller();
    hp.power_button().unwrap();
    assert_eq!(edges(&hp), 1);
    assert_eq!(read32(&hp, REG_GEDS), GED_POWER_BUTTON);
    assert_eq!(hp.pending_inserts(), 0);
}

#[test]
fn byte_accesses_and_the_area_past_the_block() {
    let (hp, ejected) = controller();
    hp.notify_inserted(9).unwrap();
    let mut byte = [0];
    hp.guest_read(REG_PCIU + 1, &mut byte);
    assert_eq!(byte, [0x02], "bit 9 is bit 1 of byte 1");
    hp.guest_write(REG_PCIU + 1, &[0x02]);
    assert_eq!(hp.pending_inserts(), 0);
    hp.guest_write(REG_B0EJ, &[7]);
    assert_eq!(*ejected.lock().unwrap(), vec![7]);
    let mut past = [0; 4];
    hp.guest_read(HOTPLUG_IO_LEN, &mut past);
    assert_eq!(past, [0xff; 4]);
    hp.guest_write(2, &[0; 4]); // straddles two registers: ignored
}

#[test]
fn the_shared_controller_is_the_bus_device() {
    let (hp, ejected) = controller();
    let bus = Bus::new();
    let range = BusRange::new(HOTPLUG_IO_BASE, HOTPLUG_IO_LEN);
    bus.insert(range, Arc::new(Mutex::new(hp.clone()))).unwrap();
    hp.notify_inserted(4).unwrap();
    let mut data = [0; 4];
    assert!(bus.read(HOTPLUG_IO_BASE + REG_PCIU, &mut data));
    assert_eq!(u32::from_le_bytes(data), 1 << 4);
    assert!(bus.write(HOTPLUG_IO_BASE + REG_B0EJ, &4u32.to_le_bytes()));
    assert_eq!(*ejected.lock().unwrap(), vec![4]);
}
