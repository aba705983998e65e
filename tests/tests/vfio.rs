//! VFIO passthrough in the nested lab: L1 binds its emulated edu (DMA engine) and ivshmem to
//! vfio-pci, p2pvmm passes both to L2 on each IOMMU backend, and inside L2 `edu-dma` drives edu
//! from userspace: DMA RAM -> edu -> RAM with MSI completion interrupts, or with INTx through
//! the `_PRT` route and the IOAPIC (`p2pvmm.edu=intx` on L2's command line). L2's sysfs shows
//! where each device sits (root bus, its own root port, or a switch's downstream port).

use std::sync::OnceLock;

use p2pvmm_tests::{
    edu_dma_static, expect_scenario, run_retrying_lab_failure, Console, L1Run, Scenario, L2_CMDLINE,
};

/// p2pvmm's knob that delays the guest RAM mapping (`device_manager/ram_map.rs`).
const RAM_MAP_DELAY: &str = "P2PVMM_X_RAM_MAP_DELAY_MS";

const L2: &str = "--kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz --memory 512M --cpus 1";

/// Binds edu and ivshmem to vfio-pci (`bind_vfio` comes with every L1 script).
const BIND: &str = r#"
EDU=$(bind_vfio 1234 11e8)
SHM=$(bind_vfio 1af4 1110)
echo "L1: edu=$EDU ivshmem=$SHM"
# huge-pool.sh N CMD...: sizes L1's 2M huge page pool to N pages, then runs CMD.
cat > /tmp/huge-pool.sh <<'EOF'
pool=/sys/kernel/mm/hugepages/hugepages-2048kB
echo "$1" > $pool/nr_hugepages
echo "L1-HUGE pool=$(cat $pool/nr_hugepages) free=$(cat $pool/free_hugepages)"
shift
exec "$@"
EOF
"#;

/// L2: lists its PCI functions with their sysfs paths, then drives edu (with INTx if the
/// command line asks).
const L2_SCRIPT: &str = r#"
for d in /sys/bus/pci/devices/*; do
    echo "L2-PCI $(cat "$d/vendor"):$(cat "$d/device") class=$(cat "$d/class") $(readlink -f "$d")"
done
mode=
grep -q 'p2pvmm\.edu=intx' /proc/cmdline && mode=--intx
/usr/bin/edu-dma --rounds 2 $mode 2>&1
"#;

fn run_lab() -> Result<Console, String> {
    let edu_dma = edu_dma_static()?;
    let vmm = |backend: &str, edu: &str, shm: &str| {
        format!(
            "p2pvmm {L2} --cmdline '{L2_CMDLINE}' \
             --device path=$EDU,id=edu,backend={backend},{edu} \
             --device path=$SHM,id=shm,backend={backend},{shm}"
        )
    };
    let huge = |pages: u32, backend: &str| {
        format!(
            "sh /tmp/huge-pool.sh {pages} p2pvmm -v --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz --cpus 1 \
             --memory size=512M,hugepages=on,hugepage_size=2M --cmdline '{L2_CMDLINE}' \
             --device path=$EDU,id=edu,backend={backend}"
        )
    };
    L1Run::new("vfio")
        .prelude(BIND)
        .l2_file(edu_dma, "/usr/bin/edu-dma")
        .l2_script(L2_SCRIPT)
        .scenario(
            "iommufd",
            300,
            &vmm("iommufd", "placement=root-port", "switch=sw0"),
        )
        .scenario(
            "legacy",
            300,
            &vmm("legacy", "switch=sw0", "placement=root"),
        )
        .scenario(
            "intx",
            300,
            // edu behind the switch's second downstream port, so its INTA is swizzled; -v logs
            // the GSI p2pvmm wires.
            &format!(
                "p2pvmm -v {L2} --cmdline '{L2_CMDLINE} p2pvmm.edu=intx' \
                 --device path=$SHM,id=shm,backend=iommufd,switch=sw0 \
                 --device path=$EDU,id=edu,backend=iommufd,switch=sw0"
            ),
        )
        // Guest RAM in 2M huge pages (a hugetlb memfd) on each backend: edu's DMA into L2's RAM
        // goes through the IOMMU mapping of those pages. Then a pool too small for the VM.
        .scenario("hugepages-iommufd", 300, &huge(300, "iommufd"))
        .scenario("hugepages-legacy", 300, &huge(300, "legacy"))
        .scenario("hugepages-too-few", 60, &huge(16, "iommufd"))
        // Guest RAM mapped 15 s late (type1, the slow backend): L2's init enables edu's bus
        // mastering while the mapping has not even begun, and that write must wait for it.
        .scenario(
            "early-dma",
            300,
            &format!(
                "env {RAM_MAP_DELAY}=15000 p2pvmm -v {L2} --cmdline '{L2_CMDLINE}' \
                 --device path=$EDU,id=edu,backend=legacy"
            ),
        )
        .scenario(
            "no-such-device",
            60,
            &format!("p2pvmm {L2} --device path=0000:00:1f.7,id=ghost"),
        )
        .scenario(
            "not-vfio-bound",
            60,
            &format!("p2pvmm {L2} --device path=0000:00:1f.3,id=smbus"),
        )
        .run()
}

fn lab() -> &'static Result<Console, String> {
    static LAB: OnceLock<Result<Console, String>> = OnceLock::new();
    LAB.get_or_init(|| {
        run_retrying_lab_failure(
            &[
                "iommufd",
                "legacy",
                "intx",
                "hugepages-iommufd",
                "hugepages-legacy",
                "early-dma",
            ],
            run_lab,
        )
    })
}

fn scenario(name: &str) -> (Scenario, &'static Console) {
    expect_scenario(lab(), name)
}

/// The sysfs path of the L2 function with `ids` (e.g. "0x1234:0x11e8").
fn l2_path<'a>(s: &'a Scenario, ids: &str) -> Option<&'a str> {
    s.output
        .lines()
        .filter_map(|l| l.split_once("L2-PCI ").map(|(_, r)| r))
        .find(|r| r.starts_with(ids))
        .and_then(|r| r.split_whitespace().last())
}

/// Number of PCI functions between the root complex and the device in a sysfs path such as
/// /sys/devices/pci0000:00/0000:00:02.0/0000:01:00.0 (here 1: one root port).
fn bridges_above(path: &str) -> usize {
    path.split('/')
        .skip_while(|c| !c.starts_with("pci0000:"))
        .skip(1)
        .count()
        .saturating_sub(1)
}

const EDU: &str = "0x1234:0x11e8";
const IVSHMEM: &str = "0x1af4:0x1110";

/// edu works in L2: its DMA round trips are byte-exact and each completion raised an
/// interrupt, counted as `counter` (`msi` or `intx`).
fn assert_edu_dma(name: &str, counter: &str) {
    let (s, console) = scenario(name);
    let result = s.expect_result(console, "", "EDU-DMA: ", "edu-dma");
    assert!(
        result.starts_with("ok ") && result.contains("wrong=0"),
        "{name}: {result}; console:\n{}",
        console
    );
    let key = format!("{counter}=");
    let irqs: u32 = result
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key.as_str()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        irqs >= 2,
        "{name}: {counter}={irqs} for 2 rounds; console:\n{}",
        console
    );
    s.assert_exit(console, 0);
}

fn assert_placement(name: &str, ids: &str, bridges: usize) {
    let (s, console) = scenario(name);
    let Some(path) = l2_path(&s, ids) else {
        panic!("{name}: L2 does not see {ids}; console:\n{}", console);
    };
    assert_eq!(
        bridges_above(path),
        bridges,
        "{name}: {ids} at {path}; console:\n{}",
        console
    );
}

#[test]
fn iommufd_edu_dma_with_msi() {
    assert_edu_dma("iommufd", "msi");
}

#[test]
fn legacy_edu_dma_with_msi() {
    assert_edu_dma("legacy", "msi");
}

#[test]
fn iommufd_edu_dma_with_intx() {
    assert_edu_dma("intx", "intx");
}

#[test]
fn intx_arrives_on_the_swizzled_ioapic_pin_level_triggered() {
    // The switch takes root port 00:01.0; edu sits behind downstream port 1, so its INTA
    // reaches the root port as INTB: GSI 16 + (1 + 1) % 8. "fasteoi" is Linux's flow for a
    // level-triggered IOAPIC input.
    let (s, console) = scenario("intx");
    assert!(
        s.output.contains("edu: INTx on GSI 18"),
        "p2pvmm wired edu's INTx elsewhere; console:\n{}",
        console
    );
    let line = s
        .output
        .lines()
        .find_map(|l| l.split_once("edu-dma: /proc/interrupts: ").map(|(_, r)| r))
        .unwrap_or_default();
    assert!(
        line.contains("IO-APIC 18-fasteoi"),
        "L2's edu interrupt: {line:?}; console:\n{}",
        console
    );
    assert_placement("intx", EDU, 3);
}

#[test]
fn a_dma_as_early_as_the_guest_can_start_one_waits_for_guest_ram_to_be_mapped() {
    let (s, console) = scenario("early-dma");
    let at = |needle: &str| {
        s.output.find(needle).unwrap_or_else(|| {
            panic!("early-dma: no {needle:?} in p2pvmm's log; console:\n{console}")
        })
    };
    let held = at("edu: bus mastering held until guest RAM is mapped for DMA");
    let mapped = at("guest RAM mapped for DMA in every domain");
    let released = at("edu: bus mastering released after");
    assert!(
        held < mapped && mapped < released,
        "early-dma: bus mastering was not held until the mapping ended; console:\n{console}"
    );
    assert_edu_dma("early-dma", "msi");
}

#[test]
fn placement_root_port() {
    assert_placement("iommufd", EDU, 1);
}

#[test]
fn placement_switch_downstream_port() {
    // Root port, switch upstream port, switch downstream port.
    assert_placement("iommufd", IVSHMEM, 3);
    assert_placement("legacy", EDU, 3);
}

#[test]
fn placement_root_bus() {
    assert_placement("legacy", IVSHMEM, 0);
}

fn assert_clean_failure(name: &str, needles: &[&str]) {
    let (s, console) = scenario(name);
    assert_eq!(s.rc, Some(1), "{name}: exit status; console:\n{}", console);
    let error = s
        .output
        .lines()
        .find(|l| l.contains("p2pvmm: error:"))
        .unwrap_or_default();
    for needle in needles {
        assert!(
            error.contains(needle),
            "{name}: error line {error:?} lacks {needle:?}; console:\n{}",
            console
        );
    }
}

#[test]
fn wrong_bdf_is_a_clear_error() {
    assert_clean_failure("no-such-device", &["0000:00:1f.7", "no such device"]);
}

#[test]
fn device_not_bound_to_vfio_pci_is_a_clear_error() {
    assert_clean_failure("not-vfio-bound", &["0000:00:1f.3", "vfio-pci"]);
}

#[test]
fn sysfs_path_depth_counts_bridges() {
    assert_eq!(bridges_above("/sys/devices/pci0000:00/0000:00:03.0"), 0);
    assert_eq!(
        bridges_above(
            "/sys/devices/pci0000:00/0000:00:02.0/0000:01:00.0/0000:02:00.0/0000:03:00.0"
        ),
        3
    );
}

/// Guest RAM in huge pages: p2pvmm says so, and edu's DMA through the IOMMU mapping of the
/// hugetlb memfd (by file on iommufd, pinned by address on type1) round-trips byte-exact.
fn assert_huge_page_ram(name: &str) {
    let (s, console) = scenario(name);
    assert!(
        s.output
            .contains("guest RAM: 0x20000000 bytes in 256 2M huge pages"),
        "{name}: p2pvmm did not back RAM with huge pages; console:\n{console}"
    );
    assert_edu_dma(name, "msi");
}

#[test]
fn iommufd_edu_dma_into_huge_page_ram() {
    assert_huge_page_ram("hugepages-iommufd");
}

#[test]
fn legacy_edu_dma_into_huge_page_ram() {
    assert_huge_page_ram("hugepages-legacy");
}

#[test]
fn too_few_huge_pages_fail_the_start_naming_the_pool() {
    let (s, console) = scenario("hugepages-too-few");
    s.assert_exit(console, 1);
    assert!(
        s.output
            .contains("needs 256 free 2M huge pages, the host has 16")
            && s.output.contains("hugepages-2048kB/nr_hugepages"),
        "hugepages-too-few: no error naming the pool; console:\n{console}"
    );
}
