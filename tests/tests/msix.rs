//! MSI-X passthrough end to end in the nested lab: L1 gets QEMU's e1000e (82574L, five MSI-X
//! vectors; L1's kernel has no driver for it, and it needs no netdev) next to edu and ivshmem,
//! binds it to vfio-pci, and p2pvmm passes it to L2 on each IOMMU backend. Inside L2,
//! `msix-probe` enables MSI-X through VFIO with one eventfd per vector, routes the device's five
//! interrupt causes to vectors (IVAR) and raises them (ICS): every interrupt must arrive once,
//! on its own vector's eventfd, through p2pvmm's emulated MSI-X table, KVM GSI routes and
//! irqfds. Then a vector is masked in the table (L2's kernel does it when the vector's eventfd
//! is detached): its interrupt must be held, show in the vector's pending bit, and be delivered
//! once at unmask.

use std::sync::OnceLock;

use p2pvmm_tests::{
    expect_scenario, msix_probe_static, run_retrying_lab_failure, Console, L1Run, Scenario,
    L2_CMDLINE,
};

const VMM: &str = "p2pvmm --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz --memory 512M \
                   --cpus 1";

/// Binds L1's e1000e to vfio-pci and prints where it is.
const BIND: &str = r#"
NIC=$(bind_vfio 8086 10d3)
d=/sys/bus/pci/devices/$NIC
echo "L1: e1000e $NIC driver=$(basename "$(readlink "$d/driver")") group=$(basename "$(readlink "$d/iommu_group")")"
"#;

/// L2: where the NIC sits, then the probe.
const L2_SCRIPT: &str = r#"
for d in /sys/bus/pci/devices/*; do
    echo "L2-PCI $(cat "$d/vendor"):$(cat "$d/device") $(readlink -f "$d")"
done
/usr/bin/msix-probe 2>&1
"#;

fn run_lab() -> Result<Console, String> {
    let scenario = |backend: &str, placement: &str| {
        format!("{VMM} --cmdline '{L2_CMDLINE}' --device path=$NIC,id=nic,backend={backend},{placement}")
    };
    L1Run::new("msix")
        // No option ROM (QEMU's default is iPXE's): this test is about interrupts; expansion
        // ROMs are tests/rom.rs's subject.
        .qemu_args(&["-device", "e1000e"])
        .prelude(BIND)
        .l2_file(msix_probe_static()?, "/usr/bin/msix-probe")
        .l2_script(L2_SCRIPT)
        .scenario("iommufd", 300, &scenario("iommufd", "placement=root-port"))
        .scenario("legacy", 300, &scenario("legacy", "switch=sw0"))
        .run()
}

fn lab() -> &'static Result<Console, String> {
    static LAB: OnceLock<Result<Console, String>> = OnceLock::new();
    LAB.get_or_init(|| run_retrying_lab_failure(&["iommufd", "legacy"], run_lab))
}

fn scenario(name: &str) -> (Scenario, &'static Console) {
    expect_scenario(lab(), name)
}

/// `key=value` of msix-probe's result line.
fn field<'a>(result: &'a str, key: &str) -> Option<&'a str> {
    result
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// The probe's result line (after `MSIX-PROBE: `), checked to be a success, and the console.
fn probe_ok(name: &str) -> (String, &'static Console) {
    let (s, console) = scenario(name);
    let result = s
        .expect_result(console, "", "MSIX-PROBE: ", "msix-probe")
        .to_owned();
    assert!(
        result.starts_with("ok "),
        "{name}: {result}; console:\n{}",
        console
    );
    s.assert_exit(console, 0);
    (result, console)
}

/// All five vectors fired, each exactly once per round (two rounds, two different causes).
fn assert_vectors(name: &str) {
    let (result, console) = probe_ok(name);
    assert_eq!(
        field(&result, "vectors"),
        Some("5"),
        "{name}: {result}; console:\n{}",
        console
    );
    assert_eq!(
        field(&result, "fired"),
        Some("2,2,2,2,2"),
        "{name}: {result}; console:\n{}",
        console
    );
}

/// The vector masked in the MSI-X table held its interrupt, showed it in its pending bit and
/// delivered it at unmask. VFIO's own ACTION_MASK is either honoured or refused, never silently
/// ignored (the probe fails then).
fn assert_masking(name: &str) {
    let (result, console) = probe_ok(name);
    for key in ["table_mask", "pba"] {
        assert_eq!(
            field(&result, key),
            Some("ok"),
            "{name}: {key}: {result}; console:\n{}",
            console
        );
    }
    let vfio_mask = field(&result, "vfio_mask").unwrap_or_default();
    assert!(
        vfio_mask == "ok" || vfio_mask.starts_with("unsupported("),
        "{name}: {result}; console:\n{}",
        console
    );
}

#[test]
fn iommufd_msix_vectors_arrive_on_their_own_eventfds() {
    assert_vectors("iommufd");
}

#[test]
fn legacy_msix_vectors_arrive_on_their_own_eventfds() {
    assert_vectors("legacy");
}

#[test]
fn iommufd_masked_msix_vector_holds_its_interrupt() {
    assert_masking("iommufd");
}

#[test]
fn legacy_masked_msix_vector_holds_its_interrupt() {
    assert_masking("legacy");
}

#[test]
fn result_fields_parse() {
    let line = "ok vectors=5 fired=2,2,2,2,2 vfio_mask=unsupported(ENOTTY) table_mask=ok pba=ok";
    assert_eq!(field(line, "fired"), Some("2,2,2,2,2"));
    assert_eq!(field(line, "vfio_mask"), Some("unsupported(ENOTTY)"));
    assert_eq!(field(line, "table"), None);
}
