"""Properties every registered method must have, driven by the registry (timm-style).

Each test is parametrised over ``weightweaving.list_methods()``, so a newly registered method is
covered without touching this file. Models are small random state dicts drawn by hypothesis: a 2-D
attention matrix, its bias, a 4-D conv kernel and an int64 buffer.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import weightweaving
from weightweaving.errors import OptionError
from weightweaving.methods import LamKind, get_method

METHODS = [n for n in weightweaving.list_methods() if not get_method(n).uses_data]  # data: tests/withdata
FEW = settings(max_examples=10, deadline=None)
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # float32 rounding of O(1) weights; a slip is ~1e-2

StateDict = dict[str, torch.Tensor]


@st.composite
def models(
    draw: st.DrawFn, min_tasks: int = 1, max_tasks: int = 3, dtype: torch.dtype = torch.float32
) -> tuple[StateDict, list[StateDict]]:
    """A base model and fine-tuned models whose task vectors are ~0.1 of the weights' scale."""
    seed = draw(st.integers(0, 2**31 - 1))
    num_tasks = draw(st.integers(min_tasks, max_tasks))
    rows, cols = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "blocks.0.attn.out_proj.weight": (rows, cols),
        "blocks.0.attn.out_proj.bias": (rows,),
        "conv1.weight": (3, 2, 2, 2),
    }
    base: StateDict = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    base["position_ids"] = torch.arange(5, dtype=torch.int64)[None]
    tasks = []
    for t in range(num_tasks):
        task = {name: base[name] + 0.1 * torch.randn(shape, generator=gen) for name, shape in shapes.items()}
        task["position_ids"] = base["position_ids"] + t + 1  # must not leak into the output
        tasks.append(task)
    cast = lambda sd: {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    return cast(base), [cast(task) for task in tasks]


def tasks_for(name: str, low: int = 1, high: int = 3) -> tuple[int, int]:
    """The range of task counts to draw for a method, within what it declares it merges."""
    fewest, most = get_method(name).num_models
    low, high = max(low, fewest), min(high, most) if most is not None else high
    return (low, high) if low <= high else (fewest, fewest)


def merge(
    name: str, base: StateDict, tasks: list[StateDict], lam: float | None = None, seed: int = 0
) -> StateDict:
    merged = weightweaving.merge(base, tasks, method=name, lam=lam, seed=seed)
    assert isinstance(merged, dict)
    return merged


def assert_close(got: StateDict, want: StateDict) -> None:
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key].double(), want[key].double(), **TOLERANCE, msg=key)


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("name", METHODS)
@FEW
@given(drawn=models(max_tasks=1))
def test_zero_task_vectors_give_the_base_exactly(name, drawn):
    base, _ = drawn
    fewest, most = get_method(name).num_models
    count = max(fewest, 2 if most is None else min(2, most))
    merged = merge(name, base, [dict(base)] * count)
    for key, value in base.items():
        assert torch.equal(merged[key], value), key


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@FEW
@given(data=st.data())
def test_keys_shapes_and_dtypes_follow_the_base(name, dtype, data):
    low, high = tasks_for(name)
    base, tasks = data.draw(models(low, high, dtype=dtype))
    merged = merge(name, base, tasks)
    assert list(merged) == list(base)
    for key, value in base.items():
        assert merged[key].shape == value.shape, key
        assert merged[key].dtype == value.dtype, key
        assert bool(torch.isfinite(merged[key].double()).all()), key
    assert torch.equal(merged["position_ids"], base["position_ids"])  # int buffers come from the base


@pytest.mark.parametrize(
    "name", [n for n in METHODS if get_method(n).order_invariant and get_method(n).num_models[1] != 1]
)
@FEW
@given(drawn=models(min_tasks=2))
def test_order_of_the_models_does_not_matter(name, drawn):
    base, tasks = drawn
    assert_close(merge(name, base, tasks[::-1]), merge(name, base, tasks))


@pytest.mark.parametrize("name", [n for n in METHODS if get_method(n).single_model_identity])
@FEW
@given(drawn=models(max_tasks=1))
def test_one_model_at_lambda_one_is_given_back(name, drawn):
    base, (task,) = drawn
    given_back = {key: value if value.is_floating_point() else base[key] for key, value in task.items()}
    assert_close(merge(name, base, [task], lam=1.0), given_back)  # int buffers still come from the base


@pytest.mark.parametrize("name", [n for n in METHODS if get_method(n).lam_kind is LamKind.LINEAR])
@FEW
@given(drawn=models(), lams=st.tuples(st.floats(0.05, 3.0), st.floats(0.05, 3.0)))
def test_linear_in_lambda(name, drawn, lams):
    base, tasks = drawn
    a, b = lams
    at_a, at_b = merge(name, base, tasks, lam=a), merge(name, base, tasks, lam=b)
    scaled = {key: base[key] + (a / b) * (at_b[key] - base[key]) for key in base}
    assert_close(at_a, scaled)


@pytest.mark.parametrize("name", [n for n in METHODS if get_method(n).lam_kind is LamKind.AFFINE])
@FEW
@given(drawn=models(), lams=st.tuples(st.floats(0.05, 3.0), st.floats(0.05, 3.0)))
def test_affine_in_lambda(name, drawn, lams):
    base, tasks = drawn
    a, b = lams
    at_0, at_a, at_b = (merge(name, base, tasks, lam=lam) for lam in (0.0, a, b))
    scaled = {key: at_0[key] + (a / b) * (at_b[key] - at_0[key]) for key in base}
    assert_close(at_a, scaled)


@pytest.mark.parametrize("name", METHODS)
@settings(max_examples=5, deadline=None)
@given(data=st.data(), lams=st.lists(st.floats(0.05, 3.0), min_size=1, max_size=3, unique=True))
def test_a_sweep_equals_the_merge_at_each_lambda(name, data, lams):
    """``merge_sweep`` (``Method.merge_unit_sweep``: λ-independent work once) equals ``merge`` per λ."""
    base, tasks = data.draw(models(*tasks_for(name)))
    sweep = weightweaving.merge_sweep(base, tasks, name, lams, seed=3)
    assert list(sweep) == lams
    for lam in lams:
        want = merge(name, base, tasks, lam=lam, seed=3)
        assert list(sweep[lam]) == list(want)
        assert all(sweep[lam][key].dtype == want[key].dtype for key in want)
        assert_close(sweep[lam], want)


@pytest.mark.parametrize("name", METHODS)
@FEW
@given(data=st.data(), seed=st.integers(0, 2**32))
def test_same_seed_gives_the_same_bytes(name, data, seed):
    base, tasks = data.draw(models(*tasks_for(name)))
    first, second = merge(name, base, tasks, seed=seed), merge(name, base, tasks, seed=seed)
    assert list(first) == list(second)
    for key in first:
        assert first[key].dtype == second[key].dtype
        assert raw_bytes(first[key]) == raw_bytes(second[key]), key


@pytest.mark.parametrize("name", METHODS)
def test_unknown_hyperparameter_is_refused_by_name(name):
    with pytest.raises(OptionError, match="no_such_option"):
        get_method(name).parse_params({"no_such_option": 1})
    count = get_method(name).num_models[0]
    with pytest.raises(OptionError, match="no_such_option"):
        weightweaving.merge(
            {"w": torch.zeros(2)}, [{"w": torch.ones(2)}] * count, method=name, no_such_option=1
        )


@pytest.mark.parametrize("name", [n for n in METHODS if get_method(n).num_models != (1, None)])
def test_a_wrong_number_of_models_is_refused(name):
    low, high = get_method(name).num_models
    count = low - 1 if low > 1 else (high or 0) + 1
    with pytest.raises(OptionError, match=f"method '{name}' merges .* fine-tuned models?, got {count}"):
        weightweaving.merge({"w": torch.zeros(2)}, [{"w": torch.ones(2)}] * count, method=name)


@pytest.mark.parametrize("name", METHODS)
def test_metadata_is_declared(name):
    method = get_method(name)
    assert method.summary
    assert (method.lam_kind is LamKind.NONE) == (method.default_lam is None)
    for low, high in method.paper_lam_ranges.values():
        assert 0 < low < high
    assert set(method.paper_lam_ranges) <= {"multitask", "continual", "domain"}
