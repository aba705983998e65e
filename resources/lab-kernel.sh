#!/usr/bin/env bash
# lab-kernel.sh - print the path of the nested-lab guest kernel, building it if it is not cached.
#
# Usage: resources/lab-kernel.sh
#   The LAST line on stdout is the absolute path of a bzImage (progress goes to stderr).
#   The same bzImage serves as L1 and L2 kernel (see /work/shared/lab/README.md).
#
# Environment:
#   P2PVMM_KERNEL_FRAGMENT  config fragment to merge over tinyconfig
#                           (default: resources/kernel-config.fragment, the repo's copy, so the
#                           cache key follows the repository)
#   P2PVMM_DEBIAN_MIRROR    Debian mirror URI (default: taken from this machine's apt sources)
#   P2PVMM_KERNEL_SUITE     suite to fetch the source from (default: trixie-backports)
#   P2PVMM_KERNEL_PACKAGE   source package (default: linux-source-7.3)
#   XDG_CACHE_HOME          cache root (default: $HOME/.cache)
#
# Cache layout (outside the repository, so CI and later runs reuse it):
#   $XDG_CACHE_HOME/p2pvmm/kernel/<source-version>-<sha256(fragment):12>/{bzImage,config}
#   $XDG_CACHE_HOME/p2pvmm/kernel/by-fragment/<sha256(fragment):12>  -> name of that directory
# A cache hit is resolved from the pointer file alone: no network, no apt, takes milliseconds.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
log() { echo "lab-kernel: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# --- which fragment ----------------------------------------------------------------------------
fragment=${P2PVMM_KERNEL_FRAGMENT:-}
if [[ -z $fragment ]]; then
    for f in "$here/kernel-config.fragment" "$here/../../shared/lab/kernel-config.fragment"; do
        if [[ -f $f ]]; then fragment=$f; break; fi
    done
fi
[[ -n $fragment && -f $fragment ]] || die "kernel config fragment not found (set P2PVMM_KERNEL_FRAGMENT)"
fragment=$(cd "$(dirname "$fragment")" && pwd)/$(basename "$fragment")
frag_hash=$(sha256sum "$fragment" | cut -c1-12)

cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/p2pvmm/kernel
mkdir -p "$cache_root/by-fragment"

# Fast path: the pointer file names the cached build for this fragment.
cached_path() {
    local ptr="$cache_root/by-fragment/$frag_hash" dir
    [[ -f $ptr ]] || return 1
    dir=$(<"$ptr")
    [[ -n $dir && -s $cache_root/$dir/bzImage ]] || return 1
    echo "$cache_root/$dir/bzImage"
}
if p=$(cached_path); then
    log "cached: $p"
    echo "$p"
    exit 0
fi

# Serialize builds (CI and a test harness may call us at the same time); re-check after locking.
exec 9>"$cache_root/.lock"
flock -n 9 || { log "waiting for another build (lock $cache_root/.lock)"; flock 9; }
if p=$(cached_path); then
    log "cached (built by a concurrent run): $p"
    echo "$p"
    exit 0
fi

suite=${P2PVMM_KERNEL_SUITE:-trixie-backports}
package=${P2PVMM_KERNEL_PACKAGE:-linux-source-7.3}
required=(CONFIG_IOMMUFD CONFIG_VFIO_PCI_DMABUF CONFIG_KVM_AMD CONFIG_VFIO_DEVICE_CDEV CONFIG_ACPI)

# The machine's own Debian mirror, never a hard-coded host, and a private apt root.
# shellcheck source=resources/debian-apt.sh
. "$here/debian-apt.sh"

# --- scratch dir (deleted afterwards; only plain files, nothing mounted) ------------------------
scratch=$(mktemp -d "${TMPDIR:-/tmp}/p2pvmm-kernel.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
buildlog="$cache_root/build-$frag_hash.log"
: >"$buildlog"
fail() {
    log "ERROR: $*"
    log "---- last 60 lines of $buildlog ----"
    tail -n 60 "$buildlog" >&2 || true
    exit 1
}
run() { "$@" >>"$buildlog" 2>&1 || fail "command failed: $*"; }

# Private apt configuration (resources/debian-apt.sh).
debian_mirror_pick
log "fragment $fragment (sha256 $frag_hash), mirror $debian_mirror, suite $suite; build log: $buildlog"
apt_dir=$scratch/apt
debian_private_apt "$apt_dir" "$suite"
mkdir -p "$apt_dir/deb"

t0=$SECONDS
log "fetching $package from $suite"
run apt-get "${apt_opts[@]}" -q update
version=$(debian_package_version "$package" "$suite")
[[ -n $version ]] || fail "$package not found in $suite"
(cd "$apt_dir/deb" && run apt-get "${apt_opts[@]}" -q download "$package=$version")
debs=("$apt_dir/deb"/*.deb)
[[ -f ${debs[0]} ]] || fail "apt-get download produced no .deb"
deb=${debs[0]}
log "got $(basename "$deb") after $((SECONDS - t0)) s"

src=$scratch/src
mkdir -p "$src"
run dpkg-deb -x "$deb" "$scratch/pkg"
tarballs=("$scratch"/pkg/usr/src/linux-source-*.tar.*)
[[ -f ${tarballs[0]} ]] || fail "no source tarball in $deb"
tarball=${tarballs[0]}
run tar -xf "$tarball" -C "$src" --strip-components=1
rm -rf "$scratch/pkg" "$apt_dir/cache"

# --- configure and build ------------------------------------------------------------------------
# ARCH=x86_64 explicitly: with ARCH=x86, tinyconfig (allnoconfig based) would pick a 32-bit kernel.
mk=(make -C "$src" ARCH=x86_64 -j"$(nproc)")
log "configuring (tinyconfig + fragment)"
run "${mk[@]}" tinyconfig
run env ARCH=x86_64 "$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$fragment"
run "${mk[@]}" olddefconfig

missing=()
for opt in "${required[@]}"; do
    grep -qx "$opt=y" "$src/.config" || missing+=("$opt")
done
((${#missing[@]} == 0)) || fail "kernel .config lacks required options: ${missing[*]}"
# Report (without failing) fragment options that Kconfig dropped, e.g. unmet dependencies.
while IFS= read -r want; do
    grep -qx "$want" "$src/.config" || log "warning: fragment asked for '$want' but .config differs"
done < <(grep -E '^CONFIG_[A-Za-z0-9_]+=' "$fragment")

log "building bzImage with $(nproc) jobs (takes ~5 min on 2 cores)"
run "${mk[@]}" bzImage
[[ -s $src/arch/x86/boot/bzImage ]] || fail "bzImage was not produced"

# --- install into the cache atomically ------------------------------------------------------------
safe_version=$(printf '%s' "$version" | tr -c 'A-Za-z0-9._-' '_')
name="$safe_version-$frag_hash"
dest=$cache_root/$name
rm -rf "$dest.tmp"
mkdir -p "$dest.tmp"
cp "$src/arch/x86/boot/bzImage" "$dest.tmp/bzImage"
cp "$src/.config" "$dest.tmp/config"
cp "$fragment" "$dest.tmp/kernel-config.fragment"
echo "$package $version ($suite)" >"$dest.tmp/source"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "$name" >"$cache_root/by-fragment/$frag_hash.tmp"
mv "$cache_root/by-fragment/$frag_hash.tmp" "$cache_root/by-fragment/$frag_hash"
log "built $package $version in $((SECONDS - t0)) s: $dest/bzImage"
echo "$dest/bzImage"
