"""all_finite: exact on NaN, inf and on finite values whose sum overflows."""

from __future__ import annotations

import numpy as np
import pytest

from packedqdc.finite import all_finite


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite(dtype) -> None:
    a = np.random.default_rng(0).normal(size=(1000, 3)).astype(dtype)
    assert all_finite(a) and all_finite(a[:0])
    for bad in (np.nan, np.inf, -np.inf):
        b = a.copy()
        b[617, 2] = bad
        assert not all_finite(b)
    huge = np.full(10, np.finfo(dtype).max, dtype=dtype)  # finite, but the sum overflows to inf
    with np.errstate(all="raise"):  # and no warning leaks out
        assert all_finite(huge)
        huge[3] = np.nan
        assert not all_finite(huge)
    b = a.copy()
    b[5, 0], b[6, 0] = np.inf, -np.inf  # the sum is NaN, not inf
    assert not all_finite(b)


def test_integers_and_bools_are_finite() -> None:
    assert all_finite(np.arange(5)) and all_finite(np.ones(3, dtype=bool))
