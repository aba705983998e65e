# bench-p2p-l2.sh - runs in L2 (busybox sh, as /lab/l2.sh) for resources/bench-p2p.sh and
# resources/bench-scale.sh: establish, move and leave each ivshmem's BAR2 mapped for p2pvmm's
# teardown. Markers: BENCH-L2 (tests/src/bin/p2p_chart.rs, resources/bench-scale-report.py).
# L2 kernel command line: bench.moves=N (moves per BAR, default 8); bench.establish=all turns
# memory decoding on for every ivshmem and edu first ("BENCH-L2 established-all" once all are
# on), then moves each BAR; without it each BAR is established just before its own moves.
moves=$(sed -n 's/.*bench\.moves=\([0-9]*\).*/\1/p' /proc/cmdline)
[ -n "$moves" ] || moves=8
all=0
grep -q 'bench\.establish=all' /proc/cmdline && all=1
hex() { printf '0x%x' "$1"; }
# Where each BAR2 is ("bdf/start/end"), kept here: sysfs "resource" keeps the place Linux
# assigned, not what the config writes below move it to.
shms= places=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor"):$(cat "$d/device")" = "0x1af4:0x1110" ] || continue
    set -- $(sed -n 3p "$d/resource")
    echo "BENCH-L2 dev ${d##*/} $(hex $(($1))) $(($2 - $1 + 1))"
    shms="$shms ${d##*/}"
    places="$places ${d##*/}/$(($1))/$(($2))"
done
[ -n "$shms" ] || { echo "BENCH-L2 error no ivshmem in L2"; exit 1; }
# The 64-bit root window (ACPI _CRS: the largest top-level "PCI Bus 0000:00" above 4 GiB).
wstart=0 wend=0
while IFS= read -r l; do
    case "$l" in " "*) continue ;; *"PCI Bus 0000:00"*) ;; *) continue ;; esac
    r=${l%% *}
    s=$((0x${r%-*})) e=$((0x${r#*-}))
    [ $s -ge $((1 << 32)) ] && [ $((e - s)) -gt $((wend - wstart)) ] && wstart=$s wend=$e
done </proc/iomem
[ $wend -gt 0 ] || { echo "BENCH-L2 error no 64-bit window in /proc/iomem"; exit 1; }
if [ $all = 1 ]; then
    for d in /sys/bus/pci/devices/*; do
        case "$(cat "$d/vendor"):$(cat "$d/device")" in 0x1af4:0x1110 | 0x1234:0x11e8) ;; *) continue ;; esac
        cmd=$(( $(od -An -tu2 -j4 -N2 "$d/config") ))
        [ $((cmd & 2)) -ne 0 ] && { echo "BENCH-L2 note ${d##*/} decoding was on"; continue; }
        echo "BENCH-L2 establish ${d##*/}"
        printf '\002\000' | dd of="$d/config" bs=1 seek=4 count=2 conv=notrunc 2>/dev/null
        echo "BENCH-L2 established ${d##*/}"
    done
    echo "BENCH-L2 established-all"
fi
for shm in $shms; do
    cfg=/sys/bus/pci/devices/$shm/config
    set -- $(sed -n 3p /sys/bus/pci/devices/$shm/resource)
    start=$(($1)) size=$(($2 - $1 + 1))
    # Writes a little-endian dword into the function's config space (as tests/tests/p2p.rs).
    wcfg() {
        v=$2
        printf "$(printf '\\%03o\\%03o\\%03o\\%03o' $((v & 255)) $(((v >> 8) & 255)) \
            $(((v >> 16) & 255)) $(((v >> 24) & 255)))" |
            dd of="$cfg" bs=1 seek="$1" count=4 conv=notrunc 2>/dev/null
    }
    if [ $all = 0 ]; then
        cmd=$(( $(od -An -tu2 -j4 -N2 "$cfg") ))
        # Decoding already on (nothing to establish): off first, so the establish is measured.
        [ $((cmd & 2)) -ne 0 ] && { echo "BENCH-L2 note $shm decoding was on"; wcfg 4 0; }
        echo "BENCH-L2 establish $shm"
        wcfg 4 2
        echo "BENCH-L2 established $shm"
    fi
    # The other slot: the first free one of the BAR's size and alignment in the window (a
    # clash with another BAR2 jumps past it).
    others=
    for p in $places; do
        r=${p#*/}
        [ "${p%%/*}" = "$shm" ] || others="$others ${r%/*}:${r#*/}"
    done
    other=$(( (wstart + size - 1) / size * size ))
    while [ $((other + size - 1)) -le $wend ]; do
        clash=-1
        [ $other -eq $start ] && clash=$((start + size - 1))
        for r in $others; do
            [ $clash -lt 0 ] && [ $other -le ${r#*:} ] && [ ${r%:*} -le $((other + size - 1)) ] &&
                clash=${r#*:}
        done
        [ $clash -lt 0 ] && break
        other=$(( (clash + size) / size * size ))
    done
    [ $((other + size - 1)) -le $wend ] || {
        echo "BENCH-L2 error $shm: no free slot of $size bytes in $(hex $wstart)-$(hex $wend)"
        continue
    }
    echo "BENCH-L2 slots $shm $(hex $start) $(hex $other) in $(hex $wstart)-$(hex $wend)"
    cur=$start i=1
    while [ $i -le $moves ]; do
        [ $cur -eq $start ] && to=$other || to=$start
        echo "BENCH-L2 move $shm $i $(hex $cur) $(hex $to)"
        wcfg 4 0
        wcfg 24 $((to & 0xffffffff))
        wcfg 28 $((to >> 32))
        wcfg 4 2
        echo "BENCH-L2 moved $shm $i"
        cur=$to i=$((i + 1))
    done
    rest=
    for p in $places; do
        [ "${p%%/*}" = "$shm" ] || rest="$rest $p"
    done
    places="$rest $shm/$cur/$((cur + size - 1))"
done
echo "BENCH-L2 done"
