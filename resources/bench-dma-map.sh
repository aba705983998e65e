#!/usr/bin/env bash
# bench-dma-map.sh - time to allocate guest RAM and map it into the host IOMMU for VFIO DMA, per
# backend and page size: iommufd (IOMMU_IOAS_MAP_FILE of the guest RAM memfd) vs legacy type1
# (VFIO_IOMMU_MAP_DMA by address), with 4 KiB pages, transparent huge pages and 2 MiB hugetlb
# pages, measured by p2pvmm itself inside the L1 lab guest with edu passed through; and QEMU
# 7.2's time for the same on type1, side by side in the same L1.
#
# Usage: resources/bench-dma-map.sh [--runs N] [--sizes "1024 2048"] [--modes "4k thp hugetlb"]
#                                   [--no-qemu] [--timeout SECS]
#   --runs N        rounds (default 3); each round runs every mode, size and VMM once
#   --sizes LIST    guest RAM sizes in MiB (default "1024 2048"; multiples of 2, at most 3072,
#                   so guest RAM is one region below the 3 GiB hole)
#   --modes LIST    page sizes of guest RAM (default "4k thp hugetlb"), set in L1 before each:
#                   4k       transparent_hugepage/enabled and shmem_enabled "never": 4 KiB pages
#                            on both backends (p2pvmm's MADV_HUGEPAGE is then ignored)
#                   thp      enabled "always", shmem_enabled "advise": what p2pvmm asks for with
#                            MADV_HUGEPAGE on its guest RAM. Legacy (anonymous RAM) gets 2 MiB
#                            THPs; the iommufd memfd's pages come from fallocate, which has no
#                            VMA to take the advice from, so they stay 4 KiB
#                   thp-shmem  as thp, with shmem_enabled "always": the memfd in huge pages too
#                   hugetlb  --memory size=N,hugepages=on,hugepage_size=2M (a hugetlb memfd on
#                            both backends) from a pool of N/2 MiB 2 MiB pages set up in L1;
#                            QEMU gets memory-backend-memfd,hugetlb=on,hugetlbsize=2M
#   --no-qemu       p2pvmm only
#   --timeout SECS  L1 wall-clock bound (default 3600)
#
# p2pvmm: one boot of L2 per (mode, size, backend); its -v line "guest RAM ... allocated in A,
# mapped into the IOMMU (...) in M" gives both: on iommufd A is the fallocate of the memfd's
# pages before the map (M is then the IOMMU work alone), on type1 A is zero and M includes
# faulting the pages in (pinning through the page tables). Reported: M and A + M per GiB.
# QEMU (type1, one vfio-pci device, like p2pvmm's legacy backend): QEMU maps and pins all guest
# RAM while it realizes vfio-pci, before its main loop runs. Measured: L1 wall time (/proc/uptime,
# 10 ms) from starting `qemu-system-x86_64 -accel kvm -cpu host,-xsave -S -nodefaults -display
# none -monitor stdio -m N` (stdin "info status", "quit") to its "VM status" answer, i.e. to its
# main loop, with and without `-device vfio-pci,host=<edu>`. QEMU's allocation + map per GiB is
# the slope of (with - without) between the smallest and largest size, which cancels QEMU's
# constant cost of opening the device; with one size, (with - without) / size (an upper bound).
# Prints each run; per mode the medians (lines "median ..."), ratios p2pvmm/QEMU ("ratio ..."),
# a "target" line (p2pvmm's allocation + map per GiB <= QEMU's on type1) and a "|" table.
# L1 runs under `flock /tmp/p2pvmm-lab.lock` (P2PVMM_LAB_LOCK): one lab at a time.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
res=$repo/resources
log() { echo "bench-dma-map: $*" >&2; }
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2; exit 2; }

runs=3 sizes="1024 2048" modes="4k thp hugetlb" with_qemu=1 timeout_s=3600
while (($#)); do
    case $1 in
        --runs) runs=$2; shift 2 ;;
        --sizes) sizes=$2; shift 2 ;;
        --modes) modes=$2; shift 2 ;;
        --no-qemu) with_qemu=0; shift ;;
        --timeout) timeout_s=$2; shift 2 ;;
        *) usage ;;
    esac
done
[[ $runs =~ ^[1-9][0-9]*$ && $timeout_s =~ ^[1-9][0-9]*$ ]] ||
    { log "--runs and --timeout take positive integers"; exit 2; }
max_size=0
for s in $sizes; do
    if ! [[ $s =~ ^[1-9][0-9]*$ ]] || ((s % 2 || s < 64 || s > 3072)); then
        log "--sizes: MiB, even, 64 to 3072"
        exit 2
    fi
    ((s > max_size)) && max_size=$s
done
((max_size)) || usage
for m in $modes; do
    [[ $m =~ ^(4k|thp|thp-shmem|hugetlb)$ ]] || { log "--modes: 4k, thp, thp-shmem, hugetlb"; exit 2; }
done
# L1 RAM: the largest guest, the hugetlb pool beside it, and room for L1 itself.
l1_mem=$((max_size * 2 + 2048))
((l1_mem >= 6144)) || l1_mem=6144

"$res/setup.sh"
kernel=$("$res/lab-kernel.sh" | tail -n1)
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" nice cargo build -q --release -p vmm \
    --bin p2pvmm --target x86_64-unknown-linux-gnu --target-dir target/lab)
p2pvmm=$repo/target/lab/x86_64-unknown-linux-gnu/release/p2pvmm
qemu=$(command -v qemu-system-x86_64)
work=$repo/target/lab/bench-dma-map
rm -rf "$work" && mkdir -p "$work"
"$res/mkinitramfs.sh" l2 "$work/l2.cpio.gz"

{
    echo "runs=$runs sizes='$sizes' modes='$modes' with_qemu=$with_qemu qemu=$qemu"
    echo "pool=$((max_size / 2))"
    cat <<'SCRIPT'
# Generated by resources/bench-dma-map.sh; runs in L1.
dmesg -n 1
# No compaction moving pages behind a running L2 (see tests/src/l1.rs).
echo 0 > /proc/sys/vm/compaction_proactiveness 2>/dev/null
thp=/sys/kernel/mm/transparent_hugepage
nr=/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
edu=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor):$(cat $d/device)" = 0x1234:0x11e8 ] || continue
    edu=${d##*/}
    echo vfio-pci > $d/driver_override
    [ -e $d/driver ] && echo $edu > $d/driver/unbind
    echo $edu > /sys/bus/pci/drivers_probe
    break
done
[ -n "$edu" ] || { echo "BENCH-L1 error no edu"; exit 1; }
echo "BENCH-L1 vfio $edu group $(basename $(readlink /sys/bus/pci/devices/$edu/iommu_group))"
set_mode() {
    case $1 in
    4k) echo never > $thp/enabled; echo never > $thp/shmem_enabled ;;
    thp) echo always > $thp/enabled; echo advise > $thp/shmem_enabled ;;
    thp-shmem) echo always > $thp/enabled; echo always > $thp/shmem_enabled ;;
    hugetlb) echo madvise > $thp/enabled; echo never > $thp/shmem_enabled ;;
    esac
    if [ $1 = hugetlb ]; then
        sync; echo 3 > /proc/sys/vm/drop_caches
        echo $pool > $nr
        [ "$(cat $nr)" -ge $pool ] || echo "BENCH-L1 error hugetlb pool: asked $pool pages, got $(cat $nr)"
    else
        echo 0 > $nr
    fi
    echo "BENCH-L1 mode $1: enabled=$(cat $thp/enabled) shmem_enabled=$(cat $thp/shmem_enabled) nr_hugepages=$(cat $nr)"
}
# QEMU's start to its main loop (its "VM status" answer), in ms of L1 uptime.
qemu_start() {
    mode=$1 mem=$2 vfio=$3 run=$4
    memargs="-m $mem"
    [ $mode = hugetlb ] && memargs="-m $mem -object memory-backend-memfd,id=ram0,size=${mem}M,hugetlb=on,hugetlbsize=2M -machine memory-backend=ram0"
    dev=
    [ $vfio = 1 ] && dev="-device vfio-pci,host=$edu"
    t0=$(cut -d' ' -f1 /proc/uptime)
    printf 'info status\nquit\n' | timeout 300 $qemu -accel kvm -cpu host,-xsave -smp 1 -S \
        -nodefaults -no-user-config -display none -monitor stdio $memargs $dev 2>&1 | {
        seen=0
        while IFS= read -r line; do
            case $line in
            *"VM status"*) [ $seen = 0 ] && echo "BENCH-QEMU $mode $mem $vfio $run $t0 $(cut -d' ' -f1 /proc/uptime)"; seen=1 ;;
            *rror*|*arning*) echo "BENCH-QEMU-LOG $mode $mem $vfio: $line" ;;
            esac
        done
        [ $seen = 1 ] || echo "BENCH-FAIL qemu $mode $mem vfio=$vfio"
    }
}
for mode in $modes; do
    set_mode $mode
    i=1
    while [ $i -le $runs ]; do
        for mem in $sizes; do
            memarg=${mem}M
            [ $mode = hugetlb ] && memarg=size=${mem}M,hugepages=on,hugepage_size=2M
            for backend in iommufd legacy; do
                out=$(timeout 300 p2pvmm -v --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz \
                    --memory $memarg --cmdline "console=ttyS0 panic=-1 lapic=notscdeadline" --serial off \
                    --device path=$edu,id=edu,backend=$backend 2>&1)
                echo "$out" | sed -n "s/.*guest RAM .* allocated in \(.*\), mapped into the IOMMU ([A-Za-z0-9]*) in \(.*\)/BENCH-MAP $mode $backend $mem $i \2 \1/p"
                echo "$out" | grep -q "mapped into the IOMMU" || {
                    echo "BENCH-FAIL p2pvmm $mode $backend $mem"
                    echo "$out" | tail -n 8 | sed 's/^/BENCH-FAIL-LOG /'
                }
            done
            if [ $with_qemu = 1 ]; then
                qemu_start $mode $mem 0 $i
                qemu_start $mode $mem 1 $i
            fi
        done
        i=$((i + 1))
    done
done
echo 0 > $nr
SCRIPT
} >"$work/run.sh"

"$res/mkinitramfs.sh" l1 "$work/l1.cpio.gz" \
    --add "$p2pvmm:/usr/bin/p2pvmm" \
    --add "$kernel:/l2/bzImage" --add "$work/l2.cpio.gz:/l2/initramfs.cpio.gz" \
    --add "$work/run.sh:/lab/run.sh" \
    --add-binary "$qemu" --add-dir /usr/share/qemu:/usr/share/qemu \
    --add-dir /usr/share/seabios:/usr/share/seabios
lock=${P2PVMM_LAB_LOCK:-/tmp/p2pvmm-lab.lock}
log "waiting for the lab lock $lock, then booting L1 (${l1_mem} MiB): $runs runs of modes '$modes', sizes '$sizes' MiB$( ((with_qemu)) && echo ", with QEMU")"
started=$SECONDS
flock "$lock" "$res/run-l1.sh" --kernel "$kernel" --initrd "$work/l1.cpio.gz" --mem "$l1_mem" \
    --timeout "$timeout_s" --log "$work/l1-console.log" >/dev/null || true
log "L1 ran $((SECONDS - started)) s (lock wait included)"
tr -d '\r' <"$work/l1-console.log" >"$work/console.txt"
grep -q 'P2PVMM-L1: done' "$work/console.txt" ||
    log "warning: L1 did not finish (timeout or crash); reporting what it printed"
grep -E '^BENCH-(L1|FAIL|QEMU-LOG)' "$work/console.txt" >&2 || true
grep -E '^BENCH-(MAP|QEMU) ' "$work/console.txt" >"$work/results.txt" || {
    log "no results; console in $work/console.txt"
    exit 1
}
# Durations are Rust Debug durations: 1.23s, 456.7ms, 89µs or 0ns.
awk -v modes="$modes" -v sizes="$sizes" '
function ms(d) {
    if (d ~ /ms$/) return substr(d, 1, length(d) - 2) + 0
    if (d ~ /µs$/) return substr(d, 1, length(d) - 3) / 1000
    if (d ~ /ns$/) return substr(d, 1, length(d) - 2) / 1000000
    if (d ~ /s$/) return substr(d, 1, length(d) - 1) * 1000
    return -1
}
function median(s,   a, n, i, j, x) {
    n = split(s, a, " ")
    for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > x + 0; j--) a[j + 1] = a[j]; a[j + 1] = x }
    return n ? (n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2) : -1
}
function f(v) { return v < 0 ? "-" : sprintf("%.0f", v) }
function r(a, b) { return (a < 0 || b <= 0) ? "-" : sprintf("%.2f", a / b) }
$1 == "BENCH-MAP" {
    # A run may map several regions: sum them.
    k = $2 SUBSEP $3 SUBSEP $4 SUBSEP $5
    if (!(k in mapt)) keys[++nk] = k
    mapt[k] += ms($6); alloc[k] += ms($7)
}
$1 == "BENCH-QEMU" { q[$2 SUBSEP $3 SUBSEP $4 SUBSEP $5] = ($7 - $6) * 1000 }
END {
    for (i = 1; i <= nk; i++) {
        split(keys[i], p, SUBSEP); gib = p[3] / 1024
        m = mapt[keys[i]] / gib; a = alloc[keys[i]] / gib
        printf "run %-9s %-7s %5d MiB  map %9.1f ms (%.1f ms/GiB), page allocation before it %.1f ms/GiB\n", p[1], p[2], p[3], mapt[keys[i]], m, a
        pm[p[1] SUBSEP p[2]] = pm[p[1] SUBSEP p[2]] " " m
        pt[p[1] SUBSEP p[2]] = pt[p[1] SUBSEP p[2]] " " (m + a)
        pa[p[1] SUBSEP p[2]] = pa[p[1] SUBSEP p[2]] " " a
    }
    ns = split(sizes, sz, " "); lo = hi = sz[1]
    for (i = 2; i <= ns; i++) { if (sz[i] + 0 < lo + 0) lo = sz[i]; if (sz[i] + 0 > hi + 0) hi = sz[i] }
    nm = split(modes, md, " ")
    for (i = 1; i <= nm; i++) {
        mode = md[i]
        for (run = 1; run <= 1000; run++) {
            if (!((mode SUBSEP hi SUBSEP 1 SUBSEP run) in q)) break
            for (j = 1; j <= ns; j++) {
                s = sz[j]
                d = q[mode SUBSEP s SUBSEP 1 SUBSEP run] - q[mode SUBSEP s SUBSEP 0 SUBSEP run]
                qd[mode SUBSEP s] = qd[mode SUBSEP s] " " d
                printf "run %-9s QEMU    %5d MiB  start to main loop %6.0f ms without vfio-pci, %6.0f ms with it: +%.0f ms\n", mode, s, q[mode SUBSEP s SUBSEP 0 SUBSEP run], q[mode SUBSEP s SUBSEP 1 SUBSEP run], d
            }
            dh = q[mode SUBSEP hi SUBSEP 1 SUBSEP run] - q[mode SUBSEP hi SUBSEP 0 SUBSEP run]
            dl = q[mode SUBSEP lo SUBSEP 1 SUBSEP run] - q[mode SUBSEP lo SUBSEP 0 SUBSEP run]
            qs[mode] = qs[mode] " " (hi > lo ? (dh - dl) / ((hi - lo) / 1024) : dh / (hi / 1024))
        }
    }
    print ""
    for (i = 1; i <= nm; i++) {
        mode = md[i]
        mi = median(pm[mode SUBSEP "iommufd"]); ml = median(pm[mode SUBSEP "legacy"])
        ai = median(pa[mode SUBSEP "iommufd"]); al = median(pa[mode SUBSEP "legacy"])
        ti = median(pt[mode SUBSEP "iommufd"]); tl = median(pt[mode SUBSEP "legacy"])
        qq = median(qs[mode])
        row[i] = sprintf("| %s | %s | %s | %s | %s | %s | %s | %s | %s |", mode, f(ai), f(mi), f(ti), f(al), f(ml), f(tl), f(qq), r(tl, qq))
        printf "median %s map time per GiB of guest RAM: iommufd (MAP_FILE of the memfd) %s ms, legacy type1 (MAP_DMA by address) %s ms, ratio %s\n", mode, f(mi), f(ml), r(mi, ml)
        printf "median %s total (allocation + map) per GiB: iommufd %s ms, legacy %s ms, ratio %s\n", mode, f(ti), f(tl), r(ti, tl)
        if (qq != -1) {
            dq = ""
            for (j = 1; j <= ns; j++) dq = dq sprintf(", %d MiB +%s ms", sz[j], f(median(qd[mode SUBSEP sz[j]])))
            printf "median %s QEMU 7.2 type1 allocation + map per GiB: %s ms (vfio-pci start cost%s)\n", mode, f(qq), dq
            printf "ratio %s p2pvmm/QEMU allocation + map per GiB: legacy %s, iommufd %s\n", mode, r(tl, qq), r(ti, qq)
            printf "target %s p2pvmm legacy allocation + map per GiB <= QEMU type1: %s (%s vs %s ms)\n", mode, (tl >= 0 && tl <= qq) ? "met" : "MISSED", f(tl), f(qq)
        }
    }
    print ""
    print "allocation + map of guest RAM, median ms per GiB (QEMU: type1, slope of its vfio-pci start cost):"
    print "| pages | iommufd alloc | iommufd map | iommufd total | legacy alloc | legacy map | legacy total | QEMU 7.2 type1 | legacy/QEMU |"
    print "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    for (i = 1; i <= nm; i++) print row[i]
}' "$work/results.txt"
