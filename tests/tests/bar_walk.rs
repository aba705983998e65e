//! A seeded random walk of ivshmem's BAR in the nested lab, per backend (iommufd and legacy
//! type1), both at once in one L1 boot, each with an edu and ivshmem of its own: L2 (edu and ivshmem in one P2P group behind a switch) runs
//! `bar-walk` (tests/src/bin), which for 200 steps moves ivshmem's 64 MiB BAR2 (to a random
//! slot of its downstream port's window, its first or last slot, the slot right past either
//! end of the window, a slot at or right below a 4 GiB boundary, inside the host bridge's
//! window but outside every bridge window, or outside every window), its halves written in a
//! random order and a third of the moves with decoding left on (so the BAR decodes at a mixed
//! address between the two writes), or toggles memory decoding; after each step edu DMAs a
//! pattern of its own to the BAR's current address, to the previous one and to the mixed one
//! or (every other step) an older one. Every 25 steps and at the end the CPU reads back every DMA's place in the
//! BAR: each must hold its pattern exactly when the BAR decoded at that address inside its
//! bridge's window, and its fill otherwise.
//!
//! The seeds are printed (`bar_walk: seeds ...` on stderr, `BAR-WALK: seed=S` in the console)
//! and differ per run (from the clock); `BAR_WALK_SEED=S` walks both backends with seed S
//! again, `BAR_WALK_STEPS=N` for another length.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use p2pvmm_tests::{
    bar_walk_static, expect_scenario, run_retrying_lab_failure, Console, L1Run, Scenario,
    L2_CMDLINE,
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
/usr/bin/bar-walk $edu $shm --steps $(arg steps) --seed $(arg seed) 2>&1
"#;

/// Each backend walks its own edu and ivshmem (L1's first pair for iommufd, this second pair
/// for legacy), so both walks run at once: edu's DMA timer (100 ms a transfer) sets their pace,
/// not L1's CPUs.
const QEMU_ARGS: &[&str] = &[
    "-device",
    "edu,dma_mask=0xffffffffffffffff",
    "-object",
    "memory-backend-ram,id=shm1,size=64M,share=on",
    "-device",
    "ivshmem-plain,memdev=shm1",
];

/// Binds both pairs to vfio-pci; the second pair comes after the first on L1's bus.
const BIND: &str = r#"
EDU=$(bind_vfio 1234 11e8 1)
SHM=$(bind_vfio 1af4 1110 1)
EDU2=$(bind_vfio 1234 11e8 2)
SHM2=$(bind_vfio 1af4 1110 2)
echo "L1: edu=$EDU ivshmem=$SHM edu2=$EDU2 ivshmem2=$SHM2"
"#;

/// Waits for both walks, printing a line every 15 s meanwhile (or run-l1.sh's silence watchdog,
/// 300 s, takes the quiet console for a frozen L1: seen once with another lab run on the
/// machine), then prints their consoles one after the other.
const WAIT_BOTH: &str = r#"
while kill -0 $iommufd_pid 2>/dev/null || kill -0 $legacy_pid 2>/dev/null; do
    sleep 15
    echo "L1: walk steps so far: iommufd $(grep -c 'bar-walk: step' /tmp/iommufd-walk.log)" \
        "legacy $(grep -c 'bar-walk: step' /tmp/legacy-walk.log)"
done
wait
cat /tmp/iommufd-walk.log /tmp/legacy-walk.log
"#;

/// (backend, its edu and ivshmem in L1)
const BACKENDS: [(&str, &str, &str); 2] =
    [("iommufd", "$EDU", "$SHM"), ("legacy", "$EDU2", "$SHM2")];

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
        let fixed = std::env::var("BAR_WALK_SEED")
            .ok()
            .and_then(|s| s.parse().ok());
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

fn command(backend: &str, edu: &str, shm: &str) -> String {
    format!(
        "{VMM} --cmdline '{L2_CMDLINE} lab.steps={} lab.seed={}' \
         --device path={edu},id=edu,backend={backend} --device path={shm},id=shm,backend={backend} \
         --p2p-group name=g0,devices=edu:shm",
        steps(),
        seed(backend)
    )
}

fn run_lab() -> Result<Console, String> {
    // About 0.3 s a step (edu's 100 ms per transfer), twice that on a loaded machine.
    let limit = 120 + steps() * 2;
    // The two scenarios run at once, each into a file of its own, printed one after the other
    // so the console keeps one scenario between each pair of markers.
    let mut both = String::from(BIND);
    for (backend, edu, shm) in BACKENDS {
        both.push_str(&format!(
            "( scenario {backend}-walk {limit} {} ) > /tmp/{backend}-walk.log 2>&1 &\n\
             {backend}_pid=$!\n",
            command(backend, edu, shm)
        ));
    }
    both.push_str(WAIT_BOTH);
    L1Run::new("bar-walk")
        .qemu_args(QEMU_ARGS)
        .prelude(&both)
        .l2_file(bar_walk_static()?, "/usr/bin/bar-walk")
        .l2_script(L2_SCRIPT)
        // Two L2s of 512 MiB at once plus what L1 keeps (2560 MiB, see `l1_mem_for`) fit the
        // default 4 GiB.
        .timeout_s(300 + limit)
        .run()
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
    // The result line comes after the step lines and the cases.
    let result = s.expect_result(console, "BAR-WALK-CASES: ", "BAR-WALK: ", "bar-walk");
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
    // Every hard case came up at least once.
    let cases = s.expect_result(console, "", "BAR-WALK-CASES: ", "bar-walk");
    for case in [
        "inside",
        "outside-all",
        "outside-bridge",
        "edge",
        "boundary",
        "decode",
        "high-first",
        "live",
        "mixed",
    ] {
        let n = cases.split_whitespace().find_map(|kv| {
            kv.strip_prefix(case)?
                .strip_prefix('=')?
                .parse::<u32>()
                .ok()
        });
        assert!(
            n.is_some_and(|n| n > 0),
            "{name} (seed {seed}): no '{case}' step in '{cases}'; console:\n{console}"
        );
    }
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
