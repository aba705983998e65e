//! Host faults under P2P with the real kernel (issue 8 item 5): a BAR the host IOMMU cannot
//! reach, an IOMMU map the kernel fails, an ENOMEM from the kernel on the IOMMU and on the KVM
//! path, a dmabuf VFIO revokes. Each must leave p2pvmm and L2 running, with a warning naming the
//! device and the P2P table (read through the API at each step) saying why; once the cause is
//! gone the mapping comes back and edu's DMA into the BAR lands again.
//!
//! One L1 (edu, the 64 MiB ivshmem, nvme); on each backend (iommufd, then legacy type1) one
//! p2pvmm with edu, shm and nvme in group g0 on the root bus and a 512 GiB 64-bit window (`--mmio64-size 512G`: [256 GiB, 768 GiB), its
//! upper half beyond L1's 39-bit VT-d). L2's script asks L1 for what it needs by printing lines
//! on its console, which `/tmp/fault-run.sh` in L1 watches: `FAULT-TABLE step` (L1 prints the
//! API's P2P table as `FAULT-ROW step: ...`), `FAULT-ARM kind function` (L1 arms the kernel's
//! fault injection for p2pvmm's threads: the first slab or page allocation made below `function`
//! fails, nothing else), `FAULT-DISARM`. Steps:
//! - `unreachable`: L2 moves shm's BAR to 2^39: the table says `failed: beyond the host IOMMU's
//!   reach (max IOVA 0x7fffffffff)` and edu's DMA there does not land; moved back, it does.
//! - `map-enomem`: failslab below the backend's map handler while L2 turns decoding back on (see
//!   [`BACKENDS`]): `IOMMU_IOAS_MAP_FILE` / `VFIO_IOMMU_MAP_DMA` fails with ENOMEM, the row says
//!   so, DMA does not land; the next decode toggle maps it again.
//! - `pt-enomem`: fail_page_alloc below `iommu_map` while L2 moves the BAR to a fresh GiB, where
//!   the IOMMU needs new page-table pages (`iommu_alloc_pages_node_sz`): the map fails, and the
//!   next toggle maps.
//! - `kvm-enomem`: failslab below KVM's memory-slot ioctl while L2 turns decoding on: the BAR's
//!   KVM slot cannot be created, p2pvmm rolls the command register back with a warning naming
//!   the device, the row says `decode off`; the next toggle works.
//! - `kvm-delete-enomem`: the same while L2 turns decoding off: KVM cannot delete the BAR's
//!   slot, p2pvmm keeps the BAR where it was and refuses the change (decoding reads back on). The
//!   decode-off had reached VFIO, which revoked shm's dmabuf: on iommufd the row says `revoked`
//!   and DMA does not land, on type1 (by address) the mapping survives; the next toggle maps.
//! - `nvme-d3`: L2 puts L1's nvme (in g0 too; edu DMAs into its 16 MiB controller memory buffer,
//!   BAR2) into D3hot through its power management capability: VFIO revokes nvme's dmabufs, its
//!   rows say `revoked` with a warning naming it, edu's DMA there does not land; back in D0 it is
//!   mapped again and the DMA lands.
//!
//! L2 finishes its script and powers off: p2pvmm exits 0.

use std::sync::OnceLock;

use p2pvmm_tests::{
    edu_dma_static, expect_scenario, run_retrying_lab_failure, Console, L1Run, Scenario,
    BIND_EDU_AND_IVSHMEM, L2_CMDLINE,
};

/// L1: debugfs for the fault-injection knobs, and the runner that answers L2's requests.
const PRELUDE: &str = r#"
mount -t debugfs debugfs /sys/kernel/debug
echo 0 > /proc/sys/kernel/kptr_restrict 2>/dev/null
cat > /tmp/fault-run.sh <<'EOF'
# Runs p2pvmm (the arguments) in the background and answers its L2's console requests; each
# answer ends with a line "ok" on p2pvmm's stdin (a FIFO), which L2 reads from its console.
out=/tmp/fault-run.out
rm -f /tmp/fault-in
mkfifo /tmp/fault-in
exec 3<>/tmp/fault-in
"$@" <&3 >"$out" 2>&1 &
vmm=$!
sock=/tmp/faults.sock
# The address range of kernel function $1 (to its next symbol), for the stacktrace filter.
sym_range() {
    sort /proc/kallsyms | awk -v f="$1" '
        $3 == f && !s { s = $1; next }
        s && $1 != s { print "0x" s, "0x" $1; exit }'
}
fault_dir() { case $1 in slab) echo /sys/kernel/debug/failslab ;; *) echo /sys/kernel/debug/fail_page_alloc ;; esac; }
# slab:N: the first N slab allocations below the function fail. page: every page allocation
# below it fails until disarmed (the first ones are opportunistic, __GFP_NOWARN with a fallback).
arm() {
    kind=${1%%:*}
    times=${1#*:}
    [ "$times" = "$1" ] && times=-1
    d=$(fault_dir $kind)
    shift
    range=
    for f in "$@"; do range=$(sym_range $f); [ -n "$range" ] && break; done
    [ -n "$range" ] || { echo "FAULT-L1: none of $* in kallsyms"; return; }
    set -- $range
    echo "FAULT-L1: arming $d below $f [$1, $2)"
    echo $1 > $d/require-start; echo $2 > $d/require-end
    echo 32 > $d/stacktrace-depth
    echo N > $d/ignore-gfp-wait
    [ -e $d/min-order ] && echo 0 > $d/min-order
    [ -e $d/ignore-gfp-highmem ] && echo N > $d/ignore-gfp-highmem
    echo 100 > $d/probability; echo 1 > $d/interval; echo 0 > $d/space; echo 2 > $d/verbose
    echo Y > $d/task-filter
    for t in /proc/$vmm/task/*; do echo 1 > $t/make-it-fail; done
    echo $times > $d/times
}
disarm() {
    for d in /sys/kernel/debug/failslab /sys/kernel/debug/fail_page_alloc; do
        echo "FAULT-L1: $d times left $(cat $d/times)"; echo 0 > $d/times
    done
    for t in /proc/$vmm/task/*; do echo 0 > $t/make-it-fail; done
    # The kernel's own record of each injected failure: the call chain that got the NULL.
    dmesg -c | grep -A40 'FAULT_INJECTION: forcing a failure' |
        grep -E 'FAULT_INJECTION|iommufd|iopt_|vfio|kvm_set|pt_iommu|intel|iommu_map|alloc_pages|kmalloc|kzalloc|name ' |
        head -n 40 | sed 's/^/FAULT-DMESG: /'
}
answer() {
    case $1 in
    FAULT-TABLE) /usr/bin/p2pvmm remote --api-socket $sock p2p 2>&1 | sed "s/^/FAULT-ROW $2: /" ;;
    FAULT-ARM) shift; arm "$@" ;;
    FAULT-DISARM) disarm ;;
    esac
    echo ok >&3
}
seen=0
show() {
    n=$(wc -l <"$out")
    [ "$n" -gt "$seen" ] || return 0
    sed -n "$((seen + 1)),${n}p" "$out" >/tmp/fault-run.new
    seen=$n
    while IFS= read -r line; do
        echo "$line"
        case $line in FAULT-TABLE\ *|FAULT-ARM\ *|FAULT-DISARM*) answer $(echo "$line" | tr -d '\r') ;; esac
    done </tmp/fault-run.new
}
dmesg -c >/dev/null
while kill -0 $vmm 2>/dev/null; do show; usleep 200000; done
wait $vmm
rc=$?
show
sed -n "$((seen + 1)),\$p" "$out"
exit $rc
EOF
"#;

/// L2: steps as in the module comment; `ask` prints a request and waits for L1's "ok" on the
/// console (L1 polls p2pvmm's output every 0.2 s).
const L2_SCRIPT: &str = r#"
# The kernel function below which the backend's BAR map allocates and how many of its slab
# allocations to fail (lab.map=N:FUNCTION).
map=$(sed -n 's/.*lab\.map=\([0-9]*:[a-z0-9_]*\).*/\1/p' /proc/cmdline)
edu=$(find_dev 0x1234:0x11e8)
shm=$(find_dev 0x1af4:0x1110)
cfg=/sys/bus/pci/devices/$shm/config
wcfg() {
    v=$2
    printf "$(printf '\\%03o\\%03o\\%03o\\%03o' $((v & 255)) $(((v >> 8) & 255)) \
        $(((v >> 16) & 255)) $(((v >> 24) & 255)))" |
        dd of="$cfg" bs=1 seek="$1" count=4 conv=notrunc 2>/dev/null
}
rcmd() { echo $(( $(od -An -tu2 -j 4 -N2 "$cfg") )); }
move() { wcfg 4 0; wcfg 24 $(($1 & 0xffffffff)); wcfg 28 $(($1 >> 32)); wcfg 4 2; }
step() { echo "FAULT-STEP $1"; shift; /usr/bin/edu-dma --len 2048 "$@" 2>&1; }
ask() { echo "FAULT-$*"; read -r -t 30 ack </dev/console || echo "FAULT-NO-ACK $*"; }
old=$(sed -n 3p /sys/bus/pci/devices/$shm/resource | cut -d' ' -f1)
echo "FAULT-BAR $old"
step initial $edu --peer-bar "$shm:2" --peer-check "$shm:2"
ask TABLE initial

far=$((1 << 39))
move $far
step unreachable $edu --peer-dst $far
ask TABLE unreachable
move $old
step reachable $edu --peer-dst $old
ask TABLE reachable

wcfg 4 0
ask ARM slab:${map%%:*} ${map#*:}
wcfg 4 2
step map-enomem $edu --peer-dst $old
ask TABLE map-enomem
ask DISARM
wcfg 4 0
wcfg 4 2
step map-enomem-recovered $edu --peer-dst $old
ask TABLE map-enomem-recovered

fresh=$((old + (1 << 30)))
wcfg 4 0
wcfg 24 $((fresh & 0xffffffff))
wcfg 28 $((fresh >> 32))
ask ARM page iommu_map
wcfg 4 2
step pt-enomem $edu --peer-dst $fresh
ask TABLE pt-enomem
ask DISARM
wcfg 4 0
wcfg 4 2
step pt-enomem-recovered $edu --peer-dst $fresh
ask TABLE pt-enomem-recovered

wcfg 4 0
ask ARM slab:1 kvm_set_memory_region
wcfg 4 2
echo "FAULT-COMMAND kvm-enomem $(rcmd)"
step kvm-enomem $edu --peer-dst $fresh
ask TABLE kvm-enomem
ask DISARM
wcfg 4 0
wcfg 4 2
echo "FAULT-COMMAND kvm-enomem-recovered $(rcmd)"
step kvm-enomem-recovered $edu --peer-dst $fresh
ask TABLE kvm-enomem-recovered

# Decode off while KVM cannot delete the BAR's memory slot (deleting allocates).
ask ARM slab:1 kvm_set_memory_region
wcfg 4 0
echo "FAULT-COMMAND kvm-delete-enomem $(rcmd)"
step kvm-delete-enomem $edu --peer-dst $fresh
ask TABLE kvm-delete-enomem
ask DISARM
wcfg 4 0
wcfg 4 2
step kvm-delete-recovered $edu --peer-dst $fresh
ask TABLE kvm-delete-recovered

# The revoked dmabuf: nvme's CMB (BAR2, memory edu can DMA into) while the guest puts nvme in
# D3hot through its power management capability; VFIO revokes the dmabuf.
rb() { echo $(( $(od -An -tu1 -j "$2" -N1 "$1") )); }
capoff() {
    c=/sys/bus/pci/devices/$1/config p=$(rb "$c" 52) n=0
    while [ "$p" -ne 0 ] && [ $n -lt 48 ]; do
        [ "$(rb "$c" "$p")" -eq "$2" ] && { echo $p; return; }
        p=$(rb "$c" $((p + 1))); n=$((n + 1))
    done
    echo 0
}
nv=$(find_dev 0x1b36:0x0010)
pm=$(capoff $nv 1)
echo "FAULT-PM $nv $pm"
cmb=$(sed -n 3p /sys/bus/pci/devices/$nv/resource | cut -d' ' -f1)
step nvme-d0 $edu --peer-bar "$nv:2" --peer-check "$nv:2"
ask TABLE nvme-d0
cfg=/sys/bus/pci/devices/$nv/config
wcfg $((pm + 4)) 3
echo "FAULT-PMCSR d3 $(( $(od -An -tu2 -j $((pm + 4)) -N2 "$cfg") ))"
step nvme-d3 $edu --peer-dst $cmb
ask TABLE nvme-d3
wcfg $((pm + 4)) 0
step nvme-d0-again $edu --peer-bar "$nv:2" --peer-check "$nv:2"
ask TABLE nvme-d0-again
echo "FAULT-DONE"
"#;

/// Scenario name, backend, and `N:FUNCTION`: fail the first N slab allocations below the kernel
/// function that handles the backend's BAR map. iommufd: `IOMMU_IOAS_MAP_FILE`'s handler, whose
/// first allocation is the area's `iopt_pages`. type1: the map path (`vfio_dma_do_map`) is inlined
/// into the container's ioctl handler, so the first ENOMEM goes to p2pvmm's range query
/// (`VFIO_IOMMU_GET_INFO`, which it tolerates: the kernel checks the range itself) and the second
/// to `VFIO_IOMMU_MAP_DMA`'s `vfio_dma`.
const BACKENDS: [(&str, &str, &str); 2] = [
    ("iommufd-faults", "iommufd", "1:iommufd_ioas_map_file"),
    ("legacy-faults", "legacy", "2:vfio_iommu_type1_ioctl"),
];

fn run_lab() -> Result<Console, String> {
    let vmm = |backend: &str, map: &str| {
        format!(
            "sh /tmp/fault-run.sh p2pvmm -v --api-socket /tmp/faults.sock \
             --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz --memory 512M \
             --cmdline '{L2_CMDLINE} lab.map={map}' --mmio64-size 512G \
             --device path=$EDU,id=edu,backend={backend} \
             --device path=$SHM,id=shm,backend={backend} \
             --device path=$NVME,id=nvme,backend={backend} \
             --p2p-group name=g0,devices=edu:shm:nvme,topology=flat"
        )
    };
    let mut run = L1Run::new("faults")
        .qemu_args(&["-device", "nvme,serial=p2pvmm,cmb_size_mb=16"])
        .prelude(BIND_EDU_AND_IVSHMEM)
        .prelude("NVME=$(bind_vfio 1b36 0010)\necho \"L1: nvme=$NVME\"")
        .prelude(PRELUDE)
        .l2_file(edu_dma_static()?, "/usr/bin/edu-dma")
        .l2_script(L2_SCRIPT)
        .timeout_s(600);
    for (name, backend, map) in BACKENDS {
        run = run.scenario(name, 240, &vmm(backend, map));
    }
    run.run()
}

fn lab() -> &'static Result<Console, String> {
    static LAB: OnceLock<Result<Console, String>> = OnceLock::new();
    LAB.get_or_init(|| run_retrying_lab_failure(&["iommufd-faults", "legacy-faults"], run_lab))
}

/// Each backend's scenario.
fn scenarios() -> impl Iterator<Item = (Scenario, &'static Console)> {
    BACKENDS
        .iter()
        .map(|(name, _, _)| expect_scenario(lab(), name))
}

/// The state column of shm's row in the table L1 fetched at `step`.
fn shm_state(s: &Scenario, console: &Console, step: &str) -> String {
    state_of(s, console, step, "shm", "2")
}

/// The state column of `device`'s row for BAR `bar` in the table L1 fetched at `step`.
fn state_of(s: &Scenario, console: &Console, step: &str, device: &str, bar: &str) -> String {
    let prefix = format!("FAULT-ROW {step}: ");
    let row = s
        .output
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .find(|l| {
            let mut cells = l.split_whitespace();
            cells.nth(1) == Some(device) && cells.nth(1) == Some(bar)
        })
        .unwrap_or_else(|| {
            panic!("no P2P table row of {device} BAR{bar} at step {step}; console:\n{console}")
        });
    // GROUP DEVICE HOST BAR SIZE GUEST MECH STATE...: the state is the rest after MECH.
    row.split_whitespace().skip(7).collect::<Vec<_>>().join(" ")
}

fn assert_dma(s: &Scenario, console: &Console, step: &str, lands: bool) {
    assert_eq!(
        s.edu_dma_works(console, &format!("FAULT-STEP {step}")),
        lands,
        "{}: step {step}: edu's DMA should {}land; console:\n{console}",
        s.name,
        if lands { "" } else { "not " }
    );
}

/// The first warning line holding every one of `words`.
fn warning<'a>(s: &'a Scenario, console: &Console, words: &[&str]) -> &'a str {
    s.output
        .lines()
        .find(|l| l.contains("WARN") && words.iter().all(|w| l.contains(w)))
        .unwrap_or_else(|| panic!("no warning naming {words:?}; console:\n{console}"))
}

/// The host address of shm in L1, as the prelude printed it.
fn shm_host(console: &Console) -> String {
    console
        .text
        .lines()
        .find_map(|l| l.strip_prefix("L1: edu=")?.split("ivshmem=").nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| panic!("L1 printed no ivshmem address; console:\n{console}"))
}

/// The host address of nvme in L1.
fn nvme_host(console: &Console) -> String {
    console
        .text
        .lines()
        .find_map(|l| l.strip_prefix("L1: nvme="))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| panic!("L1 printed no nvme address; console:\n{console}"))
}

#[test]
fn l2_keeps_running_through_every_fault_and_powers_off() {
    for (s, console) in scenarios() {
        assert!(
            s.output.contains("FAULT-DONE"),
            "L2 did not finish; console:\n{console}"
        );
        assert!(!s.output.contains("panicked"), "{console}");
        s.assert_exit(console, 0);
        assert_dma(&s, console, "initial", true);
        assert!(s.peer_bytes_present(console, "FAULT-STEP initial"));
        assert_eq!(shm_state(&s, console, "initial"), "mapped");
    }
}

#[test]
fn a_bar_beyond_the_host_iommu_is_reported_and_mapped_again_when_moved_back() {
    for (s, console) in scenarios() {
        assert_dma(&s, console, "unreachable", false);
        assert_eq!(
            shm_state(&s, console, "unreachable"),
            "failed: beyond the host IOMMU's reach (max IOVA 0x7fffffffff)"
        );
        let host = shm_host(console);
        warning(
            &s,
            console,
            &["shm", &host, "BAR2", "beyond the host IOMMU's reach"],
        );
        assert_dma(&s, console, "reachable", true);
        assert_eq!(shm_state(&s, console, "reachable"), "mapped");
    }
}

#[test]
fn an_enomem_from_the_iommu_map_is_reported_and_the_next_toggle_maps_again() {
    for (s, console) in scenarios() {
        // The kernel's record of the injected failure names the armed function in its trace.
        let armed = s
            .result_after(
                "FAULT-ARM slab",
                "FAULT-L1: arming /sys/kernel/debug/failslab below ",
            )
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("{}: L1 armed nothing; console:\n{console}", s.name))
            .to_owned();
        assert!(
            s.output
                .lines()
                .any(|l| l.starts_with("FAULT-DMESG: ") && l.contains(&armed)),
            "{}: the kernel injected no failure below {armed}; console:\n{console}",
            s.name
        );
        assert_dma(&s, console, "map-enomem", false);
        let enomem = "failed: IOMMU map: Cannot allocate memory (os error 12)";
        assert_eq!(shm_state(&s, console, "map-enomem"), enomem);
        let host = shm_host(console);
        warning(
            &s,
            console,
            &["shm", &host, "BAR2", "Cannot allocate memory"],
        );
        assert_dma(&s, console, "map-enomem-recovered", true);
        assert_eq!(shm_state(&s, console, "map-enomem-recovered"), "mapped");
    }
}

#[test]
fn a_failed_page_allocation_in_the_iommu_map_is_reported_and_recovers() {
    for (s, console) in scenarios() {
        let armed = s.output.find("FAULT-ARM page").unwrap_or(s.output.len());
        let injected = s.output[armed..]
            .lines()
            .take_while(|l| !l.starts_with("FAULT-STEP pt-enomem-recovered"))
            .any(|l| l.starts_with("FAULT-DMESG: ") && l.contains("fail_page_alloc"));
        assert!(
            injected,
            "no page allocation failure injected; console:\n{console}"
        );
        assert_dma(&s, console, "pt-enomem", false);
        assert_eq!(
            shm_state(&s, console, "pt-enomem"),
            "failed: IOMMU map: Cannot allocate memory (os error 12)"
        );
        assert_dma(&s, console, "pt-enomem-recovered", true);
        assert_eq!(shm_state(&s, console, "pt-enomem-recovered"), "mapped");
    }
}

#[test]
fn an_enomem_from_kvm_rolls_the_decode_change_back_with_a_warning_and_recovers() {
    for (s, console) in scenarios() {
        // The guest's decode-on did not take: memory decoding reads back off.
        let cmd: u16 = s
            .expect_result(console, "", "FAULT-COMMAND kvm-enomem ", "the L2 script")
            .parse()
            .unwrap_or(u16::MAX);
        assert_eq!(
            cmd & 2,
            0,
            "decode on took despite the failed KVM slot; console:\n{console}"
        );
        assert_eq!(shm_state(&s, console, "kvm-enomem"), "decode off");
        warning(
            &s,
            console,
            &["shm", "BAR 2", "rejected", "Cannot allocate memory"],
        );
        assert_dma(&s, console, "kvm-enomem", false);
        let cmd: u16 = s
            .expect_result(
                console,
                "",
                "FAULT-COMMAND kvm-enomem-recovered ",
                "the L2 script",
            )
            .parse()
            .unwrap_or(0);
        assert_eq!(cmd & 2, 2, "{console}");
        assert_dma(&s, console, "kvm-enomem-recovered", true);
        assert_eq!(shm_state(&s, console, "kvm-enomem-recovered"), "mapped");
    }
}

#[test]
fn a_dmabuf_revoked_by_d3hot_is_shown_revoked_and_mapped_again_in_d0() {
    for (s, console) in scenarios() {
        let pm = s.expect_result(console, "", "FAULT-PM ", "the L2 script");
        assert!(
            pm.split_whitespace().nth(1).is_some_and(|p| p != "0"),
            "L2 found no power management capability on nvme ({pm}); console:\n{console}"
        );
        assert_eq!(
            s.result_after("", "FAULT-PMCSR d3 ")
                .map(|v| v.parse::<u16>().map(|v| v & 3)),
            Some(Ok(3))
        );
        assert_dma(&s, console, "nvme-d0", true);
        assert!(
            s.peer_bytes_present(console, "FAULT-STEP nvme-d0"),
            "{console}"
        );
        assert_eq!(state_of(&s, console, "nvme-d0", "nvme", "2"), "mapped");
        assert_dma(&s, console, "nvme-d3", false);
        assert_eq!(state_of(&s, console, "nvme-d3", "nvme", "2"), "revoked");
        let host = nvme_host(console);
        warning(
            &s,
            console,
            &["nvme", &host, "left D0 (D3hot), VFIO revoked its BARs'"],
        );
        assert_dma(&s, console, "nvme-d0-again", true);
        assert!(
            s.peer_bytes_present(console, "FAULT-STEP nvme-d0-again"),
            "{console}"
        );
        assert_eq!(
            state_of(&s, console, "nvme-d0-again", "nvme", "2"),
            "mapped"
        );
    }
}

#[test]
fn a_decode_off_kvm_cannot_apply_is_refused_and_the_table_shows_what_vfio_revoked() {
    for (s, console) in scenarios() {
        let cmd: u16 = s
            .expect_result(
                console,
                "",
                "FAULT-COMMAND kvm-delete-enomem ",
                "the L2 script",
            )
            .parse()
            .unwrap_or(0);
        assert_eq!(
            cmd & 2,
            2,
            "{}: the decode-off took; console:\n{console}",
            s.name
        );
        warning(
            &s,
            console,
            &["shm", "-> none", "rejected", "Cannot allocate memory"],
        );
        let iommufd = s.name.starts_with("iommufd");
        let state = shm_state(&s, console, "kvm-delete-enomem");
        assert_eq!(
            state,
            if iommufd { "revoked" } else { "mapped" },
            "{}",
            s.name
        );
        assert_dma(&s, console, "kvm-delete-enomem", !iommufd);
        if iommufd {
            warning(
                &s,
                console,
                &["shm", "decode-off was refused after VFIO revoked"],
            );
        }
        assert_dma(&s, console, "kvm-delete-recovered", true);
        assert_eq!(shm_state(&s, console, "kvm-delete-recovered"), "mapped");
    }
}
