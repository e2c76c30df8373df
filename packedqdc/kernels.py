"""Compiled batch-assembly kernels (numba): atoms, molecule fields, pair lists and padding.

An item is ``k`` batches of one shape class back to back (k = 1 for ``batches()``, k = D for
``stacked_batches``); batch ``b`` holds ``mols[lo:hi]`` (lo == hi: all padding). A kernel call
fills ``G`` items (``Items``), each into one row of its class's output buffers (``PackedOut`` or
``PaddedOut``: a ring of reused buffer sets), from the dataset (``Source``: memmap views, R and F
flat xyz), listing the pairs that ``PairRule`` says. A row may hold an earlier item: ``marks``
(packed) or the old ``N`` (padded) say how far that content reaches, and only that far is padding
rewritten; a fresh row is marked as dirty everywhere.

Every kernel has two drivers over the same compiled helpers: ``fill_*`` fills the items one after
the other in the calling thread; ``fill_*_threaded`` (plain Python) cuts the same work into
pieces and fills them side by side on a small persistent pool of this module's own threads
(``claimed``), calling ``nogil`` compiled functions (no numba threading layer is involved, so the
speed does not depend on which layer numba would pick: with the ``omp`` layer numba's own pool ran
75x slower here, and nothing needs to be fork-safe). Filling several items per call spreads the
fixed cost of a call (argument checks, waking the threads) over them. The checks that can fail run
before any item is written. All kernels release the GIL and are compiled at first use, not at
import (``cache=True``: later processes load them).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numba
import numpy as np
from numba.extending import overload

# Work of one atom in units of one pair when cutting a call's molecules into runs for threads: an
# atom is a random gather of 28 bytes from three files, a pair a sequential write of 8.
ATOM_WORK = 32

# Pieces a threaded call's work is cut into, per thread (see ``claimed``).
PIECES_PER_THREAD = 8


@numba.njit(cache=True, nogil=True, inline="always")
def within(R: np.ndarray, i: int, j: int, c2: np.float32) -> bool:
    """Atoms ``i`` and ``j`` of ``R`` (float32 (3n,), flat xyz) closer than ``sqrt(c2)``, in float32.

    The one test used both to count pairs ahead of an epoch and to build the lists, so the counts
    and the lists always agree.
    """
    dx = R[3 * i] - R[3 * j]
    dy = R[3 * i + 1] - R[3 * j + 1]
    dz = R[3 * i + 2] - R[3 * j + 2]
    return dx * dx + dy * dy + dz * dz < c2


@numba.njit(cache=True, nogil=True)
def count_within(offsets: np.ndarray, R: np.ndarray, c2: np.float32, out: np.ndarray) -> None:
    """``out[i]`` = ordered pairs i != j of molecule ``i`` closer than ``sqrt(c2)``; R (3T,) flat, out (N,) int64."""
    for m in range(out.shape[0]):
        o = offsets[m]
        n = offsets[m + 1] - o
        count = 0
        for d in range(n):
            for s in range(n):
                if s != d and within(R, o + d, o + s, c2):
                    count += 1
        out[m] = count


@numba.njit(cache=True, nogil=True)
def greedy_bounds(atoms: np.ndarray, pairs: np.ndarray, a_cap: int, p_cap: int, m_cap: int) -> np.ndarray:
    """(n_batches + 1,) int64 bounds of the greedy cut of (L,) int64 ``atoms``/``pairs`` under the caps.

    A batch takes molecules in order until the next one would pass a cap. One pass, compiled: the
    plan of an epoch is made in well under a microsecond per batch.
    """
    out = np.empty(atoms.shape[0] + 1, np.int64)
    out[0] = 0
    n_b, a, p, m = 0, 0, 0, 0
    for i in range(atoms.shape[0]):
        if m > 0 and (a + atoms[i] > a_cap or p + pairs[i] > p_cap or m + 1 > m_cap):
            n_b += 1
            out[n_b] = i
            a, p, m = 0, 0, 0
        a += atoms[i]
        p += pairs[i]
        m += 1
    if m > 0:
        n_b += 1
        out[n_b] = atoms.shape[0]
    return out[: n_b + 1].copy()


# --------------------------------------------------------------------------------------------
# Named structures the kernels take
#
# Every kernel that Python calls takes these structures; numba also accepts a plain tuple of the
# same fields in the same order, and the loader passes plain tuples because numba dispatches a
# plain tuple of arrays about 3 µs faster per call than a named one (the named structures are
# rebuilt inside, at no cost). The kernels' inner functions see only the named ones.
# --------------------------------------------------------------------------------------------


class Source(NamedTuple):
    """The dataset as the kernels read it (memmap views, never copied; ``T`` atoms, ``N`` molecules).

    Attributes:
        offsets: (N+1,) int64 atom offsets.
        Z: (T,) int32 atomic numbers. R: (3T,) float32 flat xyz (Å).
        F: (3T,) float32 flat forces, or (0,) when the dataset has none (zeros are written).
        E: (N,) float64 energies. Qtot: (N,) float64 total charges, or (0,) (zeros are written).
    """

    offsets: np.ndarray
    Z: np.ndarray
    R: np.ndarray
    F: np.ndarray
    E: np.ndarray
    Qtot: np.ndarray


class PairRule(NamedTuple):
    """Which pairs of a molecule are listed.

    Attributes:
        c2: float32 squared cutoff (``batching.squared_cutoff``), used when ``use_cutoff``.
        use_cutoff: list only pairs closer than ``sqrt(c2)``; False: all ordered pairs i != j.
        counts: packed layout: (N,) int64 pairs within the cutoff of every dataset molecule
            (``cutoff_pair_counts``, the plan's counts, checked against the lists), or (0,) for all
            ordered pairs; not used by the padded layout.
    """

    c2: np.float32
    use_cutoff: bool
    counts: np.ndarray


class Items(NamedTuple):
    """The ``G`` items of one call, each ``k`` batches of one class back to back.

    Attributes:
        mols: (L,) int64 dataset indices of the epoch, batch after batch.
        lo, hi: (G, k) int64; batch ``b`` of item ``g`` holds ``mols[lo[g, b]:hi[g, b]]`` (lo == hi:
            all padding).
        cls: (G,) int64 class of each item (row of ``shapes``); all 0 in the padded layout.
        row: (G,) int64 output row each item is written to.
        shapes: (C, 3) int64 ``(A, M, P)`` of one batch of each class; padded: one class
            ``(M * na, M, M * na * (na - 1))``.
    """

    mols: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    cls: np.ndarray
    row: np.ndarray
    shapes: np.ndarray


class PackedOut(NamedTuple):
    """Output buffers of the packed layout: ``rows`` rows of ``k`` times the largest class's sizes.

    An item of class ``(A, M, P)`` in row ``r`` uses the first ``k * A`` (``k * M``, ``k * P``)
    entries of the row. Attributes (all (rows, ...)): Z int32, R, F float32 (3 per atom),
    atom_mask bool, batch_segments int32 (per atom); E, Qtot float64, N int32, mol_mask bool,
    mol_idx int64 (per molecule slot); dst_idx, src_idx int32, pair_mask bool (per pair slot);
    marks (rows, k, 4) int64: real atoms, molecules, pairs of the content of each batch of each row
    and how far its pair padding is known valid (-1: a fresh row, dirty everywhere); owner (rows,)
    int64 class of each row's content (-1: none). The kernels update marks and owner.
    """

    Z: np.ndarray
    R: np.ndarray
    F: np.ndarray
    atom_mask: np.ndarray
    batch_segments: np.ndarray
    E: np.ndarray
    Qtot: np.ndarray
    N: np.ndarray
    mol_mask: np.ndarray
    mol_idx: np.ndarray
    dst_idx: np.ndarray
    src_idx: np.ndarray
    pair_mask: np.ndarray
    marks: np.ndarray
    owner: np.ndarray


class PackedRow(NamedTuple):
    """One item's part of ``PackedOut``'s rows: flat (k * A,), (3 * k * A,), (k * M,), (k * P,) views."""

    Z: np.ndarray
    R: np.ndarray
    F: np.ndarray
    atom_mask: np.ndarray
    batch_segments: np.ndarray
    E: np.ndarray
    Qtot: np.ndarray
    N: np.ndarray
    mol_mask: np.ndarray
    mol_idx: np.ndarray
    dst_idx: np.ndarray
    src_idx: np.ndarray
    pair_mask: np.ndarray


class PaddedOut(NamedTuple):
    """Output buffers of the padded layout: (rows, k * size) arrays of its one class.

    As ``PackedOut`` without batch_segments, dst_idx, src_idx (shared constants) and marks: the old
    ``N`` of a slot says how far its previous content reaches (a fresh row has ``N = na``).
    pair_mask is (rows, k * M * na * (na - 1)).
    """

    Z: np.ndarray
    R: np.ndarray
    F: np.ndarray
    atom_mask: np.ndarray
    E: np.ndarray
    Qtot: np.ndarray
    N: np.ndarray
    mol_mask: np.ndarray
    mol_idx: np.ndarray
    pair_mask: np.ndarray


class Placement(NamedTuple):
    """Where the molecules of a packed call go (``_prepare_packed``).

    Attributes:
        a_at, p_at: (G, k, M+1) int64 first atom and pair slot of each molecule, and at ``m_real``
            the ends (batch-local).
        found: (G, k, M) int64 pairs each molecule turned out to have (checked against ``p_at``).
    """

    a_at: np.ndarray
    p_at: np.ndarray
    found: np.ndarray


class Pieces(NamedTuple):
    """A packed call's molecules cut into pieces of about equal work for threads (``_cut_pieces``).

    Attributes:
        unit_g, unit_b, unit_m: (U,) int64 item, batch and molecule of each of the call's U molecules.
        ends: (G * k,) int64 index after the last unit of each batch.
        cuts: (pieces + 1,) int64 piece bounds in units.
    """

    unit_g: np.ndarray
    unit_b: np.ndarray
    unit_m: np.ndarray
    ends: np.ndarray
    cuts: np.ndarray


class PackedWork(NamedTuple):
    """All a thread needs to fill pieces of a packed call."""

    items: Items
    source: Source
    pairs: PairRule
    out: PackedOut
    place: Placement
    pieces: Pieces


class PaddedWork(NamedTuple):
    """All a thread needs to fill items of a padded call (a piece is an item)."""

    items: Items
    source: Source
    pairs: PairRule
    out: PaddedOut


# --------------------------------------------------------------------------------------------
# Per-molecule pieces
# --------------------------------------------------------------------------------------------


# The per-molecule helpers take plain arrays, not the structures: they run in loops over molecules,
# and every read of a structure's field there would take and drop a reference to the array (an
# atomic increment and decrement each), which made assembly 25% slower. The callers unpack the
# structures once, outside their loops.


@numba.njit(cache=True, nogil=True, inline="always")
def _touch(
    i: int, offsets: np.ndarray, Zs: np.ndarray, Rs: np.ndarray, Fs: np.ndarray, Es: np.ndarray, Qs: np.ndarray
) -> float:  # fmt: skip
    """Load one value per cache line of molecule ``i`` (arrays of ``Source``) and return their
    (meaningless) sum.

    Molecules sit at random places in the files; touching all of a run's molecules before copying
    any lets the CPU fetch their lines at once instead of one molecule after the other (about 2x
    faster assembly).
    """
    o = offsets[i]
    n = offsets[i + 1] - o
    acc = Es[i] + (Qs[i] if Qs.shape[0] else 0.0)
    for u in range(0, n, 16):
        acc += Zs[o + u]
    for u in range(0, 3 * n, 16):
        acc += Rs[3 * o + u] + (Fs[3 * o + u] if Fs.shape[0] else 0.0)
    return acc


@numba.njit(cache=True, nogil=True, inline="always")
def _copy_atoms(
    o: int, n: int, a: int, Zs: np.ndarray, Rs: np.ndarray, Fs: np.ndarray,
    Z: np.ndarray, R: np.ndarray, F: np.ndarray, atom_mask: np.ndarray,
) -> None:  # fmt: skip
    """Atoms ``o .. o+n`` of the sources into slots ``a .. a+n`` (F zeros when ``Fs`` is empty)."""
    Z[a : a + n] = Zs[o : o + n]
    R[3 * a : 3 * (a + n)] = Rs[3 * o : 3 * (o + n)]
    if Fs.shape[0]:
        F[3 * a : 3 * (a + n)] = Fs[3 * o : 3 * (o + n)]
    else:
        F[3 * a : 3 * (a + n)] = 0.0
    atom_mask[a : a + n] = True


@numba.njit(cache=True, nogil=True, inline="always")
def _clear_atoms(lo: int, hi: int, Z: np.ndarray, R: np.ndarray, F: np.ndarray, atom_mask: np.ndarray) -> None:
    """Padding atoms in slots ``lo .. hi`` (nothing when hi <= lo): zeros, mask False."""
    if hi > lo:
        Z[lo:hi] = 0
        R[3 * lo : 3 * hi] = 0.0
        F[3 * lo : 3 * hi] = 0.0
        atom_mask[lo:hi] = False


@numba.njit(cache=True, nogil=True)
def _molecule_pairs(
    o: int, n: int, first: int, p: int, most: int, Rs: np.ndarray, c2: np.float32, use_cutoff: bool,
    dst: np.ndarray, src: np.ndarray,
) -> int:  # fmt: skip
    """Pairs of one molecule (atoms ``o .. o+n`` of ``Rs``, slots from ``first``) into ``dst``/``src`` from ``p``.

    All ordered pairs i != j in rows of equal ``dst`` (``dst`` sorted, the order of
    ``pair_templates``), or with ``use_cutoff`` only those closer than ``sqrt(c2)``, of which at
    most ``most`` are written. Returns the molecule's pair count (more than ``most``: the data no
    longer match the counts made ahead of the epoch). Not inlined on purpose: compiled on its own,
    the row loops vectorise (inlined into a batch kernel they ran about 3x slower).
    """
    if not use_cutoff:
        row = n - 1
        out_d, out_s = dst[p : p + n * row], src[p : p + n * row]
        base = np.int32(first)
        q = 0
        for d in range(n):
            dd = np.int32(d)
            for s in range(row):
                ss = np.int32(s)
                out_d[q + s] = base + dd
                out_s[q + s] = base + ss + (ss >= dd)  # s, skipping d
            q += row
        return n * row
    found = 0
    for d in range(n):
        for s in range(n):
            if s != d and within(Rs, o + d, o + s, c2):
                if found < most:
                    dst[p + found] = first + d
                    src[p + found] = first + s
                found += 1
    return found


# --------------------------------------------------------------------------------------------
# Packed layout
#
# A call fills ``G`` items (``Items``): item ``g`` of class ``cls[g]`` goes into row ``row[g]`` of
# ``PackedOut``. Budgets are checked for every item before anything is written (``_prepare_packed``,
# which also writes the padding); the molecules are then filled one after the other
# (``fill_packed``) or side by side on the module's threads (``fill_packed_threaded``).
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, inline="always")
def _packed_row(out: PackedOut, r: int, A: int, M: int, P: int) -> PackedRow:
    """The first ``A`` atom, ``M`` molecule and ``P`` pair entries of row ``r`` of ``out``."""
    return PackedRow(
        out.Z[r, :A], out.R[r, : 3 * A], out.F[r, : 3 * A], out.atom_mask[r, :A], out.batch_segments[r, :A],
        out.E[r, :M], out.Qtot[r, :M], out.N[r, :M], out.mol_mask[r, :M], out.mol_idx[r, :M],
        out.dst_idx[r, :P], out.src_idx[r, :P], out.pair_mask[r, :P],
    )  # fmt: skip


@numba.njit(cache=True, nogil=True, inline="always")
def _item_row(items: Items, out: PackedOut, g: int) -> PackedRow:
    """The part of its row that item ``g`` (``k`` batches of its class) fills."""
    k = items.lo.shape[1]
    c = items.cls[g]
    return _packed_row(out, items.row[g], k * items.shapes[c, 0], k * items.shapes[c, 1], k * items.shapes[c, 2])


@numba.njit(cache=True, nogil=True)
def _place_batch(
    mols: np.ndarray, lo: int, hi: int, source: Source, pairs: PairRule, A: int, M: int, P: int,
    a_at: np.ndarray, p_at: np.ndarray,
) -> None:  # fmt: skip
    """Slots of the molecules ``mols[lo:hi]`` of one packed batch of shape (A, M, P).

    Fills ``a_at``, ``p_at``: batch-local first atom and pair slot of molecule ``m``, and at
    ``m_real`` the ends. Raises ValueError over a budget (one atom and one molecule slot always
    stay padding).
    """
    m_real = hi - lo
    if m_real > M - 1:
        raise ValueError("batch exceeds its molecule budget")
    counts, offsets = pairs.counts, source.offsets
    a, p = 0, 0
    for m in range(m_real):
        i = mols[lo + m]
        n = offsets[i + 1] - offsets[i]
        a_at[m], p_at[m] = a, p
        a += n
        p += counts[i] if counts.shape[0] else n * (n - 1)
    a_at[m_real], p_at[m_real] = a, p
    if a > A - 1 or p > P:
        raise ValueError("batch exceeds its atom or pair budget")


@numba.njit(cache=True, nogil=True)
def _fill_molecules(
    mols: np.ndarray, lo: int, first: int, last: int, source: Source, pairs: PairRule,
    a_at: np.ndarray, p_at: np.ndarray, found: np.ndarray, b: int, k: int, out: PackedRow,
) -> float:  # fmt: skip
    """Molecules ``first .. last`` of batch ``b`` (at ``mols[lo:]``) of an item into the slots
    ``_place_batch`` gave (``a_at``, ``p_at`` of that batch).

    ``out`` is the item's part of its row (``k`` batches). ``found[m]`` receives the pairs
    molecule ``m`` has, for the caller to check against ``p_at``. Returns the touch sum.
    """
    offsets, Zs, Rs, Fs, Es, Qs = source
    c2, use_cutoff = pairs.c2, pairs.use_cutoff
    Z, R, F, atom_mask, seg, E, Qtot, N, mol_mask, mol_idx, dst, src, _ = out
    a0, m0, p0 = b * (Z.shape[0] // k), b * (E.shape[0] // k), b * (dst.shape[0] // k)
    acc = 0.0
    for m in range(first, last):
        acc += _touch(mols[lo + m], offsets, Zs, Rs, Fs, Es, Qs)
    for m in range(first, last):
        i = mols[lo + m]
        o = offsets[i]
        n = offsets[i + 1] - o
        a = a0 + a_at[m]
        E[m0 + m] = Es[i]
        Qtot[m0 + m] = Qs[i] if Qs.shape[0] else 0.0
        N[m0 + m] = n
        mol_mask[m0 + m] = True
        mol_idx[m0 + m] = i
        _copy_atoms(o, n, a, Zs, Rs, Fs, Z, R, F, atom_mask)
        seg[a : a + n] = m
        most = p_at[m + 1] - p_at[m]
        found[m] = _molecule_pairs(o, n, a_at[m], p0 + p_at[m], most, Rs, c2, use_cutoff, dst, src)
    return acc


@numba.njit(cache=True, nogil=True)
def _pad_batch(b: int, m_real: int, a_real: int, p_real: int, out: PackedRow, marks: np.ndarray) -> None:
    """Padding of batch ``b`` of an item (``out``: its part of the row, ``k`` batches; ``marks``:
    (k, 4), the row's) that will hold ``m_real`` molecules, ``a_real`` atoms and ``p_real`` pairs:
    rewrite what the old content (``marks[b]``) dirtied, mark the real pairs, and update
    ``marks[b]``. Touches no slot a real molecule takes.
    """
    Z, R, F, atom_mask, seg, E, Qtot, N, mol_mask, mol_idx, dst, src, pair_mask = out
    k = marks.shape[0]
    A, M, P = Z.shape[0] // k, E.shape[0] // k, dst.shape[0] // k
    a0, m0, p0 = b * A, b * M, b * P
    a, p = a0 + a_real, p0 + p_real
    fresh = marks[b, 0] < 0
    old_a = a0 + (A if fresh else marks[b, 0])
    old_m = m0 + (M if fresh else marks[b, 1])
    _clear_atoms(a, old_a, Z, R, F, atom_mask)
    seg[a:old_a] = M - 1
    E[m0 + m_real : old_m] = 0.0
    Qtot[m0 + m_real : old_m] = 0.0
    N[m0 + m_real : old_m] = 0
    mol_mask[m0 + m_real : old_m] = False
    mol_idx[m0 + m_real : old_m] = -1
    # pairs [p, p0 + P) must become padding. Known to be padding already: [old_p, valid) (the row
    # may have served a class with a smaller or larger pair budget; beyond `valid` is unknown).
    old_p = p0 + (0 if fresh else marks[b, 2])
    valid = p0 + (0 if fresh else marks[b, 3])
    keep_lo, keep_hi = max(p, old_p), min(p0 + P, valid)
    if keep_lo < keep_hi:
        _pad_pairs(p, keep_lo, A - 1, dst, src, pair_mask)
        _pad_pairs(keep_hi, p0 + P, A - 1, dst, src, pair_mask)
    else:
        _pad_pairs(p, p0 + P, A - 1, dst, src, pair_mask)
    pair_mask[old_p:p] = True  # [p0, old_p) is True already
    marks[b, 0], marks[b, 1], marks[b, 2] = a_real, m_real, p_real
    marks[b, 3] = max(P, valid - p0) if p0 + P >= old_p else P  # [p0 + P, valid) stayed padding


@numba.njit(cache=True, nogil=True, inline="always")
def _pad_pairs(lo: int, hi: int, pad: int, dst: np.ndarray, src: np.ndarray, pair_mask: np.ndarray) -> None:
    """Pair slots ``lo .. hi`` (nothing when hi <= lo) become padding: ``pad`` -> ``pad``, masked out."""
    if hi > lo:
        dst[lo:hi] = pad
        src[lo:hi] = pad
        pair_mask[lo:hi] = False


@numba.njit(cache=True, nogil=True)
def _prepare_packed_call(items: Items, source: Source, pairs: PairRule, out: PackedOut) -> tuple:
    """``_prepare_packed`` for a call from Python: plain tuples accepted, and the ``Placement`` given
    back as a plain tuple (a named one costs ~1 µs to hand to Python)."""
    a_at, p_at, found = _prepare_packed(Items(*items), Source(*source), PairRule(*pairs), PackedOut(*out))
    return a_at, p_at, found


@numba.njit(cache=True, nogil=True)
def _prepare_packed(items: Items, source: Source, pairs: PairRule, out: PackedOut) -> Placement:
    """Check and place every batch of every item, and write its padding.

    A row that held another class keeps its marks only when the padding they describe is valid for
    this one: one batch per item, same atom and molecule budgets (padding values A - 1, M - 1 and
    the batch's place in the row are the same); otherwise the row counts as fresh.
    """
    shapes = items.shapes
    G, k = items.lo.shape
    m_most = shapes[:, 1].max()
    a_at = np.empty((G, k, m_most + 1), np.int64)
    p_at = np.empty((G, k, m_most + 1), np.int64)
    for g in range(G):
        A, M, P = shapes[items.cls[g], 0], shapes[items.cls[g], 1], shapes[items.cls[g], 2]
        for b in range(k):
            _place_batch(items.mols, items.lo[g, b], items.hi[g, b], source, pairs, A, M, P, a_at[g, b], p_at[g, b])
    for g in range(G):
        c, r = items.cls[g], items.row[g]
        before = out.owner[r]
        if before != c:
            if before < 0 or k > 1 or shapes[before, 0] != shapes[c, 0] or shapes[before, 1] != shapes[c, 1]:
                out.marks[r] = -1
            out.owner[r] = c
        row = _item_row(items, out, g)
        for b in range(k):
            m_real = items.hi[g, b] - items.lo[g, b]
            _pad_batch(b, m_real, a_at[g, b, m_real], p_at[g, b, m_real], row, out.marks[r])
    return Placement(a_at, p_at, np.empty((G, k, m_most), np.int64))


@numba.njit(cache=True, nogil=True)
def _fill_packed_run(
    g: int, b: int, first: int, last: int, items: Items, source: Source, pairs: PairRule, out: PackedOut,
    place: Placement,
) -> float:  # fmt: skip
    """Molecules ``first .. last`` of batch ``b`` of item ``g`` into its row; return the touch sum."""
    return _fill_molecules(
        items.mols, items.lo[g, b], first, last, source, pairs, place.a_at[g, b], place.p_at[g, b],
        place.found[g, b], b, items.lo.shape[1], _item_row(items, out, g),
    )  # fmt: skip


@numba.njit(cache=True, nogil=True)
def _check_found(items: Items, place: Placement) -> None:
    """ValueError if a molecule's pairs within the cutoff differ from the count the plan used."""
    items, place = Items(*items), Placement(*place)
    lo, hi, p_at, found = items.lo, items.hi, place.p_at, place.found
    G, k = lo.shape
    for g in range(G):
        for b in range(k):
            for m in range(hi[g, b] - lo[g, b]):
                if found[g, b, m] != p_at[g, b, m + 1] - p_at[g, b, m]:
                    raise ValueError("a molecule's pairs within the cutoff differ from the count made for the epoch")


@numba.njit(cache=True, nogil=True)
def fill_packed(items: Items, source: Source, pairs: PairRule, out: PackedOut) -> float:
    """Fill the ``G`` packed ``items`` into ``out`` in place, in the calling thread.

    Returns the (meaningless) touch sum. Raises ValueError, before anything is written, when a
    batch exceeds its class's budgets; after, when a molecule's pairs within the cutoff differ from
    ``pairs.counts``. Plain tuples in the structures' field order are accepted.
    """
    items, source, pairs, out = Items(*items), Source(*source), PairRule(*pairs), PackedOut(*out)
    place = _prepare_packed(items, source, pairs, out)
    acc = 0.0
    for g in range(items.lo.shape[0]):
        for b in range(items.lo.shape[1]):
            acc += _fill_packed_run(g, b, 0, items.hi[g, b] - items.lo[g, b], items, source, pairs, out, place)
    _check_found(items, place)
    return acc


@numba.njit(cache=True, nogil=True)
def _cut_pieces(items: Items, place: Placement, pieces: int) -> tuple:
    """The molecules of a call, item after item and batch after batch, cut into ``pieces`` pieces of
    about equal work (pairs plus ``ATOM_WORK`` per atom)."""
    items, place = Items(*items), Placement(*place)
    lo, hi, a_at, p_at = items.lo, items.hi, place.a_at, place.p_at
    G, k = lo.shape
    U = 0
    for g in range(G):
        for b in range(k):
            U += hi[g, b] - lo[g, b]
    unit_g, unit_b, unit_m = np.empty(U, np.int64), np.empty(U, np.int64), np.empty(U, np.int64)
    start = np.empty(U + 1, np.int64)  # work before each unit
    ends = np.empty(G * k, np.int64)
    u, done = 0, 0
    for g in range(G):
        for b in range(k):
            for m in range(hi[g, b] - lo[g, b]):
                unit_g[u], unit_b[u], unit_m[u], start[u] = g, b, m, done
                done += p_at[g, b, m + 1] - p_at[g, b, m] + ATOM_WORK * (a_at[g, b, m + 1] - a_at[g, b, m])
                u += 1
            ends[g * k + b] = u
    start[U] = done
    cuts = np.searchsorted(start, (np.arange(pieces + 1) * done) // pieces)
    cuts[pieces] = U
    return unit_g, unit_b, unit_m, ends, cuts  # a plain tuple of ``Pieces``' fields, for Python


@numba.njit(cache=True, nogil=True)
def _fill_packed_piece(piece: int, work: PackedWork) -> float:
    """Units ``cuts[piece] .. cuts[piece + 1]`` of ``_cut_pieces`` (a piece may span batches and items)."""
    unit_g, unit_b, unit_m, ends, cuts = work.pieces
    k = work.items.lo.shape[1]
    u, u1 = cuts[piece], cuts[piece + 1]
    acc = 0.0
    while u < u1:  # one stretch of one batch at a time
        g, b = unit_g[u], unit_b[u]
        stop = min(u1, ends[g * k + b])
        first = unit_m[u]
        acc += _fill_packed_run(g, b, first, first + stop - u, work.items, work.source, work.pairs, work.out, work.place)
        u = stop
    return acc


@numba.njit(cache=True, nogil=True)
def _fill_packed_claimed(
    first: int, last: int, forward: bool, skip: bool, done: np.ndarray, items: Items, source: Source,
    pairs: PairRule, out: PackedOut, place: Placement, pieces: Pieces,
) -> float:  # fmt: skip
    """``_claim_pieces`` of a packed call (see ``claimed``)."""
    work = PackedWork(Items(*items), Source(*source), PairRule(*pairs), PackedOut(*out), Placement(*place),
                      Pieces(*pieces))  # fmt: skip
    return _claim_pieces(first, last, forward, skip, done, work)


def fill_packed_threaded(items: Items, source: Source, pairs: PairRule, out: PackedOut, threads: int) -> float:
    """``fill_packed`` on up to ``threads`` threads (the caller and ``threads - 1`` of the pool): the
    call's molecules are cut into pieces of about equal work (a piece may span batches and items),
    shared out by ``claimed``; padding is written before, in the calling thread (it touches no slot a
    molecule takes)."""
    place = _prepare_packed_call(items, source, pairs, out)
    pieces = PIECES_PER_THREAD * threads
    cut = _cut_pieces(items, place, pieces)
    work = (tuple(items), tuple(source), tuple(pairs), tuple(out), place, cut)
    acc = claimed(_fill_packed_claimed, pieces, threads, work)
    _check_found(items, place)
    return acc


# --------------------------------------------------------------------------------------------
# Padded layout (one class; no marks: the old N says how far a slot's content reaches)
# --------------------------------------------------------------------------------------------


class PaddedRow(NamedTuple):
    """One item's row of ``PaddedOut``: flat views of (k * M * na,) atoms, (k * M,) slots."""

    Z: np.ndarray
    R: np.ndarray
    F: np.ndarray
    atom_mask: np.ndarray
    E: np.ndarray
    Qtot: np.ndarray
    N: np.ndarray
    mol_mask: np.ndarray
    mol_idx: np.ndarray
    pair_mask: np.ndarray


@numba.njit(cache=True, nogil=True)
def _check_padded(items: Items, source: Source) -> None:
    """ValueError if a batch has more than ``M`` molecules or a molecule more than ``na`` atoms."""
    items, source = Items(*items), Source(*source)
    mols, lo, hi, offsets = items.mols, items.lo, items.hi, source.offsets
    M = items.shapes[0, 1]
    na = items.shapes[0, 0] // M
    G, k = lo.shape
    for g in range(G):
        for b in range(k):
            if hi[g, b] - lo[g, b] > M:
                raise ValueError("batch exceeds its molecule slots")
            for m in range(lo[g, b], hi[g, b]):
                i = mols[m]
                if offsets[i + 1] - offsets[i] > na:
                    raise ValueError("molecule larger than num_atoms")


@numba.njit(cache=True, nogil=True)
def _fill_padded_item(g: int, items: Items, source: Source, pairs: PairRule, out: PaddedOut) -> float:
    """Item ``g`` (``k`` batches of ``M`` slots of ``na`` atoms) into its row; return the touch sum.

    The old ``N`` of each slot says how far its previous content reaches (a fresh row has
    ``N = na``). ``pair_mask`` is (k*M*na*(na-1),) per row: slot ``j`` owns rows ``d`` of ``na - 1``
    entries, row ``d`` listing ``s = 0 .. na-1`` without ``d`` (the order of ``pair_templates``).
    """
    s = items.row[g]
    row = PaddedRow(out.Z[s], out.R[s], out.F[s], out.atom_mask[s], out.E[s], out.Qtot[s], out.N[s],
                    out.mol_mask[s], out.mol_idx[s], out.pair_mask[s])  # fmt: skip
    lo, hi, mols = items.lo[g], items.hi[g], items.mols
    M = items.shapes[0, 1]
    na = items.shapes[0, 0] // M
    c2, use_cutoff = pairs.c2, pairs.use_cutoff
    offsets, Zs, Rs, Fs, Es, Qs = source
    Z, R, F, atom_mask, E, Qtot, N, mol_mask, mol_idx, pair_mask = row
    per = na * (na - 1)
    acc = 0.0
    for slot in range(N.shape[0]):
        b, j = slot // M, slot % M
        if j < hi[b] - lo[b]:
            acc += _touch(mols[lo[b] + j], offsets, Zs, Rs, Fs, Es, Qs)
    for slot in range(N.shape[0]):
        b, j = slot // M, slot % M
        old = N[slot]
        n, o = 0, 0
        if j < hi[b] - lo[b]:
            i = mols[lo[b] + j]
            o = offsets[i]
            n = offsets[i + 1] - o
            E[slot] = Es[i]
            Qtot[slot] = Qs[i] if Qs.shape[0] else 0.0
            mol_mask[slot] = True
            mol_idx[slot] = i
            _copy_atoms(o, n, slot * na, Zs, Rs, Fs, Z, R, F, atom_mask)
        else:
            E[slot] = 0.0
            Qtot[slot] = 0.0
            mol_mask[slot] = False
            mol_idx[slot] = -1
        N[slot] = n
        _clear_atoms(slot * na + n, slot * na + old, Z, R, F, atom_mask)
        top = max(n, old)  # rows and columns beyond it are False already
        for d in range(top):
            mask = pair_mask[slot * per + d * (na - 1) : slot * per + d * (na - 1) + top - 1]
            if d >= n:
                mask[:] = False
            elif use_cutoff:
                for c in range(top - 1):
                    src = c if c < d else c + 1
                    mask[c] = src < n and within(Rs, o + d, o + src, c2)
            else:
                mask[: n - 1] = True
                mask[n - 1 :] = False
    return acc


@numba.njit(cache=True, nogil=True)
def fill_padded(items: Items, source: Source, pairs: PairRule, out: PaddedOut) -> float:
    """Fill the ``G`` padded ``items`` (rows ``items.row``) into ``out``, one after the other.

    As ``fill_packed``, with one class ``(M * na, M, M * na * (na - 1))``. Returns the touch sum.
    """
    items, source, pairs, out = Items(*items), Source(*source), PairRule(*pairs), PaddedOut(*out)
    _check_padded(items, source)
    acc = 0.0
    for g in range(items.lo.shape[0]):
        acc += _fill_padded_item(g, items, source, pairs, out)
    return acc


@numba.njit(cache=True, nogil=True)
def _fill_padded_piece(piece: int, work: PaddedWork) -> float:
    """A padded call's piece is one item."""
    return _fill_padded_item(piece, work.items, work.source, work.pairs, work.out)


@numba.njit(cache=True, nogil=True)
def _fill_padded_claimed(
    first: int, last: int, forward: bool, skip: bool, done: np.ndarray, items: Items, source: Source,
    pairs: PairRule, out: PaddedOut,
) -> float:  # fmt: skip
    """``_claim_pieces`` of a padded call (see ``claimed``)."""
    work = PaddedWork(Items(*items), Source(*source), PairRule(*pairs), PaddedOut(*out))
    return _claim_pieces(first, last, forward, skip, done, work)


def fill_padded_threaded(items: Items, source: Source, pairs: PairRule, out: PaddedOut, threads: int = 2) -> float:
    """``fill_padded`` with the items shared out over up to ``threads`` threads by ``claimed``."""
    _check_padded(items, source)
    G = len(items[1])
    work = (tuple(items), tuple(source), tuple(pairs), tuple(out))
    return claimed(_fill_padded_claimed, G, min(threads, G), work)


# --------------------------------------------------------------------------------------------
# Pieces claimed by threads (one loop for both layouts)
# --------------------------------------------------------------------------------------------


def _fill_piece(piece: int, work: PackedWork | PaddedWork) -> float:
    """Fill piece ``piece`` of ``work`` (compiled only: ``_fill_piece_impl`` picks the layout)."""
    raise NotImplementedError("compiled code only")


@overload(_fill_piece, jit_options={"nogil": True})
def _fill_piece_impl(piece, work):  # noqa: ANN001, ANN202 - numba types
    if work.instance_class is PackedWork:
        return lambda piece, work: _fill_packed_piece(piece, work)
    if work.instance_class is PaddedWork:
        return lambda piece, work: _fill_padded_piece(piece, work)
    return None


@numba.njit(cache=True, nogil=True, inline="always")
def _claim_pieces(first: int, last: int, forward: bool, skip: bool, done: np.ndarray, work) -> float:  # noqa: ANN001
    """Pieces ``first .. last`` of ``work`` not yet ``done``, forward or backward, marking each filled
    one; a piece found done is skipped (``skip``) or ends the loop. See ``claimed``."""
    acc = 0.0
    for j in range(last - first):
        piece = first + j if forward else last - 1 - j
        if done[piece]:
            if skip:
                continue
            break
        acc += _fill_piece(piece, work)
        done[piece] = 1
    return acc


# --------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------


_pool_lock = threading.Lock()
_pool: list[tuple[int, ThreadPoolExecutor]] = []  # (pid, pool): a forked child makes its own


def _executor() -> ThreadPoolExecutor:
    """The module's persistent pool of assembly threads (created on first use, again after a fork)."""
    with _pool_lock:
        if not _pool or _pool[0][0] != os.getpid():
            _pool[:] = [(os.getpid(), ThreadPoolExecutor(max_workers=max_threads(), thread_name_prefix="packedqdc-fill"))]
        return _pool[0][1]


def max_threads() -> int:
    """Most threads a kernel call uses: the cores this process may run on."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


def claimed(fn, pieces: int, threads: int, args: tuple) -> float:
    """Run ``pieces`` pieces of work on the calling thread and up to ``threads - 1`` pool threads,
    never waiting for a pool thread that has not started.

    ``fn(first, last, forward, skip, done, *args)`` (``nogil`` compiled) fills the pieces
    ``first .. last`` not marked in ``done`` (uint8 (pieces,)), marking each it fills. Helper ``t``
    takes region ``t`` of ``threads`` equal regions and fills it backward, stopping at the first
    piece found done; the caller fills every piece forward, skipping those found done. Where two
    threads meet, both may fill one piece: a piece's writes are the same whoever makes them, so
    that is harmless, and a stale view of ``done`` only costs repeated work. When the caller is
    done, a helper that has not started yet is cancelled (on a busy machine it may not get a core
    soon), so threads are never much slower than one; one that has started is waited for.
    Returns the sum of ``fn``'s results; an exception in any thread is raised here.
    """
    if threads <= 1 or pieces <= 1:
        return fn(0, pieces, True, True, np.zeros(pieces, np.uint8), *args)
    done = np.zeros(pieces, np.uint8)
    bounds = [pieces * t // threads for t in range(threads + 1)]
    lock = threading.Lock()
    state = {"cancelled": False}

    def helper(first: int, last: int) -> float:
        with lock:
            if state["cancelled"]:
                return 0.0
        return fn(first, last, False, False, done, *args)

    pool = _executor()
    futures: list[Future] = [pool.submit(helper, bounds[t], bounds[t + 1]) for t in range(1, threads)]
    try:
        acc = fn(0, pieces, True, True, done, *args)
    finally:
        with lock:
            state["cancelled"] = True
        for future in futures:  # cancelled ones return at once; started ones must finish writing
            future.cancel() or future.exception()
    return acc + sum(f.result() for f in futures if not f.cancelled())


def kernel_threads(requested: int) -> int:
    """Threads a kernel call uses for ``requested``: at most the cores this process may run on."""
    return max(min(int(requested), max_threads()), 1)
