#!/bin/sh
# l1-smoke.sh - lab self-test, meant to run inside L1 as /lab/run.sh (busybox sh).
#
# Usage (on the host):
#   resources/mkinitramfs.sh l1 l1.cpio.gz --add resources/l1-smoke.sh:/lab/run.sh [...]
#   resources/run-l1.sh --kernel "$(resources/lab-kernel.sh | tail -n1)" --initrd l1.cpio.gz
# Checks what p2pvmm needs from L1: /dev/kvm (kvm_amd), /dev/iommu, /dev/vfio, the PCI devices
# with their IOMMU groups, and binding edu (1234:11e8) and ivshmem (1af4:1110) to vfio-pci
# (group node and cdev). Optional reference boot: if the image also holds
# /usr/bin/qemu-system-x86_64 (mkinitramfs --add-binary, firmware via --add-dir) and
# /l2/bzImage + /l2/initramfs.cpio.gz, QEMU/KVM boots that L2 image once with poweroff and once
# with p2pvmm.l2=reboot, and the L2 marker must appear both times.
# Exit status 0 if every check passed (L1 then prints "P2PVMM-L1: done rc=0").

fail=0
ok() { echo "smoke: ok   $*"; }
bad() { echo "smoke: FAIL $*"; fail=1; }
exists() { if [ -e "$1" ]; then ok "$1 exists"; else bad "$1 missing"; fi; }

echo "smoke: kernel $(uname -r), cmdline: $(cat /proc/cmdline)"
echo "smoke: cpus online $(cat /sys/devices/system/cpu/online), $(grep MemTotal /proc/meminfo)"
exists /dev/kvm
exists /dev/iommu
exists /dev/vfio/vfio
if [ -d /sys/module/kvm_amd ]; then ok "kvm_amd present"; else bad "kvm_amd not present"; fi
if grep -qw svm /proc/cpuinfo; then ok "cpu has svm"; else bad "cpu lacks svm"; fi

# lspci-like listing from sysfs.
for d in /sys/bus/pci/devices/*; do
    drv=-
    [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
    grp=-
    [ -e "$d/iommu_group" ] && grp=$(basename "$(readlink "$d/iommu_group")")
    echo "smoke: pci ${d##*/} $(sed s/0x// "$d/vendor"):$(sed s/0x// "$d/device") class=$(cat "$d/class") driver=$drv iommu_group=$grp"
done

# find_dev VENDOR DEVICE: sysfs path of the first matching PCI device.
find_dev() {
    for d in /sys/bus/pci/devices/*; do
        if [ "$(cat "$d/vendor")" = "0x$1" ] && [ "$(cat "$d/device")" = "0x$2" ]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

for id in 1234:11e8 1af4:1110; do
    d=$(find_dev "${id%:*}" "${id#*:}") || { bad "no PCI device $id"; continue; }
    bdf=${d##*/}
    echo vfio-pci >"$d/driver_override"
    [ -e "$d/driver" ] && echo "$bdf" >"$d/driver/unbind"
    echo "$bdf" >/sys/bus/pci/drivers_probe
    drv=$(basename "$(readlink "$d/driver" 2>/dev/null)" 2>/dev/null)
    if [ "$drv" = vfio-pci ]; then ok "$id ($bdf) bound to vfio-pci"; else bad "$id ($bdf) driver is '$drv'"; fi
    grp=$(basename "$(readlink "$d/iommu_group")")
    exists "/dev/vfio/$grp"
    cdev=
    for c in "$d"/vfio-dev/vfio*; do [ -e "$c" ] && cdev=${c##*/} && break; done
    if [ -n "$cdev" ]; then exists "/dev/vfio/devices/$cdev"; else bad "$id has no vfio-dev cdev"; fi
    bar2=$(sed -n 3p "$d/resource")
    echo "smoke: $id BAR2 $bar2"
done
# shellcheck disable=SC2012 # a listing for humans
ls -l /dev/vfio /dev/vfio/devices 2>&1 | sed 's/^/smoke: /'

# Optional: reference L2 boot with QEMU on L1's KVM. -cpu host,-xsave: L1's KVM reports CPUID leaf
# 0xD sizes that do not match, and L2 oopses in XSAVE setup otherwise (lab README; "noxsave" on
# L2's command line works too).
if [ -x /usr/bin/qemu-system-x86_64 ] && [ -f /l2/bzImage ] && [ -f /l2/initramfs.cpio.gz ]; then
    for mode in poweroff reboot; do
        extra=
        [ $mode = reboot ] && extra=p2pvmm.l2=reboot
        start=$(cut -d' ' -f1 /proc/uptime)
        timeout 180 /usr/bin/qemu-system-x86_64 -accel kvm -cpu host,-xsave -m 512 -smp 2 \
            -nographic -no-reboot -vga none -nic none \
            -kernel /l2/bzImage -initrd /l2/initramfs.cpio.gz \
            -append "console=ttyS0 panic=-1 $extra" </dev/null >/tmp/l2.log 2>&1
        rc=$?
        end=$(cut -d' ' -f1 /proc/uptime)
        sed 's/^/smoke: l2| /' /tmp/l2.log
        if grep -q '^P2PVMM-L2: cpus=2 memtotal_kb=[0-9]' /tmp/l2.log && [ $rc -eq 0 ]; then
            ok "L2 under QEMU/KVM ($mode): marker seen, qemu rc=0, $start -> $end s L1 uptime"
        else
            bad "L2 under QEMU/KVM ($mode): rc=$rc, marker missing or wrong"
        fi
    done
fi

echo "smoke: result fail=$fail"
exit $fail
