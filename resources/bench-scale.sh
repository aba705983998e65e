#!/usr/bin/env bash
# bench-scale.sh - how p2pvmm's cost grows with the work, inside the L1 lab guest:
#  1. scale: N passthrough ivshmem functions per BAR size (default 8 x 64 MiB and 8 x 8 GiB:
#     64 GiB of BARs, sparse files) plus edu in one P2P group: p2pvmm start to every peer BAR
#     mapped, the P2P table's map work, and the VMM's time for one guest BAR move, per BAR size
#     and mechanism (dmabuf = iommufd; legacy = type1, which maps by address and is O(size));
#  2. growth: start to L2 init, p2pvmm's start phases and the VMM's memory for 1, 2, 4, 8
#     devices (1 GiB guest) and for guest RAM of 1, 4, 8 GiB (2 devices).
#
# Usage: resources/bench-scale.sh [--count N] [--sizes "64M 8G"] [--moves N] [--legacy-moves N]
#                                 [--no-legacy] [--devices "1 2 4 8"] [--mems "1 4 8"]
#                                 [--runs N] [--timeout SECS]
#   --count N         ivshmem functions per BAR size (default 8, at most 8)
#   --sizes LIST      BAR sizes of the scale figure, M or G suffix (default "64M 8G"; 1G and up
#                     are sparse files); the smallest also serves the growth figure
#   --moves N         guest moves of each BAR per dmabuf boot (default 4)
#   --legacy-moves N  the same on legacy (default 1: an 8 GiB legacy map takes ~7 s in the lab)
#   --no-legacy       dmabuf only
#   --devices LIST    device counts of the growth figure (edu + N-1 ivshmems, 1 GiB guest)
#   --mems LIST       guest RAM sizes in GiB of the growth figure (edu + 1 ivshmem). Guest RAM
#                     is pinned for VFIO, so L1 gets the largest + 2 GiB; sizes the host's
#                     MemAvailable cannot hold (with 2 GiB to spare) are dropped with a message
#   --runs N          boots per growth configuration (default 2), interleaved
#   --timeout SECS    L1 wall-clock bound (default 3600)
#
# One L1 boot holds everything: edu and --count ivshmems per size (each its own IOMMU group;
# the lab's own 64 MiB one counts as one of 64M). Scale boots: p2pvmm -vv, 1 GiB guest, L2 runs
# resources/bench-p2p-l2.sh with bench.establish=all (decoding on for every function, then the
# moves through sysfs config writes). Growth boots: p2pvmm -v; L2's /lab/l2.sh prints
# "BENCH-L2 init" first thing (where the P2PVMM-L2 line would be) and idles; L1 times it from
# its /proc/uptime, waits for "guest RAM mapped for DMA", reads /proc/PID/status and
# smaps (the guest RAM memfd's resident pages apart from the rest), then stops p2pvmm with SIGTERM. resources/bench-scale-report.py reads the
# console: tables, medians, target/bench-scale/scale.svg. L1 runs under
# `flock /tmp/p2pvmm-lab.lock` (P2PVMM_LAB_LOCK): one lab at a time.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
res=$repo/resources
log() { echo "bench-scale: $*" >&2; }
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2; exit 2; }

count=8 sizes="64M 8G" moves=4 lmoves=1 legacy=1 devices="1 2 4 8" mems="1 4 8" runs=2
timeout_s=3600
while (($#)); do
    case $1 in
        --count) count=$2; shift 2 ;;
        --sizes) sizes=$2; shift 2 ;;
        --moves) moves=$2; shift 2 ;;
        --legacy-moves) lmoves=$2; shift 2 ;;
        --no-legacy) legacy=0; shift ;;
        --devices) devices=$2; shift 2 ;;
        --mems) mems=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        *) usage ;;
    esac
done
for v in "$count" "$moves" "$lmoves" "$runs" "$timeout_s" $devices $mems; do
    [[ $v =~ ^[1-9][0-9]*$ ]] || { log "'$v': counts, moves, runs, sizes in GiB take positive integers"; exit 2; }
done
((count <= 8)) || { log "--count: at most 8"; exit 2; }
for n in $devices; do ((n <= count + 1)) || { log "--devices: at most --count + 1 ($((count + 1)))"; exit 2; }; done

# shellcheck source=resources/bench-lib.sh
. "$res/bench-lib.sh"
bench_bar_sizes "$sizes"
((${#size_bytes[@]})) || usage
total=0
for b in "${size_bytes[@]}"; do total=$((total + count * b)); done
((total <= 128 << 30)) || { log "more than 128 GiB of BARs: L1's 64-bit hole is 256 GiB"; exit 2; }

# L1 RAM: the largest guest that fits in the host's available memory, + 2 GiB.
avail_mib=$(awk '/^MemAvailable:/ { print int($2 / 1024) }' /proc/meminfo)
kept=
for m in $(printf '%s\n' $mems | sort -n -u); do
    if ((m * 1024 + 2048 + 2048 <= avail_mib)); then
        kept="$kept $m"
    else
        log "guest RAM ${m} GiB dropped: L1 would need $((m * 1024 + 2048)) MiB, the host has ${avail_mib} MiB available"
    fi
done
mems=${kept# }
[[ -n $mems ]] || { log "no guest RAM size fits"; exit 1; }
max_mem=${mems##* }
l1_mem=$(((max_mem > 2 ? max_mem : 2) * 1024 + 2048))

bench_prepare

work=$repo/target/lab/bench-scale
out=$repo/target/bench-scale
rm -rf "$work" && mkdir -p "$work" "$out"

# --count ivshmems per size: RAM-backed below 1 GiB, a sparse file from 1 GiB on.
qemu_args=(--qemu-arg -global --qemu-arg q35-pcihost.pci-hole64-size=256G)
n=0
for b in "${size_bytes[@]}"; do
    for ((i = 1; i <= count; i++)); do
        ((b == 64 << 20 && i == 1)) && continue # the lab's own (run-l1.sh)
        n=$((n + 1))
        bench_ivshmem "scale$n" "$b" "$work/bar-$n.mem"
    done
done
trap 'rm -f "$work"/bar-*.mem' EXIT

# L2: bench.mode=idle reports init and idles; otherwise the P2P moves of bench-p2p.
cat >"$work/l2.sh" <<'L2'
if grep -q 'bench\.mode=idle' /proc/cmdline; then
    echo "BENCH-L2 init uptime_s=$(cut -d' ' -f1 /proc/uptime)"
    exec sleep 100000
fi
. /lab/p2p-l2.sh
L2
"$res/mkinitramfs.sh" l2 "$work/l2.cpio.gz" --add "$work/l2.sh:/lab/l2.sh" \
    --add "$res/bench-p2p-l2.sh:/lab/p2p-l2.sh"

mechs=dmabuf
((legacy)) && mechs="dmabuf legacy"
cat >"$work/run.sh" <<SCRIPT
cmdline="console=ttyS0 panic=-1 lapic=notscdeadline quiet"
l2="--kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz --cpus 2"
small=${size_bytes[0]}
bind() {
    d=/sys/bus/pci/devices/\$1
    echo vfio-pci > \$d/driver_override
    [ -e \$d/driver ] && echo \$1 > \$d/driver/unbind
    echo \$1 > /sys/bus/pci/drivers_probe
}
edu= shms=
for d in /sys/bus/pci/devices/*; do
    bdf=\${d##*/}
    case "\$(cat \$d/vendor):\$(cat \$d/device)" in
    0x1234:0x11e8) [ -n "\$edu" ] && continue; edu=\$bdf ;;
    0x1af4:0x1110) set -- \$(sed -n 3p \$d/resource); shms="\$shms \$bdf/\$((\$2 - \$1 + 1))" ;;
    *) continue ;;
    esac
    bind \$bdf
    echo "BENCH-L1 vfio \$bdf group \$(basename \$(readlink \$d/iommu_group)) \$(sed -n 3p \$d/resource)"
done
[ -n "\$edu" ] || { echo "BENCH-L1 error no edu"; exit 1; }
# mk BACKEND SIZE N: args and group for edu + the first N ivshmems with SIZE-byte BARs.
mk() {
    args="--device path=\$edu,id=edu,backend=\$1" ids=edu k=0
    for e in \$shms; do
        [ "\${e#*/}" = \$2 ] && [ \$k -lt \$3 ] || continue
        k=\$((k + 1))
        args="\$args --device path=\${e%/*},id=s\$k,backend=\$1" ids="\$ids:s\$k"
    done
    [ \$k = \$3 ] || echo "BENCH-L1 error only \$k ivshmems of \$2 bytes"
    group="--p2p-group name=g0,devices=\$ids,topology=flat"
}
# The P2P report (info, another thread) is left out: it split marker lines (bench-p2p.sh).
export P2PVMM_LOG=p2pvmm::device_manager::p2p_report=warn
for size in ${size_bytes[*]}; do
    for mech in $mechs; do
        [ \$mech = dmabuf ] && backend=iommufd mv=$moves || backend=legacy mv=$lmoves
        mk \$backend \$size $count
        echo "BENCH-SCALE-RUN \$mech \$size $count"
        { timeout 1500 p2pvmm -vv \$l2 --memory 1G \$args \$group \
            --cmdline "\$cmdline bench.moves=\$mv bench.establish=all" </dev/null 2>&1
          echo "BENCH-SCALE-RC \$?"; } |
            grep -E 'BENCH-|start phase|: mapped at IOVA|: unmapped from IOVA|config write at|P2PVMM-L2|ERROR|WARN|panic'
    done
done
# grow LABEL DEVICES GIB: one idle boot, timed from L1, memory read once guest RAM is mapped.
grow() {
    mk iommufd \$small \$((\$2 - 1))
    rm -f /tmp/o && mkfifo /tmp/o
    echo "BENCH-GROW-RUN \$1 devices=\$2 mem_gib=\$3"
    t0=\$(cut -d' ' -f1 /proc/uptime)
    p2pvmm -v \$l2 --memory \$3G \$args \$group --cmdline "\$cmdline bench.mode=idle" \
        </dev/null >/tmp/o 2>&1 &
    pid=\$!
    ( sleep 900; kill \$pid ) 2>/dev/null &
    wd=\$! init=0 ram=0 done=0
    while IFS= read -r line; do
        case \$line in
        *"start phase "*) echo "BENCH-PHASE \$1 \${line#*start phase }" ;;
        *"guest RAM mapped for DMA"*) ram=1; echo "BENCH-RAM \$1 \${line#*] }" ;;
        *"BENCH-L2 init"*) init=1
            echo "BENCH-INIT \$1 \$t0 \$(cut -d' ' -f1 /proc/uptime) \${line#*BENCH-L2 init }" ;;
        *ERROR*|*WARN*|*panic*) echo "BENCH-LOG \$1 \$line" ;;
        esac
        if [ \$init\$ram\$done = 110 ]; then
            done=1
            sleep 2
            # GuestRss: resident pages of the guest RAM memfd mapping; OtherRss: the rest.
            echo "BENCH-MEM \$1 \$(grep -E '^(VmRSS|VmHWM|RssAnon|RssFile|RssShmem|VmPin):' /proc/\$pid/status | tr -d ' \t' | tr '\n' ' ') \$(awk '/^[0-9a-f]+-[0-9a-f]+ / { g = \$6 ~ /^\/memfd:/ } /^Rss:/ { if (g) gr += \$2; else o += \$2 } END { printf "GuestRss:%dkB OtherRss:%dkB", gr, o }' /proc/\$pid/smaps)"
            kill -TERM \$pid
        fi
    done </tmp/o
    wait \$pid
    echo "BENCH-GROW-RC \$1 \$?"
    kill \$wd 2>/dev/null
}
i=1
while [ \$i -le $runs ]; do
    for n in $devices; do grow d\${n}-m1 \$n 1; done
    for m in $mems; do [ \$m = 1 ] || grow d2-m\$m 2 \$m; done
    i=\$((i + 1))
done
SCRIPT

bench_l1_image
log "booting L1 (${l1_mem} MiB): scale $count x {$sizes} ($mechs), growth devices {$devices}, guest RAM {$mems} GiB, $runs runs"
bench_run_l1 "$out/console.txt" --mem "$l1_mem" --timeout "$timeout_s" "${qemu_args[@]}"
python3 "$res/bench-scale-report.py" "$out/console.txt" --svg "$out/scale.svg" \
    --devices "$devices" --mems "$mems" | tee "$out/results.txt"
