//! vcpu-hammer: measures how much a guest hammering a passthrough function's config space and
//! MSI-X table from some vCPUs slows another vCPU. Runs inside a lab guest (L2), statically
//! linked, as root.
//!
//! A probe thread pinned to vCPU 0 repeats two timed steps: a fixed CPU-only loop (`cpu`),
//! one config-space read of the host bridge through sysfs (`cfg`: a different function, same
//! VMM code path as the hammered one; Linux serialises every config access under its
//! `pci_lock`, so this step also waits behind the guest's own hammering; the lab kernel has
//! neither `/dev/mem` nor `iopl`, so no exit bypasses the guest's locks). It records each
//! step's latency in a quiet phase (`baseline`), then while hammer threads pinned to vCPUs
//! 1..N run (`hammered`). Each hammer vCPU alternates two passes:
//! - `config`: sysfs config reads at every dword of the NIC's first 256 bytes, a write of its
//!   interrupt line register with the value it holds, and memory decoding switched off and on
//!   (the VMM unmaps and maps the BARs: the slowest config write there is);
//! - `msix`: reads and writes of the NIC's MSI-X table entries (through the BAR's sysfs
//!   mapping), every entry kept masked;
//! - `rom`, when edu is there too: its expansion ROM enabled, read whole and disabled again
//!   through sysfs (the VMM maps and unmaps the ROM BAR each time), every read checked against
//!   the first.
//!
//! Prints, for each phase and step, `VCPU-HAMMER: PHASE STEP n=N median=US p99=US max=US`,
//! `VCPU-HAMMER: rom edu=BDF bytes=N fnv=HASH` for the first ROM read, the hammer operation
//! counts, then `VCPU-HAMMER: ok` (or `VCPU-HAMMER: FAIL reason`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use p2pvmm_tests::guest::vfio::Mapping;
use p2pvmm_tests::guest::{sysfs, Fail, Result};
use p2pvmm_tests::option_rom::fnv1a64;

const NIC: (u16, u16) = (0x8086, 0x10d3);
const EDU: (u16, u16) = (0x1234, 0x11e8);
const HOST_BRIDGE: &str = "0000:00:00.0";
const CAP_ID_MSIX: u8 = 0x11;
const MSIX_ENTRY: usize = 16;
const COMMAND: u64 = 0x04;
const COMMAND_MEMORY: u16 = 1 << 1;
const INTERRUPT_LINE: u64 = 0x3c;
/// Iterations of the CPU-only step: about a millisecond in the lab's L2.
const CPU_WORK: u32 = 100_000;

struct Args {
    phase: Duration,
    cpus: usize,
}

fn parse_args(argv: &[String]) -> std::result::Result<Option<Args>, String> {
    let mut args = Args {
        phase: Duration::from_secs(5),
        cpus: 0,
    };
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--help" => return Ok(None),
            "--phase-ms" => {
                let v = value("--phase-ms")?;
                let ms = v.parse().map_err(|_| format!("bad --phase-ms {v:?}"))?;
                args.phase = Duration::from_millis(ms);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    args.cpus = usize::try_from(online).unwrap_or(1);
    Ok(Some(args))
}

fn usage() -> &'static str {
    "usage: vcpu-hammer [--phase-ms MS]   (needs 2 or more vCPUs; NIC 8086:10d3 without a \
     driver; hammers edu 1234:11e8's ROM too when there is one)"
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity reads it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(Fail::last_os(format!("pinning to vCPU {cpu}")));
    }
    Ok(())
}

fn open_config(bdf: &str) -> Result<File> {
    let path = format!("/sys/bus/pci/devices/{bdf}/config");
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Fail::io(format!("open {path}"), e))
}

fn read_cfg<const N: usize>(config: &File, off: u64) -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    config
        .read_exact_at(&mut buf, off)
        .map_err(|e| Fail::io(format!("config read at {off:#x}"), e))?;
    Ok(buf)
}

fn write_cfg(config: &File, off: u64, bytes: &[u8]) -> Result<()> {
    config
        .write_all_at(bytes, off)
        .map_err(|e| Fail::io(format!("config write at {off:#x}"), e))
}

/// The MSI-X table's BAR, offset and entry count, from the capability list.
fn msix_table(config: &File) -> Result<(usize, usize, usize)> {
    let mut at = read_cfg::<1>(config, 0x34)?[0];
    while at != 0 {
        let [id, next] = read_cfg::<2>(config, u64::from(at))?;
        if id == CAP_ID_MSIX {
            let control = u16::from_le_bytes(read_cfg(config, u64::from(at) + 2)?);
            let table = u32::from_le_bytes(read_cfg(config, u64::from(at) + 4)?);
            let entries = usize::from(control & 0x7ff) + 1;
            return Ok(((table & 7) as usize, (table & !7) as usize, entries));
        }
        at = next;
    }
    Err(Fail::msg(
        "finding MSI-X",
        "the NIC has no MSI-X capability",
    ))
}

/// The fixed CPU-only work of one probe step.
fn cpu_work() -> u32 {
    let mut x = 0x1234_5678u32;
    for _ in 0..CPU_WORK {
        x = std::hint::black_box(x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223));
    }
    x
}

/// Latencies of one phase, in microseconds, per step.
#[derive(Default)]
struct Samples {
    cpu: Vec<u64>,
    cfg: Vec<u64>,
}

fn timed(out: &mut Vec<u64>, step: impl FnOnce() -> Result<()>) -> Result<()> {
    let start = Instant::now();
    step()?;
    out.push(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX));
    Ok(())
}

/// The probe's loop for `phase`, on vCPU 0.
fn probe(bridge: &File, phase: Duration) -> Result<Samples> {
    let mut s = Samples::default();
    let end = Instant::now() + phase;
    while Instant::now() < end {
        timed(&mut s.cpu, || {
            std::hint::black_box(cpu_work());
            Ok(())
        })?;
        timed(&mut s.cfg, || read_cfg::<4>(bridge, 0).map(drop))?;
    }
    Ok(s)
}

/// `n=N median=US p99=US max=US` of `v`.
fn summary(v: &mut [u64]) -> String {
    if v.is_empty() {
        return "n=0".to_owned();
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "n={} median={} p99={} max={}",
        v.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

/// One config-space hammer pass over the NIC: every dword read, two registers rewritten, and
/// memory decoding switched off and on again (the VMM unmaps and maps the BARs).
fn hammer_config(config: &File) -> Result<u64> {
    for off in (0..256).step_by(4) {
        read_cfg::<4>(config, off)?;
    }
    let line = read_cfg::<1>(config, INTERRUPT_LINE)?;
    write_cfg(config, INTERRUPT_LINE, &line)?;
    let command = u16::from_le_bytes(read_cfg(config, COMMAND)?);
    write_cfg(config, COMMAND, &(command & !COMMAND_MEMORY).to_le_bytes())?;
    write_cfg(config, COMMAND, &(command | COMMAND_MEMORY).to_le_bytes())?;
    Ok(64 + 5)
}

/// One MSI-X table pass: each entry read, its message rewritten, kept masked.
fn hammer_msix(bar: &Mapping, table: usize, entries: usize, round: u32) -> Result<u64> {
    let fail = || Fail::msg("MSI-X table access", "outside the BAR mapping");
    for e in 0..entries {
        let at = table + e * MSIX_ENTRY;
        bar.write32(at + 12, 1).ok_or_else(fail)?;
        for word in 0..4 {
            bar.read32(at + word * 4).ok_or_else(fail)?;
        }
        bar.write32(at, 0xfee0_0000).ok_or_else(fail)?;
        bar.write32(at + 4, 0).ok_or_else(fail)?;
        bar.write32(at + 8, round & 0xff).ok_or_else(fail)?;
    }
    Ok(entries as u64 * 8)
}

/// The function's expansion ROM through sysfs: enabled, read whole, disabled again.
fn read_rom(bdf: &str) -> Result<Vec<u8>> {
    let path = format!("/sys/bus/pci/devices/{bdf}/rom");
    std::fs::write(&path, "1").map_err(|e| Fail::io(format!("enable {path}"), e))?;
    let bytes = std::fs::read(&path).map_err(|e| Fail::io(format!("read {path}"), e));
    std::fs::write(&path, "0").map_err(|e| Fail::io(format!("disable {path}"), e))?;
    bytes
}

/// One ROM pass: the whole ROM read again, which must be what the first read gave.
fn hammer_rom(bdf: &str, fnv: u64) -> Result<u64> {
    let bytes = read_rom(bdf)?;
    if fnv1a64(&bytes) != fnv {
        return Err(Fail::msg(
            "ROM read while hammering",
            format!(
                "{} bytes, fnv {:#x}, not the first read's {fnv:#x}",
                bytes.len(),
                fnv1a64(&bytes)
            ),
        ));
    }
    Ok(bytes.len() as u64)
}

fn run(a: &Args) -> Result<()> {
    if a.cpus < 2 {
        return Err(Fail::msg("vCPUs", format!("{} online, 2 needed", a.cpus)));
    }
    let nic = sysfs::find_device(NIC.0, NIC.1)?;
    let config = Arc::new(open_config(&nic)?);
    let command = u16::from_le_bytes(read_cfg(&config, COMMAND)?);
    write_cfg(&config, COMMAND, &(command | COMMAND_MEMORY).to_le_bytes())?;
    let (table_bar, table, entries) = msix_table(&config)?;
    // Mapped here to fail early; each MSI-X hammer maps the BAR again (a mapping stays on its
    // thread).
    drop(sysfs::map_resource(&nic, table_bar)?);
    let bridge = open_config(HOST_BRIDGE)?;
    let rom = match sysfs::find_device(EDU.0, EDU.1) {
        Ok(edu) => {
            let first = read_rom(&edu)?;
            if first.get(..2) != Some(&[0x55, 0xaa][..]) {
                return Err(Fail::msg(
                    "edu's ROM",
                    format!("{} bytes without the 55 AA signature", first.len()),
                ));
            }
            let fnv = fnv1a64(&first);
            println!(
                "VCPU-HAMMER: rom edu={edu} bytes={} fnv={fnv:#x}",
                first.len()
            );
            Some((edu, fnv))
        }
        Err(_) => None,
    };
    println!(
        "VCPU-HAMMER: nic={nic} msix_bar={table_bar} table={table:#x} entries={entries} vcpus={}",
        a.cpus
    );

    pin(0)?;
    let mut baseline = probe(&bridge, a.phase)?;

    let go = Arc::new(AtomicBool::new(true));
    let ops: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    let mut hammers = Vec::new();
    for cpu in 1..a.cpus {
        let (go, ops, config, nic) = (go.clone(), ops.clone(), config.clone(), nic.clone());
        let rom = rom.clone();
        hammers.push(std::thread::spawn(move || -> Result<()> {
            pin(cpu)?;
            let bar = sysfs::map_resource(&nic, table_bar)?;
            let mut round = 0u32;
            while go.load(Ordering::Relaxed) {
                round = round.wrapping_add(1);
                // The passes take turns on each hammer vCPU (the lab's L2 kernel has
                // NR_CPUS=2: one hammer vCPU does them all).
                let passes = if rom.is_some() { 3 } else { 2 };
                match ((round as usize + cpu) % passes, &rom) {
                    (0, _) => ops[0].fetch_add(hammer_config(&config)?, Ordering::Relaxed),
                    (2, Some((edu, fnv))) => {
                        ops[2].fetch_add(hammer_rom(edu, *fnv)?, Ordering::Relaxed)
                    }
                    _ => ops[1]
                        .fetch_add(hammer_msix(&bar, table, entries, round)?, Ordering::Relaxed),
                };
            }
            Ok(())
        }));
    }
    let hammered = probe(&bridge, a.phase);
    go.store(false, Ordering::Relaxed);
    for h in hammers {
        h.join()
            .map_err(|_| Fail::msg("hammer thread", "panicked"))??;
    }
    let mut hammered = hammered?;
    for (phase, s) in [("baseline", &mut baseline), ("hammered", &mut hammered)] {
        for (step, v) in [("cpu", &mut s.cpu), ("cfg", &mut s.cfg)] {
            println!("VCPU-HAMMER: {phase} {step} {}", summary(v));
        }
    }
    let secs = a.phase.as_secs_f64();
    let [config_ops, msix_ops, rom_bytes] = [0, 1, 2].map(|i| ops[i].load(Ordering::Relaxed));
    println!(
        "VCPU-HAMMER: hammer config_accesses={config_ops} msix_accesses={msix_ops} \
         rom_bytes={rom_bytes} per_s={:.0},{:.0}",
        config_ops as f64 / secs,
        msix_ops as f64 / secs
    );
    Ok(())
}

fn main() -> ExitCode {
    let a = match p2pvmm_tests::guest::args_or_exit("VCPU-HAMMER", usage(), parse_args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    match run(&a) {
        Ok(()) => {
            println!("VCPU-HAMMER: ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("VCPU-HAMMER: FAIL {e}");
            ExitCode::FAILURE
        }
    }
}
