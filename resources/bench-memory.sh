#!/usr/bin/env bash
# bench-memory.sh - memory overhead of the VMM process, p2pvmm (legacy and iommufd backends) vs
# Debian's QEMU 7.2 (type1) and the newer QEMU from Debian's backports (resources/qemu-backports.sh,
# QEMU 10: type1 and iommufd), side by side in the same L1 lab guest: the VMM's resident memory
# minus guest RAM (and minus VFIO BAR mappings), with 0, 2 and 8 passthrough devices, while L2
# sits idle at its init. Without the newer QEMU (none installs, or P2PVMM_BENCH_NEWER_QEMU=0) it
# is left out with a note and the rest is measured as before.
#
# Usage: resources/bench-memory.sh [--runs N] [--devices "0 2 8"] [--memory MiB] [--cpus N]
#                                  [--backends "legacy iommufd"] [--no-group] [--thp MODE]
#                                  [--timeout SECS]
#   --runs N        rounds (default 3); each round boots every VMM/backend/device count once
#   --devices LIST  passthrough device counts (default "0 2 8"; at most 8: L1 gets 4 edu and 4
#                   ivshmem, each its own IOMMU group; a count takes edu, ivshmem, edu, ...)
#   --memory MiB    L2 RAM for both VMMs (default 512); --cpus N L2 vCPUs (default 1)
#   --backends LIST p2pvmm's backends (default "legacy iommufd"); QEMU 7.2 is type1 (legacy),
#                   the newer QEMU runs both type1 and iommufd
#   --no-group      p2pvmm's devices in no P2P group (one IOMMU domain each) instead of one
#                   group of all of them (one domain, like QEMU's one type1 container)
#   --thp MODE      L1's transparent_hugepage/enabled (default madvise: both VMMs advise their
#                   guest RAM, and nothing else of either process is inflated to 2 MiB pages;
#                   L1's kernel default "always" would also back heaps and thread stacks)
#   --timeout SECS  L1 wall-clock bound (default 3000)
#
# Method. Both VMMs boot the lab bzImage and an L2 initramfs whose /lab/l2.sh prints
# "BENCH-MEM-IDLE" at init and then sleeps, on L1's KVM, with the same RAM, vCPUs, command line
# and the same host functions (bound to vfio-pci in L1). QEMU is Debian's qemu-system-x86_64
# (copied into L1 with its libraries and firmware, as bench-boot.sh does): `-accel kvm -cpu
# host,-xsave -m MiB -smp N -nographic -vga none -nic none` plus `-device vfio-pci,host=BDF` per
# device (type1, one container). The newer QEMU (its binary and libraries in L1 under
# /opt/qemu-new, `-L` its data dir) boots with the same arguments twice: type1 as QEMU 7.2
# ("qemu-new legacy" in the BENCH-MEM lines), and iommufd: `-object iommufd,id=iommufd0` plus
# `-device vfio-pci,host=BDF,iommufd=iommufd0` per device ("qemu-new iommufd"); with 0 devices
# once ("qemu-new legacy", no iommufd object).
# p2pvmm: `--memory MiB --cpus N --device path=BDF,...,backend=B` and, with 2+ devices,
# `--p2p-group` of all of them. 3 s after the marker, L1 reads
# /proc/PID/smaps of the VMM process (then /proc/PID/status for the thread count) and sends it
# SIGTERM. With passthrough, all guest RAM is pinned, so RSS holds all of it.
#   overhead = sum of Rss over all mappings, minus
#     - guest RAM: every mapping whose Size is guest RAM to guest RAM + 4 MiB (QEMU's pc.ram
#       anonymous mapping, p2pvmm's anonymous THP RAM), or whose name holds
#       "p2pvmm-guest-ram" (p2pvmm's memfd),
#     - BARs: every mapping whose name holds "vfio" (BAR mmaps of the device fds:
#       anon_inode:[vfio-device] or /dev/vfio/devices/vfioN; device memory, Rss usually 0).
#   Everything else counts: binary and libraries (file Rss), heap, thread stacks, QEMU's ROM and
#   firmware copies (pc.bios, pc.rom: small RAM blocks other than pc.ram) and so on.
#   Pss and Private_Dirty get the same subtraction. Kernel memory (page tables, KVM, IOMMU page
#   tables) is not in any of these.
# Prints each run, then per device count the medians (lines "  N devices: ..."), a "|" table
# (MB = 2^20 bytes), ratio lines p2pvmm/QEMU 7.2 and, same backend against same backend, p2pvmm
# legacy/newer QEMU type1 and p2pvmm iommufd/newer QEMU iommufd (or one line saying the newer QEMU
# was left out), a target line (p2pvmm <= 7 MB, Cloud Hypervisor's figure; QEMU ~47 MB) and, for
# the first run of each configuration, the largest mappings that count as overhead (lines
# "top ...") to show what dominates.
# L1 runs under `flock /tmp/p2pvmm-lab.lock` (P2PVMM_LAB_LOCK): one lab at a time.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
res=$repo/resources
log() { echo "bench-memory: $*" >&2; }
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2; exit 2; }

runs=3 devices="0 2 8" mem=512 cpus=1 backends="legacy iommufd" group=1 thp=madvise timeout_s=3000
while (($#)); do
    case $1 in
        --runs) runs=$2; shift 2 ;;
        --devices) devices=$2; shift 2 ;;
        --memory) mem=$2; shift 2 ;;
        --cpus) cpus=$2; shift 2 ;;
        --backends) backends=$2; shift 2 ;;
        --no-group) group=0; shift ;;
        --thp) thp=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        *) usage ;;
    esac
done
for v in "$runs" "$mem" "$cpus" "$timeout_s"; do
    [[ $v =~ ^[1-9][0-9]*$ ]] || { log "--runs, --memory, --cpus and --timeout take positive integers"; exit 2; }
done
max_dev=0
for n in $devices; do
    if ! [[ $n =~ ^[0-9]+$ ]] || ((n > 8)); then log "--devices: counts from 0 to 8"; exit 2; fi
    ((n > max_dev)) && max_dev=$n
done
for b in $backends; do
    [[ $b == legacy || $b == iommufd ]] || { log "--backends: legacy and/or iommufd"; exit 2; }
done
[[ $thp =~ ^(always|madvise|never)$ ]] || { log "--thp: always, madvise or never"; exit 2; }

# shellcheck source=resources/bench-lib.sh
. "$res/bench-lib.sh"
bench_prepare
bench_qemus

work=$repo/target/lab/bench-memory
rm -rf "$work" && mkdir -p "$work"

# L2: report at init, then stay idle until the VMM is stopped.
cat >"$work/l2.sh" <<'L2'
echo "BENCH-MEM-IDLE uptime_s=$(cut -d' ' -f1 /proc/uptime)"
sleep 100000
L2
"$res/mkinitramfs.sh" l2 "$work/l2.cpio.gz" --add "$work/l2.sh:/lab/l2.sh"

# L1: the lab's edu and ivshmem plus enough more for the largest count (each its own IOMMU
# group on L1's root bus).
qemu_args=()
extra_edu=$(((max_dev + 1) / 2 - 1)) extra_shm=$((max_dev / 2 - 1))
for ((i = 1; i <= extra_edu; i++)); do
    qemu_args+=(--qemu-arg -device --qemu-arg "edu,dma_mask=0xffffffffffffffff")
done
for ((i = 1; i <= extra_shm; i++)); do
    bench_ivshmem "mshm$i" $((64 << 20)) ''
done

{
    echo "runs=$runs devices='$devices' mem=$mem cpus=$cpus backends='$backends' group=$group"
    echo "thp=$thp qemu=$qemu"
    echo "qemu_new='$qemu_new'"
    cat <<'SCRIPT'
# Generated by resources/bench-memory.sh; runs in L1.
dmesg -n 1
echo "$thp" > /sys/kernel/mm/transparent_hugepage/enabled
# No compaction moving pages behind a running L2 (see tests/src/l1.rs).
echo 0 > /proc/sys/vm/compaction_proactiveness 2>/dev/null
cmdline="console=ttyS0 panic=-1 lapic=notscdeadline"
bind() {
    d=/sys/bus/pci/devices/$1
    echo vfio-pci > $d/driver_override
    [ -e $d/driver ] && echo $1 > $d/driver/unbind
    echo $1 > /sys/bus/pci/drivers_probe
}
edus= shms=
for d in /sys/bus/pci/devices/*; do
    case "$(cat $d/vendor):$(cat $d/device)" in
    0x1234:0x11e8) edus="$edus ${d##*/}" ;;
    0x1af4:0x1110) shms="$shms ${d##*/}" ;;
    *) continue ;;
    esac
    bind ${d##*/}
    echo "BENCH-L1 vfio ${d##*/} $(cat $d/vendor):$(cat $d/device) group $(basename $(readlink $d/iommu_group))"
done
# The first N of edu, ivshmem, edu, ivshmem, ...
pick() {
    set -- $edus
    e="$*"
    set -- $shms
    s="$*"
    k=0 out=
    while [ $k -lt $n ]; do
        if [ $((k % 2)) -eq 0 ]; then
            b=${e%% *}; e=${e#"$b"}; e=${e# }
        else
            b=${s%% *}; s=${s#"$b"}; s=${s# }
        fi
        [ -n "$b" ] || { echo "BENCH-L1 error not enough devices for $n" >&2; return 1; }
        out="$out $b"
        k=$((k + 1))
    done
    echo $out
}
# smaps SIZE_KB FILE: one line of totals (kB): rss pss pd ram_rss ram_pss ram_pd bar_rss nram
smaps_totals() {
    awk -v ram="$1" '
    /^[0-9a-f]+-[0-9a-f]+ / { name = ""; for (i = 6; i <= NF; i++) name = name (i > 6 ? " " : "") $i
                              cls = (name ~ /p2pvmm-guest-ram/) ? "ram" : (name ~ /vfio/) ? "bar" : "" }
    $1 == "Size:" { if (cls == "" && $2 >= ram && $2 <= ram + 4096) cls = "ram"; if (cls == "ram") nram++ }
    $1 == "Rss:" { rss += $2; if (cls == "ram") rr += $2; if (cls == "bar") br += $2 }
    $1 == "Pss:" { pss += $2; if (cls == "ram") rp += $2; if (cls == "bar") bp += $2 }
    $1 == "Private_Dirty:" { pd += $2; if (cls == "ram") rd += $2; if (cls == "bar") bd += $2 }
    END { printf "rss=%d pss=%d pd=%d ram_rss=%d ram_pss=%d ram_pd=%d bar_rss=%d bar_pss=%d bar_pd=%d nram=%d\n",
                 rss, pss, pd, rr, rp, rd, br, bp, bd, nram + 0 }' "$2"
}
# The largest mappings that count as overhead: "rss_kb size_kb perms name".
smaps_top() {
    awk -v ram="$1" '
    function flush() { if (hdr != "" && cls == "" && r > 0) printf "%d %d %s %s\n", r, sz, perms, (name == "" ? "[anon]" : name) }
    /^[0-9a-f]+-[0-9a-f]+ / { flush(); hdr = $0; perms = $2; r = 0; name = ""
                              for (i = 6; i <= NF; i++) name = name (i > 6 ? " " : "") $i
                              cls = (name ~ /p2pvmm-guest-ram/) ? "ram" : (name ~ /vfio/) ? "bar" : "" }
    $1 == "Size:" { sz = $2; if (cls == "" && $2 >= ram && $2 <= ram + 4096) cls = "ram" }
    $1 == "Rss:" { r = $2 }
    END { flush() }' "$2" | sort -n -r | head -n 14
}
seen=" "
# measure VMM BACKEND NDEV RUN CMD...: boot, wait for L2's idle marker, read smaps, stop.
measure() {
    vmm=$1 backend=$2 ndev=$3 run=$4; shift 4
    out=/tmp/vmm.out
    "$@" </dev/null >$out 2>&1 &
    pid=$!
    t=0
    while ! grep -q BENCH-MEM-IDLE $out; do
        if ! kill -0 $pid 2>/dev/null || [ $t -ge 1200 ]; then
            echo "BENCH-FAIL $vmm $backend $ndev $run: no idle marker after $((t / 4)) s"
            tail -n 15 $out | sed "s/^/BENCH-FAIL-LOG /"
            kill $pid 2>/dev/null; wait $pid 2>/dev/null
            return 1
        fi
        usleep 250000
        t=$((t + 1))
    done
    sleep 3
    cp /proc/$pid/smaps /tmp/smaps
    threads=$(awk '/^Threads:/ { print $2 }' /proc/$pid/status)
    vmrss=$(awk '/^VmRSS:/ { print $2 }' /proc/$pid/status)
    kill $pid
    wait $pid
    rc=$?
    echo "BENCH-MEM $vmm $backend $ndev $run $(smaps_totals $((mem * 1024)) /tmp/smaps) threads=$threads vmrss=$vmrss rc=$rc"
    key="$vmm/$backend/$ndev"
    case "$seen" in *" $key "*) ;; *)
        seen="$seen$key "
        smaps_top $((mem * 1024)) /tmp/smaps | sed "s|^|BENCH-TOP $vmm $backend $ndev |"
        grep -E -i 'warn|error' $out | head -n 5 | sed "s|^|BENCH-LOG $vmm $backend $ndev |"
    esac
}
r=1
while [ $r -le $runs ]; do
    for n in $devices; do
        bdfs=$(pick) || exit 1
        qdevs= idevs= ids=
        k=0
        for b in $bdfs; do
            qdevs="$qdevs -device vfio-pci,host=$b"; ids="$ids${ids:+:}d$k"; k=$((k + 1))
            idevs="$idevs -device vfio-pci,host=$b,iommufd=iommufd0"
        done
        [ $n -eq 0 ] || idevs="-object iommufd,id=iommufd0$idevs"
        for backend in $backends; do
            [ $n -eq 0 ] && [ $backend != "${backends%% *}" ] && continue
            pdevs= k=0
            for b in $bdfs; do pdevs="$pdevs --device path=$b,id=d$k,backend=$backend"; k=$((k + 1)); done
            grp=
            [ $group = 1 ] && [ $n -ge 2 ] && grp="--p2p-group name=g0,devices=$ids"
            [ $n -eq 0 ] && b=- || b=$backend
            measure p2pvmm $b $n $r p2pvmm --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz \
                --cpus $cpus --memory ${mem}M --cmdline "$cmdline" $pdevs $grp
        done
        measure qemu legacy $n $r $qemu -accel kvm -cpu host,-xsave -m $mem -smp $cpus -nographic \
            -no-reboot -vga none -nic none -kernel /l2/bzImage -initrd /l2/initramfs.cpio.gz \
            -append "$cmdline" $qdevs
        [ -n "$qemu_new" ] || continue
        # The newer QEMU: type1 as QEMU 7.2, then (with devices) iommufd.
        for qb in legacy iommufd; do
            [ $n -eq 0 ] && [ $qb = iommufd ] && continue
            [ $qb = legacy ] && qd=$qdevs || qd=$idevs
            measure qemu-new $qb $n $r $qemu_new -accel kvm -cpu host,-xsave -m $mem -smp $cpus \
                -nographic -no-reboot -vga none -nic none -kernel /l2/bzImage \
                -initrd /l2/initramfs.cpio.gz -append "$cmdline" $qd
        done
    done
    r=$((r + 1))
done
SCRIPT
} >"$work/run.sh"

bench_l1_image "${initramfs_args[@]}"

log "booting L1: $runs runs, devices '$devices', ${mem} MiB, $cpus vCPU(s), p2pvmm backends '$backends', \
QEMU 7.2${qemu_new:+, $qemu_new_label type1 and iommufd}, L1 THP $thp"
bench_run_l1 "$work/console.txt" --mem 4096 --timeout "$timeout_s" "${qemu_args[@]}"
grep -q '^BENCH-MEM ' "$work/console.txt" || { log "no results; console in $work/console.txt"; exit 1; }

awk -v backends="$backends" -v devices="$devices" -v newer="$qemu_new_label" '
function median(s,   a, n, i, j, x) {
    n = split(s, a, " ")
    for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > x + 0; j--) a[j + 1] = a[j]; a[j + 1] = x }
    return n ? (n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2) : -1
}
function kv(k,   i, p) { for (i = 6; i <= NF; i++) { split($i, p, "="); if (p[1] == k) return p[2] + 0 }; return 0 }
function mb(kb) { return kb < 0 ? "-" : sprintf("%.1f", kb / 1024) }
function ratio(v, q) { return q > 0 && v >= 0 ? sprintf("%.2f", v / q) : "-" }
/^BENCH-MEM / {
    key = $2 "/" $3 "/" $4
    o = kv("rss") - kv("ram_rss") - kv("bar_rss")
    p = kv("pss") - kv("ram_pss") - kv("bar_pss")
    d = kv("pd") - kv("ram_pd") - kv("bar_pd")
    ov[key] = ov[key] " " o; ps[key] = ps[key] " " p; pd[key] = pd[key] " " d; th[key] = kv("threads")
    printf "run %d %-6s %-7s %d devices: RSS %7.1f MB, guest RAM %6.1f MB in %d mapping(s), BARs %.1f MB, overhead %5.1f MB (Pss %5.1f, private dirty %5.1f), %d threads\n",
        $5, $2, $3, $4, kv("rss") / 1024, kv("ram_rss") / 1024, kv("nram"), kv("bar_rss") / 1024, o / 1024, p / 1024, d / 1024, kv("threads")
    if (kv("nram") == 0) printf "warning: run %d %s %s %d devices: no guest RAM mapping found\n", $5, $2, $3, $4
}
END {
    nb = split(backends, bk, " "); nd = split(devices, dv, " ")
    print ""
    hdr = "| devices |"; sep = "| --- |"
    for (b = 1; b <= nb; b++) { hdr = hdr " p2pvmm " bk[b] " MB |"; sep = sep " --- |" }
    hdr = hdr " QEMU 7.2 MB |"; sep = sep " --- |"
    for (b = 1; b <= nb; b++) { hdr = hdr " ratio " bk[b] "/QEMU |"; sep = sep " --- |" }
    # The newer QEMU: type1 ("qemu-new/legacy") and iommufd; with 0 devices the one type1 boot
    # stands for both, as the one p2pvmm boot ("-") does.
    if (newer != "") {
        hdr = hdr " " newer " type1 MB | " newer " iommufd MB |"; sep = sep " --- | --- |"
        for (b = 1; b <= nb; b++) {
            nbk[b] = bk[b] == "legacy" ? "type1" : "iommufd"
            hdr = hdr " ratio " bk[b] "/" newer " " nbk[b] " |"; sep = sep " --- |"
        }
    }
    worst = 0
    for (i = 1; i <= nd; i++) {
        n = dv[i]; q = median(ov["qemu/legacy/" n]); qp = median(ps["qemu/legacy/" n]); qd = median(pd["qemu/legacy/" n])
        line = sprintf("  %d devices: QEMU %.1f MB (Pss %.1f, private dirty %.1f, %d threads)", n, q / 1024, qp / 1024, qd / 1024, th["qemu/legacy/" n])
        row = sprintf("| %d |", n); rat = ""
        for (b = 1; b <= nb; b++) {
            k = "p2pvmm/" (n == 0 ? "-" : bk[b]) "/" n
            v = median(ov[k]); vp = median(ps[k]); vd = median(pd[k])
            if (v > worst) worst = v
            line = line sprintf("; p2pvmm %s %.1f MB (Pss %.1f, private dirty %.1f, %d threads), ratio %.2f", bk[b], v / 1024, vp / 1024, vd / 1024, th[k], q > 0 ? v / q : 0)
            row = row " " mb(v) " |"
            rat = rat sprintf(" %.2f |", q > 0 ? v / q : 0)
            ratio_line[b] = ratio_line[b] sprintf(" %d dev %.2f,", n, q > 0 ? v / q : 0)
        }
        rows[i] = row " " mb(q) " |" rat
        if (newer != "") {
            for (m = 1; m <= 2; m++) {
                nk[m] = "qemu-new/" (m == 1 || n == 0 ? "legacy" : "iommufd") "/" n
                nv[m] = median(ov[nk[m]])
                line = line sprintf("; %s %s %s MB (Pss %s, private dirty %s, %d threads)", newer,
                    m == 1 ? "type1" : "iommufd", mb(nv[m]), mb(median(ps[nk[m]])), mb(median(pd[nk[m]])), th[nk[m]])
                for (b = 1; b <= nb; b++) if ((bk[b] == "legacy") == (m == 1))
                    line = line sprintf(", ratio p2pvmm %s/%s %s", bk[b], m == 1 ? "type1" : "iommufd",
                        ratio(median(ov["p2pvmm/" (n == 0 ? "-" : bk[b]) "/" n]), nv[m]))
            }
            rows[i] = rows[i] " " mb(nv[1]) " | " mb(nv[2]) " |"
            for (b = 1; b <= nb; b++) {
                r = ratio(median(ov["p2pvmm/" (n == 0 ? "-" : bk[b]) "/" n]), nv[bk[b] == "legacy" ? 1 : 2])
                rows[i] = rows[i] " " r " |"
                new_ratio_line[b] = new_ratio_line[b] sprintf(" %d dev %s,", n, r)
            }
        }
        print line
    }
    print ""
    print "median VMM overhead (RSS minus guest RAM and BAR mappings, MB):"
    print hdr; print sep
    for (i = 1; i <= nd; i++) print rows[i]
    print ""
    for (b = 1; b <= nb; b++) { r = ratio_line[b]; sub(/,$/, "", r); printf "ratio p2pvmm %s/QEMU overhead:%s\n", bk[b], r }
    if (newer != "")
        for (b = 1; b <= nb; b++) {
            r = new_ratio_line[b]; sub(/,$/, "", r)
            printf "ratio p2pvmm %s/%s %s overhead:%s\n", bk[b], newer, nbk[b], r
        }
    else print "newer QEMU: left out (resources/qemu-backports.sh found none, or P2PVMM_BENCH_NEWER_QEMU=0)"
    printf "target p2pvmm overhead <= 7 MB (Cloud Hypervisor): %s (largest median %.1f MB)\n", worst <= 7 * 1024 ? "met" : "MISSED", worst / 1024
}' "$work/console.txt" | tee "$work/results.txt"
# What dominates: the largest overhead mappings of the first run of each configuration.
echo
sed -n 's/^BENCH-TOP //p' "$work/console.txt" |
    awk '{ printf "top %s %s %s devices: Rss %7.1f MB of %8.1f MB %s %s\n", $1, $2, $3, $4 / 1024, $5 / 1024, $6, substr($0, index($0, $7)) }' |
    tee -a "$work/results.txt"
