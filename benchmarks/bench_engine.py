"""Speed and memory of the streaming engine and of Weight Weaving on eight ~88M-parameter checkpoints.

Usage: python benchmarks/bench_engine.py [--small] [--repeats N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def vit_shapes(
    width: int, layers: int, patch: int = 32, tokens: int = 50, out_dim: int = 512
) -> dict[str, tuple[int, ...]]:
    """CLIP ViT image-encoder parameter shapes (ViT-B/32: width 768, 12 layers -> ~88M parameters)."""
    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (width, 3, patch, patch),
        "class_embedding": (width,),
        "positional_embedding": (tokens, width),
        "ln_pre.weight": (width,),
        "ln_pre.bias": (width,),
    }
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        shapes.update(
            {
                p + "attn.in_proj_weight": (3 * width, width),
                p + "attn.in_proj_bias": (3 * width,),
                p + "attn.out_proj.weight": (width, width),
                p + "attn.out_proj.bias": (width,),
                p + "ln_1.weight": (width,),
                p + "ln_1.bias": (width,),
                p + "mlp.c_fc.weight": (4 * width, width),
                p + "mlp.c_fc.bias": (4 * width,),
                p + "mlp.c_proj.weight": (width, 4 * width),
                p + "mlp.c_proj.bias": (width,),
                p + "ln_2.weight": (width,),
                p + "ln_2.bias": (width,),
            }
        )
    shapes.update({"ln_post.weight": (width,), "ln_post.bias": (width,), "proj": (width, out_dim)})
    return shapes


def build(workdir: Path, small: bool, models: int = 8) -> tuple[Path, list[Path], int]:
    shapes = vit_shapes(256, 12) if small else vit_shapes(768, 12)
    tag = "small" if small else "b32"
    base_path = workdir / f"{tag}_base.safetensors"
    paths = [workdir / f"{tag}_ft{i}.safetensors" for i in range(models)]
    nbytes = sum(4 * int(torch.tensor(s).prod()) for s in shapes.values())
    if base_path.exists() and all(p.exists() for p in paths):
        return base_path, paths, nbytes
    gen = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    save_file(base, str(base_path))
    for i, path in enumerate(paths):
        g = torch.Generator().manual_seed(100 + i)
        save_file({k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(path))
    del base
    return base_path, paths, nbytes


CHILD = r"""
import json, resource, sys, time, torch
import weightweaving as ww
spec = json.loads(sys.argv[1])
torch.set_num_threads(2)
t0 = time.perf_counter()
kind = spec.pop("kind")
if kind == "merge":
    ww.merge(spec.pop("base"), spec.pop("models"), progress=False, **spec)
elif kind == "weave":
    ww.weave(spec.pop("base"), spec.pop("models"), progress=False, **spec)
else:  # naive: every merged model in memory, then the mean over Δ ∪ A
    base, models, lambdas = spec["base"], spec["models"], spec["lambdas"]
    merged = [ww.merge(base, models, spec["method"], lam, progress=False, **spec["hp"]) for lam in lambdas]
    from weightweaving.checkpoints import open_checkpoint
    pre = open_checkpoint(base)
    fts = [open_checkpoint(m) for m in models]
    out = {}
    for name in merged[0]:
        p = pre.get(name).float()
        members = [ft.get(name).float() - p for ft in fts] + [m[name].float() - p for m in merged]
        out[name] = p + torch.stack(members).mean(0)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_child(spec: dict, workdir: Path) -> dict:
    out = workdir / "bench-out"
    if "out" in spec:
        spec = {**spec, "out": str(out), "overwrite": True}
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "weightweaving-bench"))
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, models, ckpt_bytes = build(workdir, args.small)
    print(
        f"checkpoints: 1 base + {len(models)} fine-tuned, {ckpt_bytes / 1e6:.0f} MB each ({time.perf_counter() - t0:.0f} s to build)"
    )
    common = {"base": str(base), "models": [str(m) for m in models], "out": "x"}
    grid15 = [round(0.1 + 0.1 * i, 10) for i in range(15)]
    runs = {
        "merge task_arithmetic λ=0.3": {"kind": "merge", "method": "task_arithmetic", "lam": 0.3},
        "merge ties (global, k=0.2)": {"kind": "merge", "method": "ties", "lam": 1.0, "k": 0.2},
        "weave ties, 15 λ (mean)": {"kind": "weave", "method": "ties", "lambdas": grid15, "k": 0.2},
        "weave ties, 15 λ (magmax)": {
            "kind": "weave",
            "method": "ties",
            "lambdas": grid15,
            "k": 0.2,
            "pool": "magmax",
        },
        "weave ties, 3 λ (mean)": {"kind": "weave", "method": "ties", "lambdas": grid15[:3], "k": 0.2},
        "weave ties, 30 λ (mean)": {
            "kind": "weave",
            "method": "ties",
            "lambdas": [round(0.05 * (i + 1), 10) for i in range(30)],
            "k": 0.2,
        },
        "weave ties, search k∈{0.1,0.2,0.3} × 15 λ": {
            "kind": "weave",
            "method": "ties",
            "lambdas": grid15,
            "search": {"k": [0.1, 0.2, 0.3]},
        },
    }
    results: dict[str, dict[str, float]] = {}
    for label, spec in runs.items():
        samples = [run_child({**common, **spec}, workdir) for _ in range(args.repeats)]
        results[label] = {
            "seconds": statistics.median(s["seconds"] for s in samples),
            "peak_rss_bytes": statistics.median(s["peak_rss_bytes"] for s in samples),
            "samples": samples,
        }
        print(
            f"{label:45s} {results[label]['seconds']:7.2f} s  peak RSS {results[label]['peak_rss_bytes'] / 1e6:7.0f} MB",
            flush=True,
        )
    if not args.skip_naive:
        naive = run_child(
            {
                "kind": "naive",
                "base": str(base),
                "models": common["models"],
                "method": "ties",
                "lambdas": grid15,
                "hp": {"k": 0.2},
            },
            workdir,
        )
        results["naive weave ties, 15 λ (materialised)"] = naive
        print(
            f"{'naive weave ties, 15 λ (materialised)':45s} {naive['seconds']:7.2f} s  peak RSS {naive['peak_rss_bytes'] / 1e6:7.0f} MB"
        )
    one = results["merge ties (global, k=0.2)"]
    print("\nratios (same run):")
    print(
        f"  peak RSS of the TA merge / one checkpoint: {results['merge task_arithmetic λ=0.3']['peak_rss_bytes'] / ckpt_bytes:.2f} (target < 2)"
    )
    for label in runs:
        if label.startswith("weave"):
            r = results[label]
            print(
                f"  {label}: time {r['seconds'] / one['seconds']:.2f}x one TIES merge, peak RSS {r['peak_rss_bytes'] / one['peak_rss_bytes']:.2f}x"
            )
    if "naive weave ties, 15 λ (materialised)" in results:
        r = results["naive weave ties, 15 λ (materialised)"]
        print(
            f"  naive weave: time {r['seconds'] / one['seconds']:.2f}x, peak RSS {r['peak_rss_bytes'] / one['peak_rss_bytes']:.2f}x"
        )
    (workdir / "results.json").write_text(
        json.dumps({"checkpoint_bytes": ckpt_bytes, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
