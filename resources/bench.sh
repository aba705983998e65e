#!/usr/bin/env bash
# bench.sh - every p2pvmm benchmark of the nested lab, one after the other, each side by side
# with QEMU 7.2 and, where it installs, the newer QEMU of Debian's backports (with iommufd;
# resources/qemu-backports.sh) in the same L1, then one table of medians and ratios and the charts.
#
# Usage: resources/bench.sh [--quick] [--only LIST]
#   --quick      fewer runs (boot 3, DMA map 2, BAR move 2, P2P one BAR size set of 3): ~45 min
#                instead of ~110
#   --only LIST  comma-separated subset of: boot,boot-quiet,dma-map,memory,bar-move,p2p,scale
#
# Benchmarks (each script documents its method; all measure inside one L1 guest):
#   boot        resources/bench-boot.sh: start to L2 init, console on (serial output is where
#               QEMU loses), and L2's uptime at init; p2pvmm's start phases
#   boot-quiet  the same with "quiet" on both command lines (target: p2pvmm <= 0.45 x QEMU)
#   dma-map     resources/bench-dma-map.sh: guest RAM allocation + IOMMU map per GiB and backend
#   memory      resources/bench-memory.sh: VMM RSS minus guest RAM with 0, 2 and 8 devices
#   bar-move    resources/bench-bar-move.sh: a guest BAR move as the guest's vCPU sees it
#   p2p         resources/bench-p2p.sh: peer BAR establish / move / teardown per BAR size
#   scale       resources/bench-scale.sh: 8 x 8 GiB BARs vs 8 x 64 MiB (start to all mapped,
#               BAR move), start time and VMM memory by device count and guest RAM
# Logs: target/bench-all/NAME.log; the summary: target/bench-all/summary.txt; the boot chart:
# target/bench-all/boot.svg (copied to resources/bench/ with --update-readme-charts).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
res=$repo/resources
log() { echo "bench: $*" >&2; }

quick=0 only=boot,boot-quiet,dma-map,memory,bar-move,p2p,scale update=0
while (($#)); do
    case $1 in
        --quick) quick=1; shift ;;
        --only) only=$2; shift 2 ;;
        --update-readme-charts) update=1; shift ;;
        *) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2; exit 2 ;;
    esac
done
out=$repo/target/bench-all
mkdir -p "$out"
wanted() { [[ ,$only, == *",$1,"* ]]; }
runs_boot=5 runs_map=3 runs_move=3 p2p_args=(--sizes "4M 1G 64G" --moves 4) scale_args=()
((quick)) && { runs_boot=3 runs_map=2 runs_move=2 p2p_args=(--sizes "4M 64G" --moves 3 --runs 2) scale_args=(--runs 1 --no-legacy); }

run() {
    local name=$1; shift
    log "$name: $*"
    local started=$SECONDS
    if "$@" >"$out/$name.log" 2>&1; then
        log "$name: done in $((SECONDS - started)) s"
    else
        log "$name: FAILED after $((SECONDS - started)) s (log: $out/$name.log)"
    fi
}
wanted boot && run boot "$res/bench-boot.sh" --runs "$runs_boot" --cpus 2
wanted boot-quiet && run boot-quiet "$res/bench-boot.sh" --runs "$runs_boot" --cpus 2 --quiet
wanted dma-map && run dma-map "$res/bench-dma-map.sh" --runs "$runs_map"
wanted memory && run memory "$res/bench-memory.sh"
wanted bar-move && run bar-move "$res/bench-bar-move.sh" --runs "$runs_move"
wanted p2p && run p2p "$res/bench-p2p.sh" "${p2p_args[@]}"
wanted scale && run scale "$res/bench-scale.sh" "${scale_args[@]}"

# The summary: every median/ratio line each benchmark printed, under its name.
{
    echo "p2pvmm benchmarks, $(date -u +%Y-%m-%d), $(nproc) host cores"
    for name in boot boot-quiet dma-map memory bar-move p2p scale; do
        [[ -f $out/$name.log ]] && wanted "$name" || continue
        echo
        echo "== $name"
        grep -E '^(median|ratio|target|failed|CHECK|dmabuf|legacy|  *[0-9]+ devices| +[0-9]+ [MG]iB +(dmabuf|legacy|[0-9.]+x)| +BAR |\|)' "$out/$name.log" ||
            echo "(no results: see $out/$name.log)"
    done
} | tee "$out/summary.txt"

# The boot chart: median start-to-init and L2 uptime at init, console on and quiet.
python3 - "$out" <<'PY'
import re, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = []
newer = None
for name, label in (("boot", "console on"), ("boot-quiet", "quiet")):
    f = out / f"{name}.log"
    if not f.exists():
        continue
    text = f.read_text()
    m = re.search(r"median start-to-init: p2pvmm (\d+) ms, QEMU (\d+) ms", text)
    u = re.search(r"median L2 uptime at init: p2pvmm (\d+) ms, QEMU (\d+) ms", text)
    mn = re.search(r"median start-to-init, newer QEMU: p2pvmm \d+ ms, (QEMU [0-9.]+) (\d+) ms", text)
    un = re.search(r"median L2 uptime at init, newer QEMU: p2pvmm \d+ ms, (QEMU [0-9.]+) (\d+) ms", text)
    if mn:
        newer = mn[1]
    if m:
        rows.append((f"start to init, {label}", int(m[1]), int(m[2]), int(mn[2]) if mn else None))
    if u:
        rows.append((f"L2 uptime at init, {label}", int(u[1]), int(u[2]), int(un[2]) if un else None))
if not rows:
    sys.exit(0)
top = max(max(v for v in r[1:] if v) for r in rows)
bars = 3 if any(r[3] for r in rows) else 2
w, bar, gap, left = 720, 14, 16, 230
h = 40 + len(rows) * (bars * bar + gap) + 30
scale = (w - left - 90) / top
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
       f'<text x="10" y="20" font-size="14">L2 boot in the nested lab (median ms; p2pvmm blue, QEMU 7.2 grey'
       + (f', {newer} orange' if newer else '') + ')</text>']
y = 40
for label, p, q, n in rows:
    svg.append(f'<text x="10" y="{y + bar + 4}">{label}</text>')
    for i, (v, color) in enumerate(((p, "#3366cc"), (q, "#999999"), (n, "#dd8833"))):
        if not v:
            continue
        yy = y + i * bar
        svg.append(f'<rect x="{left}" y="{yy}" width="{v * scale:.1f}" height="{bar - 2}" fill="{color}"/>')
        svg.append(f'<text x="{left + v * scale + 4:.1f}" y="{yy + bar - 4}">{v} ms</text>')
    svg.append(f'<text x="{w - 60}" y="{y + bar + 4}">{p / q:.2f} x</text>')
    y += bars * bar + gap
svg.append("</svg>")
(out / "boot.svg").write_text("\n".join(svg) + "\n")
print(f"bench: boot chart: {out / 'boot.svg'}", file=sys.stderr)
PY
if ((update)); then
    mkdir -p "$res/bench"
    [[ -f $out/boot.svg ]] && cp "$out/boot.svg" "$res/bench/boot.svg"
    [[ -f $repo/target/bench-p2p/p2p-bar-map.svg ]] &&
        cp "$repo/target/bench-p2p/p2p-bar-map.svg" "$res/bench/p2p-bar-map.svg"
    log "charts copied to resources/bench/"
fi
