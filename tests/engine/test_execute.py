from __future__ import annotations

import os
import sys

import pytest
import torch

import weightweaving as ww
from weightweaving.engine import execute
from weightweaving.engine.execute import entrywise_threads


@pytest.mark.parametrize(("busy", "threads"), [(True, 1), (False, 2)])
def test_entrywise_threads_one_thread_on_a_busy_cpu_then_restored(monkeypatch, busy, threads) -> None:
    monkeypatch.setattr(execute, "_machine_busy", lambda: busy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with entrywise_threads(torch.device("cpu"), True):
            assert torch.get_num_threads() == threads
        assert torch.get_num_threads() == 2
        with entrywise_threads(torch.device("cpu"), False):  # SVD methods keep PyTorch's setting
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_machine_counts_as_busy_when_others_run_on_every_cpu_but_one(monkeypatch) -> None:
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setattr(execute, "_others_running", lambda: cpus - 2)
    assert not execute._machine_busy()
    monkeypatch.setattr(execute, "_others_running", lambda: cpus - 1)
    assert execute._machine_busy()
    monkeypatch.setattr(execute, "_others_running", lambda: None)  # no /proc/stat: one thread
    assert execute._machine_busy()


def test_others_running_reads_proc_stat() -> None:
    others = execute._others_running(samples=2, interval=0.0)
    if sys.platform.startswith("linux"):
        assert isinstance(others, int) and others >= 0
    else:
        assert others is None


@pytest.mark.parametrize(("method", "params"), [("ties", {"k": 0.3}), ("breadcrumbs", {"density": 0.3})])
def test_a_merge_gives_the_same_bytes_and_leaves_the_threads_as_they_were(method, params) -> None:
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 48, generator=gen), "b": torch.randn(48, generator=gen)}
    models = [{k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        merged = ww.merge(base, models, method, progress=False, **params)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        again = ww.merge(base, models, method, progress=False, **params)
    finally:
        torch.set_num_threads(before)
    assert isinstance(merged, dict) and isinstance(again, dict)
    for name, tensor in merged.items():
        assert torch.equal(tensor.view(torch.int32), again[name].view(torch.int32))


@pytest.mark.parametrize(
    ("method", "pool", "one_thread"),
    [
        ("breadcrumbs", "mean", True),
        ("ties", "magmax", True),
        ("tsv", "mean", False),
        ("breadcrumbs", "nearest_mean", False),
    ],
)
def test_a_weave_runs_on_one_thread_when_its_merges_and_pool_would(
    monkeypatch, method, pool, one_thread
) -> None:
    import weightweaving.api as api

    seen: list[bool] = []
    original = api.entrywise_threads

    def spy(device, entrywise):
        seen.append(entrywise)
        return original(device, entrywise)

    monkeypatch.setattr(api, "entrywise_threads", spy)
    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(24, 16, generator=gen)}
    models = [{"w": base["w"] + 0.01 * torch.randn(24, 16, generator=gen)} for _ in range(3)]
    ww.weave(base, models, method=method, lambdas=[0.5, 1.0], pool=pool, progress=False)
    assert seen == [one_thread]
