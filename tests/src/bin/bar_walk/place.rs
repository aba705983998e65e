//! Where ivshmem's BAR can go, from L2's own view: its BAR register and command register through
//! the sysfs `config` file, the prefetchable window of the bridge above it (its config space, as
//! p2pvmm emulates it) and the address ranges the kernel knows (`/proc/iomem`).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use p2pvmm_tests::guest::{Fail, Result};

pub const PCI_COMMAND: u64 = 0x04;
pub const CMD_MEMORY: u16 = 0x2;
/// BAR2's low dword; BAR2 of ivshmem is 64-bit, its high dword follows.
pub const BAR2: u64 = 0x18;

/// An inclusive address range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    /// Whether `[addr, addr + size)` lies inside.
    pub fn holds(&self, addr: u64, size: u64) -> bool {
        addr >= self.start && addr.checked_add(size - 1).is_some_and(|e| e <= self.end)
    }

    pub fn overlaps(&self, addr: u64, size: u64) -> bool {
        addr <= self.end && addr.saturating_add(size - 1) >= self.start
    }
}

fn dev_dir(bdf: &str) -> PathBuf {
    Path::new("/sys/bus/pci/devices").join(bdf)
}

fn read_at<const N: usize>(f: &File, off: u64, what: &str) -> Result<[u8; N]> {
    let mut b = [0u8; N];
    f.read_exact_at(&mut b, off)
        .map_err(|e| Fail::io(format!("read {what} config at 0x{off:x}"), e))?;
    Ok(b)
}

/// ivshmem's BAR2 and command register, written as Linux does: memory decoding off around a move.
pub struct Bar {
    cfg: File,
    bdf: String,
    pub size: u64,
    /// The address the kernel assigned (sysfs `resource`, which the walk's moves do not change).
    pub home: u64,
}

impl Bar {
    pub fn open(bdf: &str) -> Result<Self> {
        let dir = dev_dir(bdf);
        let path = dir.join("config");
        let cfg = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Fail::io(format!("open {}", path.display()), e))?;
        let res = fs::read_to_string(dir.join("resource"))
            .map_err(|e| Fail::io(format!("read {bdf} resource"), e))?;
        let line = res.lines().nth(2).unwrap_or("");
        let f: Vec<u64> = line
            .split_whitespace()
            .filter_map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
            .collect();
        let (home, end) = match f[..] {
            [s, e, _] if s != 0 && e > s => (s, e),
            _ => return Err(Fail::msg("BAR2", format!("{bdf}: resource line '{line}'"))),
        };
        Ok(Self {
            cfg,
            bdf: bdf.to_owned(),
            size: end - home + 1,
            home,
        })
    }

    fn cmd(&self) -> Result<u16> {
        Ok(u16::from_le_bytes(read_at(
            &self.cfg,
            PCI_COMMAND,
            &self.bdf,
        )?))
    }

    /// Turns memory decoding on or off, keeping the other command bits.
    pub fn set_decode(&self, on: bool) -> Result<()> {
        let cmd = self.cmd()?;
        let new = if on {
            cmd | CMD_MEMORY
        } else {
            cmd & !CMD_MEMORY
        };
        self.cfg
            .write_all_at(&new.to_le_bytes(), PCI_COMMAND)
            .map_err(|e| Fail::io(format!("write {} PCI_COMMAND 0x{new:x}", self.bdf), e))?;
        let now = self.cmd()?;
        if now & CMD_MEMORY != new & CMD_MEMORY {
            return Err(Fail::msg(
                "memory decode",
                format!(
                    "{}: PCI_COMMAND 0x{new:x} written, 0x{now:x} read",
                    self.bdf
                ),
            ));
        }
        Ok(())
    }

    /// The address BAR2 decodes (its flag bits masked).
    pub fn address(&self) -> Result<u64> {
        let lo = u32::from_le_bytes(read_at(&self.cfg, BAR2, &self.bdf)?);
        let hi = u32::from_le_bytes(read_at(&self.cfg, BAR2 + 4, &self.bdf)?);
        Ok((u64::from(hi) << 32) | u64::from(lo & !0xf))
    }

    /// Moves BAR2 to `addr` writing its two halves in `order`, then leaves decoding at
    /// `decode`. With `live` and decoding on, the halves are written while the BAR decodes (a
    /// guest that does not turn decoding off around a move), so between the two writes it
    /// decodes at a mixed address, which is returned; otherwise decoding is off around the
    /// move (as Linux does it) and `None` is returned. Checks the register reads back `addr`.
    pub fn move_to(
        &self,
        addr: u64,
        decode: bool,
        order: Halves,
        live: bool,
    ) -> Result<Option<u64>> {
        let old = self.address()?;
        let live = live && decode && self.cmd()? & CMD_MEMORY != 0;
        if !live {
            self.set_decode(false)?;
        }
        let (lo, hi) = ((BAR2, addr as u32), (BAR2 + 4, (addr >> 32) as u32));
        let (first, second, mixed) = match order {
            Halves::LowFirst => (lo, hi, (old & !0xffff_ffff) | (addr & 0xffff_ffff)),
            Halves::HighFirst => (hi, lo, (addr & !0xffff_ffff) | (old & 0xffff_ffff)),
        };
        for (off, v) in [first, second] {
            self.cfg
                .write_all_at(&v.to_le_bytes(), off)
                .map_err(|e| Fail::io(format!("write {} BAR2 0x{addr:x}", self.bdf), e))?;
        }
        let now = self.address()?;
        if now != addr {
            return Err(Fail::msg(
                "BAR move",
                format!(
                    "{}: BAR2 0x{addr:x} written ({order:?}), 0x{now:x} read",
                    self.bdf
                ),
            ));
        }
        if decode && !live {
            self.set_decode(true)?;
        }
        Ok((live && mixed != old && mixed != addr).then_some(mixed))
    }
}

/// Which half of a 64-bit BAR a move writes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Halves {
    LowFirst,
    HighFirst,
}

/// The 64-bit prefetchable window of the bridge directly above `bdf` (its upstream port).
pub fn bridge_window(bdf: &str) -> Result<Range> {
    let dev = fs::canonicalize(dev_dir(bdf))
        .map_err(|e| Fail::io(format!("resolve {bdf} in sysfs"), e))?;
    let port = dev
        .parent()
        .filter(|p| p.join("config").exists())
        .ok_or_else(|| Fail::msg("bridge window", format!("{bdf} has no bridge above it")))?;
    let cfg = File::open(port.join("config"))
        .map_err(|e| Fail::io(format!("open {}/config", port.display()), e))?;
    let what = port.display().to_string();
    let base = u64::from(u16::from_le_bytes(read_at(&cfg, 0x24, &what)?) & 0xfff0) << 16;
    let limit = u64::from(u16::from_le_bytes(read_at(&cfg, 0x26, &what)?) & 0xfff0) << 16;
    let base_hi = u64::from(u32::from_le_bytes(read_at(&cfg, 0x28, &what)?)) << 32;
    let limit_hi = u64::from(u32::from_le_bytes(read_at(&cfg, 0x2c, &what)?)) << 32;
    let w = Range {
        start: base_hi | base,
        end: limit_hi | limit | 0xf_ffff,
    };
    if w.end <= w.start {
        return Err(Fail::msg(
            "bridge window",
            format!("{what}: prefetchable window closed ({w:x?})"),
        ));
    }
    Ok(w)
}

/// `/proc/iomem` as (depth, range, name), depth 0 for the top level.
pub fn iomem() -> Result<Vec<(usize, Range, String)>> {
    let text = fs::read_to_string("/proc/iomem").map_err(|e| Fail::io("read /proc/iomem", e))?;
    Ok(parse_iomem(&text))
}

fn parse_iomem(text: &str) -> Vec<(usize, Range, String)> {
    text.lines()
        .filter_map(|l| {
            let depth = (l.len() - l.trim_start().len()) / 2;
            let (range, name) = l.trim().split_once(" : ")?;
            let (s, e) = range.split_once('-')?;
            let r = Range {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
            };
            Some((depth, r, name.to_owned()))
        })
        .collect()
}

/// Addresses where a BAR of `size` is outside every window: size-aligned slots from 4 GiB up
/// to 2^39 (what the lab's IOMMU translates) that touch no top-level `/proc/iomem` range (RAM,
/// the host bridge's windows, anything reserved). Returns (first slot, number of slots) of the
/// largest such gap.
pub fn outside_every_window(map: &[(usize, Range, String)], size: u64) -> Option<(u64, u64)> {
    let top: Vec<Range> = map.iter().filter(|e| e.0 == 0).map(|e| e.1).collect();
    free_slots(&top, 1 << 32, (1 << 39) - 1, size)
}

/// Addresses inside the host bridge window that holds `window` but outside every range the
/// kernel put in it (bridge windows, BARs): (first slot, number of slots) of the largest gap.
pub fn outside_bridge_windows(
    map: &[(usize, Range, String)],
    window: Range,
    size: u64,
) -> Option<(u64, u64)> {
    let host = map
        .iter()
        .position(|e| e.0 == 0 && e.1.holds(window.start, window.end - window.start + 1))?;
    free_slots_in(map, host, size)
}

/// Size-aligned slots inside entry `i` of `map` that touch none of its direct children (the
/// bridge windows and BARs the kernel put in it): (first slot, number of slots) of the largest
/// gap.
pub fn free_slots_in(map: &[(usize, Range, String)], i: usize, size: u64) -> Option<(u64, u64)> {
    let (depth, range, _) = &map[i];
    let inner: Vec<Range> = map[i + 1..]
        .iter()
        .take_while(|e| e.0 > *depth)
        .filter(|e| e.0 == depth + 1)
        .map(|e| e.1)
        .collect();
    free_slots(&inner, range.start, range.end, size)
}

/// Whether a BAR of `size` at `addr` would sit inside a host bridge window and touch nothing
/// the kernel lists there but the windows that hold all of `window` (the bridges above the
/// BAR, the host bridge): the slot right past a bridge window, inside its parent's.
pub fn only_in_ancestors(
    map: &[(usize, Range, String)],
    window: Range,
    addr: u64,
    size: u64,
) -> bool {
    let span = window.end - window.start + 1;
    let ancestor = |r: &Range| r.holds(window.start, span);
    let in_host = map
        .iter()
        .any(|e| e.0 == 0 && ancestor(&e.1) && e.1.holds(addr, size));
    in_host
        && map
            .iter()
            .all(|e| ancestor(&e.1) || !e.1.overlaps(addr, size))
}

/// The largest run of size-aligned slots of `size` within `[lo, hi]` that touch none of `used`.
fn free_slots(used: &[Range], lo: u64, hi: u64, size: u64) -> Option<(u64, u64)> {
    let mut best: Option<(u64, u64)> = None;
    let mut run: Option<(u64, u64)> = None;
    let mut a = lo.div_ceil(size) * size;
    while a.checked_add(size - 1).is_some_and(|e| e <= hi) {
        if used.iter().any(|r| r.overlaps(a, size)) {
            run = None;
        } else {
            let r = run.map_or((a, 1), |(s, n)| (s, n + 1));
            run = Some(r);
            if best.is_none_or(|b| r.1 > b.1) {
                best = Some(r);
            }
        }
        a += size;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const IOMEM: &str = "00000000-00000fff : Reserved
00001000-0009fbff : System RAM
c0000000-dfffffff : PCI Bus 0000:00
  c0000000-c00fffff : PCI Bus 0000:01
4000000000-7fffffffff : PCI Bus 0000:00
  4000000000-400fffffff : PCI Bus 0000:01
    4000000000-400fffffff : PCI Bus 0000:02
  4010000000-4013ffffff : 0000:00:05.0
";

    #[test]
    fn outside_every_window_is_the_gap_between_ram_and_the_64_bit_window() {
        let map = parse_iomem(IOMEM);
        let size = 64 << 20;
        let (first, n) = outside_every_window(&map, size).unwrap();
        assert_eq!(first, 1 << 32);
        assert_eq!(first + n * size, 0x40_0000_0000);
    }

    #[test]
    fn outside_bridge_windows_skips_the_ports_and_other_bars() {
        let map = parse_iomem(IOMEM);
        let w = Range {
            start: 0x40_0000_0000,
            end: 0x40_0fff_ffff,
        };
        let (first, n) = outside_bridge_windows(&map, w, 64 << 20).unwrap();
        assert_eq!(first, 0x40_1400_0000);
        assert_eq!(first + n * (64 << 20) - 1, 0x7f_ffff_ffff);
        assert!(w.holds(0x40_0c00_0000, 64 << 20));
        // Right past the port's window, inside its parent's: allowed; over a BAR or below the
        // host window: not.
        let port = Range {
            start: 0x40_0000_0000,
            end: 0x40_07ff_ffff,
        };
        assert!(only_in_ancestors(&map, port, 0x40_0800_0000, 64 << 20));
        assert!(!only_in_ancestors(&map, port, 0x40_1000_0000, 64 << 20));
        assert!(!only_in_ancestors(&map, port, 0x3f_fc00_0000, 64 << 20));
        assert!(!w.holds(0x40_0e00_0000, 64 << 20));
    }
}
