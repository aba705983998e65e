//! A seeded random walk of ivshmem's BAR in the nested lab, per backend (iommufd and legacy
//! type1): L2 (edu and ivshmem in one P2P group behind a switch) runs `bar-walk` (tests/src/bin),
//! which for 200 steps moves ivshmem's BAR2 to random slots of its downstream port's window (the
//! first and last slot included) or outside every window, or toggles memory decoding, and after
//! each step has edu DMA a pattern of its own to the BAR's current address and to former ones.
//! The CPU then reads back every DMA's place in the BAR: each must hold its pattern exactly when
//! the BAR decoded at that address inside its window (and nothing otherwise).
//!
//! The seed of each walk is printed (`BAR-WALK: seed=S` in the console, and by the test); set
//! `BAR_WALK_SEED=S` to walk the same way again, `BAR_WALK_STEPS=N` for another length.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use p2pvmm_tests::{
    bar_walk_static, expect_scenario, run_retrying_lab_failure, Console, L1Run, Scenario,
    BIND_EDU_AND_IVSHMEM, L2_CMDLINE,
};

const VMM: &str = "p2pvmm --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz --memory 512M";

/// The walk's length unless `BAR_WALK_STEPS` says otherwise.
const STEPS: u32 = 200;

const L2_SCRIPT: &str = r#"
dmesg -n 1
arg() { sed -n "s/.*lab\.$1=\([0-9a-z-]*\).*/\1/p" /proc/cmdline; }
edu=$(find_dev 0x1234:0x11e8)
shm=$(find_dev 0x1af4:0x1110)
echo "BAR-WALK-DEVICES edu=$edu ivshmem=$shm"
/usr/bin/bar-walk $edu $shm --steps $(arg steps) --seed $(arg seed) $(arg extra) 2>&1
"#;

const BACKENDS: [&str; 2] = ["iommufd", "legacy"];

fn steps() -> u32 {
    std::env::var("BAR_WALK_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(STEPS)
}

/// The seed of `backend`'s walk: `BAR_WALK_SEED`, or one from the clock (printed either way).
fn seed(backend: &str) -> u64 {
    static SEEDS: OnceLock<(u64, u64)> = OnceLock::new();
    let (a, b) = *SEEDS.get_or_init(|| {
        let fixed = std::env::var("BAR_WALK_SEED").ok().and_then(|s| s.parse().ok());
        let clock = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        let seeds = fixed.map_or((clock, clock ^ 0x5eed), |s| (s, s));
        eprintln!("bar_walk: seeds iommufd={} legacy={}", seeds.0, seeds.1);
        seeds
    });
    if backend == "iommufd" {
        a
    } else {
        b
    }
}

fn command(backend: &str) -> String {
    format!(
        "{VMM} --cmdline '{L2_CMDLINE} lab.steps={} lab.seed={} lab.extra={}' \
         --device path=$EDU,id=edu,backend={backend} --device path=$SHM,id=shm,backend={backend} \
         --p2p-group name=g0,devices=edu:shm",
        steps(),
        seed(backend),
        std::env::var("BAR_WALK_EXTRA").unwrap_or_default()
    )
}

fn run_lab() -> Result<Console, String> {
    // About 0.5 s a step with the checks, twice that on a loaded machine.
    let limit = 120 + steps() * 2;
    let mut run = L1Run::new("bar-walk")
        .prelude(BIND_EDU_AND_IVSHMEM)
        .l2_file(bar_walk_static()?, "/usr/bin/bar-walk")
        .l2_script(L2_SCRIPT)
        .timeout_s(300 + 2 * limit);
    for backend in BACKENDS {
        run = run.scenario(&format!("{backend}-walk"), limit, &command(backend));
    }
    run.run()
}

fn lab() -> &'static Result<Console, String> {
    static LAB: OnceLock<Result<Console, String>> = OnceLock::new();
    LAB.get_or_init(|| run_retrying_lab_failure(&["iommufd-walk", "legacy-walk"], run_lab))
}

fn assert_walk(backend: &str) {
    let name = format!("{backend}-walk");
    let (s, console): (Scenario, &Console) = expect_scenario(lab(), &name);
    let seed = seed(backend);
    let failures: Vec<&str> = s
        .output
        .lines()
        .filter(|l| l.contains("BAR-WALK: FAIL"))
        .collect();
    assert!(
        failures.is_empty(),
        "{name} (seed {seed}): DMAs did not land where the guest state says:\n{}\nconsole:\n{console}",
        failures.join("\n")
    );
    assert_eq!(
        s.result_after("", "BAR-WALK: seed="),
        Some(seed.to_string().as_str()),
        "{name}: the walk's seed; console:\n{console}"
    );
    let result = s.expect_result(console, "BAR-WALK: seed=", "BAR-WALK: ", "bar-walk");
    let prefix = format!("ok steps={} seed={seed} ", steps());
    assert!(
        result.starts_with(&prefix),
        "{name}: bar-walk says '{result}', not '{prefix}...'; console:\n{console}"
    );
    // Both kinds of DMA happened: some had to land, others had to miss.
    let field = |key: &str| -> u64 {
        result
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.parse().ok())
            .unwrap_or(0)
    };
    let (dmas, landed) = (field("dmas="), field("landed="));
    assert!(
        landed > 0 && landed < dmas,
        "{name}: {landed} of {dmas} DMAs were to land; console:\n{console}"
    );
    s.assert_exit(console, 0);
}

#[test]
fn iommufd_dmas_follow_a_random_bar_walk() {
    assert_walk("iommufd");
}

#[test]
fn legacy_dmas_follow_a_random_bar_walk() {
    assert_walk("legacy");
}
