#!/usr/bin/env bash
# bench-bar-move.sh - a guest BAR move as the guest sees it, p2pvmm vs QEMU 7.2 and the newer QEMU
# (resources/qemu-backports.sh), side by side in the same L1 with the same passed-through ivshmem.
#
# Usage: resources/bench-bar-move.sh [--runs N] [--moves N] [--size 64M|1G|...] [--timeout SECS]
#   --runs N      L2 boots per VMM (default 3), interleaved
#   --moves N     moves of BAR2 per boot (default 20)
#   --size S      ivshmem's BAR2 (default 64M, the lab's own; from 1G a sparse file)
#   --timeout S   L1 wall-clock bound (default 2400)
#   --vmm-times   p2pvmm with -vv: also its own time per config write (trapped write to vCPU
#                 re-entry, its "applied N BAR change(s) in N us" and KVM slot lines), so the
#                 guest-observed time splits into the VMM's part and the rest (exits, refaults)
#
# In L2, tests/src/bin/bar_move_time.rs moves ivshmem's BAR2 as Linux does (memory decoding off,
# low and high dword, decoding on, through the sysfs config file) between the address Linux gave
# it and a free slot of the same window, and times each of the four config writes: the time the
# writing vCPU stood still while the VMM handled the write. Everything a move costs the VMM is
# inside them: its KVM memory slot for the BAR's mmap (deleted at decode off, created at decode
# on), the host device's command register (forwarded by both VMMs: L1's vfio-pci revokes the
# BAR's mmaps and dmabufs at decode off) and the IOMMU mapping of the BAR for peers (p2pvmm:
# its P2P table, dmabuf on iommufd or mmap on type1; QEMU: its vfio listener maps the BAR's
# mmap into the container, or tries to on iommufd).
# VMMs: p2pvmm on iommufd (dmabuf) and on legacy type1, with edu and ivshmem in one flat P2P
# group, each with KVM's default zap of every guest mapping when the BAR's slot goes and with
# `--slot-zap slot` (only the slot's: the guest then does not fault its working set back in); QEMU 7.2 on type1; the newer QEMU on type1 and on iommufd (`-object iommufd`), each
# with `-device vfio-pci,host=<ivshmem>`. All: 1 vCPU, 512 MiB, the lab kernel, `quiet`.
# Prints each boot's median, the medians over boots per VMM, the ratios p2pvmm/QEMU on the same
# backend and the QEMU lines that warn or fail. L1 runs under `flock /tmp/p2pvmm-lab.lock`.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
res=$repo/resources
log() { echo "bench-bar-move: $*" >&2; }
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2; exit 2; }

runs=3 moves=20 size=64M timeout_s=2400 vv=
while (($#)); do
    case $1 in
        --runs) runs=$2; shift 2 ;;
        --moves) moves=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        --vmm-times) vv=-vv; shift ;;
        *) usage ;;
    esac
done
for v in "$runs" "$moves" "$timeout_s"; do
    [[ $v =~ ^[1-9][0-9]*$ ]] || { log "--runs, --moves and --timeout take positive integers"; exit 2; }
done

# shellcheck source=resources/bench-lib.sh
. "$res/bench-lib.sh"
bench_bar_sizes "$size"
((${#size_bytes[@]} == 1 && size_bytes[0] <= 64 << 30)) || { log "--size: one size, at most 64G"; exit 2; }
bytes=${size_bytes[0]}
bench_prepare
bench_qemus
log "building the static bar-move-time"
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" nice cargo build -q --release \
    -p p2pvmm-tests --bin bar-move-time --target x86_64-unknown-linux-gnu --target-dir target/lab)
probe=$repo/target/lab/x86_64-unknown-linux-gnu/release/bar-move-time

work=$repo/target/lab/bench-bar-move
rm -rf "$work" && mkdir -p "$work"
qemu_args=(--qemu-arg -global --qemu-arg q35-pcihost.pci-hole64-size=256G)
if ((bytes != 64 << 20)); then
    bench_ivshmem bench1 "$bytes" "$work/bar.mem"
    trap 'rm -f "$work/bar.mem"' EXIT
fi

cat >"$work/l2.sh" <<L2
shm=
for d in /sys/bus/pci/devices/*; do
    [ "\$(cat \$d/vendor):\$(cat \$d/device)" = 0x1af4:0x1110 ] || continue
    set -- \$(sed -n 3p \$d/resource)
    [ \$((\$2 - \$1 + 1)) -eq $bytes ] && shm=\${d##*/}
done
[ -n "\$shm" ] || { echo "BAR-MOVE-TIME: FAIL no ivshmem of $bytes bytes in L2"; exit 1; }
/lab/bar-move-time \$shm --moves $moves
L2
"$res/mkinitramfs.sh" l2 "$work/l2.cpio.gz" --add "$work/l2.sh:/lab/l2.sh" \
    --add "$probe:/lab/bar-move-time"

qemu_boot="-accel kvm -cpu host,-xsave -m 512 -smp 1 -nographic -no-reboot -vga none -nic none \
-kernel /l2/bzImage -initrd /l2/initramfs.cpio.gz"
cat >"$work/run.sh" <<SCRIPT
# lapic=notscdeadline: see README, "The nested lab".
cmdline="console=ttyS0 panic=-1 lapic=notscdeadline quiet"
dmesg -n 1
bind() {
    d=/sys/bus/pci/devices/\$1
    echo vfio-pci > \$d/driver_override
    [ -e \$d/driver ] && echo \$1 > \$d/driver/unbind
    echo \$1 > /sys/bus/pci/drivers_probe
}
edu= shm=
for d in /sys/bus/pci/devices/*; do
    case "\$(cat \$d/vendor):\$(cat \$d/device)" in
    0x1234:0x11e8) [ -n "\$edu" ] && continue; edu=\${d##*/} ;;
    0x1af4:0x1110)
        set -- \$(sed -n 3p \$d/resource)
        [ \$((\$2 - \$1 + 1)) -eq $bytes ] || continue
        shm=\${d##*/} ;;
    *) continue ;;
    esac
    bind \${d##*/}
done
[ -n "\$edu" ] && [ -n "\$shm" ] || { echo "BENCH-L1 error edu=\$edu ivshmem=\$shm"; exit 1; }
echo "BENCH-L1 vfio edu \$edu ivshmem \$shm"
# Runs a VMM to the end of L2 and keeps the probe's lines (and QEMU's warnings) under its name.
measure() {
    name=\$1; shift
    timeout 900 "\$@" </dev/null 2>&1 | while IFS= read -r line; do
        case \$line in
            *BAR-MOVE-TIME:*) echo "BENCH-MOVE \$name \${line#*BAR-MOVE-TIME: }" ;;
            *"config write at 0x4 applied"*|*"KVM memory slot"*) echo "BENCH-MOVE-VMM \$name \${line#*DEBUG}" ;;
            *rror*|*arning*|*WARN*) echo "BENCH-MOVE-LOG \$name \$line" ;;
        esac
    done
}
i=1
while [ \$i -le $runs ]; do
    for b in iommufd legacy iommufd-slot-zap legacy-slot-zap; do
        zap=all
        case \$b in *-slot-zap) zap=slot ;; esac
        measure p2pvmm-\$b p2pvmm $vv --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz \
            --memory 512M --cmdline "\$cmdline" --device path=\$edu,id=edu,backend=\${b%-slot-zap} \
            --device path=\$shm,id=shm,backend=\${b%-slot-zap} --slot-zap \$zap \
            --p2p-group name=g0,devices=edu:shm,topology=flat
    done
    measure qemu-type1 $qemu $qemu_boot -append "\$cmdline" -device vfio-pci,host=\$shm
    if [ -n "$qemu_new" ]; then
        measure qemu-new-type1 $qemu_new $qemu_boot -append "\$cmdline" -device vfio-pci,host=\$shm
        measure qemu-new-iommufd $qemu_new $qemu_boot -append "\$cmdline" -object iommufd,id=ifd0 \
            -device vfio-pci,host=\$shm,iommufd=ifd0
    fi
    i=\$((i + 1))
done
SCRIPT

bench_l1_image "${initramfs_args[@]}"
log "booting L1: $runs runs of $moves moves of a $size BAR, p2pvmm and QEMU 7.2${qemu_new:+ and $qemu_new_label}"
bench_run_l1 "$work/console.txt" --mem 4096 --timeout "$timeout_s" "${qemu_args[@]}"
grep -q '^BENCH-MOVE .* median ' "$work/console.txt" || { log "no results; console in $work/console.txt"; exit 1; }

awk -v newer="$qemu_new_label" -v size="$size" '
function kv(k,   i, p) { for (i = 3; i <= NF; i++) { split($i, p, "="); if (p[1] == k) return p[2] + 0 }; return -1 }
function median(s,   a, n, i, j, x) {
    n = split(s, a, " ")
    for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > x + 0; j--) a[j + 1] = a[j]; a[j + 1] = x }
    return n ? (n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2) : -1
}
function name(v) {
    if (v == "qemu-type1") return "QEMU 7.2 type1"
    if (v == "qemu-new-type1") return newer " type1"
    if (v == "qemu-new-iommufd") return newer " iommufd"
    return v
}
function r(a, b) { return (a < 0 || b <= 0) ? "-" : sprintf("%.2f", a / b) }
/^BENCH-MOVE-LOG / { if (!seen[$0]++) print "log " substr($0, 16) }
# p2pvmm -vv: its own time for the decode writes, and its KVM slot deletions/creations.
/^BENCH-MOVE-VMM / && /applied/ { if (match($0, /in [0-9]+ us/)) vmm_t[$2] = vmm_t[$2] " " substr($0, RSTART + 3, RLENGTH - 6) + 0 }
/^BENCH-MOVE-VMM / && /KVM memory slot/ && match($0, /(added|deleted) in [0-9]+ us/) {
    split(substr($0, RSTART, RLENGTH), w, " "); slot[$2 SUBSEP w[1]] = slot[$2 SUBSEP w[1]] " " w[3] }
/^BENCH-MOVE / && / FAIL / { print "failed " $2 ": " substr($0, index($0, "FAIL")); failed[$2]++ }
/^BENCH-MOVE / && $3 == "median" {
    v = $2; n[v]++
    if (!(v in order)) { order[v] = ++nv; vmm[nv] = v }
    t[v] = t[v] " " kv("total_us"); off[v] = off[v] " " kv("off_us"); lo[v] = lo[v] " " kv("lo_us")
    hi[v] = hi[v] " " kv("hi_us"); on[v] = on[v] " " kv("on_us")
    printf "run %-17s total %7.0f us: decode off %6d, low dword %5d, high dword %5d, decode on %6d us (median of %d moves)\n", name(v), kv("total_us"), kv("off_us"), kv("lo_us"), kv("hi_us"), kv("on_us"), kv("moves")
}
END {
    print ""
    print "guest-observed BAR move of a " size " BAR, median over boots of each boot'"'"'s median move (us):"
    print "| VMM | boots | whole move | decode off | low dword | high dword | decode on |"
    print "| --- | --- | --- | --- | --- | --- | --- |"
    for (i = 1; i <= nv; i++) {
        v = vmm[i]; m[v] = median(t[v])
        printf "| %s | %d | %.0f | %.0f | %.0f | %.0f | %.0f |\n", name(v), n[v], m[v], median(off[v]), median(lo[v]), median(hi[v]), median(on[v])
    }
    print ""
    for (i = 1; i <= nv; i++) printf "median guest-observed BAR move %s: %.2f ms\n", name(vmm[i]), m[vmm[i]] / 1000
    for (i = 1; i <= nv; i++) {
        v = vmm[i]
        if (v !~ /^p2pvmm-.*-slot-zap$/) continue
        b = v; sub(/-slot-zap$/, "", b); q = (b == "p2pvmm-legacy") ? "qemu-type1" : "qemu-new-iommufd"
        if (b == "p2pvmm-legacy" && ("qemu-new-type1" in m) && m["qemu-new-type1"] < m[q]) q = "qemu-new-type1"
        printf "ratio %s --slot-zap slot/all BAR move: %s; against %s: %s\n", b, r(m[v], m[b]), name(q), r(m[v], m[q])
    }
    if ("qemu-type1" in m) printf "ratio p2pvmm legacy/QEMU 7.2 type1 BAR move: %s; p2pvmm iommufd/QEMU 7.2 type1: %s\n", r(m["p2pvmm-legacy"], m["qemu-type1"]), r(m["p2pvmm-iommufd"], m["qemu-type1"])
    if ("qemu-new-type1" in m) printf "ratio p2pvmm legacy/%s type1 BAR move: %s\n", newer, r(m["p2pvmm-legacy"], m["qemu-new-type1"])
    if ("qemu-new-iommufd" in m) printf "ratio p2pvmm iommufd/%s iommufd BAR move: %s\n", newer, r(m["p2pvmm-iommufd"], m["qemu-new-iommufd"])
    if (newer == "") print "newer QEMU: left out (resources/qemu-backports.sh found none)"
    for (i = 1; i <= nv; i++) {
        v = vmm[i]
        if (vmm_t[v] == "") continue
        printf "median p2pvmm own time per decode write (off or on) %s: %.0f us; KVM slot deletion %.0f us, creation %.0f us\n", v, median(vmm_t[v]), median(slot[v SUBSEP "deleted"]), median(slot[v SUBSEP "added"])
    }
}' "$work/console.txt" | tee "$work/results.txt"
