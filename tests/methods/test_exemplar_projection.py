"""CAT Merging (exemplar_projection) against closed-form answers."""

from __future__ import annotations

import pytest
import torch

import weightweaving
from weightweaving.errors import OptionError
from weightweaving.methods import UnitContext, get_method
from weightweaving.methods.exemplar_projection import conflict_bases, count, project_out
from weightweaving.withdata.features import ExemplarStatistics

gen = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def grams_of(*features: torch.Tensor) -> torch.Tensor:
    return torch.stack([x.T @ x for x in features])


def merged(tv: torch.Tensor, stats: ExemplarStatistics, name: str, **params: float) -> torch.Tensor:
    method = get_method("exemplar_projection")
    p = method.parse_params(params)
    ctx = UnitContext(name=name, extras={"exemplar_statistics": stats})
    return method.merge_unit(tv, p, 1.0, ctx)


def test_bases_are_orthonormal_and_projected_out() -> None:
    weights = rand(2, 5, 4)  # (T, d_out, d_in)
    grams = grams_of(rand(7, 4), rand(7, 4))
    bases = conflict_bases(weights, grams, alpha=0.0, c=2)  # α = 0: G_k is PSD, its top-2 positive
    for b in bases:
        torch.testing.assert_close(b.T @ b, torch.eye(2, dtype=torch.float64))
    projected = project_out(weights, bases)
    # T_i B_k = 0 for i ≠ k (torch layout: B_kᵀ W_i = 0); task k's own vector is untouched
    torch.testing.assert_close(bases[1].T @ projected[0], torch.zeros(2, 4, dtype=torch.float64))
    torch.testing.assert_close(bases[0].T @ projected[1], torch.zeros(2, 4, dtype=torch.float64))
    # B_k spans the top eigenvectors of G_k = W_i G_k W_iᵀ (i ≠ k, α = 0)
    g0 = weights[1] @ grams[0] @ weights[1].T
    values, vectors = torch.linalg.eigh(g0)
    top = vectors[:, -2:]
    torch.testing.assert_close(bases[0] @ bases[0].T, top @ top.T)


def test_c_zero_is_task_arithmetic_exactly() -> None:
    tv = rand(3, 5, 4)
    stats = ExemplarStatistics(grams={"w": grams_of(rand(6, 4), rand(6, 4), rand(6, 4))})
    assert torch.equal(merged(tv, stats, "w", c=0), tv.sum(0))
    norm = ExemplarStatistics(norm_squares={"n": rand(3, 4).abs()}, biases={"b"})
    assert torch.equal(merged(tv[:, 0], norm, "n", c=0), tv[:, 0].sum(0))
    assert torch.equal(merged(tv[:, 0], norm, "b", c=0), tv[:, 0].sum(0))


def test_features_orthogonal_to_other_tasks_give_task_arithmetic() -> None:
    tv = torch.zeros(2, 5, 6, dtype=torch.float64)
    tv[0, :, :3] = rand(5, 3)  # task 0 reads input coordinates 0-2
    tv[1, :, 3:] = rand(5, 3)  # task 1 reads 3-5
    x0, x1 = torch.zeros(8, 6, dtype=torch.float64), torch.zeros(8, 6, dtype=torch.float64)
    x0[:, :3], x1[:, 3:] = rand(8, 3), rand(8, 3)  # each task's features miss the other's vector
    stats = ExemplarStatistics(grams={"w": grams_of(x0, x1)})
    torch.testing.assert_close(merged(tv, stats, "w", c=3, alpha=1.0), tv.sum(0), rtol=0, atol=1e-12)


def test_conflicting_direction_is_removed() -> None:
    # task 1 writes output 0 from the input that task 0's exemplars fill: that output is projected out
    tv = torch.zeros(2, 3, 2, dtype=torch.float64)
    tv[0, 1, 0] = 1.0
    tv[1, 0, 0] = 2.0
    tv[1, 2, 1] = 3.0
    x0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    x1 = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    stats = ExemplarStatistics(grams={"w": grams_of(x0, x1)})
    out = merged(tv, stats, "w", c=1, alpha=0.0)
    want = tv.sum(0)
    want[0, 0] = 0.0  # task 1's entry disturbing task 0's features
    torch.testing.assert_close(out, want)


def test_norm_and_bias_masks() -> None:
    tv = torch.tensor([[1.0, 0.0, 0.5], [0.0, 2.0, 0.1]], dtype=torch.float64)
    s = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    stats = ExemplarStatistics(norm_squares={"n": s}, biases={"b"})
    # α = 0, norm scores g_k = Σ_{i≠k} t_i² S_k: k=0 ranks task 1's channel 1, k=1 task 0's channel 0
    torch.testing.assert_close(
        merged(tv, stats, "n", c=1, alpha=0.0), torch.tensor([0.0, 0.0, 0.6], dtype=torch.float64)
    )
    torch.testing.assert_close(
        merged(tv, stats, "b", c=1), torch.tensor([0.0, 0.0, 0.6], dtype=torch.float64)
    )
    # unhooked parameters are summed
    assert torch.equal(merged(tv, stats, "other", c=1), tv.sum(0))


def test_count_rule_and_missing_data() -> None:
    assert count(3, 10) == 3 and count(0.25, 10) == 2 and count(50, 10) == 10 and count(0, 10) == 0
    with pytest.raises(OptionError, match="whole count"):
        count(1.5, 10)
    base = {"w": torch.zeros(2, 2)}
    with pytest.raises(OptionError, match="uses data"):
        weightweaving.merge(base, [base, base], method="exemplar_projection")


def test_linear_in_lambda() -> None:
    tv = rand(2, 5, 4)
    stats = ExemplarStatistics(grams={"w": grams_of(rand(7, 4), rand(7, 4))})
    method = get_method("exemplar_projection")
    p = method.parse_params({"c": 2})
    form = method.compute(tv, p, UnitContext(name="w", extras={"exemplar_statistics": stats}))
    assert form.offset is None
    torch.testing.assert_close(form.at(0.3), 0.3 * form.at(1.0))


def test_a_convolution_takes_the_linear_rule_on_its_patches() -> None:
    conv = rand(3, 4, 2, 3, 3)  # (T, d_out, C, kh, kw)
    flat = conv.flatten(2)  # (T, d_out, C·kh·kw): how the hooks order a patch
    grams = grams_of(rand(20, 18), rand(20, 18), rand(20, 18))
    stats = ExemplarStatistics(grams={"conv": grams, "linear": grams})
    out = merged(conv, stats, "conv", c=2, alpha=0.5)
    assert out.shape == conv.shape[1:]
    torch.testing.assert_close(out.flatten(1), merged(flat, stats, "linear", c=2, alpha=0.5))
    # T_i B_k = 0 on the flattened weights for the last k projected (later ones may tilt earlier ones)
    bases = conflict_bases(flat, grams, alpha=0.5, c=2)
    projected = project_out(flat, bases)
    torch.testing.assert_close(projected.sum(0), out.flatten(1))
    torch.testing.assert_close(bases[2].T @ projected[0], torch.zeros(2, 18, dtype=torch.float64))
    # convolutions=False: the convolution is summed (Task Arithmetic), linear weights still projected
    assert torch.equal(merged(conv, stats, "conv", c=2, convolutions=False), conv.sum(0))
    assert not torch.allclose(merged(flat, stats, "linear", c=2, convolutions=False), flat.sum(0))
    assert torch.equal(merged(conv, stats, "conv", c=0), conv.sum(0))
