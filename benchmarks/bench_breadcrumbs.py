"""Breadcrumbs' band selection: the sort-free ``middle_band`` against the stable argsort ranking it replaced.

Usage: python benchmarks/bench_breadcrumbs.py [--tasks 8] [--entries 2359296] [--repeats 3]

Each (implementation, data) pair runs in a fresh subprocess on one intra-op thread: time per
task-entry (median of --repeats calls) and the peak resident memory the call adds (``ru_maxrss``
after the call minus before it, the input already allocated). Data: ``randn`` (distinct magnitudes,
like real weights) and the same rounded to bfloat16 (many ties at both cuts).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, statistics, sys, time
import torch
torch.set_num_threads(1)
from weightweaving.methods.breadcrumbs import middle_band

def argsort_band(task_vectors, density, gamma, per_row):
    units = task_vectors.reshape(task_vectors.shape[0], -1)
    n = units.shape[-1]
    n_keep = int(density * n)
    n_top = min(int(gamma * n), n - n_keep)
    order = units.abs().argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(order.shape[-1]).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, positions)
    keep = (ranks >= n_top) & (ranks < n_top + n_keep)
    return (units * keep).reshape(task_vectors.shape)

impl, data, tasks, entries, repeats = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
x = torch.randn(tasks, entries, generator=torch.Generator().manual_seed(0)) * 1e-3
if data == "ties":
    x = x.bfloat16().float()
fn = middle_band if impl == "new" else argsort_band
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for _ in range(repeats):
    start = time.perf_counter()
    out = fn(x, 0.15, 0.01, False)
    times.append(time.perf_counter() - start)
    del out
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"impl": impl, "data": data, "s": statistics.median(times),
                  "ns_per_entry": statistics.median(times) / (tasks * entries) * 1e9,
                  "added_mb": (after - before) / 1024, "peak_mb": after / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--entries", type=int, default=3072 * 768)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    rows = []
    for data in ("randn", "ties"):
        for impl in ("argsort", "new"):
            argv = [impl, data, str(args.tasks), str(args.entries), str(args.repeats)]
            out = subprocess.run(
                [sys.executable, "-c", CHILD, *argv], env=env, check=True, capture_output=True, text=True
            )
            rows.append(json.loads(out.stdout))
            r = rows[-1]
            print(
                f"{data:6} {impl:8} {r['s']:7.3f} s  {r['ns_per_entry']:6.1f} ns/task-entry  "
                f"+{r['added_mb']:6.0f} MB peak RSS (total {r['peak_mb']:.0f} MB)",
                flush=True,
            )
    print(json.dumps({"load": os.getloadavg(), "rows": rows}))


if __name__ == "__main__":
    main()
