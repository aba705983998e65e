//! msix-probe: proves MSI-X end to end with QEMU's e1000e (82574L, 8086:10d3, 5 MSI-X vectors)
//! driven from userspace through VFIO in no-IOMMU mode. Runs inside a lab guest (L2),
//! statically linked.
//!
//! It enables MSI-X with one eventfd per vector (VFIO_DEVICE_SET_IRQS on the MSI-X index), then
//! routes each of the device's five interrupt causes to a vector through IVAR and raises the
//! causes one at a time (ICS): each must arrive exactly once, on its vector's eventfd and no
//! other. Round r maps cause i to vector (i + r) mod 5, so over the default two rounds every
//! vector carries two different causes. Then masking:
//! - VFIO's ACTION_MASK on one MSI-X vector, if the kernel supports it (vfio-pci does not: it
//!   is reported as unsupported, not faked);
//! - masking in the MSI-X table: detaching the vector's eventfd makes the kernel free the IRQ,
//!   which masks the table entry. An interrupt raised then must reach no eventfd, and show in
//!   the vector's pending bit (read through the BAR); attaching a new eventfd unmasks the entry
//!   and the held interrupt must be delivered then, once.
//!
//! Prints one machine-readable result line and exits 0 only on success:
//!   `MSIX-PROBE: ok vectors=5 fired=2,2,2,2,2 vfio_mask=unsupported(ENOTTY) table_mask=ok pba=ok`
//!   `MSIX-PROBE: FAIL <reason>`

// A crate root resolves `mod` next to itself, so point into msix_probe/ explicitly.
#[path = "msix_probe/e1000e.rs"]
mod e1000e;
#[path = "msix_probe/table.rs"]
mod table;

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use e1000e::{Cause, E1000e, CAUSES};
use p2pvmm_tests::guest::vfio::{self, Device, MSIX_IRQ_INDEX};
use p2pvmm_tests::guest::{self, sysfs, EventFd, Fail, Result};
use table::{Layout, TableView};

/// The e1000e's MSI-X vectors: one per IVAR cause.
const VECTORS: usize = CAUSES.len();

/// `--kmsg`: progress lines also go to the kernel log.
static KMSG: AtomicBool = AtomicBool::new(false);

/// Prints a progress line (`msix-probe: ...`); with `--kmsg` also into the kernel log, which
/// the kernel writes to the console synchronously, timestamped: shows progress even when the
/// console's interrupt-driven output stalls.
fn say(line: std::fmt::Arguments) {
    let line = format!("msix-probe: {line}");
    println!("{line}");
    if KMSG.load(Ordering::Relaxed) {
        // One write is one kernel log record.
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

macro_rules! say {
    ($($arg:tt)*) => { say(format_args!($($arg)*)) };
}

fn usage() -> &'static str {
    "usage: msix-probe [BDF] [options]
  BDF                  e1000e function, e.g. 0000:00:03.0 (default: first 8086:10d3 in sysfs)
  --rounds N           cause-to-vector rounds; round r sends cause i on vector (i + r) mod 5
                       (default 2)
  --timeout-ms MS      bound for each expected interrupt (default 3000)
  --quiet-ms MS        how long an interrupt that must not come is waited for (default 500)
  --mask-vector V      the vector the masking checks use, 0..=4 (default 2)
  --kmsg               also write progress lines to /dev/kmsg (timestamped, synchronous)
Needs root and CONFIG_VFIO_NOIOMMU. Binds the device to vfio-pci in no-IOMMU mode.
Result: 'MSIX-PROBE: ok vectors=N fired=A,B,.. vfio_mask=.. table_mask=ok pba=..' (exit 0) or
'MSIX-PROBE: FAIL <reason>' (exit 1)."
}

#[derive(Debug)]
struct Args {
    bdf: Option<String>,
    rounds: u32,
    timeout_ms: u64,
    quiet_ms: u64,
    mask_vector: usize,
    kmsg: bool,
}

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Ok(None) means --help.
fn parse_args(argv: &[String]) -> std::result::Result<Option<Args>, String> {
    let mut a = Args {
        bdf: None,
        rounds: 2,
        timeout_ms: 3000,
        quiet_ms: 500,
        mask_vector: 2,
        kmsg: false,
    };
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let mut num = |name: &str| -> std::result::Result<u64, String> {
            let v = it.next().ok_or_else(|| format!("{name} needs a value"))?;
            parse_u64(v).ok_or_else(|| format!("{name}: '{v}' is not a number"))
        };
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--rounds" => {
                a.rounds = u32::try_from(num("--rounds")?).map_err(|_| "--rounds too big")?
            }
            "--timeout-ms" => a.timeout_ms = num("--timeout-ms")?,
            "--quiet-ms" => a.quiet_ms = num("--quiet-ms")?,
            "--mask-vector" => a.mask_vector = num("--mask-vector")? as usize,
            "--kmsg" => a.kmsg = true,
            s if s.starts_with('-') => return Err(format!("unknown option '{s}'")),
            s if a.bdf.is_none() => a.bdf = Some(s.to_string()),
            s => return Err(format!("unexpected argument '{s}'")),
        }
    }
    if a.rounds == 0 {
        return Err("--rounds must be >= 1".into());
    }
    if a.mask_vector >= VECTORS {
        return Err(format!("--mask-vector must be 0..={}", VECTORS - 1));
    }
    Ok(Some(a))
}

/// The vector each of `CAUSES` is sent on in `round`: cause i on vector (i + round) mod 5.
fn mapping(round: u32) -> [u8; VECTORS] {
    let mut m = [0u8; VECTORS];
    for (i, v) in m.iter_mut().enumerate() {
        *v = ((i + round as usize) % VECTORS) as u8;
    }
    m
}

struct Report {
    vectors: u32,
    fired: Vec<u64>,
    vfio_mask: String,
    table_mask: TableMask,
}

/// The outcome of the table masking check.
struct TableMask {
    /// "ok": held while masked, delivered once at unmask.
    result: String,
    /// What the pending bit showed (see [`pba_verdict`]).
    pba: String,
}

/// The masked vector's pending bit before the interrupt, while it was held, and after it was
/// delivered (`None`: no view of the PBA): "ok" for clear, set, clear.
fn pba_verdict(before: Option<bool>, during: Option<bool>, after: Option<bool>) -> String {
    match (before, during, after) {
        (Some(false), Some(true), Some(false)) => "ok".into(),
        (Some(_), Some(false), Some(_)) => "not-set-while-held".into(),
        (Some(b), Some(d), Some(a)) => format!("odd(before={b},held={d},after={a})"),
        _ => "unseen".into(),
    }
}

impl Report {
    fn line(&self) -> String {
        let fired: Vec<String> = self.fired.iter().map(u64::to_string).collect();
        format!(
            "ok vectors={} fired={} vfio_mask={} table_mask={} pba={}",
            self.vectors,
            fired.join(","),
            self.vfio_mask,
            self.table_mask.result,
            self.table_mask.pba
        )
    }
}

/// The device, its vectors' eventfds, and the bounds.
struct Probe<'a> {
    dev: &'a Device,
    nic: &'a E1000e,
    fds: Vec<EventFd>,
    view: Option<TableView>,
    timeout_ms: u64,
    quiet_ms: u64,
}

impl Probe<'_> {
    /// Takes every eventfd's count except `except`'s: interrupts that went astray.
    fn strays(&self, except: Option<usize>) -> Result<Vec<(usize, u64)>> {
        let mut out = Vec::new();
        for (v, fd) in self.fds.iter().enumerate() {
            if Some(v) == except {
                continue;
            }
            let n = fd.take()?;
            if n != 0 {
                out.push((v, n));
            }
        }
        Ok(out)
    }

    /// Raises `cause` and expects exactly one interrupt, on `vector`'s eventfd and no other.
    fn expect_on(&self, cause: &Cause, vector: usize, step: &str) -> Result<()> {
        let t0 = Instant::now();
        self.nic.raise(cause.bit)?;
        let got = self.fds[vector].wait(self.timeout_ms)?;
        let took = t0.elapsed();
        // Give a misrouted or duplicated message the time to show up.
        sleep(Duration::from_millis(20));
        let extra = self.fds[vector].take()?;
        let strays = self.strays(Some(vector))?;
        self.nic.clear(cause.bit)?;
        if got == 0 {
            return Err(Fail::msg(
                step,
                format!(
                    "{} raised, no interrupt on vector {vector} within {} ms (elsewhere: {strays:?}; {})",
                    cause.name,
                    self.timeout_ms,
                    self.describe(vector)
                ),
            ));
        }
        if got + extra != 1 || !strays.is_empty() {
            return Err(Fail::msg(
                step,
                format!(
                    "{} raised once: {} interrupt(s) on vector {vector}, elsewhere (vector, count): {strays:?}",
                    cause.name,
                    got + extra
                ),
            ));
        }
        say!(
            "{step}: {} -> vector {vector} in {} us",
            cause.name,
            took.as_micros()
        );
        Ok(())
    }

    /// The table entry of `vector` as the CPU reads it, for messages.
    fn describe(&self, vector: usize) -> String {
        match self.view.as_ref().and_then(|v| v.entry(vector as u16)) {
            Some(e) => format!("table entry {vector}: {e}"),
            None => "no table view".to_string(),
        }
    }

    /// Every cause on the vector `map` gives it, `rounds` times with alternating maps; counts
    /// per vector.
    fn rounds(&self, rounds: u32) -> Result<Vec<u64>> {
        let mut fired = vec![0u64; VECTORS];
        for r in 0..rounds {
            let map = mapping(r);
            let ivar = e1000e::ivar(map);
            self.nic.set_ivar(ivar)?;
            say!("round {r}: IVAR 0x{ivar:08x} (cause -> vector {map:?})");
            for (cause, &vector) in CAUSES.iter().zip(&map) {
                let vector = usize::from(vector);
                self.expect_on(cause, vector, &format!("round {r}"))?;
                fired[vector] += 1;
            }
        }
        Ok(fired)
    }

    /// VFIO_IRQ_SET_ACTION_MASK on vector `m`: while masked the raised cause must not arrive;
    /// unmasking delivers it. vfio-pci implements no MSI/MSI-X masking: then "unsupported".
    fn vfio_mask(&self, cause: &Cause, m: usize) -> Result<String> {
        let m32 = m as u32;
        if let Err(e) = self.dev.mask_irqs(MSIX_IRQ_INDEX, m32, 1) {
            say!("VFIO ACTION_MASK on MSI-X vector {m}: {e}");
            return Ok(format!("unsupported({})", vfio::errno_name(&e)));
        }
        self.nic.raise(cause.bit)?;
        let during = self.fds[m].wait(self.quiet_ms)?;
        let strays = self.strays(Some(m))?;
        let unmasked = self.dev.unmask_irqs(MSIX_IRQ_INDEX, m32, 1);
        let held = self.fds[m].wait(self.timeout_ms)?;
        self.nic.clear(cause.bit)?;
        unmasked.map_err(|e| Fail::io("VFIO ACTION_UNMASK", e))?;
        if during != 0 || !strays.is_empty() || held != 1 {
            return Err(Fail::msg(
                "VFIO mask",
                format!("vector {m} masked: {during} interrupt(s) while masked, {strays:?} elsewhere, {held} at unmask (want 0, none, 1)"),
            ));
        }
        say!("VFIO mask: vector {m} held its interrupt while masked, delivered it at unmask");
        Ok("ok".into())
    }

    /// Masking in the MSI-X table: detaching vector `m`'s eventfd frees its IRQ, and the kernel
    /// masks the entry; the cause raised then must reach no eventfd and be delivered, once, when
    /// a new eventfd is attached (the kernel unmasks the entry). Meanwhile the vector's pending
    /// bit must show the held interrupt.
    fn table_mask(&mut self, cause: &Cause, m: usize) -> Result<TableMask> {
        let m32 = m as u32;
        say!("table mask: before, {}", self.describe(m));
        self.dev.set_irq_eventfds(MSIX_IRQ_INDEX, m32, &[-1])?;
        let entry = self.view.as_ref().and_then(|v| v.entry(m as u16));
        say!("table mask: eventfd detached, {}", self.describe(m));
        if entry.is_some_and(|e| !e.masked()) {
            // Nothing holds the interrupt: raising it would lose it. Not the VMM's doing.
            let fresh = EventFd::new()?;
            self.dev
                .set_irq_eventfds(MSIX_IRQ_INDEX, m32, &[fresh.raw()])?;
            self.fds[m] = fresh;
            return Ok(TableMask {
                result: "skipped(kernel-left-entry-unmasked)".into(),
                pba: "unseen".into(),
            });
        }
        let pending = |p: &Self| {
            p.view
                .as_ref()
                .and_then(|v| v.pba())
                .map(|w| w >> m & 1 != 0)
        };
        let before = pending(self);
        self.nic.raise(cause.bit)?;
        sleep(Duration::from_millis(self.quiet_ms));
        let strays = self.strays(None)?;
        let during = pending(self);
        if let Some(pba) = self.view.as_ref().and_then(|v| v.pba()) {
            say!(
                "table mask: {} raised while masked, PBA 0x{pba:x}",
                cause.name
            );
        }
        let fresh = EventFd::new()?;
        self.dev
            .set_irq_eventfds(MSIX_IRQ_INDEX, m32, &[fresh.raw()])?;
        self.fds[m] = fresh;
        let held = self.fds[m].wait(self.timeout_ms)?;
        sleep(Duration::from_millis(20));
        let extra = self.fds[m].take()?;
        say!(
            "table mask: new eventfd attached, {}; {} held interrupt(s) delivered",
            self.describe(m),
            held + extra
        );
        let after = pending(self);
        self.nic.clear(cause.bit)?;
        if !strays.is_empty() || held + extra != 1 {
            return Err(Fail::msg(
                "table mask",
                format!("vector {m}: while masked {strays:?} arrived (want none); at unmask {} (want 1)", held + extra),
            ));
        }
        if entry.is_none() {
            say!("table mask: no table view, mask bit not seen");
        }
        // And the vector works normally again.
        self.expect_on(cause, m, "after unmask")?;
        Ok(TableMask {
            result: "ok".into(),
            pba: pba_verdict(before, during, after),
        })
    }
}

fn run(a: &Args) -> Result<Report> {
    let bdf = match &a.bdf {
        Some(b) => b.clone(),
        None => sysfs::find_device(e1000e::VENDOR, e1000e::DEVICE)?,
    };
    let ids = sysfs::ids(&bdf)?;
    if ids != (e1000e::VENDOR, e1000e::DEVICE) {
        return Err(Fail::msg(
            "check device",
            format!(
                "{bdf} is {:04x}:{:04x}, not an e1000e (8086:10d3)",
                ids.0, ids.1
            ),
        ));
    }
    let param = sysfs::enable_noiommu()?;
    say!(
        "e1000e {bdf}, driver {:?}; no-IOMMU mode on ({})",
        sysfs::driver(&bdf),
        param.display()
    );
    sysfs::bind_vfio_pci(&bdf)?;
    let group = sysfs::noiommu_group_node(&bdf)?;
    let dev = Device::open_noiommu(&group, &bdf)?;
    say!("{bdf} bound to vfio-pci, {group} opened, device fd ok");

    let layout = Layout::read(&dev)?;
    say!("MSI-X capability {layout:?}");
    for (index, name) in [
        (vfio::INTX_IRQ_INDEX, "INTx"),
        (vfio::MSI_IRQ_INDEX, "MSI"),
        (MSIX_IRQ_INDEX, "MSI-X"),
    ] {
        let info = dev.irq_info(index)?;
        say!(
            "VFIO {name}: {} vector(s), flags 0x{:x}{}",
            info.count,
            info.flags,
            if info.flags & vfio::IRQ_INFO_MASKABLE != 0 {
                " (maskable)"
            } else {
                ""
            }
        );
    }
    let info = dev.irq_info(MSIX_IRQ_INDEX)?;
    if info.count as usize != VECTORS || usize::from(layout.vectors) != VECTORS {
        return Err(Fail::msg(
            "MSI-X vectors",
            format!(
                "VFIO reports {}, the capability {}; the 82574 has {VECTORS}",
                info.count, layout.vectors
            ),
        ));
    }

    let nic = E1000e::new(dev.map_region(0)?)?;
    let cmd = dev.config_read16(4)?;
    dev.config_write16(4, cmd | 0x6)?; // memory space + bus master (MSI-X writes are DMA)
    let cmd_now = dev.config_read16(4)?;
    if cmd_now & 0x6 != 0x6 {
        return Err(Fail::msg(
            "enable bus mastering",
            format!("PCI_COMMAND 0x{cmd:x} -> 0x{cmd_now:x}"),
        ));
    }
    let link = nic.wait_link(3000)?;
    say!(
        "PCI_COMMAND 0x{cmd:x} -> 0x{cmd_now:x}; STATUS 0x{:08x} (link {}), CTRL_EXT 0x{:08x}",
        nic.status()?,
        if link { "up" } else { "down" },
        nic.ctrl_ext()?
    );
    nic.quiesce()?;

    let fds = (0..VECTORS)
        .map(|_| EventFd::new())
        .collect::<Result<Vec<_>>>()?;
    let raw: Vec<_> = fds.iter().map(EventFd::raw).collect();
    dev.set_irq_eventfds(MSIX_IRQ_INDEX, 0, &raw)?;
    say!("MSI-X enabled, vectors 0..{VECTORS} -> eventfds {raw:?}");
    let view = match TableView::open(&bdf, layout) {
        Ok(v) => Some(v),
        Err(e) => {
            say!("no view of the MSI-X table ({e})");
            None
        }
    };
    let mut probe = Probe {
        dev: &dev,
        nic: &nic,
        fds,
        view,
        timeout_ms: a.timeout_ms,
        quiet_ms: a.quiet_ms,
    };
    for v in 0..VECTORS {
        say!("{}", probe.describe(v));
    }
    let early = probe.strays(None)?;
    if !early.is_empty() {
        say!("interrupts before the test (vector, count): {early:?}");
    }

    let result = body(a, &mut probe);
    // The kernel's own count per vector (vfio-msix[N]), while the vectors still exist.
    if let Ok(text) = std::fs::read_to_string("/proc/interrupts") {
        for line in text.lines().filter(|l| l.contains("vfio-msix[")) {
            say!("{}", line.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    nic.shut_up();
    if let Err(e) = dev.disable_irq(MSIX_IRQ_INDEX) {
        say!("disabling MSI-X: {e}");
    }
    let _ = dev.config_write16(4, cmd_now & !0x4);
    result
}

fn body(a: &Args, p: &mut Probe) -> Result<Report> {
    nic_unmask_all(p)?;
    let fired = p.rounds(a.rounds)?;
    let m = a.mask_vector;
    // Identity map for the masking checks: CAUSES[m] goes to vector m.
    p.nic.set_ivar(e1000e::ivar(mapping(0)))?;
    let cause = CAUSES[m];
    let vfio_mask = p.vfio_mask(&cause, m)?;
    let table_mask = p.table_mask(&cause, m)?;
    sleep(Duration::from_millis(a.quiet_ms));
    let late = p.strays(None)?;
    if !late.is_empty() {
        return Err(Fail::msg(
            "late interrupts",
            format!("(vector, count) {late:?} after the last cause was handled"),
        ));
    }
    Ok(Report {
        vectors: VECTORS as u32,
        fired,
        vfio_mask,
        table_mask,
    })
}

fn nic_unmask_all(p: &Probe) -> Result<()> {
    p.nic.unmask(e1000e::all_causes())?;
    let ims = p.nic.ims()?;
    if ims & e1000e::all_causes() != e1000e::all_causes() {
        return Err(Fail::msg("unmask causes", format!("IMS reads 0x{ims:08x}")));
    }
    // Unmasking must not fire anything by itself (nothing is pending after quiesce).
    sleep(Duration::from_millis(p.quiet_ms));
    let strays = p.strays(None)?;
    if !strays.is_empty() {
        return Err(Fail::msg(
            "unmask causes",
            format!("interrupts with no cause raised (vector, count): {strays:?}"),
        ));
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match guest::args_or_exit("MSIX-PROBE", usage(), parse_args) {
        Ok(args) => args,
        Err(status) => return status,
    };
    KMSG.store(args.kmsg, Ordering::Relaxed);
    match run(&args) {
        Ok(r) => {
            println!("MSIX-PROBE: {}", r.line());
            ExitCode::SUCCESS
        }
        Err(f) => {
            println!("MSIX-PROBE: FAIL {f}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> std::result::Result<Option<Args>, String> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        parse_args(&argv)
    }

    #[test]
    fn rounds_rotate_the_cause_to_vector_map() {
        assert_eq!(mapping(0), [0, 1, 2, 3, 4]);
        assert_eq!(mapping(1), [1, 2, 3, 4, 0]);
        assert_eq!(mapping(5), mapping(0));
    }

    #[test]
    fn every_vector_carries_two_different_causes_over_two_rounds() {
        for v in 0..VECTORS as u8 {
            let causes: Vec<usize> = (0..2)
                .filter_map(|r| mapping(r).iter().position(|&x| x == v))
                .collect();
            assert_eq!(causes.len(), 2);
            assert_ne!(causes[0], causes[1]);
        }
    }

    #[test]
    fn arguments() {
        let a = parse(&["0000:00:03.0", "--rounds", "4", "--mask-vector", "1"])
            .unwrap()
            .unwrap();
        assert_eq!(a.bdf.as_deref(), Some("0000:00:03.0"));
        assert_eq!((a.rounds, a.mask_vector), (4, 1));
        assert!(parse(&["--mask-vector", "5"]).is_err());
        assert!(parse(&["--rounds", "0"]).is_err());
        assert!(parse(&["--help"]).unwrap().is_none());
    }

    #[test]
    fn result_line() {
        let r = Report {
            vectors: 5,
            fired: vec![2, 2, 2, 2, 2],
            vfio_mask: "unsupported(ENOTTY)".into(),
            table_mask: TableMask {
                result: "ok".into(),
                pba: "ok".into(),
            },
        };
        assert_eq!(
            r.line(),
            "ok vectors=5 fired=2,2,2,2,2 vfio_mask=unsupported(ENOTTY) table_mask=ok pba=ok"
        );
    }

    #[test]
    fn pending_bit_verdicts() {
        let v = |b, d, a| pba_verdict(Some(b), Some(d), Some(a));
        assert_eq!(v(false, true, false), "ok");
        assert_eq!(v(false, false, false), "not-set-while-held");
        assert_eq!(
            v(false, true, true),
            "odd(before=false,held=true,after=true)"
        );
        assert_eq!(pba_verdict(None, None, None), "unseen");
    }
}
