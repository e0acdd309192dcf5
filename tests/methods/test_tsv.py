"""TSV-Merge (methods/tsv.py) against the reference oracle cases, plus its own edge cases."""

from __future__ import annotations

import pytest
import torch

import weightweaving
from weightweaving.errors import OptionError
from weightweaving.methods import get_method
from weightweaving.methods.tsv import tsv_merge


def _matrices(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_single_task_is_given_back():
    task_vectors = _matrices(1, 7, 5)
    torch.testing.assert_close(tsv_merge(task_vectors), task_vectors[0])


def test_tasks_in_orthogonal_subspaces_of_rank_at_most_their_share_are_summed():
    # 4 tasks on disjoint rows and columns of an 8×8 matrix, rank 2 each = p / T: nothing is lost
    task_vectors = torch.zeros(4, 8, 8, dtype=torch.float64)
    for t in range(4):
        task_vectors[t, 2 * t : 2 * t + 2, 2 * t : 2 * t + 2] = _matrices(2, 2, seed=t)
    torch.testing.assert_close(tsv_merge(task_vectors), task_vectors.sum(0))


def test_each_task_keeps_int_p_over_t_components_and_unused_slots_stay_empty():
    task_vectors = _matrices(3, 9, 5)  # p = 5, r = int(5 / 3) = 1: rank 3 at most
    assert int(torch.linalg.matrix_rank(tsv_merge(task_vectors))) == 3
    assert torch.equal(tsv_merge(_matrices(3, 2, 6)), torch.zeros(2, 6, dtype=torch.float64))  # r = 0


def test_text_projection_and_non_matrices_are_averaged():
    base = {
        "text_projection": torch.zeros(4, 3),
        "positional_embedding": torch.zeros(4, 3),
        "b": torch.zeros(3),
    }
    tasks = [{k: _matrices(*v.shape, seed=i).float() for k, v in base.items()} for i in range(2)]
    merged = weightweaving.merge(base, tasks, method="tsv", lam=0.5)
    mean = {k: (tasks[0][k] + tasks[1][k]) / 2 for k in base}
    torch.testing.assert_close(merged["text_projection"], 0.5 * mean["text_projection"])
    torch.testing.assert_close(merged["b"], 0.5 * mean["b"])
    assert not torch.allclose(merged["positional_embedding"], 0.5 * mean["positional_embedding"])
    # an empty pattern SVD-merges text_projection too
    merged = weightweaving.merge(base, tasks, method="tsv", lam=0.5, svd_exclude="")
    assert not torch.allclose(merged["text_projection"], 0.5 * mean["text_projection"])


def test_bad_pattern_is_refused():
    with pytest.raises(OptionError, match="svd_exclude"):
        get_method("tsv").parse_params({"svd_exclude": "("})


@pytest.mark.parametrize("shape, r", [((4, 30, 20), 5), ((3, 12, 40), 4), ((5, 6, 6), 1)])
def test_one_matrix_svd_at_a_time_is_the_batched_svd(shape, r):
    """TSV and ISO-CTS decompose one task's matrix at a time (less memory): the stacked blocks are
    the same bytes as the top-r slices of one batched SVD of the whole stack."""
    from weightweaving.methods.steps import thin_svd, top_task_blocks

    matrices = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    got = top_task_blocks(matrices, r)
    u, s, vh = thin_svd(matrices)
    num_tasks, m, n = shape
    want = (
        u[..., :r].permute(1, 0, 2).reshape(m, num_tasks * r),
        s[:, :r].reshape(num_tasks * r),
        vh[:, :r, :].reshape(num_tasks * r, n),
    )
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
