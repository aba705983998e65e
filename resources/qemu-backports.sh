#!/usr/bin/env bash
# qemu-backports.sh - print the root of a newer QEMU (with iommufd) for the benchmarks' side-by-side
# runs, fetching it from Debian's backports into a private root if it is not cached.
#
# Usage: resources/qemu-backports.sh
#   The LAST line on stdout is the absolute path of a directory holding
#     bin/qemu-system-x86_64   Debian's binary, linked against this machine's libraries
#     share/                   its data dir (pass as -L): qemu-system-data and SeaBIOS's BIOSes
#     version                  the Debian version
#   Exits 1 with a message when the suite has no such QEMU or it does not run here; the benchmarks
#   then leave the newer QEMU out and say so.
#
# Environment:
#   P2PVMM_QEMU_SUITE     suite to fetch from (default: bookworm-backports, QEMU 10 for bookworm)
#   P2PVMM_DEBIAN_MIRROR  Debian mirror URI (default: taken from this machine's apt sources)
#   XDG_CACHE_HOME        cache root (default: $HOME/.cache)
#
# Nothing is installed into the system: the packages are unpacked with dpkg-deb into
#   $XDG_CACHE_HOME/p2pvmm/qemu/<version>/   and   .../qemu/current -> name of that directory
# A cache hit reads the pointer file alone: no network, no apt.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
log() { echo "qemu-backports: $*" >&2; }
fail() { log "ERROR: $*"; exit 1; }

suite=${P2PVMM_QEMU_SUITE:-bookworm-backports}
cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/p2pvmm/qemu
mkdir -p "$cache_root"

cached_root() {
    local dir
    [[ -f $cache_root/current ]] || return 1
    dir=$(<"$cache_root/current")
    [[ -n $dir && -x $cache_root/$dir/bin/qemu-system-x86_64 ]] || return 1
    echo "$cache_root/$dir"
}
if r=$(cached_root); then
    log "cached: $r ($(<"$r/version"))"
    echo "$r"
    exit 0
fi

exec 9>"$cache_root/.lock"
flock 9
if r=$(cached_root); then
    echo "$r"
    exit 0
fi

# shellcheck source=resources/debian-apt.sh
. "$here/debian-apt.sh"
debian_mirror_pick
scratch=$(mktemp -d "${TMPDIR:-/tmp}/p2pvmm-qemu.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
debian_private_apt "$scratch/apt" "$suite"
log "fetching qemu-system-x86 from $suite ($debian_mirror)"
apt-get "${apt_opts[@]}" -q update >"$scratch/apt.log" 2>&1 ||
    fail "apt-get update of $suite failed: $(tail -n 3 "$scratch/apt.log" | tr '\n' ' ')"
version=$(debian_package_version qemu-system-x86 "$suite")
[[ -n $version ]] || fail "$suite has no qemu-system-x86"
# The BIOSes: SeaBIOS from the same suite when it has one (the newer QEMU asks for a newer one).
packages=("qemu-system-x86=$version" "qemu-system-data/$suite")
[[ -n $(debian_package_version seabios "$suite") ]] && packages+=("seabios/$suite") || packages+=(seabios)
mkdir -p "$scratch/deb"
(cd "$scratch/deb" && apt-get "${apt_opts[@]}" -q download "${packages[@]}" >>"$scratch/apt.log" 2>&1) ||
    fail "apt-get download ${packages[*]} failed: $(tail -n 3 "$scratch/apt.log" | tr '\n' ' ')"
for deb in "$scratch"/deb/*.deb; do
    dpkg-deb -x "$deb" "$scratch/pkg"
done

safe_version=$(printf '%s' "$version" | tr -c 'A-Za-z0-9._-' '_')
dest=$cache_root/$safe_version
rm -rf "$dest.tmp"
mkdir -p "$dest.tmp/bin" "$dest.tmp/share"
cp "$scratch/pkg/usr/bin/qemu-system-x86_64" "$dest.tmp/bin/"
# One data dir for -L: the x86 option ROMs and keymaps of qemu-system-data (not the other
# architectures' firmware: the dir goes into L1's initramfs) and the BIOSes, which Debian's build
# looks for in /usr/share/seabios.
(cd "$scratch/pkg/usr/share/qemu" && cp -a keymaps linuxboot*.bin kvmvapic.bin multiboot*.bin \
    pvh.bin qboot.rom "$dest.tmp/share/")
cp "$scratch"/pkg/usr/share/seabios/*.bin "$dest.tmp/share/"
echo "$version" >"$dest.tmp/version"

missing=$(LC_ALL=C ldd "$dest.tmp/bin/qemu-system-x86_64" | awk '/not found/ { print $1 }' | tr '\n' ' ')
[[ -z $missing ]] || fail "QEMU $version needs libraries this machine lacks: $missing"
"$dest.tmp/bin/qemu-system-x86_64" -L "$dest.tmp/share" -device vfio-pci,help 2>/dev/null |
    grep -q 'iommufd=' || fail "QEMU $version does not run here or has no iommufd support"

rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "$safe_version" >"$cache_root/current.tmp"
mv "$cache_root/current.tmp" "$cache_root/current"
log "QEMU $version in $dest"
echo "$dest"
