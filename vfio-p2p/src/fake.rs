//! `FakeIommu`: an [`IommuBackend`] that records what it is asked and panics when the caller
//! breaks an invariant the real kernels would punish quietly or late.
//!
//! It models the parts of the kernel the P2P table depends on: dmabufs belong to a device and
//! are revoked while its memory decoding is off (a map then is a caller bug: the table must
//! not map a revoked dmabuf), revoked areas keep their IOVA until unmapped, mappings never
//! overlap, and an unmap must name exactly one earlier mapping. One fake is one P2P domain:
//! mapping a dmabuf of a device not [attached](FakeIommu::attach) to it is a caller bug the
//! kernel would let through (a device outside the group reaching into it, or the group
//! reaching an outsider's BAR). It also mirrors each backend's
//! refusals (type1 needs a host address; iommufd cannot map a BAR by address) and can be told
//! to fail the next maps, to test the warning paths.
//!
//! Built for this crate's tests and, with the `fake` feature, for other crates' tests.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::device::DeviceKey;
use crate::iommu::{
    BackendKind, Backing, DmaKind, DmaMapRequest, IommuBackend, IommuError, IovaRange,
};

/// Where a recorded mapping's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeSource {
    /// A file, by identity (`st_dev`, `st_ino`) and offset.
    File {
        dev: u64,
        ino: u64,
        offset: u64,
    },
    HostVa(u64),
}

/// One live mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FakeMapping {
    pub iova: u64,
    pub size: u64,
    pub kind: DmaKind,
    pub source: FakeSource,
    pub writable: bool,
    /// Its dmabuf was revoked (decode off): no translation, but the IOVA is still taken.
    pub revoked: bool,
}

/// One call, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeEvent {
    Map { iova: u64, size: u64, kind: DmaKind },
    Unmap { iova: u64, size: u64 },
}

#[derive(Default)]
struct State {
    live: BTreeMap<u64, FakeMapping>,
    events: Vec<FakeEvent>,
    /// dmabuf identity → owning device.
    dmabufs: HashMap<(u64, u64), DeviceKey>,
    /// Memory decoding per device; off until set, as after power-on.
    decode: HashMap<DeviceKey, bool>,
    /// The devices of this domain.
    members: HashSet<DeviceKey>,
    fail_next: Vec<i32>,
    /// `iova_ranges` fails (ENOTTY), as on a kernel that cannot say.
    ranges_unknown: bool,
}

/// A recording, invariant-checking IOMMU.
pub struct FakeIommu {
    kind: BackendKind,
    ranges: Vec<IovaRange>,
    state: Mutex<State>,
}

fn identity(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let meta = File::from(fd.try_clone_to_owned()?).metadata()?;
    Ok((meta.dev(), meta.ino()))
}

impl FakeIommu {
    /// A fake of the given backend kind translating every IOVA.
    pub fn new(kind: BackendKind) -> Self {
        Self::with_ranges(
            kind,
            vec![IovaRange {
                start: 0,
                last: u64::MAX,
            }],
        )
    }

    /// A fake reporting these valid IOVA ranges (maps outside them fail with `EINVAL`).
    pub fn with_ranges(kind: BackendKind, ranges: Vec<IovaRange>) -> Self {
        Self {
            kind,
            ranges,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts `device` in this domain: only members' dmabufs may be mapped.
    pub fn attach(&self, device: DeviceKey) {
        self.lock().members.insert(device);
    }

    /// Declares `fd` a dmabuf exported from `owner`'s BAR, so its maps follow `owner`'s
    /// decode state.
    pub fn register_dmabuf(&self, fd: BorrowedFd<'_>, owner: DeviceKey) {
        let id = identity(fd).expect("fstat of a dmabuf stand-in");
        self.lock().dmabufs.insert(id, owner);
    }

    /// The device's memory decoding changed (the guest's command-register write reached it).
    /// Turning it off revokes the device's live dmabuf mappings, as VFIO does.
    pub fn set_decode(&self, owner: DeviceKey, enabled: bool) {
        let mut state = self.lock();
        state.decode.insert(owner, enabled);
        let revoked: Vec<(u64, u64)> = state
            .dmabufs
            .iter()
            .filter(|(_, o)| **o == owner)
            .map(|(id, _)| *id)
            .collect();
        for m in state.live.values_mut() {
            if let FakeSource::File { dev, ino, .. } = m.source {
                if !enabled && revoked.contains(&(dev, ino)) {
                    m.revoked = true;
                }
            }
        }
    }

    /// Makes the next map calls fail with these errnos, in order.
    pub fn fail_next_maps(&self, errnos: &[i32]) {
        let mut state = self.lock();
        state.fail_next = errnos.iter().rev().copied().collect();
    }

    /// Every call so far, in order.
    pub fn events(&self) -> Vec<FakeEvent> {
        self.lock().events.clone()
    }

    /// Returns and forgets the calls so far.
    pub fn take_events(&self) -> Vec<FakeEvent> {
        std::mem::take(&mut self.lock().events)
    }

    /// The live mappings, by IOVA.
    pub fn live(&self) -> Vec<FakeMapping> {
        self.lock().live.values().copied().collect()
    }

    /// Makes `iova_ranges` fail from now on: the table cannot check a placement against the
    /// ranges and the map's own refusal (`EINVAL` outside them) is all it gets.
    pub fn hide_ranges(&self) {
        self.lock().ranges_unknown = true;
    }

    /// The live mapping starting at `iova`.
    pub fn live_at(&self, iova: u64) -> Option<FakeMapping> {
        self.lock().live.get(&iova).copied()
    }

    fn refuse(&self, req: &DmaMapRequest<'_>, errno: i32) -> IommuError {
        IommuError::Map {
            backend: self.kind,
            kind: req.kind,
            iova: req.iova,
            size: req.size,
            source: io::Error::from_raw_os_error(errno),
        }
    }
}

impl IommuBackend for FakeIommu {
    fn kind(&self) -> BackendKind {
        self.kind
    }

    unsafe fn map(&self, req: &DmaMapRequest<'_>) -> Result<(), IommuError> {
        req.validate()?;
        let source = match (self.kind, req.backing) {
            (BackendKind::Type1, Backing::File { host_va: None, .. }) => {
                return Err(IommuError::NeedsHostVa {
                    kind: req.kind,
                    iova: req.iova,
                })
            }
            (
                BackendKind::Type1,
                Backing::File {
                    host_va: Some(va), ..
                },
            ) => FakeSource::HostVa(va),
            // GUP refuses VM_PFNMAP: a BAR cannot go into an IOAS by address.
            (BackendKind::Iommufd, Backing::HostVa(_)) if req.kind == DmaKind::DeviceBar => {
                return Err(self.refuse(req, libc::EFAULT))
            }
            (BackendKind::Iommufd, Backing::File { fd, offset, .. }) => {
                let (dev, ino) = identity(fd)
                    .unwrap_or_else(|e| panic!("map of IOVA {:#x} with a dead fd: {e}", req.iova));
                FakeSource::File { dev, ino, offset }
            }
            (_, Backing::HostVa(va)) => FakeSource::HostVa(va),
        };
        let mut state = self.lock();
        if let Some(errno) = state.fail_next.pop() {
            drop(state);
            return Err(self.refuse(req, errno));
        }
        if !crate::iommu::ranges_cover(&self.ranges, req.iova, req.size) {
            drop(state);
            return Err(self.refuse(req, libc::EINVAL));
        }
        let end = req.iova + req.size;
        if let Some(other) = state
            .live
            .values()
            .find(|m| m.iova < end && req.iova < m.iova + m.size)
        {
            panic!(
                "map of {} at [{:#x}, +{:#x}) overlaps the live {} mapping at [{:#x}, +{:#x})",
                req.kind, req.iova, req.size, other.kind, other.iova, other.size
            );
        }
        if let FakeSource::File { dev, ino, .. } = source {
            if let Some(owner) = state.dmabufs.get(&(dev, ino)) {
                assert!(
                    state.members.contains(owner),
                    "map of a dmabuf of {owner} at IOVA {:#x} into a domain it is not attached to",
                    req.iova
                );
                let decoding = state.decode.get(owner).copied().unwrap_or(false);
                assert!(
                    decoding,
                    "map of a dmabuf of {owner} at IOVA {:#x} while its memory decoding is off \
                     (revoked: the kernel would fail it with ENODEV)",
                    req.iova
                );
            }
        }
        state.events.push(FakeEvent::Map {
            iova: req.iova,
            size: req.size,
            kind: req.kind,
        });
        state.live.insert(
            req.iova,
            FakeMapping {
                iova: req.iova,
                size: req.size,
                kind: req.kind,
                source,
                writable: req.writable,
                revoked: false,
            },
        );
        Ok(())
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), IommuError> {
        let mut state = self.lock();
        match state.live.get(&iova) {
            Some(m) if m.size == size => {}
            Some(m) => panic!(
                "unmap of [{iova:#x}, +{size:#x}) does not match the mapping there (+{:#x})",
                m.size
            ),
            None => panic!("unmap of [{iova:#x}, +{size:#x}), which is not mapped"),
        }
        state.live.remove(&iova);
        state.events.push(FakeEvent::Unmap { iova, size });
        Ok(())
    }

    fn iova_ranges(&self) -> Result<Vec<IovaRange>, IommuError> {
        if self.lock().ranges_unknown {
            return Err(IommuError::IovaRanges {
                backend: self.kind,
                source: io::Error::from_raw_os_error(libc::ENOTTY),
            });
        }
        Ok(self.ranges.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::io::pipe;
    use std::os::fd::AsFd;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn dev(n: u64) -> DeviceKey {
        DeviceKey::Cdev { dev: 0x2d, ino: n }
    }

    /// A 1 MiB peer-BAR map of dmabuf `fd` at 0xe0000000.
    fn bar_request(fd: BorrowedFd<'_>) -> DmaMapRequest<'_> {
        DmaMapRequest {
            iova: 0xe000_0000,
            size: MIB,
            kind: DmaKind::DeviceBar,
            backing: Backing::File {
                fd,
                offset: 0,
                host_va: None,
            },
            writable: true,
        }
    }

    #[test]
    #[should_panic(expected = "memory decoding is off")]
    fn the_fake_catches_a_map_of_a_revoked_dmabuf() {
        let fake = FakeIommu::new(BackendKind::Iommufd);
        let (_reader, writer) = pipe().unwrap();
        fake.register_dmabuf(writer.as_fd(), dev(1));
        fake.attach(dev(1));
        // SAFETY: the fake maps nothing.
        let _ = unsafe { fake.map(&bar_request(writer.as_fd())) };
    }

    #[test]
    #[should_panic(expected = "overlaps")]
    fn the_fake_catches_overlapping_maps() {
        let fake = FakeIommu::new(BackendKind::Type1);
        let req = |iova| DmaMapRequest {
            iova,
            size: MIB,
            kind: DmaKind::Ram,
            backing: Backing::HostVa(0x7f00_0000_0000),
            writable: true,
        };

        // SAFETY: the fake maps nothing.
        unsafe {
            fake.map(&req(0)).unwrap();
            let _ = fake.map(&req(MIB / 2));
        }
    }

    #[test]
    #[should_panic(expected = "not mapped")]
    fn the_fake_catches_an_unmap_of_nothing() {
        let _ = FakeIommu::new(BackendKind::Iommufd).unmap(0xe000_0000, MIB);
    }

    #[test]
    #[should_panic(expected = "not attached")]
    fn the_fake_catches_a_map_of_another_domains_bar() {
        let fake = FakeIommu::new(BackendKind::Iommufd);
        let (_reader, writer) = pipe().unwrap();
        fake.register_dmabuf(writer.as_fd(), dev(1));
        fake.set_decode(dev(1), true);
        fake.attach(dev(2));
        // SAFETY: the fake maps nothing.
        let _ = unsafe { fake.map(&bar_request(writer.as_fd())) };
    }
}
