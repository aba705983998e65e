//! The peer-BAR table: which BAR areas of the VM's assigned devices are in the IOMMU, and where.
//!
//! Peer-to-peer DMA needs each device's BARs in the shared IO address space at the addresses the
//! guest gave them (guest bus address = guest physical = IOVA). Entries are keyed by device
//! identity, BAR and area offset, never by guest address: the guest moves BARs and toggles
//! memory decoding, and each entry keeps its dmabuf (exported once) across all of that. The
//! table holds the desired state (each BAR's [`BarPlacement`]) and reconciles the IOMMU with
//! it, doing the lookup and the map/unmap ioctls under one lock, so a BAR move is always "unmap
//! old, map new" and never a double map.
//!
//! A table belongs to one P2P domain (a group's IOMMU address space): only its members'
//! BARs are in it, so only they reach each other.
//!
//! VFIO revokes a device's dmabufs while its memory decoding is off, across a reset, and when it
//! closes; iommufd then stops translating but keeps the IOVA area, and nothing maps it again.
//! The VMM's BAR observer, the one source of truth for placement and decoding, reports each BAR
//! as [`BarPlacement`]: the table unmaps on decode-off and reset and maps again once placed and
//! decoding, and [`remove_device`](P2pTable::remove_device) unmaps everything before the device
//! closes.
//!
//! P2P is best effort: a BAR area that cannot be mapped (kernel without dmabuf export, BAR
//! outside the host IOMMU's range, guest placing two BARs on top of each other) is logged once,
//! stays in the table unmapped with the reason ([`P2pTable::rows`]), and the VM runs without P2P
//! to it. Guest RAM is mapped by the VMM directly through [`IommuBackend`], where a failure is an
//! error.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use log::{debug, error, info, warn};

use crate::bdf::Bdf;
use crate::device::{BarArea, DeviceError, DeviceKey, HostPciDevice};
use crate::iommu::{
    ranges_cover, BackendKind, Backing, DmaKind, DmaMapRequest, IommuBackend, IommuError, IovaRange,
};
use crate::page_size;
use crate::region::RegionMapping;

/// One BAR of an assigned device: what the guest moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BarKey {
    pub device: DeviceKey,
    /// VFIO region index = BAR number (0-5).
    pub region: u32,
}

/// One P2P target: an mmappable area of a BAR, at `area_offset` from the BAR's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct P2pKey {
    pub bar: BarKey,
    pub area_offset: u64,
}

impl fmt::Display for BarKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} BAR{}", self.device, self.region)
    }
}

impl fmt::Display for P2pKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} area +{:#x}", self.bar, self.area_offset)
    }
}

/// Where the guest has a BAR, as the VMM's BAR observer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarPlacement {
    /// Decoding at this guest address (= IOVA).
    Placed(u64),
    /// The BAR has an address but the device's memory decoding is off.
    DecodeOff,
    /// No address yet, or being sized.
    Unplaced,
    /// Decoding at this guest address, but a bridge above the function does not forward it
    /// (outside the bridge's memory windows, or the bridge's memory space off): as on hardware,
    /// a peer's DMA there does not reach the BAR, so it stays out of the IOMMU.
    Unforwarded(u64),
}

/// What puts a BAR area into the IOMMU.
#[derive(Debug)]
pub enum BarBacking {
    /// A VFIO dmabuf of the area (iommufd, `IOMMU_IOAS_MAP_FILE`).
    Dmabuf(OwnedFd),
    /// An mmap of the area (type1, `VFIO_IOMMU_MAP_DMA` by address). Shared, e.g. with the KVM
    /// memory slot of the same BAR; the table keeps it alive while mapped.
    Mmap(Arc<RegionMapping>),
}

/// The table's view of one entry, for diagnostics and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct P2pState {
    /// Where the guest has the BAR, if it placed it.
    pub bar_base: Option<u64>,
    /// The IOVA the area is mapped at, if it is in the IOMMU now.
    pub mapped_at: Option<u64>,
}

/// Errors of the table's bookkeeping (mapping failures are warnings, not errors).
#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    #[error("{key}: a {backing} cannot be mapped by the {backend} IOMMU")]
    BackingMismatch {
        key: P2pKey,
        backing: &'static str,
        backend: BackendKind,
    },
    #[error("{key}: the mapping holds {mapping:#x} bytes, less than the {size:#x} to map")]
    BackingTooSmall {
        key: P2pKey,
        size: u64,
        mapping: u64,
    },
    #[error("{device} is already in the P2P table")]
    DeviceExists { device: DeviceKey },
    #[error("{key} is already in the P2P table")]
    DuplicateKey { key: P2pKey },
    #[error("{key}: a P2P area must be a non-empty whole number of pages, not {size:#x} bytes")]
    InvalidSize { key: P2pKey, size: u64 },
    #[error("{bar} has no P2P areas in the table")]
    UnknownBar { bar: BarKey },
    #[error("{device} is not in the P2P table")]
    UnknownDevice { device: DeviceKey },
}

/// Why an area of an iommufd table has no dmabuf when export is switched off.
pub(crate) const EXPORT_DISABLED: &str = "dmabuf export disabled";
/// Why an area has no dmabuf when the kernel cannot export one.
pub(crate) const NO_EXPORT: &str = "no dmabuf export (needs Linux 6.19+, CONFIG_VFIO_PCI_DMABUF)";

/// Why an entry that should be mapped is not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The area could not be exported or mmapped: it can never be mapped.
    Unbacked(String),
    Unaligned,
    OutsideWindows,
    /// Past the last IOVA the host IOMMU translates (e.g. 39 bits of an emulated VT-d): the
    /// kernel would refuse the map. Checked against the domain's IOVA ranges before asking.
    BeyondIommu {
        max_iova: u64,
    },
    /// In a hole of the host IOMMU's IOVA ranges (a reserved region, such as the MSI window).
    IommuHole,
    /// Another P2P area is mapped there; retried whenever the table changes.
    Overlap,
    /// The IOMMU refused (with ENODEV: the dmabuf is revoked); retried only when the entry's
    /// placement changes.
    Iommu(String),
    Revoked,
}

pub(crate) struct Entry {
    /// `None`: the area could not be exported or mapped; the reason is in `failure`.
    pub(crate) backing: Option<BarBacking>,
    pub(crate) size: u64,
    pub(crate) placement: BarPlacement,
    pub(crate) mapped_at: Option<u64>,
    /// The last failure and the IOVA it happened at (0 for a missing backing), so each is
    /// logged once and shown in the table.
    pub(crate) failure: Option<(u64, Failure)>,
    /// A failure kept the area out of the IOMMU since it was last mapped: its next map is a
    /// recovery, logged as such.
    pub(crate) failed_since_mapped: bool,
}

/// Who a device is, for the visible table.
pub(crate) struct DeviceState {
    pub(crate) id: String,
    pub(crate) bdf: Bdf,
    /// Out of D0 (the guest wrote D3hot to its power management capability): VFIO revoked the
    /// device's dmabufs and zapped its mmaps, so nothing of it is mapped until it is back in D0.
    pub(crate) low_power: bool,
}

/// What [`P2pTable::add_device`] needs of a device, so tests can stand in for one.
pub(crate) trait AreaSource {
    fn key(&self) -> DeviceKey;
    fn bdf(&self) -> Bdf;
    fn p2p_areas(&self) -> Vec<BarArea>;
    fn export_dmabuf(&self, area: &BarArea) -> Result<Option<OwnedFd>, DeviceError>;
    fn mmap(&self, area: &BarArea) -> Result<RegionMapping, DeviceError>;
}

impl AreaSource for HostPciDevice {
    fn key(&self) -> DeviceKey {
        HostPciDevice::key(self)
    }

    fn bdf(&self) -> Bdf {
        HostPciDevice::bdf(self)
    }

    fn p2p_areas(&self) -> Vec<BarArea> {
        HostPciDevice::p2p_areas(self)
    }

    fn export_dmabuf(&self, area: &BarArea) -> Result<Option<OwnedFd>, DeviceError> {
        HostPciDevice::export_dmabuf(self, area.region, area.offset, area.size)
    }

    fn mmap(&self, area: &BarArea) -> Result<RegionMapping, DeviceError> {
        self.mmap_region(area.region, area.offset, area.size)
    }
}

#[derive(Default)]
pub(crate) struct Inner {
    pub(crate) entries: BTreeMap<P2pKey, Entry>,
    pub(crate) devices: BTreeMap<DeviceKey, DeviceState>,
}

impl Inner {
    /// Where `key` should be mapped now: the BAR placed and decoding, the area exported.
    fn desired(&self, key: &P2pKey) -> Option<u64> {
        let entry = self.entries.get(key)?;
        entry.backing.as_ref()?;
        if self.devices.get(&key.bar.device)?.low_power {
            return None;
        }
        match entry.placement {
            BarPlacement::Placed(base) => base.checked_add(key.area_offset),
            _ => None,
        }
    }

    fn keys_of(&self, device: &DeviceKey) -> Vec<P2pKey> {
        self.entries
            .keys()
            .filter(|k| k.bar.device == *device)
            .copied()
            .collect()
    }

    /// How warnings name an area: the device's id and host address, the BAR and the offset
    /// (`shm (0000:00:03.0) BAR2 +0x0`), falling back to the key for an unnamed device.
    fn label(&self, key: &P2pKey) -> String {
        match self.devices.get(&key.bar.device) {
            Some(d) => format!(
                "{} ({}) BAR{} +{:#x}",
                d.id, d.bdf, key.bar.region, key.area_offset
            ),
            None => key.to_string(),
        }
    }

    fn clear_failures(&mut self, keys: &[P2pKey]) {
        for key in keys {
            if let Some(e) = self.entries.get_mut(key) {
                if e.backing.is_some() {
                    e.failure = None;
                }
            }
        }
    }
}

/// The peer-BAR mapping table of one P2P domain.
pub struct P2pTable {
    pub(crate) domain: String,
    iommu: Arc<dyn IommuBackend>,
    windows: Vec<IovaRange>,
    dmabuf_export: bool,
    pub(crate) inner: Mutex<Inner>,
}

impl P2pTable {
    /// The table of P2P domain `domain` (a group's name), mapping through `iommu`. BARs are
    /// mapped only inside `mmio_windows` (the guest MMIO windows the VMM places BARs in; empty
    /// means no restriction), which keeps a guest that points a BAR at RAM from fighting the RAM
    /// mapping.
    pub fn new(domain: &str, iommu: Arc<dyn IommuBackend>, mmio_windows: &[IovaRange]) -> Self {
        if let Ok(host) = iommu.iova_ranges() {
            for w in mmio_windows {
                let size = (w.last - w.start).saturating_add(1);
                if !ranges_cover(&host, w.start, size) {
                    warn!(
                        "guest MMIO window [{:#x}, {:#x}] is not entirely inside the host \
                         IOMMU's IOVA ranges {host:x?}: peers cannot DMA to BARs placed outside",
                        w.start, w.last
                    );
                }
            }
        }
        Self {
            domain: domain.to_owned(),
            iommu,
            windows: mmio_windows.to_vec(),
            dmabuf_export: true,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Switches dmabuf export off: on iommufd, areas added afterwards get no dmabuf and show as
    /// failed ("dmabuf export disabled"), as on a kernel without `CONFIG_VFIO_PCI_DMABUF`; for
    /// measuring that case. No effect on type1, which maps BAR mmaps by address.
    pub fn set_dmabuf_export(&mut self, enabled: bool) {
        self.dmabuf_export = enabled;
    }

    /// The P2P domain this table belongs to.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub(crate) fn mechanism(&self) -> BackendKind {
        self.iommu.kind()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers every P2P-capable BAR area of `dev` (see [`HostPciDevice::p2p_areas`]), `id`
    /// being its name in the VM: exports a dmabuf per area on iommufd, mmaps it on type1. Areas
    /// that cannot be exported or mapped are logged and kept unmappable, with the reason in
    /// [`rows`](Self::rows). The device starts with no BAR placed.
    pub fn add_device(&self, dev: &HostPciDevice, id: &str) -> Result<Vec<P2pKey>, P2pError> {
        self.add_from(dev, id)
    }

    /// [`add_device`](Self::add_device) for anything that has areas; all or nothing.
    pub(crate) fn add_from(
        &self,
        dev: &impl AreaSource,
        id: &str,
    ) -> Result<Vec<P2pKey>, P2pError> {
        let device = dev.key();
        self.register_device(device, id, dev.bdf())?;
        let added = self.add_areas(dev, id);
        if added.is_err() {
            self.remove_device(device);
        }
        added
    }

    fn add_areas(&self, dev: &impl AreaSource, id: &str) -> Result<Vec<P2pKey>, P2pError> {
        let device = dev.key();
        let mut keys = Vec::new();
        for area in dev.p2p_areas() {
            let key = P2pKey {
                bar: BarKey {
                    device,
                    region: area.region,
                },
                area_offset: area.offset,
            };
            match self.backing(dev, &area) {
                Ok(backing) => self.register(key, backing, area.size)?,
                Err(why) => {
                    warn!(
                        "{} BAR{} +{:#x} ({id}): {why}; peers cannot DMA to it",
                        dev.bdf(),
                        area.region,
                        area.offset
                    );
                    self.insert(key, None, area.size, Some((0, Failure::Unbacked(why))))?;
                }
            }
            keys.push(key);
        }
        Ok(keys)
    }

    /// What puts `area` into this table's IOMMU, or why nothing can.
    fn backing(&self, dev: &impl AreaSource, area: &BarArea) -> Result<BarBacking, String> {
        match self.iommu.kind() {
            BackendKind::Iommufd if !self.dmabuf_export => Err(EXPORT_DISABLED.into()),
            BackendKind::Iommufd => match dev.export_dmabuf(area) {
                Ok(Some(fd)) => Ok(BarBacking::Dmabuf(fd)),
                Ok(None) => Err(NO_EXPORT.into()),
                Err(DeviceError::Dmabuf { source, .. }) => Err(format!("dmabuf export: {source}")),
                Err(e) => Err(e.to_string()),
            },
            BackendKind::Type1 => match dev.mmap(area) {
                Ok(m) => Ok(BarBacking::Mmap(Arc::new(m))),
                Err(DeviceError::Mmap { source, .. }) => Err(format!("BAR mmap: {source}")),
                Err(e) => Err(e.to_string()),
            },
        }
    }

    /// Names a device for the visible table: its id in the VM and host address. Lower-level
    /// than [`add_device`](Self::add_device), which calls it; needed before
    /// [`register`](Self::register).
    pub fn register_device(&self, device: DeviceKey, id: &str, bdf: Bdf) -> Result<(), P2pError> {
        let mut inner = self.lock();
        if inner.devices.contains_key(&device) {
            return Err(P2pError::DeviceExists { device });
        }
        let state = DeviceState {
            id: id.to_owned(),
            bdf,
            low_power: false,
        };
        inner.devices.insert(device, state);
        Ok(())
    }

    /// Adds one BAR area of a [registered](Self::register_device) device with its backing.
    /// Lower-level than [`add_device`](Self::add_device), which calls it; the area is unmapped
    /// until its BAR is placed.
    pub fn register(&self, key: P2pKey, backing: BarBacking, size: u64) -> Result<(), P2pError> {
        if size == 0 || !size.is_multiple_of(page_size()) {
            return Err(P2pError::InvalidSize { key, size });
        }
        let backend = self.iommu.kind();
        match (&backing, backend) {
            (BarBacking::Dmabuf(_), BackendKind::Type1) => {
                return Err(P2pError::BackingMismatch {
                    key,
                    backing: "dmabuf",
                    backend,
                })
            }
            (BarBacking::Mmap(_), BackendKind::Iommufd) => {
                return Err(P2pError::BackingMismatch {
                    key,
                    backing: "BAR mmap",
                    backend,
                })
            }
            (BarBacking::Mmap(m), _) if m.size() < size => {
                return Err(P2pError::BackingTooSmall {
                    key,
                    size,
                    mapping: m.size(),
                })
            }
            _ => {}
        }
        self.insert(key, Some(backing), size, None)
    }

    fn insert(
        &self,
        key: P2pKey,
        backing: Option<BarBacking>,
        size: u64,
        failure: Option<(u64, Failure)>,
    ) -> Result<(), P2pError> {
        let mut inner = self.lock();
        if !inner.devices.contains_key(&key.bar.device) {
            return Err(P2pError::UnknownDevice {
                device: key.bar.device,
            });
        }
        if inner.entries.contains_key(&key) {
            return Err(P2pError::DuplicateKey { key });
        }
        let entry = Entry {
            backing,
            size,
            placement: BarPlacement::Unplaced,
            mapped_at: None,
            failure,
            failed_since_mapped: false,
        };
        inner.entries.insert(key, entry);
        Ok(())
    }

    /// Where the guest has `bar` now (the BAR observer's word). Every area of the BAR follows:
    /// unmapped from the old address, mapped at the new one when placed and decoding.
    pub fn bar_moved(&self, bar: BarKey, placement: BarPlacement) -> Result<(), P2pError> {
        self.bars_moved(&[(bar, placement)])
    }

    /// [`bar_moved`](Self::bar_moved) for several BARs at once, with one reconcile after all of
    /// them: what one guest access did to a function's BARs (decode off ends them all), so no
    /// area is mapped on the strength of another BAR's stale placement. All or nothing: an
    /// unknown BAR changes none.
    pub fn bars_moved(&self, moves: &[(BarKey, BarPlacement)]) -> Result<(), P2pError> {
        let mut inner = self.lock();
        let mut keys = Vec::new();
        for &(bar, placement) in moves {
            let of_bar: Vec<P2pKey> = inner
                .entries
                .keys()
                .filter(|k| k.bar == bar)
                .copied()
                .collect();
            if of_bar.is_empty() {
                return Err(P2pError::UnknownBar { bar });
            }
            keys.extend(of_bar.into_iter().map(|k| (k, placement)));
        }
        for (key, placement) in &keys {
            if let Some(e) = inner.entries.get_mut(key) {
                e.placement = *placement;
            }
        }
        let keys: Vec<P2pKey> = keys.into_iter().map(|(k, _)| k).collect();
        inner.clear_failures(&keys);
        self.reconcile(&mut inner);
        Ok(())
    }

    /// Where the table has `bar` now, if it knows the BAR.
    pub fn placement(&self, bar: BarKey) -> Option<BarPlacement> {
        let inner = self.lock();
        inner
            .entries
            .iter()
            .find(|(k, _)| k.bar == bar)
            .map(|(_, e)| e.placement)
    }

    /// Runs `reset` (e.g. `|| dev.reset()`) with every area of `device` out of the IOMMU, then
    /// maps again those whose BAR is placed. VFIO revokes the dmabufs across a reset and iommufd
    /// does not restore them. Use it after a guest-initiated FLR too (with a no-op closure): the
    /// kernel already revoked the mappings, and this replaces them. `reset` runs under the
    /// table's lock and must not call back into the table.
    pub fn device_reset<R>(&self, device: DeviceKey, reset: impl FnOnce() -> R) -> R {
        let mut inner = self.lock();
        let keys = inner.keys_of(&device);
        for key in &keys {
            self.unmap_entry(&mut inner, key);
        }
        let result = reset();
        // VFIO puts the device in D0 for the reset.
        if let Some(state) = inner.devices.get_mut(&device) {
            state.low_power = false;
        }
        inner.clear_failures(&keys);
        self.reconcile(&mut inner);
        result
    }

    /// Unmaps and forgets every area of `device` (closing its dmabufs or dropping its mmaps).
    /// Call before closing the device (hot-unplug, teardown), so nothing of it stays in the
    /// IOMMU. Other devices' areas that were blocked by it get mapped.
    pub fn remove_device(&self, device: DeviceKey) {
        let mut inner = self.lock();
        for key in inner.keys_of(&device) {
            self.unmap_entry(&mut inner, &key);
            if let Some(entry) = inner.entries.remove(&key) {
                if entry.mapped_at.is_some() {
                    // The unmap failed, so the IOMMU may still reach this memory: an mmap must
                    // outlive that (the `IommuBackend::map` contract), so leak it.
                    error!("{key}: left in the IOMMU after a failed unmap; leaking its backing");
                    std::mem::forget(entry.backing);
                }
            }
        }
        inner.devices.remove(&device);
        self.reconcile(&mut inner);
    }

    /// The state of one entry, or `None` if it is not in the table.
    pub fn state(&self, key: &P2pKey) -> Option<P2pState> {
        let inner = self.lock();
        inner.entries.get(key).map(|e| P2pState {
            bar_base: match e.placement {
                BarPlacement::Placed(base) | BarPlacement::Unforwarded(base) => Some(base),
                _ => None,
            },
            mapped_at: e.mapped_at,
        })
    }

    /// The entries registered for `device`.
    pub fn keys_of(&self, device: DeviceKey) -> Vec<P2pKey> {
        self.lock().keys_of(&device)
    }

    /// Number of registered BAR areas.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Brings the IOMMU in line with the desired state: first unmaps every area that is mapped
    /// somewhere it should not be, then maps every area that should be mapped and is not.
    fn reconcile(&self, inner: &mut Inner) {
        let keys: Vec<P2pKey> = inner.entries.keys().copied().collect();
        for key in &keys {
            let mapped = inner.entries[key].mapped_at;
            if mapped.is_some() && mapped != inner.desired(key) {
                self.unmap_entry(inner, key);
            }
        }
        for key in &keys {
            if inner.entries[key].mapped_at.is_some() {
                continue;
            }
            if let Some(iova) = inner.desired(key) {
                self.map_entry(inner, key, iova);
            }
        }
    }

    fn unmap_entry(&self, inner: &mut Inner, key: &P2pKey) {
        let label = inner.label(key);
        let Some(entry) = inner.entries.get_mut(key) else {
            return;
        };
        let Some(iova) = entry.mapped_at else {
            return;
        };
        let started = Instant::now();
        match self.iommu.unmap(iova, entry.size) {
            Ok(()) => {
                debug!(
                    "{label}: unmapped from IOVA {iova:#x} in {:?}",
                    started.elapsed()
                );
                entry.mapped_at = None;
            }
            // Kept as mapped so the next reconcile retries, and nothing maps over it.
            Err(e) => error!("{label}: {e}"),
        }
    }

    /// Why `key` cannot go to `iova`, checked before any ioctl.
    fn precheck(&self, inner: &Inner, key: &P2pKey, iova: u64, size: u64) -> Option<Failure> {
        if !iova.is_multiple_of(page_size()) {
            return Some(Failure::Unaligned);
        }
        if !self.windows.is_empty() && !ranges_cover(&self.windows, iova, size) {
            return Some(Failure::OutsideWindows);
        }
        let Some(end) = iova.checked_add(size) else {
            return Some(Failure::OutsideWindows);
        };
        // Asked at every map: a device attached later (hotplug) may narrow the ranges. Without an
        // answer the kernel's own refusal still comes back as `Failure::Iommu`.
        match self.iommu.iova_ranges() {
            Ok(host) if !ranges_cover(&host, iova, size) => {
                let max_iova = host.iter().map(|r| r.last).max().unwrap_or(0);
                return Some(if end - 1 > max_iova {
                    Failure::BeyondIommu { max_iova }
                } else {
                    Failure::IommuHole
                });
            }
            Ok(_) => {}
            Err(e) => debug!("{key}: {e}; leaving the range check to the kernel"),
        }
        let overlaps = inner.entries.iter().any(|(k, e)| {
            k != key
                && e.mapped_at
                    .is_some_and(|m| m < end && iova < m.saturating_add(e.size))
        });
        overlaps.then_some(Failure::Overlap)
    }

    fn map_entry(&self, inner: &mut Inner, key: &P2pKey, iova: u64) {
        let label = inner.label(key);
        let size = inner.entries[key].size;
        let failure = match &inner.entries[key].failure {
            // The IOMMU refused this very placement before; wait for it to change.
            Some((at, Failure::Iommu(_) | Failure::Revoked)) if *at == iova => return,
            _ => self.precheck(inner, key, iova, size),
        };
        let Some(entry) = inner.entries.get_mut(key) else {
            return;
        };
        let Some(backing) = &entry.backing else {
            return;
        };
        let started = Instant::now();
        let failure = failure.or_else(|| {
            let backing = match backing {
                BarBacking::Dmabuf(fd) => Backing::File {
                    fd: fd.as_fd(),
                    offset: 0,
                    host_va: None,
                },
                BarBacking::Mmap(m) => Backing::HostVa(m.host_va()),
            };
            let req = DmaMapRequest {
                iova,
                size,
                kind: DmaKind::DeviceBar,
                backing,
                writable: true,
            };
            // SAFETY: a dmabuf is a VFIO export of a BAR of a device assigned to this VM, which
            // the kernel revokes itself when the device stops decoding or goes away; an mmap is
            // owned by this entry (an `Arc`) and is only dropped after a successful unmap (or
            // leaked), and the table creates no references into it.
            match unsafe { self.iommu.map(&req) } {
                Ok(()) => None,
                Err(e) => {
                    // The row names the area and the IOVA already: only the errno is news.
                    let failure = match e {
                        _ if e.errno() == Some(libc::ENODEV) => Failure::Revoked,
                        IommuError::Map { ref source, .. } => {
                            Failure::Iommu(format!("IOMMU map: {source}"))
                        }
                        _ => Failure::Iommu(e.to_string()),
                    };
                    if entry.failure.as_ref().map(|f| &f.1) != Some(&failure) {
                        warn!(
                            "{label} (P2P group {}): {e}; peers cannot DMA to this BAR area",
                            self.domain
                        );
                    }
                    Some(failure)
                }
            }
        });
        match failure {
            None => {
                debug!(
                    "{label}: mapped at IOVA {iova:#x} (+{size:#x}) in {:?}",
                    started.elapsed()
                );
                if entry.failed_since_mapped {
                    // The fault that kept it out is gone: say so where the warning was.
                    info!(
                        "{label} (P2P group {}): mapped at IOVA {iova:#x} again",
                        self.domain
                    );
                }
                entry.mapped_at = Some(iova);
                entry.failure = None;
                entry.failed_since_mapped = false;
            }
            Some(f) => {
                let logged = matches!(f, Failure::Iommu(_) | Failure::Revoked);
                if entry.failure.as_ref() != Some(&(iova, f.clone())) && !logged {
                    warn!(
                        "{label} (P2P group {}): not mapping it at IOVA {iova:#x} ({f}); peers \
                         cannot DMA to it there",
                        self.domain
                    );
                }
                entry.failure = Some((iova, f));
                entry.failed_since_mapped = true;
            }
        }
    }
}

impl Drop for P2pTable {
    /// Leaves nothing in the IOMMU (teardown without `remove_device` for each device).
    fn drop(&mut self) {
        let devices: BTreeSet<DeviceKey> = self.lock().devices.keys().copied().collect();
        for device in devices {
            self.remove_device(device);
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Unaligned => f.write_str("not page-aligned"),
            Failure::OutsideWindows => f.write_str("outside the guest MMIO windows"),
            Failure::BeyondIommu { max_iova } => {
                write!(f, "beyond the host IOMMU's reach (max IOVA {max_iova:#x})")
            }
            Failure::IommuHole => f.write_str("in a reserved hole of the host IOMMU's IOVA ranges"),
            Failure::Overlap => f.write_str("another BAR is mapped there"),
            Failure::Unbacked(why) | Failure::Iommu(why) => f.write_str(why),
            Failure::Revoked => f.write_str("dmabuf revoked"),
        }
    }
}

#[path = "p2p_revoke.rs"]
mod revoke;

#[cfg(test)]
#[path = "p2p_test.rs"]
mod tests;
