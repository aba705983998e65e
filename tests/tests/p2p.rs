//! Peer-to-peer DMA in the nested lab, the reason p2pvmm exists: edu and ivshmem, passed through
//! to L2 behind one switch, and inside L2 edu DMAs into ivshmem's BAR at its L2 guest address and
//! back. The mapping must follow the guest: after L2 moves the BAR, the new address works and the
//! old one does not; with memory decoding off, the BAR is unreachable, and after turning it back on
//! it works again.

use std::sync::OnceLock;

use p2pvmm_tests::{
    edu_dma_static, expect_scenario, run_retrying_lab_failure, Console, L1Run, Scenario, L2_CMDLINE,
};

const VMM: &str = "p2pvmm --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz --memory 512M";

const BIND: &str = r#"
EDU=$(bind_vfio 1234 11e8)
SHM=$(bind_vfio 1af4 1110)
echo "L1: edu=$EDU ivshmem=$SHM"
"#;

/// L2: each step prints `P2P-STEP name` and then edu-dma's result line.
const L2_SCRIPT: &str = r#"
shm=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor"):$(cat "$d/device")" = "0x1af4:0x1110" ] && shm=${d##*/}
done
cfg=/sys/bus/pci/devices/$shm/config
# Writes a little-endian dword into ivshmem's config space.
wcfg() {
    v=$2
    printf "$(printf '\\%03o\\%03o\\%03o\\%03o' $((v & 255)) $(((v >> 8) & 255)) \
        $(((v >> 16) & 255)) $(((v >> 24) & 255)))" |
        dd of="$cfg" bs=1 seek="$1" count=4 conv=notrunc 2>/dev/null
}
step() { echo "P2P-STEP $1"; shift; /usr/bin/edu-dma --len 2048 "$@" 2>&1; }
old=$(sed -n 3p /sys/bus/pci/devices/$shm/resource | cut -d' ' -f1)
echo "P2P-BAR2 $old"
step initial --peer-bar "$shm:2"
new=$((old + 0x10000000))
wcfg 4 0
wcfg 24 $((new & 0xffffffff))
wcfg 28 $((new >> 32))
wcfg 4 2
echo "P2P-BAR2-MOVED $(printf '0x%x' $new)"
step moved --peer-dst "$new"
step old-address --peer-dst "$old"
wcfg 4 0
step decode-off --peer-dst "$new"
wcfg 4 2
step decode-on --peer-dst "$new"
"#;

fn run_lab() -> Result<Console, String> {
    let scenario = |backend: &str| {
        format!(
            "{VMM} --cmdline '{L2_CMDLINE}' --device path=$EDU,id=edu,backend={backend},switch=sw0 \
             --device path=$SHM,id=shm,backend={backend},switch=sw0"
        )
    };
    L1Run::new("p2p")
        .prelude(BIND)
        .l2_file(edu_dma_static()?, "/usr/bin/edu-dma")
        .l2_script(L2_SCRIPT)
        .scenario("iommufd", 400, &scenario("iommufd"))
        .scenario("legacy", 400, &scenario("legacy"))
        .run()
}

fn lab() -> &'static Result<Console, String> {
    static LAB: OnceLock<Result<Console, String>> = OnceLock::new();
    LAB.get_or_init(|| run_retrying_lab_failure(&["iommufd", "legacy"], run_lab))
}

fn scenario(name: &str) -> (Scenario, &'static Console) {
    expect_scenario(lab(), name)
}

fn assert_steps(name: &str) {
    let (s, console) = scenario(name);
    let expect = [
        ("initial", true),
        ("moved", true),
        ("old-address", false),
        ("decode-off", false),
        ("decode-on", true),
    ];
    for (step, works) in expect {
        let result = s.expect_result(console, &format!("P2P-STEP {step}"), "EDU-DMA: ", "edu-dma");
        let ok = result.starts_with("ok ") && result.contains("wrong=0");
        assert_eq!(
            ok, works,
            "{name}: step {step}: {result}; console:\n{}",
            console.text
        );
    }
    s.assert_exit(console, 0);
}

#[test]
fn iommufd_peer_dma_follows_bar_moves_and_decode() {
    assert_steps("iommufd");
}

#[test]
fn legacy_peer_dma_follows_bar_moves_and_decode() {
    assert_steps("legacy");
}
