use super::*;
use crate::pci::config::{BarDef, Type0Config};
use crate::pci::fake::{FakeEndpoint, FakeMsiSink, HoldingMsiSink, MsiEvent};

const VECTORS: u16 = 8;
const PBA: u64 = 0x2000;

fn layout() -> MsixConfig {
    MsixConfig {
        vectors: VECTORS,
        table_bar: 0,
        table_offset: 0,
        pba_bar: 0,
        pba_offset: PBA,
    }
}

fn config_with_bar() -> Type0Config {
    let mut config = Type0Config::new(&FakeEndpoint::IDS);
    config.add_bar(0, BarDef::mem32(0x4000)).unwrap();
    config.add_bar(1, BarDef::io(0x20)).unwrap();
    config
}

struct Harness {
    config: Type0Config,
    msix: Msix,
    sink: FakeMsiSink,
}

impl Harness {
    fn new() -> Self {
        let mut config = config_with_bar();
        let msix = Msix::add(&mut config, layout()).unwrap();
        Self {
            config,
            msix,
            sink: FakeMsiSink::new(),
        }
    }

    fn control(&mut self, value: u16) {
        self.config
            .write(self.msix.cap_range().start + 2, &value.to_le_bytes());
        self.msix.update(self.config.regs(), &self.sink);
    }

    fn table_write(&mut self, offset: u64, data: &[u8]) {
        assert!(self.msix.bar_write(0, offset, data, &self.sink));
    }

    /// Programs entry `v` with address 0xfee0_0000 and data 0x40 + v, leaving its mask alone.
    fn program(&mut self, v: u16) {
        let base = u64::from(v) * 16;
        self.table_write(base, &0xfee0_0000u64.to_le_bytes());
        self.table_write(base + 8, &(0x40 + u32::from(v)).to_le_bytes());
    }

    fn set_masked(&mut self, v: u16, masked: bool) {
        self.table_write(u64::from(v) * 16 + 12, &u32::from(masked).to_le_bytes());
    }

    fn read(&self, offset: u64) -> u32 {
        let mut data = [0; 4];
        assert!(self.msix.bar_read(0, offset, &mut data, &self.sink));
        u32::from_le_bytes(data)
    }
}

fn msg(v: u16) -> MsiMessage {
    MsiMessage {
        address: 0xfee0_0000,
        data: 0x40 + u32::from(v),
    }
}

const ENABLE: u16 = 1 << 15;
const FUNCTION_MASK: u16 = 1 << 14;

#[test]
fn capability_describes_the_table_and_pba() {
    let h = Harness::new();
    let cap = h.msix.cap_range().start;
    assert_eq!(h.config.regs().read_u32(cap), 0x0007_0011);
    assert_eq!(h.config.regs().read_u32(cap + 4), 0);
    assert_eq!(h.config.regs().read_u32(cap + 8), 0x2000);
    assert_eq!(h.msix.table_range(), (0, 0..0x80));
    assert_eq!(h.msix.pba_range(), (0, 0x2000..0x2008));
}

#[test]
fn placement_is_checked_against_the_bars() {
    let mut config = config_with_bar();
    let err = |c: &mut Type0Config, l| Msix::add(c, l).err();
    assert_eq!(
        err(
            &mut config,
            MsixConfig {
                table_bar: 2,
                ..layout()
            }
        ),
        Some(MsixError::Bar { bar: 2 })
    );
    assert_eq!(
        err(
            &mut config,
            MsixConfig {
                pba_bar: 1,
                ..layout()
            }
        ),
        Some(MsixError::Bar { bar: 1 }),
        "I/O BARs cannot hold MSI-X structures"
    );
    assert!(matches!(
        err(
            &mut config,
            MsixConfig {
                table_offset: 4,
                ..layout()
            }
        ),
        Some(MsixError::Placement { what: "table", .. })
    ));
    assert!(matches!(
        err(
            &mut config,
            MsixConfig {
                pba_offset: 0x3ffc,
                ..layout()
            }
        ),
        Some(MsixError::Placement { what: "PBA", .. })
    ));
    assert_eq!(
        err(
            &mut config,
            MsixConfig {
                pba_offset: 0x40,
                ..layout()
            }
        ),
        Some(MsixError::Overlap { bar: 0 })
    );
    assert_eq!(
        err(
            &mut config,
            MsixConfig {
                vectors: 0,
                ..layout()
            }
        ),
        Some(MsixError::Vectors(0))
    );
}

#[test]
fn table_entries_start_masked() {
    let h = Harness::new();
    assert_eq!(h.read(12), 1);
    assert_eq!(h.read(VECTORS as u64 * 16 - 4), 1);
}

#[test]
fn vector_control_keeps_only_the_mask_bit() {
    let mut h = Harness::new();
    h.table_write(12, &u32::MAX.to_le_bytes());
    assert_eq!(h.read(12), 1);
}

#[test]
fn linux_style_enable_reports_each_vector_once_it_is_unmasked() {
    let mut h = Harness::new();
    h.control(ENABLE | FUNCTION_MASK);
    assert_eq!(h.sink.take(), vec![MsiEvent::Enable(true)]);
    h.program(0);
    h.set_masked(0, false);
    assert!(h.sink.take().is_empty(), "function mask still set");
    h.control(ENABLE);
    assert_eq!(h.sink.take(), vec![MsiEvent::Vector(0, Some(msg(0)))]);
}

#[test]
fn entry_mask_toggles_one_vector() {
    let mut h = Harness::new();
    h.control(ENABLE);
    h.sink.take();
    h.program(3);
    h.set_masked(3, false);
    assert_eq!(h.sink.take(), vec![MsiEvent::Vector(3, Some(msg(3)))]);
    h.set_masked(3, true);
    assert_eq!(h.sink.take(), vec![MsiEvent::Vector(3, None)]);
}

#[test]
fn reprogramming_an_unmasked_entry_updates_its_route() {
    let mut h = Harness::new();
    h.control(ENABLE);
    h.program(1);
    h.set_masked(1, false);
    h.sink.take();
    h.table_write(16 + 8, &0x99u32.to_le_bytes());
    assert_eq!(
        h.sink.take(),
        vec![MsiEvent::Vector(
            1,
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x99
            })
        )]
    );
}

#[test]
fn qword_and_byte_table_accesses_work() {
    let mut h = Harness::new();
    h.table_write(32, &0x1_2345_6780u64.to_le_bytes());
    assert_eq!(h.read(32), 0x2345_6780);
    assert_eq!(h.read(36), 1);
    h.table_write(40, &[0xab]);
    assert_eq!(h.read(40), 0xab);
}

#[test]
fn a_masked_vector_becomes_pending_and_fires_on_unmask() {
    let mut h = Harness::new();
    h.control(ENABLE);
    h.sink.take();
    h.program(2);
    h.msix.signal_masked(2, &h.sink);
    assert!(h.msix.pending(2));
    assert_eq!(h.read(PBA), 0b100);
    h.set_masked(2, false);
    assert_eq!(
        h.sink.take(),
        vec![
            MsiEvent::Vector(2, Some(msg(2))),
            MsiEvent::Inject(2, msg(2))
        ]
    );
    assert!(!h.msix.pending(2));
}

#[test]
fn clearing_the_function_mask_delivers_pending_vectors() {
    let mut h = Harness::new();
    h.control(ENABLE | FUNCTION_MASK);
    h.program(0);
    h.set_masked(0, false);
    h.msix.signal_masked(0, &h.sink);
    assert!(h.msix.pending(0));
    h.sink.take();
    h.control(ENABLE);
    assert_eq!(
        h.sink.take(),
        vec![
            MsiEvent::Vector(0, Some(msg(0))),
            MsiEvent::Inject(0, msg(0))
        ]
    );
}

#[test]
fn pba_shows_interrupts_held_outside_the_model_for_masked_vectors() {
    let mut h = Harness::new();
    let holding = HoldingMsiSink(vec![1, 2]);
    let pba = |h: &Harness| {
        let mut data = [0; 8];
        assert!(h.msix.bar_read(0, PBA, &mut data, &holding));
        u64::from_le_bytes(data)
    };
    h.control(ENABLE);
    h.program(1);
    h.program(2);
    h.set_masked(2, false);
    assert_eq!(
        pba(&h),
        0b010,
        "vector 1 is masked, 2 is routed and delivers itself"
    );
    h.control(ENABLE | FUNCTION_MASK);
    assert_eq!(pba(&h), 0b110, "the function mask masks every vector");
    h.control(0);
    assert_eq!(pba(&h), 0, "nothing is pending while MSI-X is disabled");
    // The default sink holds nothing.
    h.control(ENABLE);
    assert_eq!(h.read(PBA), 0);
}

#[test]
fn pba_is_read_only() {
    let mut h = Harness::new();
    h.control(ENABLE);
    h.msix.signal_masked(1, &h.sink);
    assert!(h.msix.bar_write(0, PBA, &0u64.to_le_bytes(), &h.sink));
    assert_eq!(h.read(PBA), 0b10);
}

#[test]
fn signals_while_disabled_are_dropped() {
    let mut h = Harness::new();
    h.msix.signal_masked(0, &h.sink);
    assert!(!h.msix.pending(0));
    assert!(h.sink.take().is_empty());
}

#[test]
fn accesses_outside_the_table_and_pba_are_not_handled() {
    let mut h = Harness::new();
    let mut data = [0; 4];
    assert!(!h.msix.bar_read(0, 0x1000, &mut data, &h.sink));
    assert!(!h.msix.bar_read(1, 0, &mut data, &h.sink));
    assert!(!h.msix.bar_write(0, 0x3000, &data, &h.sink));
}

#[test]
fn disabling_reports_the_disable_first() {
    let mut h = Harness::new();
    h.control(ENABLE);
    h.program(0);
    h.set_masked(0, false);
    h.sink.take();
    h.control(0);
    assert_eq!(
        h.sink.take(),
        vec![MsiEvent::Enable(false), MsiEvent::Vector(0, None)]
    );
}

#[test]
fn reset_masks_the_table_and_disables() {
    let mut h = Harness::new();
    h.control(ENABLE);
    h.program(0);
    h.set_masked(0, false);
    h.sink.take();
    h.config.reset();
    h.msix.reset(h.config.regs(), &h.sink);
    assert_eq!(
        h.sink.take(),
        vec![MsiEvent::Enable(false), MsiEvent::Vector(0, None)]
    );
    assert_eq!(h.read(12), 1);
    assert_eq!(h.read(0), 0);
}
