//! L2 boot tests: p2pvmm, running inside the L1 lab guest on real (nested) KVM, boots the lab
//! kernel with a tiny initramfs, and what L2's userspace reports is checked against the config.
//!
//! All scenarios share one L1 boot (TCG makes each boot expensive); each test reads its own
//! scenario from the console and prints the whole console when it fails.

use std::sync::OnceLock;

use p2pvmm_tests::{
    expect_scenario, lab_vmlinux, run_retrying_lab_failure, Console, L1Run, Scenario, L2_CMDLINE,
};

const L2: &str = "--kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz";
const MIB: u64 = 1 << 20;

/// Writes `/tmp/stop-when.sh`: `sh /tmp/stop-when.sh MARKER SIGNAL CMD...` runs CMD, sends it
/// SIGNAL once its output shows MARKER, prints its output and exits with its status. (A script,
/// not a shell function: `scenario` runs its command through timeout(1).)
const STOP_WHEN: &str = r#"
cat > /tmp/stop-when.sh <<'EOF'
marker=$1; sig=$2; shift 2
"$@" > /tmp/stop-when.out 2>&1 &
pid=$!
while kill -0 $pid 2>/dev/null && ! grep -q "$marker" /tmp/stop-when.out; do sleep 1; done
echo "L1: sending SIG$sig to p2pvmm"
kill -$sig $pid
wait $pid
rc=$?
cat /tmp/stop-when.out
exit $rc
EOF
"#;

/// L2 holds (instead of powering off) when its command line asks for it.
const L2_SCRIPT: &str = r#"
if grep -q 'p2pvmm\.l2=hold' /proc/cmdline; then echo "L2-HOLDING"; sleep 600; fi
"#;

fn boot_lab() -> Result<Console, String> {
    L1Run::new("boot")
        .file(lab_vmlinux()?, "/l2/vmlinux")
        .prelude(STOP_WHEN)
        .l2_script(L2_SCRIPT)
        .scenario(
            "one-cpu",
            240,
            &format!("p2pvmm -v {L2} --cpus 1 --memory 512M --cmdline '{L2_CMDLINE}'"),
        )
        // The bzImage entered as it is, decompressing itself (every other scenario boots the
        // kernel p2pvmm decompressed).
        .scenario(
            "guest-decompress",
            240,
            &format!(
                "p2pvmm -v {L2} --kernel-decompress guest --cpus 1 --memory 512M \
                 --cmdline '{L2_CMDLINE}'"
            ),
        )
        .scenario(
            "two-cpus",
            240,
            &format!("p2pvmm -v {L2} --cpus 2 --memory 768M --cmdline '{L2_CMDLINE}'"),
        )
        // One vCPU: with two, this 3.5 GiB L2 failed in 3 of 5 runs on 2026-12-02 (two oopses
        // jumping into its own heap, one hang with vCPU0 spinning in the guest while vCPU1 sat
        // halted, as after a lost IPI), always with L1 busy; two-cpus and sigterm cover SMP. What
        // this scenario is for is RAM on both sides of the 32-bit hole.
        .scenario(
            "above-4g",
            240,
            &format!("p2pvmm {L2} --cpus 1 --memory 3584M --cmdline '{L2_CMDLINE}'"),
        )
        .scenario(
            "reboot",
            240,
            &format!(
                "p2pvmm {L2} --cpus 1 --memory 256M --cmdline '{L2_CMDLINE} p2pvmm.l2=reboot'"
            ),
        )
        .scenario(
            "elf",
            240,
            &format!(
                "p2pvmm --kernel /l2/vmlinux --initramfs /l2/initramfs.cpio.gz --cpus 1 \
                 --memory 512M --cmdline '{L2_CMDLINE}'"
            ),
        )
        .scenario(
            "sigterm",
            240,
            &format!(
                "sh /tmp/stop-when.sh L2-HOLDING TERM p2pvmm {L2} --cpus 2 --memory 512M \
                 --cmdline '{L2_CMDLINE} p2pvmm.l2=hold'"
            ),
        )
        .scenario(
            "bad-kernel",
            60,
            "p2pvmm --kernel /nonexistent/bzImage --memory 256M",
        )
        .run()
}

/// The shared L1 run, retried once after a lab failure.
fn lab() -> &'static Result<Console, String> {
    static LAB: OnceLock<Result<Console, String>> = OnceLock::new();
    LAB.get_or_init(|| {
        run_retrying_lab_failure(
            &["one-cpu", "guest-decompress", "two-cpus", "above-4g", "elf"],
            boot_lab,
        )
    })
}

fn scenario(name: &str) -> (Scenario, &'static Console) {
    expect_scenario(lab(), name)
}

/// L2 booted to its init, reported `cpus` CPUs and a MemTotal consistent with `memory`, and
/// p2pvmm exited 0 after L2 powered off.
fn assert_boots(name: &str, cpus: u32, memory: u64) {
    let (s, console) = scenario(name);
    let Some(report) = s.l2_report() else {
        panic!("{name}: L2 never reported; console:\n{}", console);
    };
    assert_eq!(
        report.cpus, cpus,
        "{name}: L2 CPU count; console:\n{}",
        console
    );
    let total = report.memtotal_kb * 1024;
    // MemTotal is RAM minus what the kernel reserves for itself (image, page structs, ~1-3%).
    assert!(
        total <= memory && total >= memory - memory / 10 - 32 * MIB,
        "{name}: MemTotal {total} bytes does not match {memory} bytes of guest RAM; console:\n{}",
        console
    );
    assert_eq!(
        s.rc,
        Some(0),
        "{name}: p2pvmm exit status after poweroff; console:\n{}",
        console
    );
}

#[test]
fn l2_boots_with_one_vcpu() {
    assert_boots("one-cpu", 1, 512 * MIB);
}

#[test]
fn the_bzimage_kernel_is_decompressed_by_p2pvmm_and_the_start_is_timed() {
    let (s, console) = scenario("one-cpu");
    assert!(
        s.output.contains("xz payload of") && s.output.contains("KiB decompressed to"),
        "one-cpu: no host decompression logged; console:\n{}",
        console
    );
    for phase in [
        "config", "kvm", "memory", "kernel", "devices", "acpi", "vcpus",
    ] {
        assert!(
            s.output.contains(&format!("start phase {phase}: ")),
            "one-cpu: start phase {phase} not logged; console:\n{}",
            console
        );
    }
    assert!(
        s.output.contains("start phase first vCPU entry: "),
        "one-cpu: first vCPU entry not logged; console:\n{}",
        console
    );
}

#[test]
fn a_later_start_reads_the_decompressed_kernel_from_the_cache() {
    // one-cpu ran first in this L1 and stored it.
    let (s, console) = scenario("two-cpus");
    assert!(
        s.output.contains("read from the kernel cache")
            && !s.output.contains("KiB decompressed to"),
        "two-cpus: the kernel cache was not used; console:\n{}",
        console
    );
}

#[test]
fn l2_boots_from_a_bzimage_that_decompresses_itself() {
    assert_boots("guest-decompress", 1, 512 * MIB);
    let (s, console) = scenario("guest-decompress");
    assert!(
        !s.output.contains("KiB decompressed to"),
        "guest-decompress: p2pvmm decompressed the kernel anyway; console:\n{}",
        console
    );
}

#[test]
fn l2_boots_with_two_vcpus() {
    assert_boots("two-cpus", 2, 768 * MIB);
}

#[test]
fn l2_ram_spans_the_32bit_hole() {
    // 3.5 GiB: 3 GiB below the MMIO hole, 512 MiB above 4 GiB. A MemTotal near 3.5 GiB shows
    // the guest found and used the RAM above 4 GiB.
    assert_boots("above-4g", 1, 3584 * MIB);
}

#[test]
fn l2_boots_from_an_elf_vmlinux() {
    assert_boots("elf", 1, 512 * MIB);
}

#[test]
fn l2_reboot_ends_p2pvmm_with_status_3() {
    let (s, console) = scenario("reboot");
    assert!(
        s.l2_report().is_some(),
        "reboot: L2 never reported; console:\n{}",
        console
    );
    assert_eq!(s.rc, Some(3), "reboot: exit status; console:\n{}", console);
}

#[test]
fn sigterm_stops_the_vm_in_order_with_status_143() {
    let (s, console) = scenario("sigterm");
    assert!(
        s.output.contains("L2-HOLDING") && s.output.contains("L1: sending SIGTERM"),
        "sigterm: L2 never got to hold; console:\n{}",
        console
    );
    assert!(
        s.output.contains("p2pvmm: stopped by SIGTERM"),
        "sigterm: no orderly stop; console:\n{}",
        console
    );
    s.assert_exit(console, 128 + 15);
}

#[test]
fn bad_kernel_path_fails_with_a_clear_error() {
    let (s, console) = scenario("bad-kernel");
    assert_eq!(
        s.rc,
        Some(1),
        "bad-kernel: exit status; console:\n{}",
        console
    );
    assert!(
        s.output
            .contains("p2pvmm: error: kernel \"/nonexistent/bzImage\": No such file or directory"),
        "bad-kernel: error message; console:\n{}",
        console
    );
}
