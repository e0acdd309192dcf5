"""The suite's data loaders read exactly what their sources give."""

from __future__ import annotations

import numpy as np

from weightweaving.suite import data


def test_digits_are_scikit_learns_without_importing_it() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    table = data._digits_table()
    assert np.array_equal(table[:, :-1].reshape(-1, 8, 8), bunch.images)
    assert np.array_equal(table[:, -1].astype(int), bunch.target)
    images, labels = data.load_digits_28()
    assert images.shape == (len(bunch.target), 28, 28) and np.array_equal(labels, bunch.target)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert not images[:, :2].any() and not images[:, 26:].any()  # centred: a 2-pixel empty border


def test_tasks_do_not_depend_on_the_workers_drawing_them() -> None:
    import torch

    sizes = data.Sizes(train=40, test=20, pretrain=30)
    names = ["digits", "shapes", "noise_spectrum"]
    one, pools_one = data.build_tasks(5, sizes, names)
    two, pools_two = data.build_tasks(5, sizes, names, workers=2)
    assert [t.name for t in two] == names
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert all(torch.equal(pools_one[n], pools_two[n]) for n in names)
