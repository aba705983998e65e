#!/usr/bin/env bash
# bench-boot.sh - L2 boot time, p2pvmm vs QEMU 7.2 and the newer QEMU from Debian's backports,
# side by side in the same L1 lab guest.
#
# Usage: resources/bench-boot.sh [--runs N] [--cpus N] [--memory MiB] [--timeout SECS]
#                                [--quiet] [--p2pvmm-args ARGS] [--baseline ARGS]
#   --runs N        boots per VMM (default 5), interleaved p2pvmm/QEMU to spread noise evenly
#   --cpus N        L2 vCPUs (default 1); --memory MiB L2 RAM (default 512)
#   --quiet         "quiet" on both L2 command lines: the console is where QEMU loses time, so
#                   report both (console on, and quiet)
#   --p2pvmm-args ARGS  extra p2pvmm arguments, e.g. "--kernel-decompress guest"
#   --baseline ARGS also boot p2pvmm with these arguments instead of --p2pvmm-args (a third
#                   column, "p2pvmm-base"), to measure one optimisation side by side
#
# Both VMMs boot the same lab bzImage and L2 initramfs with the same command line, memory and
# vCPUs on L1's KVM (nested SVM under QEMU TCG). QEMU is Debian's qemu-system-x86_64 copied into
# L1 with its libraries and firmware, `-accel kvm -cpu host,-xsave` (without -xsave, L2 oopses
# under QEMU: lab README); the newer QEMU (resources/qemu-backports.sh; "qemu-new" in the run
# lines) boots the same way when it installs, and is left out with a note when it does not.
# Measured inside L1: wall time from starting the VMM to the L2 init's "P2PVMM-L2:" line (L1
# /proc/uptime, 10 ms resolution), and L2's own uptime when its init reports. Prints each run,
# the medians, the ratios p2pvmm/QEMU (target with --quiet: <= 0.45 of QEMU 7.2, the issue's
# reference; the newer QEMU's ratio beside it) and the medians of p2pvmm's start phases (its -v
# "start phase" lines).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
res=$repo/resources
log() { echo "bench: $*" >&2; }

runs=5 cpus=1 mem=512 timeout_s=1200 quiet='' p2pvmm_args='' baseline='-'
while (($#)); do
    case $1 in
        --runs) runs=$2; shift 2 ;;
        --cpus) cpus=$2; shift 2 ;;
        --memory) mem=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        --quiet) quiet=' quiet'; shift ;;
        --p2pvmm-args) p2pvmm_args=$2; shift 2 ;;
        --baseline) baseline=$2; shift 2 ;;
        *) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2; exit 2 ;;
    esac
done

# shellcheck source=resources/bench-lib.sh
. "$res/bench-lib.sh"
bench_prepare
bench_qemus

work=$repo/target/lab/bench
rm -rf "$work" && mkdir -p "$work"
"$res/mkinitramfs.sh" l2 "$work/l2.cpio.gz"

qemu_boot="-accel kvm -cpu host,-xsave -m $mem -smp $cpus -nographic -no-reboot -vga none \
-nic none -kernel /l2/bzImage -initrd /l2/initramfs.cpio.gz"
measure_new=
[[ -z $qemu_new ]] || measure_new="measure qemu-new $qemu_new $qemu_boot -append \"\$cmdline\""
cat >"$work/run.sh" <<SCRIPT
# lapic=notscdeadline: see README, "The nested lab" (the same for both VMMs).
cmdline="console=ttyS0 panic=-1 lapic=notscdeadline$quiet"
# Runs a VMM and reports when the L2 init speaks; L2's console is consumed, not echoed.
measure() {
    name=\$1; shift
    t0=\$(cut -d' ' -f1 /proc/uptime)
    timeout 300 "\$@" </dev/null 2>&1 | {
        seen=0
        while IFS= read -r line; do
            case \$line in
                *"start phase "*) echo "BENCH-PHASE \$name \${line#*start phase }" ;;
                *"P2PVMM-L2:"*) echo "BENCH-INIT \$name \$t0 \$(cut -d' ' -f1 /proc/uptime) \${line#*P2PVMM-L2: }"; seen=1 ;;
            esac
        done
        [ \$seen = 1 ] || echo "BENCH-FAIL \$name"
    }
}
i=0
while [ \$i -lt $runs ]; do
    measure p2pvmm p2pvmm -v $p2pvmm_args --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz \
        --cpus $cpus --memory ${mem}M --cmdline "\$cmdline"
    if [ "$baseline" != - ]; then
        measure p2pvmm-base p2pvmm -v $baseline --kernel /l2/bzImage \
            --initramfs /l2/initramfs.cpio.gz --cpus $cpus --memory ${mem}M --cmdline "\$cmdline"
    fi
    measure qemu $qemu $qemu_boot -append "\$cmdline"
    $measure_new
    i=\$((i + 1))
done
SCRIPT

bench_l1_image "${initramfs_args[@]}"

base_note=''
[[ $baseline == - ]] || base_note=", p2pvmm-base ($baseline)"
log "booting L1: $runs runs each of p2pvmm${p2pvmm_args:+ ($p2pvmm_args)}, QEMU 7.2\
${qemu_new:+, $qemu_new_label}$base_note\
${quiet:+, quiet} (${cpus} vCPU, ${mem} MiB)"
# A boot that never reached init (seen: a QEMU L2 hung in its boot, as the lab README describes
# for a loaded machine) is listed by bench_run_l1 and left out of the medians (the awk below
# counts it); no boot at all of either VMM fails the benchmark.
bench_run_l1 "$work/console.txt" --timeout "$timeout_s"

awk -v quiet="$quiet" -v newer="$qemu_new_label" '
/BENCH-FAIL/ { failed[$2]++ }
/BENCH-INIT/ { ms = ($4 - $3) * 1000; wall[$2] = wall[$2] " " ms; u = ""
               if (match($0, /uptime_s=[0-9.]+/)) { u = substr($0, RSTART + 9, RLENGTH - 9) * 1000; up[$2] = up[$2] " " u }
               printf "run %-11s start-to-init %6.0f ms, L2 uptime at init %6s ms\n", $2, ms, u }
/BENCH-PHASE/ { name = $2; $1 = $2 = ""; sub(/^ +/, ""); split($0, kv, ": "); v = kv[2] + 0;
                key = name SUBSEP kv[1]; phase[key] = phase[key] " " v; if (!(kv[1] in seen)) { seen[kv[1]] = 1; order[++np] = kv[1] } }
function median(s,   a, n, i, j, x) {
    n = split(s, a, " ")
    for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > x + 0; j--) a[j + 1] = a[j]; a[j + 1] = x }
    return n ? (n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2) : 0
}
END {
    if (wall["p2pvmm"] == "" || wall["qemu"] == "") { print "bench: missing results" > "/dev/stderr"; exit 1 }
    p = median(wall["p2pvmm"]); q = median(wall["qemu"])
    kp = median(up["p2pvmm"]); kq = median(up["qemu"])
    for (name in failed) printf "failed boots: %s %d (not in the medians)\n", name, failed[name]
    printf "\nmedian start-to-init: p2pvmm %.0f ms, QEMU %.0f ms, ratio p2pvmm/QEMU %.2f\n", p, q, p / q
    printf "median L2 uptime at init: p2pvmm %.0f ms, QEMU %.0f ms, ratio %.2f\n", kp, kq, kp / kq
    if (wall["qemu-new"] != "") {
        n = median(wall["qemu-new"]); kn = median(up["qemu-new"])
        printf "median start-to-init, newer QEMU: p2pvmm %.0f ms, %s %.0f ms, ratio p2pvmm/%s %.2f\n", p, newer, n, newer, p / n
        printf "median L2 uptime at init, newer QEMU: p2pvmm %.0f ms, %s %.0f ms, ratio %.2f\n", kp, newer, kn, kp / kn
    } else if (newer != "") print "newer QEMU: no boot reached init" > "/dev/stderr"
    else print "newer QEMU: left out (resources/qemu-backports.sh found none)"
    if (quiet != "") printf "target quiet start-to-init p2pvmm/QEMU <= 0.45: %s (%.2f)\n", (p / q <= 0.45 ? "met" : "MISSED"), p / q
    if (wall["p2pvmm-base"] != "") {
        b = median(wall["p2pvmm-base"]); kb = median(up["p2pvmm-base"])
        printf "median baseline p2pvmm: start-to-init %.0f ms (ratio to QEMU %.2f), L2 uptime %.0f ms; p2pvmm/baseline %.2f\n", b, b / q, kb, p / b
    }
    for (i = 1; i <= np; i++) {
        printf "median start phase %-16s p2pvmm %7.1f ms", order[i] ":", median(phase["p2pvmm" SUBSEP order[i]])
        if (wall["p2pvmm-base"] != "") printf ", baseline %7.1f ms", median(phase["p2pvmm-base" SUBSEP order[i]])
        printf "\n"
    }
}' "$work/console.txt"
