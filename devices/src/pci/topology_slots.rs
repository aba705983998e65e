//! Hotplug slots of a built topology and the run-time half of hotplug: putting a device behind
//! a slot's port and taking it out again.
//!
//! A plugged device is attached at device 0 below the slot's port with its BARs as they are
//! (unassigned, decoding off): the guest finds it when the hotplug controller tells it to
//! rescan the slot, sizes and places the BARs inside the slot's windows, and only its config
//! writes reach the [`super::BarObserver`], as any BAR move does. Unplugging withdraws what the
//! device decodes from the observer (the segment does that on removal).
//!
//! Both are safe while vCPUs access config space: the segment's tree lock serialises them
//! against config routing.

use std::fmt;
use std::sync::{Arc, Mutex};

use super::super::port::PciePort;
use super::super::regs::{COMMAND, COMMAND_IO, COMMAND_MEMORY};
use super::super::segment::SegmentError;
use super::super::{lock, Bdf, SharedPciDevice};
use super::{PciRoot, TopologyError};

/// One hotplug slot: an empty root port or a spare downstream port of a switch.
#[derive(Clone)]
pub struct HotplugSlotInfo {
    /// The root port's id, or `<switch>-slot<i>`.
    pub name: String,
    /// The slot number (1..=[`super::MAX_HOTPLUG_SLOTS`]): the port's physical slot number, the
    /// slot's `_SUN`, and its bit in the hotplug controller's registers.
    pub number: u32,
    /// The port the device is plugged below.
    pub port: Arc<Mutex<PciePort>>,
    /// Where a plugged device appears under the boot-time bus numbering (the port's secondary
    /// bus, device 0); [`PciRoot::plug`] returns the address under the current numbering.
    pub bdf: Bdf,
    /// The switch whose downstream port this is; `None` for a root port.
    pub switch: Option<String>,
}

impl fmt::Debug for HotplugSlotInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HotplugSlotInfo")
            .field("name", &self.name)
            .field("number", &self.number)
            .field("bdf", &self.bdf)
            .field("switch", &self.switch)
            .finish_non_exhaustive()
    }
}

impl HotplugSlotInfo {
    /// Device 0 of the port's secondary bus as the guest has programmed it now, falling back to
    /// the boot-time address while the port is unprogrammed (after a reset).
    pub fn current_bdf(&self) -> Bdf {
        lock(&self.port)
            .bus_range()
            .map_or(self.bdf, |r| Bdf::new(*r.start(), 0, 0))
    }
}

impl PciRoot {
    /// Every hotplug slot, by number.
    pub fn hotplug_slots(&self) -> Vec<HotplugSlotInfo> {
        self.slots.clone()
    }

    /// The slot named `name`.
    pub fn hotplug_slot(&self, name: &str) -> Option<&HotplugSlotInfo> {
        self.slots.iter().find(|s| s.name == name)
    }

    /// The slot with number `number` (what the guest writes to the eject register).
    pub fn hotplug_slot_by_number(&self, number: u32) -> Option<&HotplugSlotInfo> {
        self.slots.iter().find(|s| s.number == number)
    }

    /// The slot whose device answers at `bdf` under the current bus numbering.
    pub fn slot_of(&self, bdf: Bdf) -> Option<&HotplugSlotInfo> {
        self.slots.iter().find(|s| s.current_bdf() == bdf)
    }

    /// The device plugged into slot `name`, if any.
    pub fn slot_device(&self, name: &str) -> Result<Option<SharedPciDevice>, TopologyError> {
        let slot = self.slot(name)?;
        Ok(self.segment.device(slot.current_bdf()))
    }

    /// Puts `device` at device 0 behind slot `slot`'s port and returns where it answers now.
    /// Decoding is switched off first if it was on, so nothing is mapped before the guest
    /// places the BARs. Tell the guest with [`super::super::AcpiHotplug::notify_inserted`].
    pub fn plug(&self, slot: &str, device: SharedPciDevice) -> Result<Bdf, TopologyError> {
        let info = self.slot(slot)?;
        {
            let mut dev = lock(&device);
            let decode = COMMAND_MEMORY | COMMAND_IO;
            let command = dev.command();
            if command & decode != 0 {
                log::debug!("{}: decoding off before hotplug", dev.name());
                dev.write_config(COMMAND, &(command & !decode).to_le_bytes());
            }
        }
        match self.segment.add_device(Some(&info.port), 0, device) {
            Ok(()) => {}
            Err(SegmentError::Occupied { .. }) => {
                return Err(TopologyError::SlotOccupied(slot.to_string()))
            }
            Err(e) => return Err(e.into()),
        }
        let bdf = info.current_bdf();
        log::info!("hotplug slot {slot} (#{}): device at {bdf}", info.number);
        Ok(bdf)
    }

    /// Takes the device out of slot `slot`, withdrawing its BAR ranges from the observer. Call
    /// it once the guest has let go (its `_EJ0` wrote the slot number to the eject register), or
    /// to force a surprise removal.
    pub fn unplug(&self, slot: &str) -> Result<SharedPciDevice, TopologyError> {
        let info = self.slot(slot)?;
        match self.segment.remove(Some(&info.port), 0) {
            Ok(device) => {
                log::info!("hotplug slot {slot} (#{}): device removed", info.number);
                Ok(device)
            }
            Err(SegmentError::NotFound { .. }) => Err(TopologyError::SlotEmpty(slot.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    fn slot(&self, name: &str) -> Result<&HotplugSlotInfo, TopologyError> {
        self.hotplug_slot(name)
            .ok_or_else(|| TopologyError::UnknownSlot(name.to_string()))
    }
}

#[cfg(test)]
#[path = "topology_slots_tests.rs"]
mod tests;
