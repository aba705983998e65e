#!/usr/bin/env python3
"""Reads bench-hotplug.sh's BENCH lines (stdin) and prints each round, the medians per VMM and
the p2pvmm/QEMU ratios. Times in the lines are CLOCK_REALTIME seconds of L1 and L2."""
import re
import statistics
import sys
from datetime import datetime, timezone


def iso(stamp):
    """p2pvmm's log timestamp (2026-12-02T05:10:00.123456Z) in seconds."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


STAMP = re.compile(r"UEVENT-STAMP (add|remove|ready) (\d+\.\d+)")

runs = {}
for line in sys.stdin:
    words = line.split()
    if len(words) < 4:
        continue
    vmm, what = words[1], words[2]
    run = runs.setdefault(vmm, {"sent_plug": [], "sent_unplug": [], "add": [], "remove": [],
                                "down": [], "in_slot": [], "clock": None})
    if what == "clock":
        run["clock"] = float(words[4]) - float(words[3])
    elif what == "event":
        # A guest line and a VMM log line can share a console line (the guest paused mid-line).
        stamp = STAMP.search(line)
        if stamp and stamp.group(1) in ("add", "remove"):
            run[stamp.group(1)].append(float(stamp.group(2)))
        if "ejected by the guest" in line or "hotplugged into slot" in line:
            m = re.search(r"\[(\d{4}-\d\d-\d\dT[\d:.]+Z)", line)
            if m:
                run["down" if "ejected" in line else "in_slot"].append(iso(m.group(1)))
    elif what.isdigit():
        kind = words[3]
        m = re.search(r"sent=(\d+\.\d+)", line) or re.search(r"QMP-PROBE-SENT (\d+\.\d+)", line)
        if m:
            run["sent_" + kind].append(float(m.group(1)))
        if kind == "unplug" and "DEVICE_DELETED" in line:
            t = re.search(r'"seconds": (\d+), "microseconds": (\d+)', line)
            if t:
                run["down"].append(int(t.group(1)) + int(t.group(2)) / 1e6)

# L2's clock is not L1's (kvmclock gives L2 a wall clock seconds off). What bounds how far it is
# behind: L1 saw L2's ready stamp after L2 wrote it, and the VMM tore a device down after L2
# removed it. L2 times shifted by the tightest of these bounds are never earlier than the
# truth, so plug and gone-in-L2 are upper bounds; torn down is L1's clock alone.
medians = {}
for vmm, run in runs.items():
    bounds = [d - r for r, d in zip(run["remove"], run["down"])]
    if run["clock"] is not None:
        bounds.append(run["clock"])
    if not bounds:
        print(f"{vmm}: no clock bound")
        continue
    shift = min(bounds)
    plug = [a + shift - s for s, a in zip(run["sent_plug"], run["add"])]
    gone = [r + shift - s for s, r in zip(run["sent_unplug"], run["remove"])]
    down = [d - s for s, d in zip(run["sent_unplug"], run["down"])]
    for i, (p, g, d) in enumerate(zip(plug, gone, down), 1):
        print(f"{vmm:6} round {i}: plug <= {p * 1000:7.1f} ms  gone in L2 <= {g * 1000:7.1f} ms  "
              f"torn down {d * 1000:7.1f} ms")
    if not plug or not gone or not down:
        print(f"{vmm}: incomplete rounds (plug {len(plug)}, gone {len(gone)}, torn down {len(down)})")
        continue
    medians[vmm] = (statistics.median(plug), statistics.median(gone), statistics.median(down))
    print(f"median {vmm:6} ({len(plug)} rounds): plug <= {medians[vmm][0] * 1000:.1f} ms, "
          f"unplug: gone in L2 <= {medians[vmm][1] * 1000:.1f} ms, "
          f"torn down {medians[vmm][2] * 1000:.1f} ms (L2 clock shifted by {shift:.3f} s)")
    if run["in_slot"]:
        own = [t - s for s, t in zip(run["sent_plug"], run["in_slot"])]
        print(f"  {vmm}: request -> device in its slot, guest told: median {statistics.median(own) * 1000:.1f} ms")
if "p2pvmm" in medians and "qemu" in medians:
    p, q = medians["p2pvmm"], medians["qemu"]
    print("p2pvmm/QEMU: plug %.2f x, unplug (gone in L2) %.2f x, torn down %.2f x"
          % (p[0] / q[0], p[1] / q[1], p[2] / q[2]))
