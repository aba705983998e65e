//! The VMM's `BarObserver`: makes the guest address space follow every BAR the guest (or the
//! boot-time topology) places, moves, enables or disables.
//!
//! For every BAR: a trap region on the MMIO (or port I/O) bus covering the whole BAR. For
//! passthrough BARs additionally: KVM memory slots over the mmappable areas (so guest CPU access
//! goes straight to the device) and the peer-to-peer IOMMU mappings (so other devices' DMA to
//! the BAR's guest address reaches it). An expansion ROM (BAR [`ROM_BAR`](devices::pci::ROM_BAR)) stays trapped (its
//! model serves reads from a copy) and gets no peer mapping: Linux enables and disables a ROM per
//! 4 KiB it reads, and a KVM slot per toggle cost more than the traps (lab, 64 KiB through sysfs:
//! 15-25 s with slots, 7-9.5 s trapped). Each change is all-or-nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use devices::pci::p2p_placement::tell_table;
use devices::pci::regs::COMMAND_MEMORY;
use devices::pci::{BarChange, BarKind, BarObserver, BarRegion, ObserverError, SharedPciDevice};
use devices::{Bus, BusRange};
use vfio_p2p::{DeviceKey, P2pTable, RegionMapping};

use super::p2p_report::P2pReporter;
use crate::slots::{MemorySlots, Slot};

/// A host mapping of part of a passthrough BAR, ready to become a KVM memory slot.
pub struct MappedArea {
    /// Offset inside the BAR.
    pub offset: u64,
    pub mapping: RegionMapping,
}

/// What the mapper knows about a passthrough function.
pub struct PassthroughBars {
    pub key: DeviceKey,
    /// Per BAR index, the areas to map as memory slots.
    pub areas: [Vec<MappedArea>; 6],
    /// The peer-BAR table of the device's P2P group; `None` outside a group (no peer reaches
    /// its BARs).
    pub p2p: Option<Arc<P2pTable>>,
}

/// A BAR currently decoding in the guest.
struct LiveBar {
    range: BusRange,
    kind: BarKind,
    /// Each memory slot with the host address it maps (to put it back after a failed removal).
    slots: Vec<(Slot, u64)>,
}

pub struct BarMapper {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    slots: Arc<MemorySlots>,
    reporter: Arc<P2pReporter>,
    passthrough: Mutex<HashMap<usize, PassthroughBars>>,
    live: Mutex<HashMap<(usize, u8), LiveBar>>,
}

/// Identity of a device object, stable while it lives.
fn device_id(device: &SharedPciDevice) -> usize {
    Arc::as_ptr(device) as *const () as usize
}

impl BarMapper {
    pub fn new(
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        slots: Arc<MemorySlots>,
        reporter: Arc<P2pReporter>,
    ) -> Self {
        Self {
            pio,
            mmio,
            slots,
            reporter,
            passthrough: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
        }
    }

    /// Registers the mappable areas of a passthrough device before it is placed.
    pub fn add_passthrough(&self, device: &SharedPciDevice, bars: PassthroughBars) {
        self.passthrough
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(device_id(device), bars);
    }

    /// Forgets a device that has left the guest (its BARs already withdrawn); the returned
    /// mappings unmap when dropped.
    pub fn remove_passthrough(&self, device: &SharedPciDevice) -> Option<PassthroughBars> {
        self.passthrough
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&device_id(device))
    }

    fn bus(&self, kind: BarKind) -> &Bus {
        match kind {
            BarKind::Io => &self.pio,
            BarKind::Mem32 | BarKind::Mem64 => &self.mmio,
        }
    }

    /// Undoes a live BAR: slots, then the trap region. All or nothing: when KVM refuses to
    /// remove a slot (it allocates to delete one, so ENOMEM is possible), the slots already
    /// removed are put back and the BAR is returned as it was, with the error; forgetting a slot
    /// KVM still has would make every later slot at that address fail as overlapping.
    fn tear_down(&self, mut bar: LiveBar) -> Result<(), (LiveBar, ObserverError)> {
        let mut removed = Vec::new();
        while let Some((slot, host)) = bar.slots.pop() {
            let (gpa, size) = (slot.gpa, slot.size);
            if let Err((slot, e)) = self.slots.unmap(slot) {
                bar.slots.push((slot, host));
                for (gpa, size, host) in removed {
                    // SAFETY: as in `set_up`: the mapping lives as long as the device, and this
                    // slot is removed again before the BAR stops decoding.
                    match unsafe { self.slots.map(gpa, size, host) } {
                        Ok(slot) => bar.slots.push((slot, host)),
                        Err(e) => log::error!("restoring a BAR memory slot at {gpa:#x}: {e}"),
                    }
                }
                return Err((bar, e.into()));
            }
            removed.push((gpa, size, host));
        }
        if let Err(e) = self.bus(bar.kind).remove(bar.range) {
            log::error!("removing BAR trap at {}: {e}", bar.range);
        }
        Ok(())
    }

    /// [`tear_down`](Self::tear_down) where nothing can be refused (undoing a half-built BAR):
    /// a slot KVM keeps is logged.
    fn tear_down_logged(&self, bar: LiveBar) {
        if let Err((bar, e)) = self.tear_down(bar) {
            log::error!("removing a BAR memory slot at {}: {e}", bar.range);
        }
    }

    /// Sets up a BAR at `range`: the trap region, then a slot per mappable area.
    fn set_up(
        &self,
        device: &SharedPciDevice,
        bar: u8,
        kind: BarKind,
        range: BusRange,
    ) -> Result<LiveBar, ObserverError> {
        let region = Arc::new(Mutex::new(BarRegion::new(device.clone(), bar)));
        self.bus(kind).insert(range, region)?;
        let mut live = LiveBar {
            range,
            kind,
            slots: Vec::new(),
        };
        let passthrough = self.passthrough.lock().unwrap_or_else(|e| e.into_inner());
        let mut maps = Vec::new();
        if let Some(areas) = passthrough
            .get(&device_id(device))
            .and_then(|p| p.areas.get(usize::from(bar)))
        {
            for area in areas {
                let host = area.mapping.host_va();
                maps.push((range.base + area.offset, area.mapping.size(), host));
            }
        }
        for (gpa, size, host) in maps {
            // SAFETY: the mapping lives in `self.passthrough` as long as the device does, and
            // every slot over it is removed before (tear_down runs when the BAR stops decoding).
            match unsafe { self.slots.map(gpa, size, host) } {
                Ok(slot) => live.slots.push((slot, host)),
                Err(e) => {
                    drop(passthrough);
                    self.tear_down_logged(live);
                    return Err(e.into());
                }
            }
        }
        Ok(live)
    }

    /// The device's identity and P2P table, when it is a passthrough device in a group.
    fn p2p_of(&self, device: &SharedPciDevice) -> Option<(DeviceKey, Arc<P2pTable>)> {
        self.passthrough
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&device_id(device))
            .and_then(|p| Some((p.key, p.p2p.clone()?)))
    }

    /// `change` was refused after its decode-off reached the device (the rollback turns decoding
    /// back on): VFIO revoked the device's dmabufs on the way, which the table must show.
    fn decode_bounced(&self, device: &SharedPciDevice, change: &BarChange) {
        let decode_off = change.new.is_none()
            && device.lock().unwrap_or_else(|e| e.into_inner()).command() & COMMAND_MEMORY == 0;
        if !decode_off {
            return;
        }
        if let Some((key, p2p)) = self.p2p_of(device) {
            p2p.decode_bounced(key);
            self.reporter.changed();
        }
    }

    /// Tells the P2P table where `change` leaves the BAR, with any other BAR of the function
    /// that stopped decoding in the same access (`p2p_placements`). The table hears of
    /// placement and decoding only from here (the one source of truth).
    fn update_p2p(&self, device: &SharedPciDevice, change: &BarChange) {
        let Some((key, p2p)) = self.p2p_of(device) else {
            return;
        };
        let dev = device.lock().unwrap_or_else(|e| e.into_inner());
        // Peer access is best effort: a BAR the IOMMU cannot map still works for the CPU.
        match tell_table(&*dev, change, key, &p2p) {
            Ok(false) => return,
            Ok(true) => {}
            Err(e) => log::warn!("{change}: peer-to-peer mapping unavailable: {e}"),
        }
        drop(dev);
        self.reporter.changed();
    }
}

impl BarObserver for BarMapper {
    fn bar_changed(
        &self,
        device: &SharedPciDevice,
        change: &BarChange,
    ) -> Result<(), ObserverError> {
        log::debug!("{change}");
        let id = (device_id(device), change.bar);
        let old = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        if let Some(old) = old {
            if let Err((old, e)) = self.tear_down(old) {
                // Still decoding where it was: the change is refused and rolled back.
                self.live
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, old);
                self.decode_bounced(device, change);
                return Err(e);
            }
        }
        if let Some(range) = change.new {
            match self.set_up(device, change.bar, change.kind, range) {
                Ok(live) => {
                    self.live
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id, live);
                }
                Err(e) => {
                    // All-or-nothing: put the old placement back before refusing.
                    if let Some(old_range) = change.old {
                        match self.set_up(device, change.bar, change.kind, old_range) {
                            Ok(live) => {
                                self.live
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .insert(id, live);
                            }
                            Err(e) => log::error!("{change}: cannot restore the old BAR: {e}"),
                        }
                    }
                    return Err(e);
                }
            }
        }
        self.update_p2p(device, change);
        Ok(())
    }

    fn forwarding_changed(&self, device: &SharedPciDevice, change: &BarChange) {
        self.update_p2p(device, change);
    }
}
