# bench-lib.sh - the steps every nested-lab benchmark takes the same way. Sourced by the
# resources/bench-*.sh scripts after they set $repo, $res, $work and log().

# Sets the lab up (Debian packages, the cached lab kernel: $kernel) and builds the static p2pvmm
# that L1 runs ($p2pvmm): crt-static on the gnu target, as L1 has no libc.
bench_prepare() {
    "$res/setup.sh"
    kernel=$("$res/lab-kernel.sh" | tail -n1)
    log "building the static p2pvmm"
    (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" nice cargo build -q --release \
        -p vmm --bin p2pvmm --target x86_64-unknown-linux-gnu --target-dir target/lab)
    p2pvmm=$repo/target/lab/x86_64-unknown-linux-gnu/release/p2pvmm
}

# Parses a list of BAR sizes ("4M 1G 64G") into $size_bytes: bytes, each once, smallest first;
# each a power of two of at least 1 MiB. Exits 2 naming a bad size.
bench_bar_sizes() {
    local s b
    size_bytes=()
    for s in $1; do
        [[ $s =~ ^[1-9][0-9]*[MmGg]$ ]] || { log "size '$s': a number with M or G"; exit 2; }
        case $s in
            *[Gg]) b=$((${s%[Gg]} << 30)) ;;
            *) b=$((${s%[Mm]} << 20)) ;;
        esac
        ((b >= 1 << 20 && (b & (b - 1)) == 0)) ||
            { log "size '$s': a power of two, at least 1M"; exit 2; }
        size_bytes+=("$b")
    done
    ((${#size_bytes[@]})) || return 0
    mapfile -t size_bytes < <(printf '%s\n' "${size_bytes[@]}" | sort -n -u)
}

# Adds to the run-l1.sh arguments in $qemu_args an ivshmem-plain of BYTES whose memory backend
# is ID: RAM below 1 GiB, from 1 GiB on the sparse file FILE (a few pages of disk).
bench_ivshmem() {
    local id=$1 bytes=$2 file=$3 backend
    if ((bytes >= 1 << 30)); then
        truncate -s "$bytes" "$file"
        backend="memory-backend-file,id=$id,size=$bytes,mem-path=$file,share=on"
    else
        backend="memory-backend-ram,id=$id,size=$bytes,share=on"
    fi
    qemu_args+=(--qemu-arg -object --qemu-arg "$backend"
        --qemu-arg -device --qemu-arg "ivshmem-plain,memdev=$id")
}

# Boots L1 from $work/l1.cpio.gz under the lab lock (one lab at a time: P2PVMM_LAB_LOCK,
# /tmp/p2pvmm-lab.lock by default) with the further run-l1.sh arguments given, writes its
# console without CRs to CONSOLE, warns when L1 did not finish and shows its BENCH-L1,
# BENCH-FAIL and BENCH-QEMU-LOG lines.
bench_run_l1() {
    local console=$1 lock=${P2PVMM_LAB_LOCK:-/tmp/p2pvmm-lab.lock} started=$SECONDS
    shift
    log "waiting for the lab lock $lock"
    flock "$lock" "$res/run-l1.sh" --kernel "$kernel" --initrd "$work/l1.cpio.gz" \
        --log "$work/l1-console.log" "$@" >/dev/null || true
    log "L1 ran $((SECONDS - started)) s (lock wait included)"
    tr -d '\r' <"$work/l1-console.log" >"$console"
    grep -q 'P2PVMM-L1: done' "$console" ||
        log "warning: L1 did not finish (timeout or crash); reporting what it printed"
    grep -E '^BENCH-(L1|FAIL|QEMU-LOG)' "$console" >&2 || true
}

# Builds L1's initramfs $work/l1.cpio.gz: p2pvmm, the lab kernel and $work/l2.cpio.gz for L2,
# $work/run.sh as L1's script, and the further mkinitramfs.sh arguments given.
bench_l1_image() {
    "$res/mkinitramfs.sh" l1 "$work/l1.cpio.gz" \
        --add "$p2pvmm:/usr/bin/p2pvmm" --add "$kernel:/l2/bzImage" \
        --add "$work/l2.cpio.gz:/l2/initramfs.cpio.gz" --add "$work/run.sh:/lab/run.sh" "$@"
}

# Both QEMUs for the side-by-side runs: sets $qemu (Debian's QEMU 7.2, the same path in L1),
# starts $initramfs_args with its files (binary, libraries, firmware) and adds the newer QEMU's
# (bench_newer_qemu below).
bench_qemus() {
    qemu=$(command -v qemu-system-x86_64)
    initramfs_args=(--add-binary "$qemu" --add-dir /usr/share/qemu:/usr/share/qemu
        --add-dir /usr/share/seabios:/usr/share/seabios)
    bench_newer_qemu
}

# The newer QEMU from Debian's backports (resources/qemu-backports.sh, iommufd-capable), run in L1
# from /opt/qemu-new beside Debian's QEMU 7.2. Sets $qemu_new (its command in L1, -L included;
# empty when there is none: the benchmark then leaves it out and says so), $qemu_new_label
# ("QEMU 10.0.2") and adds its files to the mkinitramfs arguments in $initramfs_args.
# P2PVMM_BENCH_NEWER_QEMU=0 leaves it out on purpose.
bench_newer_qemu() {
    local root version
    qemu_new= qemu_new_label=
    if [[ ${P2PVMM_BENCH_NEWER_QEMU:-1} == 0 ]]; then
        log "the newer QEMU is left out (P2PVMM_BENCH_NEWER_QEMU=0)"
        return 0
    fi
    if ! root=$("$res/qemu-backports.sh" | tail -n1) || [[ ! -x $root/bin/qemu-system-x86_64 ]]; then
        log "the newer QEMU is left out: resources/qemu-backports.sh found none (its message above)"
        return 0
    fi
    version=$(<"$root/version")
    version=${version#*:}
    qemu_new_label="QEMU ${version%%[+~-]*}"
    qemu_new="/opt/qemu-new/bin/qemu-system-x86_64 -L /opt/qemu-new/share"
    initramfs_args+=(--add-binary "$root/bin/qemu-system-x86_64:/opt/qemu-new/bin/qemu-system-x86_64"
        --add-dir "$root/share:/opt/qemu-new/share")
    log "side by side also with $qemu_new_label ($root)"
}
