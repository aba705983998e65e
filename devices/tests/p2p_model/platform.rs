//! The VM under test: the real PCI topology (`TopologyBuilder`, `PciSegment`) with fake host
//! functions in two P2P groups, each group a real `P2pTable` over its own `FakeIommu`, joined by
//! an observer that does for P2P what the VMM's `BarMapper` does.
//!
//! Group A: `a1` and `a2` behind switch `ga`, plus the hotplug slot `ga-slot0`; group B: `b1` on
//! root port `rp-b1`. Guest RAM is below both MMIO windows and is mapped into both fakes, so a
//! BAR mapping over it would also trip the fake's overlap panic.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::pci::fake::FakeEndpoint;
use devices::pci::p2p_placement::tell_table;
use devices::pci::regs::{COMMAND, COMMAND_MEMORY};
use devices::pci::{
    BarChange, BarDef, BarInfo, BarKind, BarObserver, Bdf, ObserverError, PciDevice, PciLayout,
    PciRoot, Placement, RomInfo, SharedPciDevice, TopologyBuilder, ROM_BAR,
};
use devices::BusRange;
use vfio_p2p::fake::FakeIommu;
use vfio_p2p::{
    BackendKind, Backing, BarBacking, BarKey, DeviceKey, DmaKind, DmaMapRequest, IommuBackend,
    IovaRange, P2pKey, P2pTable,
};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Guest RAM: below the 3 GiB hole, and 2 GiB above 4 GiB, right below the 64-bit window.
pub const RAM: [(u64, u64); 2] = [(0, 3 * GIB), (4 * GIB, 2 * GIB)];

/// The platform windows. The 64-bit window starts at 6 GiB, which is not aligned for the
/// 4 and 8 GiB BARs: a BAR can straddle RAM and the window.
pub fn layout() -> PciLayout {
    PciLayout {
        ecam: BusRange::new(0xe000_0000, 256 * MIB),
        mmio32: BusRange::new(0xc000_0000, 512 * MIB),
        mmio64: BusRange::new(6 * GIB, 256 * GIB),
        io: Some(BusRange::new(0x1000, 0xf000)),
    }
}

/// The windows every `P2pTable` is given, as the VMM gives them (device_manager/mod.rs).
pub fn host_windows() -> [IovaRange; 2] {
    let l = layout();
    [
        IovaRange::with_size(l.mmio32.base, l.mmio32.len),
        IovaRange::with_size(l.mmio64.base, l.mmio64.len),
    ]
}

/// One BAR of a fake host function and its P2P areas (offset, size) inside it, as
/// `HostPciDevice::p2p_areas` would report them (the hole in `a1`'s BAR 0 stands for an MSI-X
/// table, which stays trapped).
pub struct BarSpec {
    pub index: usize,
    pub def: BarDef,
    pub areas: &'static [(u64, u64)],
}

pub struct DeviceSpec {
    pub name: &'static str,
    pub bars: &'static [BarSpec],
    pub rom: Option<u64>,
}

const WHOLE: &[(u64, u64)] = &[(0, 0)];

pub const A1: DeviceSpec = DeviceSpec {
    name: "a1",
    bars: &[
        BarSpec {
            index: 0,
            def: BarDef::mem32(64 << 10),
            areas: &[(0, 16 << 10), (32 << 10, 32 << 10)],
        },
        BarSpec {
            index: 2,
            def: BarDef::mem64(4 * GIB, true),
            areas: WHOLE,
        },
        BarSpec {
            index: 4,
            def: BarDef::mem64(MIB, false),
            areas: WHOLE,
        },
    ],
    rom: Some(64 << 10),
};

pub const A2: DeviceSpec = DeviceSpec {
    name: "a2",
    bars: &[
        BarSpec {
            index: 0,
            def: BarDef::mem32(4 << 10),
            areas: WHOLE,
        },
        // Sub-page: trapped only, no P2P area.
        BarSpec {
            index: 1,
            def: BarDef::mem32(256),
            areas: &[],
        },
        BarSpec {
            index: 2,
            def: BarDef::mem64(8 * GIB, true),
            areas: WHOLE,
        },
        BarSpec {
            index: 4,
            def: BarDef::io(256),
            areas: &[],
        },
    ],
    rom: None,
};

pub const B1: DeviceSpec = DeviceSpec {
    name: "b1",
    bars: &[
        BarSpec {
            index: 0,
            def: BarDef::mem64(2 * GIB, true),
            areas: WHOLE,
        },
        BarSpec {
            index: 2,
            def: BarDef::mem32(32 * MIB),
            areas: WHOLE,
        },
        BarSpec {
            index: 3,
            def: BarDef::mem32(MIB),
            areas: WHOLE,
        },
    ],
    rom: Some(2 << 10),
};

/// What the hotplug slot receives (a fresh function each time).
pub const HOT: DeviceSpec = DeviceSpec {
    name: "hot",
    bars: &[
        BarSpec {
            index: 0,
            def: BarDef::mem64(256 * MIB, true),
            areas: WHOLE,
        },
        BarSpec {
            index: 2,
            def: BarDef::mem32(MIB),
            areas: WHOLE,
        },
    ],
    rom: Some(32 << 10),
};

pub const SLOT: &str = "ga-slot0";
/// The downstream port behind which the slot's function appears.
pub const SLOT_PORT: &str = "ga-down2";

impl BarSpec {
    /// The areas with `WHOLE` resolved to the BAR's size.
    pub fn areas(&self) -> Vec<(u64, u64)> {
        self.areas
            .iter()
            .map(|&(off, size)| (off, if size == 0 { self.def.size } else { size }))
            .collect()
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A passthrough function as the VMM's `VfioPciDevice` behaves towards P2P (devices/src/vfio):
/// the command register's memory enable is forwarded to the "hardware" (here `FakeIommu`'s
/// decode state, which revokes the device's dmabufs while off), and a conventional reset resets
/// the host function through `P2pTable::device_reset` before resetting the emulated registers.
pub struct HostFn {
    pub endpoint: FakeEndpoint,
    pub key: DeviceKey,
    fake: Arc<FakeIommu>,
    table: Arc<P2pTable>,
    /// The memory enable as last forwarded to the hardware.
    hw_decode: bool,
}

impl HostFn {
    fn forward_command(&mut self) {
        let decode = self.endpoint.command() & COMMAND_MEMORY != 0;
        if decode != self.hw_decode {
            self.hw_decode = decode;
            self.fake.set_decode(self.key, decode);
        }
    }

    /// A host reset (`VFIO_DEVICE_RESET`) as the kernel does it: dmabufs revoked across the
    /// reset, the command register saved and restored around it. Run through the table, as
    /// `VfioPciDevice::reset_host` does and as a guest-initiated FLR must be handled.
    pub fn host_reset(&self) {
        let (fake, key, decode) = (self.fake.clone(), self.key, self.hw_decode);
        self.table.device_reset(key, || {
            fake.set_decode(key, false);
            fake.set_decode(key, decode);
        });
    }
}

impl PciDevice for HostFn {
    fn name(&self) -> &str {
        self.endpoint.name()
    }
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.endpoint.read_config(offset, data);
    }
    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.endpoint.write_config(offset, data);
        let end = offset + data.len() as u16;
        if offset < COMMAND + 2 && COMMAND < end {
            self.forward_command();
        }
    }
    fn bars(&self) -> [Option<BarInfo>; 6] {
        self.endpoint.bars()
    }
    fn rom(&self) -> Option<RomInfo> {
        self.endpoint.rom()
    }
    fn command(&self) -> u16 {
        self.endpoint.command()
    }
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        self.endpoint.bar_read(bar, offset, data);
    }
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        self.endpoint.bar_write(bar, offset, data);
    }
    fn reset(&mut self) {
        self.host_reset();
        self.endpoint.reset();
        self.forward_command();
    }
}

/// What the observer knows of a passthrough function (the VMM's `PassthroughBars`).
struct Member {
    key: DeviceKey,
    table: Arc<P2pTable>,
}

/// Whether `change`'s BAR gets KVM memory slots in `BarMapper::set_up` (it has mappable areas).
fn slots(observer: &P2pObserver, device: &SharedPciDevice, change: &BarChange) -> bool {
    change.bar != ROM_BAR
        && observer.p2p_of(device).is_some_and(|(key, table)| {
            let region = u32::from(change.bar);
            table.keys_of(key).iter().any(|k| k.bar.region == region)
        })
}

/// Identity of a device object, as `bar_mapper.rs` keys it.
fn device_id(device: &SharedPciDevice) -> usize {
    Arc::as_ptr(device) as *const () as usize
}

/// The test's `BarObserver`: mirrors vmm/src/device_manager/bar_mapper.rs, `BarMapper`:
/// - `bar_changed`: the old range is withdrawn, the new one set up; with `reject` on, a new range
///   is refused (old one put back) where `BarMapper::set_up` fails: its trap region overlaps a
///   live BAR of the same space (`Bus::insert`), or a BAR with mappable areas would put a KVM
///   memory slot over guest RAM. With `reject` off nothing is refused, so overlapping BARs and
///   BARs over RAM reach the P2P tables, whose own checks must keep them out of the IOMMU.
/// - `update_p2p`: the placement rule (I/O BARs, the ROM and BARs without P2P areas skipped;
///   `new` range -> `Placed(base)`; no new range -> `DecodeOff` if the BAR has an address and
///   memory decoding is off, else `Unplaced`).
pub struct P2pObserver {
    reject: bool,
    members: Mutex<HashMap<usize, Member>>,
    live: Mutex<HashMap<(usize, u8), (BusRange, BarKind)>>,
}

impl P2pObserver {
    pub fn new(reject: bool) -> Self {
        Self {
            reject,
            members: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
        }
    }

    fn add(&self, device: &SharedPciDevice, key: DeviceKey, table: Arc<P2pTable>) {
        lock(&self.members).insert(device_id(device), Member { key, table });
    }

    fn remove(&self, device: &SharedPciDevice) {
        lock(&self.members).remove(&device_id(device));
    }

    fn p2p_of(&self, device: &SharedPciDevice) -> Option<(DeviceKey, Arc<P2pTable>)> {
        lock(&self.members)
            .get(&device_id(device))
            .map(|m| (m.key, m.table.clone()))
    }

    /// Whether `BarMapper::set_up` would fail for `range`.
    fn refuses(&self, device: &SharedPciDevice, change: &BarChange, range: BusRange) -> bool {
        let io = |k: BarKind| k == BarKind::Io;
        let clash = lock(&self.live)
            .values()
            .any(|(r, k)| io(*k) == io(change.kind) && r.overlaps(&range));
        let clash = clash && self.reject;
        let slots = self.reject && slots(self, device, change);
        let over_ram = !io(change.kind)
            && RAM
                .iter()
                .any(|&(base, len)| BusRange::new(base, len).overlaps(&range));
        clash || (slots && over_ram)
    }

    /// `BarMapper::update_p2p`: the same placements (`p2p_placements`), one batch per change.
    fn update_p2p(&self, device: &SharedPciDevice, change: &BarChange) {
        let Some((key, p2p)) = self.p2p_of(device) else {
            return;
        };
        if let Err(e) = tell_table(&*lock(device), change, key, &p2p) {
            panic!("{change}: bars_moved: {e}");
        }
    }
}

impl BarObserver for P2pObserver {
    fn bar_changed(
        &self,
        device: &SharedPciDevice,
        change: &BarChange,
    ) -> Result<(), ObserverError> {
        let id = (device_id(device), change.bar);
        let old = lock(&self.live).remove(&id);
        if let Some(range) = change.new {
            if self.refuses(device, change, range) {
                if let Some(old) = old {
                    lock(&self.live).insert(id, old);
                }
                return Err(format!("{change}: refused like BarMapper::set_up").into());
            }
            lock(&self.live).insert(id, (range, change.kind));
        }
        self.update_p2p(device, change);
        Ok(())
    }

    /// `BarMapper::forwarding_changed`.
    fn forwarding_changed(&self, device: &SharedPciDevice, change: &BarChange) {
        self.update_p2p(device, change);
    }
}

/// One P2P group: its table over its own fake IOMMU domain.
pub struct Group {
    pub name: &'static str,
    pub fake: Arc<FakeIommu>,
    pub table: Arc<P2pTable>,
}

impl Group {
    fn new(name: &'static str) -> Self {
        let fake = Arc::new(FakeIommu::new(BackendKind::Iommufd));
        for &(base, len) in &RAM {
            let req = DmaMapRequest {
                iova: base,
                size: len,
                kind: DmaKind::Ram,
                backing: Backing::HostVa(0x7f00_0000_0000 + base),
                writable: true,
            };
            // SAFETY: the fake maps nothing; it only records the range.
            unsafe { fake.map(&req) }.expect("RAM into the fake");
        }
        let table = Arc::new(P2pTable::new(name, fake.clone(), &host_windows()));
        Self { name, fake, table }
    }
}

/// One P2P area of a present function, and the dmabuf identity the fake records it by.
#[derive(Clone, Copy, Debug)]
pub struct AreaInfo {
    pub key: P2pKey,
    pub offset: u64,
    pub size: u64,
    pub dmabuf: (u64, u64),
}

/// A function of the VM and where it is.
pub struct Present {
    pub spec: &'static DeviceSpec,
    pub name: String,
    pub group: usize,
    pub bdf: Bdf,
    pub host: Arc<Mutex<HostFn>>,
    pub shared: SharedPciDevice,
    pub areas: Vec<AreaInfo>,
    /// The port above it, whose windows the strategies aim inside (and outside) of.
    pub port: String,
}

pub struct Vm {
    pub root: PciRoot,
    pub groups: [Group; 2],
    pub observer: Arc<P2pObserver>,
    /// a1, a2, b1, and the hotplugged function while one is in the slot.
    pub devices: [Option<Present>; 4],
    next_ino: u64,
    /// Dmabuf identities of functions that left: nothing may stay mapped from them.
    pub departed: BTreeSet<(u64, u64)>,
}

pub const HOT_INDEX: usize = 3;

fn identity(fd: &OwnedFd) -> (u64, u64) {
    let meta = File::from(fd.try_clone().expect("dup"))
        .metadata()
        .expect("fstat");
    (meta.dev(), meta.ino())
}

impl Vm {
    pub fn new(reject: bool) -> Self {
        let groups = [Group::new("ga"), Group::new("gb")];
        let observer = Arc::new(P2pObserver::new(reject));
        let mut next_ino = 1;
        let mut make = |spec: &'static DeviceSpec, group: &Group, port: &str| {
            let p = new_function(spec, group, 0, port, &observer, next_ino);
            next_ino += 1;
            p
        };
        let a1 = make(&A1, &groups[0], "ga-down0");
        let a2 = make(&A2, &groups[0], "ga-down1");
        let b1 = make(&B1, &groups[1], "rp-b1");
        let mut builder = TopologyBuilder::new(layout());
        builder
            .add_switch("ga")
            .add_device("a1", Placement::Switch("ga".into()), a1.shared.clone())
            .add_device("a2", Placement::Switch("ga".into()), a2.shared.clone())
            .add_hotplug_slots("ga", 1)
            .add_device("b1", Placement::RootPort, b1.shared.clone());
        let root = builder.build(observer.clone()).expect("topology");
        let mut devices = [Some(a1), Some(a2), Some(b1), None];
        for d in devices.iter_mut().flatten() {
            d.bdf = root.bdf(&d.name).expect("placed");
        }
        Self {
            root,
            groups,
            observer,
            devices,
            next_ino,
            departed: BTreeSet::new(),
        }
    }

    /// Hot add as the VMM's `hot_add` orders it: the table and the observer learn of the
    /// function first, then it goes into the slot (decoding nothing, BARs unassigned).
    pub fn hot_add(&mut self) {
        if self.devices[HOT_INDEX].is_some() {
            return;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let mut p = new_function(&HOT, &self.groups[0], ino, SLOT_PORT, &self.observer, ino);
        p.bdf = self.root.plug(SLOT, p.shared.clone()).expect("plug");
        self.devices[HOT_INDEX] = Some(p);
    }

    /// Hot remove as the VMM's `process_ejects` then `release` order it: unplug (the segment
    /// withdraws its BARs through the observer), then out of the P2P table.
    pub fn hot_remove(&mut self) {
        let Some(p) = self.devices[HOT_INDEX].take() else {
            return;
        };
        self.root.unplug(SLOT).expect("unplug");
        let key = lock(&p.host).key;
        self.groups[p.group].table.remove_device(key);
        self.observer.remove(&p.shared);
        self.departed.extend(p.areas.iter().map(|a| a.dmabuf));
    }
}

/// A fake host function of `spec` in `group`, registered with the group's table and fake and
/// with the observer (what `hot_open` / `open` do for a VFIO device).
fn new_function(
    spec: &'static DeviceSpec,
    group: &Group,
    serial: u64,
    port: &str,
    observer: &P2pObserver,
    ino: u64,
) -> Present {
    let bars: Vec<_> = spec.bars.iter().map(|b| (b.index, b.def)).collect();
    let mut endpoint = FakeEndpoint::with_bars(spec.name, &bars).expect("BARs");
    if let Some(size) = spec.rom {
        endpoint.config.add_rom(size).expect("ROM");
    }
    let key = DeviceKey::Cdev { dev: 0x2d, ino };
    let name = match serial {
        0 => spec.name.to_string(),
        n => format!("{}#{n}", spec.name),
    };
    group.fake.attach(key);
    let host_bdf = format!("0000:00:{:02x}.0", ino % 32).parse().expect("BDF");
    group
        .table
        .register_device(key, &name, host_bdf)
        .expect("register");
    let mut areas = Vec::new();
    for bar in spec.bars {
        for (offset, size) in bar.areas() {
            let (_reader, writer) = std::io::pipe().expect("pipe");
            let fd = OwnedFd::from(writer);
            let dmabuf = identity(&fd);
            group.fake.register_dmabuf(fd.as_fd(), key);
            let p2p = P2pKey {
                bar: BarKey {
                    device: key,
                    region: bar.index as u32,
                },
                area_offset: offset,
            };
            group
                .table
                .register(p2p, BarBacking::Dmabuf(fd), size)
                .expect("area");
            areas.push(AreaInfo {
                key: p2p,
                offset,
                size,
                dmabuf,
            });
        }
    }
    let host = Arc::new(Mutex::new(HostFn {
        endpoint,
        key,
        fake: group.fake.clone(),
        table: group.table.clone(),
        hw_decode: false,
    }));
    let shared: SharedPciDevice = host.clone();
    observer.add(&shared, key, group.table.clone());
    Present {
        spec,
        name,
        group: usize::from(group.name == "gb"),
        bdf: Bdf::new(0, 0, 0),
        host,
        shared,
        areas,
        port: port.to_string(),
    }
}
