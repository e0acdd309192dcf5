"""Stability across seeds: the spread of every reported average over several run folders."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any

from .report import methods_of

VARIANTS = ("tuned", "best", "data_free", "weave", "recommended")


def seed_spread(run_folders: list[Path], out: Path) -> Path:
    """Write ``seed-spread.md`` and ``seed-spread.json`` in ``out`` for runs that differ only in seed.

    For every setup, baseline and method x variant: the per-seed averages, their mean and their spread
    (max - min, in accuracy points). Returns the Markdown file's path.
    """
    runs = [json.loads((Path(f) / "results.json").read_text()) for f in run_folders]
    seeds = [r["meta"]["seed"] for r in runs]
    table: dict[str, dict[str, Any]] = {}
    lines = [
        f"# Stability across seeds {', '.join(map(str, seeds))} (profile `{runs[0]['meta']['profile']}`)",
        "",
        "Per-seed averages, their mean and spread (max − min, accuracy points).",
        "",
        "| setup | entry | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread |",
        "|---" * (len(seeds) + 4) + "|",
    ]
    for setup in ("multitask", "continual", "domain"):
        entries: list[tuple[str, tuple[str, ...]]] = [
            (label, (label,)) for label in ("zero_shot", "individual")
        ]
        entries += [(f"{m} {v}", (m, v)) for m in methods_of(runs[0], setup) for v in VARIANTS]
        table[setup] = {}
        for label, keys in entries:
            values = []
            for run in runs:
                node = run[setup]
                for part in keys:
                    node = node.get(part) if isinstance(node, dict) else None
                if node is not None:
                    values.append(float(node["average"]))
            if not values:  # a variant older runs did not record
                continue
            spread = max(values) - min(values)
            table[setup][label] = {"per_seed": values, "mean": mean(values), "spread": spread}
            cells = " | ".join(f"{v:.1f}" for v in values)
            lines.append(f"| {setup} | {label} | {cells} | {mean(values):.1f} | {spread:.1f} |")
    spreads = [e["spread"] for s in table.values() for e in s.values()]
    lines += [
        "",
        f"Largest spread {max(spreads):.1f} points; median {sorted(spreads)[len(spreads) // 2]:.1f}.",
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "seed-spread.json").write_text(json.dumps({"seeds": seeds, "averages": table}, indent=1))
    markdown = out / "seed-spread.md"
    markdown.write_text("\n".join(lines))
    return markdown
