//! Builds the PCIe hierarchy and does the firmware's job up front: bus numbers, BAR addresses,
//! bridge windows and command registers. Linux on x86 keeps firmware assignments that are valid,
//! so the guest boots with exactly this layout and the VMM knows every BAR address before the
//! first vCPU runs.
//!
//! Placements:
//! - [`Placement::Root`]: the device sits on bus 0 (a root complex integrated endpoint).
//! - [`Placement::RootPort`]: the device gets a root port of its own.
//! - [`Placement::Switch`]: the device sits behind a downstream port of a named switch, whose
//!   upstream port sits behind its own root port. Devices on one switch can do peer-to-peer
//!   DMA without crossing the root complex.
//!
//! Hotplug slots ([`TopologyBuilder::add_hotplug_slots`], [`TopologyBuilder::add_empty_root_port`])
//! are empty downstream or root ports the guest learns about through ACPI (`acpiphp`, see
//! `acpi_hotplug.rs`); devices arrive in them at run time through [`PciRoot::plug`]
//! (`topology_slots.rs`).
//!
//! Every port window gets headroom: at least twice what the port holds, rounded up to a power
//! of two, so the guest can move a BAR inside it (resource reassignment, resizable BAR); ports
//! above grow so everything nests, and root ports add the [`HotplugReserve`] on top, hotplug
//! slots their own (larger) one. Where a host window cannot hold that, its window kind falls
//! back to plain doubling, then to none (`resources::Headroom`), then to halving the slot
//! reserves, with a warning each time.
//!
//! All programming goes through [`PciSegment::config_write`], the same path guest writes take,
//! so the observer learns the initial BAR layout exactly as it will learn later moves.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use super::acpi_hotplug::AcpiPort;
use super::config::ConfigError;
use super::host_bridge::HostBridge;
use super::pcie_cap::{LinkConfig, SlotConfig};
use super::port::PciePort;
use super::resources::{Allocators, Headroom, WindowKind};
use super::segment::{PciConfigIo, PciEcam, PciSegment, SegmentError};
use super::switch::{PcieSwitch, SwitchError, MAX_DOWNSTREAM_PORTS};
use super::{root_port, BarObserver, Bdf, SharedPciDevice};
use crate::bus::BusRange;
use firmware::{
    assign, attach, clear_assignment, describe, number_buses, program, Ctx, Node, Placed, SlotPlan,
};
pub use slots::HotplugSlotInfo;

/// Hotplug slots are numbered 1..=this (bit `n` of the hotplug controller's 32-bit registers).
pub const MAX_HOTPLUG_SLOTS: usize = 31;

const MIB: u64 = 1 << 20;

/// The guest physical windows the platform decodes (from the VMM's memory layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciLayout {
    /// ECAM: 1 MiB per bus starting at bus 0 (256 MiB for buses 0..=255).
    pub ecam: BusRange,
    /// Below 4 GiB: 32-bit BARs and non-prefetchable bridge windows.
    pub mmio32: BusRange,
    /// 64-bit prefetchable BARs and bridge windows.
    pub mmio64: BusRange,
    /// Port I/O for I/O BARs, e.g. 0x1000..0x10000; `None` leaves I/O BARs unassigned.
    pub io: Option<BusRange>,
}

impl PciLayout {
    /// The last bus the ECAM window covers.
    pub fn end_bus(&self) -> u8 {
        ((self.ecam.len >> 20).clamp(1, 256) - 1) as u8
    }

    fn validate(&self) -> Result<(), TopologyError> {
        let bad = |why: &str| Err(TopologyError::InvalidLayout(why.to_string()));
        if self.ecam.len == 0 || !self.ecam.len.is_multiple_of(MIB) || self.ecam.len > 256 * MIB {
            return bad("ECAM must be 1 to 256 whole MiB");
        }
        if self.ecam.end() > 1 << 32 {
            return bad("ECAM must be below 4 GiB (it is reserved with a 32-bit descriptor)");
        }
        if self.mmio32.len == 0 || self.mmio32.end() > 1 << 32 {
            return bad("the 32-bit window must be non-empty and below 4 GiB");
        }
        if self.mmio64.len == 0 {
            return bad("the 64-bit window must be non-empty");
        }
        if self.io.is_some_and(|io| io.len == 0 || io.end() > 1 << 16) {
            return bad("the I/O window must be non-empty and below 64 KiB");
        }
        Ok(())
    }

    fn host_windows(&self) -> [Option<BusRange>; 3] {
        [self.io, Some(self.mmio32), Some(self.mmio64)]
    }
}

/// Where a device goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    Root,
    RootPort,
    /// Behind a downstream port of the switch declared with [`TopologyBuilder::add_switch`].
    Switch(String),
}

/// Room left in every root port for devices hotplugged later. Linux sizes nothing on hotplug
/// into a port whose windows are full, so this has to be decided at boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HotplugReserve {
    /// Extra bus numbers below each root port (for a switch plugged in later).
    pub buses: u8,
    /// Extra non-prefetchable window (rounded to 1 MiB).
    pub mem32: u64,
    /// Extra 64-bit prefetchable window (rounded to 1 MiB).
    pub pref64: u64,
}

impl Default for HotplugReserve {
    fn default() -> Self {
        Self {
            buses: 0,
            mem32: 2 * MIB,
            pref64: 256 * MIB,
        }
    }
}

impl HotplugReserve {
    /// The default window of a hotplug slot: room for one large GPU-like device.
    pub const SLOT: HotplugReserve = HotplugReserve {
        buses: 0,
        mem32: 4 * MIB,
        pref64: 8 << 30,
    };

    /// The larger of each field.
    pub fn max(self, other: Self) -> Self {
        Self {
            buses: self.buses.max(other.buses),
            mem32: self.mem32.max(other.mem32),
            pref64: self.pref64.max(other.pref64),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("port construction: {0}")]
    Config(#[from] ConfigError),
    #[error("duplicate id {0:?}")]
    DuplicateId(String),
    #[error("switch {0:?} has no devices")]
    EmptySwitch(String),
    #[error("invalid PCI layout: {0}")]
    InvalidLayout(String),
    #[error("{id}: BAR {bar} has invalid size {size:#x}")]
    InvalidBar { id: String, bar: u8, size: u64 },
    #[error("bus {bus} has {needed} devices but only {available} device numbers are free")]
    OutOfDeviceNumbers {
        bus: u8,
        needed: usize,
        available: usize,
    },
    #[error("{owner}: no room for {size:#x} bytes in the {window:?} window")]
    OutOfSpace {
        owner: String,
        window: WindowKind,
        size: u64,
    },
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error("hotplug slot {0:?} is empty")]
    SlotEmpty(String),
    #[error("hotplug slot {0:?} is occupied")]
    SlotOccupied(String),
    #[error(transparent)]
    Switch(#[from] SwitchError),
    #[error(
        "switch {switch:?} has {devices} devices and slots, more than {MAX_DOWNSTREAM_PORTS} ports"
    )]
    SwitchFull { switch: String, devices: usize },
    #[error("the topology needs {needed} buses but ECAM covers buses 0..={end_bus}")]
    TooManyBuses { needed: usize, end_bus: u8 },
    #[error("{count} hotplug slots, more than {MAX_HOTPLUG_SLOTS}")]
    TooManyHotplugSlots { count: usize },
    #[error("unknown hotplug slot {0:?}")]
    UnknownSlot(String),
    #[error("{id}: unknown switch {switch:?}")]
    UnknownSwitch { id: String, switch: String },
}

/// What occupies one device number of bus 0, in declaration order.
enum Slot {
    Device(String, SharedPciDevice),
    RootPort(String, SharedPciDevice),
    Switch(String),
    EmptyRootPort(String),
}

/// Collects the topology; [`TopologyBuilder::build`] validates and programs it.
pub struct TopologyBuilder {
    layout: PciLayout,
    reserve: HotplugReserve,
    slot_reserve: HotplugReserve,
    link: LinkConfig,
    slots: Vec<Slot>,
    /// Devices per switch, in placement order.
    switch_devices: Vec<(String, SharedPciDevice, String)>,
    /// Hotplug slots per switch, in declaration order.
    switch_slots: Vec<(String, u8)>,
}

impl TopologyBuilder {
    pub fn new(layout: PciLayout) -> Self {
        Self {
            layout,
            reserve: HotplugReserve::default(),
            slot_reserve: HotplugReserve::SLOT,
            link: LinkConfig::default(),
            slots: Vec::new(),
            switch_devices: Vec::new(),
            switch_slots: Vec::new(),
        }
    }

    /// The windows (and extra buses) every hotplug slot keeps free; default
    /// [`HotplugReserve::SLOT`]. An empty root port gets the larger of this and the root-port
    /// reserve.
    pub fn hotplug_slot_reserve(&mut self, reserve: HotplugReserve) -> &mut Self {
        self.slot_reserve = reserve;
        self
    }

    /// Adds `n` empty downstream ports to switch `switch_name` as hotplug slots named
    /// `<switch>-slot<i>` (`i` counting from 0 across calls), after the ports of its devices.
    /// A switch with slots may have no devices.
    pub fn add_hotplug_slots(&mut self, switch_name: &str, n: u8) -> &mut Self {
        self.switch_slots.push((switch_name.to_string(), n));
        self
    }

    fn slots_of(&self, switch: &str) -> usize {
        self.switch_slots
            .iter()
            .filter(|(s, _)| s == switch)
            .map(|(_, n)| usize::from(*n))
            .sum()
    }

    fn hotplug_slot_count(&self) -> usize {
        let roots = self
            .slots
            .iter()
            .filter(|s| matches!(s, Slot::EmptyRootPort(_)))
            .count();
        roots
            + self
                .switch_slots
                .iter()
                .map(|(_, n)| usize::from(*n))
                .sum::<usize>()
    }

    pub fn hotplug_reserve(&mut self, reserve: HotplugReserve) -> &mut Self {
        self.reserve = reserve;
        self
    }

    /// Link speed and width every port advertises.
    pub fn link(&mut self, link: LinkConfig) -> &mut Self {
        self.link = link;
        self
    }

    /// Places `device` under the name `id` (used for errors and [`PciRoot::bdf`]).
    pub fn add_device(
        &mut self,
        id: &str,
        placement: Placement,
        device: SharedPciDevice,
    ) -> &mut Self {
        let id = id.to_string();
        match placement {
            Placement::Root => self.slots.push(Slot::Device(id, device)),
            Placement::RootPort => self.slots.push(Slot::RootPort(id, device)),
            Placement::Switch(name) => self.switch_devices.push((id, device, name)),
        }
        self
    }

    /// Declares a switch; it takes a root port in declaration order.
    pub fn add_switch(&mut self, name: &str) -> &mut Self {
        self.slots.push(Slot::Switch(name.to_string()));
        self
    }

    /// A root port with nothing behind it yet: a hotplug slot named `id`.
    pub fn add_empty_root_port(&mut self, id: &str) -> &mut Self {
        self.slots.push(Slot::EmptyRootPort(id.to_string()));
        self
    }

    /// Validates, builds the segment, assigns resources and programs every register through
    /// `observer`'s segment.
    pub fn build(&self, observer: Arc<dyn BarObserver>) -> Result<PciRoot, TopologyError> {
        self.layout.validate()?;
        self.validate_names()?;
        let available = 31; // device 0 is the host bridge
        if self.slots.len() > available {
            return Err(TopologyError::OutOfDeviceNumbers {
                bus: 0,
                needed: self.slots.len(),
                available,
            });
        }
        let count = self.hotplug_slot_count();
        if count > MAX_HOTPLUG_SLOTS {
            return Err(TopologyError::TooManyHotplugSlots { count });
        }
        let mut tree = self.plan()?;
        let last_bus = number_buses(&mut tree, 0);
        if last_bus > usize::from(self.layout.end_bus()) {
            return Err(TopologyError::TooManyBuses {
                needed: last_bus + 1,
                end_bus: self.layout.end_bus(),
            });
        }
        let segment = Arc::new(PciSegment::new(observer));
        segment.add_device(None, 0, Arc::new(Mutex::new(HostBridge::new())))?;
        for node in &tree {
            attach(&segment, None, node)?;
        }
        let mut ctx = Ctx {
            io: self.layout.io.is_some(),
            headroom: [Headroom::Pow2Double; 3],
            slot_shift: [0; 3],
        };
        // Headroom is a preference: a window kind whose host window cannot hold the tree with
        // it is assigned again with less, down to none (exactly the layout before headroom).
        loop {
            let mut host = Allocators::new(self.layout.host_windows());
            match assign(&mut tree, &mut host, &ctx) {
                Ok(()) => break,
                Err(TopologyError::OutOfSpace { window, .. })
                    if ctx.headroom[window as usize].less().is_some() =>
                {
                    let headroom = &mut ctx.headroom[window as usize];
                    let less = headroom.less().unwrap_or(Headroom::None);
                    log::warn!(
                        "{window:?} window: no room for {headroom:?} headroom in bridge windows, \
                         trying {less:?}"
                    );
                    *headroom = less;
                    clear_assignment(&mut tree);
                }
                Err(TopologyError::OutOfSpace { window, .. })
                    if self.slot_reserve_left(window, ctx.slot_shift[window as usize] + 1) =>
                {
                    let shift = &mut ctx.slot_shift[window as usize];
                    *shift += 1;
                    log::warn!(
                        "{window:?} window: no room for the hotplug slot reserves, halving them \
                         (1/{})",
                        1u64 << *shift
                    );
                    clear_assignment(&mut tree);
                }
                Err(e) => return Err(e),
            }
        }
        let mut placed = Placed::default();
        for node in &tree {
            program(&segment, 0, node, &mut placed)?;
        }
        placed.slots.sort_by_key(|s| s.number);
        Ok(PciRoot {
            segment,
            layout: self.layout,
            bdfs: placed.bdfs,
            ports: placed.ports,
            slots: placed.slots,
            acpi_ports: describe(&tree),
            last_bus: u8::try_from(last_bus).unwrap_or(u8::MAX),
        })
    }

    /// Whether slot reserves of `window` shifted right by `shift` still leave at least one
    /// window granule (below that, a slot could hold nothing).
    fn slot_reserve_left(&self, window: WindowKind, shift: u32) -> bool {
        let size = match window {
            WindowKind::Io => 0,
            WindowKind::Mem32 => self.slot_reserve.mem32,
            WindowKind::Pref64 => self.slot_reserve.pref64,
        };
        self.hotplug_slot_count() > 0 && shift < 64 && (size >> shift) >= window.granularity()
    }

    fn validate_names(&self) -> Result<(), TopologyError> {
        let mut seen = HashSet::new();
        let mut switches = HashSet::new();
        let names = self.slots.iter().map(|s| match s {
            Slot::Device(id, _) | Slot::RootPort(id, _) | Slot::EmptyRootPort(id) => id,
            Slot::Switch(name) => {
                switches.insert(name.clone());
                name
            }
        });
        let mut names: Vec<_> = names
            .chain(self.switch_devices.iter().map(|d| &d.0))
            .cloned()
            .collect();
        let mut declared = HashSet::new();
        for (switch, _) in &self.switch_slots {
            if declared.insert(switch) {
                names.extend((0..self.slots_of(switch)).map(|i| format!("{switch}-slot{i}")));
            }
        }
        for name in &names {
            if !seen.insert(name) {
                return Err(TopologyError::DuplicateId(name.clone()));
            }
        }
        for (switch, _) in &self.switch_slots {
            if !switches.contains(switch) {
                return Err(TopologyError::UnknownSwitch {
                    id: format!("{switch}-slot0"),
                    switch: switch.clone(),
                });
            }
        }
        for (id, _, switch) in &self.switch_devices {
            if !switches.contains(switch) {
                return Err(TopologyError::UnknownSwitch {
                    id: id.clone(),
                    switch: switch.clone(),
                });
            }
        }
        Ok(())
    }

    /// The tree below bus 0, with ports created and device numbers chosen. Hotplug slots take
    /// physical slot numbers 1..=N in declaration order (the numbers the hotplug controller's
    /// bitmaps and `_SUN` use), the other ports the numbers after them.
    fn plan(&self) -> Result<Vec<Node>, TopologyError> {
        let hotplug = self.hotplug_slot_count() as u16;
        let mut next_slot = hotplug + 1;
        let mut slot = || {
            let s = SlotConfig {
                physical_slot: next_slot,
                hotplug: false,
            };
            next_slot += 1;
            s
        };
        let mut next_hotplug = 1u16;
        // ACPI hotplug, not pciehp: the slot capability does not advertise hotplug.
        let mut hotplug_slot = || {
            let s = SlotConfig {
                physical_slot: next_hotplug,
                hotplug: false,
            };
            next_hotplug += 1;
            s
        };
        let root_reserve = Some(self.reserve);
        let slot_reserve = Some(self.slot_reserve);
        let mut nodes = Vec::new();
        for (i, entry) in self.slots.iter().enumerate() {
            let devfn = ((i + 1) as u8) << 3;
            let port_number = (i + 1) as u8;
            let new_root_port = |name: &str, slot| -> Result<Arc<Mutex<PciePort>>, TopologyError> {
                let link = LinkConfig {
                    port_number,
                    ..self.link
                };
                Ok(Arc::new(Mutex::new(root_port::with_link(
                    name,
                    link,
                    Some(slot),
                )?)))
            };
            let node = match entry {
                Slot::Device(id, dev) => Node::endpoint(id, devfn, dev.clone()),
                Slot::RootPort(id, dev) => {
                    let port = new_root_port(&format!("rp-{id}"), slot())?;
                    Node::port(&format!("rp-{id}"), devfn, port, root_reserve)
                        .with_children(vec![Node::endpoint(id, 0, dev.clone())])
                }
                Slot::EmptyRootPort(id) => {
                    let config = hotplug_slot();
                    let reserve = Some(self.reserve.max(self.slot_reserve));
                    Node::port(id, devfn, new_root_port(id, config)?, reserve).with_slot(SlotPlan {
                        name: id.clone(),
                        number: u32::from(config.physical_slot),
                        switch: None,
                    })
                }
                Slot::Switch(name) => {
                    let members: Vec<_> = self
                        .switch_devices
                        .iter()
                        .filter(|d| &d.2 == name)
                        .collect();
                    let spare = self.slots_of(name);
                    if members.is_empty() && spare == 0 {
                        return Err(TopologyError::EmptySwitch(name.clone()));
                    }
                    if members.len() + spare > MAX_DOWNSTREAM_PORTS {
                        return Err(TopologyError::SwitchFull {
                            switch: name.clone(),
                            devices: members.len() + spare,
                        });
                    }
                    let mut configs: Vec<_> = members.iter().map(|_| slot()).collect();
                    configs.extend((0..spare).map(|_| hotplug_slot()));
                    let switch = PcieSwitch::new(name, self.link, &configs)?;
                    let mut downstream = Vec::new();
                    for (i, dp) in switch.downstream.iter().enumerate() {
                        let port_name = format!("{name}-down{i}");
                        let node = match members.get(i) {
                            Some((id, dev, _)) => {
                                Node::port(&port_name, (i as u8) << 3, dp.clone(), None)
                                    .with_children(vec![Node::endpoint(id, 0, dev.clone())])
                            }
                            None => {
                                Node::port(&port_name, (i as u8) << 3, dp.clone(), slot_reserve)
                                    .with_slot(SlotPlan {
                                        name: format!("{name}-slot{}", i - members.len()),
                                        number: u32::from(configs[i].physical_slot),
                                        switch: Some(name.clone()),
                                    })
                            }
                        };
                        downstream.push(node);
                    }
                    let upstream = Node::port(&format!("{name}-up"), 0, switch.upstream, None)
                        .with_children(downstream);
                    let port = new_root_port(&format!("rp-{name}"), slot())?;
                    Node::port(&format!("rp-{name}"), devfn, port, root_reserve)
                        .with_children(vec![upstream])
                }
            };
            nodes.push(node);
        }
        Ok(nodes)
    }
}

/// The built platform: the segment plus what the VMM needs to wire it and describe it.
pub struct PciRoot {
    segment: Arc<PciSegment>,
    layout: PciLayout,
    bdfs: BTreeMap<String, Bdf>,
    ports: BTreeMap<String, Arc<Mutex<PciePort>>>,
    /// Hotplug slots by number.
    slots: Vec<HotplugSlotInfo>,
    /// The port tree the DSDT mirrors.
    acpi_ports: Vec<AcpiPort>,
    /// The highest bus number the tree uses, hotplug reserves included.
    last_bus: u8,
}

impl PciRoot {
    pub fn segment(&self) -> &Arc<PciSegment> {
        &self.segment
    }

    pub fn layout(&self) -> &PciLayout {
        &self.layout
    }

    /// The highest bus number any bridge forwards, hotplug reserves included. Firmware
    /// (`_CRS`, MCFG) announces buses 0..=this only: Linux maps 1 MiB of ECAM per announced
    /// bus, and under nested virtualisation mapping all 256 took over a second of boot.
    pub fn last_bus(&self) -> u8 {
        self.last_bus
    }

    /// Where the device added as `id` ended up.
    pub fn bdf(&self, id: &str) -> Option<Bdf> {
        self.bdfs.get(id).copied()
    }

    /// Every device id with its address.
    pub fn placements(&self) -> &BTreeMap<String, Bdf> {
        &self.bdfs
    }

    /// A port by name: `rp-<device id>`, `rp-<switch>`, `<switch>-up`, `<switch>-down<i>`, or
    /// the id of an empty root port.
    pub fn port(&self, name: &str) -> Option<&Arc<Mutex<PciePort>>> {
        self.ports.get(name)
    }

    /// The port tree as the DSDT mirrors it.
    pub(crate) fn acpi_ports(&self) -> &[AcpiPort] {
        &self.acpi_ports
    }

    /// The bus device to register over `layout().ecam` on the MMIO bus.
    pub fn ecam(&self) -> PciEcam {
        PciEcam::new(self.segment.clone())
    }

    /// The bus device to register at 0xCF8 (length [`PciConfigIo::LEN`]) on the I/O bus.
    pub fn config_io(&self) -> PciConfigIo {
        PciConfigIo::new(self.segment.clone())
    }
}

#[path = "topology_firmware.rs"]
mod firmware;

#[path = "topology_slots.rs"]
mod slots;

#[cfg(test)]
#[path = "topology_tests.rs"]
mod tests;
