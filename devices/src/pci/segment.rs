//! One PCI segment: the device tree, config access routing, and the two bus devices guests use
//! to reach it (ECAM MMIO and the 0xCF8/0xCFC port pair).
//!
//! The tree is kept by position (parent port, devfn), not by bus number, because bus numbers
//! are guest-programmable registers of the bridges. Every access is routed as hardware routes
//! it: a type-1 access goes down through the bridge whose secondary..=subordinate range holds
//! the bus, and becomes type 0 on the secondary bus, where a root or downstream port (a link)
//! only forwards device 0.
//!
//! All config writes go through [`update_decode`], so BAR moves reach the [`BarObserver`] the
//! same way whether the guest used ECAM or 0xCF8.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use super::bar::{
    announce_removal, decoding_bars, update_decode, BarChange, BarKind, BarObserver, BarRejected,
    ObserverError,
};
use super::intx::gsi_for_path;
use super::port::PciePort;
use super::regs::{COMMAND, INTERRUPT_PIN, IO_BASE, PREF_LIMIT_UPPER32};
use super::{lock, Bdf, PciDevice, SharedPciDevice};
use crate::bus::{BusDevice, BusRange};

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error(transparent)]
    BarRejected(#[from] BarRejected),
    #[error("{parent}: devfn {devfn:#04x} has devices below it")]
    HasChildren { parent: String, devfn: u8 },
    #[error("{parent}: device {device} is behind a link, where only device 0 exists")]
    LinkDevice { parent: String, device: u8 },
    #[error("{parent}: nothing at devfn {devfn:#04x}")]
    NotFound { parent: String, devfn: u8 },
    #[error("{parent}: devfn {devfn:#04x} is already occupied")]
    Occupied { parent: String, devfn: u8 },
    #[error("port {0} is not on this segment")]
    UnknownParent(String),
}

type SharedPort = Arc<Mutex<PciePort>>;

/// A function in the tree; ports have the functions below them as children.
struct Node {
    device: SharedPciDevice,
    port: Option<SharedPort>,
    children: BTreeMap<u8, Node>,
}

/// What a config access resolved to.
struct Target {
    device: SharedPciDevice,
    port: Option<SharedPort>,
}

/// The root bus and everything below it.
pub struct PciSegment {
    bus0: RwLock<BTreeMap<u8, Node>>,
    observer: Arc<dyn BarObserver>,
    /// Serializes config writes from all access paths, so the before/after decode snapshots of
    /// one write are never interleaved with another's.
    writes: Mutex<()>,
}

/// Where to attach a function: the root bus, or below a port already on the segment.
pub type Parent<'a> = Option<&'a SharedPort>;

impl PciSegment {
    pub fn new(observer: Arc<dyn BarObserver>) -> Self {
        Self {
            bus0: RwLock::new(BTreeMap::new()),
            observer,
            writes: Mutex::new(()),
        }
    }

    pub fn observer(&self) -> &Arc<dyn BarObserver> {
        &self.observer
    }

    /// Attaches an endpoint at `devfn` below `parent`. Attaching below a link brings it up.
    pub fn add_device(
        &self,
        parent: Parent,
        devfn: u8,
        device: SharedPciDevice,
    ) -> Result<(), SegmentError> {
        self.insert(parent, devfn, device, None)
    }

    /// Attaches a port (root port, switch port) at `devfn` below `parent`.
    pub fn add_port(
        &self,
        parent: Parent,
        devfn: u8,
        port: SharedPort,
    ) -> Result<(), SegmentError> {
        self.insert(parent, devfn, port.clone(), Some(port))
    }

    fn insert(
        &self,
        parent: Parent,
        devfn: u8,
        device: SharedPciDevice,
        port: Option<SharedPort>,
    ) -> Result<(), SegmentError> {
        let mut bus0 = self.bus0.write().unwrap_or_else(|e| e.into_inner());
        let parent_name = parent.map_or("bus 0".to_string(), |p| lock(p).name().to_string());
        let siblings = children_of(&mut bus0, parent)
            .ok_or_else(|| SegmentError::UnknownParent(parent_name.clone()))?;
        if let Some(p) = parent {
            if lock(p).downstream_is_link() && devfn >> 3 != 0 {
                return Err(SegmentError::LinkDevice {
                    parent: parent_name,
                    device: devfn >> 3,
                });
            }
        }
        if siblings.contains_key(&devfn) {
            return Err(SegmentError::Occupied {
                parent: parent_name,
                devfn,
            });
        }
        siblings.insert(
            devfn,
            Node {
                device,
                port,
                children: BTreeMap::new(),
            },
        );
        if let Some(p) = parent {
            let mut p = lock(p);
            if p.downstream_is_link() {
                p.set_link_active(true);
            }
        }
        Ok(())
    }

    /// Detaches the function at `devfn` below `parent` (which must have nothing below it),
    /// withdrawing the BAR ranges it decodes from the observer.
    pub fn remove(&self, parent: Parent, devfn: u8) -> Result<SharedPciDevice, SegmentError> {
        // Serialized with config writes: a write routed to the function just before it left
        // must not map a BAR again after the removal was announced.
        let _serial = lock(&self.writes);
        let parent_name = parent.map_or("bus 0".to_string(), |p| lock(p).name().to_string());
        let node = {
            let mut bus0 = self.bus0.write().unwrap_or_else(|e| e.into_inner());
            let siblings = children_of(&mut bus0, parent)
                .ok_or_else(|| SegmentError::UnknownParent(parent_name.clone()))?;
            if siblings.get(&devfn).is_some_and(|n| !n.children.is_empty()) {
                return Err(SegmentError::HasChildren {
                    parent: parent_name,
                    devfn,
                });
            }
            siblings.remove(&devfn).ok_or(SegmentError::NotFound {
                parent: parent_name,
                devfn,
            })?
        };
        // The address it answered at; an unprogrammed parent leaves it unreachable, and the
        // BDF in the announcement is then only a label.
        let bus = parent.map_or(Some(0), |p| lock(p).bus_range().map(|r| *r.start()));
        announce_removal(
            &node.device,
            Bdf::from_devfn(bus.unwrap_or(0), devfn),
            &*self.observer,
        );
        if let Some(p) = parent {
            let mut p = lock(p);
            if p.downstream_is_link() {
                p.set_link_active(false);
            }
        }
        Ok(node.device)
    }

    /// Resolves `bdf` through the bridges as currently programmed.
    fn route(&self, bdf: Bdf) -> Option<Target> {
        let bus0 = self.bus0.read().unwrap_or_else(|e| e.into_inner());
        let mut nodes = &*bus0;
        let mut bus = 0u8;
        while bdf.bus != bus {
            let (node, secondary, link) = nodes.values().find_map(|node| {
                let port = lock(node.port.as_ref()?);
                let range = port.bus_range()?;
                // A secondary bus at or below the current one would loop; hardware would not
                // forward it either.
                (range.contains(&bdf.bus) && *range.start() > bus)
                    .then(|| (node, *range.start(), port.downstream_is_link()))
            })?;
            if bdf.bus == secondary && link && bdf.device != 0 {
                return None;
            }
            nodes = &node.children;
            bus = secondary;
        }
        nodes.get(&bdf.devfn()).map(|node| Target {
            device: node.device.clone(),
            port: node.port.clone(),
        })
    }

    /// The function at `bdf`, if an access to it would reach one.
    pub fn device(&self, bdf: Bdf) -> Option<SharedPciDevice> {
        self.route(bdf).map(|t| t.device)
    }

    /// Every reachable function with its current address, depth first (ports before the
    /// functions below them).
    pub fn devices(&self) -> Vec<(Bdf, SharedPciDevice, Option<SharedPort>)> {
        let bus0 = self.bus0.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        collect(&bus0, 0, &mut out);
        out
    }

    /// The IOAPIC GSI that `device`'s INTx pin drives under the platform's routing
    /// ([`super::intx`]): its Interrupt Pin register swizzled through every bridge above it
    /// down to the root bus. Found by position in the tree, so it holds before the guest
    /// numbers any bus. `None` if the function has no pin or is not on this segment. Locks
    /// `device`, so the caller must not hold it.
    pub fn intx_gsi(&self, device: &SharedPciDevice) -> Option<u32> {
        let path = {
            let bus0 = self.bus0.read().unwrap_or_else(|e| e.into_inner());
            device_path(&bus0, device)?
        };
        let mut pin = [0u8];
        lock(device).read_config(INTERRUPT_PIN, &mut pin);
        gsi_for_path(&path, pin[0])
    }

    /// Guest config read; absent functions read as all-ones.
    pub fn config_read(&self, bdf: Bdf, offset: u16, data: &mut [u8]) {
        match self.route(bdf) {
            Some(target) => lock(&target.device).read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Guest config write; writes to absent functions are dropped. Returns the BAR changes the
    /// observer accepted. A secondary bus reset started by this write resets everything below
    /// the port.
    pub fn config_write(
        &self,
        bdf: Bdf,
        offset: u16,
        data: &[u8],
    ) -> Result<Vec<BarChange>, SegmentError> {
        let _serial = lock(&self.writes);
        let Some(target) = self.route(bdf) else {
            return Ok(Vec::new());
        };
        let started = std::time::Instant::now();
        // A bridge write that can change what it forwards: what each BAR below reaches before.
        let reach_before = target
            .port
            .as_ref()
            .filter(|_| touches_forwarding(offset, data.len()))
            .map(|_| self.reach_below(&target.device));
        let forwarding = Forwarding {
            observer: &*self.observer,
            bridges: self.bridges_above(&target.device),
        };
        let mut device_write = std::time::Duration::ZERO;
        let changes = update_decode(&target.device, bdf, &forwarding, |dev| {
            let write_started = std::time::Instant::now();
            dev.write_config(offset, data);
            device_write = write_started.elapsed();
        })?;
        if let Some(before) = reach_before {
            for (device, change) in self.reach_below(&target.device) {
                let was = before.iter().find(|(d, c)| {
                    Arc::ptr_eq(d, &device) && c.bar == change.bar && c.new == change.new
                });
                if was.is_some_and(|(_, c)| c.forwarded != change.forwarded) {
                    log::debug!(
                        "{change}: forwarded by the bridges above: {}",
                        change.forwarded
                    );
                    self.observer.forwarding_changed(&device, &change);
                }
            }
        }
        if !changes.is_empty() {
            // The VMM's whole cost of a guest BAR move or decode toggle, from the trapped write
            // to the vCPU's return: register emulation, traps, memory slots, peer maps.
            log::debug!(
                "{bdf}: config write at {offset:#x} applied {} BAR change(s) in {} us",
                changes.len(),
                started.elapsed().as_micros()
            );
            // Of which the function's own register write (for VFIO: the host's config write).
            log::debug!(
                "{bdf}: config write at {offset:#x}: the function's own write took {} us",
                device_write.as_micros()
            );
        }
        if let Some(port) = &target.port {
            if lock(port).take_secondary_reset() {
                self.reset_below(bdf);
            }
        }
        Ok(changes)
    }

    /// Conventional reset of every function below the port at `port_bdf`. Addresses are taken
    /// before any reset, since resetting a port below clears its bus numbers.
    fn reset_below(&self, port_bdf: Bdf) {
        let below: Vec<_> = {
            let bus0 = self.bus0.read().unwrap_or_else(|e| e.into_inner());
            let mut all = Vec::new();
            collect(&bus0, 0, &mut all);
            let port = all
                .iter()
                .find(|(bdf, _, _)| *bdf == port_bdf)
                .and_then(|(_, _, p)| p.clone());
            let range = port.and_then(|p| lock(&p).bus_range());
            all.into_iter()
                .filter(|(bdf, _, _)| range.as_ref().is_some_and(|r| r.contains(&bdf.bus)))
                .collect()
        };
        for (bdf, device, _) in below {
            log::debug!("{bdf}: secondary bus reset");
            let forwarding = Forwarding {
                observer: &*self.observer,
                bridges: self.bridges_above(&device),
            };
            if let Err(e) = update_decode(&device, bdf, &forwarding, |dev| dev.reset()) {
                log::error!("{bdf}: reset: {e}");
            }
        }
    }
}

impl PciSegment {
    /// The ports above `device` by position in the tree (root bus first); empty on the root
    /// bus or when it is not in the tree.
    fn bridges_above(&self, device: &SharedPciDevice) -> Vec<SharedPort> {
        fn search(
            nodes: &BTreeMap<u8, Node>,
            device: &SharedPciDevice,
            above: &mut Vec<SharedPort>,
        ) -> bool {
            for node in nodes.values() {
                if Arc::ptr_eq(&node.device, device) {
                    return true;
                }
                if let Some(port) = &node.port {
                    above.push(port.clone());
                    if search(&node.children, device, above) {
                        return true;
                    }
                    above.pop();
                }
            }
            false
        }
        let bus0 = self.bus0.read().unwrap_or_else(|e| e.into_inner());
        let mut above = Vec::new();
        if search(&bus0, device, &mut above) {
            above
        } else {
            Vec::new()
        }
    }

    /// Every decoding BAR of every function below the port `port` (by position), as a change
    /// from its range to itself with whether the bridges above forward it.
    fn reach_below(&self, port: &SharedPciDevice) -> Vec<(SharedPciDevice, BarChange)> {
        fn visit(
            nodes: &BTreeMap<u8, Node>,
            bus: u8,
            above: &mut Vec<SharedPort>,
            inside: bool,
            port: &SharedPciDevice,
            out: &mut Vec<(SharedPciDevice, BarChange)>,
        ) {
            for (devfn, node) in nodes {
                let bdf = Bdf::from_devfn(bus, *devfn);
                if inside {
                    let bars = decoding_bars(&*lock(&node.device));
                    for (bar, info, range) in bars {
                        let change = BarChange {
                            bdf,
                            bar,
                            kind: info.kind,
                            prefetchable: info.prefetchable,
                            old: Some(range),
                            new: Some(range),
                            forwarded: forwarded(above, info.kind, range),
                        };
                        out.push((node.device.clone(), change));
                    }
                }
                if let Some(p) = &node.port {
                    let secondary = lock(p).bus_range().map_or(0, |r| *r.start());
                    above.push(p.clone());
                    let below = inside || Arc::ptr_eq(&node.device, port);
                    visit(&node.children, secondary, above, below, port, out);
                    above.pop();
                }
            }
        }
        let bus0 = self.bus0.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        visit(&bus0, 0, &mut Vec::new(), false, port, &mut out);
        out
    }
}

/// Whether a config write of `len` bytes at `offset` to a bridge can change what it forwards:
/// its command register or its windows (I/O, memory, prefetchable with its upper halves).
fn touches_forwarding(offset: u16, len: usize) -> bool {
    let end = offset.saturating_add(len as u16);
    let hits = |start: u16, stop: u16| offset < stop && start < end;
    hits(COMMAND, COMMAND + 2) || hits(IO_BASE, PREF_LIMIT_UPPER32 + 4)
}

/// Whether every port in `bridges` forwards `range` of a BAR of `kind`.
fn forwarded(bridges: &[SharedPort], kind: BarKind, range: BusRange) -> bool {
    bridges.iter().all(|p| lock(p).forwards(kind, range))
}

/// The segment's observer for one function's accesses: tells the VMM's observer whether the
/// bridges above the function forward each new range ([`BarChange::forwarded`]).
struct Forwarding<'a> {
    observer: &'a dyn BarObserver,
    bridges: Vec<SharedPort>,
}

impl BarObserver for Forwarding<'_> {
    fn bar_changed(
        &self,
        device: &SharedPciDevice,
        change: &BarChange,
    ) -> Result<(), ObserverError> {
        let mut change = change.clone();
        change.forwarded = change
            .new
            .is_none_or(|range| forwarded(&self.bridges, change.kind, range));
        self.observer.bar_changed(device, &change)
    }

    fn forwarding_changed(&self, device: &SharedPciDevice, change: &BarChange) {
        self.observer.forwarding_changed(device, change);
    }
}

/// The children map of `parent` (the root bus for `None`).
fn children_of<'a>(
    bus0: &'a mut BTreeMap<u8, Node>,
    parent: Parent,
) -> Option<&'a mut BTreeMap<u8, Node>> {
    fn search<'a>(
        nodes: &'a mut BTreeMap<u8, Node>,
        port: &SharedPort,
    ) -> Option<&'a mut BTreeMap<u8, Node>> {
        for node in nodes.values_mut() {
            if node.port.as_ref().is_some_and(|p| Arc::ptr_eq(p, port)) {
                return Some(&mut node.children);
            }
            if let Some(found) = search(&mut node.children, port) {
                return Some(found);
            }
        }
        None
    }
    match parent {
        None => Some(bus0),
        Some(port) => search(bus0, port),
    }
}

/// Device numbers from the root bus down to `device` (its own last), matched by identity.
fn device_path(nodes: &BTreeMap<u8, Node>, device: &SharedPciDevice) -> Option<Vec<u8>> {
    for (devfn, node) in nodes {
        let below = if Arc::ptr_eq(&node.device, device) {
            Some(Vec::new())
        } else {
            device_path(&node.children, device)
        };
        if let Some(mut path) = below {
            path.insert(0, devfn >> 3);
            return Some(path);
        }
    }
    None
}

fn collect(
    nodes: &BTreeMap<u8, Node>,
    bus: u8,
    out: &mut Vec<(Bdf, SharedPciDevice, Option<SharedPort>)>,
) {
    for (devfn, node) in nodes {
        out.push((
            Bdf::from_devfn(bus, *devfn),
            node.device.clone(),
            node.port.clone(),
        ));
        let secondary = node
            .port
            .as_ref()
            .and_then(|p| lock(p).bus_range())
            .map(|r| *r.start())
            .filter(|s| *s > bus);
        if let Some(secondary) = secondary {
            collect(&node.children, secondary, out);
        }
    }
}

/// Splits an access at byte `reg` of config space into something a device accepts: 1 to 4
/// bytes inside one dword. Anything else reads as all-ones and is dropped on write.
fn valid_access(reg: u16, len: usize) -> bool {
    (1..=4).contains(&len) && usize::from(reg & 3) + len <= 4
}

/// The ECAM window as a bus device: offset = bus << 20 | device << 15 | function << 12 | reg.
/// Register it over the whole MCFG range (1 MiB per bus).
pub struct PciEcam {
    segment: Arc<PciSegment>,
}

impl PciEcam {
    pub fn new(segment: Arc<PciSegment>) -> Self {
        Self { segment }
    }

    fn decode(offset: u64, len: usize) -> Option<(Bdf, u16)> {
        let bus = u8::try_from(offset >> 20).ok()?;
        let devfn = ((offset >> 12) & 0xff) as u8;
        let reg = (offset & 0xfff) as u16;
        valid_access(reg, len).then_some((Bdf::from_devfn(bus, devfn), reg))
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::decode(offset, data.len()) {
            Some((bdf, reg)) => self.segment.config_read(bdf, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bdf, reg)) = Self::decode(offset, data.len()) {
            if let Err(e) = self.segment.config_write(bdf, reg, data) {
                log::warn!("{bdf}: config write at {reg:#x}: {e}");
            }
        }
    }
}

/// Configuration mechanism #1 over ports 0xCF8..0xD00: a dword address latch at 0xCF8 and a
/// data window at 0xCFC..0xD00. Bits 27:24 of the latch extend the register number to reach
/// extended config space, as AMD chipsets and QEMU allow.
pub struct PciConfigIo {
    segment: Arc<PciSegment>,
    address: u32,
}

const CF8_ENABLE: u32 = 1 << 31;
/// Enable, extended register, bus, devfn and dword register bits; the rest read as 0.
const CF8_WRITABLE: u32 = 0x8fff_fffc;

impl PciConfigIo {
    /// Length of the port range to register at 0xCF8.
    pub const LEN: u64 = 8;

    pub fn new(segment: Arc<PciSegment>) -> Self {
        Self {
            segment,
            address: 0,
        }
    }

    /// The function and register the data port at byte `byte` (0..4) addresses now.
    fn target(&self, byte: u64, len: usize) -> Option<(Bdf, u16)> {
        let a = self.address;
        if a & CF8_ENABLE == 0 {
            return None;
        }
        let reg = ((a & 0xfc) | ((a >> 16) & 0xf00)) as u16 + byte as u16;
        let bdf = Bdf::from_devfn((a >> 16) as u8, (a >> 8) as u8);
        valid_access(reg, len).then_some((bdf, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.target(offset - 4, data.len()) {
                Some((bdf, reg)) => self.segment.config_read(bdf, reg, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, <[u8; 4]>::try_from(data)) {
            // Only dword accesses hit the latch; byte accesses to 0xCF8..0xCFB belong to other
            // chipset registers (0xCF9 is the reset control register) and are ignored here.
            (0, Ok(value)) => self.address = u32::from_le_bytes(value) & CF8_WRITABLE,
            (4..=7, _) => {
                if let Some((bdf, reg)) = self.target(offset - 4, data.len()) {
                    if let Err(e) = self.segment.config_write(bdf, reg, data) {
                        log::warn!("{bdf}: config write at {reg:#x}: {e}");
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
#[path = "segment_tests.rs"]
mod tests;
