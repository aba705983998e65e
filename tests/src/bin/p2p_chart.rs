//! p2p-chart: the report of `resources/bench-p2p.sh`. Runs on the host: reads the L1 console of
//! the benchmark (p2pvmm's `-vv` lines and the benchmark's `BENCH-` markers), prints each run,
//! the median time per BAR size, mechanism (dmabuf = iommufd, legacy = type1) and operation, the
//! ratio legacy/dmabuf and a check of the dmabuf path against the target, and draws the medians
//! as a log-log SVG chart (x = BAR size, y = time, one line per operation and mechanism).
//!
//! Usage: p2p-chart CONSOLE [--svg OUT.svg] [--target-ms 1]
//!
//! One p2pvmm boot has one mechanism and passes every BAR size at once (one ivshmem per size,
//! told apart by size). What it measures per BAR and boot:
//! - establish: the P2P table's `<key>: mapped at IOVA 0x.. (+0x<size>) in <duration>` for the
//!   BAR of that size, the first one once L2 turns its memory decoding on (`BENCH-L2 establish
//!   <bdf>`). Also shown: the VMM's whole time for that config write.
//! - move: for each `BENCH-L2 move <bdf>` ... `BENCH-L2 moved <bdf>` bracket (decode off, BAR
//!   low and high dwords, decode on), the sum of `<bdf>: config write at 0x.. applied <n> BAR
//!   change(s) in <N> us` of that function: the VMM's whole time from the trapped writes to
//!   re-entry (emulation, traps, KVM memory slots, peer IOMMU unmap and map). The peer unmap and
//!   map inside the moves are shown separately too.
//! - teardown: the P2P table's `<key>: unmapped from IOVA 0x.. in <duration>` for that BAR once
//!   L2 is done (`BENCH-L2 done`): p2pvmm releasing the devices at shutdown (the last one when
//!   there are several).
//!
//! Markers (the benchmark script prints them): `BENCH-P2P-RUN <dmabuf|legacy> <run>` starts a
//! boot in L1, `BENCH-P2P-RC <status>` ends it; from L2: `BENCH-L2 dev <bdf> <bar-address>
//! <size-bytes>` (every BAR, before the others), `BENCH-L2 establish <bdf>`, `BENCH-L2
//! established <bdf>`, `BENCH-L2 move <bdf> <i> <from> <to>`, `BENCH-L2 moved <bdf> <i>`,
//! `BENCH-L2 done`, `BENCH-L2 error <text>`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::process::ExitCode;

use plotters::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mech {
    Dmabuf,
    Legacy,
}

impl Mech {
    const ALL: [Mech; 2] = [Mech::Dmabuf, Mech::Legacy];

    fn parse(s: &str) -> Option<Mech> {
        match s {
            "dmabuf" | "iommufd" => Some(Mech::Dmabuf),
            "legacy" | "type1" => Some(Mech::Legacy),
            _ => None,
        }
    }
}

impl fmt::Display for Mech {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mech::Dmabuf => "dmabuf",
            Mech::Legacy => "legacy",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Establish,
    Move,
    Teardown,
}

impl Op {
    const ALL: [Op; 3] = [Op::Establish, Op::Move, Op::Teardown];
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Establish => "establish",
            Op::Move => "move",
            Op::Teardown => "teardown",
        })
    }
}

/// Where a run is, as the markers tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Boot,
    Establish,
    Idle,
    Move(u32),
    Done,
}

/// One p2pvmm boot: one mechanism, every BAR size at once.
#[derive(Debug)]
struct Boot {
    mech: Mech,
    index: u32,
    /// The BARs L2 reported (`BENCH-L2 dev`), one per size.
    bars: Vec<Run>,
    /// P2P table maps seen before L2's script reported the BARs: (key, size, ms).
    early_maps: Vec<(String, u64, f64)>,
    rc: Option<i32>,
    errors: Vec<String>,
}

impl Boot {
    fn new(mech: Mech, index: u32) -> Self {
        Boot {
            mech,
            index,
            bars: Vec::new(),
            early_maps: Vec::new(),
            rc: None,
            errors: Vec::new(),
        }
    }

    /// A `BENCH-L2 ...` marker (the words after `BENCH-L2`).
    fn on_l2_marker(&mut self, words: &[&str]) {
        match words {
            ["dev", bdf, _, size, ..] => {
                let Ok(size) = size.parse() else { return };
                let mut run = Run::new(self.mech, size, self.index, bdf);
                for (key, s, ms) in &self.early_maps {
                    run.on_map(key, *s, *ms);
                }
                self.bars.push(run);
            }
            ["done", ..] => self.bars.iter_mut().for_each(|r| r.phase = Phase::Done),
            ["error", rest @ ..] => self.errors.push(format!("L2: {}", rest.join(" "))),
            [what, bdf, rest @ ..] => {
                if let Some(run) = self.bars.iter_mut().find(|r| r.bdf == *bdf) {
                    run.on_l2_marker(what, rest);
                }
            }
            _ => {}
        }
    }

    fn on_map(&mut self, key: &str, size: u64, ms: f64) {
        if self.bars.is_empty() {
            self.early_maps.push((key.to_owned(), size, ms));
        }
        self.bars.iter_mut().for_each(|r| r.on_map(key, size, ms));
    }
}

/// A guest BAR move being read: the sum of its config writes (ms), how many, whether the P2P
/// table mapped the BAR again during it, and why it does not count.
#[derive(Debug, Default)]
struct MoveInProgress {
    ms: f64,
    writes: u32,
    mapped: bool,
    failed: Option<String>,
}

/// One BAR in one boot; all times in milliseconds.
#[derive(Debug)]
struct Run {
    mech: Mech,
    size: u64,
    index: u32,
    phase: Phase,
    /// The function's guest address (`BENCH-L2 dev`).
    bdf: String,
    /// P2P table keys of the measured BAR (the areas mapped with this run's BAR size).
    keys: Vec<String>,
    maps_during_boot: Vec<f64>,
    establish: Option<f64>,
    establish_write: f64,
    establish_writes: u32,
    moves: Vec<f64>,
    current_move: Option<MoveInProgress>,
    move_unmaps: Vec<f64>,
    move_maps: Vec<f64>,
    teardowns: Vec<f64>,
    errors: Vec<String>,
}

impl Run {
    fn new(mech: Mech, size: u64, index: u32, bdf: &str) -> Self {
        Run {
            mech,
            size,
            index,
            phase: Phase::Boot,
            bdf: bdf.to_owned(),
            keys: Vec::new(),
            maps_during_boot: Vec::new(),
            establish: None,
            establish_write: 0.0,
            establish_writes: 0,
            moves: Vec::new(),
            current_move: None,
            move_unmaps: Vec::new(),
            move_maps: Vec::new(),
            teardowns: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// The measured establish: the first map once L2 turned decoding on; if L2's own boot had
    /// mapped the BAR already (nothing to establish then), the first map of the boot.
    fn establish_ms(&self) -> Option<f64> {
        self.establish
            .or_else(|| self.maps_during_boot.first().copied())
    }

    /// The teardown at shutdown: the last unmap once L2 was done.
    fn teardown_ms(&self) -> Option<f64> {
        self.teardowns.last().copied()
    }

    fn samples(&self, op: Op) -> Vec<f64> {
        match op {
            Op::Establish => self.establish_ms().into_iter().collect(),
            Op::Move => self.moves.clone(),
            Op::Teardown => self.teardown_ms().into_iter().collect(),
        }
    }

    fn on_map(&mut self, key: &str, size: u64, ms: f64) {
        if size != self.size {
            return;
        }
        if !self.keys.iter().any(|k| k == key) {
            self.keys.push(key.to_owned());
        }
        match self.phase {
            Phase::Boot => self.maps_during_boot.push(ms),
            Phase::Establish | Phase::Idle if self.establish.is_none() => self.establish = Some(ms),
            Phase::Move(_) => {
                self.move_maps.push(ms);
                if let Some(m) = &mut self.current_move {
                    m.mapped = true;
                }
            }
            _ => {}
        }
    }

    /// A warning or error line naming this BAR's function or P2P table key: a move it happens
    /// in does not count (e.g. the VMM rejected the placement).
    fn on_warning(&mut self, line: &str) {
        let mentions = line.contains(&format!("{}: ", self.bdf))
            || self.keys.iter().any(|k| line.contains(&format!("{k}: ")));
        if !mentions {
            return;
        }
        let text = message(line).trim().to_owned();
        match &mut self.current_move {
            Some(m) => m.failed = Some(text),
            None => self.errors.push(text),
        }
    }

    fn on_unmap(&mut self, key: &str, ms: f64) {
        if !self.keys.iter().any(|k| k == key) {
            return;
        }
        match self.phase {
            Phase::Move(_) => self.move_unmaps.push(ms),
            Phase::Done => self.teardowns.push(ms),
            _ => {}
        }
    }

    fn on_config_write(&mut self, bdf: &str, us: f64) {
        if self.bdf != bdf {
            return;
        }
        match self.phase {
            Phase::Establish => {
                self.establish_write += us / 1000.0;
                self.establish_writes += 1;
            }
            Phase::Move(_) => {
                if let Some(m) = &mut self.current_move {
                    m.ms += us / 1000.0;
                    m.writes += 1;
                }
            }
            _ => {}
        }
    }

    /// A `BENCH-L2 <what> <this bdf> <rest>` marker.
    fn on_l2_marker(&mut self, what: &str, rest: &[&str]) {
        match (what, rest) {
            ("establish", _) => self.phase = Phase::Establish,
            ("established", _) => self.phase = Phase::Idle,
            ("move", [i, ..]) => {
                self.phase = Phase::Move(i.parse().unwrap_or(0));
                self.current_move = Some(MoveInProgress::default());
            }
            ("moved", _) => {
                let m = self.current_move.take().unwrap_or_default();
                let i = rest.first().unwrap_or(&"?");
                match m {
                    MoveInProgress {
                        failed: Some(why), ..
                    } => self.errors.push(format!("move {i} not counted: {why}")),
                    MoveInProgress { writes: 0, .. } => self.errors.push(format!(
                        "move {i} not counted: no config write changed a BAR"
                    )),
                    MoveInProgress { mapped: false, .. } => self.errors.push(format!(
                        "move {i} not counted: the P2P table did not map the BAR at its new place"
                    )),
                    MoveInProgress { ms, .. } => self.moves.push(ms),
                }
                self.phase = Phase::Idle;
            }
            _ => {}
        }
    }
}

/// A Rust `Debug` duration (`183.2µs`, `1.35s`, `456.7ms`, `89ns`, `0ns`) in milliseconds.
fn duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ns") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("µs").or_else(|| s.strip_suffix("us")) {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e3)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// The message of a log line: what follows env_logger's `[time LEVEL target] ` prefix.
fn message(line: &str) -> &str {
    match line.find("] ") {
        Some(at) if line.starts_with('[') => &line[at + 2..],
        _ => line,
    }
}

/// `<key>: mapped at IOVA 0x.. (+0x<size>) in <duration>` -> (key, size, ms).
fn parse_map(line: &str) -> Option<(&str, u64, f64)> {
    let msg = message(line);
    let (key, rest) = msg.split_once(": mapped at IOVA ")?;
    let (_, rest) = rest.split_once("(+")?;
    let (size, rest) = rest.split_once(')')?;
    let dur = rest.trim_start().strip_prefix("in ")?;
    Some((key, hex(size)?, duration_ms(dur)?))
}

/// `<key>: unmapped from IOVA 0x.. in <duration>` -> (key, ms).
fn parse_unmap(line: &str) -> Option<(&str, f64)> {
    let msg = message(line);
    let (key, rest) = msg.split_once(": unmapped from IOVA ")?;
    let (_, dur) = rest.split_once(" in ")?;
    Some((key, duration_ms(dur)?))
}

/// `<bdf>: config write at 0x<offset> applied <n> BAR change(s) in <N> us` -> (bdf, offset,
/// changes, microseconds).
fn parse_config_write(line: &str) -> Option<(&str, u64, u32, f64)> {
    let msg = message(line);
    let (bdf, rest) = msg.split_once(": config write at ")?;
    let bdf = bdf.rsplit(' ').next()?;
    let (offset, rest) = rest.split_once(" applied ")?;
    let (n, rest) = rest.split_once(" BAR change(s) in ")?;
    let us = rest.trim().strip_suffix("us")?.trim();
    Some((bdf, hex(offset)?, n.trim().parse().ok()?, us.parse().ok()?))
}

/// Strips ANSI colour sequences and carriage returns.
fn clean(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else if c != '\r' {
            out.push(c);
        }
    }
    out
}

/// Reads every boot out of a console.
fn parse_console(text: &str) -> Vec<Boot> {
    let mut boots: Vec<Boot> = Vec::new();
    for raw in text.lines() {
        let line = clean(raw);
        if let Some(at) = line.find("BENCH-P2P-RUN ") {
            let words: Vec<&str> = line[at..].split_whitespace().collect();
            if let [_, mech, index, ..] = words[..] {
                if let (Some(mech), Ok(index)) = (Mech::parse(mech), index.parse()) {
                    boots.push(Boot::new(mech, index));
                }
            }
            continue;
        }
        let Some(boot) = boots.last_mut().filter(|b| b.rc.is_none()) else {
            continue;
        };
        if let Some(at) = line.find("BENCH-P2P-RC ") {
            boot.rc = line[at + 13..]
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok());
        } else if let Some(at) = line.find("BENCH-L2 ") {
            let words: Vec<&str> = line[at + 9..].split_whitespace().collect();
            boot.on_l2_marker(&words);
        } else if let Some((key, size, ms)) = parse_map(&line) {
            boot.on_map(key, size, ms);
        } else if let Some((key, ms)) = parse_unmap(&line) {
            boot.bars.iter_mut().for_each(|r| r.on_unmap(key, ms));
        } else if let Some((bdf, _, _, us)) = parse_config_write(&line) {
            boot.bars
                .iter_mut()
                .for_each(|r| r.on_config_write(bdf, us));
        } else if line.contains(" WARN ") || line.contains(" ERROR ") {
            let before = boot.bars.iter().map(|r| r.errors.len()).sum::<usize>();
            boot.bars.iter_mut().for_each(|r| r.on_warning(&line));
            let after = boot.bars.iter().map(|r| r.errors.len()).sum::<usize>();
            if line.contains(" ERROR ") && before == after {
                boot.errors.push(line.trim().to_owned());
            }
        } else if line.contains("error:") || line.contains("panicked") {
            boot.errors.push(line.trim().to_owned());
        }
    }
    boots
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn size_label(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{} {name}", bytes / unit);
        }
    }
    format!("{bytes} B")
}

fn ms_label(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.3} s", ms / 1000.0)
    } else if ms >= 1.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{:.1} µs", ms * 1000.0)
    }
}

/// An axis label: a time with at most 3 significant digits and no trailing zeros (`10 µs`,
/// `1 ms`, `2.5 s`).
fn axis_ms_label(ms: f64) -> String {
    let (v, unit) = if ms >= 1000.0 {
        (ms / 1000.0, "s")
    } else if ms >= 1.0 {
        (ms, "ms")
    } else {
        (ms * 1000.0, "µs")
    };
    let decimals = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    let text = format!("{v:.decimals$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        &text
    };
    format!("{text} {unit}")
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), ms_label)
}

/// All samples per (size, mechanism, operation), and the extras shown beside them.
#[derive(Default)]
struct Table {
    samples: BTreeMap<(u64, Mech, Op), Vec<f64>>,
    establish_writes: BTreeMap<(u64, Mech), Vec<f64>>,
    move_unmaps: BTreeMap<(u64, Mech), Vec<f64>>,
    move_maps: BTreeMap<(u64, Mech), Vec<f64>>,
}

impl Table {
    fn from_boots(boots: &[Boot]) -> Self {
        let mut t = Table::default();
        for r in boots.iter().flat_map(|b| &b.bars) {
            for op in Op::ALL {
                t.samples
                    .entry((r.size, r.mech, op))
                    .or_default()
                    .extend(r.samples(op));
            }
            if r.establish_writes > 0 {
                t.establish_writes
                    .entry((r.size, r.mech))
                    .or_default()
                    .push(r.establish_write);
            }
            t.move_unmaps
                .entry((r.size, r.mech))
                .or_default()
                .extend(&r.move_unmaps);
            t.move_maps
                .entry((r.size, r.mech))
                .or_default()
                .extend(&r.move_maps);
        }
        t
    }

    fn sizes(&self) -> Vec<u64> {
        let mut s: Vec<u64> = self.samples.keys().map(|k| k.0).collect();
        s.dedup();
        s
    }

    fn median(&self, size: u64, mech: Mech, op: Op) -> Option<f64> {
        self.samples.get(&(size, mech, op)).and_then(|v| median(v))
    }

    fn count(&self, size: u64, mech: Mech, op: Op) -> usize {
        self.samples.get(&(size, mech, op)).map_or(0, Vec::len)
    }

    fn extra(map: &BTreeMap<(u64, Mech), Vec<f64>>, size: u64, mech: Mech) -> Option<f64> {
        map.get(&(size, mech)).and_then(|v| median(v))
    }
}

fn print_runs(boots: &[Boot]) {
    for b in boots {
        println!(
            "boot {} #{}: {} BAR(s){}",
            b.mech,
            b.index,
            b.bars.len(),
            match b.rc {
                Some(0) => String::new(),
                Some(rc) => format!(", p2pvmm exit status {rc}"),
                None => ", no end marker (L1 stopped?)".to_owned(),
            }
        );
        for e in b.errors.iter().take(8) {
            println!("    {e}");
        }
        print_bars(&b.bars);
    }
}

fn print_bars(runs: &[Run]) {
    for r in runs {
        let moves = if r.moves.is_empty() {
            "-".to_owned()
        } else {
            format!(
                "{} (median of {}, min {}, max {})",
                opt_ms(median(&r.moves)),
                r.moves.len(),
                ms_label(r.moves.iter().copied().fold(f64::INFINITY, f64::min)),
                ms_label(r.moves.iter().copied().fold(0.0, f64::max)),
            )
        };
        println!(
            "  {:<6} {:>7} #{} ({}): establish {}, move {}, teardown {}{}",
            r.mech,
            size_label(r.size),
            r.index,
            r.bdf,
            opt_ms(r.establish_ms()),
            moves,
            opt_ms(r.teardown_ms()),
            if r.establish.is_none() && !r.maps_during_boot.is_empty() {
                " (BAR already mapped during L2 boot: establish is that map)"
            } else {
                ""
            },
        );
        for e in r.errors.iter().take(5) {
            println!("    {e}");
        }
    }
}

/// Prints the medians, ratios and the target check; returns whether the dmabuf path met the
/// target for every operation at every size (false when something is missing).
fn print_table(t: &Table, target_ms: f64) -> bool {
    println!();
    println!(
        "median times (establish and teardown: P2P table map/unmap of the BAR; move: the VMM's"
    );
    println!("whole time for the config writes of one guest BAR move, vCPU exit to re-entry)");
    println!(
        "{:>7}  {:<6}  {:>11}  {:>11}  {:>11}  | {:>15}  {:>12}  {:>12}",
        "BAR",
        "mech",
        "establish",
        "move",
        "teardown",
        "establish write",
        "move: unmap",
        "move: map"
    );
    for size in t.sizes() {
        for mech in Mech::ALL {
            let cell = |op| {
                let n = t.count(size, mech, op);
                match t.median(size, mech, op) {
                    Some(v) if op == Op::Move => format!("{} ({n})", ms_label(v)),
                    v => opt_ms(v),
                }
            };
            println!(
                "{:>7}  {:<6}  {:>11}  {:>11}  {:>11}  | {:>15}  {:>12}  {:>12}",
                size_label(size),
                mech,
                cell(Op::Establish),
                cell(Op::Move),
                cell(Op::Teardown),
                opt_ms(Table::extra(&t.establish_writes, size, mech)),
                opt_ms(Table::extra(&t.move_unmaps, size, mech)),
                opt_ms(Table::extra(&t.move_maps, size, mech)),
            );
        }
    }
    println!();
    println!("ratio legacy/dmabuf of the medians");
    println!(
        "{:>7}  {:>10}  {:>10}  {:>10}",
        "BAR", "establish", "move", "teardown"
    );
    for size in t.sizes() {
        let ratio = |op| match (
            t.median(size, Mech::Legacy, op),
            t.median(size, Mech::Dmabuf, op),
        ) {
            (Some(l), Some(d)) if d > 0.0 => format!("{:.1}x", l / d),
            _ => "-".to_owned(),
        };
        println!(
            "{:>7}  {:>10}  {:>10}  {:>10}",
            size_label(size),
            ratio(Op::Establish),
            ratio(Op::Move),
            ratio(Op::Teardown)
        );
    }
    println!();
    let mut all_ok = true;
    for op in Op::ALL {
        let mut worst: Option<(f64, u64)> = None;
        let mut missing = Vec::new();
        for size in t.sizes() {
            match t.median(size, Mech::Dmabuf, op) {
                Some(v) if worst.is_none_or(|(w, _)| v > w) => worst = Some((v, size)),
                Some(_) => {}
                None => missing.push(size_label(size)),
            }
        }
        let ok = missing.is_empty() && worst.is_some_and(|(w, _)| w < target_ms);
        all_ok &= ok;
        println!(
            "CHECK dmabuf {op:<9} < {} at every size: {} (worst median {}{})",
            ms_label(target_ms),
            if ok { "PASS" } else { "FAIL" },
            worst.map_or("-".to_owned(), |(w, s)| format!(
                "{} at {}",
                ms_label(w),
                size_label(s)
            )),
            if missing.is_empty() {
                String::new()
            } else {
                format!("; no samples at {}", missing.join(", "))
            }
        );
    }
    all_ok
}

/// Colour per operation, marker and line style per mechanism.
fn op_color(op: Op) -> RGBColor {
    match op {
        Op::Establish => RGBColor(31, 119, 180),
        Op::Move => RGBColor(214, 39, 40),
        Op::Teardown => RGBColor(44, 160, 44),
    }
}

/// The log-log chart of the medians. The axes are linear in log2(size) and log10(ms), labelled
/// with sizes and times, so the ticks fall on the benchmark's power-of-two sizes and on decades.
fn draw_chart(t: &Table, target_ms: f64, path: &Path) -> Result<(), String> {
    let sizes = t.sizes();
    let points = |mech, op| -> Vec<(f64, f64)> {
        sizes
            .iter()
            .filter_map(|&s| {
                t.median(s, mech, op)
                    .filter(|v| *v > 0.0)
                    .map(|v| ((s as f64).log2(), v.log10()))
            })
            .collect()
    };
    let all: Vec<(f64, f64)> = Mech::ALL
        .iter()
        .flat_map(|&m| Op::ALL.iter().flat_map(move |&o| points(m, o)))
        .collect();
    if all.is_empty() {
        return Err("no medians to draw".into());
    }
    let (mut x0, mut x1) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut y0, mut y1) = (target_ms.log10() - 1.0, target_ms.log10());
    for &(x, y) in &all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let (x0, x1) = (x0.floor() - 0.5, x1.ceil() + 0.5);
    // Lines exactly on a decade (the kernel floor, a 10 s move) stay off the frame.
    let (y0, y1) = ((y0 - 0.05).floor(), (y1 + 0.05).ceil());
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (960, 640)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "p2pvmm peer BAR mapping: establish, move, teardown (medians, nested lab)",
                ("sans-serif", 20),
            )
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(80)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        let x_fmt = |x: &f64| size_label(2f64.powf(x.round()) as u64);
        let y_fmt = |y: &f64| axis_ms_label(10f64.powf(*y));
        chart
            .configure_mesh()
            .x_desc("BAR size (log scale)")
            .y_desc("time (log scale)")
            .x_labels(((x1 - x0) / 2.0).ceil() as usize + 1)
            .y_labels((y1 - y0) as usize + 1)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        let target = target_ms.log10();
        chart
            .draw_series(DashedLineSeries::new(
                [(x0, target), (x1, target)],
                8,
                6,
                BLACK.stroke_width(1),
            ))?
            .label(format!("target {}", axis_ms_label(target_ms)))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
        let floor = (target_ms / 10.0).log10();
        chart
            .draw_series(DashedLineSeries::new(
                [(x0, floor), (x1, floor)],
                3,
                5,
                RGBColor(128, 128, 128).stroke_width(1),
            ))?
            .label(format!("kernel floor ~{}", axis_ms_label(target_ms / 10.0)))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RGBColor(128, 128, 128)));
        for op in Op::ALL {
            for mech in Mech::ALL {
                let pts = points(mech, op);
                if pts.is_empty() {
                    continue;
                }
                let color = op_color(op);
                let label = format!("{op} ({mech})");
                match mech {
                    Mech::Dmabuf => {
                        chart
                            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                            .label(label)
                            .legend(move |(x, y)| {
                                PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                            });
                        chart
                            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
                    }
                    Mech::Legacy => {
                        chart
                            .draw_series(DashedLineSeries::new(
                                pts.clone(),
                                6,
                                4,
                                color.stroke_width(2),
                            ))?
                            .label(label)
                            .legend(move |(x, y)| {
                                PathElement::new([(x, y), (x + 6, y)], color.stroke_width(2))
                            });
                        chart.draw_series(
                            pts.iter()
                                .map(|&p| TriangleMarker::new(p, 5, color.filled())),
                        )?;
                    }
                }
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| format!("drawing {}: {e}", path.display()))
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut console = None;
    let mut svg = None;
    let mut target_ms = 1.0;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--svg" => svg = args.next(),
            "--target-ms" => match args.next().and_then(|v| v.parse().ok()) {
                Some(v) => target_ms = v,
                None => {
                    eprintln!("p2p-chart: --target-ms takes a number");
                    return ExitCode::from(2);
                }
            },
            _ if console.is_none() && !a.starts_with("--") => console = Some(a),
            _ => {
                eprintln!("usage: p2p-chart CONSOLE [--svg OUT.svg] [--target-ms 1]");
                return ExitCode::from(2);
            }
        }
    }
    let Some(console) = console else {
        eprintln!("usage: p2p-chart CONSOLE [--svg OUT.svg] [--target-ms 1]");
        return ExitCode::from(2);
    };
    let text = match std::fs::read(&console) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => {
            eprintln!("p2p-chart: reading {console}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let boots = parse_console(&text);
    if boots.is_empty() {
        eprintln!("p2p-chart: no BENCH-P2P-RUN in {console}");
        return ExitCode::FAILURE;
    }
    print_runs(&boots);
    let table = Table::from_boots(&boots);
    let met = print_table(&table, target_ms);
    if let Some(svg) = svg {
        if let Err(e) = draw_chart(&table, target_ms, Path::new(&svg)) {
            eprintln!("p2p-chart: {e}");
            return ExitCode::FAILURE;
        }
        println!("chart: {svg}");
    }
    println!(
        "target {}: {}",
        ms_label(target_ms),
        if met { "met" } else { "not met" }
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the L1 console of one dmabuf run and one legacy run looks like (p2pvmm -vv lines
    /// through env_logger, L2's markers through the serial console, CRs included).
    const SAMPLE: &str = "\
BENCH-P2P-RUN dmabuf 1\r
[2026-12-01T10:00:00Z DEBUG vfio_p2p::p2p] vfio cdev 0xa00:7 BAR0 area +0x0: mapped at IOVA 0xc0000000 (+0x100000) in 52.1µs\r
[2026-12-01T10:00:00Z DEBUG vfio_p2p::p2p] vfio cdev 0xa00:8 BAR2 area +0x0: mapped at IOVA 0x400000000 (+0x400000000) in 1ms\r
[2026-12-01T10:00:00Z DEBUG vfio_p2p::p2p] vfio cdev 0xa00:8 BAR2 area +0x0: unmapped from IOVA 0x400000000 in 1ms\r
BENCH-L2 dev 0000:02:00.0 0x400000000 17179869184\r
BENCH-L2 dev 0000:03:00.0 0x4000000000 4194304\r
BENCH-L2 establish 0000:02:00.0\r
[2026-12-01T10:00:01Z DEBUG vfio_p2p::p2p] vfio cdev 0xa00:8 BAR2 area +0x0: mapped at IOVA 0x400000000 (+0x400000000) in 183.2µs\r
[2026-12-01T10:00:01Z DEBUG devices::pci::segment] 0000:02:00.0: config write at 0x4 applied 1 BAR change(s) in 412 us\r
BENCH-L2 established 0000:02:00.0\r
BENCH-L2 move 0000:02:00.0 1 0x400000000 0x800000000\r
[2026-12-01T10:00:02Z DEBUG vfio_p2p::p2p] vfio cdev 0xa00:8 BAR2 area +0x0: unmapped from IOVA 0x400000000 in 48µs\r
[2026-12-01T10:00:02Z DEBUG devices::pci::segment] 0000:02:00.0: config write at 0x4 applied 1 BAR change(s) in 300 us\r
[2026-12-01T10:00:02Z DEBUG devices::pci::segment] 0000:01:00.0: config write at 0x4 applied 1 BAR change(s) in 999999 us\r
[2026-12-01T10:00:02Z DEBUG vfio_p2p::p2p] vfio cdev 0xa00:8 BAR2 area +0x0: mapped at IOVA 0x800000000 (+0x400000000) in 90µs\r
[2026-12-01T10:00:02Z DEBUG devices::pci::segment] 0000:02:00.0: config write at 0x4 applied 1 BAR change(s) in 500 us\r
BENCH-L2 moved 0000:02:00.0 1\r
BENCH-L2 move 0000:02:00.0 2 0x800000000 0x400000000\r
[2026-12-01T10:00:03Z DEBUG vfio_p2p::p2p] vfio cdev 0xa00:8 BAR2 area +0x0: mapped at IOVA 0x400000000 (+0x400000000) in 90µs\r
[2026-12-01T10:00:03Z DEBUG devices::pci::segment] 0000:02:00.0: config write at 0x4 applied 2 BAR change(s) in 1200 us\r
BENCH-L2 moved 0000:02:00.0 2\r
BENCH-L2 move 0000:02:00.0 3 0x400000000 0x800000000\r
[2026-12-01T10:00:03Z DEBUG devices::pci::segment] 0000:02:00.0: config write at 0x4 applied 1 BAR change(s) in 100 us\r
[2026-12-01T10:00:03Z WARN  devices::pci::segment] 0000:02:00.0: config write at 0x4: 0000:02:00.0 BAR 2 (Mem64): none -> 0x800000000..0xc00000000: rejected, BAR registers rolled back\r
BENCH-L2 moved 0000:02:00.0 3\r
BENCH-L2 move 0000:02:00.0 4 0x400000000 0x800000000\r
[2026-12-01T10:00:03Z DEBUG devices::pci::segment] 0000:02:00.0: config write at 0x4 applied 1 BAR change(s) in 100 us\r
BENCH-L2 moved 0000:02:00.0 4\r
BENCH-L2 establish 0000:03:00.0\r
[t DEBUG vfio_p2p::p2p] vfio cdev 0xa00:9 BAR2 area +0x0: mapped at IOVA 0x4000000000 (+0x400000) in 77µs\r
BENCH-L2 established 0000:03:00.0\r
BENCH-L2 done\r
P2PVMM-L2: cpus=1 memtotal_kb=480000\r
[2026-12-01T10:00:04Z DEBUG vfio_p2p::p2p] vfio cdev 0xa00:7 BAR0 area +0x0: unmapped from IOVA 0xc0000000 in 9ms\r
[2026-12-01T10:00:04Z DEBUG vfio_p2p::p2p] vfio cdev 0xa00:8 BAR2 area +0x0: unmapped from IOVA 0x400000000 in 25.5µs\r
[2026-12-01T10:00:04Z DEBUG vfio_p2p::p2p] vfio cdev 0xa00:9 BAR2 area +0x0: unmapped from IOVA 0x4000000000 in 20µs\r
BENCH-P2P-RC 0\r
BENCH-P2P-RUN legacy 1\r
BENCH-L2 dev 0000:02:00.0 0x400000000 17179869184\r
BENCH-L2 establish 0000:02:00.0\r
[x] 0000:00:03.0 (group 4) BAR2 area +0x0: mapped at IOVA 0x400000000 (+0x400000000) in 1.5ms\r
BENCH-L2 established 0000:02:00.0\r
BENCH-L2 move 0000:02:00.0 1 0x400000000 0x800000000\r
[y] 0000:02:00.0: config write at 0x4 applied 1 BAR change(s) in 1350000 us\r
[x] 0000:00:03.0 (group 4) BAR2 area +0x0: mapped at IOVA 0x800000000 (+0x400000000) in 1ms\r
[y] 0000:02:00.0: config write at 0x4 applied 1 BAR change(s) in 2000 us\r
BENCH-L2 moved 0000:02:00.0 1\r
BENCH-L2 done\r
[x] 0000:00:03.0 (group 4) BAR2 area +0x0: unmapped from IOVA 0x400000000 in 1.35s\r
BENCH-P2P-RC 0\r
";

    /// Whether two optional times agree to a nanosecond.
    fn near(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-6)
    }

    fn near_all(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| near(Some(*x), *y))
    }

    #[test]
    fn durations_in_debug_format() {
        assert!(near(duration_ms("183.2µs"), 0.1832));
        assert!(near(duration_ms("1.35s"), 1350.0));
        assert!(near(duration_ms("456.7ms"), 456.7));
        assert!(near(duration_ms("2000ns"), 0.002));
        assert_eq!(duration_ms("0ns"), Some(0.0));
        assert_eq!(duration_ms("12"), None);
    }

    #[test]
    fn log_lines() {
        let (key, size, ms) = parse_map(
            "[t DEBUG vfio_p2p::p2p] 0000:00:02.0 BAR2 area +0x0: mapped at IOVA 0x4000 (+0x1000) in 1.5ms",
        )
        .unwrap();
        assert_eq!((key, size), ("0000:00:02.0 BAR2 area +0x0", 0x1000));
        assert!(near(Some(ms), 1.5));
        let (key, ms) =
            parse_unmap("0000:00:02.0 BAR2 area +0x0: unmapped from IOVA 0x4000 in 48µs").unwrap();
        assert_eq!(key, "0000:00:02.0 BAR2 area +0x0");
        assert!(near(Some(ms), 0.048));
        assert_eq!(
            parse_config_write(
                "[t DEBUG devices::pci::segment] 0000:02:00.0: config write at 0x1c applied 1 BAR change(s) in 300 us"
            ),
            Some(("0000:02:00.0", 0x1c, 1, 300.0))
        );
        assert_eq!(
            parse_map("0000:00:02.0 BAR2 area +0x0: unmapped from IOVA 0x4000 in 48µs"),
            None
        );
    }

    #[test]
    fn runs_from_a_console() {
        let boots = parse_console(SAMPLE);
        assert_eq!(boots.len(), 2);
        let b = &boots[0];
        assert_eq!(
            (b.mech, b.index, b.rc, b.bars.len()),
            (Mech::Dmabuf, 1, Some(0), 2)
        );
        let d = &b.bars[0];
        assert_eq!(
            (d.mech, d.size, d.bdf.as_str()),
            (Mech::Dmabuf, 16 << 30, "0000:02:00.0")
        );
        // The map during L2's boot (1 ms) is not the establish.
        assert_eq!(d.maps_during_boot.len(), 1);
        assert!(near(d.establish_ms(), 0.1832));
        assert!(near(Some(d.establish_write), 0.412));
        // Another function's write (0000:01:00.0) is not part of the move.
        assert!(near_all(&d.moves, &[0.8, 1.2]), "{:?}", d.moves);
        assert!(near_all(&d.move_unmaps, &[0.048]));
        assert!(near_all(&d.move_maps, &[0.09, 0.09]));
        // edu's BAR0 unmap is not the measured BAR.
        assert!(near(d.teardown_ms(), 0.0255));
        // Move 3 was rejected, move 4 mapped nothing: neither counts.
        assert_eq!(d.errors.len(), 2, "{:?}", d.errors);
        assert!(d.errors[0].starts_with("move 3 not counted: 0000:02:00.0: config write"));
        assert!(d.errors[1].contains("move 4 not counted: the P2P table did not map"));
        assert!(b.errors.is_empty(), "{:?}", b.errors);
        let small = &b.bars[1];
        assert_eq!(small.size, 4 << 20);
        assert!(near(small.establish_ms(), 0.077));
        assert!(small.moves.is_empty());
        assert!(near(small.teardown_ms(), 0.02));
        let l = &boots[1].bars[0];
        assert_eq!(l.mech, Mech::Legacy);
        assert!(near(l.establish_ms(), 1.5));
        assert!(near_all(&l.moves, &[1352.0]));
        assert!(near(l.teardown_ms(), 1350.0));

        let t = Table::from_boots(&boots);
        assert!(near(t.median(16 << 30, Mech::Dmabuf, Op::Move), 1.0));
        assert!(near(t.median(16 << 30, Mech::Legacy, Op::Teardown), 1350.0));
        assert_eq!(t.sizes(), vec![4 << 20, 16 << 30]);
        // A move of 1.2 ms: the median (1.0 ms) is not under 1 ms; and 4 MiB has no moves.
        assert!(!print_table(&t, 2.0));
    }

    #[test]
    fn a_move_without_a_bar_change_is_reported() {
        let boots = parse_console(
            "BENCH-P2P-RUN dmabuf 1\nBENCH-L2 dev 0000:02:00.0 0x0 4194304\n\
             BENCH-L2 move 0000:02:00.0 1 0x0 0x400000\nBENCH-L2 moved 0000:02:00.0 1\n\
             BENCH-P2P-RC 0\n",
        );
        assert!(boots[0].bars[0].moves.is_empty());
        assert_eq!(boots[0].bars[0].errors.len(), 1);
    }

    #[test]
    fn chart_is_an_svg() {
        let t = Table::from_boots(&parse_console(SAMPLE));
        let path = std::env::temp_dir().join(format!("p2p-chart-test-{}.svg", std::process::id()));
        draw_chart(&t, 1.0, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.contains("establish (dmabuf)") && svg.contains("teardown (legacy)"));
        assert!(svg.contains("16 GiB"));
    }

    #[test]
    fn labels() {
        assert_eq!(size_label(4 << 20), "4 MiB");
        assert_eq!(size_label(64 << 30), "64 GiB");
        assert_eq!(ms_label(0.1832), "183.2 µs");
        assert_eq!(ms_label(1350.0), "1.350 s");
        assert_eq!(axis_ms_label(0.01), "10 µs");
        assert_eq!(axis_ms_label(1.0), "1 ms");
        assert_eq!(axis_ms_label(10000.0), "10 s");
        assert_eq!(axis_ms_label(10f64.powf(-0.5)), "316 µs");
    }
}
