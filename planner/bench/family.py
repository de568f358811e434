#!/usr/bin/env python3
"""Appends to a planner benchmark report the goals for the workloads weft was
not tuned on, from the report's own table of them (the same run): weft within
5% of the lower bound on every row of 64 to 1,024 GPUs and within 10% at
12,288, and its planner time under 100 ms at 1,024 GPUs and 1 s at 12,288.
Names every row past a goal, and every row without a plan."""
import math
import sys

TITLE = "## Workloads weft was not tuned on, this run"

path = sys.argv[1]
text = open(path, encoding="utf-8").read()
if TITLE not in text:
    sys.exit(f"{path} has no section {TITLE!r}")
section = text.split(TITLE, 1)[1]
rows, unplanned = [], []
for line in section.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) != 11 or not cells[1].isdigit():
        continue
    name, gpus, model = cells[0], int(cells[1]), cells[2]
    try:
        rows.append((name, gpus, model, float(cells[4].strip("*")), float(cells[10])))
    except ValueError:
        unplanned.append(f"{name} on {gpus} GPUs with {model}")

out = ["", "### Goals on these workloads, this run", ""]
if rows:
    geo = math.exp(sum(math.log(r[3]) for r in rows) / len(rows))
    out.append(
        f"- weft over the bound: geometric mean {geo:.3f} over {len(rows)} planned rows, "
        f"worst {max(r[3] for r in rows):.3f}."
    )
    past = [r for r in rows if r[3] > (1.05 if r[1] <= 1024 else 1.10)]
    total = len(rows) + len(unplanned)
    out.append(
        f"- Within 1.05 at 64-1,024 GPUs and 1.10 at 12,288: {len(rows) - len(past)} of {total} rows."
        + (" Past it: " + "; ".join(f"{n} on {g} GPUs with {m} ({v:.3f})" for n, g, m, v, _ in past) + "." if past else "")
        + (" Without a plan (the table says why): " + "; ".join(unplanned) + "." if unplanned else "")
    )
    at_1024 = [r[4] for r in rows if r[1] == 1024]
    at_large = [r[4] for r in rows if r[1] > 1024]
    slow = [r for r in rows if (r[1] == 1024 and r[4] >= 100) or (r[1] > 1024 and r[4] >= 1000)]
    out.append(
        f"- Planner time: at most {max(at_1024, default=0):.1f} ms at 1,024 GPUs"
        + (f", {max(at_large):.1f} ms at 12,288" if at_large else "")
        + (
            "; past the goal: " + "; ".join(f"{n} on {g} GPUs ({t:.0f} ms)" for n, g, _, _, t in slow) + "."
            if slow
            else " (goals: 100 ms and 1 s)."
        )
    )
else:
    out.append("- No row was planned.")
with open(path, "a", encoding="utf-8") as f:
    f.write("\n".join(out) + "\n")
