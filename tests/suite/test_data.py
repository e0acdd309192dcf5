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
