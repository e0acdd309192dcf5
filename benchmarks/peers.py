"""Side by side with mergekit and FusionBench: time and memory on the same files, and the floor.

Usage (from the repository root, with our virtualenv's python):
    python benchmarks/peers.py --quick                      # ViT-B/32, 8 models, TA + TIES, 1 round
    python benchmarks/peers.py --shapes b32 --models 2,8,20 --methods all --rounds 2
    python benchmarks/peers.py --shapes llm --models 8 --methods task_arithmetic,ties --no-peers

It builds seeded checkpoints in --workdir (outside the repository; ≈350 MB per ViT-B/32 model, ≈1.2 GB
per ViT-L/14 model, ≈1 GB per LLM-shaped model), installs the peers into their own virtualenv
(--peers-venv; never our dependencies) and runs, round after round in alternating order, the
read-once floor, ours and each peer that has the method, every run in a fresh process whose peak
anonymous and file-backed resident memory are sampled from /proc. It writes a Markdown table, the
raw samples as JSON and a plot of time and memory against the number of models into --results.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench_engine import vit_shapes  # CLIP ViT image-tower shapes (open_clip names), shared

ROOT = Path(__file__).resolve().parents[1]
PEERS = {"mergekit": "mergekit==0.1.5", "fusion_bench": "fusion-bench==0.2.33"}


# -- checkpoints ------------------------------------------------------------------------------------


def llm_shapes(vocab: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """The parameters of a language model whose size is its vocabulary: embedding, one layer, head."""
    return {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.layers.0.self_attn.q_proj.weight": (hidden, hidden),
        "model.layers.0.input_layernorm.weight": (hidden,),
        "model.norm.weight": (hidden,),
    }


def shape_set(name: str, args: argparse.Namespace) -> tuple[dict[str, tuple[int, ...]], str]:
    if name == "b32":
        return vit_shapes(768, 12, 32, 50, 512), "float32"
    if name == "l14":
        return vit_shapes(1024, 24, 14, 257, 768), "float32"
    if name == "tiny":  # a smoke test of the script itself
        return vit_shapes(64, 2, 4, 5, 32), "float32"
    if name == "llm":
        return llm_shapes(args.llm_vocab, args.llm_hidden), "bfloat16"
    raise SystemExit(f"unknown shape set '{name}' (b32, l14, llm)")


BUILD = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
spec = json.loads(sys.argv[1])
dtype = getattr(torch, spec["dtype"])
gen = torch.Generator().manual_seed(0)
base = {k: (torch.randn(s, generator=gen) * 0.02) for k, s in spec["shapes"].items()}
for folder, seed in spec["todo"]:
    Path(folder).mkdir(parents=True, exist_ok=True)
    if seed < 0:
        sd = {k: v.to(dtype) for k, v in base.items()}
    else:
        g = torch.Generator().manual_seed(100 + seed)
        sd = {k: (v + 1e-3 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
    save_file(sd, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
    (Path(folder) / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "architectures": ["WeightweavingBench"]}))
    del sd
"""


def build(
    workdir: Path, shapes_name: str, count: int, args: argparse.Namespace
) -> tuple[Path, list[Path], int]:
    shapes, dtype = shape_set(shapes_name, args)
    tag = shapes_name if shapes_name != "llm" else f"llm{args.llm_vocab}x{args.llm_hidden}"
    root = workdir / tag
    base = root / "base"
    models = [root / f"ft{i:02d}" for i in range(count)]
    todo = [(str(base), -1)] if not (base / "model.safetensors").exists() else []
    todo += [(str(m), i) for i, m in enumerate(models) if not (m / "model.safetensors").exists()]
    if todo:
        spec = {"shapes": {k: list(v) for k, v in shapes.items()}, "dtype": dtype, "todo": todo}
        subprocess.run([sys.executable, "-c", BUILD, json.dumps(spec)], check=True)
    itemsize = 2 if dtype == "bfloat16" else 4
    nbytes = sum(itemsize * _prod(s) for s in shapes.values())
    return base, models, nbytes


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- peers ------------------------------------------------------------------------------------------
def install_peers(venv: Path) -> dict[str, str | None]:
    """{peer: None if usable, else why not}. Installs into ``venv`` (created if missing)."""
    status: dict[str, str | None] = {}
    python = venv / "bin" / "python"
    if not python.exists():
        res = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if res.returncode:
            return {p: f"cannot create {venv}: {res.stderr.strip()[-200:]}" for p in PEERS}
        # torch first, pinned to ours (a CPU wheel); the peers' own requirements after it
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], capture_output=True)
    for module, requirement in PEERS.items():
        if subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0:
            status[module] = None
            continue
        res = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", requirement], capture_output=True, text=True
        )
        ok = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0
        status[module] = (
            None if ok else f"could not be installed: {(res.stderr or res.stdout).strip()[-300:]}"
        )
    return status


# -- what runs --------------------------------------------------------------------------------------
GRID15 = [round(0.1 + 0.1 * i, 10) for i in range(15)]
# ours: (operation, method, keywords); mergekit: (merge_method, per-model parameters, global parameters)
METHODS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {
        "ours": ("merge", "task_arithmetic", {"lam": 0.3}),
        "mergekit": ("task_arithmetic", {"weight": 0.3}, {"normalize": False}),
        "fusion_bench": ("TaskArithmeticAlgorithm", "fusion_bench.method", {"scaling_factor": 0.3}),
    },
    "ties": {
        "ours": ("merge", "ties", {"lam": 1.0, "k": 0.2}),
        "mergekit": ("ties", {"weight": 1.0, "density": 0.2}, {"normalize": True}),
        "fusion_bench": (
            "TiesMergingAlgorithm",
            "fusion_bench.method",
            {"scaling_factor": 1.0, "threshold": 20, "remove_keys": [], "merge_func": "mean"},
        ),
    },
    "dare": {
        "ours": ("merge", "dare", {"lam": 0.3, "p": 0.5}),
        "mergekit": ("dare_linear", {"weight": 0.3, "density": 0.5}, {"normalize": False}),
        "fusion_bench": (
            "DareTaskArithmetic",
            "fusion_bench.method.dare.task_arithmetic",
            {"scaling_factor": 0.3, "sparsity_ratio": 0.5, "only_on_linear_weights": False},
            {"trainable": True},  # it merges trainable_state_dict(): parameters that require grad
        ),
    },
    "breadcrumbs": {
        "ours": ("merge", "breadcrumbs", {"lam": 0.3, "density": 0.9, "gamma": 0.01}),
        "mergekit": ("breadcrumbs", {"weight": 0.3, "density": 0.9, "gamma": 0.01}, {"normalize": False}),
    },
    "magmax": {
        "ours": ("merge", "magmax", {"lam": 0.5}),
        "fusion_bench": ("MagMaxAlgorithm", "fusion_bench.method", {"scaling_factor": 0.5}),
    },
    "tsv": {
        "ours": ("merge", "tsv", {"lam": 1.0}),
        "fusion_bench": (
            "TaskSingularVectorMerging",
            "fusion_bench.method.task_singular_vector.TSVM",
            {"alpha": 1.0, "exclude_keys": []},
        ),
    },
    "iso_c": {
        "ours": ("merge", "iso_c", {"lam": 1.0}),
        "fusion_bench": (
            "IsotropicMergingInCommonSubspace",
            "fusion_bench.method.isotropic_merging.iso",
            {"scaling_factor": 1.0, "exclude_keys": []},
        ),
    },
    "cart": {"ours": ("merge", "cart", {})},
    # the same merges on both cores: two engine workers (units in parallel, one thread each)
    "task_arithmetic 2 workers": {"ours": ("merge", "task_arithmetic", {"lam": 0.3, "workers": 2})},
    "ties 2 workers": {"ours": ("merge", "ties", {"lam": 1.0, "k": 0.2, "workers": 2})},
    "weave ties 15λ": {"ours": ("weave", "ties", {"lambdas": GRID15, "k": 0.2})},
}

FLOOR = r"""
import json, sys, torch
from safetensors import safe_open
from safetensors.torch import save_file
spec = json.loads(sys.argv[1])
files = [safe_open(p, "pt") for p in [spec["base"], *spec["models"]]]
out = {}
for name in files[0].keys():
    first = files[0].get_tensor(name)
    total = first.float()
    for f in files[1:]:
        total += f.get_tensor(name).float()
    out[name] = total.to(first.dtype)
save_file(out, spec["out"] + "/model.safetensors")
"""

OURS = r"""
import json, sys, torch
import weightweaving as ww
spec = json.loads(sys.argv[1])
op = getattr(ww, spec.pop("op"))
op(spec.pop("base"), spec.pop("models"), spec.pop("method"), progress=False, overwrite=True, **spec)
"""

FUSION_BENCH = r"""
import importlib, json, sys, torch
from torch import nn
from safetensors.torch import load_file, save_file
spec = json.loads(sys.argv[1])

def module_of(state):
    root = nn.Module()
    for name, value in state.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(value, requires_grad=spec["trainable"]))
    return root

from fusion_bench.modelpool import BaseModelPool
models = {"_pretrained_": module_of(load_file(spec["base"]))}
for i, path in enumerate(spec["models"]):
    models[f"task{i}"] = module_of(load_file(path))
algorithm = getattr(importlib.import_module(spec["module"]), spec["cls"])(**spec["kwargs"])
merged = algorithm.run(BaseModelPool(models))
save_file({k: v.detach().contiguous() for k, v in merged.state_dict().items()}, spec["out"] + "/model.safetensors")
"""


def mergekit_config(base: Path, models: list[Path], method: str, per_model: dict, extra: dict) -> str:
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for m in models:
        lines += [f"  - model: {m}", f"    parameters: {json.dumps(per_model)}"]
    lines += [f"parameters: {json.dumps(extra)}", "dtype: float32"]
    return "\n".join(lines) + "\n"


# -- measuring --------------------------------------------------------------------------------------
def _status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def run_env() -> dict[str, str]:
    """The environment of every timed run: our ``src`` importable, and bytecode cached as on a user's
    machine (``PYTHONDONTWRITEBYTECODE`` would make every run of ours compile its modules again)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def measure(cmd: list[str], cwd: Path) -> dict[str, Any]:
    """Run ``cmd``; wall time and the peaks of its process tree's anonymous and file-backed RSS."""
    peaks = {"anon": 0, "file": 0}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env()
    )
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            stats = [_status(p) for p in _tree(proc.pid)]
            peaks["anon"] = max(peaks["anon"], sum(s.get("RssAnon", 0) for s in stats))
            peaks["file"] = max(peaks["file"], sum(s.get("RssFile", 0) for s in stats))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    after = resource.getrusage(
        resource.RUSAGE_CHILDREN
    )  # CPU time: far less noisy than wall time on a shared machine
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    done.set()
    sampler.join()
    if proc.returncode:
        return {"error": err.strip().splitlines()[-1][:300] if err.strip() else f"exit {proc.returncode}"}
    return {"seconds": seconds, "cpu_seconds": cpu, "anon_bytes": peaks["anon"], "file_bytes": peaks["file"]}


def command(
    tool: str, method: str, base: Path, models: list[Path], out: Path, venv: Path
) -> list[str] | None:
    entry = METHODS[method].get(tool)
    files = {
        "base": str(base / "model.safetensors"),
        "models": [str(m / "model.safetensors") for m in models],
    }
    if tool == "floor":
        return [sys.executable, "-c", FLOOR, json.dumps({**files, "out": str(out)})]
    if entry is None:
        return None
    if tool == "ours":
        op, name, kwargs = entry
        spec = {
            "op": op,
            "base": str(base),
            "models": [str(m) for m in models],
            "method": name,
            "out": str(out),
        }
        return [sys.executable, "-c", OURS, json.dumps({**spec, **kwargs})]
    if tool == "mergekit":
        merge_method, per_model, extra = entry
        config = out.parent / f"mergekit-{method}.yml"
        config.write_text(mergekit_config(base, models, merge_method, per_model, extra))
        return [
            str(venv / "bin" / "mergekit-yaml"),
            str(config),
            str(out),
            "--no-copy-tokenizer",
            "--allow-crimes",
        ]
    cls, module, kwargs, *options = entry
    trainable = bool(options and options[0].get("trainable"))
    spec = {**files, "out": str(out), "cls": cls, "module": module, "kwargs": kwargs, "trainable": trainable}
    return [str(venv / "bin" / "python"), "-c", FUSION_BENCH, json.dumps(spec)]


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    good = [s for s in samples if "seconds" in s]
    if not good:
        return {"error": samples[0].get("error", "failed") if samples else "not run"}
    secs = [s["seconds"] for s in good]
    return {
        "seconds": statistics.median(secs),
        "min": min(secs),
        "max": max(secs),
        "cpu_seconds": statistics.median(s.get("cpu_seconds", float("nan")) for s in good),
        "anon_bytes": statistics.median(s["anon_bytes"] for s in good),
        "file_bytes": statistics.median(s["file_bytes"] for s in good),
        "runs": len(good),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="b32", help="comma list of b32, l14, llm")
    parser.add_argument("--models", default="2,8,20", help="comma list of model counts")
    parser.add_argument("--methods", default="all", help="comma list of " + ", ".join(METHODS) + " or 'all'")
    parser.add_argument("--tools", default="floor,ours,mergekit,fusion_bench")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--quick", action="store_true", help="b32, 8 models, task_arithmetic and ties, 1 round"
    )
    parser.add_argument("--no-peers", action="store_true", help="only the floor and ours")
    parser.add_argument("--llm-vocab", type=int, default=128256)
    parser.add_argument("--llm-hidden", type=int, default=4096)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "weightweaving-peers"))
    parser.add_argument("--peers-venv", default=str(Path(tempfile.gettempdir()) / "weightweaving-peers-venv"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (default: delete them)")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.models, args.methods, args.rounds = "b32", "8", "task_arithmetic,ties", 1
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    tools = [t for t in args.tools.split(",") if not (args.no_peers and t in PEERS)]
    workdir, venv = Path(args.workdir), Path(args.peers_venv)
    workdir.mkdir(parents=True, exist_ok=True)
    status = install_peers(venv) if any(t in PEERS for t in tools) else {}
    for peer, why in status.items():
        if why:
            print(f"{peer}: {why}; continuing without it", flush=True)
    tools = [t for t in tools if status.get(t) is None]
    # one untimed import first, so that no timed run pays for compiling our modules
    subprocess.run([sys.executable, "-c", "import weightweaving"], cwd=ROOT, env=run_env(), check=True)
    rows: list[dict[str, Any]] = []
    for shapes_name in args.shapes.split(","):
        for count in sorted(int(c) for c in args.models.split(",")):
            base, models, nbytes = build(workdir, shapes_name, count, args)
            print(f"\n{shapes_name}: base + {count} models, {nbytes / 1e6:.0f} MB each", flush=True)
            for method in methods:
                runners = [t for t in tools if t == "floor" or METHODS[method].get(t) is not None]
                samples: dict[str, list[dict[str, Any]]] = {t: [] for t in runners}
                for r in range(args.rounds):
                    for tool in runners if r % 2 == 0 else runners[::-1]:  # alternate the order
                        out = workdir / "out" / tool
                        shutil.rmtree(out, ignore_errors=True)
                        out.mkdir(parents=True)
                        cmd = command(tool, method, base, models, out, venv)
                        assert cmd is not None
                        if tool == "ours":
                            shutil.rmtree(out)  # ours creates its output folder itself
                        samples[tool].append(measure(cmd, ROOT))
                        s = samples[tool][-1]
                        print(
                            f"  {method:16s} {tool:13s} "
                            + (
                                f"{s['seconds']:7.1f} s  cpu {s['cpu_seconds']:7.1f} s  anon {s['anon_bytes'] / 1e6:6.0f} MB  file {s['file_bytes'] / 1e6:6.0f} MB"
                                if "seconds" in s
                                else f"failed: {s['error']}"
                            ),
                            flush=True,
                        )
                        shutil.rmtree(out, ignore_errors=True)
                for tool in runners:
                    rows.append(
                        {
                            "shapes": shapes_name,
                            "models": count,
                            "method": method,
                            "tool": tool,
                            "checkpoint_bytes": nbytes,
                            **summarize(samples[tool]),
                            "samples": samples[tool],
                        }
                    )
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    report(rows, Path(args.results), args, status)


def report(
    rows: list[dict[str, Any]], results: Path, args: argparse.Namespace, status: dict[str, str | None]
) -> None:
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M")
    key = lambda r: (r["shapes"], r["models"], r["method"])  # noqa: E731
    index = {(key(r), r["tool"]): r for r in rows}
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, rounds: {args.rounds} "
        "(alternating order); medians, with min–max; peak RSS of the process tree, sampled every 20 ms.",
        "",
        "| shapes | models | method | tool | time (s) [min–max] | × floor | × peer | CPU s (× floor) "
        "| anon MB (× floor) | file MB (× floor) | anon, file × peer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "seconds" not in r:
            lines.append(
                f"| {r['shapes']} | {r['models']} | {r['method']} | {r['tool']} | failed: {r['error']} | | | | | | |"
            )
            continue
        floor = index.get(((key(r)), "floor")) if r["tool"] != "floor" else None
        x_floor = _vs_floor(r, floor, "seconds").strip(" ()")
        cpu = f"{r['cpu_seconds']:.1f}" + _vs_floor(r, floor, "cpu_seconds")
        anon = f"{r['anon_bytes'] / 1e6:.0f}" + _vs_floor(r, floor, "anon_bytes")
        file = f"{r['file_bytes'] / 1e6:.0f}" + _vs_floor(r, floor, "file_bytes")
        peers = []
        memory_peer = []
        if r["tool"] == "ours":
            for peer in PEERS:
                other = index.get((key(r), peer))
                if other and "seconds" in other:
                    peers.append(f"{peer}: {other['seconds'] / r['seconds']:.1f}x faster")
                    memory_peer.append(
                        f"{peer}: {r['anon_bytes'] / max(other['anon_bytes'], 1):.2f}, "
                        f"{r['file_bytes'] / max(other['file_bytes'], 1):.2f}"
                    )
        lines.append(
            f"| {r['shapes']} | {r['models']} | {r['method']} | {r['tool']} | {r['seconds']:.1f} "
            f"[{r['min']:.1f}–{r['max']:.1f}] | {x_floor} | {'; '.join(peers)} | {cpu} | {anon} | "
            f"{file} | {'; '.join(memory_peer)} |"
        )
    for peer, why in status.items():
        if why:
            lines.append(f"\n{peer}: {why}")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    (results / f"peers-{stamp}.md").write_text(table)
    (results / f"peers-{stamp}.json").write_text(json.dumps({"rows": rows, "peers": status}, indent=2))
    plot(rows, results / f"peers-{stamp}.png")


def _vs_floor(row: dict[str, Any], floor: dict[str, Any] | None, field: str) -> str:
    """`` (1.23)``: ``row[field]`` as a multiple of the floor's in the same run ('' without one)."""
    if floor is None or "seconds" not in floor:
        return ""
    return f" ({row[field] / max(floor[field], 1e-9):.2f})"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[tuple[str, str, str], list[tuple[int, float, float]]] = {}
    for r in rows:
        if "seconds" in r:
            series.setdefault((r["shapes"], r["method"], r["tool"]), []).append(
                (r["models"], r["seconds"], r["anon_bytes"] / 1e6)
            )
    for (shapes, method, tool), points in sorted(series.items()):
        points.sort()
        label = f"{shapes} {method} {tool}"
        ax_t.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax_m.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=label)
    ax_t.set(xlabel="fine-tuned models", ylabel="wall time (s)", title="time")
    ax_m.set(xlabel="fine-tuned models", ylabel="peak anonymous RSS (MB)", title="memory")
    ax_m.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
