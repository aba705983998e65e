//! MSI-X and MSI: a function with both capabilities in a layout the input picks (vector
//! counts, table and PBA BARs and offsets, 32/64-bit MSI with or without per-vector masking),
//! driven by config-space accesses to the capabilities and MSI-X table/PBA accesses of width 1,
//! 2, 4 and 8 at any offset (edges included), interrupts raised while masked, and resets. The
//! device glue is `VfioPciDevice`'s (devices/src/vfio/mod.rs), which cannot be built here
//! without a real VFIO fd: `update` after a config write that overlaps a capability, table and
//! PBA accesses to `Msix` first, the rest to the "hardware".
//!
//! Checked beyond not panicking (and `FakeMsiSink`'s own check that nothing is injected without
//! a matching route): after every step the routes each sink holds are exactly the messages the
//! capability says each vector sends; an unmasked MSI-X vector has no pending bit left; a table
//! or PBA read fills exactly its width and equals its bytes read one at a time.

#![no_main]

use arbitrary::Arbitrary;
use devices::pci::fake::{FakeEndpoint, FakeMsiSink};
use devices::pci::{BarDef, MsiCap, MsiConfig, Msix, MsixConfig, Type0Config};
use libfuzzer_sys::fuzz_target;
use p2pvmm_fuzz::Width;

#[derive(Arbitrary, Debug)]
struct Layout {
    bar0_shift: u8,
    bar2_shift: u8,
    vectors: u16,
    table_bar: u8,
    table_offset: u32,
    pba_bar: u8,
    pba_offset: u32,
    /// Keep the offsets as given instead of rounding them into the BAR, 8-byte aligned.
    raw_offsets: bool,
    msi_vectors_shift: u8,
    msi_64bit: bool,
    msi_mask: bool,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A config access inside (or just around) one capability.
    Cap {
        msix: bool,
        at: i8,
        width: Width,
        value: u64,
        write: bool,
    },
    /// A config access anywhere.
    Config {
        offset: u16,
        width: Width,
        value: u64,
        write: bool,
    },
    /// A BAR access near the table or the PBA (`delta` from its start), or in another BAR.
    Bar {
        pba: bool,
        other_bar: Option<u8>,
        delta: i32,
        width: Width,
        value: u64,
        write: bool,
    },
    /// The device raises `vector` while the VMM has it masked.
    Signal {
        msix: bool,
        vector: u16,
    },
    Reset,
}

#[derive(Arbitrary, Debug)]
struct Input {
    layout: Layout,
    ops: Vec<Op>,
}

struct Function {
    config: Type0Config,
    msi: MsiCap,
    msix: Msix,
    msi_sink: FakeMsiSink,
    msix_sink: FakeMsiSink,
}

fn overlaps(range: &std::ops::Range<u16>, offset: u16, len: usize) -> bool {
    offset < range.end && range.start < offset.saturating_add(len as u16)
}

/// The segment's rule: a device sees 1 to 4 bytes inside one dword of its 4 KiB.
fn valid_config(offset: u16, len: usize) -> bool {
    offset < 0x1000 && (1..=4).contains(&len) && usize::from(offset & 3) + len <= 4
}

fn place(raw: u32, bar_size: u64, keep: bool) -> u64 {
    if keep {
        u64::from(raw)
    } else {
        (u64::from(raw) % (bar_size + 64)) & !7
    }
}

impl Function {
    fn new(l: &Layout) -> Option<Self> {
        let sizes = [
            1u64 << (12 + l.bar0_shift % 9),
            0,
            1u64 << (12 + l.bar2_shift % 12),
        ];
        let mut config = Type0Config::new(&FakeEndpoint::IDS);
        config.add_bar(0, BarDef::mem32(sizes[0])).ok()?;
        config.add_bar(2, BarDef::mem64(sizes[2], true)).ok()?;
        config.add_bar(4, BarDef::io(256)).ok()?;
        let msi = MsiCap::add(
            &mut config,
            MsiConfig {
                vectors: 1 << (l.msi_vectors_shift % 7),
                is_64bit: l.msi_64bit,
                per_vector_mask: l.msi_mask,
            },
        )
        .ok()?;
        let bar_of = |b: u8| [0u8, 2, 4, b][usize::from(b % 4)];
        let size_of = |bar: u8| sizes.get(usize::from(bar)).copied().unwrap_or(256);
        let (table_bar, pba_bar) = (bar_of(l.table_bar), bar_of(l.pba_bar));
        let msix = Msix::add(
            &mut config,
            MsixConfig {
                vectors: l.vectors % 2050,
                table_bar,
                table_offset: place(l.table_offset, size_of(table_bar), l.raw_offsets),
                pba_bar,
                pba_offset: place(l.pba_offset, size_of(pba_bar), l.raw_offsets),
            },
        )
        .ok()?;
        Some(Self {
            config,
            msi,
            msix,
            msi_sink: FakeMsiSink::new(),
            msix_sink: FakeMsiSink::new(),
        })
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        if !valid_config(offset, data.len()) {
            return;
        }
        self.config.write(offset, data);
        if overlaps(&self.msi.range(), offset, data.len()) {
            self.msi.update(self.config.regs_mut(), &self.msi_sink);
        }
        if overlaps(&self.msix.cap_range(), offset, data.len()) {
            self.msix.update(self.config.regs(), &self.msix_sink);
        }
    }

    fn read_config(&self, offset: u16, data: &mut [u8]) {
        if valid_config(offset, data.len()) {
            self.config.read(offset, data);
            self.msi
                .merge_held(self.config.regs(), offset, data, &self.msi_sink);
        }
    }

    fn config_access(&mut self, offset: u16, width: Width, value: u64, write: bool) {
        let bytes = &value.to_le_bytes()[..width.bytes()];
        if write {
            self.write_config(offset, bytes);
        } else {
            let mut data = vec![0; width.bytes()];
            self.read_config(offset, &mut data);
        }
    }

    /// A table/PBA read, checked against its bytes; `None` if it is not the capability's.
    fn bar_read(&self, bar: u8, offset: u64, len: usize) -> Option<Vec<u8>> {
        let mut data = vec![0x5a; len + 8];
        if !self
            .msix
            .bar_read(bar, offset, &mut data[..len], &self.msix_sink)
        {
            return None;
        }
        assert!(
            data[len..].iter().all(|&b| b == 0x5a),
            "read past its width"
        );
        data.truncate(len);
        Some(data)
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Cap {
                msix,
                at,
                width,
                value,
                write,
            } => {
                let range = if msix {
                    self.msix.cap_range()
                } else {
                    self.msi.range()
                };
                let offset = range.start.wrapping_add_signed(i16::from(at) % 32);
                self.config_access(offset, width, value, write);
            }
            Op::Config {
                offset,
                width,
                value,
                write,
            } => self.config_access(offset, width, value, write),
            Op::Bar {
                pba,
                other_bar,
                delta,
                width,
                value,
                write,
            } => {
                let (bar, range) = if pba {
                    self.msix.pba_range()
                } else {
                    self.msix.table_range()
                };
                let bar = other_bar.map_or(bar, |b| b % 7);
                let offset = range.start.wrapping_add_signed(i64::from(delta));
                if write {
                    let data = &value.to_le_bytes()[..width.bytes()];
                    self.msix.bar_write(bar, offset, data, &self.msix_sink);
                } else if let Some(data) = self.bar_read(bar, offset, width.bytes()) {
                    for (i, &byte) in data.iter().enumerate() {
                        let one = self.bar_read(bar, offset + i as u64, 1);
                        // Past the edge a byte may belong to no capability range at all.
                        if let Some(one) = one {
                            assert_eq!(one[0], byte, "{offset:#x}+{i}: read differs from its byte");
                        }
                    }
                }
            }
            Op::Signal { msix, vector } => {
                if msix {
                    self.msix.signal_masked(vector, &self.msix_sink);
                } else {
                    self.msi
                        .signal_masked(self.config.regs_mut(), vector % 64, &self.msi_sink);
                }
            }
            Op::Reset => {
                self.config.reset();
                self.msi.update(self.config.regs_mut(), &self.msi_sink);
                self.msix.reset(self.config.regs(), &self.msix_sink);
            }
        }
    }

    fn check(&self) {
        let (_, table) = self.msix.table_range();
        let vectors = ((table.end - table.start) / 16) as u16;
        for v in 0..vectors {
            let message = self.msix.message(v);
            assert_eq!(self.msix_sink.route(v), message, "MSI-X vector {v}: route");
            if message.is_some() {
                assert!(
                    !self.msix.pending(v),
                    "MSI-X vector {v}: unmasked but pending"
                );
            }
        }
        for v in 0..32 {
            assert_eq!(
                self.msi_sink.route(v),
                self.msi.message(self.config.regs(), v),
                "MSI vector {v}: route"
            );
        }
    }
}

fuzz_target!(|input: Input| {
    let Some(mut function) = Function::new(&input.layout) else {
        return;
    };
    for op in input.ops.iter().take(256) {
        function.apply(op);
        function.check();
        let _ = function.msi_sink.take();
        let _ = function.msix_sink.take();
    }
});
