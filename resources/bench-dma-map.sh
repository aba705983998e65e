#!/usr/bin/env bash
# bench-dma-map.sh - time to map guest RAM into the host IOMMU for VFIO DMA, per backend:
# iommufd (IOMMU_IOAS_MAP_FILE of the guest RAM memfd) vs legacy type1 (VFIO_IOMMU_MAP_DMA by
# address of anonymous RAM advised for huge pages), measured by p2pvmm itself inside the L1 lab
# guest with edu passed through.
#
# Usage: resources/bench-dma-map.sh [--runs N] [--sizes "1024 2048"]
# Prints each run and the median milliseconds per GiB for each backend, and their ratio.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
res=$repo/resources
log() { echo "bench-dma-map: $*" >&2; }

runs=3 sizes="1024 2048"
while (($#)); do
    case $1 in
        --runs) runs=$2; shift 2 ;;
        --sizes) sizes=$2; shift 2 ;;
        *) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2; exit 2 ;;
    esac
done

"$res/setup.sh"
kernel=$("$res/lab-kernel.sh" | tail -n1)
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release -p vmm \
    --bin p2pvmm --target x86_64-unknown-linux-gnu --target-dir target/lab)
work=$repo/target/lab/bench-dma-map
rm -rf "$work" && mkdir -p "$work"
"$res/mkinitramfs.sh" l2 "$work/l2.cpio.gz"

cat >"$work/run.sh" <<SCRIPT
d=/sys/bus/pci/devices/0000:00:01.0
echo vfio-pci > \$d/driver_override
[ -e \$d/driver ] && echo 0000:00:01.0 > \$d/driver/unbind
echo 0000:00:01.0 > /sys/bus/pci/drivers_probe
i=0
while [ \$i -lt $runs ]; do
    for mem in $sizes; do
        for backend in iommufd legacy; do
            timeout 300 p2pvmm -v --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz \
                --memory \${mem}M --cmdline "console=ttyS0 panic=-1 lapic=notscdeadline" --serial off \
                --device path=0000:00:01.0,id=edu,backend=\$backend 2>&1 |
                sed -n "s/.*guest RAM .* allocated in \(.*\), mapped into the IOMMU (\([A-Za-z0-9]*\)) in \(.*\)/BENCH-MAP \$backend \$mem \3 \1/p"
        done
    done
    i=\$((i + 1))
done
SCRIPT

"$res/mkinitramfs.sh" l1 "$work/l1.cpio.gz" \
    --add "$repo/target/lab/x86_64-unknown-linux-gnu/release/p2pvmm:/usr/bin/p2pvmm" \
    --add "$kernel:/l2/bzImage" --add "$work/l2.cpio.gz:/l2/initramfs.cpio.gz" \
    --add "$work/run.sh:/lab/run.sh"
log "booting L1"
"$res/run-l1.sh" --kernel "$kernel" --initrd "$work/l1.cpio.gz" --mem 6144 --timeout 1800 \
    --log "$work/l1-console.log" >/dev/null || true
tr -d '\r' <"$work/l1-console.log" | grep BENCH-MAP >"$work/results.txt" || {
    log "no results; console in $work/l1-console.log"
    exit 1
}
# Durations are Rust Debug durations: 1.23s, 456.7ms, 89µs or 0ns. On iommufd p2pvmm allocates
# guest RAM (fallocate) before mapping it, so that map time is the IOMMU work alone; type1
# faults pages in inside its map.
awk '
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
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{ per = ms($4) / ($3 / 1024); alloc = ms($5) / ($3 / 1024)
  printf "run %-8s %5d MiB  map %9.1f ms (%.1f ms/GiB), page allocation before it %.1f ms/GiB\n", $2, $3, ms($4), per, alloc
  all[$2] = all[$2] " " per; total[$2] = total[$2] " " (per + alloc) }
END {
    i = median(all["iommufd"]); l = median(all["legacy"])
    printf "\nmedian map time per GiB of guest RAM: iommufd (MAP_FILE of the memfd) %.1f ms, legacy type1 (MAP_DMA by address) %.1f ms, ratio %.2f\n", i, l, i / l
    ti = median(total["iommufd"]); tl = median(total["legacy"])
    printf "median total (allocation + map) per GiB: iommufd %.0f ms, legacy %.0f ms, ratio %.2f\n", ti, tl, ti / tl
}' "$work/results.txt"
