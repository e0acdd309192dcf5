"""PCB-Merging: the reference oracles, the streamed global statistics, the variants and guards."""

from __future__ import annotations

import pytest
import torch

import weightweaving
from tests.oracles import assert_matches, case_paths, load_case
from weightweaving.errors import OptionError
from weightweaving.methods import UnitContext, get_method
from weightweaving.methods.pcb import PcbParams


@pytest.mark.parametrize("path", case_paths("pcb"), ids=lambda p: p.stem)
def test_oracle_in_float64(path, compute_dtype="float64"):
    """Also in float64 compute (float32 runs in tests/methods/test_oracles_registry.py)."""
    case = load_case(path)
    hp = case.hyperparameters
    seed = hp.pop("seed", 0)
    got = weightweaving.merge(
        case.pretrained,
        case.tasks,
        method="pcb",
        lam=case.meta["lam"],
        seed=seed,
        compute_dtype=compute_dtype,
        **hp,
    )
    assert_matches(case, got)


@pytest.mark.parametrize("path", case_paths("pcb"), ids=lambda p: p.stem)
def test_oracle_is_global(path):
    case = load_case(path)
    hp = {**case.hyperparameters, "scope": "tensor"}
    got = weightweaving.merge(case.pretrained, case.tasks, method="pcb", lam=case.meta["lam"], **hp)
    with pytest.raises(AssertionError):
        assert_matches(case, got)


def reference_pcb(flat: torch.Tensor, ratio: float) -> torch.Tensor:
    """duguodong7/pcb-merging ``PCB_merge`` as ALGORITHMS.md states it, on one flattened (T, n) matrix."""
    n_tasks, n = flat.shape
    ordered = flat.abs().sort(dim=1).values
    low, high = ordered[:, int(n * 0.0001)][:, None], ordered[:, int(n * (1 - 0.0001) - 1)][:, None]
    magnitudes = flat.abs().clamp(low, high)
    clamped = flat.sign() * magnitudes

    def normalize(x):
        return (x - x.min(1, keepdim=True).values) / (
            x.max(1, keepdim=True).values - x.min(1, keepdim=True).values
        )

    score = torch.exp(n_tasks * normalize(magnitudes) ** 2) * torch.tanh(flat * flat.sum(0))
    floor = score.sort(dim=1).values[:, int(n * (1 - ratio))][:, None]
    weights = normalize(score.clamp(min=floor))
    return (weights * clamped).sum(0) / weights.sum(0).clamp(min=1e-12)


SHAPES = {"b.weight": (40, 30), "a.bias": (30,), "c.scale": (), "d.conv": (8, 3, 4, 4)}


def random_model(seed: int, num_tasks: int):
    gen = torch.Generator().manual_seed(seed)
    base = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in SHAPES.items()}
    models = [
        {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in SHAPES.items()}
        for _ in range(num_tasks)
    ]
    return base, models


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.5, 1.0])
def test_global_equals_one_flattened_tensor(ratio):
    """The streamed global statistics give the reference computed on the concatenation."""
    base, models = random_model(0, num_tasks=3)
    got = weightweaving.merge(base, models, method="pcb", lam=1.0, ratio=ratio, compute_dtype="float64")
    names = sorted(SHAPES)
    flat = torch.stack([torch.cat([m[n].reshape(-1) for n in names]) for m in models])  # (T, n)
    merged = torch.cat([got[n].reshape(-1) for n in names])
    torch.testing.assert_close(merged, reference_pcb(flat, ratio), rtol=1e-12, atol=1e-14)
    method = get_method("pcb")
    single = method.compute(
        flat, method.parse_params({"ratio": ratio, "scope": "tensor"}), UnitContext("all")
    )
    assert torch.equal(merged, single.slope)  # streamed = in memory, bit for bit


def test_vision_variant():
    base, models = random_model(1, num_tasks=2)
    method = get_method("pcb")
    params = method.parse_params({"variant": "vision"})
    assert isinstance(params, PcbParams) and params.ratio == 0.05
    assert method.parse_params({}).ratio == 0.1
    assert method.parse_params({"variant": "vision", "ratio": 0.2}).ratio == 0.2
    vision = weightweaving.merge(
        base, models, method="pcb", lam=1.0, variant="vision", compute_dtype="float64"
    )
    default = weightweaving.merge(base, models, method="pcb", lam=1.0, compute_dtype="float64")
    assert all(torch.isfinite(vision[n]).all() for n in vision)
    assert any(not torch.allclose(vision[n], default[n]) for n in vision)


def test_constant_task_vector_gives_no_nan():
    base = {"w": torch.zeros(10)}
    models = [{"w": torch.full((10,), 0.5)}, {"w": torch.zeros(10)}]
    for scope in ("global", "tensor"):
        got = weightweaving.merge(base, models, method="pcb", lam=1.0, scope=scope)
        assert torch.isfinite(got["w"]).all()


@pytest.mark.parametrize("values", [{"ratio": 0}, {"ratio": 1.01}, {"scope": "row"}, {"variant": "nlp"}])
def test_bad_hyperparameter_is_refused(values):
    name = next(iter(values))
    with pytest.raises(OptionError, match=f"'{name}'"):
        weightweaving.merge({"w": torch.zeros(2)}, [{"w": torch.ones(2)}], method="pcb", **values)


def test_metadata():
    method = get_method("pcb")
    assert method.scope_of(method.parse_params({})).value == "global"
    assert method.paper_lam_ranges["multitask"] == (0.1, 2.5)
