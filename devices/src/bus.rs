//! Address-range dispatch for port I/O and MMIO exits.
//!
//! Each bus maps non-overlapping ranges to devices. vCPU threads look up the device for an exit
//! and call it; ranges can be added and removed while the guest runs (hotplug, BAR moves), so the
//! map sits behind a `RwLock` that readers share.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable through a bus. `offset` is relative to the start of the range it was
/// inserted with, so a device does not need to know where the guest placed it.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`. Unbacked bytes should read as all-ones.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A half-open address range `[base, base + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BusRange {
    pub base: u64,
    pub len: u64,
}

impl BusRange {
    pub fn new(base: u64, len: u64) -> Self {
        Self { base, len }
    }

    /// One past the last address, saturating so that a range ending at `u64::MAX` is legal.
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.len)
    }

    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.end()
    }

    pub fn overlaps(&self, other: &BusRange) -> bool {
        self.base < other.end() && other.base < self.end()
    }
}

impl fmt::Display for BusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..{:#x}", self.base, self.end())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {0} is empty")]
    EmptyRange(BusRange),
    #[error("bus range {new} overlaps {existing}")]
    Overlap { new: BusRange, existing: BusRange },
    #[error("no device at bus range {0}")]
    NotFound(BusRange),
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// One address space (port I/O or MMIO) of the guest.
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<u64, (BusRange, SharedDevice)>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `device` answer for `range`. Fails without changing the bus if the range is empty or
    /// overlaps a range already present.
    pub fn insert(&self, range: BusRange, device: SharedDevice) -> Result<(), BusError> {
        if range.len == 0 {
            return Err(BusError::EmptyRange(range));
        }
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        // Only the nearest range below and the ranges starting inside `range` can overlap it.
        let below = devices.range(..range.base).next_back().map(|(_, v)| v.0);
        let inside = devices
            .range(range.base..range.end())
            .next()
            .map(|(_, v)| v.0);
        if let Some(existing) = below.into_iter().chain(inside).find(|r| r.overlaps(&range)) {
            return Err(BusError::Overlap {
                new: range,
                existing,
            });
        }
        devices.insert(range.base, (range, device));
        Ok(())
    }

    /// Removes the device registered at exactly `range`.
    pub fn remove(&self, range: BusRange) -> Result<SharedDevice, BusError> {
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        match devices.get(&range.base) {
            Some((r, _)) if *r == range => Ok(devices
                .remove(&range.base)
                .map(|(_, d)| d)
                .ok_or(BusError::NotFound(range))?),
            _ => Err(BusError::NotFound(range)),
        }
    }

    /// The device covering `addr` and the offset of `addr` inside its range.
    fn resolve(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let devices = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let (_, (range, device)) = devices.range(..=addr).next_back()?;
        range
            .contains(addr)
            .then(|| (addr - range.base, Arc::clone(device)))
    }

    /// Dispatches a guest read. Returns false (and fills `data` with ones) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a guest write. Returns false when nothing is there (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last access so tests can check the offset the bus computed.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_with_range_relative_offset() {
        let bus = Bus::new();
        let probe = Arc::new(Mutex::new(Probe::default()));
        bus.insert(BusRange::new(0x3f8, 8), probe.clone()).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2]);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(probe.lock().unwrap().last_write, Some((7, vec![7])));
    }

    #[test]
    fn unbacked_reads_return_ones() {
        let bus = Bus::new();
        bus.insert(
            BusRange::new(0x10, 4),
            Arc::new(Mutex::new(Probe::default())),
        )
        .unwrap();
        let mut data = [0u8; 2];
        assert!(!bus.read(0x14, &mut data));
        assert_eq!(data, [0xff, 0xff]);
        assert!(!bus.write(0xf, &[1]));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Probe::default()));
        bus.insert(BusRange::new(0x100, 0x10), dev()).unwrap();
        for (base, len) in [(0xf8, 0x10), (0x108, 1), (0x10f, 0x100), (0x0, 0x1000)] {
            let err = bus.insert(BusRange::new(base, len), dev()).unwrap_err();
            assert!(
                matches!(err, BusError::Overlap { .. }),
                "{base:#x}+{len:#x}"
            );
        }
        bus.insert(BusRange::new(0x110, 1), dev()).unwrap();
        bus.insert(BusRange::new(0xff, 1), dev()).unwrap();
        assert_eq!(
            bus.insert(BusRange::new(0x200, 0), dev()).unwrap_err(),
            BusError::EmptyRange(BusRange::new(0x200, 0))
        );
    }

    #[test]
    fn remove_needs_the_exact_range() {
        let bus = Bus::new();
        bus.insert(
            BusRange::new(0x100, 0x10),
            Arc::new(Mutex::new(Probe::default())),
        )
        .unwrap();
        assert!(bus.remove(BusRange::new(0x100, 0x8)).is_err());
        assert!(bus.remove(BusRange::new(0x100, 0x10)).is_ok());
        assert!(!bus.write(0x100, &[0]));
    }
}
