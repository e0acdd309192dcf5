"""DARE: the statistical checks of the oracle cases, the seeding rule and the base-method delegation."""

from __future__ import annotations

import math

import pytest
import torch

import weightweaving
from tests.oracles import OracleCase, case_paths, load_case
from weightweaving.errors import OptionError
from weightweaving.methods import UnitContext, get_method
from weightweaving.methods.dare import drop_and_rescale

CASES = case_paths("dare")
IDS = [p.stem for p in CASES]


def setup(case: OracleCase) -> tuple[float, bool, int, float]:
    hp = case.hyperparameters
    return hp["p"], hp["rescale"], hp.get("seed", 0), case.meta["lam"]


def task_vectors(case: OracleCase, name: str) -> torch.Tensor:
    """(T, *shape) float32, as the library forms them."""
    return torch.stack([task[name] - case.pretrained[name] for task in case.tasks])


def merged_delta(case: OracleCase, got: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: got[n].double() - case.pretrained[n].double() for n in case.pretrained}


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_entries_are_zero_or_rescaled_and_api_uses_those_masks(path):
    """For one seed each masked entry is exactly 0 or exactly Δ/(1 − p), and ``merge`` sums exactly those."""
    case = load_case(path)
    p, rescale, seed, lam = setup(case)
    got = weightweaving.merge(
        case.pretrained, case.tasks, method="dare", lam=lam, seed=seed, p=p, rescale=rescale
    )
    for name in case.pretrained:
        tv = task_vectors(case, name)
        masked = drop_and_rescale(tv, p, rescale, UnitContext(name=name, seed=seed))
        assert bool(((masked == 0) | (masked == tv / (1 - p))).all()), name
        assert torch.equal(got[name], case.pretrained[name] + masked.sum(0) * lam), name


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_drop_fraction(path):
    """The dropped share over all entries of all task vectors is within p ± 4·sqrt(p(1 − p)/N)."""
    case = load_case(path)
    p, rescale, seed, _ = setup(case)
    dropped = total = 0
    for name in case.pretrained:
        tv = task_vectors(case, name)
        masked = drop_and_rescale(tv, p, rescale, UnitContext(name=name, seed=seed))
        nonzero = tv != 0  # a zero entry cannot show whether it was dropped
        dropped += int((nonzero & (masked == 0)).sum())
        total += int(nonzero.sum())
    assert total > 1000
    assert abs(dropped / total - p) <= 4 * math.sqrt(p * (1 - p) / total)


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_mean_over_seeds_is_task_arithmetic(path):
    """Over 200 seeds the mean merged task vector is within 5 standard errors of ``expected − pretrained``."""
    case = load_case(path)
    p, rescale, _, lam = setup(case)
    seeds = 200
    total = {n: torch.zeros(t.shape, dtype=torch.float64) for n, t in case.pretrained.items()}
    for seed in range(seeds):
        got = weightweaving.merge(
            case.pretrained, case.tasks, method="dare", lam=lam, seed=seed, p=p, rescale=rescale
        )
        for name, delta in merged_delta(case, got).items():
            total[name] += delta
    want = merged_delta(case, case.expected)
    for name in case.pretrained:
        tv = task_vectors(case, name).double()
        # each entry of λ·Δ·B/(1 − p), B ~ Bernoulli(1 − p), has variance λ²Δ² p/(1 − p)
        std = lam * (tv**2 * p / (1 - p)).sum(0).sqrt()
        error = (total[name] / seeds - want[name]).abs()
        bound = 5 * std / math.sqrt(seeds) + case.meta["tolerance"]["atol"][name]
        assert bool((error <= bound).all()), (
            f"{name}: max error {float((error - bound).max()):.3e} over the bound"
        )


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_same_seed_same_output_and_linear_in_lambda(path):
    case = load_case(path)
    p, rescale, seed, _ = setup(case)
    zero = {n: torch.zeros_like(t) for n, t in case.pretrained.items()}  # θ = 0 + M: the output is M itself
    tasks = [{n: task[n] - case.pretrained[n] for n in zero} for task in case.tasks]

    def run(lam: float, seed: int = seed) -> dict[str, torch.Tensor]:
        return weightweaving.merge(zero, tasks, method="dare", lam=lam, seed=seed, p=p, rescale=rescale)

    once, again, other = run(1.0), run(1.0), run(1.0, seed=seed + 1)
    assert all(torch.equal(once[n], again[n]) for n in zero)
    assert any(not torch.equal(once[n], other[n]) for n in zero)
    for lam in (0.3, 0.5, 1.7):
        scaled = run(lam)
        assert all(torch.equal(scaled[n], once[n] * lam) for n in zero), lam


def test_extremes_of_p():
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(50, 4)}
    tasks = [{"w": torch.randn(50, 4, generator=gen)} for _ in range(3)]
    keep_all = weightweaving.merge(base, tasks, method="dare", lam=1.0, p=0.0)
    assert torch.equal(
        keep_all["w"], weightweaving.merge(base, tasks, method="task_arithmetic", lam=1.0)["w"]
    )
    assert not weightweaving.merge(base, tasks, method="dare", lam=1.0, p=1.0)["w"].any()
    plain = weightweaving.merge(base, tasks, method="dare", lam=1.0, p=0.5, rescale=False)["w"]
    scaled = weightweaving.merge(base, tasks, method="dare", lam=1.0, p=0.5)["w"]
    assert torch.equal(plain * 2, scaled)


def test_global_base_sees_the_masked_task_vectors():
    """With ``base="ties"`` (global scope) DARE equals TIES run on the masked fine-tuned models."""
    gen = torch.Generator().manual_seed(1)
    shapes = {"b.weight": (9, 7), "a.bias": (7,)}
    zero = {n: torch.zeros(s) for n, s in shapes.items()}
    tasks = [{n: torch.randn(s, generator=gen) for n, s in shapes.items()} for _ in range(3)]
    got = weightweaving.merge(
        zero, tasks, method="dare", lam=1.0, seed=5, p=0.3, base="ties", base_hyperparameters={"k": 0.4}
    )
    masked = {
        n: drop_and_rescale(torch.stack([t[n] for t in tasks]), 0.3, True, UnitContext(n, seed=5))
        for n in shapes
    }
    masked_tasks = [{n: masked[n][i] for n in shapes} for i in range(3)]
    want = weightweaving.merge(zero, masked_tasks, method="ties", lam=1.0, k=0.4)
    assert all(torch.equal(got[n], want[n]) for n in shapes)
    method = get_method("dare")
    assert method.scope_of(method.parse_params({"base": "ties"})).value == "global"
    assert method.scope_of(method.parse_params({})).value == "per-parameter"


@pytest.mark.parametrize(
    "values, name",
    [
        ({"p": 1.5}, "p"),
        ({"p": -0.1}, "p"),
        ({"base": "nonexistent"}, "base"),
        ({"base": "weight_averaging"}, "base"),
        ({"base": "dare"}, "base"),
        ({"base": "ties", "base_hyperparameters": {"k": 0}}, "base_hyperparameters"),
        ({"drop_rate": 0.5}, "drop_rate"),
    ],
)
def test_bad_hyperparameter_is_refused(values, name):
    with pytest.raises(OptionError, match=f"'{name}'"):
        weightweaving.merge({"w": torch.zeros(2)}, [{"w": torch.ones(2)}], method="dare", **values)


def test_metadata():
    method = get_method("dare")
    assert method.stochastic and not method.order_invariant and not method.single_model_identity


def test_the_draws_in_threads_are_the_draws_in_order():
    """Each task's draws come from its own stream: drawn in parallel threads (a unit large enough,
    PyTorch allowed two threads) they are the numbers drawn one task after another."""
    from weightweaving.methods import dare
    from weightweaving.methods.base import UnitContext

    gen = torch.Generator().manual_seed(3)
    task_vectors = torch.randn(5, 300, 250, generator=gen)
    ctx = UnitContext(name="w", seed=11, shape=(300, 250))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dare.drop_and_rescale(task_vectors, 0.4, True, ctx)
        torch.set_num_threads(2)
        two = dare.drop_and_rescale(task_vectors, 0.4, True, ctx)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.view(torch.int32), two.view(torch.int32))
    for t in range(5):  # and each task's mask is its own generator's draws
        drawn = torch.rand((300, 250), generator=ctx.generator("dare", t))
        assert torch.equal(one[t] == 0, (drawn < 0.4) | (task_vectors[t] == 0))


def test_checked_task_vectors_skip_the_finiteness_sum_with_the_same_result(monkeypatch):
    """The engine tells DARE its task vectors were checked (``ctx.finite``), so DARE does not sum each
    task's vector to choose how to drop; the merge is the same bytes as with that sum, also where the
    sum of finite values overflows (that path keeps a −0 that the other makes +0)."""
    from weightweaving.methods import dare

    seen: list[bool] = []
    original = dare.drop_and_rescale

    def spy(tv: torch.Tensor, p: float, rescale: bool, ctx: UnitContext) -> torch.Tensor:
        seen.append(ctx.finite)
        return original(tv, p, rescale, ctx)

    monkeypatch.setattr(dare, "drop_and_rescale", spy)
    gen = torch.Generator().manual_seed(2)
    base = {"w": torch.zeros(6, 40), "v": torch.randn(30, generator=gen)}
    huge = torch.full((6, 40), 1e38)  # finite after the rescale; a row sums past float32
    huge[0, :5] = -0.0
    tasks = [{"w": huge, "v": torch.randn(30, generator=gen)}, {"w": -huge, "v": -base["v"]}]
    got = weightweaving.merge(base, tasks, method="dare", lam=0.5, seed=4, p=0.3)
    assert seen and all(seen)
    for name in base:
        tv = torch.stack([t[name] - base[name] for t in tasks])
        unchecked = original(tv, 0.3, True, UnitContext(name=name, seed=4, shape=tuple(base[name].shape)))
        want = base[name] + unchecked.sum(0) * 0.5
        assert torch.equal(got[name].view(torch.int32), want.view(torch.int32)), name
    seen.clear()
    weightweaving.merge(base, tasks, method="dare", lam=0.5, seed=4, p=0.3, allow_nonfinite=True)
    assert seen and not any(seen)
