//! PCI config space as the guest reaches it: ECAM MMIO and 0xCF8/0xCFC port accesses of width
//! 1, 2, 4 and 8 at any offset, through the real buses, `PciEcam`, `PciConfigIo` and
//! `PciSegment`, into the real topology (host bridge, a root port, a switch with a hotplug
//! slot) with three passthrough functions over fake host devices in two P2P groups, each a
//! real `P2pTable` over a `FakeIommu`; mixed with hot add/remove and host resets.
//!
//! The VM is the model test's (`devices/tests/p2p_model/platform.rs`, included as is), so the
//! fakes check what they check there: `FakeIommu` panics on overlapping mappings (guest RAM is
//! mapped in both domains), on mapping a revoked dmabuf or one of a device outside the domain,
//! and on an unmap that names no mapping; the observer panics when the P2P table refuses a
//! BAR move. Checked here as well: a read fills exactly the requested width; a read the segment
//! cannot serve (8 bytes, across a dword) reads all-ones; a 2- or 4-byte read equals its bytes
//! read one at a time; nothing of a departed function stays mapped; a BAR mapping lies inside
//! the P2P windows.

#![no_main]

#[allow(
    dead_code,
    reason = "shared with the p2p_model test, which uses all of it"
)]
#[path = "../../../devices/tests/p2p_model/platform.rs"]
mod platform;

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use devices::pci::{PciConfigIo, PciEcam};
use devices::{Bus, BusRange};
use libfuzzer_sys::fuzz_target;
use p2pvmm_fuzz::Width;
use platform::{host_windows, layout, Vm, HOT_INDEX};
use vfio_p2p::fake::FakeSource;
use vfio_p2p::DmaKind;

const CF8: u64 = 0xcf8;

#[derive(Arbitrary, Debug)]
enum Op {
    /// An ECAM access. Buses 0-7 are the populated ones; `wide_bus` reaches the rest.
    Ecam {
        bus: u8,
        wide_bus: bool,
        devfn: u8,
        reg: u16,
        width: Width,
        value: u64,
        write: bool,
    },
    /// Any access to ports 0xCF8..0xD00 (the latch, the data window, and odd widths on both).
    Port {
        port: u8,
        width: Width,
        value: u64,
        write: bool,
    },
    /// A latch write addressing a function as firmware would (then use `Port` for data).
    Latch {
        bus: u8,
        devfn: u8,
        reg: u16,
    },
    HotAdd,
    HotRemove,
    /// A host reset of one passthrough function (what a guest FLR turns into).
    HostReset(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Whether the observer refuses overlapping BARs as the VMM does (the model test's switch).
    reject: bool,
    ops: Vec<Op>,
}

struct Platform {
    vm: Vm,
    mmio: Bus,
    pio: Bus,
}

impl Platform {
    fn new(reject: bool) -> Self {
        let vm = Vm::new(reject);
        let mmio = Bus::new();
        let pio = Bus::new();
        let ecam = Arc::new(Mutex::new(PciEcam::new(vm.root.segment().clone())));
        mmio.insert(layout().ecam, ecam)
            .expect("ECAM on an empty bus");
        let io = Arc::new(Mutex::new(PciConfigIo::new(vm.root.segment().clone())));
        pio.insert(BusRange::new(CF8, PciConfigIo::LEN), io)
            .expect("0xCF8 on an empty bus");
        Self { vm, mmio, pio }
    }

    /// A read of `width` at `addr`, checked against the same bytes read one by one.
    fn read(&self, bus: &Bus, addr: u64, width: Width, dword_rules: bool) {
        let mut data = vec![0x5a; 16];
        let served = bus.read(addr, &mut data[..width.bytes()]);
        assert!(
            data[width.bytes()..].iter().all(|&b| b == 0x5a),
            "a read of {} bytes wrote past them",
            width.bytes()
        );
        let data = &data[..width.bytes()];
        let in_dword = (addr & 3) as usize + width.bytes() <= 4;
        if !served || (dword_rules && !in_dword) {
            assert!(
                data.iter().all(|&b| b == 0xff),
                "{addr:#x}: unserved {}-byte read is {data:02x?}",
                width.bytes()
            );
        } else if dword_rules && width.bytes() > 1 {
            let bytes: Vec<u8> = (0..width.bytes() as u64)
                .map(|i| {
                    let mut b = [0];
                    bus.read(addr + i, &mut b);
                    b[0]
                })
                .collect();
            assert_eq!(data, bytes, "{addr:#x}: read differs from its bytes");
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Ecam {
                bus,
                wide_bus,
                devfn,
                reg,
                width,
                value,
                write,
            } => {
                let bus = if wide_bus { bus } else { bus % 8 };
                let offset = u64::from(bus) << 20 | u64::from(devfn) << 12 | u64::from(reg & 0xfff);
                let addr = layout().ecam.base + offset;
                if write {
                    self.mmio.write(addr, &value.to_le_bytes()[..width.bytes()]);
                } else {
                    self.read(&self.mmio, addr, width, true);
                }
            }
            Op::Port {
                port,
                width,
                value,
                write,
            } => {
                let addr = CF8 + u64::from(port % 8);
                if write {
                    self.pio.write(addr, &value.to_le_bytes()[..width.bytes()]);
                } else {
                    // The latch (0xCF8, dword) reads back; byte rules apply to the data window.
                    self.read(&self.pio, addr, width, addr >= CF8 + 4);
                }
            }
            Op::Latch { bus, devfn, reg } => {
                let bus = bus % 8;
                let latch = 1u32 << 31
                    | u32::from(reg & 0xf00) << 16
                    | u32::from(bus) << 16
                    | u32::from(devfn) << 8
                    | u32::from(reg & 0xfc);
                self.pio.write(CF8, &latch.to_le_bytes());
            }
            Op::HotAdd => self.vm.hot_add(),
            Op::HotRemove => self.vm.hot_remove(),
            Op::HostReset(which) => {
                let slot = usize::from(which) % (HOT_INDEX + 1);
                if let Some(present) = &self.vm.devices[slot] {
                    present.host.lock().expect("host function").host_reset();
                }
            }
        }
    }

    /// What no sequence may leave in either IOMMU domain.
    fn check(&self) {
        let windows = host_windows();
        for group in &self.vm.groups {
            for m in group.fake.live() {
                if m.kind != DmaKind::DeviceBar {
                    continue;
                }
                let inside = windows
                    .iter()
                    .any(|w| m.iova >= w.start && m.iova + m.size - 1 <= w.last);
                assert!(
                    inside,
                    "{}: BAR mapping outside the windows: {m:?}",
                    group.name
                );
                if let FakeSource::File { dev, ino, .. } = m.source {
                    assert!(
                        !self.vm.departed.contains(&(dev, ino)),
                        "{}: a departed function's BAR is still mapped: {m:?}",
                        group.name
                    );
                }
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let mut platform = Platform::new(input.reject);
    for op in input.ops.iter().take(256) {
        platform.apply(op);
        platform.check();
    }
});
