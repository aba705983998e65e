//! The firmware half of the topology builder: the planned tree, bus numbering, resource
//! assignment and register programming. Kept apart from the builder's public API so each file
//! does one job.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::super::acpi_hotplug::AcpiPort;
use super::super::bar::{bars_and_rom, BarInfo, BarKind, DECODE_SLOTS, ROM_BAR};
use super::super::port::PciePort;
use super::super::regs::*;
use super::super::resources::{
    bar_request, pack, reserve_request, sort, window_request, Allocators, Headroom, Request,
    WindowKind,
};
use super::super::segment::PciSegment;
use super::super::{lock, Bdf, SharedPciDevice};
use super::{HotplugReserve, HotplugSlotInfo, TopologyError};
use crate::bus::BusRange;

/// A function in the plan, with what the builder decided for it.
pub(super) struct Node {
    name: String,
    devfn: u8,
    device: SharedPciDevice,
    /// For ports: the port, its reserve, hotplug slot, bus numbers and windows.
    port: Option<PortPlan>,
    children: Vec<Node>,
    /// For endpoints: assigned BAR addresses, the expansion ROM's at [`ROM_BAR`].
    bars: [Option<(BarInfo, u64)>; DECODE_SLOTS],
}

pub(super) struct PortPlan {
    port: Arc<Mutex<PciePort>>,
    /// Room kept free below the port: the root-port reserve, or a hotplug slot's.
    reserve: Option<HotplugReserve>,
    /// Set for hotplug slots.
    slot: Option<SlotPlan>,
    buses: (u8, u8),
    /// Indexed like [`WindowKind::ALL`].
    windows: [Option<BusRange>; 3],
}

/// A hotplug slot as planned: its name, number (1..=[`super::MAX_HOTPLUG_SLOTS`]) and the
/// switch it belongs to, if any.
pub(super) struct SlotPlan {
    pub(super) name: String,
    pub(super) number: u32,
    pub(super) switch: Option<String>,
}

impl Node {
    pub(super) fn endpoint(name: &str, devfn: u8, device: SharedPciDevice) -> Self {
        Self {
            name: name.to_string(),
            devfn,
            device,
            port: None,
            children: Vec::new(),
            bars: [None; DECODE_SLOTS],
        }
    }

    pub(super) fn port(
        name: &str,
        devfn: u8,
        port: Arc<Mutex<PciePort>>,
        reserve: Option<HotplugReserve>,
    ) -> Self {
        Self {
            name: name.to_string(),
            devfn,
            device: port.clone(),
            port: Some(PortPlan {
                port,
                reserve,
                slot: None,
                buses: (0, 0),
                windows: [None; 3],
            }),
            children: Vec::new(),
            bars: [None; DECODE_SLOTS],
        }
    }

    pub(super) fn with_children(mut self, children: Vec<Node>) -> Self {
        self.children = children;
        self
    }

    /// Marks a port as a hotplug slot.
    pub(super) fn with_slot(mut self, slot: SlotPlan) -> Self {
        if let Some(plan) = &mut self.port {
            plan.slot = Some(slot);
        }
        self
    }
}

/// Depth-first bus numbering below `bus`; returns the last bus used. Counts past 255 so the
/// caller can say how many buses the topology needs; bus numbers beyond 255 are stored
/// saturated and never programmed because the caller rejects the topology first.
pub(super) fn number_buses(nodes: &mut [Node], bus: usize) -> usize {
    let mut last = bus;
    for node in nodes.iter_mut() {
        let Some(plan) = node.port.as_mut() else {
            continue;
        };
        let secondary = last + 1;
        let mut subordinate = number_buses(&mut node.children, secondary);
        if let Some(reserve) = plan.reserve {
            subordinate += usize::from(reserve.buses);
        }
        let saturate = |b: usize| u8::try_from(b).unwrap_or(u8::MAX);
        plan.buses = (saturate(secondary), saturate(subordinate));
        last = subordinate;
    }
    last
}

pub(super) fn attach(
    segment: &PciSegment,
    parent: Option<&Arc<Mutex<PciePort>>>,
    node: &Node,
) -> Result<(), TopologyError> {
    match &node.port {
        Some(plan) => {
            segment.add_port(parent, node.devfn, plan.port.clone())?;
            for child in &node.children {
                attach(segment, Some(&plan.port), child)?;
            }
        }
        None => segment.add_device(parent, node.devfn, node.device.clone())?,
    }
    Ok(())
}

/// Settings resource assignment needs everywhere in the tree.
pub(super) struct Ctx {
    /// Whether there is an I/O window at all; without one I/O BARs stay unassigned, as
    /// firmware leaves them when I/O space runs out (drivers of modern devices do not use them).
    pub(super) io: bool,
    /// Headroom of port windows, per window kind (indexed like [`WindowKind::ALL`]).
    pub(super) headroom: [Headroom; 3],
    /// Hotplug slot reserves are shifted right by this, per window kind: the last fallback
    /// when a host window cannot hold them even without headroom.
    pub(super) slot_shift: [u32; 3],
}

/// One thing `node` needs from its parent's windows.
#[derive(Clone, Copy)]
struct Want {
    kind: WindowKind,
    /// What to allocate: a BAR, or a port window with its headroom and hotplug reserve.
    request: Request,
    /// The same subtree packed with no headroom: what the port above holds on its behalf.
    held: Request,
    /// The BAR index, for endpoints (the expansion ROM is [`ROM_BAR`]).
    index: usize,
}

/// What `node` needs from its parent's windows, per window kind (an expansion ROM, being a
/// 32-bit BAR, comes from the 32-bit window).
///
/// A port's window is its children packed (their windows already grown), grown by the
/// headroom of its kind relative to what the subtree holds without headroom, then packed with
/// the port's reserve (root ports, hotplug slots): the reserve is room for another device, the
/// headroom room for the devices already there to move.
fn requests(node: &Node, ctx: &Ctx) -> Result<Vec<Want>, TopologyError> {
    let Some(plan) = &node.port else {
        let bars = bars_and_rom(&*lock(&node.device));
        let mut out = Vec::new();
        for (i, bar) in bars.iter().enumerate() {
            let Some(bar) = bar else { continue };
            let min = if bar.kind == BarKind::Io { 4 } else { 16 };
            if !bar.size.is_power_of_two() || bar.size < min {
                return Err(TopologyError::InvalidBar {
                    id: node.name.clone(),
                    bar: i as u8,
                    size: bar.size,
                });
            }
            let (kind, request) = bar_request(bar);
            if kind == WindowKind::Io && !ctx.io {
                log::warn!("{}: BAR {i} left unassigned: no I/O window", node.name);
                continue;
            }
            out.push(Want {
                kind,
                request,
                held: request,
                index: i,
            });
        }
        return Ok(out);
    };
    let mut below = Vec::new();
    for child in &node.children {
        below.extend(requests(child, ctx)?);
    }
    let mut out = Vec::new();
    for kind in WindowKind::ALL {
        let of_kind = below.iter().filter(|w| w.kind == kind);
        let children: Vec<_> = of_kind.clone().map(|w| w.request).collect();
        let held: Vec<_> = of_kind.map(|w| w.held).collect();
        let reserve = plan.reserve.and_then(|r| {
            let shift = if plan.slot.is_some() {
                ctx.slot_shift[kind as usize]
            } else {
                0
            };
            match kind {
                WindowKind::Io => None,
                WindowKind::Mem32 => reserve_request(kind, r.mem32 >> shift),
                WindowKind::Pref64 => reserve_request(kind, r.pref64 >> shift),
            }
        });
        let grown = window_request(kind, &children)
            .zip(pack(&held))
            .map(|(children, held)| ctx.headroom[kind as usize].apply(kind, children, held));
        let request = window_request(
            kind,
            &[grown, reserve].into_iter().flatten().collect::<Vec<_>>(),
        );
        // The reserve is room for devices that are not there yet, so the ports above do not
        // grow their headroom for it (they still contain it: `request` includes it).
        let held = pack(&held).unwrap_or(Request { size: 0, align: 1 });
        if let Some(request) = request {
            out.push(Want {
                kind,
                request,
                held,
                index: 0,
            });
        }
    }
    Ok(out)
}

/// Forgets every address an earlier, failed [`assign`] handed out, before a retry with less
/// headroom.
pub(super) fn clear_assignment(nodes: &mut [Node]) {
    for node in nodes {
        node.bars = [None; DECODE_SLOTS];
        if let Some(plan) = &mut node.port {
            plan.windows = [None; 3];
        }
        clear_assignment(&mut node.children);
    }
}

/// Allocates the BARs and windows of `nodes` from `allocators`, then recurses into each port's
/// own windows. Largest alignment first, matching how the windows were sized.
pub(super) fn assign(
    nodes: &mut [Node],
    allocators: &mut Allocators,
    ctx: &Ctx,
) -> Result<(), TopologyError> {
    let mut wanted = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for want in requests(node, ctx)? {
            wanted.push((want, n));
        }
    }
    let mut order: Vec<_> = wanted
        .iter()
        .enumerate()
        .map(|(i, w)| (w.0.request, i))
        .collect();
    sort(&mut order);
    for (_, i) in order {
        let (want, n) = wanted[i];
        let node = &mut nodes[n];
        let (kind, request) = (want.kind, want.request);
        let address =
            allocators
                .allocate(kind, request)
                .ok_or_else(|| TopologyError::OutOfSpace {
                    owner: node.name.clone(),
                    window: kind,
                    size: request.size,
                })?;
        match &mut node.port {
            Some(plan) => plan.windows[kind as usize] = Some(BusRange::new(address, request.size)),
            None => {
                let bar = bars_and_rom(&*lock(&node.device))[want.index];
                node.bars[want.index] = bar.map(|b| (b, address));
            }
        }
    }
    for node in nodes.iter_mut() {
        if let Some(plan) = &node.port {
            let mut inner = Allocators::new(plan.windows);
            assign(&mut node.children, &mut inner, ctx)?;
        }
    }
    Ok(())
}

fn write(segment: &PciSegment, bdf: Bdf, offset: u16, data: &[u8]) -> Result<(), TopologyError> {
    segment.config_write(bdf, offset, data)?;
    Ok(())
}

/// Names and handles collected while programming.
#[derive(Default)]
pub(super) struct Placed {
    pub(super) bdfs: BTreeMap<String, Bdf>,
    pub(super) ports: BTreeMap<String, Arc<Mutex<PciePort>>>,
    pub(super) slots: Vec<HotplugSlotInfo>,
}

/// Programs `node` (on `bus`) and everything below it, parents first so routing reaches the
/// children. Endpoints get decoding turned off while their BARs are written, so the observer
/// sees one registration per BAR and no transient moves, then the decode enables for the BARs
/// they have; bus mastering is left to their drivers (`pci_set_master`), as firmware without a
/// driver for them leaves it. An expansion ROM gets its address with the ROM enable bit clear,
/// as firmware leaves it: the guest sets it while it reads the ROM. Ports get memory, I/O (with
/// an I/O window) and bus master enabled, so DMA from below is forwarded upstream.
pub(super) fn program(
    segment: &PciSegment,
    bus: u8,
    node: &Node,
    placed: &mut Placed,
) -> Result<(), TopologyError> {
    let bdf = Bdf::from_devfn(bus, node.devfn);
    let Some(plan) = &node.port else {
        placed.bdfs.insert(node.name.clone(), bdf);
        write(segment, bdf, COMMAND, &0u16.to_le_bytes())?;
        let mut command = 0;
        for (i, (bar, address)) in node
            .bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| Some((i, (*b)?)))
        {
            let offset = if i == usize::from(ROM_BAR) {
                ROM_ADDRESS
            } else {
                BAR0 + 4 * i as u16
            };
            write(segment, bdf, offset, &(address as u32).to_le_bytes())?;
            if bar.kind == BarKind::Mem64 {
                write(
                    segment,
                    bdf,
                    offset + 4,
                    &((address >> 32) as u32).to_le_bytes(),
                )?;
            }
            command |= if bar.kind == BarKind::Io {
                COMMAND_IO
            } else {
                COMMAND_MEMORY
            };
        }
        return write(segment, bdf, COMMAND, &command.to_le_bytes());
    };
    placed.ports.insert(node.name.clone(), plan.port.clone());
    let (secondary, subordinate) = plan.buses;
    if let Some(slot) = &plan.slot {
        placed.slots.push(HotplugSlotInfo {
            name: slot.name.clone(),
            number: slot.number,
            port: plan.port.clone(),
            bdf: Bdf::new(secondary, 0, 0),
            switch: slot.switch.clone(),
        });
    }
    write(segment, bdf, PRIMARY_BUS, &[bus, secondary, subordinate])?;
    let [io, mem, pref] = plan.windows;
    let mut command = COMMAND_MEMORY | COMMAND_MASTER;
    if let Some(io) = io {
        let (base, limit) = (io.base, io.end() - 1);
        write(
            segment,
            bdf,
            IO_BASE,
            &[(base >> 8) as u8 & 0xf0, (limit >> 8) as u8 & 0xf0],
        )?;
        command |= COMMAND_IO;
    }
    if let Some(mem) = mem {
        let (base, limit) = (mem.base, mem.end() - 1);
        let value = ((base >> 16) as u32 & 0xfff0) | (((limit >> 16) as u32 & 0xfff0) << 16);
        write(segment, bdf, MEMORY_BASE, &value.to_le_bytes())?;
    }
    if let Some(pref) = pref {
        let (base, limit) = (pref.base, pref.end() - 1);
        write(
            segment,
            bdf,
            PREF_BASE_UPPER32,
            &((base >> 32) as u32).to_le_bytes(),
        )?;
        write(
            segment,
            bdf,
            PREF_LIMIT_UPPER32,
            &((limit >> 32) as u32).to_le_bytes(),
        )?;
        let value = ((base >> 16) as u32 & 0xfff0) | (((limit >> 16) as u32 & 0xfff0) << 16);
        write(segment, bdf, PREF_MEMORY_BASE, &value.to_le_bytes())?;
    }
    write(segment, bdf, COMMAND, &command.to_le_bytes())?;
    for child in &node.children {
        program(segment, secondary, child, placed)?;
    }
    Ok(())
}

/// The ports of the tree as the DSDT mirrors them: every port with its devfn, slots marked.
pub(super) fn describe(nodes: &[Node]) -> Vec<AcpiPort> {
    nodes
        .iter()
        .filter_map(|node| {
            let plan = node.port.as_ref()?;
            Some(AcpiPort {
                devfn: node.devfn,
                slot: plan.slot.as_ref().map(|s| s.number),
                children: describe(&node.children),
            })
        })
        .collect()
}
