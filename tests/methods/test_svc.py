"""SVC (methods/svc.py): calibration steps, composition with any base, λ before calibration, weaving."""

from __future__ import annotations

import logging

import pytest
import torch

import weightweaving
from tests.oracles import assert_matches, case_paths, load_case
from weightweaving.errors import OptionError
from weightweaving.methods import LamKind, UnitContext, get_method
from weightweaving.methods.svc import _warn_platform_dependent, calibrate, calibrate_sweep


def _model(num_tasks=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = {
        "blocks.0.attn.out_proj.weight": torch.randn(6, 5, generator=gen),
        "blocks.0.attn.out_proj.bias": torch.randn(6, generator=gen),
        "positional_embedding": torch.randn(4, 5, generator=gen),
    }
    common = {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    tasks = [
        {k: v + common[k] + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        for _ in range(num_tasks)
    ]
    return base, tasks


def test_calibrate_by_the_definition():
    """η_r = mean_t max(⟨σ_r v_r, u_rᵀΔ_t⟩ / ‖u_rᵀΔ_t‖², alpha), written out component by component."""
    gen = torch.Generator().manual_seed(3)
    tv = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    merged = tv.sum(0)
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    want = torch.zeros_like(merged)
    for r in range(len(s)):
        row = s[r] * vh[r]
        eta = sum(max(float(row @ (u[:, r] @ t)) / float((u[:, r] @ t).square().sum()), 0.3) for t in tv) / 3
        want += (s[r] / eta) * torch.outer(u[:, r], vh[r])
    torch.testing.assert_close(calibrate(merged, tv, 0.3), want)


def test_shared_direction_counted_by_every_task_is_divided_by_their_number():
    """T identical task vectors summed count their one direction T times: SVC gives the average back."""
    tv = torch.outer(torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 1.0]))[None].repeat(4, 1, 1)
    torch.testing.assert_close(calibrate(tv.sum(0), tv, 0.25), tv[0])


def test_flat_base_hyperparameters_equal_the_explicit_dict():
    base, tasks = _model()
    flat = weightweaving.merge(base, tasks, method="svc", base="ties", k=0.3, scope="tensor")
    nested = weightweaving.merge(
        base, tasks, method="svc", base="ties", base_hyperparameters={"k": 0.3, "scope": "tensor"}
    )
    for key in base:
        assert torch.equal(flat[key], nested[key])


def test_unknown_or_bad_base_is_refused():
    with pytest.raises(OptionError, match="no hyperparameter 'density'"):
        get_method("svc").parse_params({"base": "ties", "density": 0.2})
    with pytest.raises(OptionError, match="unknown method 'nope'"):
        get_method("svc").parse_params({"base": "nope"})
    with pytest.raises(OptionError, match="own base"):
        get_method("svc").parse_params({"base": "svc"})


def test_global_base_gets_its_first_passes():
    """Over TIES at its default global scope, SVC calibrates exactly the global TIES merge."""
    base, tasks = _model(num_tasks=3)
    ties = weightweaving.merge(base, tasks, method="ties", lam=0.7, k=0.3)
    svc = weightweaving.merge(base, tasks, method="svc", lam=0.7, base="ties", k=0.3)
    name = "blocks.0.attn.out_proj.weight"
    tv = torch.stack([t[name] - base[name] for t in tasks])
    torch.testing.assert_close(svc[name] - base[name], calibrate(ties[name] - base[name], tv, 1 / 3))
    for kept in ("blocks.0.attn.out_proj.bias", "positional_embedding"):  # 1-D and embeddings: base output
        assert torch.equal(svc[kept], ties[kept])


def test_lambda_enters_before_calibration():
    """Not linear: λ scales the base merge, then the floor applies (the oracle's negative control)."""
    assert get_method("svc").lam_kind is LamKind.NONLINEAR
    case = load_case(case_paths("svc")[0])  # Task Arithmetic at λ = 0.3
    lam = case.meta["lam"]
    hp = case.hyperparameters
    at_one = weightweaving.merge(case.pretrained, case.tasks, method="svc", lam=1.0, **hp)
    scaled_after = {k: case.pretrained[k] + lam * (v - case.pretrained[k]) for k, v in at_one.items()}
    with pytest.raises(AssertionError):
        assert_matches(case, scaled_after)
    base_only = weightweaving.merge(case.pretrained, case.tasks, method="task_arithmetic", lam=lam)
    with pytest.raises(AssertionError):
        assert_matches(case, base_only)


def test_default_alpha_is_one_over_t_and_one_over_tsv():
    base, tasks = _model(num_tasks=4)
    for base_method, alpha in (("task_arithmetic", 0.25), ("tsv", 1.0)):
        default = weightweaving.merge(base, tasks, method="svc", base=base_method)
        explicit = weightweaving.merge(base, tasks, method="svc", base=base_method, alpha=alpha)
        other = weightweaving.merge(base, tasks, method="svc", base=base_method, alpha=0.5)
        name = "blocks.0.attn.out_proj.weight"
        assert torch.equal(default[name], explicit[name])
        assert not torch.equal(default[name], other[name])


def test_flat_spectrum_bases_warn_once(caplog):
    _warn_platform_dependent.cache_clear()
    base, tasks = _model()
    with caplog.at_level(logging.WARNING, logger="weightweaving"):
        weightweaving.merge(base, tasks, method="svc", base="iso_c")
        weightweaving.merge(base, tasks, method="svc", base="iso_c")
    warnings = [r for r in caplog.records if "platform" in r.getMessage()]
    assert len(warnings) == 1 and "iso_c" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="weightweaving"):
        weightweaving.merge(base, tasks, method="svc", base="tsv")
    assert not [r for r in caplog.records if "platform" in r.getMessage()]


def test_weaving_evaluates_svc_once_per_lambda():
    """Weaving a non-linear method pools one merge per λ (with the task vectors), as Algorithm 1."""
    base, tasks = _model()
    lambdas = [0.2, 0.6, 1.0]
    woven = weightweaving.weave(base, tasks, "svc", lambdas=lambdas, pool="mean", base="tsv")
    merges = [weightweaving.merge(base, tasks, method="svc", lam=lam, base="tsv") for lam in lambdas]
    for key in base:
        members = [t[key] - base[key] for t in tasks] + [m[key] - base[key] for m in merges]
        torch.testing.assert_close(woven[key], base[key] + torch.stack(members).mean(0))


def test_lambda_sweep_merges_svc_at_every_lambda():
    from weightweaving.analysis.sweep import lam_sweep

    base, tasks = _model()
    for lam, merged in lam_sweep(base, tasks, "svc", [0.5, 1.0], progress=False):
        want = weightweaving.merge(base, tasks, method="svc", lam=lam)
        for key in base:
            assert torch.equal(merged[key], want[key])


# -- a whole λ sweep from one base merge and one SVD (merge_unit_sweep, merge_sweep) ----------------

SWEEP_LAMS = [0.0, 0.1, 0.35, 1.0, 1.7]


@pytest.mark.parametrize("shape", [(6, 5), (5, 9), (12, 12), (1, 7)])
@pytest.mark.parametrize("num_tasks", [1, 2, 5])
@pytest.mark.parametrize(
    "hyperparameters",
    [{}, {"alpha": 0.05}, {"alpha": 2.0}, {"base": "tsv"}, {"base": "cart"}, {"base": "dare", "p": 0.3}],
)
def test_merge_unit_sweep_equals_the_merge_at_each_lambda(shape, num_tasks, hyperparameters):
    """One SVD serves every λ over a linear base (SVD(λM) = λ·SVD(M)); an affine base (CART) is
    calibrated per λ from one base merge. Both equal compute_at at each λ up to float rounding."""
    gen = torch.Generator().manual_seed(num_tasks * 100 + shape[0])
    common = torch.randn(shape, generator=gen, dtype=torch.float64)
    tv = common + 0.5 * torch.randn(num_tasks, *shape, generator=gen, dtype=torch.float64)
    method = get_method("svc")
    p = method.parse_params(hyperparameters)
    ctx = UnitContext(name="blocks.0.mlp.fc1.weight", seed=4, shape=shape)
    got = list(method.merge_unit_sweep(tv, p, SWEEP_LAMS, ctx))
    assert len(got) == len(SWEEP_LAMS)
    for lam, merged in zip(SWEEP_LAMS, got, strict=True):
        want = method.compute_at(tv, p, lam, ctx)
        torch.testing.assert_close(merged, want, rtol=1e-9, atol=1e-11)


def test_merge_unit_sweep_keeps_the_base_output_where_svc_does_not_calibrate():
    gen = torch.Generator().manual_seed(1)
    method = get_method("svc")
    p = method.parse_params({"base": "tsv"})
    for name, shape in [("blocks.0.attn.out_proj.bias", (6,)), ("positional_embedding", (4, 5))]:
        tv = torch.randn(3, *shape, generator=gen)
        ctx = UnitContext(name=name, shape=shape)
        for lam, merged in zip(SWEEP_LAMS, method.merge_unit_sweep(tv, p, SWEEP_LAMS, ctx), strict=True):
            assert torch.equal(merged, method.compute_at(tv, p, lam, ctx))


def test_calibrate_is_the_sweep_at_lambda_one():
    """calibrate (the oracles' function) is calibrate_sweep at λ = 1, byte for byte."""
    gen = torch.Generator().manual_seed(2)
    tv = torch.randn(4, 7, 5, generator=gen)
    merged = tv.sum(0)
    (at_one,) = calibrate_sweep(merged, tv, 0.25, [1.0])
    assert torch.equal(calibrate(merged, tv, 0.25), at_one)


@pytest.mark.parametrize(
    "hyperparameters", [{}, {"base": "tsv"}, {"base": "ties", "k": 0.5}, {"base": "cart"}]
)
def test_merge_sweep_equals_merge_at_each_lambda(hyperparameters):
    """The public sweep (a global base included: TIES's first passes run once) equals merge per λ."""
    base, tasks = _model(num_tasks=4)
    sweep = weightweaving.merge_sweep(base, tasks, "svc", SWEEP_LAMS, progress=False, **hyperparameters)
    assert list(sweep) == SWEEP_LAMS
    for lam in SWEEP_LAMS:
        want = weightweaving.merge(base, tasks, method="svc", lam=lam, progress=False, **hyperparameters)
        assert list(sweep[lam]) == list(want)
        for key in want:
            assert sweep[lam][key].dtype == want[key].dtype
            torch.testing.assert_close(sweep[lam][key], want[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool", ["mean", "magmax", "random", "median"])
@pytest.mark.parametrize("base_method", ["task_arithmetic", "tsv", "ties"])
def test_weave_shares_the_sweep_and_equals_the_per_point_weave(pool, base_method):
    """weave's NONLINEAR path (one base merge and SVD per matrix) equals closed_form=False (SVC
    evaluated afresh at every point)."""
    base, tasks = _model(num_tasks=3, seed=5)
    kwargs = {"lambdas": [0.1, 0.4, 0.7, 1.0], "pool": pool, "base": base_method, "progress": False}
    shared = weightweaving.weave(base, tasks, "svc", **kwargs)
    afresh = weightweaving.weave(base, tasks, "svc", closed_form=False, **kwargs)
    for key in base:
        torch.testing.assert_close(shared[key], afresh[key], rtol=1e-5, atol=1e-6)


def test_merge_sweep_refuses_bad_lambdas():
    base, tasks = _model()
    with pytest.raises(OptionError, match="non-empty list"):
        weightweaving.merge_sweep(base, tasks, "svc", [])
    with pytest.raises(OptionError, match="out of range"):
        weightweaving.merge_sweep(base, tasks, "svc", [0.5, -1.0])
    with pytest.raises(OptionError, match="finite"):
        weightweaving.merge_sweep(base, tasks, "svc", [float("nan")])
