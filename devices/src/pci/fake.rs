//! Test doubles that check the invariants the real implementations rely on, so unit tests (here
//! and in the VMM) fail at the first inconsistent call rather than at a confusing assertion
//! later.
//!
//! - [`FakeBarObserver`] keeps the live BAR ranges and panics when a range is added over a live
//!   one or a range that is not live is removed; failures can be injected to test rollback.
//! - [`FakeMsiSink`] records interrupt routing calls and panics when a pending message is
//!   injected for a vector the VMM was told is masked.
//! - [`FakeEndpoint`] is a plain type-0 function with whatever BARs, expansion ROM and
//!   capabilities a test declares.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::bar::{BarChange, BarKind, BarObserver, ObserverError};
use super::config::{BarDef, ConfigError, PciIds, Type0Config};
use super::msi::{MsiMessage, MsiSink};
use super::{lock, BarInfo, Bdf, PciDevice, RomInfo, SharedPciDevice};
use crate::bus::BusRange;

/// A range a [`FakeBarObserver`] currently has mapped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveBar {
    pub bdf: Bdf,
    pub bar: u8,
    pub kind: BarKind,
    pub range: BusRange,
}

type RejectFn = Box<dyn Fn(&BarChange) -> bool + Send>;

#[derive(Default)]
struct ObserverState {
    /// Keyed by device identity and BAR number: BDFs change when the guest renumbers buses.
    live: BTreeMap<(usize, u8), LiveBar>,
    history: Vec<BarChange>,
    /// `forwarding_changed` calls, in order.
    forwarding: Vec<BarChange>,
    reject: Option<RejectFn>,
}

/// Records BAR changes like a VMM's MMIO and port I/O buses would.
#[derive(Default)]
pub struct FakeBarObserver {
    state: Mutex<ObserverState>,
}

impl FakeBarObserver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `bar_changed` fail (without changing anything) for changes matching `predicate`.
    pub fn reject_when(&self, predicate: impl Fn(&BarChange) -> bool + Send + 'static) {
        lock(&self.state).reject = Some(Box::new(predicate));
    }

    /// The ranges currently mapped, in no particular order.
    pub fn live(&self) -> Vec<LiveBar> {
        lock(&self.state).live.values().cloned().collect()
    }

    /// The live range of `bar` of the function currently at `bdf`.
    pub fn range_of(&self, bdf: Bdf, bar: u8) -> Option<BusRange> {
        lock(&self.state)
            .live
            .values()
            .find(|l| l.bdf == bdf && l.bar == bar)
            .map(|l| l.range)
    }

    /// Every change accepted so far, in order.
    pub fn history(&self) -> Vec<BarChange> {
        lock(&self.state).history.clone()
    }

    /// Every `forwarding_changed` call so far, in order.
    pub fn forwarding(&self) -> Vec<BarChange> {
        lock(&self.state).forwarding.clone()
    }
}

fn same_space(a: BarKind, b: BarKind) -> bool {
    (a == BarKind::Io) == (b == BarKind::Io)
}

impl BarObserver for FakeBarObserver {
    fn bar_changed(
        &self,
        device: &SharedPciDevice,
        change: &BarChange,
    ) -> Result<(), ObserverError> {
        let mut state = lock(&self.state);
        if state.reject.as_ref().is_some_and(|f| f(change)) {
            return Err(format!("test rejects {change}").into());
        }
        let key = (Arc::as_ptr(device) as *const () as usize, change.bar);
        if let Some(old) = change.old {
            match state.live.get(&key) {
                Some(live) if live.range == old => {
                    state.live.remove(&key);
                }
                other => panic!("{change}: removing a range that is not live (live: {other:?})"),
            }
        }
        if let Some(new) = change.new {
            if let Some(clash) = state
                .live
                .values()
                .find(|l| same_space(l.kind, change.kind) && l.range.overlaps(&new))
            {
                panic!(
                    "{change}: overlaps live {} BAR {} at {}",
                    clash.bdf, clash.bar, clash.range
                );
            }
            let live = LiveBar {
                bdf: change.bdf,
                bar: change.bar,
                kind: change.kind,
                range: new,
            };
            assert!(
                state.live.insert(key, live).is_none(),
                "{change}: BAR mapped twice"
            );
        }
        state.history.push(change.clone());
        Ok(())
    }

    fn forwarding_changed(&self, device: &SharedPciDevice, change: &BarChange) {
        let mut state = lock(&self.state);
        let key = (Arc::as_ptr(device) as *const () as usize, change.bar);
        let live = state.live.get(&key).map(|l| l.range);
        assert!(
            change.old == change.new && live == change.new,
            "{change}: forwarding of a range that is not live (live: {live:?})"
        );
        state.forwarding.push(change.clone());
    }
}

/// A call a [`FakeMsiSink`] received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MsiEvent {
    Vector(u16, Option<MsiMessage>),
    Enable(bool),
    Inject(u16, MsiMessage),
}

#[derive(Default)]
struct SinkState {
    events: Vec<MsiEvent>,
    routes: BTreeMap<u16, MsiMessage>,
}

/// Records MSI routing calls and keeps the routes they imply.
#[derive(Default)]
pub struct FakeMsiSink {
    state: Mutex<SinkState>,
}

impl FakeMsiSink {
    pub fn new() -> Self {
        Self::default()
    }

    /// The calls received since the last `take`.
    pub fn take(&self) -> Vec<MsiEvent> {
        std::mem::take(&mut lock(&self.state).events)
    }

    /// The message routed for `vector`, if it is routed (unmasked and enabled).
    pub fn route(&self, vector: u16) -> Option<MsiMessage> {
        lock(&self.state).routes.get(&vector).copied()
    }
}

impl MsiSink for FakeMsiSink {
    fn vector_changed(&self, vector: u16, message: Option<MsiMessage>) {
        let mut state = lock(&self.state);
        match message {
            Some(m) => state.routes.insert(vector, m),
            None => state.routes.remove(&vector),
        };
        state.events.push(MsiEvent::Vector(vector, message));
    }

    fn enable_changed(&self, enabled: bool) {
        lock(&self.state).events.push(MsiEvent::Enable(enabled));
    }

    fn inject(&self, vector: u16, message: MsiMessage) {
        let mut state = lock(&self.state);
        assert_eq!(
            state.routes.get(&vector),
            Some(&message),
            "vector {vector} injected without a matching route"
        );
        state.events.push(MsiEvent::Inject(vector, message));
    }
}

/// Routes nothing and holds interrupts for some vectors outside the model, as a passthrough
/// device's eventfds do while their vectors have no route.
pub struct HoldingMsiSink(pub Vec<u16>);

impl MsiSink for HoldingMsiSink {
    fn vector_changed(&self, _vector: u16, _message: Option<MsiMessage>) {}
    fn enable_changed(&self, _enabled: bool) {}
    fn inject(&self, _vector: u16, _message: MsiMessage) {}
    fn held(&self, vector: u16) -> bool {
        self.0.contains(&vector)
    }
}

/// A plain endpoint: a type-0 config space and BARs that read back a recognisable pattern.
pub struct FakeEndpoint {
    name: String,
    pub config: Type0Config,
    /// BAR writes received, as (bar, offset, bytes).
    pub bar_writes: Vec<(u8, u64, Vec<u8>)>,
    pub resets: usize,
}

impl FakeEndpoint {
    pub const IDS: PciIds = PciIds {
        vendor_id: 0x1b36,
        // QEMU's "PCI test device" ID: nothing in a guest binds to it.
        device_id: 0x0005,
        revision: 0,
        class_code: 0xff_00_00,
        subsystem_vendor_id: 0x1b36,
        subsystem_id: 0x0005,
    };

    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            config: Type0Config::new(&Self::IDS),
            bar_writes: Vec::new(),
            resets: 0,
        }
    }

    pub fn with_bars(name: &str, bars: &[(usize, BarDef)]) -> Result<Self, ConfigError> {
        let mut dev = Self::new(name);
        for (index, def) in bars {
            dev.config.add_bar(*index, *def)?;
        }
        Ok(dev)
    }

    pub fn shared(self) -> Arc<Mutex<FakeEndpoint>> {
        Arc::new(Mutex::new(self))
    }
}

impl PciDevice for FakeEndpoint {
    fn name(&self) -> &str {
        &self.name
    }

    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn bars(&self) -> [Option<BarInfo>; 6] {
        self.config.bars()
    }

    fn rom(&self) -> Option<RomInfo> {
        self.config.rom()
    }

    fn command(&self) -> u16 {
        self.config.command()
    }

    /// Byte `i` of BAR `b` reads as `b << 4 | i & 0xf`.
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = (bar << 4) | ((offset as u8).wrapping_add(i as u8) & 0xf);
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        self.bar_writes.push((bar, offset, data.to_vec()));
    }

    fn reset(&mut self) {
        self.config.reset();
        self.resets += 1;
    }
}
