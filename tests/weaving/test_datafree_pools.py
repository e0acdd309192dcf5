"""The data-free pools (weaving/datafree_pools.py): known values, invariances, closed-form groups."""

from __future__ import annotations

import pytest
import torch

import weightweaving
from tests.helpers import toy_models
from weightweaving.errors import OptionError
from weightweaving.methods import LamForm, UnitContext
from weightweaving.methods.svc import calibrate
from weightweaving.weaving import make_pool
from weightweaving.weaving.datafree_pools import spectral_norm

POOLS = [
    "trimmed_mean",
    "median",
    "agreement",
    "fitted_lambda",
    "calibrated",
    "nearest_mean",
    "norm_filtered",
    "spectral_filtered",
    "spectral_blended",
]


def _pool(name, members, task_vectors=(), hyperparameters=None, ctx_name="w"):
    """Run a pool over task vectors (λ None) then plain members, as the weaver orders them."""
    pool = make_pool(name, hyperparameters)
    groups = [(LamForm(tv, None), (None,)) for tv in task_vectors]
    groups += [(LamForm(m, None), (1.0,)) for m in members]
    pool.begin(len(groups), (list(task_vectors) + list(members))[0], UnitContext(name=ctx_name))
    index = 0
    for form, lams in groups:
        pool.add(form, lams, index)
        index += len(lams)
    return pool.result()


def test_trimmed_mean_and_median_of_a_known_set():
    values = [1.0, 2.0, 3.0, 100.0, -50.0]
    members = [torch.tensor([v, -v]) for v in values]
    torch.testing.assert_close(_pool("trimmed_mean", members), torch.tensor([2.0, -2.0]))  # int(0.2·5) = 1
    torch.testing.assert_close(
        _pool("trimmed_mean", members, hyperparameters={"trim": 0.0}), torch.tensor([11.2, -11.2])
    )
    torch.testing.assert_close(_pool("median", members), torch.tensor([2.0, -2.0]))
    even = [torch.tensor([v]) for v in (3.0, 1.0, 2.0, 10.0)]
    torch.testing.assert_close(_pool("median", even), torch.tensor([2.5]))


@pytest.mark.parametrize("name", POOLS)
def test_equal_members_give_that_member(name):
    member = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
    got = _pool(name, [member] * 3, task_vectors=[member] * 2)
    torch.testing.assert_close(got, member)


@pytest.mark.parametrize("name", ["trimmed_mean", "median", "agreement"])
def test_permutation_invariance(name):
    gen = torch.Generator().manual_seed(0)
    members = [torch.randn(4, 3, generator=gen) for _ in range(7)]
    order = torch.randperm(7, generator=gen).tolist()
    torch.testing.assert_close(_pool(name, members), _pool(name, [members[i] for i in order]))


def test_agreement_drops_a_member_opposed_to_the_consensus():
    a = torch.tensor([1.0, 2.0, -1.0])
    torch.testing.assert_close(_pool("agreement", [a, a, -0.5 * a]), a)  # consensus 0.5a; cos = −1


def test_fitted_lambda_chooses_per_tensor():
    """Orthogonal task vectors keep Task Arithmetic at λ = 1; two identical ones get λ = 1/2."""
    base = {"orth": torch.zeros(2), "same": torch.zeros(2)}
    tuned = [
        {"orth": torch.tensor([1.0, 0.0]), "same": torch.tensor([1.0, 1.0])},
        {"orth": torch.tensor([0.0, 2.0]), "same": torch.tensor([1.0, 1.0])},
    ]
    woven = weightweaving.weave(base, tuned, "task_arithmetic", lambdas=[0.5, 1.0, 1.5], pool="fitted_lambda")
    torch.testing.assert_close(woven["orth"], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(woven["same"], torch.tensor([1.0, 1.0]))
    with pytest.raises(OptionError, match="needs the task vectors"):
        weightweaving.weave(
            base, tuned, "task_arithmetic", lambdas=[1.0], pool="fitted_lambda", pool_over="merged"
        )


def test_nearest_mean_is_task_arithmetic_at_one_over_t():
    """g = Σ Δ_t = T·Δ̄, so the nearest member of {λ·g} to Δ̄ is λ = 1/T whatever the overlap."""
    base = {"orth": torch.zeros(3), "same": torch.zeros(3)}
    tuned = [
        {"orth": torch.tensor([3.0, 0.0, 0.0]), "same": torch.tensor([1.0, 2.0, 0.0])},
        {"orth": torch.tensor([0.0, 3.0, 0.0]), "same": torch.tensor([1.0, 2.0, 0.0])},
        {"orth": torch.tensor([0.0, 0.0, 3.0]), "same": torch.tensor([1.0, 2.0, 0.0])},
    ]
    lams = [0.1 * i for i in range(1, 11)]
    woven = weightweaving.weave(base, tuned, "task_arithmetic", lambdas=lams, pool="nearest_mean")
    torch.testing.assert_close(woven["orth"], 0.3 * torch.tensor([3.0, 3.0, 3.0]))
    torch.testing.assert_close(woven["same"], 0.3 * torch.tensor([3.0, 6.0, 0.0]))
    with pytest.raises(OptionError, match="needs the task vectors"):
        weightweaving.weave(
            base, tuned, "task_arithmetic", lambdas=lams, pool="nearest_mean", pool_over="merged"
        )


@pytest.mark.parametrize("method", ["ties", "svc"])
def test_nearest_mean_is_the_merge_nearest_the_mean_task_vector(method):
    """Per tensor, against a brute force over the method's merges (a linear and a non-linear method)."""
    base, tuned = toy_models(4, seed=3)
    lams = [0.2 * i for i in range(1, 9)]
    woven = weightweaving.weave(base, tuned, method, lambdas=lams, pool="nearest_mean")
    merges = [weightweaving.merge(base, tuned, method=method, lam=lam, progress=False) for lam in lams]
    for key, value in base.items():
        if not value.is_floating_point():
            continue
        mean_tv = torch.stack([t[key] - value for t in tuned]).mean(0)
        members = [m[key] - value for m in merges]
        nearest = min(members, key=lambda m: float((m - mean_tv).norm()))
        torch.testing.assert_close(woven[key] - value, nearest, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "svc"])
def test_norm_filtered_pools_the_merges_no_larger_than_the_mean_task_vector(method):
    """Per tensor, against a brute force over the method's merges (a linear and a non-linear method)."""
    base, tuned = toy_models(4, seed=5)
    lams = [0.2 * i for i in range(1, 9)]
    woven = weightweaving.weave(base, tuned, method, lambdas=lams, pool="norm_filtered")
    merges = [weightweaving.merge(base, tuned, method=method, lam=lam, progress=False) for lam in lams]
    kept_some = dropped_some = False
    for key, value in base.items():
        if not value.is_floating_point():
            continue
        tvs = [t[key] - value for t in tuned]
        limit = float(torch.stack(tvs).mean(0).norm())
        kept = [m[key] - value for m in merges if float((m[key] - value).norm()) <= limit]
        kept_some |= bool(kept)
        dropped_some |= len(kept) < len(merges)
        torch.testing.assert_close(woven[key] - value, torch.stack(tvs + kept).mean(0), rtol=1e-5, atol=1e-6)
    assert kept_some and dropped_some


def test_spectral_filtered_keeps_task_arithmetic_up_to_one_over_t():
    """T equal task vectors: σ₁(λ·TΔ) ≤ σ₁(Δ) exactly when λ ≤ 1/T, so of λ = 0.1 ... 1.0 with T = 4 the
    pool keeps 0.1 and 0.2: (4Δ + 0.1·4Δ + 0.2·4Δ) / 6."""
    delta = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    base = {"w": torch.zeros(2, 2)}
    tuned = [{"w": delta.clone()} for _ in range(4)]
    lams = [round(0.1 * i, 1) for i in range(1, 11)]
    woven = weightweaving.weave(base, tuned, "task_arithmetic", lambdas=lams, pool="spectral_filtered")
    torch.testing.assert_close(woven["w"], (4 + 0.4 + 0.8) / 6 * delta)
    with pytest.raises(OptionError, match="needs the task vectors"):
        weightweaving.weave(
            base, tuned, "task_arithmetic", lambdas=lams, pool="spectral_filtered", pool_over="merged"
        )


def test_spectral_filtered_measures_the_largest_singular_value_not_the_size():
    """Task vectors e1·e1ᵀ and 2·e2·e2ᵀ (σ₁ 1 and 2): the identity·2 (σ₁ 2, Frobenius norm 2.83, above
    both task vectors') is kept, a rank-one member of σ₁ 2.2 (Frobenius norm 2.2) is not."""
    e1e1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    e2e2 = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    flat, spiky = 2 * torch.eye(2), 2.2 * e1e1
    got = _pool("spectral_filtered", [flat, spiky], task_vectors=[e1e1, e2e2])
    torch.testing.assert_close(got, (e1e1 + e2e2 + flat) / 3)
    assert spectral_norm(torch.ones(3)) == pytest.approx(3**0.5)  # a vector: its length
    assert spectral_norm(torch.ones(2, 1, 2, 2)) == pytest.approx(8**0.5)  # a conv kernel: (2, 4), rank one


@pytest.mark.parametrize("method", ["ties", "svc"])
def test_spectral_filtered_pools_the_merges_within_the_largest_task_vector(method):
    """Per tensor, against a brute force over the method's merges (a linear and a non-linear method)."""
    base, tuned = toy_models(4, seed=5)
    lams = [0.25 * i for i in range(1, 13)]
    woven = weightweaving.weave(base, tuned, method, lambdas=lams, pool="spectral_filtered")
    merges = [weightweaving.merge(base, tuned, method=method, lam=lam, progress=False) for lam in lams]
    kept_some = dropped_some = False
    for key, value in base.items():
        if not value.is_floating_point():
            continue
        tvs = [t[key] - value for t in tuned]
        limit = max(spectral_norm(tv) for tv in tvs)
        kept = [m[key] - value for m in merges if spectral_norm(m[key] - value) <= limit * (1 + 1e-6)]
        kept_some |= bool(kept)
        dropped_some |= len(kept) < len(merges)
        torch.testing.assert_close(woven[key] - value, torch.stack(tvs + kept).mean(0), rtol=1e-5, atol=1e-6)
    assert kept_some and dropped_some


def test_spectral_filtered_is_the_mean_pool_when_no_merge_overshoots():
    """Small λ only: every member is within the largest task vector, so the pool is the paper's mean."""
    base, tuned = toy_models(3, seed=2)
    lams = [0.01, 0.02, 0.05]
    got = weightweaving.weave(base, tuned, "ties", lambdas=lams, pool="spectral_filtered")
    mean = weightweaving.weave(base, tuned, "ties", lambdas=lams, pool="mean")
    for key in got:
        torch.testing.assert_close(got[key], mean[key])


def test_spectral_filtered_is_scale_free():
    """Scaling every task vector by c scales the result by c: the filter compares σ₁ with σ₁."""
    base, tuned = toy_models(3, seed=4)
    scaled = [
        {k: base[k] + 10 * (t[k] - base[k]) if base[k].is_floating_point() else t[k] for k in t}
        for t in tuned
    ]
    lams = [0.2 * i for i in range(1, 11)]
    one = weightweaving.weave(base, tuned, "task_arithmetic", lambdas=lams, pool="spectral_filtered")
    ten = weightweaving.weave(base, scaled, "task_arithmetic", lambdas=lams, pool="spectral_filtered")
    for key, value in base.items():
        if value.is_floating_point():
            torch.testing.assert_close(ten[key] - value, 10 * (one[key] - value), rtol=1e-4, atol=1e-5)


def test_spectral_blended_moves_a_quarter_toward_the_merge_of_average_strength():
    """T = 4 equal task vectors, Task Arithmetic: spectral_filtered keeps λ = 0.1, 0.2 (dropping the
    rest); the merge with σ₁ = σ₁(Δ̄) = σ₁(Δ) is λ = 0.25 (Δ itself), between the grid's points, or
    λ = 0.2 (0.8Δ; 0.3 gives 1.2Δ) among the members given one by one."""
    delta = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    base = {"w": torch.zeros(2, 2)}
    tuned = [{"w": delta.clone()} for _ in range(4)]
    lams = [round(0.1 * i, 1) for i in range(1, 11)]
    woven = weightweaving.weave(base, tuned, "task_arithmetic", lambdas=lams, pool="spectral_blended")
    torch.testing.assert_close(woven["w"], (0.75 * (4 + 0.4 + 0.8) / 6 + 0.25) * delta)
    apart = weightweaving.weave(
        base, tuned, "task_arithmetic", lambdas=lams, pool="spectral_blended", closed_form=False
    )
    torch.testing.assert_close(apart["w"], (0.75 * (4 + 0.4 + 0.8) / 6 + 0.25 * 0.8) * delta)
    plain = weightweaving.weave(
        base,
        tuned,
        "task_arithmetic",
        lambdas=lams,
        pool="spectral_blended",
        pool_hyperparameters={"blend": 0.0},
    )
    torch.testing.assert_close(plain["w"], (4 + 0.4 + 0.8) / 6 * delta)


@pytest.mark.parametrize("method", ["task_arithmetic", "svc"])
def test_spectral_blended_against_a_brute_force(method):
    """Per tensor: spectral_filtered's mean, blended a quarter toward the merge of σ₁ nearest σ₁(Δ̄)
    where a member was dropped, and spectral_filtered itself where none was (small λ)."""
    base, tuned = toy_models(4, seed=5)
    blended = untouched = 0
    for lams in ([0.25 * i for i in range(1, 13)], [0.01, 0.02, 0.05]):
        woven = weightweaving.weave(base, tuned, method, lambdas=lams, pool="spectral_blended")
        merges = [weightweaving.merge(base, tuned, method=method, lam=lam, progress=False) for lam in lams]
        for key, value in base.items():
            if not value.is_floating_point():
                continue
            tvs = [t[key] - value for t in tuned]
            limit = max(spectral_norm(tv) for tv in tvs)
            members = [m[key] - value for m in merges]
            sizes = [spectral_norm(a) for a in members]
            target = spectral_norm(torch.stack(tvs).mean(0))
            gaps = sorted(abs(size - target) for size in sizes)
            if any(abs(size - limit) <= 1e-4 * limit for size in sizes) or (
                method != "task_arithmetic" and len(gaps) > 1 and gaps[1] - gaps[0] <= 1e-4 * target
            ):
                continue  # a decision within rounding of its boundary (the sweep and merge round apart)
            kept = [a for a in members if spectral_norm(a) <= limit * (1 + 1e-6)]
            want = torch.stack(tvs + kept).mean(0)
            if len(kept) < len(members):
                if method == "task_arithmetic":  # linear: λ·g with σ₁ = σ₁(Δ̄), within the λ range
                    g = members[0] / lams[0]
                    lam = min(max(target / spectral_norm(g), min(lams)), max(lams))
                    anchor = lam * g
                else:  # non-linear: the member nearest
                    anchor = members[min(range(len(lams)), key=lambda i: (abs(sizes[i] - target), lams[i]))]
                want = 0.75 * want + 0.25 * anchor
                blended += 1
            else:
                untouched += 1
            torch.testing.assert_close(woven[key] - value, want, rtol=1e-5, atol=1e-6)
    assert blended and untouched


def test_calibrated_is_svc_of_the_inner_pool():
    base, tuned = toy_models(3)
    lams = [0.5, 1.0]
    mean = weightweaving.weave(base, tuned, "task_arithmetic", lambdas=lams)
    got = weightweaving.weave(base, tuned, "task_arithmetic", lambdas=lams, pool="calibrated")
    for key, value in base.items():
        if not value.is_floating_point():
            assert torch.equal(got[key], value)
        elif value.ndim == 2:
            tv = torch.stack([t[key] - value for t in tuned])
            torch.testing.assert_close(
                got[key] - value, calibrate(mean[key] - value, tv, 1 / 3), rtol=1e-4, atol=1e-6
            )
        else:
            torch.testing.assert_close(got[key], mean[key])


@pytest.mark.parametrize("name", [n for n in POOLS if n != "spectral_blended"])  # reaches between λs
def test_closed_form_groups_equal_members_one_by_one(name):
    """A linear method contributes one held tensor for all its λ points, with the same result."""
    base, tuned = toy_models(3)
    lams = [0.1 * i for i in range(1, 16)]
    fast = weightweaving.weave(base, tuned, "ties", lambdas=lams, pool=name)
    slow = weightweaving.weave(base, tuned, "ties", lambdas=lams, pool=name, closed_form=False)
    for key in fast:
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-5, atol=1e-6)


def test_memory_holds_one_tensor_per_group():
    pool = make_pool("median")
    like = torch.zeros(3)
    pool.begin(2 + 50, like, UnitContext(name="w"))
    pool.add(LamForm(torch.ones(3), None), (None,), 0)
    pool.add(LamForm(-torch.ones(3), None), (None,), 1)
    pool.add(LamForm(None, torch.tensor([1.0, 2.0, 3.0])), tuple(0.1 * i for i in range(50)), 2)
    assert len(pool.groups) == 3  # type: ignore[attr-defined]
    members = torch.stack(
        [torch.ones(3), -torch.ones(3)] + [0.1 * i * torch.tensor([1.0, 2.0, 3.0]) for i in range(50)]
    )
    torch.testing.assert_close(pool.result(), members.sort(0).values[25:27].mean(0))


def test_bad_pool_hyperparameters():
    with pytest.raises(OptionError, match="pool 'trimmed_mean' has no hyperparameter 'cut'"):
        make_pool("trimmed_mean", {"cut": 0.1})
    with pytest.raises(OptionError, match="pool 'trimmed_mean': hyperparameter 'trim'"):
        make_pool("trimmed_mean", {"trim": 0.5})
    with pytest.raises(OptionError, match="takes no hyperparameters"):
        make_pool("median", {"trim": 0.1})
    with pytest.raises(OptionError, match="unknown pool"):
        make_pool("calibrated", {"pool": "nope"})


@pytest.mark.parametrize("shape", [(7, 3), (3, 7), (5, 5), (4, 2, 3, 3), (6,), (0, 4)])
def test_spectral_norm_is_the_largest_singular_value(shape: tuple[int, ...]) -> None:
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape) + shape[0]))
    if tensor.ndim <= 1:
        expected = float(tensor.double().norm())
    elif tensor.numel() == 0:
        expected = 0.0
    else:
        matrix = tensor.double().reshape(shape[0], -1)
        expected = float(torch.linalg.svdvals(matrix)[0])
    assert spectral_norm(tensor) == pytest.approx(expected, rel=1e-12, abs=1e-300)
    assert spectral_norm(torch.zeros(shape)) == 0.0
