//! QEMU's `edu` device (hw/misc/edu.c) through its BAR0 mapping: identification, liveness, and
//! the DMA engine with its completion interrupt (MSI or INTx) counted on an eventfd; [`open`]
//! takes one over through VFIO in no-IOMMU mode (`edu-dma`, `bar-walk`).

use std::thread::sleep;
use std::time::{Duration, Instant};

use super::vfio::{self, Mapping};
use super::{sysfs, EventFd, Fail, Result};

const REG_ID: usize = 0x00;
const REG_LIVENESS: usize = 0x04;
const REG_INTR_STATUS: usize = 0x24;
const REG_INTR_ACK: usize = 0x64;
const REG_DMA_SRC: usize = 0x80;
const REG_DMA_DST: usize = 0x88;
const REG_DMA_CNT: usize = 0x90;
const REG_DMA_CMD: usize = 0x98;
const REGS_END: usize = 0xa0;

/// PCI vendor and device IDs of edu.
pub const EDU_VENDOR: u16 = 0x1234;
pub const EDU_DEVICE: u16 = 0x11e8;
const ID_VALUE: u32 = 0x0100_00ed;
const CMD_START: u64 = 1 << 0;
const CMD_TO_RAM: u64 = 1 << 1;
const CMD_IRQ: u64 = 1 << 2;
/// INTR_STATUS bit set by a DMA completion.
pub const DMA_IRQ: u32 = 0x100;
/// edu's internal DMA buffer in its DMA address space.
pub const BUF_ADDR: u64 = 0x40000;
/// QEMU 7.2 aborts on a 4096-byte transfer (off-by-one range check).
pub const MAX_XFER: usize = 4095;

/// An edu bound to vfio-pci in no-IOMMU mode, sane, with memory decoding and bus mastering on
/// and no interrupt pending.
pub struct Opened {
    pub dev: vfio::Device,
    pub edu: Edu,
    /// PCI_COMMAND as it reads after enabling (memory space + bus master).
    pub cmd: u16,
}

/// Takes over edu `bdf`: checks its IDs, turns on no-IOMMU mode, binds vfio-pci, maps BAR0,
/// enables memory decoding and bus mastering, checks identification and liveness and clears a
/// stale interrupt. Progress lines start with `tag` (`edu-dma`).
pub fn open(bdf: &str, tag: &str) -> Result<Opened> {
    let (ven, dev) = sysfs::ids(bdf)?;
    if (ven, dev) != (EDU_VENDOR, EDU_DEVICE) {
        return Err(Fail::msg(
            "check device",
            format!("{bdf} is {ven:04x}:{dev:04x}, not an edu (1234:11e8)"),
        ));
    }
    let param = sysfs::enable_noiommu()?;
    println!(
        "{tag}: edu {bdf}, driver {:?}; no-IOMMU mode on ({})",
        sysfs::driver(bdf),
        param.display()
    );
    sysfs::bind_vfio_pci(bdf)?;
    let group = sysfs::noiommu_group_node(bdf)?;
    let dev = vfio::Device::open_noiommu(&group, bdf)?;
    println!("{tag}: {bdf} bound to vfio-pci, {group} opened, device fd ok");

    let edu = Edu::new(dev.map_region(0)?)?;
    let cmd = dev.config_read16(4)?;
    dev.config_write16(4, cmd | 0x6)?; // memory space + bus master
    let cmd_now = dev.config_read16(4)?;
    if cmd_now & 0x6 != 0x6 {
        return Err(Fail::msg(
            "enable bus mastering",
            format!("PCI_COMMAND 0x{cmd:x} -> 0x{cmd_now:x}"),
        ));
    }
    let id = edu.sanity()?;
    println!("{tag}: id 0x{id:08x}, liveness ok, PCI_COMMAND 0x{cmd:x} -> 0x{cmd_now:x}");
    // Clear anything left pending (e.g. by an earlier run).
    let stale = edu.intr_status()?;
    if stale != 0 {
        edu.ack(stale)?;
    }
    Ok(Opened {
        dev,
        edu,
        cmd: cmd_now,
    })
}

/// Hooks VFIO interrupt `index` (`name`: "MSI", "INTx") of `dev` to a new eventfd. Returns it,
/// the number of vectors and how many interrupts were pending before any transfer.
pub fn irq_eventfd(dev: &vfio::Device, index: u32, name: &str) -> Result<(EventFd, u32, u64)> {
    let n = dev.irq_count(index)?;
    if n == 0 {
        return Err(Fail::msg(
            name,
            format!("device reports no {name} (VFIO_DEVICE_GET_IRQ_INFO count 0)"),
        ));
    }
    let event = EventFd::new()?;
    dev.set_irq_eventfd(index, event.raw())?;
    let spurious = event.take()?;
    Ok((event, n, spurious))
}

fn reg_fail(off: usize) -> Fail {
    Fail::msg(
        "edu register access",
        format!("offset 0x{off:x} outside BAR0"),
    )
}

pub struct Edu {
    bar0: Mapping,
}

impl Edu {
    pub fn new(bar0: Mapping) -> Result<Self> {
        if bar0.len() < REGS_END {
            return Err(Fail::msg(
                "edu BAR0",
                format!(
                    "only 0x{:x} bytes, registers need 0x{REGS_END:x}",
                    bar0.len()
                ),
            ));
        }
        Ok(Self { bar0 })
    }

    fn r32(&self, off: usize) -> Result<u32> {
        self.bar0.read32(off).ok_or_else(|| reg_fail(off))
    }
    fn w32(&self, off: usize, v: u32) -> Result<()> {
        self.bar0.write32(off, v).ok_or_else(|| reg_fail(off))
    }
    fn r64(&self, off: usize) -> Result<u64> {
        self.bar0.read64(off).ok_or_else(|| reg_fail(off))
    }
    fn w64(&self, off: usize, v: u64) -> Result<()> {
        self.bar0.write64(off, v).ok_or_else(|| reg_fail(off))
    }

    /// Identification register and liveness (the device stores the bitwise inverse).
    pub fn sanity(&self) -> Result<u32> {
        let id = self.r32(REG_ID)?;
        if id != ID_VALUE {
            return Err(Fail::msg(
                "edu sanity",
                format!("id register 0x{id:08x}, expected 0x{ID_VALUE:08x}"),
            ));
        }
        for v in [0x1234_5678u32, 0xa5a5_0ff0] {
            self.w32(REG_LIVENESS, v)?;
            let got = self.r32(REG_LIVENESS)?;
            if got != !v {
                return Err(Fail::msg(
                    "edu sanity",
                    format!(
                        "liveness wrote 0x{v:08x}, read 0x{got:08x}, expected 0x{:08x}",
                        !v
                    ),
                ));
            }
        }
        Ok(id)
    }

    pub fn intr_status(&self) -> Result<u32> {
        self.r32(REG_INTR_STATUS)
    }

    pub fn ack(&self, bits: u32) -> Result<()> {
        self.w32(REG_INTR_ACK, bits)
    }

    pub fn dma_cmd(&self) -> Result<u64> {
        self.r64(REG_DMA_CMD)
    }

    /// Wait up to `ms` for the DMA engine to go idle; false if it is still running (or its
    /// register cannot be read).
    pub fn wait_idle(&self, ms: u64) -> bool {
        let t0 = Instant::now();
        loop {
            match self.dma_cmd() {
                Ok(c) if c & CMD_START == 0 => return true,
                Ok(_) if t0.elapsed() < Duration::from_millis(ms) => {
                    sleep(Duration::from_millis(5))
                }
                _ => return false,
            }
        }
    }

    fn start(&self, src: u64, dst: u64, len: usize, to_ram: bool, irq: bool) -> Result<()> {
        self.w64(REG_DMA_SRC, src)?;
        self.w64(REG_DMA_DST, dst)?;
        self.w64(REG_DMA_CNT, len as u64)?;
        let cmd = CMD_START | if to_ram { CMD_TO_RAM } else { 0 } | if irq { CMD_IRQ } else { 0 };
        self.w64(REG_DMA_CMD, cmd)
    }
}

/// The completion interrupt, as VFIO delivers it.
pub struct Irq<'a> {
    /// "MSI" or "INTx", for messages.
    pub name: &'static str,
    pub event: EventFd,
    /// Runs after each interrupt was acknowledged at the device (INTx: VFIO masked the line
    /// when it fired; this unmasks it).
    pub after_ack: Option<&'a dyn Fn() -> Result<()>>,
}

/// Runs transfers one at a time, waiting for each either on an interrupt (counted) or by
/// polling.
pub struct Engine<'a> {
    pub edu: &'a Edu,
    pub irq: Option<Irq<'a>>,
    pub timeout_ms: u64,
    /// Interrupts counted so far.
    pub irqs: u64,
    pub transfers: u64,
    /// Print a line per transfer.
    pub log: bool,
}

impl Engine<'_> {
    /// One DMA: `to_ram` = edu buffer -> `dst`, else `src` -> edu buffer.
    pub fn transfer(
        &mut self,
        what: &str,
        src: u64,
        dst: u64,
        len: usize,
        to_ram: bool,
    ) -> Result<()> {
        let step = format!("DMA {what} (#{})", self.transfers + 1);
        if self.edu.dma_cmd()? & CMD_START != 0 {
            return Err(Fail::msg(
                step,
                "edu DMA engine still busy from an earlier transfer",
            ));
        }
        let t0 = Instant::now();
        self.edu.start(src, dst, len, to_ram, self.irq.is_some())?;
        let mut got = 0;
        if let Some(irq) = &self.irq {
            got = irq.event.wait(self.timeout_ms)?;
            if got == 0 {
                return Err(Fail::msg(
                    step,
                    format!(
                        "no {} within {} ms (command=0x{:x} intr_status=0x{:x}, {} so far)",
                        irq.name,
                        self.timeout_ms,
                        self.edu.dma_cmd()?,
                        self.edu.intr_status()?,
                        self.irqs
                    ),
                ));
            }
            self.irqs += got;
            if self.edu.dma_cmd()? & CMD_START != 0 {
                return Err(Fail::msg(
                    step,
                    format!(
                        "{} arrived but the command register still shows the DMA running",
                        irq.name
                    ),
                ));
            }
        } else {
            while self.edu.dma_cmd()? & CMD_START != 0 {
                if t0.elapsed() > Duration::from_millis(self.timeout_ms) {
                    return Err(Fail::msg(
                        step,
                        format!("not complete within {} ms", self.timeout_ms),
                    ));
                }
                sleep(Duration::from_millis(1));
            }
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let st = self.edu.intr_status()?;
        if let Some(irq) = &self.irq {
            if st & DMA_IRQ == 0 {
                return Err(Fail::msg(
                    step,
                    format!(
                        "{} arrived but INTR_STATUS=0x{st:x} lacks the DMA bit 0x{DMA_IRQ:x}",
                        irq.name
                    ),
                ));
            }
        }
        if st != 0 {
            self.edu.ack(st)?;
        }
        if let Some(after_ack) = self.irq.as_ref().and_then(|irq| irq.after_ack) {
            after_ack().map_err(|f| f.context(step.clone()))?;
        }
        self.transfers += 1;
        let name = self.irq.as_ref().map_or("irq", |irq| irq.name);
        if !self.log {
            return Ok(());
        }
        println!("edu-dma: {what}: {len} bytes 0x{src:x} -> 0x{dst:x}, {ms:.1} ms, {name} +{got}, intr_status 0x{st:x} acked");
        Ok(())
    }
}
