"""The shared protocol sweep (suite and ``reproduce``): one merged encoder alive at a time, files read lazily."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from safetensors.torch import save_file

from weightweaving.suite.protocols import Problem, score_problems


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_one_merged_encoder_is_alive_at_a_time(tmp_path, method):
    gen = torch.Generator().manual_seed(0)
    pretrained = {"w": torch.zeros(8, 8), "b": torch.zeros(8)}
    files = []
    for i in range(8):  # eight tasks, given as files: the merge reads them, nothing keeps them
        path = tmp_path / f"task{i}.safetensors"
        save_file({k: torch.randn(v.shape, generator=gen) for k, v in pretrained.items()}, str(path))
        files.append(str(path))
    seen: list[weakref.ref[torch.Tensor]] = []
    alive_before: list[int] = []

    def evaluate(state):
        gc.collect()
        current = state["w"]
        alive_before.append(sum(1 for r in seen if r() is not None and r() is not current))
        seen.append(weakref.ref(current))
        return {"t": float(current.sum())}

    result = score_problems(pretrained, [Problem(files, evaluate)], 0, "multitask", method, ("mean",), 4)
    assert len(seen) == len(result["sweep"]["lambdas"]) + 2  # the sweep, then mean pool and recommended
    assert max(alive_before) == 0  # each merged encoder was gone before the next was scored
