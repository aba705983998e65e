//! The host function's expansion ROM as the guest sees it: VFIO region 6 behind an emulated ROM
//! BAR. The ROM BAR is a power of two of at least 2 KiB, so it can be larger than the region; the
//! tail reads as 0xff, like an erased ROM. Read-only: the guest cannot write a ROM.
//!
//! Guest reads trap and are served from a copy taken once when the device is set up: a read of
//! VFIO's ROM region makes the host kernel map and unmap the ROM each time, and neither a read
//! nor a ROM enable by the guest then touches the host kernel at all (see README: L1 hung a few
//! times while L2 read a ROM through KVM slots or through per-read region reads).

use std::sync::Arc;

use vfio_p2p::DeviceError;

use super::probe::ConfigSource;
use crate::pci::config::ROM_MIN_SIZE;

/// A host ROM region and the size of the ROM BAR that shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfioRom {
    /// Size of VFIO region 6.
    host_size: u64,
    /// The region's bytes, once [`cached`](Self::cached).
    copy: Option<Arc<[u8]>>,
}

impl VfioRom {
    /// `None` when the host function has no ROM (`host_size` 0).
    pub fn new(host_size: u64) -> Option<Self> {
        (host_size > 0).then_some(Self {
            host_size,
            copy: None,
        })
    }

    /// Reads the whole host region once; later reads come from the copy. If the region cannot
    /// be read, reads keep going to the host.
    pub fn cached(mut self, host: &dyn ConfigSource) -> Result<Self, (Self, DeviceError)> {
        let Ok(len) = usize::try_from(self.host_size) else {
            return Ok(self);
        };
        let mut bytes = vec![0xff; len];
        match host.read_rom(0, &mut bytes) {
            Ok(()) => {
                self.copy = Some(bytes.into());
                Ok(self)
            }
            Err(e) => Err((self, e)),
        }
    }

    /// The ROM BAR's size: the host region rounded up to a power of two, at least 2 KiB.
    pub fn bar_size(&self) -> u64 {
        self.host_size.next_power_of_two().max(ROM_MIN_SIZE)
    }

    /// Guest read of `data.len()` bytes at `offset` into the ROM BAR: the part inside the host
    /// region comes from it, the rest reads as 0xff. On a host error `data` reads as all-ones.
    pub fn read(
        &self,
        host: &dyn ConfigSource,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), DeviceError> {
        let inside = self.host_size.saturating_sub(offset).min(data.len() as u64) as usize;
        let (head, tail) = data.split_at_mut(inside);
        tail.fill(0xff);
        if head.is_empty() {
            return Ok(());
        }
        if let Some(copy) = &self.copy {
            // `inside > 0` means `offset < host_size`, the copy's length.
            let start = offset as usize;
            head.copy_from_slice(&copy[start..start + head.len()]);
            return Ok(());
        }
        host.read_rom(offset, head).inspect_err(|_| head.fill(0xff))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host function whose ROM region holds `bytes`; `fail` makes reads fail.
    struct FakeRom {
        bytes: Vec<u8>,
        fail: bool,
    }

    impl FakeRom {
        fn new(len: usize) -> Self {
            Self {
                bytes: (0..len).map(|i| (i % 251) as u8).collect(),
                fail: false,
            }
        }
    }

    impl ConfigSource for FakeRom {
        fn read(&self, _offset: u16, _buf: &mut [u8]) -> Result<(), DeviceError> {
            unreachable!("ROM reads do not touch config space")
        }

        fn region_size(&self, _index: u32) -> u64 {
            self.bytes.len() as u64
        }

        fn read_rom(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
            let at = offset as usize;
            match self.bytes.get(at..at + buf.len()) {
                Some(src) if !self.fail => {
                    buf.copy_from_slice(src);
                    Ok(())
                }
                _ => Err(DeviceError::OutOfRange {
                    bdf: "0000:00:03.0".parse().unwrap(),
                    region: vfio_p2p::ROM_REGION,
                    offset,
                    len: buf.len() as u64,
                }),
            }
        }
    }

    #[test]
    fn no_region_no_rom() {
        assert_eq!(VfioRom::new(0), None);
    }

    #[test]
    fn bar_size_is_a_power_of_two_of_at_least_2k() {
        assert_eq!(VfioRom::new(0x1_0000).unwrap().bar_size(), 0x1_0000);
        assert_eq!(VfioRom::new(0x9000).unwrap().bar_size(), 0x1_0000);
        assert_eq!(VfioRom::new(0x200).unwrap().bar_size(), 0x800);
    }

    #[test]
    fn reads_come_from_the_host_region() {
        let host = FakeRom::new(0x9000);
        let rom = VfioRom::new(0x9000).unwrap();
        let mut data = [0; 4];
        rom.read(&host, 0x1fe, &mut data).unwrap();
        assert_eq!(
            data,
            [0x1fe % 251, 0x1ff % 251, 0x200 % 251, 0x201 % 251].map(|v| v as u8)
        );
    }

    #[test]
    fn the_tail_past_the_host_region_reads_as_erased() {
        let host = FakeRom::new(0x9000);
        let rom = VfioRom::new(0x9000).unwrap();
        let mut straddling = [0; 4];
        rom.read(&host, 0x8ffe, &mut straddling).unwrap();
        assert_eq!(
            straddling,
            [0x8ffe % 251, 0x8fff % 251, 0xff, 0xff].map(|v| v as u8)
        );
        let mut beyond = [0; 4];
        rom.read(&host, 0xfffc, &mut beyond).unwrap();
        assert_eq!(beyond, [0xff; 4]);
    }

    #[test]
    fn a_cached_rom_reads_from_its_copy_without_the_host() {
        let mut host = FakeRom::new(0x9000);
        let rom = VfioRom::new(0x9000).unwrap().cached(&host).unwrap();
        host.fail = true;
        let mut data = [0; 4];
        rom.read(&host, 0x8ffe, &mut data).unwrap();
        assert_eq!(
            data,
            [0x8ffe % 251, 0x8fff % 251, 0xff, 0xff].map(|v| v as u8)
        );
        let failing = VfioRom::new(0x800).unwrap().cached(&host);
        assert!(
            failing.is_err(),
            "a region that cannot be read is not cached"
        );
    }

    #[test]
    fn a_failed_host_read_reads_as_all_ones() {
        let host = FakeRom {
            fail: true,
            ..FakeRom::new(0x800)
        };
        let rom = VfioRom::new(0x800).unwrap();
        let mut data = [0; 4];
        assert!(rom.read(&host, 0, &mut data).is_err());
        assert_eq!(data, [0xff; 4]);
    }
}
