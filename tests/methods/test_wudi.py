"""WUDI merging (methods/wudi.py): the Adam loop, the selection rule and the oracles' wrong variants."""

from __future__ import annotations

import math

import pytest
import torch

import weightweaving
from tests.oracles import assert_matches, case_paths, load_case
from weightweaving.errors import OptionError
from weightweaving.methods.wudi import adam_minimise, interference_grams, wudi_merge

CASES = case_paths("wudi")


def _with_optimised(case, replace):
    """The oracle case's inputs merged by ``replace(task_vectors) -> M`` on its optimised weights."""
    out = {}
    for name, pre in case.pretrained.items():
        if name in case.meta["optimised"]:
            tv = torch.stack([task[name].double() - pre.double() for task in case.tasks])
            out[name] = pre.double() + replace(tv)
        else:
            out[name] = pre.double()
    return out


def test_adam_matches_torch_optim_adam():
    """The hand-written loop equals torch.optim.Adam step for step (float64, a quadratic loss)."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    start = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    ours = adam_minimise(start, lambda x: 2 * (x - target) ** 3, steps=50, lr=0.01)
    param = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([param], lr=0.01, foreach=False)
    for _ in range(50):
        optimiser.zero_grad()
        ((param - target) ** 4).sum().mul(0.5).backward()
        optimiser.step()
    torch.testing.assert_close(ours, param.detach(), rtol=0, atol=1e-15)


def test_fast_gradient_equals_the_loss_gradient():
    gen = torch.Generator().manual_seed(1)
    tv = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)
    merged = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = sum(((merged - t) @ t.T).square().sum() / t.square().sum() for t in tv)
    loss.backward()
    gram_sum, cross_sum = interference_grams(tv)
    torch.testing.assert_close(2 * (merged.detach() @ gram_sum - cross_sum), merged.grad)


def test_zero_task_vectors_are_left_out_of_the_loss():
    gen = torch.Generator().manual_seed(2)
    tv = torch.randn(2, 4, 3, generator=gen)
    with_zero = torch.cat([tv, torch.zeros(1, 4, 3)])
    torch.testing.assert_close(wudi_merge(with_zero, 20, 1e-3), wudi_merge(tv, 20, 1e-3))
    assert torch.equal(wudi_merge(torch.zeros(3, 4, 3), 20, 1e-3), torch.zeros(4, 3))


def test_selection_rule_and_regex_override():
    base = {
        "blocks.0.attn.in_proj_weight": torch.zeros(4, 3),
        "blocks.0.attn.in_proj_bias": torch.zeros(4),
        "proj": torch.zeros(4, 3),
    }
    tasks = [{k: v + i + 1 for k, v in base.items()} for i in range(2)]
    merged = weightweaving.merge(base, tasks, method="wudi", iterations=5)
    assert bool(merged["blocks.0.attn.in_proj_weight"].ne(0).all())
    assert torch.equal(merged["blocks.0.attn.in_proj_bias"], base["blocks.0.attn.in_proj_bias"])
    assert torch.equal(merged["proj"], base["proj"])
    only_proj = weightweaving.merge(base, tasks, method="wudi", iterations=5, optimise_include="^proj$")
    assert torch.equal(only_proj["blocks.0.attn.in_proj_weight"], base["blocks.0.attn.in_proj_weight"])
    assert bool(only_proj["proj"].ne(0).all())


def _from_mean(tv, steps, lr):
    gram_sum, cross_sum = interference_grams(tv)
    return adam_minimise(tv.mean(0), lambda m: 2 * (m @ gram_sum - cross_sum), steps, lr)


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_wrong_variants_named_by_the_oracles_fail(path):
    """The negative controls of the case: each must be rejected by the case's tolerance."""
    case = load_case(path)
    lam, lr, steps = case.meta["lam"], case.hyperparameters["lr"], case.hyperparameters["iterations"]
    wrong = {
        "λ applied before optimising": lambda tv: wudi_merge(lam * tv, steps, lr).double(),
        "half the iterations": lambda tv: lam * wudi_merge(tv, steps // 2, lr).double(),
        "initialised at the mean": lambda tv: lam * _from_mean(tv, steps, lr),
        "no optimisation": lambda tv: lam * tv.sum(0),
    }
    if math.isclose(lam, 1.0):
        del wrong["λ applied before optimising"]  # the same thing at λ = 1
    for label, replace in wrong.items():
        with pytest.raises(AssertionError):
            assert_matches(case, _with_optimised(case, replace))
        assert label
    # and the right one, built the same way, passes
    assert_matches(case, _with_optimised(case, lambda tv: lam * wudi_merge(tv, steps, lr).double()))


def test_float32_precision_is_the_float64_result_within_a_fraction_of_lr() -> None:
    """``precision='float32'`` (the reference's own, on CUDA) stays within a few percent of lr per
    entry of the float64 trajectory, and is a float32 optimisation (not float64 rounded)."""
    gen = torch.Generator().manual_seed(11)
    name = "blocks.0.attn.w"
    pre = {name: torch.randn(12, 9, generator=gen)}
    tuned = [{name: pre[name] + 0.05 * torch.randn(12, 9, generator=gen)} for _ in range(4)]
    lr = 1e-3
    tight = weightweaving.merge(pre, tuned, "wudi", iterations=60, lr=lr, progress=False)[name]
    fast = weightweaving.merge(pre, tuned, "wudi", iterations=60, lr=lr, precision="float32", progress=False)[
        name
    ]
    assert (tight - fast).abs().max() < 0.05 * lr
    tv = torch.stack([t[name] - pre[name] for t in tuned])
    in32 = wudi_merge(tv, 60, lr, torch.float32)
    assert in32.dtype == torch.float32 and not torch.equal(in32, wudi_merge(tv, 60, lr))
    torch.testing.assert_close(fast - pre[name], in32, rtol=0, atol=1e-6)
    with pytest.raises(OptionError, match="precision"):
        weightweaving.merge(pre, tuned, "wudi", precision="float16", progress=False)
