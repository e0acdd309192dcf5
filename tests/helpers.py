"""Small checkpoints that tests build for themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]


def save_safetensors(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def save_hf_folder(folder: Path, sd: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / "model.safetensors", sd)
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "toy"}))
    return folder


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(str(folder / shard)))
        return out
    return load_file(str(folder / "model.safetensors"))


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "weightweaving", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def toy_models(
    num_tasks: int = 3, seed: int = 0
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    base = {
        "blocks.0.attn.in_proj.weight": torch.randn(12, 8, generator=gen),
        "blocks.0.attn.in_proj.bias": torch.randn(12, generator=gen),
        "ln.weight": torch.ones(8),
        "conv1.weight": torch.randn(4, 3, 2, 2, generator=gen),
        "position_ids": torch.arange(5),
    }
    tuned = []
    for _ in range(num_tasks):
        tuned.append(
            {
                k: (v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone())
                for k, v in base.items()
            }
        )
    return base, tuned
