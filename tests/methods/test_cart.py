"""CART (methods/cart.py) against the reference oracle cases, plus its own edge cases."""

from __future__ import annotations

import pytest
import torch

import weightweaving
from tests.oracles import assert_matches, case_paths, load_case
from weightweaving.errors import OptionError
from weightweaving.methods import get_method
from weightweaving.methods.cart import REFERENCE_SVD_INCLUDE
from weightweaving.methods.steps import name_matches


def _reference_rule(name: str) -> bool:
    """JH-GEECS/CART ``_get_truncated_task_vectors``: which parameters get the low-rank SVD."""
    return ("attn" in name or "mlp" in name) and not ("ln" in name or "bias" in name)


NAMES = [
    # OpenAI CLIP (the reference's naming)
    "visual.transformer.resblocks.0.attn.in_proj_weight",
    "visual.transformer.resblocks.0.attn.in_proj_bias",
    "visual.transformer.resblocks.0.attn.out_proj.weight",
    "visual.transformer.resblocks.0.attn.out_proj.bias",
    "visual.transformer.resblocks.0.ln_1.weight",
    "visual.transformer.resblocks.0.mlp.c_fc.weight",
    "visual.transformer.resblocks.0.mlp.c_proj.bias",
    "visual.positional_embedding",
    "visual.proj",
    "visual.conv1.weight",
    "visual.ln_post.bias",
    # Hugging Face CLIP
    "vision_model.encoder.layers.0.self_attn.q_proj.weight",
    "vision_model.encoder.layers.0.self_attn.out_proj.bias",
    "vision_model.encoder.layers.0.mlp.fc1.weight",
    "vision_model.encoder.layers.0.mlp.fc2.bias",
    "vision_model.encoder.layers.0.layer_norm1.weight",
    "vision_model.post_layernorm.weight",
    "visual_projection.weight",
    # corner cases of the substring rule
    "mlp.kiln.weight",
    "attn_bias_free.weight",
    "mlpattn",
    "",
]


@pytest.mark.parametrize("name", NAMES)
def test_default_pattern_is_the_reference_rule(name):
    assert name_matches(REFERENCE_SVD_INCLUDE, name) == _reference_rule(name)
    assert name_matches(get_method("cart").parse_params().svd_include, name) == _reference_rule(name)


@pytest.mark.parametrize("path", case_paths("cart")[:2], ids=lambda p: p.stem)
def test_oracle_checks_the_selection(path):
    # with 4 tasks the low-rank terms do not cancel: selecting nothing must miss the attn/mlp matrices
    case = load_case(path)
    got = weightweaving.merge(
        case.pretrained,
        case.tasks,
        method="cart",
        lam=case.meta["lam"],
        svd_include="",
        **case.hyperparameters,
    )
    with pytest.raises(AssertionError, match=r"attn\.in_proj\.weight|mlp\.c_fc\.weight"):
        assert_matches(case, got)


def _models(num_tasks: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(3)
    base = {"attn.w": torch.randn(8, 6, generator=gen), "proj": torch.randn(8, 6, generator=gen)}
    tasks = [
        {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(num_tasks)
    ]
    return base, tasks


def test_lambda_zero_full_rank_and_two_tasks_are_the_weight_average():
    base, tasks = _models(4)
    average = weightweaving.merge(base, tasks, method="weight_averaging")
    for kwargs in ({"lam": 0.0}, {"lam": 1.5, "rank_fraction": 1.0}):
        merged = weightweaving.merge(base, tasks, method="cart", **kwargs)
        for key in base:
            torch.testing.assert_close(merged[key], average[key])
    merged = weightweaving.merge(base, tasks, method="cart", lam=1.5)
    assert not torch.allclose(merged["attn.w"], average["attn.w"])  # selected: corrected
    torch.testing.assert_close(merged["proj"], average["proj"])  # not selected: the average
    # T = 2: the centered vectors are ±(θ_1 − θ_2)/2, so their truncations cancel for any λ
    base, tasks = _models(2)
    merged = weightweaving.merge(base, tasks, method="cart", lam=1.5)
    torch.testing.assert_close(
        merged["attn.w"], weightweaving.merge(base, tasks, method="weight_averaging")["attn.w"]
    )


def test_rank_is_max_one_int_fraction():
    base, tasks = _models(3)
    for fraction, rank in ((0.01, 1), (0.34, 2), (0.5, 3)):
        merged = weightweaving.merge(base, tasks, method="cart", lam=0.0, rank_fraction=fraction)
        correction = weightweaving.merge(base, tasks, method="cart", lam=1.0, rank_fraction=fraction)
        difference = (correction["attn.w"] - merged["attn.w"]).double()  # Σ_t of 3 rank-k terms
        assert int(torch.linalg.matrix_rank(difference, atol=1e-5)) == min(3 * rank, 6)


@pytest.mark.parametrize(
    ("option", "value"), [("rank_fraction", 0.0), ("rank_fraction", 1.2), ("svd_include", "(")]
)
def test_bad_values_are_refused(option, value):
    with pytest.raises(OptionError, match=option):
        get_method("cart").parse_params({option: value})


@pytest.mark.parametrize("shape", [(4, 30, 20), (3, 12, 40)])
def test_one_task_at_a_time_is_the_batched_svd(shape):
    """CART decomposes one centred vector at a time (less memory); the slope is the same bytes as
    the batched SVD over the stack that it replaced."""
    from weightweaving.methods import UnitContext
    from weightweaving.methods.steps import low_rank, thin_svd

    task_vectors = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    method = get_method("cart")
    p = method.parse_params({"rank_fraction": 0.3})
    form = method.compute(task_vectors, p, UnitContext(name="blocks.0.mlp.c_fc.weight"))
    average = task_vectors.mean(0)
    keep = max(1, int(0.3 * min(shape[1:])))
    batched = low_rank(*thin_svd(task_vectors - average), keep).sum(0)
    assert form.slope is not None and torch.equal(form.slope.view(torch.int32), batched.view(torch.int32))
