"""Merge time against the number of Ray workers (and of models), with the overhead against the local
executor at one worker; every Ray output is checked to be byte-identical to the local one.

Usage: python benchmarks/bench_ray.py [--small] [--workers 1 2 4] [--models 2 4 8] [--repeats N]

Each worker count gets a fresh local Ray cluster (``ray.init(num_cpus=N)``), started as root inside
a network namespace of its own with only loopback, so nothing talks to another address. The first
merge on a new cluster also starts its worker processes; it is reported apart (``cold``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import build  # noqa: E402

import weightweaving as ww  # noqa: E402
from weightweaving.engine.ray_executor import RayExecutor  # noqa: E402

CASES = [("task_arithmetic", {"lam": 0.3}), ("ties", {"lam": 1.0, "k": 0.2})]


def loopback_only() -> None:
    """Move this process into a new network namespace with only loopback (needs root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) != 0:
        raise SystemExit(f"unshare(CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())} (run as root)")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.endswith(".safetensors")}


def timed(method: str, kw: dict[str, Any], base: Path, models: list[Path], out: Path, **engine: Any) -> float:
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    ww.merge(base, models, method, out=out, progress=False, resource_check=False, **kw, **engine)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true", help="~9M parameters per model instead of ~88M")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--models", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "weightweaving-bench"))
    parser.add_argument("--json", help="write the raw samples here")
    args = parser.parse_args()
    import ray
    import torch

    loopback_only()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file left in ~/.ray by the local cluster
    torch.set_num_threads(1)  # one thread per worker and here: what the cluster's tasks use
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    base, all_models, nbytes = build(workdir, args.small, models=max(args.models))
    out = workdir / "ray-bench-out"
    report: dict[str, Any] = {"bytes_per_model": nbytes, "local": {}, "ray": {}, "models": {}}
    most = all_models[: max(args.models)]
    for method, kw in CASES:
        samples = [timed(method, kw, base, most, out) for _ in range(args.repeats)]
        report["local"][method] = samples
        shutil.copytree(out, workdir / f"local-{method}", dirs_exist_ok=True)
    for count in args.workers:
        ray.init(
            num_cpus=count,
            object_store_memory=200 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
        )
        try:
            executor = RayExecutor()
            report["ray"][count] = {}
            for method, kw in CASES:
                cold = timed(method, kw, base, most, out, executor=executor)
                assert files(out) == files(workdir / f"local-{method}"), f"{method}: Ray output differs"
                warm = [timed(method, kw, base, most, out, executor=executor) for _ in range(args.repeats)]
                report["ray"][count][method] = {"cold": cold, "warm": warm}
            if count == max(args.workers):  # time against the number of models, at the most workers
                for n in args.models:
                    report["models"][n] = {
                        method: statistics.median(
                            timed(method, kw, base, all_models[:n], out, executor=executor)
                            for _ in range(args.repeats)
                        )
                        for method, kw in CASES
                    }
        finally:
            ray.shutdown()
    shutil.rmtree(out, ignore_errors=True)
    print(f"{len(most)} models of {nbytes / 2**20:.0f} MiB (float32), medians of {args.repeats} runs")
    print(f"{'executor':<22}" + "".join(f"{m:>34}" for m, _ in CASES))
    local = {m: statistics.median(report["local"][m]) for m, _ in CASES}
    print(f"{'local, 1 thread':<22}" + "".join(f"{local[m]:>33.2f}s" for m, _ in CASES))
    for count, runs in report["ray"].items():
        cells = []
        for m, _ in CASES:
            warm = statistics.median(runs[m]["warm"])
            cells.append(f"{warm:.2f}s ({warm / local[m]:.2f}x, cold {runs[m]['cold']:.1f}s)")
        print(f"{f'ray, {count} workers':<22}" + "".join(f"{c:>34}" for c in cells))
    for n, times in report["models"].items():
        print(f"{f'ray, {n} models':<22}" + "".join(f"{times[m]:>33.2f}s" for m, _ in CASES))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
