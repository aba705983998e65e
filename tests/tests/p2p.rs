//! Peer-to-peer DMA and P2P groups in the nested lab, the reason p2pvmm exists.
//!
//! L1 has two edus (DMA engines) and two ivshmems (memory BARs: 64 MiB "shm" and 32 MiB "shm2");
//! edu2 and shm2 sit behind a conventional PCI bridge, so L1's kernel puts them in one IOMMU
//! group. On both backends:
//! - `groups`: group g0 = {edu, shm} behind one switch (the default topology), group g1 =
//!   {edu2, shm2} on root ports (iommufd) or on the root bus (legacy). Inside L2, edu DMAs into
//!   shm's BAR at its L2 address and back; after L2 moves the BAR inside its port's window the new
//!   address works and the old one does not; with memory decoding off the BAR is unreachable,
//!   after turning it on it works again; at the last 64 MiB slot below a 4 GiB boundary, past
//!   the bridges' windows, it is unreachable, and once the bridges forward up to that boundary
//!   it works. edu2 reaches shm2 (the second group is live) but not
//!   shm, and edu does not reach shm2: the bytes are not there when read back through the BAR.
//!   L2 sees each group's topology and the P2P clique capability set on edu (clique=5).
//! - `nogroup`: the same devices and no group: p2pvmm warns naming `--p2p-group`, edu's DMA to
//!   shm's BAR does not land, edu's DMA to L2 RAM works.
//! - `nodmabuf`: dmabuf export switched off (`P2PVMM_X_NO_DMABUF=1`, what a kernel without
//!   `CONFIG_VFIO_PCI_DMABUF` gives): g0 on iommufd loses P2P and its P2P table rows say why,
//!   g1 with `mode=legacy` gets a type1 container of its own and keeps P2P.
//! - each validation error of the group configuration fails p2pvmm at start with one line
//!   naming the group and the value (the host IOMMU group split uses edu2 and shm2).

use std::sync::OnceLock;

use p2pvmm_tests::{
    edu_dma_static, expect_scenario, run_retrying_lab_failure, Console, L1Run, Scenario, L2_CMDLINE,
};

const VMM: &str = "p2pvmm -v --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz --memory 512M";

/// The second edu and the 32 MiB ivshmem share a conventional PCI bridge: one IOMMU group.
const QEMU_ARGS: &[&str] = &[
    "-device",
    "pci-bridge,id=pb,chassis_nr=1,shpc=off",
    "-device",
    "edu,dma_mask=0xffffffffffffffff,bus=pb,addr=1",
    "-object",
    "memory-backend-ram,id=shm1,size=32M,share=on",
    "-device",
    "ivshmem-plain,memdev=shm1,bus=pb,addr=2",
];

const BIND: &str = r#"
EDU=$(bind_vfio 1234 11e8 1)
EDU2=$(bind_vfio 1234 11e8 2)
SHM=$(bind_vfio 1af4 1110 1)
SHM2=$(bind_vfio 1af4 1110 2)
# bind_vfio takes the functions in address order; the bridge's bus comes after the root bus.
echo "L1: edu=$EDU edu2=$EDU2 ivshmem=$SHM ivshmem2=$SHM2"
for d in $EDU $EDU2 $SHM $SHM2; do
    echo "L1-IOMMU-GROUP $d $(basename $(readlink /sys/bus/pci/devices/$d/iommu_group))"
done
"#;

/// L2: finds the devices by what they are (the 64 and 32 MiB BARs; the edu behind the same
/// switch or port as shm), then prints `P2P-...` facts and runs each step as `P2P-STEP name`
/// followed by edu-dma's result line.
const L2_SCRIPT: &str = r#"
mode=$(sed -n 's/.*lab\.mode=\([a-z]*\).*/\1/p' /proc/cmdline)
rb() { echo $(( $(od -An -tu1 -j "$2" -N1 "$1") )); }
# The clique id of the P2P vendor capability (ID 9, "P2P"), found by walking the list.
clique() {
    cfg=/sys/bus/pci/devices/$1/config p=$(rb "$cfg" 52) n=0
    while [ "$p" -ne 0 ] && [ $n -lt 48 ]; do
        if [ "$(rb "$cfg" "$p")" -eq 9 ] &&
            [ "$(od -An -c -j $((p + 3)) -N3 "$cfg" | tr -d ' ')" = "P2P" ]; then
            echo $(( $(rb "$cfg" $((p + 6))) >> 3 )); return
        fi
        p=$(rb "$cfg" $((p + 1))); n=$((n + 1))
    done
    echo none
}
size2() { set -- $(sed -n 3p /sys/bus/pci/devices/$1/resource); echo $(($2 - $1 + 1)); }
edus= shm= shm2=
for d in /sys/bus/pci/devices/*; do
    b=${d##*/}
    case "$(cat $d/vendor):$(cat $d/device)" in
    0x1234:0x11e8) edus="$edus $b" ;;
    0x1af4:0x1110) [ "$(size2 $b)" -eq $((64 << 20)) ] && shm=$b || shm2=$b ;;
    esac
done
port() { dirname "$(readlink -f /sys/bus/pci/devices/$1)"; }
edu= edu2=
for e in $edus; do
    if [ "$(dirname "$(port $e)")" = "$(dirname "$(port $shm)")" ] && [ "$mode" != nogroup ]; then
        edu=$e
    elif [ "$mode" != groups ] && [ -z "$edu" ]; then
        edu=$e
    else
        edu2=$e
    fi
done
for r in edu:$edu edu2:$edu2 shm:$shm shm2:$shm2; do
    [ -n "${r#*:}" ] && echo "P2P-TOPO ${r%%:*} $(readlink -f /sys/bus/pci/devices/${r#*:})"
done
echo "P2P-CLIQUE edu $(clique $edu)"
[ -n "$edu2" ] && echo "P2P-CLIQUE edu2 $(clique $edu2)"
cfg=/sys/bus/pci/devices/$shm/config
# Writes a little-endian dword into shm's config space.
wcfg() {
    v=$2
    printf "$(printf '\\%03o\\%03o\\%03o\\%03o' $((v & 255)) $(((v >> 8) & 255)) \
        $(((v >> 16) & 255)) $(((v >> 24) & 255)))" |
        dd of="$cfg" bs=1 seek="$1" count=4 conv=notrunc 2>/dev/null
}
step() { echo "P2P-STEP $1"; shift; /usr/bin/edu-dma --len 2048 "$@" 2>&1; }
step ram $edu
if [ "$mode" = groups ]; then
    step g1 $edu2 --peer-bar "$shm2:2" --peer-check "$shm2:2"
    step cross-g0-to-g1 $edu --peer-bar "$shm2:2" --peer-check "$shm2:2"
    old=$(sed -n 3p /sys/bus/pci/devices/$shm/resource | cut -d' ' -f1)
    step initial $edu --peer-bar "$shm:2"
    # The downstream port's prefetchable window, from its config space (as p2pvmm emulates it).
    pcfg=$(port $shm)/config
    rd() { echo $(( $(od -An -tu$2 -j $(($1)) -N$2 "$pcfg") )); }
    wstart=$(( (($(rd 0x24 2) & 0xfff0) << 16) | ($(rd 0x28 4) << 32) ))
    wend=$(( (($(rd 0x26 2) & 0xfff0) << 16) | 0xfffff | ($(rd 0x2c 4) << 32) ))
    new=$((old == wstart ? old + (64 << 20) : wstart))
    echo "P2P-WINDOW $(printf '0x%x 0x%x' $wstart $wend) BAR2 $old -> $(printf '0x%x' $new)"
    [ $((new + (64 << 20) - 1)) -le $((wend)) ] && echo "P2P-MOVE-INSIDE yes" || echo "P2P-MOVE-INSIDE no"
    wcfg 4 0
    wcfg 24 $((new & 0xffffffff))
    wcfg 28 $((new >> 32))
    wcfg 4 2
    step moved $edu --peer-dst "$new"
    step old-address $edu --peer-dst "$old"
    step cross-g1-to-g0 $edu2 --peer-dst "$new"
    wcfg 4 0
    step decode-off $edu --peer-dst "$new"
    wcfg 4 2
    step decode-on $edu --peer-dst "$new"
    # The last 64 MiB slot below a 4 GiB boundary: the low dword OR-ed with the size mask is all
    # ones, which must not be taken for the sizing pattern. It lies past the bridges' windows,
    # so a peer's DMA does not reach it there, as on hardware; once every bridge above shm
    # forwards up to the boundary, it does.
    edge=$(( (((new >> 32) + 1) << 32) - (64 << 20) ))
    echo "P2P-EDGE $(printf '0x%x' $edge)"
    wcfg 4 0
    wcfg 24 $((edge & 0xffffffff))
    wcfg 28 $((edge >> 32))
    wcfg 4 2
    step edge-outside $edu --peer-dst "$edge"
    limit=$((edge + (64 << 20) - 1))
    shmcfg=$cfg b=$(port $shm)
    while [ -e "$b/config" ]; do
        cfg=$b/config
        base=$(( $(od -An -tu2 -j $((0x24)) -N2 "$cfg") ))
        wcfg 36 $(( base | (((limit >> 16) & 0xfff0) << 16) ))
        wcfg 44 $((limit >> 32))
        echo "P2P-BRIDGE $b prefetchable limit $(printf '0x%x' $limit)"
        b=$(dirname "$b")
    done
    cfg=$shmcfg
    step edge-4g $edu --peer-dst "$edge"
elif [ "$mode" = nodmabuf ]; then
    step g0 $edu --peer-bar "$shm:2" --peer-check "$shm:2"
    step g1 $edu2 --peer-bar "$shm2:2" --peer-check "$shm2:2"
else
    step isolated $edu --peer-bar "$shm:2" --peer-check "$shm:2"
fi
"#;

fn devices(backend: &str) -> String {
    format!(
        "--device path=$EDU,id=edu,backend={backend},clique=5 \
         --device path=$SHM,id=shm,backend={backend} \
         --device path=$EDU2,id=edu2,backend={backend} \
         --device path=$SHM2,id=shm2,backend={backend}"
    )
}

fn run_lab() -> Result<Console, String> {
    let groups = |backend: &str, g1_topology: &str| {
        format!(
            "{VMM} --cmdline '{L2_CMDLINE} lab.mode=groups' {} \
             --p2p-group name=g0,devices=edu:shm \
             --p2p-group name=g1,devices=edu2:shm2,topology={g1_topology}",
            devices(backend)
        )
    };
    // edu2 and shm2 share a host IOMMU group: without a group they cannot be isolated, so
    // they stay out (bad-split-iommu-group shows p2pvmm refusing that).
    let nogroup = |backend: &str| {
        format!(
            "{VMM} --cmdline '{L2_CMDLINE} lab.mode=nogroup' \
             --device path=$EDU,id=edu,backend={backend} --device path=$SHM,id=shm,backend={backend}"
        )
    };
    // Each must fail before anything starts; no L2 boots.
    let bad = |groups: &str| format!("{VMM} {} {groups}", devices("iommufd"));
    // A kernel without dmabuf export, as p2pvmm sees it (the export switched off): g0 on
    // iommufd loses P2P with a warning, g1 asks for the legacy mechanism and keeps it.
    let nodmabuf = format!(
        "env P2PVMM_X_NO_DMABUF=1 {VMM} --cmdline '{L2_CMDLINE} lab.mode=nodmabuf' \
         --device path=$EDU,id=edu,backend=iommufd --device path=$SHM,id=shm,backend=iommufd \
         --device path=$EDU2,id=edu2 --device path=$SHM2,id=shm2 \
         --p2p-group name=g0,devices=edu:shm \
         --p2p-group name=g1,devices=edu2:shm2,mode=legacy,topology=root-ports"
    );
    let mut run = L1Run::new("p2p")
        .qemu_args(QEMU_ARGS)
        .prelude(BIND)
        .l2_file(edu_dma_static()?, "/usr/bin/edu-dma")
        .l2_script(L2_SCRIPT)
        .scenario("iommufd-groups", 500, &groups("iommufd", "root-ports"))
        .scenario("legacy-groups", 500, &groups("legacy", "flat"))
        .scenario("iommufd-nogroup", 300, &nogroup("iommufd"))
        .scenario("legacy-nogroup", 300, &nogroup("legacy"))
        .scenario("iommufd-nodmabuf", 300, &nodmabuf);
    for (name, groups) in BAD_GROUPS {
        run = run.scenario(name, 60, &bad(groups));
    }
    run.run()
}

/// Bad group configurations: scenario name, `--p2p-group` flags, words the error must name.
const BAD_GROUPS: [(&str, &str); 6] = [
    (
        "bad-unknown-device",
        "--p2p-group name=g0,devices=edu:nosuch",
    ),
    ("bad-repeated-device", "--p2p-group name=g0,devices=edu:edu"),
    (
        "bad-two-groups",
        "--p2p-group name=g0,devices=edu:shm --p2p-group name=g1,devices=shm",
    ),
    (
        "bad-split-iommu-group",
        "--p2p-group name=g0,devices=edu2 --p2p-group name=g1,devices=shm2",
    ),
    (
        "bad-mode",
        "--p2p-group name=g0,devices=edu:shm,mode=sideways",
    ),
    (
        "bad-topology",
        "--p2p-group name=g0,devices=edu:shm,topology=ring",
    ),
];

/// What each bad configuration's error line must name.
const BAD_WORDS: [&[&str]; 6] = [
    &["g0", "nosuch"],
    &["g0", "edu"],
    &["shm", "g0", "g1"],
    &["edu2", "shm2"],
    &["sideways"],
    &["ring"],
];

fn lab() -> &'static Result<Console, String> {
    static LAB: OnceLock<Result<Console, String>> = OnceLock::new();
    LAB.get_or_init(|| {
        run_retrying_lab_failure(
            &[
                "iommufd-groups",
                "legacy-groups",
                "iommufd-nogroup",
                "legacy-nogroup",
                "iommufd-nodmabuf",
            ],
            run_lab,
        )
    })
}

fn scenario(name: &str) -> (Scenario, &'static Console) {
    expect_scenario(lab(), name)
}

fn assert_steps(s: &Scenario, console: &Console, expect: &[(&str, bool)]) {
    for &(step, works) in expect {
        assert_eq!(
            s.edu_dma_works(console, &format!("P2P-STEP {step}")),
            works,
            "{}: step {step} should {}work; console:\n{}",
            s.name,
            if works { "" } else { "not " },
            console
        );
    }
}

/// The sysfs path L2 printed for `role` (`P2P-TOPO role path`).
fn topology<'a>(s: &'a Scenario, console: &Console, role: &str) -> &'a str {
    s.expect_result(console, "", &format!("P2P-TOPO {role} "), "the L2 script")
}

/// How many PCI functions (bridges and the device itself) the path runs through below the root.
fn depth(path: &str) -> usize {
    path.split('/')
        .skip_while(|c| !c.starts_with("pci0000:"))
        .skip(1)
        .count()
}

fn assert_groups(name: &str, g1_depth: usize) {
    let (s, console) = scenario(name);
    assert_steps(
        &s,
        console,
        &[
            ("ram", true),
            ("g1", true),
            ("cross-g0-to-g1", false),
            ("initial", true),
            ("moved", true),
            ("old-address", false),
            ("cross-g1-to-g0", false),
            ("decode-off", false),
            ("decode-on", true),
            ("edge-outside", false),
            ("edge-4g", true),
        ],
    );
    assert!(
        s.peer_bytes_present(console, "P2P-STEP g1"),
        "{name}: {console:?}"
    );
    assert!(
        !s.peer_bytes_present(console, "P2P-STEP cross-g0-to-g1"),
        "{name}: edu's bytes reached the other group's BAR; console:\n{}",
        console
    );
    let inside = s.expect_result(console, "", "P2P-MOVE-INSIDE ", "the L2 script");
    assert_eq!(inside, "yes", "{name}: the move left the port window");
    // g0 is a switch: root port, upstream port, downstream port, device.
    for role in ["edu", "shm"] {
        assert_eq!(depth(topology(&s, console, role)), 4, "{name}: {role}");
    }
    let parent = |p: &str| p.rsplitn(3, '/').nth(2).map(str::to_owned);
    assert_eq!(
        parent(topology(&s, console, "edu")),
        parent(topology(&s, console, "shm")),
        "{name}: edu and shm are not behind one switch"
    );
    for role in ["edu2", "shm2"] {
        assert_eq!(
            depth(topology(&s, console, role)),
            g1_depth,
            "{name}: {role}"
        );
    }
    assert_eq!(s.result_after("", "P2P-CLIQUE edu "), Some("5"), "{name}");
    assert_eq!(
        s.result_after("", "P2P-CLIQUE edu2 "),
        Some("none"),
        "{name}"
    );
    // The P2P table p2pvmm logs shows shm's BAR mapped in g0.
    assert!(
        s.output
            .lines()
            .any(|l| l.contains("g0") && l.contains("shm") && l.contains("mapped")),
        "{name}: no P2P table row for shm; console:\n{}",
        console
    );
    s.assert_exit(console, 0);
}

fn assert_nogroup(name: &str) {
    let (s, console) = scenario(name);
    assert!(
        s.output.contains("--p2p-group"),
        "{name}: no warning naming --p2p-group; console:\n{}",
        console
    );
    assert_steps(&s, console, &[("ram", true), ("isolated", false)]);
    assert!(
        !s.peer_bytes_present(console, "P2P-STEP isolated"),
        "{name}: an ungrouped device's bytes reached another device's BAR"
    );
    s.assert_exit(console, 0);
}

#[test]
fn iommufd_groups_isolate_and_follow_moves_inside_the_window() {
    assert_groups("iommufd-groups", 2);
}

#[test]
fn legacy_groups_isolate_and_follow_moves_inside_the_window() {
    assert_groups("legacy-groups", 1);
}

#[test]
fn iommufd_devices_without_a_group_reach_no_bar() {
    assert_nogroup("iommufd-nogroup");
}

#[test]
fn legacy_devices_without_a_group_reach_no_bar() {
    assert_nogroup("legacy-nogroup");
}

#[test]
fn without_dmabuf_export_iommufd_loses_p2p_and_a_legacy_group_keeps_it() {
    let (s, console) = scenario("iommufd-nodmabuf");
    assert_steps(&s, console, &[("ram", true), ("g0", false), ("g1", true)]);
    assert!(!s.peer_bytes_present(console, "P2P-STEP g0"));
    assert!(s.peer_bytes_present(console, "P2P-STEP g1"));
    assert!(
        s.output
            .lines()
            .any(|l| l.contains("g0") && l.contains("shm") && l.contains("dmabuf export disabled")),
        "iommufd-nodmabuf: the P2P table does not say why shm is unreachable; console:\n{}",
        console
    );
    s.assert_exit(console, 0);
}

#[test]
fn bad_group_configurations_fail_naming_the_problem() {
    for ((name, _), words) in BAD_GROUPS.iter().zip(BAD_WORDS) {
        let (s, console) = scenario(name);
        // 1: configuration error; 2: command-line usage error (a value clap itself rejects).
        assert!(
            matches!(s.rc, Some(1) | Some(2)),
            "{name}: exit status {:?}; console:\n{}",
            s.rc,
            console
        );
        let line = s
            .output
            .lines()
            .find(|l| l.contains("error"))
            .unwrap_or_else(|| panic!("{name}: no error line; console:\n{}", console));
        for word in words {
            assert!(line.contains(word), "{name}: {line:?} does not name {word}");
        }
    }
}
