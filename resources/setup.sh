#!/usr/bin/env bash
# setup.sh - installs what the nested lab needs on a Debian machine (as root), only what is
# missing, then builds (or finds cached) the lab kernel. Safe to re-run: takes seconds when done.
#
# Usage: resources/setup.sh
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "setup: $*" >&2; }

# qemu-system-x86: L1 under TCG; busybox-static, cpio: initramfs images; the rest builds the lab
# kernel (resources/lab-kernel.sh) from Debian's linux-source package, fetched with apt-get.
lab_packages=(
    qemu-system-x86 busybox-static cpio gzip
    bc flex bison libelf-dev libssl-dev xz-utils make gcc libc6-dev kmod
    debian-archive-keyring util-linux coreutils
)
missing=()
for p in "${lab_packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
else
    log "Debian packages present"
fi

# The API tests validate the served OpenAPI document and live answers (resources/check-openapi.py).
if ! python3 -c 'import openapi_spec_validator, openapi_schema_validator' 2>/dev/null; then
    log "installing openapi-spec-validator (PyPI)"
    python3 -m pip install --quiet openapi-spec-validator
else
    log "openapi-spec-validator present"
fi

# The lab's static p2pvmm uses the gnu target with crt-static (the host target here).
if command -v rustup >/dev/null; then
    rustup target list --installed | grep -qx x86_64-unknown-linux-gnu ||
        rustup target add x86_64-unknown-linux-gnu
fi

log "lab kernel: $("$repo/resources/lab-kernel.sh" | tail -n1)"
