#!/usr/bin/env bash
# mkinitramfs.sh - build a gzip'd newc cpio initramfs for the nested lab (L1 or L2 guest).
#
# Usage:
#   resources/mkinitramfs.sh l2 OUT.cpio.gz [OPTIONS]
#   resources/mkinitramfs.sh l1 OUT.cpio.gz [OPTIONS]
# Options (repeatable, accepted for both kinds):
#   --add SRC:DEST          copy file SRC to absolute path DEST in the image (keeps its mode;
#                           a DEST ending in "/" keeps SRC's name; a directory SRC is copied whole)
#   --add-dir SRC:DEST      copy the contents of directory SRC into DEST (e.g. /usr/share/qemu)
#   --add-binary PATH[:DEST] copy a (dynamically linked) executable to DEST (default: PATH) plus
#                           its ELF interpreter and every library ldd lists, at the same absolute
#                           paths as on this machine
#
# Guest behaviour (/init is a busybox sh script; all output goes to /dev/console):
#   l2: mounts proc, sysfs, devtmpfs; runs /lab/l2.sh if present; prints exactly one line
#         P2PVMM-L2: cpus=<online CPUs> memtotal_kb=<MemTotal> uptime_s=<L2's uptime then>
#       then "reboot -f" if the kernel command line contains p2pvmm.l2=reboot, else "poweroff -f".
#   l1: mounts proc, sysfs, devtmpfs, tmpfs on /tmp (and /dev/shm, /run); prints "P2PVMM-L1: up",
#       runs "sh /lab/run.sh" if present, prints "P2PVMM-L1: done rc=<its exit code>" (rc=0 when
#       there is no run.sh), then "poweroff -f".
#
# The tree is built from plain files in a fresh temporary directory: nothing is mounted into it,
# no device nodes are created (the guest's /init mounts devtmpfs on /dev; /dev/console comes from
# the kernel's built-in initramfs), and no guest /init is ever run on this machine.
set -euo pipefail

log() { echo "mkinitramfs: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2; echo >&2; exit 2; }

(($# >= 2)) || usage
kind=$1 out=$2
shift 2
[[ $kind == l1 || $kind == l2 ]] || usage

busybox=${P2PVMM_BUSYBOX:-/bin/busybox}
[[ -x $busybox ]] || die "$busybox not found (install busybox-static)"
# A dynamically linked busybox would not run in the image without its libraries.
if [[ $(LC_ALL=C ldd "$busybox" 2>&1 || true) != *"not a dynamic executable"* ]]; then
    die "$busybox is not statically linked (install busybox-static)"
fi

# Resolve the output path before anything changes directory.
out_dir=$(cd "$(dirname "$out")" 2>/dev/null && pwd) || die "output directory of $out does not exist"
out=$out_dir/$(basename "$out")

tree=$(mktemp -d "${TMPDIR:-/tmp}/p2pvmm-initramfs.XXXXXX")
trap 'rm -rf "$tree"' EXIT

# --- base layout: busybox and its applet links ------------------------------------------------
mkdir -p "$tree"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc,lab}
chmod 1777 "$tree/tmp"
cp "$busybox" "$tree/bin/busybox"
"$busybox" --list-full | while IFS= read -r applet; do
    [[ $applet == bin/busybox || -e $tree/$applet ]] && continue
    ln -s /bin/busybox "$tree/$applet"
done
# Minimal identity files so tools that look up uid 0 (e.g. id, qemu) do not complain.
echo 'root:x:0:0:root:/root:/bin/sh' >"$tree/etc/passwd"
echo 'root:x:0:' >"$tree/etc/group"

# --- extra content ------------------------------------------------------------------------------
# dest_path DEST: absolute in-image path -> path in the tree (rejects relative/".." paths).
dest_path() {
    local d=$1
    [[ $d == /* ]] || die "destination '$d' must be an absolute path"
    [[ /$d/ != */../* ]] || die "destination '$d' must not contain '..'"
    echo "$tree$d"
}
# put SRC TREEPATH: copy one file; --remove-destination so an applet symlink is replaced
# instead of being followed (which would overwrite /bin/busybox in the tree).
put() {
    mkdir -p "$(dirname "$2")"
    cp -L --preserve=mode --remove-destination "$1" "$2"
}

add_file() {
    local src=${1%%:*} dest=${1#*:} t
    [[ $1 == *:* && -n $src && -n $dest ]] || die "--add expects SRC:DEST, got '$1'"
    [[ -e $src ]] || die "--add: $src does not exist"
    t=$(dest_path "$dest")
    [[ $dest == */ ]] && t=$t$(basename "$src")
    if [[ -d $src ]]; then
        mkdir -p "$t"
        cp -a "$src/." "$t/"
    else
        put "$src" "$t"
    fi
}

add_dir() {
    local src=${1%%:*} dest=${1#*:} t
    [[ $1 == *:* && -n $src && -n $dest ]] || die "--add-dir expects SRC:DEST, got '$1'"
    [[ -d $src ]] || die "--add-dir: $src is not a directory"
    t=$(dest_path "$dest")
    mkdir -p "$t"
    # Follow symlinks (firmware dirs such as /usr/share/qemu link to other packages' files);
    # skip dangling ones (links to firmware packages that are not installed) with a warning.
    local f rel
    while IFS= read -r -d '' f; do
        rel=${f#"$src"/}
        if [[ -d $f ]]; then
            mkdir -p "$t/$rel"
        elif [[ -e $f ]]; then
            put "$f" "$t/$rel"
        else
            log "warning: --add-dir: skipping dangling symlink $f"
        fi
    done < <(find -L "$src" -mindepth 1 -print0 2>/dev/null)
}

add_binary() {
    local src=${1%%:*} dest lib
    dest=${1#*:}
    [[ $1 == *:* ]] || dest=$src
    [[ -f $src ]] || die "--add-binary: $src does not exist"
    put "$src" "$(dest_path "$dest")"
    # ldd prints "name => /path (addr)" for libraries and "/path (addr)" for the interpreter;
    # a static binary makes it print "not a dynamic executable" and fail, which is fine.
    local libs
    libs=$(LC_ALL=C ldd "$src" 2>/dev/null || true)
    if grep -q 'not found' <<<"$libs"; then
        die "--add-binary: unresolved libraries of $src: $(grep 'not found' <<<"$libs" | tr -s ' \t\n' ' ')"
    fi
    while IFS= read -r lib; do
        [[ -n $lib ]] && put "$lib" "$(dest_path "$lib")"
    done < <(awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' <<<"$libs")
}

while (($#)); do
    case $1 in
        --add) (($# >= 2)) || usage; add_file "$2"; shift 2 ;;
        --add-dir) (($# >= 2)) || usage; add_dir "$2"; shift 2 ;;
        --add-binary) (($# >= 2)) || usage; add_binary "$2"; shift 2 ;;
        -h | --help) usage ;;
        *) log "unknown argument '$1'"; usage ;;
    esac
done

# --- /init ----------------------------------------------------------------------------------------
common_init='#!/bin/sh
# Generated by p2pvmm resources/mkinitramfs.sh.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The kernel opened /dev/console from its built-in initramfs; reopen it on devtmpfs.
exec </dev/console >/dev/console 2>&1
'

if [[ $kind == l2 ]]; then
    cat >"$tree/init" <<EOF
$common_init
if [ -f /lab/l2.sh ]; then
    sh /lab/l2.sh
    rc=\$?
    [ \$rc -eq 0 ] || echo "p2pvmm-l2: /lab/l2.sh exited rc=\$rc"
fi
# Online CPUs: count the ranges of /sys/devices/system/cpu/online (e.g. "0-1,3").
cpus=\$(awk -F, '{ n = 0; for (i = 1; i <= NF; i++) { split(\$i, r, "-"); n += (r[2] == "" ? 1 : r[2] - r[1] + 1) } print n }' \\
    /sys/devices/system/cpu/online 2>/dev/null)
[ -n "\$cpus" ] || cpus=\$(grep -c ^processor /proc/cpuinfo)
mem=\$(awk '/^MemTotal:/ { print \$2 }' /proc/meminfo)
echo "P2PVMM-L2: cpus=\$cpus memtotal_kb=\$mem uptime_s=\$(cut -d' ' -f1 /proc/uptime)"
if grep -q 'p2pvmm\.l2=reboot' /proc/cmdline; then
    reboot -f
else
    poweroff -f
fi
# Not reached unless the platform ignores both; then init exits and the kernel panics.
sleep 2
EOF
else
    cat >"$tree/init" <<EOF
$common_init
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
echo "P2PVMM-L1: up"
rc=0
if [ -f /lab/run.sh ]; then
    cd /
    sh /lab/run.sh
    rc=\$?
fi
echo "P2PVMM-L1: done rc=\$rc"
poweroff -f
sleep 2
EOF
fi
chmod 0755 "$tree/init"

# --- archive: deterministic order, root-owned, gzip -1 for speed --------------------------------
(cd "$tree" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    gzip -1 -n >"$out.tmp.$$"
mv "$out.tmp.$$" "$out"
log "wrote $out ($kind, $(du -k "$out" | cut -f1) KiB)"
