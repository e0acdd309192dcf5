"""Method passes as plan stages: TIES's exact global statistics in few passes, deferral, fallbacks."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

import weightweaving
from weightweaving.api import method_stats, open_job
from weightweaving.checkpoints import open_checkpoint
from weightweaving.methods import get_method, ties

SHAPES = {"a.weight": (40, 30), "a.bias": (40,), "b.weight": (25, 16), "c": (7,)}
ENGINE = dict(
    device="cpu",
    dtype=None,
    compute_dtype=None,
    include=None,
    exclude=None,
    seed=0,
    common_only=False,
    allow_nonfinite=False,
    executor=None,
    workers=1,
    progress=False,
)


def models(num_tasks: int = 4, cancel: bool = False) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(3)
    base = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    tasks = [
        {k: v + torch.randn(v.shape, generator=gen) * (t + 1) for k, v in base.items()}
        for t in range(num_tasks)
    ]
    if cancel:  # task 1 = −task 0 on b.weight: trimmed values of an entry cancel, the majority decides
        tasks[1]["b.weight"] = 2 * base["b.weight"] - tasks[0]["b.weight"]
        tasks[2]["b.weight"] = base["b.weight"].clone()
        tasks[3]["b.weight"] = base["b.weight"].clone()
    return base, tasks


def reference_ties(base: dict, tasks: list[dict], k: float, lam: float) -> dict:
    """TIES over the whole model flattened in sorted-name order, in memory (ALGORITHMS.md)."""
    names = sorted(base)
    flat = torch.stack([torch.cat([(t[n] - base[n]).reshape(-1) for n in names]) for t in tasks])
    n = flat.shape[1]
    tau = flat.abs().kthvalue(n - int(n * k), dim=1).values
    trimmed = flat * (flat.abs() >= tau[:, None])
    signs = torch.sign(trimmed.sum(0))
    majority = torch.sign(signs.sum())
    signs = torch.where(signs == 0, majority, signs)
    agree = torch.where(signs > 0, trimmed > 0, trimmed < 0)
    merged = (trimmed * agree).sum(0) / (trimmed * agree != 0).sum(0).clamp(min=1)
    out, at = {}, 0
    for name in names:
        size = base[name].numel()
        out[name] = base[name] + lam * merged[at : at + size].reshape(base[name].shape)
        at += size
    return out


@pytest.mark.parametrize("cancel", [False, True])
def test_global_ties_equals_the_in_memory_reference(cancel):
    base, tasks = models(cancel=cancel)
    got = weightweaving.merge(base, tasks, "ties", 0.7, k=0.3)
    want = reference_ties(base, tasks, 0.3, 0.7)
    assert list(got) == list(base)  # plan order, even when a unit was deferred
    for name in base:
        assert torch.equal(got[name], want[name]), name


def test_ties_reads_the_model_twice_and_defers_only_cancelling_units():
    base, tasks = models(cancel=True)
    job = open_job(base, tasks, **ENGINE)
    method = get_method("ties")
    p = method.parse_params({"k": 0.3})
    found = {}
    found["stats"] = method_stats(method, p, job.runner, deliver=lambda s: found.update(stats=s))
    assert found["stats"].majority_sign is None  # the sign is left to the merge pass
    from weightweaving.api import with_stats

    order = [
        name
        for name, _ in job.runner.run(
            lambda tv, ctx: method.merge_unit(tv, p, 1.0, with_stats(ctx, found["stats"]))
        )
    ]
    assert job.runner.pass_log == ["sample (sample)", "window", "merge + sign"]
    assert job.runner.passes == 2
    assert order[-1] == "b.weight" and sorted(order) == sorted(base)  # merged again at the end
    assert found["stats"].majority_sign in (-1.0, 1.0)


def test_fallback_passes_are_exact_when_the_window_is_too_wide(monkeypatch):
    monkeypatch.setattr(ties, "_WINDOW_CAP", 0)
    shipped = []  # what each unit's window map hands back: no values when they would be dropped
    real = ties.window_values

    def window_values(*args):
        out = real(*args)
        shipped.append(sum(v.numel() for v in out[2]))
        return out

    monkeypatch.setattr(ties, "window_values", window_values)
    base, tasks = models()
    job = open_job(base, tasks, **ENGINE)
    method = get_method("ties")
    stats = method_stats(method, method.parse_params({"k": 0.3}), job.runner)
    assert job.runner.pass_log == ["sample (sample)", "window", "buckets", "boundary", "sign"]
    assert shipped and set(shipped) == {0}
    want = reference_ties(base, tasks, 0.3, 1.0)  # same thresholds as sorting everything
    names = sorted(base)
    flat = torch.stack([torch.cat([(t[n] - base[n]).reshape(-1) for n in names]) for t in tasks]).abs()
    n = flat.shape[1]
    assert torch.equal(stats.thresholds, flat.kthvalue(n - int(n * 0.3), dim=1).values)
    got = weightweaving.merge(base, tasks, "ties", 1.0, k=0.3)
    assert all(torch.equal(got[k], want[k]) for k in base)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float64])
def test_the_boundary_pass_ships_counts_not_a_bucket_of_values(monkeypatch, compute_dtype):
    """bfloat16 weights give task vectors of few distinct values, so the threshold's bucket can hold
    a large share of every task: in float32 the boundary map returns counts of 65536 slots, and the
    threshold is still the exact order statistic (float64 keeps the values)."""
    monkeypatch.setattr(ties, "_WINDOW_CAP", 0)
    shipped = []
    real = ties.boundary_values

    def boundary_values(*args):
        out = real(*args)
        shipped.extend(v.numel() if v.dtype != torch.int64 else -1 for v in out)
        return out

    monkeypatch.setattr(ties, "boundary_values", boundary_values)
    base, tasks = models()
    base = {k: v.to(torch.bfloat16) for k, v in base.items()}
    tasks = [{k: (base[k].float() + 0.01 * v).to(torch.bfloat16) for k, v in t.items()} for t in tasks]
    job = open_job(base, tasks, **{**ENGINE, "compute_dtype": compute_dtype})
    method = get_method("ties")
    stats = method_stats(method, method.parse_params({"k": 0.3}), job.runner)
    assert "boundary" in job.runner.pass_log
    assert set(shipped) == {-1} if compute_dtype == torch.float32 else -1 not in shipped
    names = sorted(base)
    flat = torch.stack(
        [
            torch.cat([(t[n].to(compute_dtype) - base[n].to(compute_dtype)).reshape(-1) for n in names])
            for t in tasks
        ]
    ).abs()
    n = flat.shape[1]
    want = flat.kthvalue(n - int(n * 0.3), dim=1).values
    assert torch.equal(stats.thresholds, want) and stats.thresholds.dtype == compute_dtype


def test_a_misplaced_window_falls_back_exactly(monkeypatch):
    """A sample that puts every window far from the threshold still gives the exact result."""
    real = ties.place_window

    def wrong(keep, partials):
        window = real(keep, partials)
        return ties.TiesWindow(keep, window.high * 10, window.high * 20)

    monkeypatch.setattr(ties, "place_window", wrong)
    base, tasks = models()
    got = weightweaving.merge(base, tasks, "ties", 1.0, k=0.2)
    want = reference_ties(base, tasks, 0.2, 1.0)
    assert all(torch.equal(got[k], want[k]) for k in base)


def test_stage_maps_and_their_inputs_pickle():
    """What a distributed executor ships to a worker: each map and the ``given`` it receives."""
    stages = get_method("ties").stages(get_method("ties").parse_params({"k": 0.2}))
    assert [s.name for s in stages] == ["sample", "window", "buckets", "boundary", "sign"]
    for stage in stages:
        assert pickle.loads(pickle.dumps(stage.map)) is stage.map
    window = ties.TiesWindow(0.2, torch.ones(3), torch.ones(3) * 2)
    assert torch.equal(pickle.loads(pickle.dumps(window)).high, window.high)
    assert get_method("task_arithmetic").stages(get_method("task_arithmetic").parse_params({})) == []


def test_get_row_range_reads_only_those_rows(tmp_path):
    tensors = {"w": torch.arange(60.0).reshape(6, 10), "v": torch.arange(5.0)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    assert torch.equal(ckpt.get_row_range("w", 2, 4), tensors["w"][2:4])
    assert torch.equal(ckpt.get_row_range("w", 5, 9), tensors["w"][5:])
    assert torch.equal(ckpt.get_row_range("v", 1, 3), tensors["v"][1:3])
