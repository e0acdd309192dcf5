"""AdaMerging (layer-wise) and CART++: known optima, range, determinism, CART at λ = 1."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import weightweaving
from weightweaving.errors import WeightWeavingError
from weightweaving.withdata.adamerging import (
    cart_directions,
    entropy,
    learn_coefficients,
    task_vector_directions,
)


def linear_setup(
    seed: int = 0,
) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(3, 2, bias=False)
    base = {"weight": torch.randn(2, 3, generator=gen)}
    tuned = {"weight": base["weight"] + torch.randn(2, 3, generator=gen)}
    return model, base, tuned, torch.randn(12, 3, generator=gen)


def target_loss(base: torch.Tensor, delta: torch.Tensor, x: torch.Tensor, at: float):
    def loss(logits: torch.Tensor) -> torch.Tensor:
        # every batch is all of x (batch_size 12): the loss is minimised at λ = at exactly
        want = x @ (base + at * delta).T
        return (logits.sort(0).values - want.sort(0).values).square().mean()

    return loss


@pytest.mark.parametrize("at, expected", [(0.6, 0.6), (1.7, 1.0), (-0.4, 0.0)])
def test_single_task_finds_the_known_lambda_and_stays_in_range(at: float, expected: float) -> None:
    model, base, tuned, x = linear_setup()
    offset, directions = task_vector_directions(base, [tuned])
    loss = target_loss(base["weight"], tuned["weight"] - base["weight"], x, at)
    learned = learn_coefficients(
        model,
        offset,
        directions,
        [x],
        [lambda z: z],
        steps=400,
        lr=0.01,
        batch_size=12,
        batches_per_task=1,
        loss=loss,
    )
    (lam,) = learned.coefficients["weight"]
    assert 0.0 <= lam <= 1.0
    assert abs(lam - expected) < 0.01
    want = base["weight"] + lam * (tuned["weight"] - base["weight"])
    torch.testing.assert_close(learned.state_dict["weight"], want)
    assert learned.losses[-1] < learned.losses[0]


def test_entropy_training_is_deterministic_and_only_trains_lambda() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    tasks = [{k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(2)]
    data = [torch.randn(20, 4, generator=gen), torch.randn(20, 4, generator=gen)]
    heads = [nn.Linear(3, 3), nn.Linear(3, 3)]
    head_before = [h.weight.detach().clone() for h in heads]
    offset, directions = task_vector_directions(base, tasks)

    def run(seed: int):
        return learn_coefficients(
            model, offset, directions, data, heads, steps=15, lr=0.05, batch_size=4, seed=seed
        )

    first, again, other = run(0), run(0), run(1)
    assert first.coefficients == again.coefficients
    assert all(torch.equal(first.state_dict[k], again.state_dict[k]) for k in base)
    assert first.coefficients != other.coefficients  # batch order follows the seed
    assert set(first.coefficients) == set(base)  # one coefficient per task per parameter tensor
    assert all(0.0 <= v <= 1.0 for values in first.coefficients.values() for v in values)
    assert all(torch.equal(m, base[k]) for k, m in model.state_dict().items())  # model untouched
    assert all(torch.equal(h.weight, w) for h, w in zip(heads, head_before, strict=True))
    assert all(h.weight.requires_grad for h in heads)
    assert entropy(torch.zeros(2, 4)).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())


def test_one_joint_forward_gives_the_per_batch_losses() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    tasks = [{k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    data = [torch.randn(9, 4, generator=gen) for _ in tasks]
    heads = [nn.Linear(3, 3), nn.Linear(3, 2), nn.Linear(3, 4)]
    offset, directions = task_vector_directions(base, tasks)
    runs = [
        learn_coefficients(model, offset, directions, data, heads, steps=6, lr=0.05, batch_size=4, joint=j)
        for j in (True, False)
    ]
    assert runs[0].losses == pytest.approx(runs[1].losses, rel=1e-5)
    for name, values in runs[0].coefficients.items():
        assert values == pytest.approx(runs[1].coefficients[name], abs=1e-5)


def test_cart_plus_plus_at_one_is_cart_and_learns_its_lambda() -> None:
    gen = torch.Generator().manual_seed(2)
    base = {"mlp.weight": torch.randn(6, 5, generator=gen), "mlp.bias": torch.randn(6, generator=gen)}
    tasks = [{k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    offset, directions = cart_directions(base, tasks, rank_fraction=0.4)
    assert set(directions) == {"mlp.weight"}  # biases: the plain average
    cart = weightweaving.merge(base, tasks, method="cart", lam=1.0, rank_fraction=0.4)
    assert isinstance(cart, dict)
    torch.testing.assert_close(offset["mlp.weight"] + directions["mlp.weight"].sum(0), cart["mlp.weight"])
    torch.testing.assert_close(offset["mlp.bias"], cart["mlp.bias"])
    # the loss is minimised where every task's λ is 0.8 (from CART's λ = 1)
    model = nn.Linear(5, 6)
    x = torch.randn(12, 5, generator=gen)
    want = x @ (offset["mlp.weight"] + 0.8 * directions["mlp.weight"].sum(0)).T + offset["mlp.bias"]

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return (logits.sort(0).values - want.sort(0).values).square().mean()

    learned = learn_coefficients(
        model,
        offset,
        directions,
        [x] * 3,
        [lambda z: z] * 3,
        steps=400,
        lr=0.01,
        init=1.0,
        batch_size=12,
        batches_per_task=1,
        loss=loss,
        prefix="mlp.",
    )
    got = learned.state_dict["mlp.weight"]
    torch.testing.assert_close(x @ got.T + offset["mlp.bias"], want, rtol=0.05, atol=0.05)


def test_bad_inputs_are_errors() -> None:
    model, base, tuned, x = linear_setup()
    offset, directions = task_vector_directions(base, [tuned])
    with pytest.raises(WeightWeavingError, match="task 0 has no test-time inputs"):
        learn_coefficients(model, offset, directions, [x[:0]], [lambda z: z], steps=1)
    with pytest.raises(WeightWeavingError, match="not in the checkpoints"):
        learn_coefficients(model, {}, directions, [x], [lambda z: z], steps=1)
