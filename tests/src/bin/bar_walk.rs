//! bar-walk: a seeded random walk of ivshmem's BAR2 (1af4:1110) with edu DMAs (1234:11e8)
//! between the steps, run inside a lab L2 that p2pvmm started with both devices in one P2P group.
//! Each step either toggles memory decoding or moves the BAR: to a random slot of its bridge's
//! prefetchable window (the first and last slot included), to the slot right past either end of
//! the window, to a slot at or right below a 4 GiB boundary, inside the host bridge's window but
//! outside every bridge window, or outside every window. A move writes the two halves in a
//! random order, and a third of the moves leave decoding on (the BAR then decodes at a mixed
//! address between the two writes). Then edu writes a pattern of its own to the BAR's current
//! address, the previous one, and this step's mixed address or (every other step) an older one. Every DMA goes to
//! its own offset in the BAR, so a DMA that lands where it should not stays visible: every
//! `--check-every` steps and at the end the CPU reads back every DMA's offset through the BAR
//! (sysfs `resource2`, at the address the kernel assigned: the BAR is moved there for the read
//! and back) and each must hold its pattern exactly when the BAR decoded at the target address,
//! inside its window, with decoding on, and its fill otherwise.
//! Prints `BAR-WALK: seed=S` first, a line per step, `BAR-WALK: FAIL step=..` per wrong DMA,
//! `BAR-WALK-CASES: ...` (how often each case came up) and finally
//! `BAR-WALK: ok steps=N seed=S dmas=D landed=L` or `BAR-WALK: FAIL ...`; exit 0 only on ok.
//! See `usage()`.

// A crate root resolves `mod` next to itself, so point into bar_walk/ explicitly.
#[path = "bar_walk/place.rs"]
mod place;

use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use p2pvmm_tests::guest::edu::{self, Engine, Irq, BUF_ADDR};
use p2pvmm_tests::guest::page::{DmaPage, Pagemap};
use p2pvmm_tests::guest::vfio::{self, Mapping};
use p2pvmm_tests::guest::{self, sysfs, Fail, Result};
use place::{Bar, Halves, Range};

fn usage() -> &'static str {
    "usage: bar-walk EDU IVSHMEM [options]
  EDU, IVSHMEM         the BDFs of edu and of ivshmem (BAR2 is walked)
  --steps N            steps of the walk (default 200)
  --seed S             the PRNG seed (default: from the clock); printed as 'BAR-WALK: seed=S'
  --len N              bytes per DMA, a multiple of 8 up to 4088 (default 128)
  --check-every N      read every DMA's place back after each N steps and the last (default 25)
Result: 'BAR-WALK: ok steps=N seed=S dmas=D landed=L' (exit 0) or 'BAR-WALK: FAIL ...' (exit 1)."
}

#[derive(Debug)]
struct Args {
    edu: String,
    shm: String,
    steps: u32,
    seed: Option<u64>,
    len: usize,
    check_every: u32,
}

fn parse_args(argv: &[String]) -> std::result::Result<Option<Args>, String> {
    let mut pos = Vec::new();
    let (mut steps, mut seed, mut len, mut check_every) = (200, None, 128, 25);
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let mut num = |name: &str| -> std::result::Result<u64, String> {
            let v = it.next().ok_or(format!("{name} needs a value"))?;
            v.parse()
                .map_err(|_| format!("{name}: '{v}' is not a number"))
        };
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--steps" => steps = u32::try_from(num("--steps")?).map_err(|_| "--steps too big")?,
            "--seed" => seed = Some(num("--seed")?),
            "--len" => len = num("--len")? as usize,
            "--check-every" => {
                check_every = u32::try_from(num("--check-every")?)
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or("--check-every must be 1 or more")?
            }
            s if s.starts_with('-') => return Err(format!("unknown option '{s}'")),
            s => pos.push(s.to_owned()),
        }
    }
    let [edu, shm] = <[String; 2]>::try_from(pos).map_err(|_| "expects EDU and IVSHMEM")?;
    // edu's buffer holds 4 KiB (at most 4095 bytes a transfer).
    if len == 0 || !len.is_multiple_of(8) || len > edu::MAX_XFER {
        return Err(format!(
            "--len must be a multiple of 8 up to {}",
            edu::MAX_XFER / 8 * 8
        ));
    }
    Ok(Some(Args {
        edu,
        shm,
        steps,
        seed,
        len,
        check_every,
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
    /// A slot of the bridge window: its first, its last, or any.
    Inside,
    /// Outside every window (between RAM and the 64-bit window, or above it).
    OutsideAll,
    /// Inside the host bridge's window, outside every bridge window below it.
    OutsideBridge,
    /// The slot right below or right above the bridge window.
    Edge,
    /// A slot starting at a 4 GiB boundary, or the last one below one (its low dword OR-ed
    /// with the size mask reads all ones, like a sizing answer), outside the window.
    Boundary,
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

/// Size-aligned slots: (first, count).
type Slots = (u64, u64);

/// The walk's view of the BAR: where it is, whether it decodes, where it was.
struct Walk<'a> {
    bar: &'a Bar,
    window: Range,
    outside_all: Slots,
    outside_bridge: Slots,
    /// `/proc/iomem` at the start.
    iomem: &'a [(usize, Range, String)],
    base: u64,
    decode: bool,
    /// The address before the last move that changed it.
    prev: Option<u64>,
    /// Addresses the BAR decoded at or had before, no repeats (mixed ones of live moves too).
    former: Vec<u64>,
    /// This step's mixed address (a live move between its two register writes).
    mixed: Option<u64>,
}

fn in_slots((first, n): Slots, addr: u64, size: u64) -> bool {
    addr >= first && addr.is_multiple_of(size) && (addr - first) / size < n
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
            if self.in_window() {
                "in-window"
            } else {
                "outside"
            },
            if self.decode { "on" } else { "off" }
        )
    }

    fn pick(&self, rng: &mut Rng) -> Op {
        match rng.below(16) {
            0..=5 => Op::Inside,
            6 | 7 => Op::OutsideBridge,
            8 => Op::OutsideAll,
            9 => Op::Edge,
            10 => Op::Boundary,
            _ => Op::Decode,
        }
    }

    /// Where a move of `op` goes; `None` when no such slot exists here.
    fn target(&self, op: Op, rng: &mut Rng) -> Option<u64> {
        let size = self.bar.size;
        let slot = |(first, n): Slots, rng: &mut Rng| first + rng.below(n) * size;
        let first = self.window.start.div_ceil(size) * size;
        let n = (self.window.end + 1 - first) / size;
        let free = |a: u64| {
            in_slots(self.outside_all, a, size)
                || in_slots(self.outside_bridge, a, size)
                || place::only_in_ancestors(self.iomem, self.window, a, size)
        };
        match op {
            Op::Decode => None,
            Op::Inside => Some(match rng.below(4) {
                0 => first,
                1 => first + (n - 1) * size,
                _ => slot((first, n), rng),
            }),
            Op::OutsideAll => Some(slot(self.outside_all, rng)),
            Op::OutsideBridge => Some(slot(self.outside_bridge, rng)),
            Op::Edge => {
                let (below, above) = (first.checked_sub(size), first + n * size);
                let edges: Vec<u64> = below
                    .into_iter()
                    .chain([above])
                    .filter(|&a| free(a))
                    .collect();
                edges.get(rng.below(edges.len() as u64) as usize).copied()
            }
            Op::Boundary => {
                let (r, lo) = if rng.below(2) == 0 {
                    (self.outside_all, self.outside_all.0)
                } else {
                    (self.outside_bridge, self.outside_bridge.0)
                };
                let span = r.1 * size;
                let g = (lo >> 32) + 1 + rng.below((span >> 32).max(1));
                let a = (g << 32) - if rng.below(2) == 0 { 0 } else { size };
                free(a).then_some(a)
            }
        }
    }

    /// Applies `op` (a move inside instead when it has no slot here); returns what was done
    /// and, for a move, the order of its halves and whether decoding stayed on.
    fn apply(&mut self, op: Op, rng: &mut Rng) -> Result<(Op, Option<(Halves, bool)>)> {
        self.mixed = None;
        let (op, new) = match self.target(op, rng) {
            Some(a) => (op, a),
            None if op == Op::Decode => {
                self.decode = !self.decode;
                return self.bar.set_decode(self.decode).map(|()| (op, None));
            }
            // No such slot: a move inside instead.
            None => (
                Op::Inside,
                self.target(Op::Inside, rng).unwrap_or(self.base),
            ),
        };
        let order = if rng.below(2) == 0 {
            Halves::LowFirst
        } else {
            Halves::HighFirst
        };
        let live = rng.below(3) == 0;
        let live = live && self.decode;
        self.mixed = self.bar.move_to(new, self.decode, order, live)?;
        let remember = |a: u64, former: &mut Vec<u64>| {
            former.retain(|&f| f != a);
            former.push(a);
        };
        if let Some(m) = self.mixed {
            remember(m, &mut self.former);
        }
        if new != self.base {
            remember(self.base, &mut self.former);
            self.prev = Some(self.base);
            self.base = new;
        }
        self.former.retain(|&f| f != self.base);
        Ok((op, Some((order, live))))
    }

    /// Where the step's DMAs go: the current address, the previous one, and this step's
    /// mixed address or else, every other step, one older address.
    fn targets(&self, rng: &mut Rng) -> Vec<u64> {
        let mut t = vec![self.base];
        t.extend(self.prev.filter(|&p| p != self.base));
        let older: Vec<u64> = self
            .former
            .iter()
            .copied()
            .filter(|a| !t.contains(a))
            .collect();
        match self.mixed {
            Some(m) if !t.contains(&m) => t.push(m),
            // Every transfer takes 100 ms of edu's timer: an older address every other step.
            _ if !older.is_empty() && rng.below(2) == 0 => {
                t.push(older[rng.below(older.len() as u64) as usize])
            }
            _ => {}
        }
        t
    }

    /// Runs `read` with the BAR at the kernel's address with decoding on (where `resource2`
    /// maps it), then puts it back.
    fn at_home<T>(&self, read: impl FnOnce() -> T) -> Result<T> {
        let home = self.bar.home;
        let quiet = |addr, decode| self.bar.move_to(addr, decode, Halves::LowFirst, false);
        if self.base != home {
            quiet(home, true)?;
        } else if !self.decode {
            self.bar.set_decode(true)?;
        }
        let out = read();
        if self.base != home {
            quiet(self.base, self.decode)?;
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

/// How often each hard case came up.
#[derive(Default)]
struct Cases {
    ops: [u32; 6],
    /// Moves writing the high half first.
    high_first: u32,
    /// Moves with decoding on throughout, and how many left a mixed address to DMA at.
    live: u32,
    mixed: u32,
}

impl Cases {
    const NAMES: [&str; 6] = [
        "inside",
        "outside-all",
        "outside-bridge",
        "edge",
        "boundary",
        "decode",
    ];

    fn count(&mut self, op: Op) {
        self.ops[op as usize] += 1;
    }

    fn line(&self) -> String {
        let ops: Vec<String> = Self::NAMES
            .iter()
            .zip(self.ops)
            .map(|(n, c)| format!("{n}={c}"))
            .collect();
        format!(
            "{} high-first={} live={} mixed={}",
            ops.join(" "),
            self.high_first,
            self.live,
            self.mixed
        )
    }
}

fn walk(a: &Args, seed: u64) -> Result<Outcome> {
    let bar = Bar::open(&a.shm)?;
    let window = place::bridge_window(&a.shm)?;
    let map_iomem = place::iomem()?;
    let outside_all = place::outside_every_window(&map_iomem, bar.size)
        .ok_or_else(|| Fail::msg("outside", "no address outside every window"))?;
    let outside_bridge = place::outside_bridge_windows(&map_iomem, window, bar.size)
        .ok_or_else(|| Fail::msg("outside", "no room outside the bridge windows"))?;
    let slots = bar.size / 4096;
    let max_dmas = a.steps as u64 * TARGETS as u64;
    if max_dmas > slots {
        return Err(Fail::msg(
            "steps",
            format!("{max_dmas} DMAs need more than {slots} pages"),
        ));
    }
    println!(
        "bar-walk: ivshmem {} BAR2 0x{:x} size 0x{:x}; bridge window 0x{:x}-0x{:x}; outside every \
         window: {} slots from 0x{:x}; outside the bridges: {} slots from 0x{:x}",
        a.shm,
        bar.home,
        bar.size,
        window.start,
        window.end,
        outside_all.1,
        outside_all.0,
        outside_bridge.1,
        outside_bridge.0
    );
    if bar.address()? != bar.home || !window.holds(bar.home, bar.size) {
        return Err(Fail::msg(
            "start",
            format!(
                "BAR2 reads 0x{:x}, not the kernel's 0x{:x} inside the window",
                bar.address()?,
                bar.home
            ),
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
        iomem: &map_iomem,
        base: bar.home,
        decode: true,
        prev: None,
        former: Vec::new(),
        mixed: None,
    };
    let mut rng = Rng(seed);
    let per_load = edu::MAX_XFER.min(src.len()) / a.len;
    let mut loaded = usize::MAX;
    let mut dmas: Vec<Dma> = Vec::new();
    let mut cases = Cases::default();
    let mut wrong = 0;
    let t0 = Instant::now();
    for step in 1..=a.steps {
        let picked = st.pick(&mut rng);
        let (op, how) = st.apply(picked, &mut rng)?;
        cases.count(op);
        if let Some((order, live)) = how {
            cases.high_first += u32::from(order == Halves::HighFirst);
            cases.live += u32::from(live);
            cases.mixed += u32::from(st.mixed.is_some());
        }
        let targets = st.targets(&mut rng);
        let first = dmas.len();
        for (j, &t) in targets.iter().enumerate() {
            let k = first + j;
            // edu's buffer holds the patterns of `per_load` DMAs: a RAM -> edu transfer (100 ms
            // of edu's DMA timer, like every transfer) each time a block is used up.
            if k / per_load != loaded {
                loaded = k / per_load;
                src.fill(|i| {
                    let (j, w) = (i / a.len, (i % a.len) / 8);
                    (pattern(seed, loaded * per_load + j, w) >> (8 * (i % 8))) as u8
                });
                eng.transfer("RAM->edu", src.phys(), BUF_ADDR, per_load * a.len, false)?;
            }
            let (off, buf) = (offset(k), BUF_ADDR + ((k % per_load) * a.len) as u64);
            let addr = t + off as u64;
            eng.transfer("edu->BAR", buf, addr, a.len, true)
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
        // Each DMA has an offset of its own that nothing else writes, so a read-back later
        // sees exactly what one right away would; reading needs the BAR at home, two moves.
        let checked = step % a.check_every == 0 || step == a.steps;
        let new_wrong = if checked {
            st.at_home(|| check(&map, &mut dmas, seed, a.len, step))?
        } else {
            0
        };
        wrong += new_wrong;
        println!(
            "bar-walk: step {step} {op:?}{} {} dmas={}{} t={:.1}s",
            match (how, st.mixed) {
                (Some((o, live)), m) => format!(
                    " {o:?}{}{}",
                    if live { " live" } else { "" },
                    m.map_or(String::new(), |m| format!(" mixed=0x{m:x}"))
                ),
                (None, _) => String::new(),
            },
            st.state(),
            targets.len(),
            match (checked, new_wrong) {
                (false, _) => "",
                (true, 0) => " checked ok",
                (true, _) => " checked WRONG",
            },
            t0.elapsed().as_secs_f64()
        );
    }
    println!("BAR-WALK-CASES: {}", cases.line());
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
        let a = args(&["e", "s", "--seed", "42", "--steps", "7"])
            .unwrap()
            .unwrap();
        assert_eq!((a.seed, a.steps, a.len), (Some(42), 7, 128));
        assert!(args(&["e", "s", "--len", "4096"]).is_err());
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
