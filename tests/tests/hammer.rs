//! Hardening in the nested lab, one L1 boot with QEMU's e1000e next to edu:
//! - a guest hammering a passthrough NIC's config space and MSI-X table and edu's expansion ROM
//!   from vCPU 1 does not slow vCPU 0 past a bound (two vCPUs: the lab kernel has NR_CPUS=2)
//!   (`vcpu-hammer`, tests/src/bin), on both IOMMU backends, and every ROM read under the
//!   hammer returns the ROM file's bytes;
//! - a panic in the P2P reporter thread (`P2PVMM_X_PANIC=p2p-report`, which needs a P2P group,
//!   so it cannot run on this machine's `/dev/kvm` as vmm/tests/panics.rs does) ends p2pvmm
//!   with SIGABRT and a line naming the thread, and the next p2pvmm opens the same devices.

use std::sync::OnceLock;

use p2pvmm_tests::option_rom::{edu_option_rom, fnv1a64};
use p2pvmm_tests::{
    expect_scenario, repo_root, run_retrying_lab_failure, vcpu_hammer_static, Console, L1Run,
    Scenario, L2_CMDLINE,
};

const VMM: &str = "p2pvmm --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz --memory 512M";

/// Binds L1's e1000e and edu to vfio-pci.
const BIND: &str = r#"
NIC=$(bind_vfio 8086 10d3)
EDU=$(bind_vfio 1234 11e8)
echo "L1: e1000e $NIC edu $EDU"
"#;

/// L2: the hammer when asked for; the panic scenario's L2 never gets that far.
const L2_SCRIPT: &str = r#"
if grep -q 'lab.hammer' /proc/cmdline; then /usr/bin/vcpu-hammer 2>&1; fi
"#;

fn run_lab() -> Result<Console, String> {
    let dir = repo_root()
        .join("target/lab-work")
        .join(format!("hammer-rom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {dir:?}: {e}"))?;
    let rom = dir.join("edu-rom.bin");
    std::fs::write(&rom, edu_option_rom()).map_err(|e| format!("writing {rom:?}: {e}"))?;
    // `-v`: a guest reset's cause (reset register, i8042, triple fault) is in the console.
    let hammer = |backend: &str| {
        format!(
            "{VMM} -v --cpus 2 --cmdline '{L2_CMDLINE} lab.hammer' \
             --device path=$NIC,id=nic,backend={backend} \
             --device path=$EDU,id=edu,backend={backend}"
        )
    };
    L1Run::new("hammer")
        .qemu_args(&["-device", "e1000e"])
        .edu_romfile(&rom)
        .prelude(BIND)
        .l2_file(vcpu_hammer_static()?, "/usr/bin/vcpu-hammer")
        .l2_script(L2_SCRIPT)
        .scenario(
            "panic-p2p-report",
            240,
            &format!(
                "env P2PVMM_X_PANIC=p2p-report {VMM} -v --cpus 1 --cmdline '{L2_CMDLINE}' \
                 --device path=$EDU,id=edu --device path=$NIC,id=nic \
                 --p2p-group name=g0,devices=edu:nic"
            ),
        )
        .scenario("hammer-iommufd", 300, &hammer("iommufd"))
        .scenario("hammer-legacy", 300, &hammer("legacy"))
        .run()
}

fn lab() -> &'static Result<Console, String> {
    static LAB: OnceLock<Result<Console, String>> = OnceLock::new();
    LAB.get_or_init(|| run_retrying_lab_failure(&["hammer-iommufd", "hammer-legacy"], run_lab))
}

fn scenario(name: &str) -> (Scenario, &'static Console) {
    expect_scenario(lab(), name)
}

/// One step's figures from a `VCPU-HAMMER: PHASE STEP n=.. median=.. p99=.. max=..` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Figures {
    n: u64,
    median: u64,
    p99: u64,
    max: u64,
}

fn figures(output: &str, phase: &str, step: &str) -> Option<Figures> {
    let prefix = format!("VCPU-HAMMER: {phase} {step} ");
    let line = output.lines().find_map(|l| {
        let at = l.find(&prefix)?;
        Some(&l[at + prefix.len()..])
    })?;
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    Some(Figures {
        n: field("n")?,
        median: field("median")?,
        p99: field("p99")?,
        max: field("max")?,
    })
}

/// A hammered step's bound, from its baseline: `factor` times the baseline's p99 plus `slack`
/// microseconds, for the hammered p99; `max_ms` for any single sample.
struct Bound {
    step: &'static str,
    factor: u64,
    slack_us: u64,
    max_ms: u64,
}

/// Measured 2026-12-02 (one L1, both backends, machine busy with other builds; microseconds):
/// cpu baseline p99 3725-3792 max 12038-12811, hammered p99 8851-9702 max 33954-39614; cfg
/// hammered p99 121820-141957 max 199940-244756; a second run: cpu baseline p99 1456-2091,
/// hammered p99 8731-13471 max 10887-17464; a third (quiet machine): cpu hammered p99
/// 1690-1923 max 7812-25363, cfg p99 20863-26963 max 34562-48609. `cpu` allows 2.5x the worst hammered sample
/// seen: a vCPU 0 held behind one of vCPU 1's slow config writes (100-250 ms) would fail it.
const BOUNDS: [Bound; 2] = [
    Bound {
        step: "cpu",
        factor: 4,
        slack_us: 15_000,
        max_ms: 100,
    },
    // The guest's own pci_lock puts this read behind vCPU 1's decode toggles, which take
    // 100-250 ms under nested TCG: only a much longer stall fails.
    Bound {
        step: "cfg",
        factor: 4,
        slack_us: 400_000,
        max_ms: 1_000,
    },
];

fn assert_vcpu0_not_slowed(name: &str) {
    let (s, console) = scenario(name);
    let result = s.expect_result(console, "", "VCPU-HAMMER: ", "vcpu-hammer");
    assert!(
        s.output.contains("VCPU-HAMMER: ok"),
        "{name}: {result}; console:\n{console}"
    );
    let ops = s
        .output
        .lines()
        .find(|l| l.contains("VCPU-HAMMER: hammer "))
        .unwrap_or_default();
    eprintln!("{name}: {ops}");
    assert!(
        !ops.contains("config_accesses=0 ")
            && !ops.contains("msix_accesses=0 ")
            && !ops.contains("rom_bytes=0 "),
        "{name}: a hammer did nothing: {ops:?}; console:\n{console}"
    );
    // Every later read was checked against this one in L2; this one against the file.
    let expected = format!(
        "bytes={} fnv={:#x}",
        edu_option_rom().len(),
        fnv1a64(&edu_option_rom())
    );
    assert!(
        s.output
            .lines()
            .any(|l| l.contains("VCPU-HAMMER: rom edu=") && l.ends_with(&expected)),
        "{name}: L2's first ROM read is not the file ({expected}); console:\n{console}"
    );
    for bound in &BOUNDS {
        let get = |phase| {
            figures(&s.output, phase, bound.step).unwrap_or_else(|| {
                panic!(
                    "{name}: no {phase} {} figures; console:\n{console}",
                    bound.step
                )
            })
        };
        let (base, hammered) = (get("baseline"), get("hammered"));
        eprintln!(
            "{name}: {}: baseline {base:?} hammered {hammered:?}",
            bound.step
        );
        assert!(
            base.n >= 100 && hammered.n >= 100,
            "{name}: too few samples"
        );
        let p99_limit = base.p99 * bound.factor + bound.slack_us;
        assert!(
            hammered.p99 <= p99_limit,
            "{name}: {}: hammered p99 {} us over {p99_limit} us ({}x baseline p99 {} + {} us)",
            bound.step,
            hammered.p99,
            bound.factor,
            base.p99,
            bound.slack_us
        );
        assert!(
            hammered.max <= bound.max_ms * 1000,
            "{name}: {}: a hammered sample took {} us (limit {} ms)",
            bound.step,
            hammered.max,
            bound.max_ms
        );
    }
    s.assert_exit(console, 0);
}

#[test]
fn iommufd_hammering_config_msix_and_rom_does_not_stall_another_vcpu() {
    assert_vcpu0_not_slowed("hammer-iommufd");
}

#[test]
fn legacy_hammering_config_msix_and_rom_does_not_stall_another_vcpu() {
    assert_vcpu0_not_slowed("hammer-legacy");
}

#[test]
fn a_p2p_reporter_panic_aborts_naming_the_thread() {
    let (s, console) = scenario("panic-p2p-report");
    s.assert_exit(console, 134);
    assert!(
        s.output.lines().any(
            |l| l.contains("p2pvmm: error: thread 'p2p-report' panicked at ")
                && l.contains("injected panic")
        ),
        "panic-p2p-report: no line naming the thread; console:\n{console}"
    );
}

#[test]
fn figures_parse() {
    let out = "x VCPU-HAMMER: hammered cfg n=400 median=90 p99=700 max=1500\n";
    assert_eq!(
        figures(out, "hammered", "cfg"),
        Some(Figures {
            n: 400,
            median: 90,
            p99: 700,
            max: 1500
        })
    );
    assert_eq!(figures(out, "baseline", "cfg"), None);
}
