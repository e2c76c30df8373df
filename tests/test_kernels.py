"""kernels: the threaded drivers equal the single-thread ones; count checks; threading-layer fallback."""

from __future__ import annotations

import numpy as np
import pytest

from packedqdc import kernels
from packedqdc.batching import BatchShape, squared_cutoff
from packedqdc.kernels import fill_packed, fill_packed_threaded, fill_padded, fill_padded_threaded


def dataset(seed=0, n_mol=60, hi=40):
    """Molecules of 1..hi atoms: offsets (N+1,), Z, R (3T,), F (3T,), E, Qtot, as the kernels take them."""
    rng = np.random.default_rng(seed)
    n = rng.integers(1, hi + 1, n_mol)
    offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
    T = int(offsets[-1])
    return (
        offsets, rng.integers(1, 10, T).astype(np.int32), rng.normal(0, 2, 3 * T).astype(np.float32),
        rng.normal(size=3 * T).astype(np.float32), rng.normal(size=n_mol), rng.integers(-1, 2, n_mol).astype(float),
    )  # fmt: skip


def packed_outputs(shape: BatchShape, k: int):
    A, M, P = (k * x for x in shape)
    return [
        np.empty(A, np.int32), np.empty(3 * A, np.float32), np.empty(3 * A, np.float32), np.empty(A, bool),
        np.empty(A, np.int32), np.empty(M), np.empty(M), np.empty(M, np.int32), np.empty(M, bool),
        np.empty(M, np.int64), np.empty(P, np.int32), np.empty(P, np.int32), np.empty(P, bool),
        np.full((k, 3), -1, np.int64),
    ]  # fmt: skip


def cutoff_counts(offsets, R, c2):
    out = np.zeros(offsets.shape[0] - 1, np.int64)
    kernels.count_within(offsets, R, c2, out)
    return out


@pytest.mark.parametrize("cutoff", [None, 2.5])
@pytest.mark.parametrize("threads", [2, 3, 7])
def test_threaded_packed_equals_single_thread(cutoff, threads):
    """Item after item into the same buffers (so padding is rewritten only where dirtied), two batches
    per item, runs cut anywhere: every output equals the single-thread kernel's, bit for bit."""
    offsets, Z, R, F, E, Q = dataset()
    c2 = squared_cutoff(cutoff) if cutoff else np.float32(0)
    counts = cutoff_counts(offsets, R, c2) if cutoff else np.zeros(0, np.int64)
    shape = BatchShape(A=200, M=12, P=6000)
    rng = np.random.default_rng(1)
    one, many = packed_outputs(shape, 2), packed_outputs(shape, 2)
    for _ in range(6):
        mols, lo, hi = [], [], []
        for _b in range(2):  # fill each batch with random molecules up to its budget
            lo.append(len(mols))
            a = p = 0
            for i in rng.permutation(60):
                n = int(offsets[i + 1] - offsets[i])
                pairs = int(counts[i]) if cutoff else n * (n - 1)
                if len(mols) - lo[-1] < int(rng.integers(0, 11)) and a + n < shape.A and p + pairs <= shape.P:
                    mols.append(i)
                    a, p = a + n, p + pairs
            hi.append(len(mols))
        args = (np.array(mols, np.int64), np.array(lo, np.int64), np.array(hi, np.int64), offsets, Z, R, F, E, Q,
                c2, cutoff is not None, counts)  # fmt: skip
        fill_packed(*args, *one)
        fill_packed_threaded(*args, *many, threads)
        for x, y in zip(one, many):
            np.testing.assert_array_equal(x, y)
    assert one[-1][:, 2].sum() > 0  # some pairs were written


@pytest.mark.parametrize("threaded", [False, True])
def test_packed_refuses_counts_that_disagree_with_the_data(threaded):
    offsets, Z, R, F, E, Q = dataset(n_mol=5, hi=6)
    c2 = squared_cutoff(3.0)
    counts = cutoff_counts(offsets, R, c2)
    counts[2] = max(counts[2] - 1, 0) if counts[2] else 1  # the data no longer match
    args = (np.arange(5, dtype=np.int64), np.array([0]), np.array([5]), offsets, Z, R, F, E, Q, c2, True, counts)
    out = packed_outputs(BatchShape(A=40, M=8, P=200), 1)
    kernel = (lambda *a: fill_packed_threaded(*a, 2)) if threaded else fill_packed
    with pytest.raises(ValueError, match="differ from the count"):
        kernel(*args, *out)


@pytest.mark.parametrize("cutoff", [None, 2.5])
def test_threaded_padded_equals_single_thread(cutoff):
    offsets, Z, R, F, E, Q = dataset(hi=12)
    na, M, k = 12, 5, 2
    c2 = squared_cutoff(cutoff) if cutoff else np.float32(0)

    def outputs():
        A = k * M * na
        return [
            np.empty(A, np.int32), np.empty(3 * A, np.float32), np.empty(3 * A, np.float32), np.empty(A, bool),
            np.empty(k * M), np.empty(k * M), np.full(k * M, na, np.int32), np.empty(k * M, bool),
            np.empty(k * M, np.int64), np.empty(k * M * na * (na - 1), bool),
        ]  # fmt: skip

    one, many = outputs(), outputs()
    rng = np.random.default_rng(2)
    for _ in range(5):
        mols = rng.permutation(60)[: int(rng.integers(0, 2 * M + 1))].astype(np.int64)
        lo = np.array([0, min(len(mols), M)], np.int64)
        hi = np.array([lo[1], len(mols)], np.int64)
        args = (mols, lo, hi, offsets, Z, R, F, E, Q, c2, cutoff is not None, na)
        fill_padded(*args, *one)
        fill_padded_threaded(*args, *many, 3)
        for x, y in zip(one, many):
            np.testing.assert_array_equal(x, y)


def test_thread_count_falls_back_to_one_on_an_unsafe_layer(monkeypatch):
    assert kernels.kernel_threads(1) == 1
    monkeypatch.setattr(kernels.numba.config, "NUMBA_NUM_THREADS", 4)
    monkeypatch.setattr(kernels, "threading_layer", lambda: "omp")
    assert kernels.kernel_threads(3) == 3 and kernels.kernel_threads(16) == 4
    monkeypatch.setattr(kernels, "threading_layer", lambda: "workqueue")
    with pytest.warns(RuntimeWarning, match="'workqueue', not thread-safe"):
        assert kernels.kernel_threads(3) == 1


def test_greedy_bounds_matches_a_plain_loop():
    rng = np.random.default_rng(3)
    atoms = rng.integers(1, 30, 1000)
    pairs = atoms * (atoms - 1)
    got = kernels.greedy_bounds(atoms, pairs, 120, 2500, 9).tolist()
    want, a, p, m = [0], 0, 0, 0
    for i, (x, y) in enumerate(zip(atoms, pairs)):
        if m and (a + x > 120 or p + y > 2500 or m + 1 > 9):
            want.append(i)
            a = p = m = 0
        a, p, m = a + x, p + y, m + 1
    assert got == want + [1000]
    assert kernels.greedy_bounds(atoms[:0], pairs[:0], 1, 1, 1).tolist() == [0]
