//! edu-dma: drive QEMU's `edu` DMA engine (1234:11e8) from userspace through VFIO in no-IOMMU
//! mode, with completion interrupts (MSI, or INTx with `--intx`) counted on an eventfd. Runs
//! inside a lab guest (L2), statically linked; prints one machine-readable result line:
//!   `EDU-DMA: ok bytes=N wrong=0 msi=K` (`intx=K` with `--intx`)  or  `EDU-DMA: FAIL <reason>`
//! and exits 0 only on success. See `usage()` for the options.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use p2pvmm_tests::guest::edu::{self, Engine, Irq, BUF_ADDR, EDU_DEVICE, EDU_VENDOR, MAX_XFER};
use p2pvmm_tests::guest::page::{DmaPage, Pagemap};
use p2pvmm_tests::guest::{self, sysfs, vfio, Fail, Result};

fn usage() -> &'static str {
    "usage: edu-dma [BDF] [options]
  BDF                  edu device, e.g. 0000:00:04.0 (default: first 1234:11e8 in sysfs)
  --len N              bytes per transfer, 1..=4095 (default 4095; edu/QEMU 7.2 limit)
  --rounds N           repeat the test N times (default 1)
  --timeout-ms MS      bound for each transfer (default 5000)
  --no-msi             poll the command register instead of waiting for MSI (msi=0)
  --intx               wait for INTx instead of MSI: VFIO's INTx eventfd, edu acknowledged, then
                       the line unmasked (VFIO_IRQ_SET_ACTION_UNMASK); counted as intx=K
  --peer-dst ADDR      also round-trip through bus address ADDR (hex 0x.. or decimal), e.g. a
                       peer device's BAR: RAM -> edu -> ADDR, zero edu, ADDR -> edu -> RAM
  --peer-bar BDF:N     like --peer-dst with BAR N of device BDF (its address from sysfs; turns on
                       the device's memory decoding)
  --peer-check BDF:N   afterwards, read the peer address back through BAR N of BDF with the CPU
                       (sysfs resourceN) and print 'EDU-DMA-PEER: present' when the last round's
                       bytes are there, 'EDU-DMA-PEER: absent matched=K/N' otherwise
Needs root, CONFIG_VFIO_NOIOMMU and /proc/self/pagemap. Binds the device to vfio-pci in
no-IOMMU mode (DMA addresses are physical addresses). Transfers per round: 2, or 5 with a peer.
Result: 'EDU-DMA: ok bytes=N wrong=0 msi=K' (intx=K with --intx; exit 0) or
'EDU-DMA: FAIL <reason>' (exit 1)."
}

/// How transfer completions are awaited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IrqMode {
    Msi,
    Intx,
    Poll,
}

impl IrqMode {
    /// The VFIO interrupt index and the name used in messages and the result line.
    fn vfio(self) -> Option<(u32, &'static str)> {
        match self {
            Self::Msi => Some((vfio::MSI_IRQ_INDEX, "MSI")),
            Self::Intx => Some((vfio::INTX_IRQ_INDEX, "INTx")),
            Self::Poll => None,
        }
    }

    /// The result line's counter.
    fn counter(self) -> &'static str {
        match self {
            Self::Intx => "intx",
            Self::Msi | Self::Poll => "msi",
        }
    }
}

#[derive(Debug)]
enum Peer {
    Addr(u64),
    Bar(String, usize),
}

#[derive(Debug)]
struct Args {
    bdf: Option<String>,
    len: usize,
    rounds: u32,
    timeout_ms: u64,
    irq: IrqMode,
    peer: Option<Peer>,
    peer_check: Option<(String, usize)>,
}

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// `BDF:N` with N a BAR number.
fn bar_arg(name: &str, v: &str) -> std::result::Result<(String, usize), String> {
    let (bdf, bar) = v.rsplit_once(':').ok_or(format!("{name} expects BDF:N"))?;
    let bar = bar
        .parse::<usize>()
        .ok()
        .filter(|&b| b < 6)
        .ok_or(format!("{name}: N must be 0..=5"))?;
    Ok((bdf.to_string(), bar))
}

/// Ok(None) means --help.
fn parse_args(argv: &[String]) -> std::result::Result<Option<Args>, String> {
    let mut a = Args {
        bdf: None,
        len: MAX_XFER,
        rounds: 1,
        timeout_ms: 5000,
        irq: IrqMode::Msi,
        peer: None,
        peer_check: None,
    };
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let num = |name: &str, v: String| {
            parse_u64(&v).ok_or_else(|| format!("{name}: '{v}' is not a number"))
        };
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--len" => a.len = num("--len", val("--len")?)? as usize,
            "--rounds" => {
                a.rounds = u32::try_from(num("--rounds", val("--rounds")?)?)
                    .map_err(|_| "--rounds too big")?
            }
            "--timeout-ms" => a.timeout_ms = num("--timeout-ms", val("--timeout-ms")?)?,
            "--no-msi" => a.irq = IrqMode::Poll,
            "--intx" => a.irq = IrqMode::Intx,
            "--peer-dst" => a.peer = Some(Peer::Addr(num("--peer-dst", val("--peer-dst")?)?)),
            "--peer-bar" => {
                let (bdf, bar) = bar_arg("--peer-bar", &val("--peer-bar")?)?;
                a.peer = Some(Peer::Bar(bdf, bar));
            }
            "--peer-check" => a.peer_check = Some(bar_arg("--peer-check", &val("--peer-check")?)?),
            s if s.starts_with('-') => return Err(format!("unknown option '{s}'")),
            s if a.bdf.is_none() => a.bdf = Some(s.to_string()),
            s => return Err(format!("unexpected argument '{s}'")),
        }
    }
    if a.len == 0 || a.len > MAX_XFER {
        return Err(format!("--len must be 1..={MAX_XFER}"));
    }
    if a.rounds == 0 {
        return Err("--rounds must be >= 1".into());
    }
    Ok(Some(a))
}

struct Report {
    bytes: u64,
    wrong: u64,
    first_bad: Option<(usize, u8, u8)>,
    irqs: u64,
    transfers: u64,
}

fn pattern(seed: u32, i: usize) -> u8 {
    ((i as u32).wrapping_mul(7).wrapping_add(seed) ^ (i as u32 >> 8)) as u8
}

fn run(a: &Args) -> Result<Report> {
    let bdf = match &a.bdf {
        Some(b) => b.clone(),
        None => sysfs::find_device(EDU_VENDOR, EDU_DEVICE)?,
    };
    let peer = match &a.peer {
        None => None,
        Some(Peer::Addr(x)) => Some(*x),
        Some(Peer::Bar(pbdf, n)) => {
            let (addr, size) = sysfs::peer_bar(pbdf, *n)?;
            if size < a.len as u64 {
                return Err(Fail::msg(
                    "peer BAR",
                    format!("{pbdf} BAR {n} has only {size} bytes"),
                ));
            }
            println!("edu-dma: peer {pbdf} BAR {n} at 0x{addr:x} (0x{size:x} bytes)");
            Some(addr)
        }
    };

    let edu::Opened {
        dev,
        edu,
        cmd: cmd_now,
    } = edu::open(&bdf, "edu-dma")?;
    let unmask = || dev.unmask_intx();
    let irq = match a.irq.vfio() {
        Some((index, name)) => {
            let (event, n, spurious) = edu::irq_eventfd(&dev, index, name)?;
            println!(
                "edu-dma: {name} enabled ({n} vector(s), {}) -> eventfd {}; {spurious} pending before the test",
                sysfs::irq_line(&bdf),
                event.raw()
            );
            let after_ack = (a.irq == IrqMode::Intx).then_some(&unmask as &dyn Fn() -> Result<()>);
            Some(Irq {
                name,
                event,
                after_ack,
            })
        }
        None => None,
    };

    let pm = Pagemap::open()?;
    let (src, dst, zero) = (DmaPage::new(&pm)?, DmaPage::new(&pm)?, DmaPage::new(&pm)?);
    println!(
        "edu-dma: DMA pages (page size {}): src 0x{:x} dst 0x{:x} zero 0x{:x}",
        pm.page_size(),
        src.phys(),
        dst.phys(),
        zero.phys()
    );
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id();

    let mut eng = Engine {
        edu: &edu,
        irq,
        timeout_ms: a.timeout_ms,
        irqs: 0,
        transfers: 0,
        log: true,
    };
    let pages = Pages { src, dst, zero };
    let result = rounds(a, &mut eng, &pages, peer, seed);
    if let (Some((pbdf, n)), Some(addr)) = (&a.peer_check, peer) {
        let last = seed.wrapping_add((a.rounds - 1).wrapping_mul(0x9e37_79b9));
        peer_check(pbdf, *n, addr, a.len, last)?;
    }
    if result.is_err() && !edu.wait_idle(2000) {
        // A DMA still in flight must not land in our pages after exit frees them (exit_mm runs
        // before the device fd is released): stop the device's bus mastering first.
        match dev.config_write16(4, cmd_now & !0x4) {
            Ok(()) => println!("edu-dma: DMA engine still busy after the failure; bus mastering turned off"),
            Err(e) => println!("edu-dma: DMA engine still busy after the failure; turning bus mastering off failed: {e}"),
        }
    }
    drop(pages);
    if a.irq == IrqMode::Intx {
        let name = format!("vfio-intx({bdf})");
        match sysfs::interrupts_line(&name) {
            Some(line) => println!("edu-dma: /proc/interrupts: {line}"),
            None => println!("edu-dma: /proc/interrupts has no {name}"),
        }
    }
    let mut rep = result?;
    if let (Some(irq), Some((index, _))) = (&eng.irq, a.irq.vfio()) {
        eng.irqs += irq.event.take()?; // any late or extra interrupt counts too
        dev.disable_irq(index)?;
    }
    rep.irqs = eng.irqs;
    rep.transfers = eng.transfers;
    Ok(rep)
}

/// Reads `len` bytes at bus address `addr` back through the CPU mapping of BAR `bar` of `bdf`
/// and says whether they hold `pattern(seed, ..)`: whether the peer DMA really landed there.
fn peer_check(bdf: &str, bar: usize, addr: u64, len: usize, seed: u32) -> Result<()> {
    let (base, size) = sysfs::peer_bar(bdf, bar)?;
    let offset = addr
        .checked_sub(base)
        .filter(|o| o + len as u64 <= size)
        .ok_or_else(|| {
            Fail::msg(
                "peer check",
                format!("0x{addr:x} is not inside {bdf} BAR {bar} (0x{base:x}+0x{size:x})"),
            )
        })? as usize;
    let map = sysfs::map_resource(bdf, bar)?;
    let mut matched = 0;
    for i in (0..len).step_by(4) {
        let word = map.read32(offset + i).unwrap_or(0).to_le_bytes();
        for (j, byte) in word.iter().enumerate().take(len - i) {
            matched += usize::from(*byte == pattern(seed, i + j));
        }
    }
    if matched == len {
        println!("EDU-DMA-PEER: present");
    } else {
        println!("EDU-DMA-PEER: absent matched={matched}/{len}");
    }
    Ok(())
}

struct Pages {
    src: DmaPage,
    dst: DmaPage,
    zero: DmaPage,
}

/// The transfers and the byte comparison, `a.rounds` times.
fn rounds(a: &Args, eng: &mut Engine, pg: &Pages, peer: Option<u64>, seed: u32) -> Result<Report> {
    let mut rep = Report {
        bytes: 0,
        wrong: 0,
        first_bad: None,
        irqs: 0,
        transfers: 0,
    };
    let (len, src, dst) = (a.len, &pg.src, &pg.dst);
    for r in 0..a.rounds {
        let s = seed.wrapping_add(r.wrapping_mul(0x9e37_79b9));
        src.fill(|i| pattern(s, i));
        dst.fill(|i| !pattern(s, i)); // a transfer that did nothing cannot pass
        eng.transfer("RAM->edu", src.phys(), BUF_ADDR, len, false)?;
        match peer {
            None => eng.transfer("edu->RAM", BUF_ADDR, dst.phys(), len, true)?,
            Some(p) => {
                eng.transfer("edu->peer", BUF_ADDR, p, len, true)?;
                eng.transfer("zero->edu", pg.zero.phys(), BUF_ADDR, len, false)?;
                eng.transfer("peer->edu", p, BUF_ADDR, len, false)?;
                eng.transfer("edu->RAM", BUF_ADDR, dst.phys(), len, true)?;
            }
        }
        // Bytes past `len` must still hold the fill: the DMA must not overrun.
        for i in 0..dst.len() {
            let want = if i < len {
                pattern(s, i)
            } else {
                !pattern(s, i)
            };
            let got = dst.get(i).unwrap_or(!want);
            if want != got {
                rep.wrong += 1;
                rep.first_bad.get_or_insert((i, want, got));
            }
        }
        rep.bytes += len as u64;
    }
    Ok(rep)
}

fn main() -> ExitCode {
    let args = match guest::args_or_exit("EDU-DMA", usage(), parse_args) {
        Ok(args) => args,
        Err(status) => return status,
    };
    let counter = args.irq.counter();
    match run(&args) {
        Ok(r) if r.wrong != 0 => {
            let (i, want, got) = r.first_bad.unwrap_or((0, 0, 0));
            println!(
                "EDU-DMA: FAIL data mismatch bytes={} wrong={} {counter}={} first at offset {i}: want 0x{want:02x} got 0x{got:02x}",
                r.bytes, r.wrong, r.irqs
            );
            ExitCode::FAILURE
        }
        Ok(r) if args.irq != IrqMode::Poll && r.irqs != r.transfers => {
            println!(
                "EDU-DMA: FAIL interrupt count bytes={} wrong=0 {counter}={} but {} transfers",
                r.bytes, r.irqs, r.transfers
            );
            ExitCode::FAILURE
        }
        Ok(r) => {
            println!("EDU-DMA: ok bytes={} wrong=0 {counter}={}", r.bytes, r.irqs);
            ExitCode::SUCCESS
        }
        Err(f) => {
            println!("EDU-DMA: FAIL {f}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Args {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        parse_args(&argv).unwrap().unwrap()
    }

    #[test]
    fn msi_is_the_default_and_intx_or_polling_are_chosen_by_flag() {
        assert_eq!(parse(&[]).irq, IrqMode::Msi);
        assert_eq!(parse(&["--intx", "--rounds", "2"]).irq, IrqMode::Intx);
        assert_eq!(parse(&["--no-msi"]).irq, IrqMode::Poll);
    }

    #[test]
    fn intx_uses_vfio_index_0_and_its_own_counter() {
        assert_eq!(IrqMode::Intx.vfio(), Some((vfio::INTX_IRQ_INDEX, "INTx")));
        assert_eq!(vfio::INTX_IRQ_INDEX, 0);
        assert_eq!(IrqMode::Intx.counter(), "intx");
        assert_eq!(IrqMode::Msi.counter(), "msi");
        assert_eq!(IrqMode::Poll.vfio(), None);
    }
}
