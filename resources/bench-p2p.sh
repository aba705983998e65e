#!/usr/bin/env bash
# bench-p2p.sh - p2pvmm's own time to establish, move and tear down a peer BAR mapping, from
# 4 MiB to 64 GiB BARs, dmabuf (iommufd: VFIO dmabuf + IOMMU_IOAS_MAP_FILE) vs legacy (type1
# container: BAR mmap + VFIO_IOMMU_MAP_DMA by address), measured by p2pvmm itself (-vv) inside
# the L1 lab guest.
#
# Usage: resources/bench-p2p.sh [--runs N] [--sizes "4M 64M 1G 16G 64G"] [--moves N]
#                               [--topology flat|switch|root-ports] [--timeout SECS]
#                               [--update-readme-chart]
#   --runs N          p2pvmm boots per mechanism (default 3), interleaved dmabuf/legacy
#   --sizes LIST      ivshmem BAR2 sizes, M or G suffix (default "4M 64M 1G 16G 64G"); 1G and
#                     up are sparse files (a few pages of disk), the 64M one is the lab's own
#   --moves N         moves of each BAR per boot (default 8; 10 made the default run 19 min)
#   --topology T      the P2P group's topology (default flat: both devices on L2's root bus, so
#                     the BAR moves inside the 64-bit root window like firmware placed it);
#                     "switch" leaves p2pvmm's default
#   --timeout SECS    L1 wall-clock bound (default 3000)
#   --update-readme-chart  also copy the chart to resources/bench/p2p-bar-map.svg (the README's)
#
# One L1 holds one ivshmem per size (each its own IOMMU group) plus edu. Per boot, p2pvmm
# passes edu and all the ivshmems to L2 in one P2P group (--p2p-group name=g0,devices=edu:s1:..).
# In L2, a script takes each ivshmem in turn: turns its memory decoding on (establish: the P2P
# table's first map of BAR2), then moves BAR2 N times between its slot and a free one of the
# 64-bit window (decode off, low and high dwords, decode on; through sysfs config writes, as
# tests/tests/p2p.rs does); p2pvmm's shutdown unmaps them (teardown). Measured from p2pvmm's -vv lines: the P2P table's map/unmap
# times, and for a move the sum of the "config write ... applied N BAR change(s) in N us" lines
# of its writes (the VMM's whole time from the trapped write to the vCPU's re-entry).
# Prints each run, the medians, the ratio legacy/dmabuf and a check of dmabuf against the 1 ms
# target (tests/src/bin/p2p_chart.rs), and draws target/bench-p2p/p2p-bar-map.svg (log-log).
# L1 runs under `flock /tmp/p2pvmm-lab.lock` (P2PVMM_LAB_LOCK): one lab at a time.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
res=$repo/resources
log() { echo "bench-p2p: $*" >&2; }
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2; exit 2; }

runs=3 sizes="4M 64M 1G 16G 64G" moves=8 topology=flat timeout_s=3000 update_chart=0
while (($#)); do
    case $1 in
        --runs) runs=$2; shift 2 ;;
        --sizes) sizes=$2; shift 2 ;;
        --moves) moves=$2; shift 2 ;;
        --topology) topology=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        --update-readme-chart) update_chart=1; shift ;;
        *) usage ;;
    esac
done
[[ $runs =~ ^[1-9][0-9]*$ && $moves =~ ^[1-9][0-9]*$ && $timeout_s =~ ^[0-9]+$ ]] ||
    { log "--runs, --moves and --timeout take positive integers"; exit 2; }
[[ $topology =~ ^(flat|switch|root-ports)$ ]] || { log "--topology: flat, switch or root-ports"; exit 2; }

# shellcheck source=resources/bench-lib.sh
. "$res/bench-lib.sh"
bench_bar_sizes "$sizes"
((${#size_bytes[@]})) || usage
((size_bytes[-1] <= 64 << 30)) || { log "sizes: at most 64G (L1's 256 GiB 64-bit hole)"; exit 2; }

bench_prepare
log "building the chart program"
(cd "$repo" && cargo build -q --release -p p2pvmm-tests --bin p2p-chart)
chart=$repo/target/release/p2p-chart
"$p2pvmm" --help | grep -q -- --p2p-group ||
    log "warning: this p2pvmm has no --p2p-group; running without a group"

work=$repo/target/lab/bench-p2p
out=$repo/target/bench-p2p
rm -rf "$work" && mkdir -p "$work" "$out"

# One ivshmem per size: RAM-backed below 1 GiB, a sparse file from 1 GiB. The lab's own 64 MiB
# ivshmem (run-l1.sh) serves 64M.
qemu_args=(--qemu-arg -global --qemu-arg q35-pcihost.pci-hole64-size=256G)
n=0
for b in "${size_bytes[@]}"; do
    ((b == 64 << 20)) && continue
    n=$((n + 1))
    bench_ivshmem "bench$n" "$b" "$work/bar-$n.mem"
done
trap 'rm -f "$work"/bar-*.mem' EXIT

# L2 establishes, moves and leaves each BAR: resources/bench-p2p-l2.sh.
"$res/mkinitramfs.sh" l2 "$work/l2.cpio.gz" --add "$res/bench-p2p-l2.sh:/lab/l2.sh"

[[ $topology == switch ]] && group_opts= || group_opts=",topology=$topology"
cat >"$work/run.sh" <<SCRIPT
# lapic=notscdeadline: see README, "The nested lab".
cmdline="console=ttyS0 panic=-1 lapic=notscdeadline bench.moves=$moves"
sizes=" ${size_bytes[*]} "
bind() {
    d=/sys/bus/pci/devices/\$1
    echo vfio-pci > \$d/driver_override
    [ -e \$d/driver ] && echo \$1 > \$d/driver/unbind
    echo \$1 > /sys/bus/pci/drivers_probe
}
edu= shm_ids= shm_n=0 devs=
for d in /sys/bus/pci/devices/*; do
    bdf=\${d##*/}
    case "\$(cat \$d/vendor):\$(cat \$d/device)" in
    0x1234:0x11e8) [ -n "\$edu" ] && continue; edu=\$bdf ;;
    0x1af4:0x1110)
        set -- \$(sed -n 3p \$d/resource)
        case "\$sizes" in *" \$((\$2 - \$1 + 1)) "*) ;; *) continue ;; esac
        shm_n=\$((shm_n + 1))
        shm_ids="\$shm_ids:shm\$shm_n"
        devs="\$devs \$bdf:shm\$shm_n" ;;
    *) continue ;;
    esac
    bind \$bdf
    echo "BENCH-L1 vfio \$bdf group \$(basename \$(readlink \$d/iommu_group)) \$(sed -n 3p \$d/resource)"
done
[ -n "\$edu" ] && [ \$shm_n -gt 0 ] || { echo "BENCH-L1 error edu=\$edu, \$shm_n ivshmem(s)"; exit 1; }
group=
p2pvmm --help 2>&1 | grep -q -- --p2p-group &&
    group="--p2p-group name=g0,devices=edu\$shm_ids$group_opts"
i=1
while [ \$i -le $runs ]; do
    # Alternate which mechanism goes first, so drift in L1 spreads over both.
    [ \$((i % 2)) -eq 1 ] && order="dmabuf legacy" || order="legacy dmabuf"
    for mech in \$order; do
        [ \$mech = dmabuf ] && backend=iommufd || backend=legacy
        args="--device path=\$edu,id=edu,backend=\$backend"
        for d in \$devs; do args="\$args --device path=\${d%:*},id=\${d##*:},backend=\$backend"; done
        echo "BENCH-P2P-RUN \$mech \$i"
        # The P2P table report (info, from another thread once BAR changes settle) is left
        # out: written while L2 prints a marker, it split the marker line on the console.
        { P2PVMM_LOG=p2pvmm::device_manager::p2p_report=warn timeout 1500 p2pvmm -vv --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz \
            --memory 512M --cmdline "\$cmdline" \$args \$group </dev/null 2>&1
          echo "BENCH-P2P-RC \$?"; } |
            grep -E 'BENCH-|: mapped at IOVA|: unmapped from IOVA|config write at|KVM memory slot|P2PVMM-L2|ERROR|WARN|error|panic'
    done
    i=\$((i + 1))
done
SCRIPT

bench_l1_image
log "booting L1: $runs runs x 2 mechanisms, ${#size_bytes[@]} BAR sizes per boot, $moves moves each"
bench_run_l1 "$work/console.txt" --mem 4096 --timeout "$timeout_s" "${qemu_args[@]}"
cp "$work/console.txt" "$out/console.txt"
"$chart" "$work/console.txt" --svg "$out/p2p-bar-map.svg" | tee "$out/results.txt"
if ((update_chart)); then
    mkdir -p "$res/bench"
    cp "$out/p2p-bar-map.svg" "$res/bench/p2p-bar-map.svg"
    log "chart copied to resources/bench/p2p-bar-map.svg"
fi
