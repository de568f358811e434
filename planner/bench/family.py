#!/usr/bin/env python3
"""Appends to a planner benchmark report the goals for the workloads weft was
not tuned on, from the report's own table of them (the same run): weft within
5% of the lower bound on every row of 64 to 1,024 GPUs and within 10% at
12,288, and its planner time under 100 ms at 1,024 GPUs and 1 s at 12,288.
Names every row past a goal."""
import math
import re
import sys

path = sys.argv[1]
text = open(path, encoding="utf-8").read()
section = text.split("## Workloads weft was not tuned on, this run", 1)[1]
rows = []
for line in section.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) != 11 or not cells[1].isdigit():
        continue
    weft = cells[4].strip("*")
    if not re.fullmatch(r"[0-9.]+", weft):
        continue
    rows.append((cells[0], int(cells[1]), cells[2], float(weft), float(cells[10])))

out = ["", "### Goals on these workloads, this run", ""]
if rows:
    small = [r for r in rows if r[1] <= 1024]
    large = [r for r in rows if r[1] > 1024]
    geo = math.exp(sum(math.log(r[3]) for r in rows) / len(rows))
    out.append(f"- weft over the bound: geometric mean {geo:.3f} over {len(rows)} rows, worst {max(r[3] for r in rows):.3f}.")
    past = [r for r in small if r[3] > 1.05] + [r for r in large if r[3] > 1.10]
    out.append(
        f"- Within 1.05 at 64-1,024 GPUs and 1.10 at 12,288: {len(rows) - len(past)} of {len(rows)} rows."
        + ("" if not past else " Past it: " + "; ".join(f"{n} on {g} GPUs with {m} ({v:.3f})" for n, g, m, v, _ in past) + ".")
    )
    slow = [r for r in rows if r[1] <= 1024 and r[1] >= 1024 and r[4] >= 100] + [r for r in large if r[4] >= 1000]
    out.append(
        f"- Planner time: at most {max((r[4] for r in rows if r[1] == 1024), default=0):.1f} ms at 1,024 GPUs"
        + (f", {max((r[4] for r in large), default=0):.1f} ms at 12,288" if large else "")
        + (" (goals: 100 ms and 1 s)." if not slow else "; past the goal: " + "; ".join(f"{n} on {g} GPUs ({t:.0f} ms)" for n, g, _, _, t in slow) + ".")
    )
else:
    out.append("- No row planned (no data?).")
with open(path, "a", encoding="utf-8") as f:
    f.write("\n".join(out) + "\n")
