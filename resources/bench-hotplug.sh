#!/usr/bin/env bash
# bench-hotplug.sh - hotplug latency in the nested lab, p2pvmm against QEMU in the same L1:
#   plug:   API call (p2pvmm `vm.add-device`, QEMU QMP `device_add`) -> ivshmem visible in L2
#   unplug: API call (`vm.remove-device`, QMP `device_del`) -> gone in L2, and -> torn down in
#           the VMM (p2pvmm: `vm.info` no longer lists it, its P2P mappings gone; QEMU:
#           DEVICE_DELETED)
# L2 polls sysfs every 50 ms for both VMMs; times are L1's /proc/uptime (10 ms steps) and include
# starting the client in L1 (`p2pvmm remote`, `qmp-probe`). QEMU's L2 gets `noxsave` (lab README:
# its -cpu host CPUID breaks XSAVE setup in L2).
#
# Usage: resources/bench-hotplug.sh [--rounds N] [--timeout SECS]
# Prints each round, then medians and p2pvmm/QEMU ratios. Not part of the test command.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
res=$repo/resources
log() { echo "bench-hotplug: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

rounds=5 timeout_s=1500
while (($#)); do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        *) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2; exit 2 ;;
    esac
done
qemu=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 not installed"
kernel=$("$res/lab-kernel.sh" | tail -n1)
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release \
    -p vmm --bin p2pvmm -p p2pvmm-tests --bin qmp-probe \
    --target x86_64-unknown-linux-gnu --target-dir target/lab)
bin=$repo/target/lab/x86_64-unknown-linux-gnu/release
work=$repo/target/lab/bench-hotplug
mkdir -p "$work"
l2_cmdline="console=ttyS0 panic=-1 lapic=notscdeadline"

# --- L2: report ivshmem's arrivals and departures --------------------------------------------
cat >"$work/l2.sh" <<EOF
rounds=$rounds
EOF
cat >>"$work/l2.sh" <<'EOF'
present() {
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat $d/vendor):$(cat $d/device)" = 0x1af4:0x1110 ] && return 0
    done
    return 1
}
echo "BENCH-L2-READY"
r=1
while [ $r -le $rounds ]; do
    while ! present; do sleep 0.05; done
    echo "BENCH-PLUGGED $r"
    while present; do sleep 0.05; done
    echo "BENCH-GONE $r"
    r=$((r + 1))
done
EOF
"$res/mkinitramfs.sh" l2 "$work/l2.cpio.gz" --add "$work/l2.sh:/lab/l2.sh"

# --- L1: the same rounds under p2pvmm, then under QEMU -----------------------------------------
cat >"$work/run.sh" <<EOF
rounds=$rounds
l2_cmdline="$l2_cmdline"
EOF
cat >>"$work/run.sh" <<'EOF'
find_dev() {
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat "$d/vendor"):$(cat "$d/device")" = "$1" ] && echo "${d##*/}" && return 0
    done
    return 1
}
bind_vfio() {
    d=/sys/bus/pci/devices/$1
    echo vfio-pci >"$d/driver_override"
    [ -e "$d/driver" ] && echo "$1" >"$d/driver/unbind"
    echo "$1" >/sys/bus/pci/drivers_probe
}
now() { cut -d' ' -f1 /proc/uptime; }
# Waits (up to 300 s) for a line with $1 in file $2.
wait_for() {
    n=0
    while ! grep -q "$1" "$2"; do
        sleep 0.01; n=$((n + 1))
        [ $n -lt 30000 ] || { echo "L1: timed out waiting for $1"; tail -n 30 "$2"; return 1; }
    done
}
edu=$(find_dev 0x1234:0x11e8); shm=$(find_dev 0x1af4:0x1110)
bind_vfio $edu; bind_vfio $shm
echo "L1: edu=$edu ivshmem=$shm"

out=/tmp/p2pvmm.out sock=/tmp/api.sock
p2pvmm --api-socket $sock --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz --memory 512M \
    --cmdline "$l2_cmdline" --device path=$edu,id=edu --p2p-group name=g,devices=edu,slots=1 \
    >> $out 2>&1 &
vmm=$!
wait_for BENCH-L2-READY $out || exit 1
for r in $(seq 1 $rounds); do
    t0=$(now)
    p2pvmm remote --api-socket $sock add-device path=$shm,id=shm,p2p_group=g >/dev/null
    wait_for "BENCH-PLUGGED $r" $out; t1=$(now)
    sleep 1
    t2=$(now)
    p2pvmm remote --api-socket $sock remove-device shm
    wait_for "BENCH-GONE $r" $out; t3=$(now)
    while p2pvmm remote --api-socket $sock info | grep -q '^shm '; do sleep 0.01; done; t4=$(now)
    echo "BENCH p2pvmm round $r plug $t0 $t1 unplug $t2 $t3 $t4"
    sleep 1
done
p2pvmm remote --api-socket $sock shutdown-vmm
wait $vmm

out=/tmp/qemu.out qmp=/tmp/qmp.sock
/usr/bin/qemu-system-x86_64 -machine q35 -accel kvm -cpu host -m 512 -smp 1 -nographic \
    -no-reboot -vga none -nic none -qmp unix:$qmp,server=on,wait=off \
    -device pcie-root-port,id=rp0,chassis=1,slot=1 -device vfio-pci,host=$edu,bus=rp0 \
    -device pcie-root-port,id=rp1,chassis=2,slot=2 \
    -kernel /l2/bzImage -initrd /l2/initramfs.cpio.gz -append "$l2_cmdline noxsave" \
    </dev/null >> $out 2>&1 &
vmm=$!
wait_for BENCH-L2-READY $out || exit 1
for r in $(seq 1 $rounds); do
    t0=$(now)
    qmp-probe $qmp '{"execute":"device_add","arguments":{"driver":"vfio-pci","host":"'$shm'","bus":"rp1","id":"shm"}}' >/dev/null
    wait_for "BENCH-PLUGGED $r" $out; t1=$(now)
    sleep 1
    t2=$(now)
    qmp-probe $qmp '{"execute":"device_del","arguments":{"id":"shm"}}' --wait-event DEVICE_DELETED > /tmp/qmp.del &
    del=$!
    wait_for "BENCH-GONE $r" $out; t3=$(now)
    wait $del; t4=$(now)
    echo "BENCH qemu round $r plug $t0 $t1 unplug $t2 $t3 $t4"
    sleep 1
done
qmp-probe $qmp '{"execute":"quit"}' >/dev/null
wait $vmm
EOF
"$res/mkinitramfs.sh" l1 "$work/l1.cpio.gz" \
    --add-binary "$qemu:/usr/bin/qemu-system-x86_64" \
    --add-dir /usr/share/qemu:/usr/share/qemu \
    --add-dir /usr/share/seabios:/usr/share/seabios \
    --add "$bin/p2pvmm:/usr/bin/p2pvmm" --add "$bin/qmp-probe:/usr/bin/qmp-probe" \
    --add "$kernel:/l2/bzImage" \
    --add "$work/l2.cpio.gz:/l2/initramfs.cpio.gz" \
    --add "$work/run.sh:/lab/run.sh"

console=$work/console.log
log "L1 run ($rounds rounds per VMM), console $console"
flock /tmp/p2pvmm-lab.lock "$res/run-l1.sh" --kernel "$kernel" --initrd "$work/l1.cpio.gz" \
    --timeout "$timeout_s" --log "$console" >/dev/null || true

# --- medians and ratios ------------------------------------------------------------------------
tr -d '\r' <"$console" | grep '^BENCH ' | awk '
    { vmm = $2; n[vmm]++; plug[vmm, n[vmm]] = $6 - $5; gone[vmm, n[vmm]] = $9 - $8
      done_[vmm, n[vmm]] = $10 - $8; print }
    function median(a, vmm, k,   i, j, t, v) {
        for (i = 1; i <= k; i++) v[i] = a[vmm, i]
        for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
        return k % 2 ? v[(k + 1) / 2] : (v[k / 2] + v[k / 2 + 1]) / 2
    }
    END {
        for (vmm in n) {
            p[vmm] = median(plug, vmm, n[vmm]); g[vmm] = median(gone, vmm, n[vmm]); d[vmm] = median(done_, vmm, n[vmm])
            printf "median %-6s (%d rounds): plug %.2f s, unplug: gone in L2 %.2f s, torn down %.2f s\n", vmm, n[vmm], p[vmm], g[vmm], d[vmm]
        }
        if (("p2pvmm" in n) && ("qemu" in n) && p["qemu"] > 0 && g["qemu"] > 0)
            printf "p2pvmm/QEMU: plug %.2f x, unplug (gone in L2) %.2f x, torn down %.2f x\n", p["p2pvmm"] / p["qemu"], g["p2pvmm"] / g["qemu"], d["p2pvmm"] / d["qemu"]
    }'
