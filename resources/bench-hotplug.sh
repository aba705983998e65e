#!/usr/bin/env bash
# bench-hotplug.sh - hotplug latency in the nested lab, p2pvmm against QEMU in the same L1:
#   plug:   request written (p2pvmm `vm.add-device`, QEMU QMP `device_add`) -> the kernel's
#           `add` uevent for ivshmem in L2 (the device is in L2's sysfs)
#   unplug: request written (`vm.remove-device`, QMP `device_del`) -> `remove` uevent in L2,
#           and -> torn down in the VMM (p2pvmm's log line once the device is released, its P2P
#           mappings gone; QEMU's DEVICE_DELETED event)
# Stamps are CLOCK_REALTIME with microseconds: the clients (api-probe, qmp-probe) stamp the
# request as they write it, L2's uevent-stamp stamps each uevent as the netlink socket wakes it,
# p2pvmm's log and QEMU's events carry their own. L2's clock comes from kvmclock, i.e. from L1's;
# the script prints how far L1 saw L2's "ready" stamp behind L2's clock (a bound on how much
# L2's clock could run behind L1's, which would make L2-side times look shorter than they are).
# QEMU's L2 gets `noxsave` (lab README: its -cpu host CPUID breaks XSAVE setup in L2).
#
# Usage: resources/bench-hotplug.sh [--rounds N] [--timeout SECS] [--topology switch|root-ports]
#   --topology: p2pvmm's group topology (default switch; QEMU's device sits on a root port)
# Prints each round, then medians and p2pvmm/QEMU ratios. Not part of the test command.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
res=$repo/resources
log() { echo "bench-hotplug: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

rounds=5 timeout_s=1500 topology=switch
while (($#)); do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        --topology) topology=$2; shift 2 ;;
        *) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2; exit 2 ;;
    esac
done
qemu=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 not installed"
kernel=$("$res/lab-kernel.sh" | tail -n1)
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release \
    -p vmm --bin p2pvmm -p p2pvmm-tests --bin qmp-probe --bin api-probe --bin uevent-stamp \
    --target x86_64-unknown-linux-gnu --target-dir target/lab)
bin=$repo/target/lab/x86_64-unknown-linux-gnu/release
work=$repo/target/lab/bench-hotplug
mkdir -p "$work"
l2_cmdline="console=ttyS0 panic=-1 lapic=notscdeadline"

# --- L2: stamp ivshmem's arrivals and departures ---------------------------------------------
# L2 stays up after the last event: the VMM's side of the last unplug is still to come.
# Kernel messages off the console: they would land inside the stamp lines (and cost both VMMs
# a VM exit per character).
cat >"$work/l2.sh" <<EOF
dmesg -n 1
/usr/bin/uevent-stamp 1af4:1110 $((2 * rounds))
sleep 600
EOF
"$res/mkinitramfs.sh" l2 "$work/l2.cpio.gz" --add "$work/l2.sh:/lab/l2.sh" \
    --add "$bin/uevent-stamp:/usr/bin/uevent-stamp"

# --- L1: the same rounds under p2pvmm, then under QEMU -----------------------------------------
cat >"$work/run.sh" <<EOF
rounds=$rounds topology=$topology
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
# Waits (up to 200 s, inside run-l1.sh's 300 s silence limit) until file $2 has $3 (default 1)
# lines with $1.
wait_for() {
    n=0
    while [ "$(grep -c "$1" "$2")" -lt "${3:-1}" ]; do
        sleep 0.01; n=$((n + 1))
        [ $n -lt 20000 ] || { echo "L1: timed out waiting for $1"; tail -n 30 "$2"; return 1; }
    done
}
# How far behind L2's clock L1 saw L2's ready stamp (VM output $1).
clock_check() {
    wait_for "UEVENT-STAMP ready" $1 || return 1
    echo "BENCH $2 clock $(grep -m1 'UEVENT-STAMP ready' $1 | cut -d' ' -f3) $(uevent-stamp now)"
}
edu=$(find_dev 0x1234:0x11e8); shm=$(find_dev 0x1af4:0x1110)
bind_vfio $edu; bind_vfio $shm
echo "L1: edu=$edu ivshmem=$shm"

out=/tmp/p2pvmm.out sock=/tmp/api.sock
p2pvmm -v --api-socket $sock --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz \
    --memory 512M --cmdline "$l2_cmdline" --device path=$edu,id=edu \
    --p2p-group name=g,devices=edu,slots=1,topology=$topology >> $out 2>&1 &
vmm=$!
clock_check $out p2pvmm || exit 1
for r in $(seq 1 $rounds); do
    api-probe $sock PUT vm.add-device '{"path":"'$shm'","id":"shm","p2p_group":"g"}' |
        sed "s/^/BENCH p2pvmm $r plug /"
    wait_for "UEVENT-STAMP add" $out $r || exit 1
    sleep 1
    api-probe $sock PUT vm.remove-device '{"id":"shm"}' | sed "s/^/BENCH p2pvmm $r unplug /"
    wait_for "UEVENT-STAMP remove" $out $r || exit 1
    wait_for "shm: ejected by the guest" $out $r || exit 1
    sleep 1
done
grep -E "UEVENT-STAMP (add|remove)|shm: ejected by the guest|shm: hotplugged into slot" $out |
    sed "s/^/BENCH p2pvmm event /"
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
clock_check $out qemu || exit 1
for r in $(seq 1 $rounds); do
    qmp-probe $qmp '{"execute":"device_add","arguments":{"driver":"vfio-pci","host":"'$shm'","bus":"rp1","id":"shm"}}' |
        sed "s/^/BENCH qemu $r plug /"
    wait_for "UEVENT-STAMP add" $out $r || exit 1
    sleep 1
    qmp-probe $qmp '{"execute":"device_del","arguments":{"id":"shm"}}' --wait-event DEVICE_DELETED |
        sed "s/^/BENCH qemu $r unplug /"
    wait_for "UEVENT-STAMP remove" $out $r || exit 1
    sleep 1
done
grep -E "UEVENT-STAMP (add|remove)" $out | sed "s/^/BENCH qemu event /"
qmp-probe $qmp '{"execute":"quit"}' >/dev/null
wait $vmm
EOF
"$res/mkinitramfs.sh" l1 "$work/l1.cpio.gz" \
    --add-binary "$qemu:/usr/bin/qemu-system-x86_64" \
    --add-dir /usr/share/qemu:/usr/share/qemu \
    --add-dir /usr/share/seabios:/usr/share/seabios \
    --add "$bin/p2pvmm:/usr/bin/p2pvmm" --add "$bin/qmp-probe:/usr/bin/qmp-probe" \
    --add "$bin/api-probe:/usr/bin/api-probe" --add "$bin/uevent-stamp:/usr/bin/uevent-stamp" \
    --add "$kernel:/l2/bzImage" \
    --add "$work/l2.cpio.gz:/l2/initramfs.cpio.gz" \
    --add "$work/run.sh:/lab/run.sh"

console=$work/console.log
log "L1 run ($rounds rounds per VMM, p2pvmm group topology $topology), console $console"
flock /tmp/p2pvmm-lab.lock "$res/run-l1.sh" --kernel "$kernel" --initrd "$work/l1.cpio.gz" \
    --timeout "$timeout_s" --log "$console" >/dev/null || true

# --- medians and ratios ------------------------------------------------------------------------
tr -d '\r' <"$console" | grep '^BENCH ' | python3 "$res/bench-hotplug-report.py"
