"""``weightweaving inspect MODEL... [--base B]``: what is in checkpoints, and how their task vectors relate.

Without ``--base``: tensors, parameters, dtypes and size, from the headers alone. With ``--base``: per
layer the task-vector norms ‖Δ_t‖, the sign-conflict rate (entries where the non-zero task-vector values
disagree in sign, what TIES elects over), the cosine matrix between task vectors (Ilharco et al. 2023,
Fig. 3; the Weight Weaving paper's Fig. 3), and the λ ranges the methods' papers searched. All of it
streams one tensor at a time, so models larger than memory can be inspected.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .analysis.similarity import _cosine
from .api import open_job
from .checkpoints.open import open_checkpoint
from .errors import OptionError
from .methods import get_method, list_methods

_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|resblocks)\.\d+)\.")


def layer_of(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``; other names -> their module."""
    match = _LAYER.match(name)
    if match:
        return match.group(1)
    return name.rsplit(".", 1)[0] if "." in name else name


def describe(source: str) -> dict[str, Any]:
    """Tensors, parameter count, dtypes and size of one checkpoint, from its header(s) only."""
    ckpt = open_checkpoint(source)
    try:
        infos = ckpt.infos()
        dtypes: dict[str, int] = defaultdict(int)
        for info in infos.values():
            dtypes[str(info.dtype).removeprefix("torch.")] += info.numel
        return {
            "path": ckpt.label(),
            "tensors": len(infos),
            "parameters": sum(i.numel for i in infos.values()),
            "bytes": sum(i.nbytes for i in infos.values()),
            "dtypes": dict(dtypes),
            "shapes": {
                name: [list(i.shape), str(i.dtype).removeprefix("torch.")] for name, i in infos.items()
            },
        }
    finally:
        ckpt.close()


def _unit_stats(task_vectors: Tensor, ctx: object) -> tuple[Tensor, int, int]:
    flat = task_vectors.reshape(task_vectors.shape[0], -1)  # (T, n)
    signs = torch.sign(flat)
    conflicts = int(((signs > 0).any(0) & (signs < 0).any(0)).sum())
    return (flat @ flat.T).cpu(), conflicts, flat.shape[1]


def compare(base: str, models: Sequence[str], *, device: str = "cpu") -> dict[str, Any]:
    """Task-vector statistics of ``models`` against ``base``, per layer and whole model."""
    job = open_job(
        base,
        models,
        device=device,
        dtype=None,
        compute_dtype=torch.float64,
        include=None,
        exclude=None,
        seed=0,
        common_only=True,
        allow_nonfinite=True,
        executor=None,
        workers=1,
        progress=None,
        vocab="base",
    )
    try:
        results = job.runner.scan(_unit_stats, desc="inspecting")
    finally:
        job.close()
    names = [u.name for u in job.runner.plan.merge_units]
    grams: dict[str, Tensor] = {}
    counts: dict[str, list[int]] = {}
    for name, (gram, conflicts, numel) in zip(names, results, strict=True):
        layer = layer_of(name)
        grams[layer] = grams[layer] + gram if layer in grams else gram
        c = counts.setdefault(layer, [0, 0])
        c[0] += conflicts
        c[1] += numel
    total = sum(grams.values(), torch.zeros(len(models), len(models), dtype=torch.float64))
    order = list(dict.fromkeys(layer_of(u.name) for u in job.runner.plan.units if u.merge))  # base order
    return {
        "base": job.sources[0],
        "models": job.sources[1:],
        "notes": job.runner.plan.notes,
        "norms": total.diagonal().clamp_min(0).sqrt().tolist(),
        "cosine": _cosine(total).tolist(),
        "sign_conflict_rate": sum(c[0] for c in counts.values()) / max(1, sum(c[1] for c in counts.values())),
        "layers": [
            {
                "layer": layer,
                "norms": grams[layer].diagonal().clamp_min(0).sqrt().tolist(),
                "cosine": _cosine(grams[layer]).tolist(),
                "sign_conflict_rate": counts[layer][0] / max(1, counts[layer][1]),
            }
            for layer in order
        ],
        "paper_lam_ranges": {
            m: {k: list(v) for k, v in get_method(m).paper_lam_ranges.items()}
            for m in list_methods()
            if get_method(m).paper_lam_ranges
        },
    }


def plot_cosine(report: dict[str, Any], path: str) -> None:
    """Save the whole-model cosine matrix as a PNG heat map (matplotlib, from the ``suite`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError("--plot needs matplotlib: pip install 'weightweaving[suite]'") from None
    labels = [Path(m).parent.name if Path(m).suffix else Path(m).name for m in report["models"]]
    cos = report["cosine"]
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 1.0 + 0.6 * n))
    image = ax.imshow(cos, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{cos[i][j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title("cosine similarity of task vectors")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_summary(info: dict[str, Any], shapes: bool) -> None:
    dtypes = ", ".join(f"{k} {v:,}" for k, v in info["dtypes"].items())
    print(
        f"{info['path']}: {info['tensors']} tensors, {info['parameters']:,} parameters, {_size(info['bytes'])} ({dtypes})"
    )
    if shapes:
        for name, (shape, dtype) in info["shapes"].items():
            print(f"  {name}  {tuple(shape)}  {dtype}")


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _matrix(rows: list[list[float]], labels: list[str]) -> list[str]:
    width = max(6, *(len(x) for x in labels))
    lines = [" " * (width + 2) + " ".join(f"{i:>6}" for i in range(len(labels)))]
    for label, row in zip(labels, rows, strict=True):
        lines.append(f"{label:>{width}}  " + " ".join(f"{v:6.3f}" for v in row))
    return lines


def _print_comparison(report: dict[str, Any]) -> None:
    labels = [f"[{i}]" for i in range(len(report["models"]))]
    for label, model in zip(labels, report["models"], strict=True):
        print(f"{label} {model}")
    print(f"task vectors against {report['base']}")
    print("‖Δ‖: " + ", ".join(f"{label} {n:.4g}" for label, n in zip(labels, report["norms"], strict=True)))
    print(f"sign-conflict rate: {report['sign_conflict_rate']:.4f}")
    print("cosine similarity:")
    print("\n".join(_matrix(report["cosine"], labels)))
    if len(labels) > 1:
        print("per layer: ‖Δ‖ per model, mean pairwise cosine, sign-conflict rate")
    else:
        print("per layer: ‖Δ‖")
    for layer in report["layers"]:
        cos = torch.tensor(layer["cosine"])
        n = cos.shape[0]
        pairs = cos[~torch.eye(n, dtype=torch.bool)]
        norms = " ".join(f"{v:.4g}" for v in layer["norms"])
        extra = (
            f"  cos {float(pairs.mean()):.3f}  conflicts {layer['sign_conflict_rate']:.4f}" if n > 1 else ""
        )
        print(f"  {layer['layer']}: {norms}{extra}")
    print("λ ranges the papers searched (multitask / continual / domain):")
    for method, ranges in report["paper_lam_ranges"].items():
        print(f"  {method}: " + ", ".join(f"{k} {a}–{b}" for k, (a, b) in ranges.items()))
    for note in report["notes"]:
        print(f"note: {note}")


def add_inspect_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "inspect",
        help="describe checkpoints; with --base, compare their task vectors",
        description="Tensors, parameters, dtypes and size of each model; with --base, per layer the "
        "task-vector norms, the cosine matrix between task vectors, the sign-conflict rate and the "
        "papers' λ ranges. Streams one tensor at a time.",
    )
    parser.add_argument(
        "models", nargs="+", metavar="MODEL", help="checkpoints (files, folders or LoRA adapters)"
    )
    parser.add_argument("--base", help="the pre-trained checkpoint the task vectors are taken against")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument(
        "--plot", metavar="FILE", help="save the cosine matrix as a PNG heat map (needs --base)"
    )
    parser.add_argument("--shapes", action="store_true", help="list every tensor's shape and dtype")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    return parser


def run_inspect(args: argparse.Namespace) -> None:
    if args.plot and not args.base:
        raise OptionError("--plot draws the task vectors' cosine matrix, so it needs --base")
    report: dict[str, Any] = {}
    if args.base:
        report["comparison"] = compare(args.base, args.models, device=args.device)
        if args.plot:
            plot_cosine(report["comparison"], args.plot)
    sources = [args.base, *args.models] if args.base else list(args.models)
    report["checkpoints"] = [
        describe(s) for s in sources if not (args.base and Path(s, "adapter_config.json").is_file())
    ]
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for info in report["checkpoints"]:
        _print_summary(info, args.shapes)
    if "comparison" in report:
        _print_comparison(report["comparison"])
    if args.plot:
        print(f"wrote {args.plot}")
