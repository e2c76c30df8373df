"""The O(N) index of a loader, compact: sizes, index arrays, permutations and plans at 100M molecules.

A loader needs, per molecule, its atom count (for plans) and its atom offset (for assembly). At
100M molecules the index files alone are 1.2 GB (``offsets.npy`` int64, ``n_atoms.npy`` int32),
so the loader keeps in memory only the atom counts in the smallest dtype that holds them (uint8
for molecules of < 256 atoms), reads the files in chunks into one reused buffer (no full copy, no
mapping that would count as resident memory), uses the offsets memory-mapped, and holds molecule
indices as int32 while the dataset has < 2^31 molecules. The planning passes (the greedy cut of an
epoch into batches, block bounds, split masks) are compiled loops over these arrays, so no int64
temporary of the epoch's length is made.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numba
import numpy as np

from .errors import FormatError

#: molecules read per chunk when the index files are scanned
CHUNK = 1 << 22
T = TypeVar("T")


def index_dtype(n: int) -> np.dtype:
    """dtype of molecule indices into a dataset of ``n`` molecules: int32 below 2^31, else int64."""
    return np.dtype(np.int32) if n < 2**31 else np.dtype(np.int64)


def count_dtype(largest: int) -> np.dtype:
    """The smallest unsigned dtype (uint8, uint16, uint32) holding counts up to ``largest``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if largest <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def compact(values: np.ndarray) -> np.ndarray:
    """``values`` (non-negative integers) in ``count_dtype`` of their maximum (no copy if already)."""
    dtype = count_dtype(int(values.max(initial=0)))
    return values if values.dtype == dtype else values.astype(dtype)


def atom_counts(ds, chunk: int = CHUNK) -> np.ndarray:  # noqa: ANN001 - PackedDataset
    """(N,) atoms of every molecule of ``ds``, uint8 (uint16 or uint32 when a molecule needs it).

    Computed from ``offsets`` and checked against ``n_atoms`` in one pass over the two files, read
    ``chunk`` molecules at a time into reused buffers (resident memory: the result plus two chunks).

    Raises:
        FormatError: a molecule whose ``n_atoms`` differs from its offsets, or that has no atoms.
    """
    n = ds.n_molecules
    for dtype in (np.uint8, np.uint16, np.uint32):
        out = np.empty(n, dtype)
        bad, too_large = _scan(ds, out, chunk)
        if bad >= 0:
            given = int(ds.n_atoms[bad])
            diff = int(ds.offsets[bad + 1] - ds.offsets[bad])
            raise FormatError(
                f"{ds.path / 'n_atoms.npy'}: molecule {bad} has n_atoms {given} but offsets give {diff} "
                f"(each molecule needs >= 1 atom); run 'packedqdc validate {ds.path}'"
            )
        if not too_large:
            return out
    raise FormatError(f"{ds.path / 'offsets.npy'}: a molecule has 2^32 atoms or more")


def _scan(ds, out: np.ndarray, chunk: int) -> tuple[int, bool]:  # noqa: ANN001
    """Fill ``out`` from the index files; (first bad molecule or -1, a count did not fit ``out``).

    Contiguous ranges of molecules are read by ``index_threads()`` threads (reads and the compiled
    check release the GIL), each with its own buffers and file handles."""
    n = out.shape[0]
    if n == 0:
        return -1, False
    n_chunks = -(-n // chunk)
    threads = min(index_threads(), n_chunks)
    step = -(-n_chunks // threads) * chunk  # whole chunks per thread
    ranges = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
    results = run_threads([lambda lo=lo, hi=hi: _scan_range(ds, out, lo, hi, chunk) for lo, hi in ranges])
    if any(too_large for _, too_large in results):  # the caller retries wider, where bad ones show
        return -1, True
    bad = [first for first, _ in results if first >= 0]
    return (min(bad) if bad else -1), False


def _scan_range(ds, out: np.ndarray, start: int, stop: int, chunk: int) -> tuple[int, bool]:  # noqa: ANN001
    """``_scan`` of molecules ``start .. stop``: stops at the first bad or too large one."""
    offsets_buf = np.empty(min(chunk, stop - start) + 1, np.int64)
    sizes_buf = np.empty(min(chunk, stop - start), ds.n_atoms.dtype)
    with _reader(ds.offsets) as read_offsets, _reader(ds.n_atoms) as read_sizes:
        for lo in range(start, stop, chunk):
            m = min(chunk, stop - lo)
            offs = read_offsets(lo, m + 1, offsets_buf)
            given = read_sizes(lo, m, sizes_buf)
            status = _fill_counts(offs, given, out[lo : lo + m])
            if status == -2:
                return -1, True
            if status >= 0:
                return lo + status, False
    return -1, False


def index_threads() -> int:
    """Threads of the index passes (reading the index, splits, shuffles): the CPUs, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def run_threads(tasks: list[Callable[[], T]]) -> list[T]:
    """The results of ``tasks``, in order, run on up to ``index_threads()`` threads (one: inline)."""
    if len(tasks) <= 1 or index_threads() == 1:
        return [task() for task in tasks]
    with ThreadPoolExecutor(max_workers=min(index_threads(), len(tasks))) as pool:
        return list(pool.map(lambda task: task(), tasks))


def read_entries(array: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``array[positions]`` of a memory-mapped .npy or raw array, each entry read with ``pread``:
    no page of the map is touched (a kernel that caches the file in large folios would map up to
    2 MiB per entry). Plain arrays are indexed."""
    positions = np.asarray(positions, dtype=np.int64)
    out = np.empty(positions.shape, array.dtype)
    with _reader(array) as read:
        for k, i in enumerate(positions.tolist()):
            read(i, 1, out[k : k + 1])
    return out


class _reader:
    """``read(first, count, buf)``: entries ``first .. first + count`` of a memory-mapped .npy
    array, read with ``readinto`` into the front of ``buf`` (no pages of the map are touched)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.file = None
        filename = getattr(array, "filename", None)
        if filename is not None and getattr(array, "offset", None) is not None and array.flags.c_contiguous:
            self.file = open(filename, "rb", buffering=0)  # noqa: SIM115 - closed in __exit__

    def __enter__(self):  # noqa: ANN204
        return self.read

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()

    def read(self, first: int, count: int, buf: np.ndarray) -> np.ndarray:
        view = buf[:count]
        if self.file is None:  # not a file map (e.g. an empty dataset): a plain copy
            view[:] = self.array[first : first + count]
            return view
        self.file.seek(self.array.offset + first * self.array.itemsize)
        raw = memoryview(view.view(np.uint8))
        got = 0
        while got < raw.nbytes:
            n = self.file.readinto(raw[got:])
            if not n:
                raise FormatError(f"{self.array.filename}: shorter than its header says")
            got += n
        return view


@numba.njit(cache=True, nogil=True)
def _fill_counts(offsets: np.ndarray, given: np.ndarray, out: np.ndarray) -> int:
    """out[i] = offsets[i+1] - offsets[i]; -1, or the first i where it differs from ``given`` or is
    < 1, or -2 when a count does not fit ``out``'s dtype."""
    top = np.iinfo(out.dtype).max
    for i in range(out.shape[0]):
        d = offsets[i + 1] - offsets[i]
        if d != given[i] or d < 1:
            return i
        if d > top:
            return -2
        out[i] = d
    return -1


def permutation(n: int, rng: np.random.Generator) -> np.ndarray:
    """``rng.permutation(n)`` (the same values, drawing the same numbers) in ``index_dtype(n)``.

    ``Generator.permutation(n)`` shuffles an int64 ``arange``; shuffling an int32 one draws the
    same numbers and gives the same order in half the memory.
    """
    out = np.arange(n, dtype=index_dtype(n))
    rng.shuffle(out)
    return out


@numba.njit(cache=True, nogil=True)
def take_in_place(positions: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``positions[i] = values[positions[i]]`` for every i (``values[positions]`` without a copy)."""
    for i in range(positions.shape[0]):
        positions[i] = values[positions[i]]
    return positions


@numba.njit(cache=True, nogil=True)
def greedy_plan(
    sizes: np.ndarray, pair_counts: np.ndarray, a_cap: int, p_cap: int, m_cap: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """The greedy cut of an epoch's molecules into batches, each as long as fits all three caps.

    Args:
        sizes: (L,) atoms of each molecule, in epoch order; pair_counts: (L,) pairs of each molecule
            (within a cutoff), in epoch order, or (0,) for all ordered pairs ``n (n - 1)``. Both
            are per position, so the pass reads them in order (a gather by dataset index at 100M
            molecules costs more than the whole cut).

    Returns:
        bounds: (n_batches + 1,) int64 positions; atoms, pairs: (n_batches,) int64 totals.
    """
    L = sizes.shape[0]
    bounds = np.empty(L + 1, np.int64)
    atoms = np.empty(L, np.int64)
    pairs = np.empty(L, np.int64)
    bounds[0] = 0
    n_b, a, p, m = 0, 0, 0, 0
    for j in range(L):
        n = np.int64(sizes[j])
        q = np.int64(pair_counts[j]) if pair_counts.shape[0] else n * (n - 1)
        if m > 0 and (a + n > a_cap or p + q > p_cap or m + 1 > m_cap):
            atoms[n_b], pairs[n_b] = a, p
            n_b += 1
            bounds[n_b] = j
            a, p, m = 0, 0, 0
        a += n
        p += q
        m += 1
    if m > 0:
        atoms[n_b], pairs[n_b] = a, p
        n_b += 1
        bounds[n_b] = L
    return bounds[: n_b + 1].copy(), atoms[:n_b].copy(), pairs[:n_b].copy()


@numba.njit(cache=True, nogil=True)
def totals(mols: np.ndarray, sizes: np.ndarray, pair_counts: np.ndarray) -> tuple[int, int, int, int]:
    """(largest atoms, largest pairs, sum of atoms, sum of pairs) of the molecules ``mols``, with
    ``sizes`` (N,) and ``pair_counts`` (N,) by dataset index (or (0,): all ordered pairs)."""
    top, top_pairs, atoms, pairs = 0, 0, 0, 0
    for j in range(mols.shape[0]):
        i = mols[j]
        n = np.int64(sizes[i])
        q = np.int64(pair_counts[i]) if pair_counts.shape[0] else n * (n - 1)
        top = max(top, n)
        top_pairs = max(top_pairs, q)
        atoms += n
        pairs += q
    return top, top_pairs, atoms, pairs


@numba.njit(cache=True, nogil=True)
def first_over(mols: np.ndarray, sizes: np.ndarray, pair_counts: np.ndarray, a_cap: int, p_cap: int) -> int:
    """Position in ``mols`` of the first molecule with more than ``a_cap`` atoms or ``p_cap`` pairs, or -1."""
    for j in range(mols.shape[0]):
        i = mols[j]
        n = np.int64(sizes[i])
        q = np.int64(pair_counts[i]) if pair_counts.shape[0] else n * (n - 1)
        if n > a_cap or q > p_cap:
            return j
    return -1


@numba.njit(cache=True, nogil=True)
def block_cuts(indices: np.ndarray, sizes: np.ndarray, block_atoms: int) -> np.ndarray:
    """(n_blocks + 1,) int64 bounds cutting ``indices`` into runs of about ``block_atoms`` atoms:
    a block ends after the molecule whose running atom total first reaches a multiple of
    ``block_atoms`` (the same cuts as a ``searchsorted`` of the cumulative sum)."""
    L = indices.shape[0]
    out = np.empty(L + 2, np.int64)
    out[0] = 0
    k = 1
    step = max(block_atoms, 1)
    target = step
    cum = 0
    for j in range(L):
        cum += np.int64(sizes[indices[j]])
        if cum >= target and j + 1 < L:
            out[k] = j + 1
            k += 1
            target = (cum // step + 1) * step  # the next multiple above cum (a while loop here crashed numba 0.68)
    out[k] = L
    return out[: k + 1].copy()


@numba.njit(cache=True, nogil=True)
def increasing(values: np.ndarray) -> bool:
    """Every entry larger than the one before (sorted, no repeats)."""
    for i in range(1, values.shape[0]):
        if values[i] <= values[i - 1]:
            return False
    return True


@numba.njit(cache=True, nogil=True)
def positions_where(mask: np.ndarray, value: bool, out: np.ndarray) -> np.ndarray:
    """The positions ``i`` (ascending) where ``mask[i] == value``, written into ``out`` (of the right
    length, any integer dtype): ``np.flatnonzero`` without an int64 result."""
    k = 0
    for i in range(mask.shape[0]):
        if mask[i] == value:
            out[k] = i
            k += 1
    return out[:k]
