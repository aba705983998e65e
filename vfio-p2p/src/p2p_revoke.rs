//! What VFIO revokes behind the table's placement: a device out of D0, and a decode-off the VMM
//! had to refuse after it reached the device.

use log::warn;

use super::{Failure, P2pTable};
use crate::device::DeviceKey;
use crate::iommu::BackendKind;

impl P2pTable {
    /// The device's power state changed (the guest's write to its power management capability,
    /// already passed to VFIO): out of D0 (`low_power`), VFIO has revoked its dmabufs, so every
    /// area of it leaves the IOMMU (the revoked IOVA areas would otherwise stay, untranslated,
    /// where the next map must go) and shows as revoked; back in D0, each placed area is mapped
    /// again. Call it after the power state reached the device.
    pub fn set_low_power(&self, device: DeviceKey, low_power: bool) {
        let mut inner = self.lock();
        let Some(state) = inner.devices.get_mut(&device) else {
            return;
        };
        if state.low_power == low_power {
            return;
        }
        state.low_power = low_power;
        let who = format!("{} ({})", state.id, state.bdf);
        let keys = inner.keys_of(&device);
        if low_power {
            let mapped = keys
                .iter()
                .filter(|k| inner.entries[*k].mapped_at.is_some())
                .count();
            for key in &keys {
                self.unmap_entry(&mut inner, key);
                if let Some(e) = inner.entries.get_mut(key) {
                    e.failed_since_mapped |= e.mapped_at.is_none();
                }
            }
            let what = match self.iommu.kind() {
                BackendKind::Iommufd => "dmabufs",
                BackendKind::Type1 => "mmaps",
            };
            warn!(
                "{who} (P2P group {}): left D0 (D3hot), VFIO revoked its BARs' {what}; {mapped} \
                 BAR area(s) unmapped, peers cannot DMA to it until it is back in D0",
                self.domain
            );
        } else {
            inner.clear_failures(&keys);
        }
        self.reconcile(&mut inner);
    }

    /// A decode-off of `device` reached it (VFIO revoked its dmabufs) but the VMM refused the
    /// change afterwards (KVM could not remove a BAR's memory slot) and turned decoding back on:
    /// the guest still decodes, VFIO lets the dmabufs be mapped again, but iommufd does not
    /// restore an area it saw revoked. Each mapped area of the device leaves the IOMMU and shows
    /// as revoked until the guest's next move or decode toggle of it maps it again. Type1 maps
    /// BARs by address, which survives: nothing to do there.
    pub fn decode_bounced(&self, device: DeviceKey) {
        if self.iommu.kind() != BackendKind::Iommufd {
            return;
        }
        let mut inner = self.lock();
        let Some(state) = inner.devices.get(&device) else {
            return;
        };
        let who = format!("{} ({})", state.id, state.bdf);
        let mut revoked = 0;
        for key in inner.keys_of(&device) {
            let Some(iova) = inner.entries[&key].mapped_at else {
                continue;
            };
            self.unmap_entry(&mut inner, &key);
            if let Some(e) = inner.entries.get_mut(&key) {
                if e.mapped_at.is_none() {
                    e.failure = Some((iova, Failure::Revoked));
                    e.failed_since_mapped = true;
                    revoked += 1;
                }
            }
        }
        if revoked > 0 {
            warn!(
                "{who} (P2P group {}): its decode-off was refused after VFIO revoked its \
                 dmabufs; {revoked} BAR area(s) unmapped until the guest moves the BAR or \
                 toggles decoding",
                self.domain
            );
        }
    }
}
