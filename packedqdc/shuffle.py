"""Seeded random orders of index arrays, fast at 100M molecules: epoch permutations and splits.

A loader's orders are a function of ``(seed, epoch)`` and of the *order version*, which names the
algorithms, so that a run saved by one version resumes with the same orders under a later one:

- version 1: numpy's ``Generator.shuffle`` for permutations and a permutation for the split. Both
  are memory-bound random swaps: 5.6 s for 100M molecules here.
- version 2 (the default): a bucket scatter shuffle (Rao 1961, Sandelius 1962: every molecule goes
  to one of ``n`` buckets uniformly at random, then each bucket is shuffled in cache; the result is
  a uniformly random permutation) and a split by selection sampling (Knuth's Algorithm S: one pass
  that takes each position with probability ``still needed / still left``, which gives a uniformly
  random subset of exactly the asked size, already sorted). Their random numbers come from a
  counter-based generator (SplitMix64 of ``key + i``) keyed by numbers drawn from the epoch's numpy
  generator, so every pass is a loop over the array in order.
"""

from __future__ import annotations

import numba
import numpy as np

from .errors import ConfigError
from .index import index_dtype, permutation, positions_where, run_threads, take_in_place

#: versions of the order algorithms; new loaders and runs take the latest
ORDER_VERSIONS = (1, 2)
ORDER_VERSION = 2
#: version 2's splits and shuffles work in segments of this many positions (one thread each)
SEGMENT = 1 << 24
#: version 2's buckets hold about this many entries (128 KiB of int32: a bucket shuffles in cache)
BUCKET_ENTRIES = 1 << 15

_NONE = np.zeros(0, np.int64)  # "no array" for the compiled kernels
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def check_version(version: int) -> int:
    """``version`` as an int, or ConfigError if it is not one of ``ORDER_VERSIONS``."""
    if int(version) not in ORDER_VERSIONS:
        raise ConfigError(f"order version must be one of {ORDER_VERSIONS}, got {version}")
    return int(version)


@numba.njit(inline="always")
def _mix(key: np.uint64, i: int) -> np.uint64:
    """SplitMix64's output for counter ``i`` of the stream ``key``: 64 random bits."""
    z = key + np.uint64(i + 1) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@numba.njit(inline="always")
def _unit(key: np.uint64, i: int) -> float:
    """A float64 uniform in [0, 1) for counter ``i`` of the stream ``key`` (53 random bits)."""
    return np.float64(_mix(key, i) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(inline="always")
def _bucket(key: np.uint64, i: int, n_buckets: np.uint64) -> int:
    return np.int64(((_mix(key, i) >> np.uint64(32)) * n_buckets) >> np.uint64(32))


@numba.njit(cache=True, nogil=True)
def _scatter_shuffle(values: np.ndarray, out: np.ndarray, carry1: np.ndarray, out1: np.ndarray,
                     carry2: np.ndarray, out2: np.ndarray, n_buckets: int, key_bucket: np.uint64,
                     key_swap: np.uint64) -> None:  # fmt: skip
    """``out`` = ``values`` in a uniformly random order (scatter into buckets, shuffle each bucket);
    ``out1[j] = carry1[out[j]]`` along (likewise ``out2``) unless ``carry1`` has length 0."""
    n = values.shape[0]
    has1, has2 = carry1.shape[0] > 0, carry2.shape[0] > 0
    nb = np.uint64(n_buckets)
    starts = np.zeros(n_buckets + 1, np.int64)
    for i in range(n):
        starts[_bucket(key_bucket, i, nb) + 1] += 1
    for b in range(n_buckets):
        starts[b + 1] += starts[b]
    fill = starts[:-1].copy()
    for i in range(n):
        b = _bucket(key_bucket, i, nb)
        v = values[i]
        out[fill[b]] = v
        if has1:
            out1[fill[b]] = carry1[v]
        if has2:
            out2[fill[b]] = carry2[v]
        fill[b] += 1
    for b in range(n_buckets):  # Fisher-Yates within the bucket; the counter is the global position
        lo = starts[b]
        for j in range(starts[b + 1] - 1, lo, -1):
            k = lo + np.int64(_unit(key_swap, j) * (j - lo + 1))
            out[j], out[k] = out[k], out[j]
            if has1:
                out1[j], out1[k] = out1[k], out1[j]
            if has2:
                out2[j], out2[k] = out2[k], out2[j]


@numba.njit(cache=True, nogil=True)
def _select(base: int, n: int, k: int, key: np.uint64, chosen: np.ndarray, rest: np.ndarray) -> None:
    """Algorithm S over the positions ``base .. base + n - 1``: ``chosen`` gets a uniformly random
    ``k`` of them, ``rest`` (unless it has length 0) the others, both ascending. Position ``i``
    draws the counter ``i`` of ``key``, so segments of one range can run apart."""
    need, a, b = k, 0, 0
    write_rest = rest.shape[0] > 0
    for i in range(n):
        if _unit(key, base + i) * (n - i) < need:
            chosen[a] = base + i
            a += 1
            need -= 1
            if need == 0 and not write_rest:
                return
        elif write_rest:
            rest[b] = base + i
            b += 1


def _keys(rng: np.random.Generator, count: int) -> list[np.uint64]:
    return [np.uint64(x) for x in rng.integers(0, 2**64, size=count, dtype=np.uint64)]


def shuffled(values: np.ndarray, rng: np.random.Generator, version: int = ORDER_VERSION) -> np.ndarray:
    """A new array of ``values`` (L,) in a uniformly random order drawn from ``rng``.

    Version 1 is ``values[rng.permutation(L)]``; version 2 the bucket scatter shuffle. Integer
    values keep their dtype. Both consume ``rng`` (version 2 draws two 64-bit keys from it).
    """
    return shuffled_with(values, (), rng, version)[0]


def shuffled_with(values: np.ndarray, by_value: tuple[np.ndarray, ...], rng: np.random.Generator,
                  version: int = ORDER_VERSION) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:  # fmt: skip
    """``shuffled(values, rng, version)`` and, for each array ``a`` of ``by_value`` (at most two,
    indexed by value: e.g. the atom counts of every dataset molecule), ``a[out]`` in ``a``'s dtype.

    Version 2 carries the arrays through the scatter, where ``values`` are read in order, instead
    of gathering them at random afterwards (2.4 s for 90M molecules' atom counts here).
    """
    values = np.asarray(values)
    L = values.shape[0]
    if len(by_value) > 2:
        raise ValueError("shuffled_with carries at most two arrays")
    if check_version(version) == 1:
        out = take_in_place(permutation(L, rng), values)
        return out, tuple(np.asarray(a)[out] for a in by_value)
    out = np.empty_like(values)
    carried = tuple(np.empty(L, np.asarray(a).dtype) for a in by_value)
    slots = [(np.asarray(a), c) for a, c in zip(by_value, carried)] + [(_NONE, _NONE)] * (2 - len(by_value))
    key_bucket, key_swap = _keys(rng, 2)
    n_buckets = int(min(max(L // BUCKET_ENTRIES, 1), 1 << 16))
    _scatter_shuffle(values, out, *slots[0], *slots[1], n_buckets, key_bucket, key_swap)
    return out, carried


def sample_positions(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random ``k`` of the positions ``0 .. n-1`` (ascending, ``index_dtype(n)``), by
    selection sampling (one pass, stopping at the last one taken)."""
    chosen = np.empty(k, index_dtype(n))
    (key,) = _keys(rng, 1)
    _select(0, n, k, key, chosen, chosen[:0])
    return chosen


def _segment_counts(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """(S,) how many of a uniformly random ``k`` of ``n`` positions fall in each ``SEGMENT`` of
    them (sequential hypergeometric draws; one segment from 10^9 positions, numpy's limit)."""
    if n < SEGMENT or n >= 10**9:
        return np.array([k], dtype=np.int64)
    counts = []
    for lo in range(0, n, SEGMENT):
        size = min(SEGMENT, n - lo)
        after = n - lo - size
        got = int(rng.hypergeometric(size, after, k)) if after and k else k
        counts.append(got)
        k -= got
    return np.array(counts, dtype=np.int64)


def split_positions(n: int, n_first: int, rng: np.random.Generator, version: int = ORDER_VERSION
                    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """A seeded random split of the positions ``0 .. n-1``: (``n_first`` of them, the other ones),
    each ascending, in ``index_dtype(n)``.

    Version 1: the first ``n_first`` entries of ``rng.permutation(n)`` and the rest (the seed's
    ``split_loader``). Version 2: the rest (the smaller part, usually) by selection sampling, in
    segments of ``SEGMENT`` positions whose shares are drawn first (hypergeometric), so that the
    segments run on ``index_threads()`` threads; the result does not depend on the threads.
    """
    dtype = index_dtype(n)
    first, rest = np.empty(n_first, dtype), np.empty(n - n_first, dtype)
    if check_version(version) == 1:
        perm = permutation(n, rng)
        in_rest = np.zeros(n, dtype=bool)
        in_rest[perm[n_first:]] = True
        del perm
        return positions_where(in_rest, False, first), positions_where(in_rest, True, rest)
    k = n - n_first
    per_segment = _segment_counts(n, k, rng)
    (key,) = _keys(rng, 1)
    size = SEGMENT if per_segment.shape[0] > 1 else max(n, 1)
    lengths = np.minimum(size, n - size * np.arange(per_segment.shape[0]))  # positions per segment
    at_rest = np.concatenate([[0], np.cumsum(per_segment)])
    at_first = np.concatenate([[0], np.cumsum(lengths - per_segment)])

    def segment(s: int) -> None:
        lo = s * size
        _select(lo, int(lengths[s]), int(per_segment[s]), key, rest[at_rest[s] : at_rest[s + 1]],
                first[at_first[s] : at_first[s + 1]])

    run_threads([lambda s=s: segment(s) for s in range(per_segment.shape[0])])
    return first, rest
