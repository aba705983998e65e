//! bar-move-time: the guest's own time for a BAR move as Linux writes one (memory decoding off,
//! the two halves of the BAR, decoding on), for resources/bench-bar-move.sh, which runs it in a
//! lab L2 under p2pvmm and under QEMU with the same passed-through ivshmem. The time of each
//! config write is how long the writing vCPU stood still while the VMM handled it: every step
//! of the move (the KVM memory slot, the host device's command register, the IOMMU mappings of
//! the BAR) happens inside one of the four writes.
//!   `bar-move-time IVSHMEM [--moves N]`   (IVSHMEM: the BDF; BAR2 moves, default 20 moves)
//! Moves BAR2 between the address Linux gave it and the first free slot of its size in the
//! bridge window that holds it (a move that stays inside the window, as Linux's reassignment
//! does), checks after each move that the BAR reads back the new address with decoding on and
//! that the CPU reaches the BAR's memory at the new place only (a marker written through sysfs
//! `resource2`, which maps the address Linux gave it: read back when the BAR is there, not
//! when it is away, so a stale guest mapping of the old address fails the move), and
//! prints `BAR-MOVE-TIME: move I total_us=T off_us=A lo_us=B hi_us=C on_us=D` per move, then
//! `BAR-MOVE-TIME: median total_us=T off_us=A lo_us=B hi_us=C on_us=D moves=N size=S` (exit 0)
//! or `BAR-MOVE-TIME: FAIL <why>` (exit 1).

// Shared with bar-walk, which uses all of it; this probe needs a part.
#[allow(dead_code)]
#[path = "bar_walk/place.rs"]
mod place;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::time::Instant;

use p2pvmm_tests::guest::{sysfs, Fail, Result};
use place::{Bar, Range, BAR2, CMD_MEMORY, PCI_COMMAND};

/// Written at BAR2's first dword through `resource2`: neither all-ones nor zero.
const MARKER: u32 = 0x5a5a_a5a5;

/// The first free size-aligned slot for the BAR in the innermost `PCI Bus` window of
/// `/proc/iomem` that holds it: touching none of that window's entries (the BAR's own among
/// them).
fn free_slot(bar: &Bar) -> Result<(u64, Range)> {
    let map = place::iomem()?;
    let i = map
        .iter()
        .enumerate()
        .filter(|(_, e)| e.2.starts_with("PCI Bus") && e.1.holds(bar.home, bar.size))
        .max_by_key(|(_, e)| e.0)
        .map(|(i, _)| i)
        .ok_or_else(|| {
            Fail::msg(
                "window",
                format!("no PCI Bus window holds 0x{:x}", bar.home),
            )
        })?;
    let window = map[i].1;
    place::free_slots_in(&map, i, bar.size)
        .map(|(slot, _)| (slot, window))
        .ok_or_else(|| {
            Fail::msg(
                "window",
                format!("no free slot of 0x{:x} bytes in {window:x?}", bar.size),
            )
        })
}

fn median(v: &mut [u128]) -> u128 {
    v.sort_unstable();
    match v.len() {
        0 => 0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

fn run(bdf: &str, moves: usize) -> Result<()> {
    let bar = Bar::open(bdf)?;
    let (other, window) = free_slot(&bar)?;
    println!(
        "BAR-MOVE-TIME: {bdf} BAR2 0x{:x} bytes moves between 0x{:x} and 0x{other:x} in {window:x?}",
        bar.size, bar.home
    );
    let path = format!("/sys/bus/pci/devices/{bdf}/config");
    let cfg = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Fail::io(format!("open {path}"), e))?;
    // Decoding on before the first move: the moves are what is timed, not the first map.
    bar.set_decode(true)?;
    let home_view = sysfs::map_resource(bdf, 2)?;
    home_view
        .write32(0, MARKER)
        .ok_or_else(|| Fail::msg("marker", "resource2 is empty"))?;
    let seen = || home_view.read32(0).unwrap_or(0);
    if seen() != MARKER {
        return Err(Fail::msg(
            "marker",
            format!(
                "0x{MARKER:x} written at the BAR's home, 0x{:x} read",
                seen()
            ),
        ));
    }
    let mut cmd = [0u8; 2];
    cfg.read_exact_at(&mut cmd, PCI_COMMAND)
        .map_err(|e| Fail::io("read PCI_COMMAND", e))?;
    let on = u16::from_le_bytes(cmd) | CMD_MEMORY;
    let off = on & !CMD_MEMORY;
    let write = |off_: u64, bytes: &[u8]| -> Result<u128> {
        let t = Instant::now();
        cfg.write_all_at(bytes, off_)
            .map_err(|e| Fail::io(format!("write config at 0x{off_:x}"), e))?;
        Ok(t.elapsed().as_micros())
    };
    let mut steps: [Vec<u128>; 5] = Default::default();
    for i in 1..=moves {
        let to = if i % 2 == 1 { other } else { bar.home };
        let t = [
            write(PCI_COMMAND, &off.to_le_bytes())?,
            write(BAR2, &(to as u32).to_le_bytes())?,
            write(BAR2 + 4, &((to >> 32) as u32).to_le_bytes())?,
            write(PCI_COMMAND, &on.to_le_bytes())?,
        ];
        let total: u128 = t.iter().sum();
        // The CPU's view of the home address: the BAR's memory exactly when the BAR is there.
        let at_home = seen() == MARKER;
        if at_home != (to == bar.home) {
            return Err(Fail::msg(
                "CPU view",
                format!(
                    "move {i} to 0x{to:x}: the home address 0x{:x} reads 0x{:x}: {}",
                    bar.home,
                    seen(),
                    if at_home {
                        "the BAR's memory though the BAR moved away (a stale mapping)"
                    } else {
                        "not the BAR's memory though the BAR is back"
                    }
                ),
            ));
        }
        let now = bar.address()?;
        cfg.read_exact_at(&mut cmd, PCI_COMMAND)
            .map_err(|e| Fail::io("read PCI_COMMAND", e))?;
        if now != to || u16::from_le_bytes(cmd) & CMD_MEMORY == 0 {
            return Err(Fail::msg(
                "move",
                format!(
                    "move {i}: BAR2 reads 0x{now:x} (wrote 0x{to:x}), PCI_COMMAND 0x{:x}",
                    u16::from_le_bytes(cmd)
                ),
            ));
        }
        println!(
            "BAR-MOVE-TIME: move {i} total_us={total} off_us={} lo_us={} hi_us={} on_us={}",
            t[0], t[1], t[2], t[3]
        );
        for (s, v) in steps.iter_mut().zip([total, t[0], t[1], t[2], t[3]]) {
            s.push(v);
        }
    }
    let [total, off_us, lo, hi, on_us] = steps.map(|mut s| median(&mut s));
    println!(
        "BAR-MOVE-TIME: median total_us={total} off_us={off_us} lo_us={lo} hi_us={hi} on_us={on_us} moves={moves} size={}",
        bar.size
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (bdf, moves) = match args.as_slice() {
        [bdf] => (bdf.as_str(), Some(20)),
        [bdf, flag, n] if flag == "--moves" => (bdf.as_str(), n.parse().ok()),
        _ => (args.first().map_or("", String::as_str), None),
    };
    let Some(moves) = moves.filter(|&n: &usize| n > 0 && !bdf.is_empty()) else {
        eprintln!("usage: bar-move-time IVSHMEM-BDF [--moves N]");
        return ExitCode::from(2);
    };
    match run(bdf, moves) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("BAR-MOVE-TIME: FAIL {e}");
            ExitCode::FAILURE
        }
    }
}
