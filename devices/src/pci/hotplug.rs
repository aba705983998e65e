//! The ACPI PCI hotplug controller: a small port-I/O register block the DSDT's `\_SB.PHPR` and
//! `\_SB.GED_` methods read and write (`acpi_hotplug.rs` has the AML), and the edge-triggered
//! interrupt of the Generic Event Device that makes the guest run `\_SB.GED_._EVT`.
//!
//! Registers, 32 bits each, at [`HOTPLUG_IO_BASE`] (byte accesses work too):
//!
//! | offset | name | guest read | guest write |
//! |---|---|---|---|
//! | 0x0 | `PCIU` | slots with a pending insert (bit `n` = slot number `n`) | 1s acknowledge those bits |
//! | 0x4 | `PCID` | slots with a pending eject request | 1s acknowledge those bits |
//! | 0x8 | `B0EJ` | 0 | a slot number: the guest let go of that slot (`_EJ0`) |
//! | 0xc | `GEDS` | pending GED events ([`GED_PCI_HOTPLUG`], [`GED_POWER_BUTTON`]) | 1s acknowledge |
//!
//! Acknowledging by writing back what was read (write-1-to-clear) means an event that arrives
//! between the guest's read and its write is never lost: its bit stays set and its own edge
//! runs `_EVT` again.
//!
//! The VMM side sets bits with [`AcpiHotplug::notify_inserted`], [`AcpiHotplug::request_eject`]
//! and [`AcpiHotplug::power_button`]; each also signals the interrupt eventfd, which the VMM
//! binds to [`HOTPLUG_GED_GSI`] with a KVM irqfd.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::topology::MAX_HOTPLUG_SLOTS;
use crate::bus::BusDevice;

/// Port I/O base of the register block: clear of the legacy devices (serial, i8042, ACPI PM at
/// 0x600), of 0xCF8..0xD00 and of the PCI I/O window (from 0x1000).
pub const HOTPLUG_IO_BASE: u64 = 0x0ae0;
/// Length of the register block.
pub const HOTPLUG_IO_LEN: u64 = 0x10;
/// The IOAPIC input of the Generic Event Device, edge-triggered, active-high. ISA line 5 is
/// free on this platform (serial uses 4; PCI INTx uses GSIs 16..=23, see [`super::intx`]).
pub const HOTPLUG_GED_GSI: u32 = 5;

/// Offsets of the registers in the block.
pub const REG_PCIU: u64 = 0x0;
pub const REG_PCID: u64 = 0x4;
pub const REG_B0EJ: u64 = 0x8;
pub const REG_GEDS: u64 = 0xc;

/// GED event selector bit: a hotplug slot has a pending insert or eject request.
pub const GED_PCI_HOTPLUG: u32 = 1 << 0;
/// GED event selector bit: the power button was pressed.
pub const GED_POWER_BUTTON: u32 = 1 << 1;

#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error("slot number {0} is outside 1..={MAX_HOTPLUG_SLOTS}")]
    InvalidSlot(u32),
    #[error("signalling the GED interrupt: {0}")]
    Irq(#[source] io::Error),
}

/// What the VMM runs when the guest ejects a slot (wrote its number to `B0EJ`). It runs on the
/// vCPU thread that did the write, so it should be quick: unplug the device from the topology
/// ([`super::PciRoot::unplug`]) or hand the number to the VMM thread.
pub type EjectHandler = Box<dyn Fn(u32) + Send + Sync>;

/// The hotplug controller and GED event source. Share it as `Arc<AcpiHotplug>`: the `Arc`
/// itself is the [`BusDevice`] to register over [`HOTPLUG_IO_BASE`]..+[`HOTPLUG_IO_LEN`] on
/// the I/O bus, and the VMM keeps a clone to raise events. Nothing here takes a lock, so the
/// eject handler may call back into it.
pub struct AcpiHotplug {
    inserted: AtomicU32,
    eject_requested: AtomicU32,
    events: AtomicU32,
    irq: EventFd,
    on_eject: EjectHandler,
}

impl AcpiHotplug {
    /// `irq` is signalled once per event (an edge); `on_eject` gets the slot number the guest
    /// wrote to the eject register.
    pub fn new(irq: EventFd, on_eject: EjectHandler) -> Self {
        Self {
            inserted: AtomicU32::new(0),
            eject_requested: AtomicU32::new(0),
            events: AtomicU32::new(0),
            irq,
            on_eject,
        }
    }

    /// A device was plugged into slot `slot_number` ([`super::PciRoot::plug`] first): the guest
    /// rescans the slot (`Notify(slot, 1)`, device check).
    pub fn notify_inserted(&self, slot_number: u32) -> Result<(), HotplugError> {
        let bit = slot_bit(slot_number)?;
        self.inserted.fetch_or(bit, Ordering::SeqCst);
        self.raise(GED_PCI_HOTPLUG)
    }

    /// Asks the guest to release slot `slot_number` (`Notify(slot, 3)`, eject request): it
    /// removes the device's driver and calls the slot's `_EJ0`, which reaches the eject handler.
    pub fn request_eject(&self, slot_number: u32) -> Result<(), HotplugError> {
        let bit = slot_bit(slot_number)?;
        self.eject_requested.fetch_or(bit, Ordering::SeqCst);
        self.raise(GED_PCI_HOTPLUG)
    }

    /// Presses the power button (`Notify(\_SB.PWRB, 0x80)`): an ACPI-aware guest shuts down.
    pub fn power_button(&self) -> Result<(), HotplugError> {
        self.raise(GED_POWER_BUTTON)
    }

    /// Slots with an insert the guest has not acknowledged yet.
    pub fn pending_inserts(&self) -> u32 {
        self.inserted.load(Ordering::SeqCst)
    }

    /// Slots with an eject request the guest has not acknowledged yet.
    pub fn pending_ejects(&self) -> u32 {
        self.eject_requested.load(Ordering::SeqCst)
    }

    /// GED events the guest has not acknowledged yet.
    pub fn pending_events(&self) -> u32 {
        self.events.load(Ordering::SeqCst)
    }

    fn raise(&self, event: u32) -> Result<(), HotplugError> {
        // The bits are visible before the edge, so `_EVT` always finds what it was raised for.
        self.events.fetch_or(event, Ordering::SeqCst);
        self.irq.write(1).map_err(HotplugError::Irq)
    }

    fn register(&self, index: u64) -> Option<&AtomicU32> {
        match index * 4 {
            REG_PCIU => Some(&self.inserted),
            REG_PCID => Some(&self.eject_requested),
            REG_GEDS => Some(&self.events),
            _ => None,
        }
    }

    /// Guest read of `data.len()` bytes at `offset` in the block.
    pub fn guest_read(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            *byte = match self.register(at / 4) {
                Some(reg) if at < HOTPLUG_IO_LEN => {
                    reg.load(Ordering::SeqCst).to_le_bytes()[(at % 4) as usize]
                }
                // B0EJ reads as 0; beyond the block, all-ones.
                None if (REG_B0EJ..REG_B0EJ + 4).contains(&at) => 0,
                _ => 0xff,
            };
        }
    }

    /// Guest write of `data` at `offset` in the block.
    pub fn guest_write(&self, offset: u64, data: &[u8]) {
        if data.is_empty() || data.len() > 4 || offset % 4 + data.len() as u64 > 4 {
            log::warn!(
                "hotplug controller: ignored {}-byte write at {offset:#x}",
                data.len()
            );
            return;
        }
        let mut value = [0u8; 4];
        value[..data.len()].copy_from_slice(data);
        let shift = 8 * (offset % 4) as u32;
        let value = u32::from_le_bytes(value) << shift;
        let reg = offset & !3;
        if reg == REG_B0EJ {
            if shift != 0 {
                log::warn!("hotplug controller: unaligned eject write at {offset:#x}");
                return;
            }
            self.eject(value);
        } else if let Some(reg) = self.register(reg / 4) {
            reg.fetch_and(!value, Ordering::SeqCst);
        }
    }

    fn eject(&self, slot_number: u32) {
        match slot_bit(slot_number) {
            Ok(bit) => {
                log::info!("hotplug slot #{slot_number}: ejected by the guest");
                self.eject_requested.fetch_and(!bit, Ordering::SeqCst);
                (self.on_eject)(slot_number);
            }
            Err(e) => log::warn!("hotplug controller: eject: {e}"),
        }
    }
}

fn slot_bit(slot_number: u32) -> Result<u32, HotplugError> {
    if (1..=MAX_HOTPLUG_SLOTS as u32).contains(&slot_number) {
        Ok(1 << slot_number)
    } else {
        Err(HotplugError::InvalidSlot(slot_number))
    }
}

impl BusDevice for Arc<AcpiHotplug> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.guest_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.guest_write(offset, data);
    }
}

#[cfg(test)]
#[path = "hotplug_tests.rs"]
mod tests;
