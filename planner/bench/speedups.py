#!/usr/bin/env python3
"""Appends to a planner benchmark report (planner/BENCHMARKS.md) the speedup of
each strategy over `static` per workload, beside the speedups the papers
publish for comparable setups (shared/references/systems.md). Reads the
report's own tables, so the figures are those of the same run."""
import re
import sys

path = sys.argv[1]
text = open(path, encoding="utf-8").read()
sections = re.split(r"^## ", text, flags=re.M)[1:]
rows = []
# Per workload: weft's ratio to the lower bound, its planner time, and the
# cluster's GPU count (from the "on N GPUs" line).
goals = []
for section in sections:
    title = section.splitlines()[0].strip()
    times = {}
    gpus = None
    for line in section.splitlines():
        fields = line.split()
        found = re.search(r"on (\d+) GPUs", line)
        if found:
            gpus = int(found.group(1))
        if len(fields) >= 2 and re.fullmatch(r"[a-z-]+", fields[0]):
            try:
                times[fields[0]] = float(fields[1])
            except ValueError:
                pass
            if fields[0] == "weft" and len(fields) >= 9:
                goals.append((title, gpus, float(fields[2]), float(fields[8])))
    if "static" in times:
        rows.append((title, times))

published = {
    "byted": "ByteScale on Byted data: up to 4.26x",
    "github": "ByteScale on GitHub data at 2M: 6.21-7.89x (7B-30B)",
    "Wikipedia": "FlexSP on Wikipedia (64 A100): up to 1.98x over Megatron-LM",
}
out = ["", "## Speedup over static (Megatron-LM CP), this run", ""]
out.append("Step time of `static` over each strategy's, per workload; the papers' figures are for")
out.append("their own clusters and models, so they compare in kind, not exactly.")
out.append("")
out.append("| workload | hdp | flexsp | weft | published, comparable setup |")
out.append("|---|---:|---:|---:|---|")
for title, times in rows:
    def ratio(name):
        return f"{times['static'] / times[name]:.2f}x" if name in times and times[name] > 0 else "-"
    note = next((v for k, v in published.items() if title.startswith(k)), "")
    out.append(f"| {title} | {ratio('hdp')} | {ratio('flexsp')} | {ratio('weft')} | {note} |")
out += ["", "## Goals, this run", ""]
out.append("weft within 5% of the lower bound on every workload; planner wall time under 100 ms")
out.append("on 1,024 GPUs and under 1 s on 12,288 (one thread of a shared 2-core machine; on 64")
out.append("GPUs the time is mostly FlexSP's solver, which weft runs as one of its candidates).")
out.append("")
out.append("| workload | weft vs lower bound | within 5% | planner_ms | time goal |")
out.append("|---|---:|---|---:|---|")
for title, gpus, vs_lb, planner_ms in goals:
    limit = {1024: 100.0, 12288: 1000.0}.get(gpus)
    time_goal = "-" if limit is None else ("met" if planner_ms < limit else f"missed (< {limit:.0f})")
    within = "yes" if vs_lb <= 1.05 else "no"
    out.append(f"| {title} | {vs_lb:.3f} | {within} | {planner_ms:.1f} | {time_goal} |")
misses = [g for g in goals if g[2] > 1.05]
if misses:
    out += ["", "Why weft is further than 5% from the bound where it is (analysis of these workloads;",
            "`weft plan --explain` on one of their batches shows the parts):", ""]
    out.append("- Mixed clusters (A100 nodes of 4 GPUs with 2 NICs beside H100 nodes of 8 with 8): the")
    out.append("  bound spreads the work over every GPU at its speed, but the A100 nodes' network makes")
    out.append("  rings of more than one A100 node slow, so the long sequences must run on the H100s. A")
    out.append("  few long rings on four H100 nodes cannot be packed without gaps, and the A100s, with only")
    out.append("  short sequences left, end early. The gang search (order, sizes, one kind of GPU) took this")
    out.append("  workload from 1.143 to 1.060; a bound that knew which sequences the A100s can hold would be")
    out.append("  tighter, but is not written.")
    out.append("- byted on 12,288 GPUs with llama-70b: the 2M-token sequences need rings of")
    out.append("  thousands of ranks to end in time, whose step latency and transfers compute cannot hide (a ring of d ranks")
    out.append("  pays d·(inner−1)/inner step latencies per pass). The bound counts the least any ring")
    out.append("  shape could pay (d/2 per pass, with two-GPU inner rings); weft's whole-node rings pay 7d/8,")
    out.append("  and the mid-length rings that run beside them end unevenly (max/mean above).")
    out.append("- byted on 1,024 H200 with llama-70b: with the memory weft's engine keeps (37 MB a token over")
    out.append("  80 layers, `planner/src/cost.rs`), a rank holds about 3,500 tokens, so a 2M-token sequence")
    out.append("  needs a ring of about 600 ranks for memory alone, most of the cluster; the other sequences")
    out.append("  fill the rest around it unevenly (max/mean above). Planned for a fused engine's memory")
    out.append("  (34·h bytes a token a layer) this workload was at 1.034.")
with open(path, "a", encoding="utf-8") as f:
    f.write("\n".join(out) + "\n")
