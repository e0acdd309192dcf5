"""Cosine similarity of task vectors and the lazy λ sweep."""

from __future__ import annotations

import torch

import weightweaving
from tests.helpers import toy_models
from weightweaving.analysis import lam_sweep, task_vector_similarity


def test_similarity_matches_direct_computation():
    base, tuned = toy_models(3)
    sim = task_vector_similarity(base, tuned)
    flat = torch.stack(
        [
            torch.cat(
                [(t[k] - base[k]).double().flatten() for k in sorted(base) if base[k].is_floating_point()]
            )
            for t in tuned
        ]
    )
    direct = torch.nn.functional.cosine_similarity(flat[:, None], flat[None], dim=-1)
    torch.testing.assert_close(sim.model, direct)
    layer = "blocks.0.attn.in_proj.weight"
    lf = torch.stack([(t[layer] - base[layer]).double().flatten() for t in tuned])
    torch.testing.assert_close(
        sim.per_layer[layer], torch.nn.functional.cosine_similarity(lf[:, None], lf[None], dim=-1)
    )
    assert set(sim.per_layer) == {k for k in base if base[k].is_floating_point()}


def test_sweep_equals_merges_and_is_lazy():
    base, tuned = toy_models(2)
    sweep = lam_sweep(base, tuned, "task_arithmetic", [0.25, 1.0])
    lam, first = next(sweep)
    assert lam == 0.25
    want = weightweaving.merge(base, tuned, "task_arithmetic", 0.25)
    assert all(torch.allclose(first[k].float(), want[k].float(), atol=1e-6) for k in want)
    lam, second = next(sweep)
    assert lam == 1.0
