#!/usr/bin/env python3
"""bench-scale-report.py - the report of resources/bench-scale.sh, run on the host.

Usage: bench-scale-report.py CONSOLE [--svg OUT.svg] [--devices "1 2 4 8"] [--mems "1 4 8"]

Reads the L1 console (p2pvmm's -vv/-v lines and the BENCH- markers) and prints:
- scale: per BAR size and mechanism, p2pvmm start (its "start phase config: N ms" line's
  timestamp minus N) to the last first map of a P2P area ("<area>: mapped at IOVA ... in D",
  before L2's "BENCH-L2 established-all"), the sum of those maps, and each guest BAR move: the
  sum of "<bdf>: config write at .. applied N BAR change(s) in N us" of the moved function
  between "BENCH-L2 move <bdf>" and "moved" (the VMM's whole time from trap to re-entry);
- growth: per device count and guest RAM, start to L2 init (L1 /proc/uptime), p2pvmm's start
  phases, when guest RAM was mapped for DMA, and the VMM's memory: VmRSS, VmHWM, VmPin (the
  guest RAM pinned for DMA), the guest RAM memfd mapping's resident pages (smaps; pages pinned
  through the IOMMU but never touched by the guest are not resident there), and the VMM's own =
  VmRSS minus that (binary, heap, stacks: what grows with devices).
Lines start with "median", "ratio", "  N devices" or "|" (resources/bench.sh greps them).
"""
import argparse
import datetime
import re
import statistics
from collections import defaultdict

TS = re.compile(r"\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z? +(\w+) +[^\]]*\] (.*)")
DUR = re.compile(r"([\d.]+)(ns|µs|us|ms|s)$")
UNIT = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}


def dur_ms(text):
    m = DUR.search(text.strip())
    return float(m[1]) * UNIT[m[2]] if m else None


def ts_ms(text):
    return datetime.datetime.fromisoformat(text).timestamp() * 1e3


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def human(b):
    return f"{b >> 30}G" if b >= 1 << 30 else f"{b >> 20}M"


def parse(lines):
    scale, grow = [], defaultdict(lambda: defaultdict(list))
    run = None
    for raw in lines:
        line = raw.rstrip("\n")
        if m := re.search(r"BENCH-SCALE-RUN (\w+) (\d+) (\d+)", line):
            run = dict(mech=m[1], size=int(m[2]), count=int(m[3]), start=None, maps={},
                       all_at=None, moves=[], cur=None, teardown=[], rc=None, errors=[])
            scale.append(run)
            continue
        if m := re.search(r"BENCH-GROW-RUN (\S+)", line):
            run = None
            continue
        if m := re.search(r"BENCH-(INIT|PHASE|RAM|MEM|GROW-RC|LOG) (\S+) (.*)", line):
            kind, label, rest = m[1], m[2], m[3]
            g = grow[label]
            if kind == "INIT":
                t0, t1 = rest.split()[:2]
                g["init"].append((float(t1) - float(t0)) * 1e3)
            elif kind == "PHASE":
                name, _, v = rest.partition(": ")
                g["phase " + name].append(float(v.split()[0]))
            elif kind == "RAM":
                if r := re.search(r"in (\S+), (\d+) ms after the start", rest):
                    g["ram map"].append(dur_ms(r[1]))
                    g["ram mapped at"].append(float(r[2]))
            elif kind == "MEM":
                for k, v in re.findall(r"(\w+):(\d+)kB", rest):
                    g[k].append(int(v) / 1024)
            elif kind == "GROW-RC":
                g["rc"].append(rest.strip())
            elif "SIGTERM: stopping the VM" not in rest:  # the benchmark's own stop
                g["log"].append(rest)
            continue
        if run is None:
            continue
        if m := re.search(r"BENCH-SCALE-RC (\d+)", line):
            run["rc"] = int(m[1])
            run = None
            continue
        if "BENCH-L2 error" in line or ("ERROR" in line and "BENCH" not in line):
            run["errors"].append(line.strip())
        if "BENCH-L2 established-all" in line:
            run["all_at"] = max((t for t, _ in run["maps"].values()), default=None)
            continue
        if m := re.search(r"BENCH-L2 move (\S+) (\d+)", line):
            run["cur"] = [m[1], 0.0, 0]
            continue
        if m := re.search(r"BENCH-L2 moved (\S+)", line):
            if run["cur"] and run["cur"][2]:
                run["moves"].append(run["cur"][1])
            run["cur"] = None
            continue
        t = TS.search(line)
        if not t:
            continue
        when, msg = ts_ms(t[1]), t[3]
        if m := re.match(r"start phase config: ([\d.]+) ms", msg):
            run["start"] = when - float(m[1])
        elif m := re.match(r"(.*): mapped at IOVA \S+ \(\+(0x[0-9a-f]+)\) in (\S+)", msg):
            if run["all_at"] is None and m[1] not in run["maps"]:
                run["maps"][m[1]] = (when, dur_ms(m[3]))
        elif m := re.match(r"(\S+): config write at \S+ applied \d+ BAR change\(s\) in (\d+) us", msg):
            if run["cur"] and m[1] == run["cur"][0]:
                run["cur"][1] += int(m[2]) / 1e3
                run["cur"][2] += 1
        elif m := re.match(r".*: unmapped from IOVA \S+ in (\S+)", msg):
            if run["cur"] is None and run["all_at"] is not None:
                run["teardown"].append(dur_ms(m[1]))
    return scale, grow


def scale_report(scale):
    rows = []
    print("## scale: P2P group of edu + N ivshmems, one BAR size per boot\n")
    print("| BAR size | mech | devices | areas mapped | start to all mapped (ms) | map work, sum (ms) "
          "| slowest map (ms) | move, median (ms) | moves | teardown unmaps, sum (ms) | rc |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in scale:
        maps = list(r["maps"].values())
        all_ms = (r["all_at"] - r["start"]) if r["all_at"] and r["start"] else float("nan")
        work = sum(d for _, d in maps)
        row = dict(size=r["size"], mech=r["mech"], all=all_ms, work=work, move=med(r["moves"]))
        rows.append(row)
        print(f"| {r['count']} x {human(r['size'])} | {r['mech']} | {r['count'] + 1} | {len(maps)} "
              f"| {all_ms:.0f} | {work:.2f} | {max((d for _, d in maps), default=float('nan')):.2f} "
              f"| {row['move']:.3f} | {len(r['moves'])} | {sum(r['teardown']):.1f} | {r['rc']} |")
        for e in r["errors"][:5]:
            print(f"  error ({human(r['size'])} {r['mech']}): {e}")
    print()
    for row in rows:
        print(f"median move {human(row['size'])} {row['mech']}: {row['move']:.3f} ms; start to all "
              f"mapped {row['all']:.0f} ms, map work {row['work']:.2f} ms")
    for mech in ("dmabuf", "legacy"):
        rs = sorted((r for r in rows if r["mech"] == mech), key=lambda r: r["size"])
        if len(rs) >= 2 and rs[0]["move"] > 0:
            lo, hi = rs[0], rs[-1]
            print(f"ratio {mech} {human(hi['size'])}/{human(lo['size'])}: move {hi['move'] / lo['move']:.2f}, "
                  f"map work {hi['work'] / lo['work']:.2f}, start to all mapped {hi['all'] / lo['all']:.2f} "
                  f"(BAR size x{hi['size'] // lo['size']})")
    return rows


def grow_report(grow, devices, mems):
    def stat(label, key):
        return med(grow[label][key]) if label in grow else float("nan")

    configs = [(f"d{n}-m1", n, 1) for n in devices]
    configs += [(f"d2-m{m}", 2, m) for m in mems if m != 1]
    phases = []
    for g in grow.values():
        phases += [k for k in g if k.startswith("phase ") and k not in phases]
    print("\n## growth: start and VMM memory (medians; MiB)\n")
    print("| devices | guest RAM | runs | start to L2 init (ms) | first vCPU entry (ms) | RAM mapped for DMA "
          "(ms after start) | VmRSS | VmHWM | VmPin | guest RAM resident | VMM own (VmRSS - guest RAM resident) "
          "| VmHWM - guest RAM resident |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    out = []
    for label, n, m in configs:
        g = grow[label] if label in grow else {}
        guest = g.get("GuestRss", [])
        own = med([a - b for a, b in zip(g.get("VmRSS", []), guest)])
        hwm = med([a - b for a, b in zip(g.get("VmHWM", []), guest)])
        row = dict(label=label, n=n, m=m, init=stat(label, "init"), own=own)
        out.append(row)
        print(f"| {n} | {m} GiB | {len(g.get('init', []))} | {row['init']:.0f} "
              f"| {stat(label, 'phase first vCPU entry'):.1f} | {stat(label, 'ram mapped at'):.0f} "
              f"| {stat(label, 'VmRSS'):.1f} | {stat(label, 'VmHWM'):.1f} | {stat(label, 'VmPin'):.0f} "
              f"| {med(guest):.1f} | {own:.1f} | {hwm:.1f} |")
    print("\n| devices | guest RAM | " + " | ".join(p[6:] for p in phases) + " |")
    print("| --- | --- |" + " --- |" * len(phases))
    for label, n, m in configs:
        print(f"| {n} | {m} GiB | " + " | ".join(f"{stat(label, p):.1f}" for p in phases) + " |")
    print()
    for row in out:
        what = f"{row['n']} devices" if row["m"] == 1 else f"{row['n']} devices, {row['m']} GiB"
        print(f"  {what}: start to init {row['init']:.0f} ms, VMM own memory {row['own']:.1f} MiB")
    for label, g in grow.items():
        for rc in g["rc"]:
            if rc not in ("0", "143"):
                print(f"  {label}: p2pvmm exit status {rc}")
        for line in g["log"][:3]:
            print(f"  {label}: {line}")
    return out


def svg(path, scale_rows, grow_rows):
    panels = []
    if scale_rows:
        panels.append(("guest BAR move, median ms (VMM)",
                       [(f"{human(r['size'])} {r['mech']}", r["move"]) for r in scale_rows]))
        panels.append(("P2P map work at start, ms (sum)",
                       [(f"{human(r['size'])} {r['mech']}", r["work"]) for r in scale_rows]))
    d = [r for r in grow_rows if r["m"] == 1]
    g = [r for r in grow_rows if r["n"] == 2]
    panels.append(("start to L2 init, ms, by devices", [(f"{r['n']} dev", r["init"]) for r in d]))
    panels.append(("VMM own memory, MiB, by devices", [(f"{r['n']} dev", r["own"]) for r in d]))
    panels.append(("start to L2 init, ms, by guest RAM", [(f"{r['m']} GiB", r["init"]) for r in g]))
    panels.append(("VMM own memory, MiB, by guest RAM", [(f"{r['m']} GiB", r["own"]) for r in g]))
    pw, ph, bar = 360, 40, 16
    heights = [ph + len(items) * (bar + 6) + 10 for _, items in panels]
    rows_h = [max(heights[i:i + 2]) for i in range(0, len(panels), 2)]
    w, h = 2 * pw + 30, 40 + sum(rows_h)
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
         f'font-size="12">', '<text x="10" y="22" font-size="14">p2pvmm scale and growth in the nested '
         'lab (resources/bench-scale.sh)</text>']
    y0 = 40
    for i, (title, items) in enumerate(panels):
        x0 = 10 + (i % 2) * (pw + 10)
        if i and i % 2 == 0:
            y0 += rows_h[i // 2 - 1]
        vals = [v for _, v in items if v == v]
        top = max(vals, default=1) or 1
        s.append(f'<text x="{x0}" y="{y0 + 16}" font-weight="bold">{title}</text>')
        for j, (label, v) in enumerate(items):
            y = y0 + ph - 14 + j * (bar + 6)
            width = 0 if v != v else v / top * (pw - 170)
            s.append(f'<text x="{x0}" y="{y + bar - 4}">{label}</text>')
            s.append(f'<rect x="{x0 + 95}" y="{y}" width="{width:.1f}" height="{bar}" fill="#3366cc"/>')
            s.append(f'<text x="{x0 + 99 + width:.1f}" y="{y + bar - 4}">{v:.4g}</text>')
    s.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(s) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("console")
    ap.add_argument("--svg")
    ap.add_argument("--devices", default="1 2 4 8")
    ap.add_argument("--mems", default="1 4 8")
    a = ap.parse_args()
    with open(a.console, errors="replace") as f:
        scale, grow = parse(f)
    rows = scale_report(scale)
    grows = grow_report(grow, [int(x) for x in a.devices.split()], [int(x) for x in a.mems.split()])
    if a.svg:
        svg(a.svg, rows, grows)


if __name__ == "__main__":
    main()
