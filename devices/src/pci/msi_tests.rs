use super::*;
use crate::pci::config::{PciIds, Type0Config};
use crate::pci::fake::{FakeEndpoint, FakeMsiSink, HoldingMsiSink, MsiEvent};

const IDS: PciIds = FakeEndpoint::IDS;
const ADDRESS: u32 = 0xfee0_0000;

struct Harness {
    config: Type0Config,
    msi: MsiCap,
    sink: FakeMsiSink,
}

impl Harness {
    fn new(vectors: u8, is_64bit: bool, per_vector_mask: bool) -> Self {
        let mut config = Type0Config::new(&IDS);
        let msi = MsiCap::add(
            &mut config,
            MsiConfig {
                vectors,
                is_64bit,
                per_vector_mask,
            },
        )
        .unwrap();
        Self {
            config,
            msi,
            sink: FakeMsiSink::new(),
        }
    }

    /// A guest write at `reg` (relative to the capability) followed by the device's update.
    fn write(&mut self, reg: u16, data: &[u8]) {
        self.config.write(self.msi.range().start + reg, data);
        self.msi.update(self.config.regs_mut(), &self.sink);
    }

    fn read32(&self, reg: u16) -> u32 {
        self.config.regs().read_u32(self.msi.range().start + reg)
    }

    /// Address, data and enable with `mme` (log2 of the vectors enabled), as Linux does it.
    fn program(&mut self, data_reg: u16, data: u16, mme: u16) {
        self.write(4, &ADDRESS.to_le_bytes());
        self.write(data_reg, &data.to_le_bytes());
        self.write(2, &(1 | (mme << 4)).to_le_bytes());
    }

    fn signal(&mut self, vector: u16) {
        self.msi
            .signal_masked(self.config.regs_mut(), vector, &self.sink);
    }
}

fn msg(data: u32) -> Option<MsiMessage> {
    Some(MsiMessage {
        address: ADDRESS.into(),
        data,
    })
}

#[test]
fn capability_layout_follows_the_declared_features() {
    let h = Harness::new(4, true, true);
    // ID 5, next 0, 4 vectors capable (MMC = 2), 64-bit, per-vector masking.
    assert_eq!(h.read32(0), 0x0184_0005);
    assert_eq!(h.msi.range(), 0x40..0x58);
    let h = Harness::new(1, false, false);
    assert_eq!(h.msi.range(), 0x40..0x4a);
}

#[test]
fn vector_counts_must_be_powers_of_two_up_to_32() {
    let mut config = Type0Config::new(&IDS);
    let bad = MsiConfig {
        vectors: 3,
        is_64bit: false,
        per_vector_mask: false,
    };
    assert_eq!(
        MsiCap::add(&mut config, bad).err(),
        Some(MsiError::Vectors(3))
    );
    let too_many = MsiConfig { vectors: 64, ..bad };
    assert_eq!(
        MsiCap::add(&mut config, too_many).err(),
        Some(MsiError::Vectors(64))
    );
}

#[test]
fn enabling_reports_the_vector_then_the_enable() {
    let mut h = Harness::new(1, false, false);
    h.program(8, 0x4041, 0);
    assert_eq!(
        h.sink.take(),
        vec![MsiEvent::Vector(0, msg(0x4041)), MsiEvent::Enable(true)]
    );
    assert!(h.msi.enabled());
}

#[test]
fn nothing_is_reported_while_disabled() {
    let mut h = Harness::new(1, false, false);
    h.write(4, &ADDRESS.to_le_bytes());
    h.write(8, &0x41u16.to_le_bytes());
    assert!(h.sink.take().is_empty());
}

#[test]
fn multiple_messages_put_the_vector_in_the_low_data_bits() {
    let mut h = Harness::new(8, false, false);
    h.program(8, 0x4047, 2);
    assert_eq!(
        h.sink.take(),
        vec![
            MsiEvent::Vector(0, msg(0x4044)),
            MsiEvent::Vector(1, msg(0x4045)),
            MsiEvent::Vector(2, msg(0x4046)),
            MsiEvent::Vector(3, msg(0x4047)),
            MsiEvent::Enable(true),
        ]
    );
}

#[test]
fn multiple_message_enable_is_capped_at_what_the_function_offers() {
    let mut h = Harness::new(2, false, false);
    h.program(8, 0x40, 5);
    let vectors = h
        .sink
        .take()
        .into_iter()
        .filter(|e| matches!(e, MsiEvent::Vector(..)))
        .count();
    assert_eq!(vectors, 2);
}

#[test]
fn a_64bit_address_combines_both_registers() {
    let mut h = Harness::new(1, true, false);
    h.write(8, &0x1u32.to_le_bytes());
    h.program(0xc, 0x30, 0);
    assert_eq!(
        h.sink.route(0),
        Some(MsiMessage {
            address: 0x1_fee0_0000,
            data: 0x30
        })
    );
}

#[test]
fn disabling_reports_the_disable_before_withdrawing_vectors() {
    let mut h = Harness::new(2, false, false);
    h.program(8, 0x40, 1);
    h.sink.take();
    h.write(2, &0u16.to_le_bytes());
    assert_eq!(
        h.sink.take(),
        vec![
            MsiEvent::Enable(false),
            MsiEvent::Vector(0, None),
            MsiEvent::Vector(1, None),
        ]
    );
}

#[test]
fn masking_withdraws_the_vector_and_unmasking_delivers_what_was_pending() {
    let mut h = Harness::new(2, false, true);
    h.program(8, 0x40, 1);
    h.sink.take();
    h.write(0xc, &0b10u32.to_le_bytes());
    assert_eq!(h.sink.take(), vec![MsiEvent::Vector(1, None)]);
    h.signal(1);
    assert_eq!(h.read32(0x10), 0b10, "pending bit set");
    assert!(h.sink.take().is_empty());
    h.write(0xc, &0u32.to_le_bytes());
    assert_eq!(
        h.sink.take(),
        vec![
            MsiEvent::Vector(1, msg(0x41)),
            MsiEvent::Inject(1, msg(0x41).unwrap())
        ]
    );
    assert_eq!(h.read32(0x10), 0, "pending bit cleared");
}

#[test]
fn pending_bits_are_read_only_to_the_guest() {
    let mut h = Harness::new(2, false, true);
    h.program(8, 0x40, 1);
    h.write(0xc, &0b1u32.to_le_bytes());
    h.signal(0);
    h.write(0x10, &0u32.to_le_bytes());
    assert_eq!(h.read32(0x10), 0b1);
}

#[test]
fn a_signal_on_an_unmasked_vector_is_delivered_directly() {
    let mut h = Harness::new(1, false, true);
    h.program(8, 0x40, 0);
    h.sink.take();
    h.signal(0);
    assert_eq!(h.sink.take(), vec![MsiEvent::Inject(0, msg(0x40).unwrap())]);
}

#[test]
fn signals_while_disabled_or_out_of_range_are_dropped() {
    let mut h = Harness::new(2, false, true);
    h.signal(0);
    h.program(8, 0x40, 0);
    h.sink.take();
    h.signal(1);
    assert!(h.sink.take().is_empty());
    assert_eq!(h.read32(0x10), 0);
}

#[test]
fn reset_disables_and_withdraws_routes() {
    let mut h = Harness::new(1, false, false);
    h.program(8, 0x40, 0);
    h.sink.take();
    h.config.reset();
    h.msi.update(h.config.regs_mut(), &h.sink);
    assert_eq!(
        h.sink.take(),
        vec![MsiEvent::Enable(false), MsiEvent::Vector(0, None)]
    );
}

#[test]
fn pending_bits_show_interrupts_held_outside_the_model_for_masked_vectors() {
    let mut h = Harness::new(4, true, true);
    let holding = HoldingMsiSink(vec![1, 2, 3]);
    let pending_at = h.msi.range().start + 0x14;
    let read = |h: &Harness, offset: u16, len: usize| {
        let mut data = vec![0; len];
        h.config.read(offset, &mut data);
        h.msi
            .merge_held(h.config.regs(), offset, &mut data, &holding);
        data
    };
    h.program(0xc, 0x40, 1); // two of the four vectors enabled
    h.write(0x10, &0b0011u32.to_le_bytes());
    assert_eq!(
        read(&h, pending_at, 4),
        [0b10, 0, 0, 0],
        "vector 1 is masked and held; 0 holds nothing; 2 and 3 are not enabled"
    );
    assert_eq!(read(&h, pending_at, 1), [0b10], "a byte read sees it too");
    assert_eq!(
        read(&h, pending_at - 2, 4)[2..],
        [0b10, 0],
        "so does a straddling read"
    );
    h.write(0x10, &0u32.to_le_bytes());
    assert_eq!(
        read(&h, pending_at, 4),
        [0; 4],
        "routed vectors deliver themselves"
    );
    h.write(0x10, &0b0011u32.to_le_bytes());
    h.write(2, &0u16.to_le_bytes());
    assert_eq!(
        read(&h, pending_at, 4),
        [0; 4],
        "nothing is pending while MSI is disabled"
    );
}
