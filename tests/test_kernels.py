"""kernels: the threaded drivers equal the single-thread ones; count checks; threading-layer fallback."""

from __future__ import annotations

import numpy as np
import pytest

from packedqdc import kernels
from packedqdc.batching import BatchShape, squared_cutoff
from packedqdc.kernels import (
    Items,
    PackedOut,
    PaddedOut,
    PairRule,
    Source,
    fill_packed,
    fill_packed_threaded,
    fill_padded,
    fill_padded_threaded,
)


def dataset(seed=0, n_mol=60, hi=40):
    """Molecules of 1..hi atoms: offsets (N+1,), Z, R (3T,), F (3T,), E, Qtot (the fields of ``Source``)."""
    rng = np.random.default_rng(seed)
    n = rng.integers(1, hi + 1, n_mol)
    offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
    T = int(offsets[-1])
    return (
        offsets, rng.integers(1, 10, T).astype(np.int32), rng.normal(0, 2, 3 * T).astype(np.float32),
        rng.normal(size=3 * T).astype(np.float32), rng.normal(size=n_mol), rng.integers(-1, 2, n_mol).astype(float),
    )  # fmt: skip


def packed_outputs(shapes: list[BatchShape], k: int, rows: int) -> PackedOut:
    """The packed kernels' outputs: (rows, k * largest size) arrays, (rows, k, 4) marks, (rows,) owners."""
    A, M, P = (k * max(s[i] for s in shapes) for i in range(3))
    return PackedOut(
        np.zeros((rows, A), np.int32), np.zeros((rows, 3 * A), np.float32), np.zeros((rows, 3 * A), np.float32),
        np.zeros((rows, A), bool), np.zeros((rows, A), np.int32), np.zeros((rows, M)), np.zeros((rows, M)),
        np.zeros((rows, M), np.int32), np.zeros((rows, M), bool), np.zeros((rows, M), np.int64),
        np.zeros((rows, P), np.int32), np.zeros((rows, P), np.int32), np.zeros((rows, P), bool),
        np.full((rows, k, 4), -1, np.int64), np.full(rows, -1, np.int64),
    )  # fmt: skip


def cutoff_counts(offsets, R, c2):
    out = np.zeros(offsets.shape[0] - 1, np.int64)
    kernels.count_within(offsets, R, c2, out)
    return out


def random_items(rng, offsets, counts, shapes, G, k):
    """G items of k batches of random molecules within their class's budget: mols, lo, hi (G, k), cls (G,)."""
    mols, lo, hi, cls = [], np.zeros((G, k), np.int64), np.zeros((G, k), np.int64), rng.integers(0, len(shapes), G)
    for g in range(G):
        A, M, P = shapes[cls[g]]
        for b in range(k):
            lo[g, b] = len(mols)
            a = p = 0
            for i in rng.permutation(offsets.shape[0] - 1):
                n = int(offsets[i + 1] - offsets[i])
                pairs = int(counts[i]) if counts.size else n * (n - 1)
                if len(mols) - lo[g, b] < min(int(rng.integers(0, 12)), M - 1) and a + n < A and p + pairs <= P:
                    mols.append(i)
                    a, p = a + n, p + pairs
            hi[g, b] = len(mols)
    return np.array(mols, np.int64), lo, hi, cls.astype(np.int64)


@pytest.mark.parametrize("cutoff", [None, 2.5])
@pytest.mark.parametrize("threads", [2, 3])
def test_threaded_packed_equals_single_thread(cutoff, threads):
    """Calls of 4 items of 2 batches, in two classes (the smaller using a prefix of its rows), into
    reused rows (so padding is rewritten only where dirtied): every output equals the one-thread
    kernel's, bit for bit."""
    offsets, Z, R, F, E, Q = dataset()
    c2 = squared_cutoff(cutoff) if cutoff else np.float32(0)
    counts = cutoff_counts(offsets, R, c2) if cutoff else np.zeros(0, np.int64)
    shapes = [BatchShape(A=200, M=12, P=6000), BatchShape(A=120, M=8, P=3000)]
    rng = np.random.default_rng(1)
    one, many = packed_outputs(shapes, 2, 10), packed_outputs(shapes, 2, 10)
    for _ in range(6):
        mols, lo, hi, cls = random_items(rng, offsets, counts, shapes, 4, 2)
        # rows 0-4 serve class 0, rows 5-9 class 1; distinct rows within a call
        row = cls * 5 + (np.array([np.sum(cls[:g] == cls[g]) for g in range(4)]) + rng.integers(0, 2)) % 5
        items = Items(mols, lo, hi, cls, row, np.array(shapes, np.int64))
        source, pairs = Source(offsets, Z, R, F, E, Q), PairRule(c2, cutoff is not None, counts)
        fill_packed(items, source, pairs, one)
        fill_packed_threaded(items, source, pairs, many, threads)
        for x, y in zip(one, many):
            np.testing.assert_array_equal(x, y)
    assert one.marks[:, :, 2].max() > 0  # pairs were written


@pytest.mark.parametrize("cutoff", [None, 2.5])
def test_row_passing_between_classes_equals_a_fresh_row(cutoff):
    """Rows shared by classes that differ in pair budget only (the automatic budgets): an item filled
    into a row that held other classes (larger and smaller budgets, in any order) equals the same
    item filled into a fresh row: the padding left by any earlier content is rewritten."""
    offsets, Z, R, F, E, Q = dataset(seed=3)
    c2 = squared_cutoff(cutoff) if cutoff else np.float32(0)
    counts = cutoff_counts(offsets, R, c2) if cutoff else np.zeros(0, np.int64)
    shapes = [BatchShape(A=200, M=12, P=2500), BatchShape(A=200, M=12, P=6000), BatchShape(A=200, M=12, P=4000)]
    table = np.array(shapes, np.int64)
    rng = np.random.default_rng(4)
    shared = packed_outputs(shapes, 1, 2)
    for _ in range(12):
        mols, lo, hi, cls = random_items(rng, offsets, counts, shapes, 2, 1)
        source, pairs = Source(offsets, Z, R, F, E, Q), PairRule(c2, cutoff is not None, counts)
        fill_packed(Items(mols, lo, hi, cls, np.array([0, 1]), table), source, pairs, shared)
        for g in range(2):
            fresh = packed_outputs([shapes[cls[g]]], 1, 1)
            zero = np.zeros(1, np.int64)
            one = Items(mols, lo[g : g + 1], hi[g : g + 1], zero, zero, table[cls[g] : cls[g] + 1])
            fill_packed(one, source, pairs, fresh)
            for got, want in zip(shared[:13], fresh[:13]):  # the outputs, within the class's budgets
                np.testing.assert_array_equal(got[g, : want.shape[1]], want[0])


@pytest.mark.parametrize("threaded", [False, True])
def test_packed_refuses_counts_that_disagree_with_the_data(threaded):
    offsets, Z, R, F, E, Q = dataset(n_mol=5, hi=6)
    c2 = squared_cutoff(3.0)
    counts = cutoff_counts(offsets, R, c2)
    counts[2] = max(counts[2] - 1, 0) if counts[2] else 1  # the data no longer match
    one = np.zeros((1, 1), np.int64)
    shapes = np.array([[40, 8, 200]], np.int64)
    args = (Items(np.arange(5, dtype=np.int64), one * 0, one + 5, one[0] * 0, one[0] * 0, shapes),
            Source(offsets, Z, R, F, E, Q), PairRule(c2, True, counts), packed_outputs([BatchShape(*shapes[0])], 1, 1))
    with pytest.raises(ValueError, match="differ from the count"):
        if threaded:
            fill_packed_threaded(*args, 2)
        else:
            fill_packed(*args)


@pytest.mark.parametrize("cutoff", [None, 2.5])
def test_threaded_padded_equals_single_thread(cutoff):
    offsets, Z, R, F, E, Q = dataset(hi=12)
    na, M, k, slots = 12, 5, 2, 4
    c2 = squared_cutoff(cutoff) if cutoff else np.float32(0)

    def outputs():
        A = k * M * na
        return PaddedOut(
            np.zeros((slots, A), np.int32), np.zeros((slots, 3 * A), np.float32),
            np.zeros((slots, 3 * A), np.float32), np.zeros((slots, A), bool), np.zeros((slots, k * M)),
            np.zeros((slots, k * M)), np.full((slots, k * M), na, np.int32), np.zeros((slots, k * M), bool),
            np.zeros((slots, k * M), np.int64), np.zeros((slots, k * M * na * (na - 1)), bool),
        )  # fmt: skip

    one, many = outputs(), outputs()
    rng = np.random.default_rng(2)
    for _ in range(5):
        mols = rng.permutation(60)[: int(rng.integers(0, 6 * M))].astype(np.int64)
        cut = np.sort(rng.integers(0, len(mols) + 1, 5))
        cut = np.minimum(cut, np.arange(1, 6) * M)  # at most M molecules per batch
        bounds = np.concatenate([[0], np.maximum.accumulate(cut)])
        while (np.diff(bounds) > M).any():
            bounds = np.concatenate([[0], np.minimum(bounds[1:], bounds[:-1] + M)])
        lo, hi = np.zeros((3, k), np.int64), np.zeros((3, k), np.int64)
        flat = list(zip(bounds[:-1], bounds[1:]))[: 3 * k]
        for j, (a, b) in enumerate(flat):
            lo[j // k, j % k], hi[j // k, j % k] = a, b
        slot = rng.permutation(slots)[:3].astype(np.int64)
        shape = np.array([[M * na, M, M * na * (na - 1)]], np.int64)
        items = Items(mols, lo, hi, np.zeros(3, np.int64), slot, shape)
        source, pairs = Source(offsets, Z, R, F, E, Q), PairRule(c2, cutoff is not None, np.zeros(0, np.int64))
        fill_padded(items, source, pairs, one)
        fill_padded_threaded(items, source, pairs, many, threads=2)
        for x, y in zip(one, many):
            np.testing.assert_array_equal(x, y)
    assert one.N.sum() > 0  # molecules were written


def test_thread_count_is_capped_by_the_cores_and_needs_no_threading_layer(monkeypatch):
    """Threads are the module's own (no numba threading layer, no warning), at most one per core."""
    assert kernels.kernel_threads(1) == 1
    monkeypatch.setattr(kernels, "max_threads", lambda: 4)
    assert kernels.kernel_threads(3) == 3 and kernels.kernel_threads(16) == 4 and kernels.kernel_threads(0) == 1
    assert not hasattr(kernels, "threading_layer")


def test_claimed_fills_every_piece_and_raises_errors():
    """Every piece is filled (by the caller alone when the helpers are slow to start); an error in
    any thread is raised in the caller after the started threads finished."""
    seen = []

    def fill(first, last, forward, skip, done, fail):
        for j in range(last - first):
            p = first + j if forward else last - 1 - j
            if done[p]:
                if skip:
                    continue
                break
            if p == fail:
                raise ValueError(f"piece {p}")
            seen.append(p)
            done[p] = 1
        return 1.0

    for threads in (1, 2, 3):
        seen.clear()
        kernels.claimed(fill, 17, threads, (-1,))
        assert set(seen) == set(range(17))
    with pytest.raises(ValueError, match="piece 0"):
        kernels.claimed(fill, 8, 2, (0,))


@pytest.mark.parametrize("threads_faster", [False, True])
def test_thread_choice_settles_on_the_faster_mode_and_times_few_calls(threads_faster):
    from packedqdc.assembly import ThreadChoice

    choice = ThreadChoice()
    used, timed = [], 0
    for _ in range(5000):
        threaded, time_it = choice.next_call()
        used.append(threaded)
        if time_it:
            timed += 1
            choice.record(threaded, 1.0 if threaded == threads_faster else 2.0)
    steady = used[2 * ThreadChoice.WARMUP :]
    wrong = sum(u != threads_faster for u in steady)
    assert used[: 2 * ThreadChoice.WARMUP].count(True) == ThreadChoice.WARMUP  # the warm-up alternates
    if threads_faster:  # the single thread is probed every PROBE calls
        assert wrong == pytest.approx(len(steady) / ThreadChoice.PROBE, abs=2)
    else:  # losing threads are probed ever more rarely
        assert wrong <= 8
    assert timed < len(used) * (ThreadChoice.WINDOW + 1) / ThreadChoice.PROBE + 2 * ThreadChoice.WARMUP


def test_thread_choice_switches_when_the_other_mode_becomes_faster():
    from packedqdc.assembly import ThreadChoice

    choice = ThreadChoice()
    cost = {True: 2.0, False: 1.0}
    used = []
    for call in range(3000):
        if call == 1000:
            cost = {True: 1.0, False: 2.0}  # e.g. the other processes on the machine stopped
        threaded, time_it = choice.next_call()
        used.append(threaded)
        if time_it:
            choice.record(threaded, cost[threaded])
    assert sum(used[500:1000]) <= 1  # one probe of the threads at most
    assert sum(used[1200:]) >= len(used[1200:]) * (1 - 1.5 / ThreadChoice.PROBE)  # switched within 200 calls
