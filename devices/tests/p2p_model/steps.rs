//! Guest (and VMM) actions as proptest strategies, and how each is applied to the VM: config
//! writes go through `PciSegment::config_write`, the path every ECAM and 0xCF8 access takes;
//! resets and hotplug through the calls the VMM makes for them.
//!
//! Steps name functions, BARs and targets by small indices resolved when applied (modulo what
//! exists then), so every generated sequence is valid whatever state earlier steps left, and
//! shrinking keeps sequences meaningful.

use devices::pci::regs::{
    BRIDGE_CONTROL, BRIDGE_CTL_BUS_RESET, COMMAND, COMMAND_IO, COMMAND_MASTER, COMMAND_MEMORY,
    ROM_ADDRESS,
};
use devices::pci::{BarKind, Bdf};
use proptest::prelude::*;

use crate::model::{address_of, Writes};
use crate::platform::{layout, Vm, GIB, HOT_INDEX, RAM};

/// Where to aim a BAR (or the ROM).
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// Inside the window of the port above the function (the prefetchable one for
    /// prefetchable BARs): `n` picks the aligned slot.
    OwnWindow(u64),
    /// Anywhere in the 32-bit or 64-bit host window (possibly outside the port's window).
    HostWindow(bool, u64),
    /// Into guest RAM.
    Ram(usize, u64),
    /// At the current address of another function's (or the same one's) BAR.
    OtherBar(usize, usize),
    /// Outside every window: ECAM, the LAPIC page, the gap above RAM, far above the 64-bit
    /// window, straddling the start or end of a window.
    Outside(usize),
    /// Address 0 (unassigned).
    Zero,
    /// Any value.
    Raw(u64),
}

/// In which order the two registers of a 64-bit BAR are written, and with what accesses.
#[derive(Clone, Copy, Debug)]
pub enum Split {
    /// One dword per register, low first.
    LowFirst,
    HighFirst,
    /// Two 16-bit writes per register, high register first.
    Words,
    /// Byte writes, high register first, each register from its top byte down.
    BytesDown,
}

#[derive(Clone, Debug)]
pub enum Step {
    /// A raw write of `width` bytes at byte `byte` of BAR/ROM register `reg` (6 = ROM) or of the
    /// command register (7).
    Raw {
        dev: usize,
        reg: usize,
        byte: usize,
        width: usize,
        value: u32,
    },
    /// Moves a BAR to `target`.
    Place {
        dev: usize,
        bar: usize,
        target: Target,
        split: Split,
    },
    /// Writes all-ones to a BAR's register(s) (in `split`'s order), then, if `restore`, writes
    /// back what it read before.
    Size {
        dev: usize,
        bar: usize,
        split: Split,
        restore: bool,
    },
    /// The command register, with 1 or 2 byte writes.
    Command {
        dev: usize,
        memory: bool,
        io: bool,
        byte_write: bool,
    },
    /// The expansion ROM: address (or left alone) and enable.
    Rom {
        dev: usize,
        target: Option<Target>,
        enable: bool,
    },
    /// A host reset through `P2pTable::device_reset` (guest FLR, VMM-initiated reset).
    Flr {
        dev: usize,
    },
    /// Secondary bus reset on the port above a function (set, then clear the bit).
    BusReset {
        dev: usize,
    },
    HotAdd,
    HotRemove,
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        3 => any::<u64>().prop_map(Target::OwnWindow),
        2 => (any::<bool>(), any::<u64>()).prop_map(|(w, n)| Target::HostWindow(w, n)),
        1 => (0..RAM.len(), any::<u64>()).prop_map(|(r, n)| Target::Ram(r, n)),
        2 => (0..4usize, 0..6usize).prop_map(|(d, b)| Target::OtherBar(d, b)),
        1 => (0..OUTSIDE.len()).prop_map(Target::Outside),
        1 => Just(Target::Zero),
        1 => any::<u64>().prop_map(Target::Raw),
    ]
}

fn split() -> impl Strategy<Value = Split> {
    prop_oneof![
        Just(Split::LowFirst),
        Just(Split::HighFirst),
        Just(Split::Words),
        Just(Split::BytesDown),
    ]
}

/// A valid access inside one dword: (byte, width).
fn access() -> impl Strategy<Value = (usize, usize)> {
    prop_oneof![
        Just((0, 4)),
        (0..3usize).prop_map(|b| (b, 2)),
        (0..4usize).prop_map(|b| (b, 1)),
    ]
}

fn raw_value() -> impl Strategy<Value = u32> {
    prop_oneof![
        2 => any::<u32>(),
        1 => Just(u32::MAX),
        1 => Just(0u32),
        1 => Just(COMMAND_MEMORY as u32),
    ]
}

pub fn step() -> impl Strategy<Value = Step> {
    let dev = 0..4usize;
    prop_oneof![
        3 => (dev.clone(), 0..8usize, access(), raw_value()).prop_map(
            |(dev, reg, (byte, width), value)| Step::Raw { dev, reg, byte, width, value }
        ),
        6 => (dev.clone(), 0..6usize, target(), split())
            .prop_map(|(dev, bar, target, split)| Step::Place { dev, bar, target, split }),
        2 => (dev.clone(), 0..6usize, split(), any::<bool>())
            .prop_map(|(dev, bar, split, restore)| Step::Size { dev, bar, split, restore }),
        4 => (dev.clone(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            |(dev, memory, io, byte_write)| Step::Command { dev, memory, io, byte_write }
        ),
        2 => (dev.clone(), proptest::option::of(target()), any::<bool>())
            .prop_map(|(dev, target, enable)| Step::Rom { dev, target, enable }),
        1 => dev.clone().prop_map(|dev| Step::Flr { dev }),
        1 => dev.clone().prop_map(|dev| Step::BusReset { dev }),
        1 => Just(Step::HotAdd),
        1 => Just(Step::HotRemove),
    ]
}

/// Addresses outside every window (and over their edges).
const OUTSIDE: [u64; 7] = [
    0xe000_0000,         // ECAM
    0xfee0_0000,         // LAPIC
    0xf000_0000,         // above ECAM, below 4 GiB
    6 * GIB - (1 << 30), // straddles RAM and the 64-bit window for BARs over 1 GiB
    0xdff0_0000,         // straddles the end of the 32-bit window
    262 * GIB,           // the end of the 64-bit window
    1 << 46,             // far above
];

/// Applies `step`, keeping `writes` (the model's record of guest writes) in line.
pub fn apply(vm: &mut Vm, writes: &mut Writes, step: &Step) {
    match *step {
        Step::Raw {
            dev,
            reg,
            byte,
            width,
            value,
        } => {
            let offset = match reg {
                0..=5 => 0x10 + 4 * reg as u16,
                6 => ROM_ADDRESS,
                _ => COMMAND,
            } + byte as u16;
            let data = value.to_le_bytes();
            write(vm, writes, dev, offset, &data[..width]);
        }
        Step::Place {
            dev,
            bar,
            target,
            split,
        } => {
            let Some((index, kind, size, pref)) = pick_bar(vm, dev, bar) else {
                return;
            };
            let address = resolve(vm, dev, target, size, pref || kind == BarKind::Mem64);
            write_bar(vm, writes, dev, index, kind, address, split);
        }
        Step::Size {
            dev,
            bar,
            split,
            restore,
        } => {
            let Some((index, kind, _, _)) = pick_bar(vm, dev, bar) else {
                return;
            };
            let old = address_of(vm, dev, index).unwrap_or(0);
            let low_flags = read32(vm, dev, 0x10 + 4 * index as u16) & 0xf;
            write_raw_bar(vm, writes, dev, index, kind, u64::MAX, split);
            if restore {
                write_raw_bar(
                    vm,
                    writes,
                    dev,
                    index,
                    kind,
                    old | u64::from(low_flags),
                    split,
                );
            }
        }
        Step::Command {
            dev,
            memory,
            io,
            byte_write,
        } => {
            let mut command = COMMAND_MASTER;
            if memory {
                command |= COMMAND_MEMORY;
            }
            if io {
                command |= COMMAND_IO;
            }
            let data = command.to_le_bytes();
            let len = if byte_write { 1 } else { 2 };
            write(vm, writes, dev, COMMAND, &data[..len]);
        }
        Step::Rom {
            dev,
            target,
            enable,
        } => {
            let Some(size) = vm.devices[dev].as_ref().and_then(|d| d.spec.rom) else {
                return;
            };
            let old = read32(vm, dev, ROM_ADDRESS) & !1;
            let address = target.map_or(u64::from(old), |t| resolve(vm, dev, t, size, false));
            let value = (address as u32 & !0x7ff) | u32::from(enable);
            write(vm, writes, dev, ROM_ADDRESS, &value.to_le_bytes());
        }
        Step::Flr { dev } => {
            if let Some(d) = &vm.devices[dev] {
                d.host.lock().unwrap().host_reset();
            }
        }
        Step::BusReset { dev } => {
            let Some(d) = &vm.devices[dev] else { return };
            let port_bdf = port_bdf(vm, &d.port);
            let segment = vm.root.segment().clone();
            let on = BRIDGE_CTL_BUS_RESET.to_le_bytes();
            segment
                .config_write(port_bdf, BRIDGE_CONTROL, &on)
                .expect("bus reset");
            segment
                .config_write(port_bdf, BRIDGE_CONTROL, &[0, 0])
                .expect("bus reset off");
            writes.clear(dev);
        }
        Step::HotAdd => {
            if vm.devices[HOT_INDEX].is_none() {
                vm.hot_add();
                writes.clear(HOT_INDEX);
            }
        }
        Step::HotRemove => vm.hot_remove(),
    }
}

fn port_bdf(vm: &Vm, port: &str) -> Bdf {
    // Ports are not in `placements`; find the port object on the segment.
    let port = vm.root.port(port).expect("port").clone();
    vm.root
        .segment()
        .devices()
        .into_iter()
        .find(|(_, _, p)| p.as_ref().is_some_and(|p| std::sync::Arc::ptr_eq(p, &port)))
        .map(|(bdf, _, _)| bdf)
        .expect("port on the segment")
}

fn read32(vm: &Vm, dev: usize, offset: u16) -> u32 {
    let Some(d) = &vm.devices[dev] else { return 0 };
    let mut b = [0; 4];
    vm.root.segment().config_read(d.bdf, offset, &mut b);
    u32::from_le_bytes(b)
}

/// One config write; on refusal (the observer rolled the registers back) the model's write
/// record is rolled back too.
fn write(vm: &Vm, writes: &mut Writes, dev: usize, offset: u16, data: &[u8]) {
    let Some(d) = &vm.devices[dev] else { return };
    let before = writes.clone();
    writes.record(dev, offset, data);
    if vm.root.segment().config_write(d.bdf, offset, data).is_err() {
        *writes = before;
    }
}

/// (index, kind, size, prefetchable) of the `n`th BAR of function `dev`.
fn pick_bar(vm: &Vm, dev: usize, n: usize) -> Option<(usize, BarKind, u64, bool)> {
    let d = vm.devices[dev].as_ref()?;
    let bar = &d.spec.bars[n % d.spec.bars.len()];
    Some((bar.index, bar.def.kind, bar.def.size, bar.def.prefetchable))
}

/// The address `target` means for a BAR of `size` of function `dev`.
fn resolve(vm: &Vm, dev: usize, target: Target, size: u64, high: bool) -> u64 {
    let aligned_in = |base: u64, len: u64, n: u64| {
        let first = base.div_ceil(size) * size;
        let slots = (base + len).saturating_sub(first) / size;
        if slots == 0 {
            first
        } else {
            first + (n % slots) * size
        }
    };
    let l = layout();
    match target {
        Target::OwnWindow(n) => {
            let Some(d) = &vm.devices[dev] else { return 0 };
            let port = vm.root.port(&d.port).expect("port").lock().unwrap();
            let window = if high {
                port.pref_window()
            } else {
                port.mem_window()
            };
            window.map_or(0, |w| aligned_in(w.base, w.len, n))
        }
        Target::HostWindow(wide, n) => {
            let w = if wide { l.mmio64 } else { l.mmio32 };
            aligned_in(w.base, w.len, n)
        }
        Target::Ram(r, n) => {
            let (base, len) = RAM[r];
            aligned_in(base, len, n)
        }
        Target::OtherBar(d, b) => {
            let other = vm.devices[d]
                .as_ref()
                .map(|o| &o.spec.bars[b % o.spec.bars.len()]);
            other.and_then(|o| address_of(vm, d, o.index)).unwrap_or(0)
        }
        Target::Outside(i) => OUTSIDE[i],
        Target::Zero => 0,
        Target::Raw(v) => v,
    }
}

/// Writes a BAR address keeping its flag bits (they are read-only anyway).
fn write_bar(
    vm: &Vm,
    writes: &mut Writes,
    dev: usize,
    index: usize,
    kind: BarKind,
    address: u64,
    split: Split,
) {
    write_raw_bar(vm, writes, dev, index, kind, address & !0xf, split);
}

fn write_raw_bar(
    vm: &Vm,
    writes: &mut Writes,
    dev: usize,
    index: usize,
    kind: BarKind,
    value: u64,
    split: Split,
) {
    let low = 0x10 + 4 * index as u16;
    let mut regs = vec![(low, value as u32)];
    if kind == BarKind::Mem64 {
        regs.push((low + 4, (value >> 32) as u32));
    }
    if !matches!(split, Split::LowFirst) {
        regs.reverse();
    }
    for (offset, v) in regs {
        let b = v.to_le_bytes();
        match split {
            Split::LowFirst | Split::HighFirst => write(vm, writes, dev, offset, &b),
            Split::Words => {
                write(vm, writes, dev, offset + 2, &b[2..]);
                write(vm, writes, dev, offset, &b[..2]);
            }
            Split::BytesDown => {
                for i in (0..4).rev() {
                    write(vm, writes, dev, offset + i as u16, &b[i..=i]);
                }
            }
        }
    }
}
