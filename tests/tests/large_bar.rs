//! A GPU-sized BAR in the nested lab: L1 gets a second ivshmem whose BAR2 is 16 GiB (a sparse
//! file on this machine backs it), p2pvmm passes it and edu to L2 in one P2P group (behind one switch), and inside
//! L2 edu DMAs into the BAR's first and last pages at their L2 addresses and back. The BAR must
//! land in the 64-bit window above 4 GiB, inside the IOVA range L1's IOMMU translates, and be
//! reachable end to end through its dmabuf mapping (iommufd) or its mapping by address (legacy).
//! Then the guest moves that BAR (`bar-move-time`, tests/src/bin: decode off, both halves,
//! decode on, to a free slot of the root bus's window and back, as Linux's reassignment does) and
//! after each move the CPU must reach the BAR's memory at its new place and not at its old one:
//! with KVM's default zap of every guest mapping when the BAR's memory slot goes, and with
//! `--slot-zap slot` (only the slot's), on both backends, so a mapping of the old place that
//! outlived the slot fails the test.

use std::fs::File;
use std::path::PathBuf;
use std::sync::OnceLock;

use p2pvmm_tests::{
    bar_move_time_static, edu_dma_static, expect_scenario, repo_root, run_retrying_lab_failure,
    Console, L1Run, L2_CMDLINE,
};

const BAR_GIB: u64 = 16;

/// Moves of the big BAR per move scenario (an even count ends where Linux put it).
const MOVES: u32 = 4;

/// The move scenarios: (name, backend, slot_zap).
const MOVE_SCENARIOS: [(&str, &str, &str); 3] = [
    ("iommufd-moves", "iommufd", "all"),
    ("iommufd-moves-slot-zap", "iommufd", "slot"),
    ("legacy-moves-slot-zap", "legacy", "slot"),
];

/// Binds edu and the ivshmem whose BAR2 is the big one (L1 also has the lab's 64 MiB ivshmem).
const BIND: &str = r#"
EDU=$(bind_vfio 1234 11e8)
BIG=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor"):$(cat "$d/device")" = "0x1af4:0x1110" ] || continue
    set -- $(sed -n 3p "$d/resource")
    [ $(($2 - $1 + 1)) -eq $((BAR_GIB << 30)) ] || continue
    BIG=${d##*/}
    echo vfio-pci > "$d/driver_override"
    [ -e "$d/driver" ] && echo "$BIG" > "$d/driver/unbind"
    echo "$BIG" > /sys/bus/pci/drivers_probe
done
echo "L1: edu=$EDU big ivshmem=$BIG BAR2 $(sed -n 3p /sys/bus/pci/devices/$BIG/resource)"
"#;

/// L2: the big BAR's place, then a round trip through its first and its last page; or, with
/// `lab.moves=N` on the command line, N moves of it.
const L2_SCRIPT: &str = r#"
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor"):$(cat "$d/device")" = "0x1af4:0x1110" ] && big=${d##*/}
done
moves=$(sed -n 's/.*lab\.moves=\([0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$moves" ]; then
    /usr/bin/bar-move-time $big --moves $moves 2>&1
    exit 0
fi
set -- $(sed -n 3p /sys/bus/pci/devices/$big/resource)
start=$1; end=$2
echo "BIG-BAR $start $end"
echo "BIG-STEP first"; /usr/bin/edu-dma --len 4095 --peer-bar "$big:2" 2>&1
echo "BIG-STEP last"; /usr/bin/edu-dma --len 4095 --peer-dst $((end + 1 - 4096)) 2>&1
"#;

/// A sparse file of `BAR_GIB` GiB for QEMU's memory backend: a few pages of disk.
fn backing_file() -> Result<PathBuf, String> {
    let dir = repo_root().join("target/lab-work");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {dir:?}: {e}"))?;
    let path = dir.join(format!("big-bar-{}.mem", std::process::id()));
    File::create(&path)
        .and_then(|f| f.set_len(BAR_GIB << 30))
        .map_err(|e| format!("creating the sparse file {path:?}: {e}"))?;
    Ok(path)
}

fn run_lab() -> Result<Console, String> {
    let file = backing_file()?;
    let backend = format!(
        "memory-backend-file,id=big,size={BAR_GIB}G,mem-path={},share=on",
        file.display()
    );
    let scenario = |backend: &str| {
        format!(
            "p2pvmm -vv --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz --memory 512M \
             --cmdline '{L2_CMDLINE}' \
             --device path=$EDU,id=edu,backend={backend} \
             --device path=$BIG,id=big,backend={backend} \
             --p2p-group name=gpu,devices=edu:big"
        )
    };
    // The moves go to a free slot of the root bus's 64-bit window: the group's devices sit on
    // the root bus (flat), where a bridge window sized to the BAR leaves no room.
    let moves = |backend: &str, zap: &str| {
        format!(
            "p2pvmm -v --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz --memory 512M \
             --cmdline '{L2_CMDLINE} lab.moves={MOVES}' --slot-zap {zap} \
             --device path=$EDU,id=edu,backend={backend} \
             --device path=$BIG,id=big,backend={backend} \
             --p2p-group name=gpu,devices=edu:big,topology=flat"
        )
    };
    let mut run = L1Run::new("large-bar")
        .qemu_args(&["-object", &backend, "-device", "ivshmem-plain,memdev=big"])
        .prelude(&format!("BAR_GIB={BAR_GIB}\n{BIND}"))
        .l2_file(edu_dma_static()?, "/usr/bin/edu-dma")
        .l2_file(bar_move_time_static()?, "/usr/bin/bar-move-time")
        .l2_script(L2_SCRIPT)
        .scenario("iommufd", 400, &scenario("iommufd"))
        .scenario("legacy", 600, &scenario("legacy"));
    for (name, backend, zap) in MOVE_SCENARIOS {
        run = run.scenario(name, 400, &moves(backend, zap));
    }
    let console = run.timeout_s(2300).run();
    let _ = std::fs::remove_file(&file);
    console
}

fn lab() -> &'static Result<Console, String> {
    static LAB: OnceLock<Result<Console, String>> = OnceLock::new();
    LAB.get_or_init(|| {
        let mut booting = vec!["iommufd", "legacy"];
        booting.extend(MOVE_SCENARIOS.map(|(name, _, _)| name));
        run_retrying_lab_failure(&booting, run_lab)
    })
}

fn assert_big_bar_reachable(name: &str) {
    let (s, console) = expect_scenario(lab(), name);
    let bar = s.result_after("", "BIG-BAR ");
    let Some(bar) = bar else {
        panic!(
            "{name}: L2 did not report the big BAR; console:\n{}",
            console
        );
    };
    let bounds: Vec<u64> = bar
        .split_whitespace()
        .filter_map(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .collect();
    let [start, end] = bounds[..] else {
        panic!("{name}: cannot parse 'BIG-BAR {bar}'");
    };
    assert_eq!(end + 1 - start, BAR_GIB << 30, "{name}: BAR size in L2");
    assert!(
        start >= 1 << 32,
        "{name}: BAR at {start:#x}, not above 4 GiB"
    );
    assert!(
        end < 1 << 39,
        "{name}: BAR ends at {end:#x}, beyond L1's 39-bit IOMMU"
    );
    for step in ["first", "last"] {
        let result = s.expect_result(console, &format!("BIG-STEP {step}"), "EDU-DMA: ", "edu-dma");
        assert!(
            result.starts_with("ok ") && result.contains("wrong=0"),
            "{name}: step {step}: {result}; console:\n{}",
            console
        );
    }
    s.assert_exit(console, 0);
}

#[test]
fn iommufd_peer_dma_reaches_both_ends_of_a_16_gib_bar() {
    assert_big_bar_reachable("iommufd");
}

#[test]
fn legacy_peer_dma_reaches_both_ends_of_a_16_gib_bar() {
    assert_big_bar_reachable("legacy");
}

/// The guest moved the big BAR `MOVES` times and the CPU saw its memory only where it was.
fn assert_moves_keep_the_cpu_view(name: &str, zap: &str) {
    let (s, console) = expect_scenario(lab(), name);
    let failures: Vec<&str> = s
        .output
        .lines()
        .filter(|l| l.contains("BAR-MOVE-TIME: FAIL"))
        .collect();
    assert!(
        failures.is_empty(),
        "{name}: {}; console:\n{console}",
        failures.join("\n")
    );
    let result = s.expect_result(console, "", "BAR-MOVE-TIME: median ", "bar-move-time");
    assert!(
        result.contains(&format!("moves={MOVES} size={}", BAR_GIB << 30)),
        "{name}: bar-move-time says '{result}'; console:\n{console}"
    );
    // The setting took effect: p2pvmm says so, and did not fall back.
    let applied = s
        .output
        .contains("KVM zaps only a deleted memory slot's mappings");
    assert_eq!(
        applied,
        zap == "slot",
        "{name}: --slot-zap {zap} and p2pvmm's log; console:\n{console}"
    );
    s.assert_exit(console, 0);
}

#[test]
fn iommufd_guest_moves_of_a_16_gib_bar_leave_no_stale_cpu_mapping() {
    assert_moves_keep_the_cpu_view("iommufd-moves", "all");
}

#[test]
fn iommufd_moves_with_slot_zap_slot_leave_no_stale_cpu_mapping() {
    assert_moves_keep_the_cpu_view("iommufd-moves-slot-zap", "slot");
}

#[test]
fn legacy_moves_with_slot_zap_slot_leave_no_stale_cpu_mapping() {
    assert_moves_keep_the_cpu_view("legacy-moves-slot-zap", "slot");
}
