#!/usr/bin/env bash
# run-l1.sh - boot the nested lab's L1 guest under QEMU TCG (emulated IOMMU, edu, ivshmem).
#
# Usage:
#   resources/run-l1.sh --kernel BZ --initrd CPIO [--mem 4096] [--smp 2] [--append EXTRA]
#                       [--timeout SECS] [--silence SECS] [--log FILE] [--edu-romfile FILE]
#                       [--qemu-arg ARG ...]
#     --kernel BZ       L1 kernel (resources/lab-kernel.sh prints its path)
#     --initrd CPIO     L1 initramfs (resources/mkinitramfs.sh l1 ...)
#     --mem MiB         L1 RAM, default 4096 (host memory is allocated lazily)
#     --smp N           L1 vCPUs, default 2
#     --append EXTRA    appended to "console=ttyS0 panic=-1 intel_iommu=on"
#     --timeout SECS    wall-clock bound, default 600; QEMU is killed when it expires
#     --silence SECS    kill QEMU when the console has printed nothing for SECS (default 300,
#                       0: never): a frozen L1 ends early instead of waiting out --timeout
#     --log FILE        also write the console (and QEMU's own messages) to FILE
#     --edu-romfile FILE  give edu an expansion ROM BAR holding FILE (QEMU's romfile property;
#                       an absolute path is safest, QEMU also searches its firmware dirs); the
#                       default is no ROM
#     --qemu-arg ARG    one extra QEMU argument (repeatable), e.g. --qemu-arg -device --qemu-arg nvme,...
#   Env: P2PVMM_QEMU (default qemu-system-x86_64).
#
# The L1 serial console goes to stdout. Exit status: QEMU's (0 after any guest poweroff, reboot
# or panic, because of -no-reboot and panic=-1, so callers must check the console markers), or
# 124 on timeout or silence (the message on stderr and in the log says which).
#
# Each L1 keeps one host core busy under TCG: run at most one or two at a time on 2-core machines.
set -euo pipefail

log() { echo "run-l1: $*" >&2; }
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2; echo >&2; exit 2; }

kernel='' initrd='' mem=4096 smp=2 extra='' timeout_s=600 silence_s=300 logfile='' edu_romfile=''
qemu_extra=()
while (($#)); do
    (($# >= 2)) || { [[ $1 == -h || $1 == --help ]] || log "missing value for $1"; usage; }
    case $1 in
        --kernel) kernel=$2 ;;
        --initrd) initrd=$2 ;;
        --mem) mem=$2 ;;
        --smp) smp=$2 ;;
        --append) extra=$2 ;;
        --timeout) timeout_s=$2 ;;
        --silence) silence_s=$2 ;;
        --log) logfile=$2 ;;
        --edu-romfile) edu_romfile=$2 ;;
        --qemu-arg) qemu_extra+=("$2") ;;
        *) log "unknown argument '$1'"; usage ;;
    esac
    shift 2
done
[[ -n $kernel && -n $initrd ]] || usage
[[ -f $kernel ]] || { log "kernel $kernel not found"; exit 2; }
[[ -f $initrd ]] || { log "initrd $initrd not found"; exit 2; }
[[ $timeout_s =~ ^[0-9]+$ && $silence_s =~ ^[0-9]+$ && $mem =~ ^[0-9]+$ && $smp =~ ^[0-9]+$ ]] || { log "--mem, --smp and --timeout take integers"; exit 2; }
if [[ -n $edu_romfile ]]; then
    [[ -f $edu_romfile ]] || { log "edu ROM file $edu_romfile not found"; exit 2; }
    # A comma would end the property inside QEMU's -device option string.
    [[ $edu_romfile != *,* ]] || { log "edu ROM file path must not contain ','"; exit 2; }
fi

qemu=${P2PVMM_QEMU:-qemu-system-x86_64}
append="console=ttyS0 panic=-1 intel_iommu=on${extra:+ $extra}"

# Flags as measured in /work/shared/lab/README.md:
# - TCG, because this machine's /dev/kvm cannot boot Linux; -cpu max exposes SVM, so kvm_amd
#   works inside L1 (nested paging) and L1's /dev/kvm runs the L2 guests.
# - kernel-irqchip=split + intel-iommu intremap=on: interrupt remapping, needed by VFIO's MSI
#   isolation check; caching-mode=on lets VFIO inside L1 use the emulated IOMMU.
# - edu: a DMA engine; without the 64-bit dma_mask it clamps addresses to 28 bits. With
#   --edu-romfile it also gets an expansion ROM BAR (romfile is a property of every PCI device).
# - ivshmem-plain: BAR2 backed by host RAM, the peer-to-peer DMA target.
# - -no-reboot: a guest reboot or panic (panic=-1) ends QEMU instead of looping.
# shellcheck disable=SC2054 # commas belong to QEMU option values
cmd=(
    "$qemu"
    -machine q35,kernel-irqchip=split -accel tcg -cpu max -m "$mem" -smp "$smp"
    -nographic -no-reboot -vga none -nic none
    -device intel-iommu,intremap=on,caching-mode=on
    -device "edu,dma_mask=0xffffffffffffffff${edu_romfile:+,romfile=$edu_romfile}"
    -object memory-backend-ram,id=shm0,size=64M,share=on -device ivshmem-plain,memdev=shm0
    -kernel "$kernel" -initrd "$initrd" -append "$append"
    "${qemu_extra[@]}"
)

log "timeout ${timeout_s}s, silence ${silence_s}s: ${cmd[*]}"
start=$SECONDS
if [[ -z $logfile ]]; then
    logfile=$(mktemp /tmp/run-l1.XXXXXX.log)
    trap 'rm -f "$logfile" "$logfile.silent"' EXIT
fi
: >"$logfile"
rm -f "$logfile.silent"
# stdin from /dev/null: timeout(1) runs QEMU outside the terminal's foreground process group,
# where reading a tty would stop it (SIGTTIN). -k: SIGKILL if SIGTERM does not end it.
set +e
timeout -k 10 "$timeout_s" "${cmd[@]}" </dev/null > >(tee -a "$logfile") 2>&1 &
qpid=$!
# The silence watchdog: a frozen L1 (one vCPU spinning, userspace starved) prints nothing; the
# console of a working lab run never pauses that long (L2 boots and p2pvmm log as they go).
watchdog=
if ((silence_s > 0)); then
    (
        last=-1 quiet=0
        while kill -0 "$qpid" 2>/dev/null; do
            sleep 5
            size=$(stat -c %s "$logfile" 2>/dev/null || echo 0)
            if [[ $size == "$last" ]]; then quiet=$((quiet + 5)); else quiet=0 last=$size; fi
            if ((quiet >= silence_s)); then
                : >"$logfile.silent"
                kill -TERM "$qpid" 2>/dev/null
                sleep 15
                kill -KILL "$qpid" 2>/dev/null
                pkill -KILL -P "$qpid" 2>/dev/null
                exit 0
            fi
        done
    ) &
    watchdog=$!
fi
wait "$qpid"
rc=$?
[[ -z $watchdog ]] || kill "$watchdog" 2>/dev/null
wait 2>/dev/null
set -e
elapsed=$((SECONDS - start))
if [[ -e $logfile.silent ]]; then
    rm -f "$logfile.silent"
    msg="run-l1: TIMEOUT: L1 console silent for ${silence_s}s after ${elapsed}s, QEMU killed"
    echo "$msg" >&2
    echo "$msg" >>"$logfile"
    exit 124
fi
# 137: QEMU ignored SIGTERM and timeout(1) had to SIGKILL it; still a timeout.
if ((rc == 124 || (rc == 137 && elapsed >= timeout_s))); then
    msg="run-l1: TIMEOUT after ${elapsed}s (limit ${timeout_s}s), QEMU killed"
    echo "$msg" >&2
    echo "$msg" >>"$logfile"
    exit 124
fi
log "QEMU exited with status $rc after ${elapsed}s"
exit "$rc"
