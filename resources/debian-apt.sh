# shellcheck shell=bash
# debian-apt.sh - fetching Debian packages into a private apt root, for the lab kernel's source
# (resources/lab-kernel.sh) and the newer QEMU (resources/qemu-backports.sh). Sourced; the caller
# sets log() and fail(). The machine's sources, lists, cache and pinning stay untouched, and no
# host name is written here: the mirror is the machine's own.

# Prints the URI of every enabled "deb" source of a main suite (no "-security"/"-updates") in
# this machine's apt sources, deb822 files first.
debian_mirror_uris() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        # deb822: paragraphs separated by blank lines.
        awk 'BEGIN { RS = ""; FS = "\n" }
        {
            types = ""; uris = ""; suites = ""; enabled = "yes"
            for (i = 1; i <= NF; i++) {
                line = $i
                if (line ~ /^[ \t]*#/) continue
                if (match(line, /^[A-Za-z-]+:/)) {
                    key = tolower(substr(line, 1, RLENGTH - 1))
                    val = substr(line, RLENGTH + 1)
                    if (key == "types") types = val
                    else if (key == "uris") uris = val
                    else if (key == "suites") suites = val
                    else if (key == "enabled") enabled = val
                }
            }
            if (enabled ~ /[Nn]o/ || types !~ /(^|[ \t])deb([ \t]|$)/) next
            n = split(suites, s, /[ \t]+/)
            for (j = 1; j <= n; j++)
                if (s[j] != "" && s[j] !~ /-/) { split(uris, u, /[ \t]+/); for (k in u) if (u[k] != "") { print u[k]; exit } }
        }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        # one-line format: deb [options] URI suite components...
        sed -E 's/\[[^]]*\]//' "$f" | awk '$1 == "deb" && $3 !~ /-/ { print $2 }'
    done
}

# Sets $debian_mirror: P2PVMM_DEBIAN_MIRROR, else the machine's first Debian mirror.
debian_mirror_pick() {
    debian_mirror=${P2PVMM_DEBIAN_MIRROR:-$(debian_mirror_uris | head -n1)}
    [[ -n $debian_mirror ]] ||
        fail "no Debian mirror found in /etc/apt/sources.list{,.d/} (set P2PVMM_DEBIAN_MIRROR)"
}

# Makes DIR a private apt root for SUITE (main) of $debian_mirror and sets $apt_opts for
# apt-get/apt-cache. The bookworm debian-archive-keyring also carries the trixie keys (which
# sign trixie-backports), so Release files are verified normally (no [trusted=yes]).
debian_private_apt() {
    local dir=$1 suite=$2 keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [[ -f $keyring ]] || fail "$keyring missing (install debian-archive-keyring)"
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
    echo "deb [signed-by=$keyring] $debian_mirror $suite main" >"$dir/sources.list"
    apt_opts=(
        -o "Dir::Etc::SourceList=$dir/sources.list"
        -o Dir::Etc::SourceParts=/dev/null
        -o Dir::Etc::Preferences=/dev/null
        -o Dir::Etc::PreferencesParts=/dev/null
        -o "Dir::State::Lists=$dir/lists"
        -o "Dir::Cache=$dir/cache"
        -o Acquire::Languages=none
        -o "APT::Sandbox::User=$(id -un)" # private dirs are not readable by _apt
    )
}

# Prints the version of PACKAGE that SUITE of the private root carries (empty when none).
debian_package_version() {
    apt-cache "${apt_opts[@]}" show "$1/$2" 2>/dev/null | awk '/^Version:/ { print $2; exit }' || true
}
