"""The order algorithms of ``packedqdc.shuffle``: permutations and splits, uniform and seeded."""

from __future__ import annotations

import numpy as np
import pytest

from packedqdc.errors import ConfigError
from packedqdc.shuffle import BUCKET_ENTRIES, ORDER_VERSIONS, sample_positions, shuffled, shuffled_with, split_positions


@pytest.mark.parametrize("version", ORDER_VERSIONS)
@pytest.mark.parametrize("n", [0, 1, 2, 37, 3 * BUCKET_ENTRIES + 5])
def test_shuffled_is_a_seeded_permutation_of_the_values(version, n):
    values = (np.arange(n, dtype=np.int32) * 7 + 3)
    out = shuffled(values, np.random.default_rng([1, 2]), version)
    assert out.dtype == values.dtype and out.shape == values.shape
    np.testing.assert_array_equal(np.sort(out), values)
    np.testing.assert_array_equal(out, shuffled(values, np.random.default_rng([1, 2]), version))
    if n > 30:
        assert not np.array_equal(out, values)
        assert not np.array_equal(out, shuffled(values, np.random.default_rng([1, 3]), version))


def test_version_1_is_numpys_permutation():
    values = np.arange(100, 1100, dtype=np.int64)
    np.testing.assert_array_equal(shuffled(values, np.random.default_rng(5), 1),
                                  values[np.random.default_rng(5).permutation(1000)])


def test_version_2_permutations_are_uniform():
    """Chi-square over where each of 6 values lands (36 cells, 6000 seeds), and over the 24 orders of
    4 values across buckets (many buckets: the scatter decides)."""
    n, draws = 6, 6000
    counts = np.zeros((n, n))
    for s in range(draws):
        out = shuffled(np.arange(n), np.random.default_rng(s), 2)
        counts[out, np.arange(n)] += 1
    expected = draws / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 70, chi2  # 25 degrees of freedom: p ~ 1e-5 at 60
    big = 4 * BUCKET_ENTRIES  # 4 buckets: the order of the first 4 values is set by scatter and shuffles
    seen: dict[tuple, int] = {}
    for s in range(2400):
        out = shuffled(np.arange(big, dtype=np.int32), np.random.default_rng(s), 2)
        key = tuple(out[out < 4].tolist())  # the order in which 0..3 appear
        seen[key] = seen.get(key, 0) + 1
    assert len(seen) == 24
    observed = np.array(list(seen.values()), dtype=float)
    chi2 = float(((observed - 100) ** 2 / 100).sum())
    assert chi2 < 60, chi2  # 23 degrees of freedom


@pytest.mark.parametrize("version", ORDER_VERSIONS)
def test_split_positions_is_an_exact_sorted_partition(version):
    for n, k in [(0, 0), (1, 1), (10, 0), (10, 10), (1000, 900), (12345, 6172)]:
        first, rest = split_positions(n, k, np.random.default_rng(n), version)
        assert first.shape == (k,) and rest.shape == (n - k,)
        assert np.all(np.diff(first) > 0) and np.all(np.diff(rest) > 0)
        np.testing.assert_array_equal(np.sort(np.concatenate([first, rest])), np.arange(n))


def test_version_2_split_is_uniform():
    """Every position is held out equally often (binomial bounds over 4000 seeds)."""
    n, k, draws = 20, 5, 4000
    held = np.zeros(n)
    for s in range(draws):
        _, rest = split_positions(n, n - k, np.random.default_rng(s), 2)
        held[rest] += 1
    p = k / n
    sd = np.sqrt(draws * p * (1 - p))
    assert np.all(np.abs(held - draws * p) < 4.5 * sd), held


def test_unknown_version_is_a_config_error():
    with pytest.raises(ConfigError, match="order version"):
        shuffled(np.arange(3), np.random.default_rng(0), 3)


@pytest.mark.parametrize("version", ORDER_VERSIONS)
def test_shuffled_with_reads_the_carried_arrays_along(version):
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 200, 5000).astype(np.uint8)
    pairs = rng.integers(0, 40000, 5000).astype(np.uint16)
    values = np.sort(rng.choice(5000, 3000, replace=False)).astype(np.int32)
    out, (s, p) = shuffled_with(values, (sizes, pairs), np.random.default_rng(9), version)
    np.testing.assert_array_equal(out, shuffled(values, np.random.default_rng(9), version))
    assert s.dtype == np.uint8 and p.dtype == np.uint16
    np.testing.assert_array_equal(s, sizes[out])
    np.testing.assert_array_equal(p, pairs[out])


def test_sample_positions_is_a_sorted_uniform_sample():
    held = np.zeros(30)
    for s in range(3000):
        got = sample_positions(30, 6, np.random.default_rng(s))
        assert got.shape == (6,) and np.all(np.diff(got) > 0) and got.max() < 30
        held[got] += 1
    sd = np.sqrt(3000 * 0.2 * 0.8)
    assert np.all(np.abs(held - 600) < 4.5 * sd), held


def test_version_2_split_in_segments_is_uniform_exact_and_thread_independent(monkeypatch):
    """Segments (their shares drawn first) keep the split exact and uniform, and the threads that
    run them change nothing."""
    import packedqdc.index as index_module
    import packedqdc.shuffle as shuffle_module

    monkeypatch.setattr(shuffle_module, "SEGMENT", 7)  # 20 positions: 3 segments
    n, k, draws = 20, 5, 4000
    held = np.zeros(n)
    for s in range(draws):
        first, rest = split_positions(n, n - k, np.random.default_rng(s), 2)
        np.testing.assert_array_equal(np.sort(np.concatenate([first, rest])), np.arange(n))
        assert rest.shape == (k,) and np.all(np.diff(rest) > 0) and np.all(np.diff(first) > 0)
        held[rest] += 1
    sd = np.sqrt(draws * 0.25 * 0.75)
    assert np.all(np.abs(held - draws * 0.25) < 4.5 * sd), held
    monkeypatch.setattr(shuffle_module, "SEGMENT", 1000)
    many = split_positions(100_000, 60_000, np.random.default_rng(1), 2)
    monkeypatch.setattr(index_module, "index_threads", lambda: 1)
    one = split_positions(100_000, 60_000, np.random.default_rng(1), 2)
    for a, b in zip(many, one):
        np.testing.assert_array_equal(a, b)
