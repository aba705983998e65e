#!/usr/bin/env bash
# bench-dma-map.sh - time to allocate guest RAM and map it into the host IOMMU for VFIO DMA, per
# backend and page size: iommufd (IOMMU_IOAS_MAP_FILE of the guest RAM memfd) vs legacy type1
# (VFIO_IOMMU_MAP_DMA by address), with 4 KiB pages, transparent huge pages and 2 MiB hugetlb
# pages, measured by p2pvmm itself inside the L1 lab guest with edu passed through; and QEMU
# 7.2's time for the same on type1, and the newer QEMU's (resources/qemu-backports.sh) on type1
# and on iommufd, side by side in the same L1.
#
# Usage: resources/bench-dma-map.sh [--runs N] [--sizes "1024 2048"] [--modes "4k thp hugetlb"]
#                                   [--guests "idle boot"] [--no-qemu] [--timeout SECS]
#                                   [--report-only]
#   --runs N        rounds (default 3); each round runs every mode, size, guest and VMM once
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
#   --guests LIST   what p2pvmm's guest does while its map thread maps guest RAM (default
#                   "idle boot"): idle = a 4 KiB ELF kernel whose entry is a hlt loop (built
#                   here with gcc), so the map has L1 to itself, as QEMU's map does (QEMU maps
#                   before any vCPU runs); boot = the lab's L2 kernel booting meanwhile (what
#                   p2pvmm really does: the map overlaps the boot, and competes with it for
#                   L1's CPUs and page allocation)
#   --no-qemu       p2pvmm only
#   --timeout SECS  L1 wall-clock bound (default 3600)
#   --report-only   no L1: report again from the last run's target/lab/bench-dma-map/results.txt
#
# p2pvmm: one start per (mode, size, guest, backend), stopped (SIGTERM) once it logged the map;
# its -v line "guest RAM ... allocated in A, mapped into the IOMMU (...) in M" gives both: on
# iommufd A is the fallocate of the memfd's pages before the map (M is then the IOMMU work
# alone), on type1 A is zero and M includes faulting the pages in (pinning through the page
# tables). Reported: M and A + M per GiB.
# QEMU (type1, one vfio-pci device, like p2pvmm's legacy backend): QEMU maps and pins all guest
# RAM while it realizes vfio-pci, before its main loop runs. Measured: L1 wall time (/proc/uptime,
# 10 ms) from starting `qemu-system-x86_64 -accel kvm -cpu host,-xsave -S -nodefaults -display
# none -monitor stdio -m N` (stdin "info status", "quit") to its "VM status" answer, i.e. to its
# main loop, with and without `-device vfio-pci,host=<edu>`. QEMU's allocation + map per GiB is
# the slope of (with - without) between the smallest and largest size, which cancels QEMU's
# constant cost of opening the device; also (with - without) / size at the largest size (an
# upper bound: it keeps that constant). One size: the upper bound only. The newer QEMU is measured
# the same way, once with the type1 device and once with `-object iommufd,id=ifd0 -device
# vfio-pci,host=<edu>,iommufd=ifd0` (it then maps guest RAM with IOMMU_IOAS_MAP), each against
# its own start without a device; left out with a note when it does not install.
# Prints each run; per mode the medians (lines "median ..."), ratios p2pvmm/QEMU ("ratio ..."),
# "target" lines (p2pvmm's allocation + map per GiB <= QEMU's on the same backend: legacy against
# type1, iommufd against the newer QEMU's iommufd) and a "|" table.
# L1 gets `-mem-prealloc`: without it, the first touch of each L1 page costs a host page fault
# inside whichever run touches it first (seen: the same QEMU start without vfio-pci took 0.6 s or
# 4 s, a first p2pvmm 4 KiB map 9 s/GiB against 4-5 s later).
# L1 runs under `flock /tmp/p2pvmm-lab.lock` (P2PVMM_LAB_LOCK): one lab at a time.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
res=$repo/resources
log() { echo "bench-dma-map: $*" >&2; }
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2; exit 2; }

runs=3 sizes="1024 2048" modes="4k thp hugetlb" guests="idle boot" with_qemu=1 timeout_s=3600
report_only=0
while (($#)); do
    case $1 in
        --guests) guests=$2; shift 2 ;;
        --report-only) report_only=1; shift ;;
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
for g in $guests; do
    [[ $g == idle || $g == boot ]] || { log "--guests: idle and/or boot"; exit 2; }
done
work=$repo/target/lab/bench-dma-map
if ((report_only == 0)); then
# L1 RAM: the largest guest, the hugetlb pool beside it, and room for L1 itself.
l1_mem=$((max_size * 2 + 2048))
((l1_mem >= 6144)) || l1_mem=6144

# shellcheck source=resources/bench-lib.sh
. "$res/bench-lib.sh"
bench_prepare
bench_qemus
((with_qemu)) || { qemu_new=''; qemu_new_label=''; }
rm -rf "$work" && mkdir -p "$work"
"$res/mkinitramfs.sh" l2 "$work/l2.cpio.gz"
# The idle guest: an ELF kernel at 16 MiB whose entry halts forever.
printf '.globl _start\n_start:\n1:\thlt\n\tjmp 1b\n' >"$work/idle.S"
gcc -nostdlib -static -Wl,-Ttext=0x1000000 -Wl,--build-id=none -o "$work/idle.elf" "$work/idle.S"

{
    echo "runs=$runs sizes='$sizes' modes='$modes' guests='$guests' with_qemu=$with_qemu qemu=$qemu"
    echo "pool=$((max_size / 2))"
    echo "qemu_new='$qemu_new'"
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
# QEMU's start to its main loop (its "VM status" answer), in ms of L1 uptime. PEER: qemu (7.2) or
# qemu-new; VFIO: 0 no device, 1 vfio-pci on type1, 2 vfio-pci on iommufd.
qemu_start() {
    peer=$1 mode=$2 mem=$3 vfio=$4 run=$5
    memargs="-m $mem"
    [ $mode = hugetlb ] && memargs="-m $mem -object memory-backend-memfd,id=ram0,size=${mem}M,hugetlb=on,hugetlbsize=2M -machine memory-backend=ram0"
    dev=
    [ $vfio = 1 ] && dev="-device vfio-pci,host=$edu"
    [ $vfio = 2 ] && dev="-object iommufd,id=ifd0 -device vfio-pci,host=$edu,iommufd=ifd0"
    bin=$qemu
    [ $peer = qemu-new ] && bin=$qemu_new
    t0=$(cut -d' ' -f1 /proc/uptime)
    printf 'info status\nquit\n' | timeout 300 $bin -accel kvm -cpu host,-xsave -smp 1 -S \
        -nodefaults -no-user-config -display none -monitor stdio $memargs $dev 2>&1 | {
        seen=0
        while IFS= read -r line; do
            case $line in
            *"VM status"*) [ $seen = 0 ] && echo "BENCH-QEMU $mode $mem $vfio $run $t0 $(cut -d' ' -f1 /proc/uptime) $peer"; seen=1 ;;
            *rror*|*arning*) echo "BENCH-QEMU-LOG $peer $mode $mem $vfio: $line" ;;
            esac
        done
        [ $seen = 1 ] || echo "BENCH-FAIL $peer $mode $mem vfio=$vfio"
    }
}
# p2pvmm's own map time: start it, wait for its map line, stop it.
p2pvmm_map() {
    mode=$1 guest=$2 backend=$3 mem=$4 run=$5 memarg=$6
    if [ $guest = idle ]; then
        kargs="--kernel /l2/idle.elf"
    else
        kargs="--kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz"
    fi
    out=/tmp/p2pvmm.out
    p2pvmm -v $kargs --memory $memarg --cmdline "console=ttyS0 panic=-1 lapic=notscdeadline" \
        --serial off --device path=$edu,id=edu,backend=$backend </dev/null >$out 2>&1 &
    pid=$!
    t=0
    while ! grep -q "mapped into the IOMMU" $out && kill -0 $pid 2>/dev/null && [ $t -lt 3000 ]; do
        usleep 100000
        t=$((t + 1))
    done
    kill $pid 2>/dev/null
    wait $pid 2>/dev/null
    sed -n "s/.*guest RAM .* allocated in \(.*\), mapped into the IOMMU ([A-Za-z0-9]*) in \(.*\)/BENCH-MAP $mode $guest $backend $mem $run \2 \1/p" $out
    grep -q "mapped into the IOMMU" $out || {
        echo "BENCH-FAIL p2pvmm $mode $guest $backend $mem"
        tail -n 8 $out | sed 's/^/BENCH-FAIL-LOG /'
    }
}
for mode in $modes; do
    set_mode $mode
    i=1
    while [ $i -le $runs ]; do
        for mem in $sizes; do
            memarg=${mem}M
            [ $mode = hugetlb ] && memarg=size=${mem}M,hugepages=on,hugepage_size=2M
            for guest in $guests; do
                for backend in iommufd legacy; do
                    p2pvmm_map $mode $guest $backend $mem $i $memarg
                done
            done
            if [ $with_qemu = 1 ]; then
                qemu_start qemu $mode $mem 0 $i
                qemu_start qemu $mode $mem 1 $i
                if [ -n "$qemu_new" ]; then
                    for v in 0 1 2; do qemu_start qemu-new $mode $mem $v $i; done
                fi
            fi
        done
        i=$((i + 1))
    done
done
echo 0 > $nr
SCRIPT
} >"$work/run.sh"

bench_l1_image --add "$work/idle.elf:/l2/idle.elf" "${initramfs_args[@]}"
log "booting L1 (${l1_mem} MiB): $runs runs of modes '$modes', sizes '$sizes' MiB$( ((with_qemu)) && echo ", with QEMU")"
bench_run_l1 "$work/console.txt" --mem "$l1_mem" --timeout "$timeout_s" --qemu-arg -mem-prealloc
grep -E '^BENCH-(MAP|QEMU) ' "$work/console.txt" >"$work/results.txt" || {
    log "no results; console in $work/console.txt"
    exit 1
}
echo "$qemu_new_label" >"$work/qemu-new-label"
fi
[[ -s $work/results.txt ]] || { log "no $work/results.txt to report"; exit 1; }
newer=$(cat "$work/qemu-new-label" 2>/dev/null || true)
[[ -n $newer ]] || log "the newer QEMU has no results here (left out, or an older run's results)"
# Durations are Rust Debug durations: 1.23s, 456.7ms, 89µs or 0ns.
awk -v modes="$modes" -v sizes="$sizes" -v guests="$guests" -v newer="$newer" '
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
function met(a, b) { return (a >= 0 && b >= 0 && a <= b) ? "met" : "MISSED" }
$1 == "BENCH-MAP" {
    # BENCH-MAP mode guest backend MiB run map alloc; a run may map several regions: sum them.
    k = $2 SUBSEP $3 SUBSEP $4 SUBSEP $5 SUBSEP $6
    if (!(k in mapt)) keys[++nk] = k
    mapt[k] += ms($7); alloc[k] += ms($8)
}
# BENCH-QEMU mode MiB vfio run t0 t1 [peer] (seconds of L1 uptime; no peer: QEMU 7.2)
$1 == "BENCH-QEMU" { q[($8 == "" ? "qemu" : $8) SUBSEP $4 SUBSEP $2 SUBSEP $3 SUBSEP $5] = ($7 - $6) * 1000 }
END {
    for (i = 1; i <= nk; i++) {
        split(keys[i], p, SUBSEP); gib = p[4] / 1024
        m = mapt[keys[i]] / gib; a = alloc[keys[i]] / gib
        printf "run %-9s %-4s %-7s %5d MiB  map %8.1f ms (%6.0f ms/GiB), page allocation before it %6.0f ms/GiB\n", p[1], p[2], p[3], p[4], mapt[keys[i]], m, a
        c = p[1] SUBSEP p[2] SUBSEP p[3]
        pm[c] = pm[c] " " m; pt[c] = pt[c] " " (m + a); pa[c] = pa[c] " " a
    }
    ns = split(sizes, sz, " "); lo = hi = sz[1]
    for (i = 2; i <= ns; i++) { if (sz[i] + 0 < lo + 0) lo = sz[i]; if (sz[i] + 0 > hi + 0) hi = sz[i] }
    nm = split(modes, md, " "); ng = split(guests, gs, " ")
    # The QEMU runs compared: peer, its vfio value (1 type1, 2 iommufd) and a name.
    np = 1; peer[1] = "qemu"; pv[1] = 1; pname[1] = "QEMU 7.2 type1"
    if (newer != "") { np = 3; peer[2] = peer[3] = "qemu-new"; pv[2] = 1; pv[3] = 2; pname[2] = newer " type1"; pname[3] = newer " iommufd" }
    for (c = 1; c <= np; c++) for (i = 1; i <= nm; i++) {
        mode = md[i]; pre = peer[c] SUBSEP
        for (run = 1; run <= 1000; run++) {
            with = pre pv[c] SUBSEP mode SUBSEP; without = pre 0 SUBSEP mode SUBSEP
            if (!((with hi SUBSEP run) in q) || !((without hi SUBSEP run) in q)) break
            for (j = 1; j <= ns; j++) {
                s = sz[j]
                d = q[with s SUBSEP run] - q[without s SUBSEP run]
                qd[c SUBSEP mode SUBSEP s] = qd[c SUBSEP mode SUBSEP s] " " d
                printf "run %-9s %-21s %5d MiB  start to main loop %6.0f ms without vfio-pci, %6.0f ms with it: +%.0f ms\n", mode, pname[c], s, q[without s SUBSEP run], q[with s SUBSEP run], d
            }
            dh = q[with hi SUBSEP run] - q[without hi SUBSEP run]
            dl = q[with lo SUBSEP run] - q[without lo SUBSEP run]
            if (hi > lo) qs[c SUBSEP mode] = qs[c SUBSEP mode] " " (dh - dl) / ((hi - lo) / 1024)
            qu[c SUBSEP mode] = qu[c SUBSEP mode] " " dh / (hi / 1024)
        }
    }
    print ""
    nr = 0
    for (i = 1; i <= nm; i++) {
        mode = md[i]
        for (c = 1; c <= np; c++) {
            qq[c] = median(qs[c SUBSEP mode]); qup[c] = median(qu[c SUBSEP mode])
            # What a ratio is taken against: the slope, or the upper bound when there is one size.
            ref[c] = qq[c] >= 0 ? qq[c] : qup[c]
            if (qup[c] == -1) continue
            dq = ""
            for (j = 1; j <= ns; j++) dq = dq sprintf(", %d MiB +%s ms", sz[j], f(median(qd[c SUBSEP mode SUBSEP sz[j]])))
            printf "median %s %s allocation + map per GiB: %s ms (slope between %d and %d MiB), at most %s ms (vfio-pci start cost / size at %d MiB; start cost%s)\n", mode, pname[c], f(qq[c]), lo, hi, f(qup[c]), hi, dq
        }
        for (g = 1; g <= ng; g++) {
            c = mode SUBSEP gs[g]
            mi = median(pm[c SUBSEP "iommufd"]); ml = median(pm[c SUBSEP "legacy"])
            ai = median(pa[c SUBSEP "iommufd"]); al = median(pa[c SUBSEP "legacy"])
            ti = median(pt[c SUBSEP "iommufd"]); tl = median(pt[c SUBSEP "legacy"])
            if (mi == -1 && ml == -1) continue
            row[++nr] = sprintf("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |", mode, gs[g], f(ai), f(mi), f(ti), f(tl), f(qq[1]), f(qup[1]), r(tl, qq[1]), r(ti, qq[1]))
            if (newer != "") row[nr] = row[nr] sprintf(" %s | %s | %s | %s |", f(ref[2]), f(ref[3]), r(tl, ref[2]), r(ti, ref[3]))
            printf "median %s %s-guest map time per GiB of guest RAM: iommufd (MAP_FILE of the memfd) %s ms, legacy type1 (MAP_DMA by address) %s ms, ratio %s\n", mode, gs[g], f(mi), f(ml), r(mi, ml)
            printf "median %s %s-guest total (allocation + map) per GiB: iommufd %s ms, legacy %s ms, ratio %s\n", mode, gs[g], f(ti), f(tl), r(ti, tl)
            if (qup[1] != -1) {
                printf "ratio %s %s-guest p2pvmm/QEMU allocation + map per GiB: legacy %s (%s against the upper bound), iommufd %s\n", mode, gs[g], r(tl, qq[1]), r(tl, qup[1]), r(ti, qq[1])
                printf "target %s %s-guest p2pvmm legacy allocation + map per GiB <= QEMU type1: %s (%s vs %s ms)\n", mode, gs[g], met(tl, ref[1]), f(tl), f(ref[1])
            }
            if (newer != "" && qup[2] != -1 && qup[3] != -1) {
                printf "ratio %s %s-guest p2pvmm/%s on the same backend, allocation + map per GiB: legacy/type1 %s, iommufd/iommufd %s\n", mode, gs[g], newer, r(tl, ref[2]), r(ti, ref[3])
                printf "target %s %s-guest p2pvmm legacy allocation + map per GiB <= %s type1: %s (%s vs %s ms)\n", mode, gs[g], newer, met(tl, ref[2]), f(tl), f(ref[2])
                printf "target %s %s-guest p2pvmm iommufd allocation + map per GiB <= %s iommufd: %s (%s vs %s ms)\n", mode, gs[g], newer, met(ti, ref[3]), f(ti), f(ref[3])
            }
        }
    }
    print ""
    print "allocation + map of guest RAM, median ms per GiB (QEMU: slope of its vfio-pci start cost over the sizes; for 7.2 also that cost / size at the largest):"
    h = "| pages | p2pvmm guest | iommufd alloc | iommufd map | iommufd total | legacy total | QEMU 7.2 type1 slope | QEMU 7.2 type1 upper bound | legacy/QEMU 7.2 | iommufd/QEMU 7.2 |"
    l = "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    if (newer != "") { h = h " " newer " type1 | " newer " iommufd | legacy/" newer " type1 | iommufd/" newer " iommufd |"; l = l " --- | --- | --- | --- |" }
    print h; print l
    for (i = 1; i <= nr; i++) print row[i]
}' "$work/results.txt"
