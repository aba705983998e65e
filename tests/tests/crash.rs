//! `kill -9` of p2pvmm in the nested lab, per backend: L2 runs edu DMAs in a loop and a hotplug
//! of ivshmem into group g has just been answered (L2 is still enumerating it) when L1 kills
//! p2pvmm. Nothing of p2pvmm's runs after that (no `Drop`, no unmap, no reset), so what must
//! hold is the kernel's promise: every VFIO, iommufd and KVM object goes with the process's
//! fds. A new p2pvmm started at once with both devices in group g must open them, and edu's
//! DMA into ivshmem's BAR must land; L1 itself keeps working (it runs that second VM).

use std::sync::OnceLock;

use p2pvmm_tests::{
    edu_dma_static, expect_scenario, run_retrying_lab_failure, Console, L1Run, Scenario,
    BIND_EDU_AND_IVSHMEM, L2_CMDLINE,
};

/// The L1 driver: `sh /tmp/kill.sh BACKEND EDU SHM CMDLINE`.
const KILL_DRIVER: &str = r#"
cat > /tmp/kill.sh <<'EOF'
backend=$1 edu=$2 shm=$3 cmdline=$4
sock=/tmp/kill-$backend.sock out=/tmp/kill-$backend-1.out
L2="--kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz --memory 512M"
p2pvmm -v --api-socket $sock $L2 --cmdline "$cmdline lab.mode=dmaloop" \
    --device path=$edu,id=edu,backend=$backend --p2p-group name=g,devices=edu,slots=1 \
    >> $out 2>&1 &
vmm=$!
n=0
while [ "$(grep -c 'L2-DMA-ROUND ok' $out)" -lt 3 ] && kill -0 $vmm 2>/dev/null &&
    [ $n -lt 2400 ]; do
    sleep 0.1; n=$((n + 1))
done
echo "KILL-ROUNDS-BEFORE $(grep -c 'L2-DMA-ROUND ok' $out)"
echo "KILL-ADD $(p2pvmm remote --api-socket $sock add-device path=$shm,id=shm,p2p_group=g 2>&1)"
kill -9 $vmm
wait $vmm
status=$?
echo "KILL-STATUS $status"
grep -c 'L2-DMA-ROUND failed' $out | sed 's/^/KILL-ROUNDS-FAILED /'
# Not killed by us (137): the first VM's own output says why (a guest reset, an L2 triple fault
# or panic, which the lab reruns), without the loop's round lines.
if [ $status != 137 ]; then
    echo "KILL-FIRST-VM-OUTPUT"
    grep -v 'L2-DMA-ROUND ok' $out
fi
# At once: the same devices, both in group g, in a new VM.
out=/tmp/kill-$backend-2.out
p2pvmm -v $L2 --cmdline "$cmdline lab.mode=reuse" \
    --device path=$edu,id=edu,backend=$backend --device path=$shm,id=shm,backend=$backend \
    --p2p-group name=g,devices=edu:shm >> $out 2>&1
rc=$?
cat $out
exit $rc
EOF
"#;

/// L2: `dmaloop` runs edu round trips until the VM dies; `reuse` checks P2P once.
const L2_SCRIPT: &str = r#"
mode=$(sed -n 's/.*lab\.mode=\([a-z]*\).*/\1/p' /proc/cmdline)
dmesg -n 1
edu=$(find_dev 0x1234:0x11e8)
if [ "$mode" = dmaloop ]; then
    while :; do
        if /usr/bin/edu-dma --len 2048 $edu > /tmp/round 2>&1; then
            echo "L2-DMA-ROUND ok"
        else
            echo "L2-DMA-ROUND failed"; cat /tmp/round
        fi
    done
elif [ "$mode" = reuse ]; then
    shm=$(find_dev 0x1af4:0x1110)
    echo "KILL-STEP reuse"
    /usr/bin/edu-dma --len 2048 $edu --peer-bar "$shm:2" --peer-check "$shm:2" 2>&1
fi
"#;

fn run_lab() -> Result<Console, String> {
    let kill = |backend: &str| format!("sh /tmp/kill.sh {backend} $EDU $SHM '{L2_CMDLINE}'");
    L1Run::new("crash")
        .prelude(BIND_EDU_AND_IVSHMEM)
        .prelude(KILL_DRIVER)
        .l2_file(edu_dma_static()?, "/usr/bin/edu-dma")
        .l2_script(L2_SCRIPT)
        .scenario("iommufd-kill", 400, &kill("iommufd"))
        .scenario("legacy-kill", 400, &kill("legacy"))
        .run()
}

fn lab() -> &'static Result<Console, String> {
    static LAB: OnceLock<Result<Console, String>> = OnceLock::new();
    LAB.get_or_init(|| run_retrying_lab_failure(&["iommufd-kill", "legacy-kill"], run_lab))
}

fn scenario(name: &str) -> (Scenario, &'static Console) {
    expect_scenario(lab(), name)
}

fn assert_devices_survive_kill(name: &str) {
    let (s, console) = scenario(name);
    let fact = |prefix: &str| s.expect_result(console, "", prefix, "the L1 driver");
    let rounds: u32 = fact("KILL-ROUNDS-BEFORE ").parse().unwrap_or(0);
    assert!(
        rounds >= 3,
        "{name}: L2's DMA loop never ran ({rounds} rounds); console:\n{console}"
    );
    assert!(
        fact("KILL-ADD ").starts_with("id shm at 0000:"),
        "{name}: the hotplug before the kill; console:\n{console}"
    );
    assert_eq!(
        fact("KILL-STATUS "),
        "137",
        "{name}: p2pvmm should have died of SIGKILL; console:\n{console}"
    );
    assert_eq!(
        fact("KILL-ROUNDS-FAILED "),
        "0",
        "{name}: DMA rounds failed before the kill; console:\n{console}"
    );
    assert!(
        s.edu_dma_works(console, "KILL-STEP reuse"),
        "{name}: edu's DMA in the new VM; console:\n{console}"
    );
    assert!(
        s.peer_bytes_present(console, "KILL-STEP reuse"),
        "{name}: P2P into ivshmem's BAR in the new VM; console:\n{console}"
    );
    s.assert_exit(console, 0);
}

#[test]
fn devices_are_reusable_at_once_after_a_kill_on_iommufd() {
    assert_devices_survive_kill("iommufd-kill");
}

#[test]
fn devices_are_reusable_at_once_after_a_kill_on_legacy() {
    assert_devices_survive_kill("legacy-kill");
}
