//! bar-walk: a seeded random walk of ivshmem's BAR2 (1af4:1110) with edu DMAs (1234:11e8)
//! between the steps, run inside a lab L2 that p2pvmm started with both devices in one P2P group.
//! Each step moves the BAR to a random slot of its bridge's prefetchable window (the first and
//! last slot included), moves it outside every window, or toggles memory decoding; then edu
//! writes a pattern of its own to the BAR's current address and to former ones (always the
//! previous one). Every DMA goes to its own offset in the BAR, so a DMA that lands where it
//! should not stays visible: after each step the CPU reads back every DMA's offset through the
//! BAR (sysfs `resource2`, at the address the kernel assigned: the BAR is moved there for the
//! read and back) and each must hold its pattern exactly when the BAR decoded at the target
//! address, inside its window, with decoding on, and its fill otherwise.
//! Prints `BAR-WALK: seed=S` first, a line per step, `BAR-WALK: FAIL step=..` per wrong DMA and
//! finally `BAR-WALK: ok steps=N seed=S dmas=D landed=L` or `BAR-WALK: FAIL ...`; exit 0 only
//! on ok. See `usage()`.

// A crate root resolves `mod` next to itself, so point into bar_walk/ explicitly.
#[path = "bar_walk/place.rs"]
mod place;

use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use p2pvmm_tests::guest::edu::{self, Engine, Irq, BUF_ADDR};
use p2pvmm_tests::guest::page::{DmaPage, Pagemap};
use p2pvmm_tests::guest::vfio::{self, Mapping};
use p2pvmm_tests::guest::{self, sysfs, Fail, Result};
use place::{Bar, Range};

fn usage() -> &'static str {
    "usage: bar-walk EDU IVSHMEM [options]
  EDU, IVSHMEM         the BDFs of edu and of ivshmem (BAR2 is walked)
  --steps N            steps of the walk (default 200)
  --seed S             the PRNG seed (default: from the clock); printed as 'BAR-WALK: seed=S'
  --len N              bytes per DMA, a multiple of 8 up to 1360 (default 256)
  --outside-bridge     also move the BAR inside the host bridge's window but outside every
                       bridge window (real hardware does not forward there: it must not land)
Result: 'BAR-WALK: ok steps=N seed=S dmas=D landed=L' (exit 0) or 'BAR-WALK: FAIL ...' (exit 1)."
}

#[derive(Debug)]
struct Args {
    edu: String,
    shm: String,
    steps: u32,
    seed: Option<u64>,
    len: usize,
    outside_bridge: bool,
}

fn parse_args(argv: &[String]) -> std::result::Result<Option<Args>, String> {
    let mut pos = Vec::new();
    let (mut steps, mut seed, mut len, mut outside_bridge) = (200, None, 256, false);
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let mut num = |name: &str| -> std::result::Result<u64, String> {
            let v = it.next().ok_or(format!("{name} needs a value"))?;
            v.parse().map_err(|_| format!("{name}: '{v}' is not a number"))
        };
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--steps" => steps = u32::try_from(num("--steps")?).map_err(|_| "--steps too big")?,
            "--seed" => seed = Some(num("--seed")?),
            "--len" => len = num("--len")? as usize,
            "--outside-bridge" => outside_bridge = true,
            s if s.starts_with('-') => return Err(format!("unknown option '{s}'")),
            s => pos.push(s.to_owned()),
        }
    }
    let [edu, shm] = <[String; 2]>::try_from(pos).map_err(|_| "expects EDU and IVSHMEM")?;
    // Three DMAs a step share edu's 4 KiB buffer (at most 4095 bytes a transfer).
    if len == 0 || !len.is_multiple_of(8) || len * TARGETS > edu::MAX_XFER {
        return Err(format!("--len must be a multiple of 8 up to {}", edu::MAX_XFER / TARGETS / 8 * 8));
    }
    Ok(Some(Args {
        edu,
        shm,
        steps,
        seed,
        len,
        outside_bridge,
    }))
}

/// DMAs per step at most: the current address, the previous one, one older one.
const TARGETS: usize = 3;

/// splitmix64: small, seedable, good enough to pick moves.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Word `w` of DMA `k`'s pattern; its fill (what the BAR holds there before) is the complement.
fn pattern(seed: u64, k: usize, w: usize) -> u64 {
    mix(seed ^ ((k as u64) << 24) ^ w as u64)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Inside,
    OutsideAll,
    OutsideBridge,
    Decode,
}

/// One edu DMA of the walk and what the guest state said about it.
struct Dma {
    step: u32,
    target: u64,
    /// Offset in the BAR reserved for this DMA (target - base when it hits the BAR).
    offset: usize,
    should_land: bool,
    state: String,
    reported: bool,
}

/// The walk's view of the BAR: where it is, whether it decodes, where it was.
struct Walk<'a> {
    bar: &'a Bar,
    window: Range,
    outside_all: (u64, u64),
    outside_bridge: Option<(u64, u64)>,
    base: u64,
    decode: bool,
    /// Addresses the BAR had before, oldest first, no repeats; the last is the previous one.
    former: Vec<u64>,
}

impl Walk<'_> {
    fn in_window(&self) -> bool {
        self.window.holds(self.base, self.bar.size)
    }

    fn reachable(&self) -> bool {
        self.decode && self.in_window()
    }

    fn state(&self) -> String {
        format!(
            "base=0x{:x} {} decode={}",
            self.base,
            if self.in_window() { "in-window" } else { "outside" },
            if self.decode { "on" } else { "off" }
        )
    }

    fn pick(&self, rng: &mut Rng) -> Op {
        match rng.below(10) {
            0..=3 => Op::Inside,
            4 | 5 if self.outside_bridge.is_some() && rng.below(2) == 0 => Op::OutsideBridge,
            4 | 5 => Op::OutsideAll,
            _ => Op::Decode,
        }
    }

    fn apply(&mut self, op: Op, rng: &mut Rng) -> Result<()> {
        let size = self.bar.size;
        let slot = |(first, n): (u64, u64), rng: &mut Rng| first + rng.below(n) * size;
        let new = match op {
            Op::Decode => {
                self.decode = !self.decode;
                return self.bar.set_decode(self.decode);
            }
            Op::Inside => {
                let first = self.window.start.div_ceil(size) * size;
                let n = (self.window.end + 1 - first) / size;
                match rng.below(4) {
                    0 => first,
                    1 => first + (n - 1) * size,
                    _ => slot((first, n), rng),
                }
            }
            Op::OutsideAll => slot(self.outside_all, rng),
            Op::OutsideBridge => slot(self.outside_bridge.unwrap_or(self.outside_all), rng),
        };
        if new != self.base {
            self.former.retain(|&a| a != self.base && a != new);
            self.former.push(self.base);
            self.base = new;
        }
        self.bar.move_to(new, self.decode)
    }

    /// Where the step's DMAs go: the current address, the previous one, one older one.
    fn targets(&self, rng: &mut Rng) -> Vec<u64> {
        let mut t = vec![self.base];
        let n = self.former.len();
        if n >= 1 {
            t.push(self.former[n - 1]);
        }
        if n >= 2 {
            t.push(self.former[rng.below(n as u64 - 1) as usize]);
        }
        t
    }

    /// Runs `read` with the BAR at the kernel's address with decoding on (where `resource2`
    /// maps it), then puts it back.
    fn at_home<T>(&self, read: impl FnOnce() -> T) -> Result<T> {
        let home = self.bar.home;
        if self.base != home {
            self.bar.move_to(home, true)?;
        } else if !self.decode {
            self.bar.set_decode(true)?;
        }
        let out = read();
        if self.base != home {
            self.bar.move_to(self.base, self.decode)?;
        } else if !self.decode {
            self.bar.set_decode(false)?;
        }
        Ok(out)
    }
}

/// Compares every DMA's offset in the BAR with what should be there; prints each wrong DMA once.
/// Returns how many were wrong for the first time.
fn check(map: &Mapping, dmas: &mut [Dma], seed: u64, len: usize, step: u32) -> usize {
    let mut wrong = 0;
    for (k, d) in dmas.iter_mut().enumerate() {
        let (mut pat, mut fill) = (0, 0);
        for w in 0..len / 8 {
            let got = map.read64(d.offset + w * 8);
            let p = pattern(seed, k, w);
            pat += usize::from(got == Some(p));
            fill += usize::from(got == Some(!p));
        }
        let ok = if d.should_land { pat } else { fill } == len / 8;
        if !ok && !d.reported {
            d.reported = true;
            wrong += 1;
            println!(
                "BAR-WALK: FAIL step={step} dma={k} of step {} to 0x{:x} ({}): should {}land; \
                 BAR offset 0x{:x} holds {pat}/{} words of the pattern, {fill} of the fill",
                d.step,
                d.target,
                d.state,
                if d.should_land { "" } else { "not " },
                d.offset,
                len / 8
            );
        }
    }
    wrong
}

struct Outcome {
    dmas: usize,
    landed: usize,
    wrong: usize,
}

fn walk(a: &Args, seed: u64) -> Result<Outcome> {
    let bar = Bar::open(&a.shm)?;
    let window = place::bridge_window(&a.shm)?;
    let map_iomem = place::iomem()?;
    let outside_all = place::outside_every_window(&map_iomem, bar.size)
        .ok_or_else(|| Fail::msg("outside", "no address outside every window"))?;
    let outside_bridge = if a.outside_bridge {
        let r = place::outside_bridge_windows(&map_iomem, window, bar.size);
        Some(r.ok_or_else(|| Fail::msg("outside", "no room outside the bridge windows"))?)
    } else {
        None
    };
    let slots = bar.size / 4096;
    let max_dmas = a.steps as u64 * TARGETS as u64;
    if max_dmas > slots {
        return Err(Fail::msg("steps", format!("{max_dmas} DMAs need more than {slots} pages")));
    }
    println!(
        "bar-walk: ivshmem {} BAR2 0x{:x} size 0x{:x}; bridge window 0x{:x}-0x{:x}; outside every \
         window: {} slots from 0x{:x}; outside the bridges: {:x?}",
        a.shm, bar.home, bar.size, window.start, window.end, outside_all.1, outside_all.0,
        outside_bridge
    );
    if bar.address()? != bar.home || !window.holds(bar.home, bar.size) {
        return Err(Fail::msg(
            "start",
            format!("BAR2 reads 0x{:x}, not the kernel's 0x{:x} inside the window", bar.address()?, bar.home),
        ));
    }
    bar.set_decode(true)?;
    let map = sysfs::map_resource(&a.shm, 2)?;

    let opened = edu::open(&a.edu, "bar-walk")?;
    let (event, _, _) = edu::irq_eventfd(&opened.dev, vfio::MSI_IRQ_INDEX, "MSI")?;
    let mut eng = Engine {
        edu: &opened.edu,
        irq: Some(Irq {
            name: "MSI",
            event,
            after_ack: None,
        }),
        timeout_ms: 5000,
        irqs: 0,
        transfers: 0,
        log: false,
    };
    let pm = Pagemap::open()?;
    let src = DmaPage::new(&pm)?;

    // Every page offset at most once, spread over the BAR (odd stride: a permutation).
    let offset = |k: usize| ((k as u64 * 7919 + seed % slots) % slots * 4096) as usize;
    for k in 0..max_dmas as usize {
        for w in 0..a.len / 8 {
            map.write64(offset(k) + w * 8, !pattern(seed, k, w))
                .ok_or_else(|| Fail::msg("fill", "offset outside resource2"))?;
        }
    }
    let mut st = Walk {
        bar: &bar,
        window,
        outside_all,
        outside_bridge,
        base: bar.home,
        decode: true,
        former: Vec::new(),
    };
    let mut rng = Rng(seed);
    let mut dmas: Vec<Dma> = Vec::new();
    let mut wrong = 0;
    let t0 = Instant::now();
    for step in 1..=a.steps {
        let op = st.pick(&mut rng);
        st.apply(op, &mut rng)?;
        let targets = st.targets(&mut rng);
        let first = dmas.len();
        src.fill(|i| {
            let (j, w) = (i / a.len, (i % a.len) / 8);
            (pattern(seed, first + j, w) >> (8 * (i % 8))) as u8
        });
        eng.transfer("RAM->edu", src.phys(), BUF_ADDR, targets.len() * a.len, false)?;
        for (j, &t) in targets.iter().enumerate() {
            let off = offset(first + j);
            let addr = t + off as u64;
            eng.transfer("edu->BAR", BUF_ADDR + (j * a.len) as u64, addr, a.len, true)
                .map_err(|f| f.context(format!("step {step}")))?;
            dmas.push(Dma {
                step,
                target: addr,
                offset: off,
                should_land: st.reachable() && t == st.base,
                state: st.state(),
                reported: false,
            });
        }
        let new_wrong = st.at_home(|| check(&map, &mut dmas, seed, a.len, step))?;
        wrong += new_wrong;
        println!(
            "bar-walk: step {step} {op:?} {} dmas={} {} t={:.1}s",
            st.state(),
            targets.len(),
            if new_wrong == 0 { "ok" } else { "WRONG" },
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(Outcome {
        dmas: dmas.len(),
        landed: dmas.iter().filter(|d| d.should_land).count(),
        wrong,
    })
}

fn main() -> ExitCode {
    let args = match guest::args_or_exit("BAR-WALK", usage(), parse_args) {
        Ok(args) => args,
        Err(status) => return status,
    };
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id())
    });
    println!("BAR-WALK: seed={seed}");
    match walk(&args, seed) {
        Ok(o) if o.wrong == 0 => {
            println!(
                "BAR-WALK: ok steps={} seed={seed} dmas={} landed={}",
                args.steps, o.dmas, o.landed
            );
            ExitCode::SUCCESS
        }
        Ok(o) => {
            println!(
                "BAR-WALK: FAIL wrong={} of dmas={} steps={} seed={seed}",
                o.wrong, o.dmas, args.steps
            );
            ExitCode::FAILURE
        }
        Err(f) => {
            println!("BAR-WALK: FAIL {f} seed={seed}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(argv: &[&str]) -> std::result::Result<Option<Args>, String> {
        parse_args(&argv.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn the_seed_and_steps_come_from_flags_and_the_length_fits_edus_buffer() {
        let a = args(&["e", "s", "--seed", "42", "--steps", "7"]).unwrap().unwrap();
        assert_eq!((a.seed, a.steps, a.len), (Some(42), 7, 256));
        assert!(args(&["e", "s", "--len", "1400"]).is_err());
        assert!(args(&["e", "s", "--len", "12"]).is_err());
        assert!(args(&["e"]).is_err());
    }

    #[test]
    fn the_same_seed_walks_the_same_way() {
        let (mut a, mut b) = (Rng(9), Rng(9));
        assert!((0..100).all(|_| a.next() == b.next()));
        assert_ne!(pattern(1, 0, 0), pattern(1, 1, 0));
        assert_ne!(pattern(1, 0, 0), pattern(2, 0, 0));
    }
}
