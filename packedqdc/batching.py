"""Index order, shape classes (budgets), and batch assembly with pair lists (numba kernels).

Everything here works on plain numpy arrays and a :class:`~packedqdc.format.PackedDataset`; the
loader (:mod:`packedqdc.loader`) adds epochs, prefetch, sharding and resumable position on top.

Two layouts share one batch contract (``docs/architecture.md``):

- ``padded``: ``M = batch_size`` molecule slots of ``num_atoms`` atom slots each, so
  ``A = M * num_atoms`` and ``P = M * num_atoms * (num_atoms - 1)``. ``dst_idx``, ``src_idx`` and
  ``batch_segments`` are the same for every batch (shared read-only arrays); ``pair_mask`` selects
  the real pairs of each slot.
- ``packed``: molecules fill an atom budget ``A`` and a pair budget ``P`` back to back; a few budget
  classes ``(A, M, P)`` keep padding small. The last atom slot and the last molecule slot of a
  packed batch are always padding, so padding atoms and pairs have a valid place to point.

Assembly is one pass of a compiled kernel per batch (``@numba.njit(cache=True, nogil=True)``,
compiled at the first batch, not at import): atoms are copied as contiguous slices of the memmaps,
pair lists are written in place, and only the padding that the previous content of a reused buffer
dirtied is rewritten. Kernels release the GIL, so a prefetch thread overlaps with the consumer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numba
import numpy as np

from .errors import ConfigError
from .format import PackedDataset

BATCH_KEYS = (
    "Z", "R", "F", "atom_mask", "batch_segments",
    "E", "Qtot", "N", "mol_mask", "mol_idx",
    "dst_idx", "src_idx", "pair_mask",
)  # fmt: skip

MAX_CLASSES = 4
_BUDGET_STREAM = 0x0B0D6E7  # rng stream of the budget design, apart from the epoch streams


class BatchShape(NamedTuple):
    """Static shape of one batch class: ``A`` atom slots, ``M`` molecule slots, ``P`` pair slots."""

    A: int
    M: int
    P: int


@dataclass(frozen=True)
class EpochPlan:
    """Which molecules go into which batch, in order, for one epoch.

    Attributes:
        mols: (n,) int64 dataset indices of the molecules, batch after batch.
        bounds: (n_batches + 1,) int64; batch ``b`` holds ``mols[bounds[b]:bounds[b + 1]]``.
        shape_ids: (n_batches,) int32 index into ``shapes`` of each batch's class.
        shapes: the distinct batch shapes, smallest pair budget first.
    """

    mols: np.ndarray
    bounds: np.ndarray
    shape_ids: np.ndarray
    shapes: tuple[BatchShape, ...]

    @property
    def n_batches(self) -> int:
        return int(self.bounds.shape[0] - 1)


# --------------------------------------------------------------------------------------------
# Small vectorised helpers
# --------------------------------------------------------------------------------------------


def ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(starts[i], starts[i] + counts[i])`` over i, as (sum counts,) int64."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    excl = np.cumsum(counts) - counts
    return np.repeat(np.asarray(starts, dtype=np.int64) - excl, counts) + np.arange(total, dtype=np.int64)


def all_pair_counts(n_atoms: np.ndarray) -> np.ndarray:
    """(k,) int64 number of ordered pairs i != j of molecules with ``n_atoms`` atoms: n (n - 1)."""
    n = np.asarray(n_atoms, dtype=np.int64)
    return n * (n - 1)


@functools.lru_cache(maxsize=8)
def pair_templates(max_n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All ordered pairs i != j for every molecule size 0..max_n, concatenated.

    Returns:
        start: (max_n + 2,) int64; the pairs of size ``n`` are entries ``start[n]:start[n + 1]``.
        dst, src: (sum n (n - 1),) int32 local atom indices, ``dst`` sorted (e3x order).
    """
    sizes = np.arange(max_n + 1, dtype=np.int64)
    counts = sizes * (sizes - 1)
    start = np.concatenate([[0], np.cumsum(counts)])
    dst = np.empty(int(start[-1]), dtype=np.int32)
    src = np.empty(int(start[-1]), dtype=np.int32)
    for n in range(2, max_n + 1):
        d = np.repeat(np.arange(n, dtype=np.int32), n)
        s = np.tile(np.arange(n, dtype=np.int32), n)
        keep = d != s
        dst[start[n] : start[n + 1]] = d[keep]
        src[start[n] : start[n + 1]] = s[keep]
    for array in (start, dst, src):
        array.setflags(write=False)
    return start, dst, src


@numba.njit(cache=True, nogil=True, inline="always")
def _within(R: np.ndarray, i: int, j: int, c2: np.float32) -> bool:
    """Atoms ``i`` and ``j`` of ``R`` (float32 (3n,), flat xyz) closer than ``sqrt(c2)``, in float32.

    The one test used both to count pairs ahead of an epoch and to build the lists, so the counts
    and the lists always agree.
    """
    dx = R[3 * i] - R[3 * j]
    dy = R[3 * i + 1] - R[3 * j + 1]
    dz = R[3 * i + 2] - R[3 * j + 2]
    return dx * dx + dy * dy + dz * dz < c2


@numba.njit(cache=True, nogil=True)
def _count_within(offsets: np.ndarray, R: np.ndarray, c2: np.float32, out: np.ndarray) -> None:
    """``out[i]`` = ordered pairs i != j of molecule ``i`` closer than ``sqrt(c2)``; R (3T,) flat, out (N,) int64."""
    for m in range(out.shape[0]):
        o = offsets[m]
        n = offsets[m + 1] - o
        count = 0
        for d in range(n):
            for s in range(n):
                if s != d and _within(R, o + d, o + s, c2):
                    count += 1
        out[m] = count


def squared_cutoff(cutoff: float) -> np.float32:
    """``cutoff**2`` as the float32 the kernels compare squared float32 distances with."""
    return np.float32(cutoff) * np.float32(cutoff)


def cutoff_pair_counts(ds: PackedDataset, offsets: np.ndarray, cutoff: float) -> np.ndarray:
    """(N,) int64 ordered pairs closer than ``cutoff`` Å in each molecule of ``ds``.

    One compiled pass over ``R`` straight from the memmap (no copies; memory stays bounded).

    Args:
        offsets: (N+1,) int64 atom offsets of ``ds``, in memory.
    """
    out = np.zeros(ds.n_molecules, dtype=np.int64)
    _count_within(offsets, np.asarray(ds.R).reshape(-1), squared_cutoff(cutoff), out)
    return out


# --------------------------------------------------------------------------------------------
# Order and budgets
# --------------------------------------------------------------------------------------------


def padded_plan(
    indices: np.ndarray,
    n_atoms: np.ndarray,
    batch_size: int,
    num_atoms: int,
    bucket_size: int,
    rng: np.random.Generator | None,
) -> EpochPlan:
    """The seed's order: shuffle, sort by size within buckets, cut into batches, shuffle the batches.

    Args:
        indices: (L,) int64 dataset indices of the loader's molecules.
        n_atoms: (N,) atoms per molecule of the whole dataset.
        rng: the epoch's generator, or None for the plain order (no shuffle, no bucketing).

    Only the last batch of the epoch can be partial; it keeps the full shape (padding slots).
    """
    L = indices.shape[0]
    n_b = -(-L // batch_size)
    mols = np.asarray(indices, dtype=np.int64)
    counts = np.full(n_b, batch_size, dtype=np.int64)
    if n_b:
        counts[-1] = L - (n_b - 1) * batch_size
    if rng is not None and L:
        mols = mols[rng.permutation(L)]
        bucket = np.arange(L) // max(bucket_size, 1)
        mols = mols[np.lexsort((n_atoms[mols], bucket))]
        order = rng.permutation(n_b)
        mols = mols[ranges(order * batch_size, counts[order])]
        counts = counts[order]
    shape = BatchShape(batch_size * num_atoms, batch_size, batch_size * num_atoms * (num_atoms - 1))
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return EpochPlan(mols, bounds, np.zeros(n_b, dtype=np.int32), (shape,))


def greedy_fill(atoms: np.ndarray, pairs: np.ndarray, a_cap: int, p_cap: int, m_cap: int) -> np.ndarray:
    """Cut a sequence of molecules into batches, each as long as fits all three caps.

    Args:
        atoms, pairs: (L,) atoms and pairs of each molecule in order; each must fit the caps.
        a_cap, p_cap, m_cap: most real atoms, pairs and molecules in one batch.

    Returns:
        (n_batches + 1,) int64 bounds into the sequence.
    """
    L = atoms.shape[0]
    cum_a = np.concatenate([[0], np.cumsum(atoms, dtype=np.int64)])
    cum_p = np.concatenate([[0], np.cumsum(pairs, dtype=np.int64)])
    bounds = [0]
    s = 0
    while s < L:
        e_a = int(np.searchsorted(cum_a, cum_a[s] + a_cap, side="right")) - 1
        e_p = int(np.searchsorted(cum_p, cum_p[s] + p_cap, side="right")) - 1
        s = min(e_a, e_p, s + m_cap, L)
        bounds.append(s)
    return np.asarray(bounds, dtype=np.int64)


def _segment_sums(values: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    cum = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    return cum[bounds[1:]] - cum[bounds[:-1]]


def choose_levels(totals: np.ndarray, max_levels: int = MAX_CLASSES, grid: int = 160) -> list[int]:
    """At most ``max_levels`` budgets covering ``totals`` with the fewest slots in all.

    Each total is served by the smallest level >= it; the largest level is ``max(totals)``. Exact
    dynamic programming over a quantile grid of candidate levels.
    """
    sorted_totals = np.sort(np.asarray(totals, dtype=np.int64))
    if sorted_totals.size == 0:
        return [1]
    cand = np.unique(np.quantile(sorted_totals, np.linspace(0.0, 1.0, grid), method="higher"))
    covered = np.searchsorted(sorted_totals, cand, side="right").astype(np.float64)
    g = cand.shape[0]
    cost = covered * cand  # one level at cand[j] covering every total <= cand[j]
    choice = [np.full(g, -1)]
    lower = np.triu(np.ones((g, g), dtype=bool), 1)  # i < j
    for _ in range(1, max_levels):
        step = cost[:, None] + (covered[None, :] - covered[:, None]) * cand[None, :]
        step = np.where(lower, step, np.inf)
        prev = np.argmin(step, axis=0)
        new = step[prev, np.arange(g)]
        use_prev = new < cost
        choice.append(np.where(use_prev, prev, -1))
        cost = np.where(use_prev, new, cost)
    levels = []
    j = g - 1
    for k in range(max_levels - 1, -1, -1):
        levels.append(int(cand[j]))
        j = int(choice[k][j])
        if j < 0:
            break
    return sorted(max(level, 1) for level in set(levels))


def design_budgets(
    n_atoms: np.ndarray, pairs: np.ndarray, batch_size: int, seed: int, max_classes: int = MAX_CLASSES
) -> list[BatchShape]:
    """Budget classes for the packed layout from the size distribution of the loader's molecules.

    The atom budget is ``batch_size * mean(n) + mean(n) / 2`` (greedy filling leaves on average
    half a molecule free, so batches average ``batch_size`` molecules), plus one padding atom. A
    trial epoch filled to that atom budget gives per-batch pair totals; ``choose_levels`` picks up
    to ``max_classes`` pair budgets from them. ``M`` covers the most molecules seen in a batch,
    with 10% headroom and one padding slot.

    Args:
        n_atoms, pairs: (L,) atoms and pairs of each molecule of the loader.
    """
    if n_atoms.size == 0:
        return [BatchShape(2, 2, 1)]
    mean_n = float(n_atoms.mean())
    a_cap = max(int(round(batch_size * mean_n + mean_n / 2)), int(n_atoms.max()))
    order = np.random.default_rng([seed, _BUDGET_STREAM]).permutation(n_atoms.shape[0])
    bounds = greedy_fill(n_atoms[order], pairs[order], a_cap, int(pairs.sum()) + 1, n_atoms.shape[0])
    p_batch = _segment_sums(pairs[order], bounds)
    m_max = int(np.diff(bounds).max())
    m_budget = int(np.ceil(m_max * 1.1)) + 1
    return [BatchShape(a_cap + 1, m_budget, p) for p in choose_levels(p_batch, max_classes)]


def check_budgets(budgets: list[BatchShape], indices: np.ndarray, n_atoms: np.ndarray, pairs: np.ndarray) -> None:
    """ConfigError naming the first molecule that fits no budget (one atom and slot stay padding)."""
    a_cap = max(b.A for b in budgets) - 1
    p_cap = max(b.P for b in budgets)
    if max(b.M for b in budgets) < 2 or a_cap < 1:
        raise ConfigError(f"budgets {budgets}: need A >= 2 and M >= 2 (one atom and one slot stay padding)")
    n = n_atoms[indices]
    bad = np.flatnonzero((n > a_cap) | (pairs > p_cap))
    if bad.size:
        i = int(bad[0])
        raise ConfigError(
            f"molecule {int(indices[i])} has {int(n[i])} atoms and {int(pairs[i])} pairs; the largest "
            f"budget holds {a_cap} atoms and {p_cap} pairs"
        )


def packed_plan(
    indices: np.ndarray,
    n_atoms: np.ndarray,
    pairs: np.ndarray,
    budgets: list[BatchShape],
    rng: np.random.Generator | None,
) -> EpochPlan:
    """Shuffle, fill batches greedily to the largest budget, and give each the smallest class that holds it.

    Args:
        indices: (L,) int64 dataset indices of the loader's molecules.
        n_atoms: (N,) atoms per molecule of the whole dataset.
        pairs: (L,) pairs of each molecule of ``indices`` (all ordered pairs, or those within the cutoff).
        budgets: the classes; ``check_budgets`` must have passed.
        rng: the epoch's generator, or None to keep the order of ``indices``.
    """
    shapes = tuple(sorted((BatchShape(*b) for b in budgets), key=lambda s: (s.P, s.A, s.M)))
    order = rng.permutation(indices.shape[0]) if rng is not None else np.arange(indices.shape[0])
    mols = np.asarray(indices, dtype=np.int64)[order]
    atoms = n_atoms[mols].astype(np.int64)
    mol_pairs = np.asarray(pairs, dtype=np.int64)[order]
    a_cap = max(s.A for s in shapes) - 1
    m_cap = max(s.M for s in shapes) - 1
    p_cap = max(s.P for s in shapes)
    bounds = greedy_fill(atoms, mol_pairs, a_cap, p_cap, m_cap)
    a_b = _segment_sums(atoms, bounds)
    p_b = _segment_sums(mol_pairs, bounds)
    m_b = np.diff(bounds)
    fits = np.stack([(a_b + 1 <= s.A) & (m_b + 1 <= s.M) & (p_b <= s.P) for s in shapes])
    shape_ids = np.argmax(fits, axis=0).astype(np.int32)  # first (smallest) class that fits
    return EpochPlan(mols, bounds, shape_ids, shapes)


def part_shapes(
    shapes: tuple[BatchShape, ...], parts: int, layout: str, max_atoms: int, max_pairs: int, balanced_atoms: bool
) -> tuple[BatchShape, ...]:
    """Static shape of one of ``parts`` parts of a batch of each class, as dealt by ``split_plan``.

    ``split_plan`` deals each batch's molecules out in snake order of decreasing size, so any two
    parts differ by at most one molecule, and, for every quantity that does not increase along that
    order, by at most the largest single value (the first item one part gets bounds its excess over
    any other). A part therefore holds at most ``(total + (parts - 1) * largest) / parts`` of it:

    - ``packed``: real atoms ``<= (A - 1 + (parts - 1) * max_atoms) / parts`` when the order is by
      atoms (``balanced_atoms``: all pairs, which grow with atoms), else ``<= A - 1`` (pairs within a
      cutoff need not grow with atoms, so the order is by pairs); pairs
      ``<= (P + (parts - 1) * max_pairs) / parts``; molecules ``<= ceil((M - 1) / parts)``; plus
      the padding atom and molecule slot every packed batch keeps.
    - ``padded``: ``ceil(M / parts)`` molecule slots of ``A / M`` atoms each.

    Args:
        shapes: the classes of the (global) batches; parts: their number per batch.
        max_atoms, max_pairs: the largest molecule of the loader, in atoms and in pairs.
    """
    if parts == 1:
        return shapes
    out = []
    for s in shapes:
        if layout == "padded":
            na, m = s.A // s.M, -(-s.M // parts)
            out.append(BatchShape(m * na, m, m * na * (na - 1)))
            continue
        atoms = min(s.A - 1, (s.A - 1 + (parts - 1) * max_atoms) // parts) if balanced_atoms else s.A - 1
        pairs = min(s.P, (s.P + (parts - 1) * max_pairs) // parts)
        out.append(BatchShape(atoms + 1, -(-(s.M - 1) // parts) + 1, max(pairs, 1)))
    return tuple(out)


def split_plan(plan: EpochPlan, parts: int, sizes: np.ndarray, part_classes: tuple[BatchShape, ...]) -> EpochPlan:
    """Deal every batch of ``plan`` out into ``parts`` parts: the plan of the parts, batch after batch.

    The molecules of each batch are ordered by decreasing ``sizes`` and dealt in snake order
    (part 0, 1, .., parts-1, then parts-1, .., 0, and so on), which balances molecules, atoms and
    pairs between the parts within the bounds of ``part_shapes``. Part ``j`` of batch ``b`` is batch
    ``b * parts + j`` of the result; a part may be empty (all padding) when the batch has fewer
    molecules than parts. The molecules of a batch are the molecules of its parts: a step over all
    parts sees exactly the molecules of the unsplit step.

    Args:
        plan: the epoch plan of the global batches.
        sizes: (N,) the dealing key of every dataset molecule (atoms, or pairs within a cutoff).
        part_classes: ``part_shapes`` of ``plan.shapes``.
    """
    n_b = plan.n_batches
    counts = np.diff(plan.bounds)
    batch = np.repeat(np.arange(n_b, dtype=np.int64), counts)
    by_size = np.lexsort((-np.asarray(sizes)[plan.mols], batch))  # within each batch, largest first
    rank = np.arange(plan.mols.shape[0], dtype=np.int64) - np.repeat(plan.bounds[:-1], counts)
    row, col = np.divmod(rank, parts)
    part = np.where(row % 2 == 0, col, parts - 1 - col)
    mols = plan.mols[by_size][np.lexsort((rank, part, batch))]  # rank, part, batch: of the sorted sequence
    per_part = np.zeros(n_b * parts, dtype=np.int64)
    np.add.at(per_part, batch * parts + part, 1)
    bounds = np.concatenate([[0], np.cumsum(per_part)]).astype(np.int64)
    return EpochPlan(mols, bounds, np.repeat(plan.shape_ids, parts), part_classes)


# --------------------------------------------------------------------------------------------
# Assembly kernels
#
# Each kernel fills one item: ``k`` batches of one shape back to back (k = 1 for ``batches()``,
# k = D for ``stacked_batches``). Batch ``b`` holds ``mols[lo[b]:hi[b]]`` (lo == hi: all padding).
# Sources are the dataset's arrays (memmap views, R and F flat xyz); outputs are flat too. The
# output buffers may hold an earlier item: ``marks`` (packed) or the old ``N`` (padded) say how far
# that content reaches, and only that far is padding rewritten. A fresh buffer (np.empty) is
# marked as dirty everywhere.
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, inline="always")
def _touch(
    mols: np.ndarray, lo: int, hi: int, offsets: np.ndarray, Zs: np.ndarray, Rs: np.ndarray, Fs: np.ndarray,
    Es: np.ndarray, Qs: np.ndarray,
) -> float:  # fmt: skip
    """Load one value per cache line of every molecule ``mols[lo:hi]``, and return their (meaningless) sum.

    Molecules sit at random places in the files; these independent loads let the CPU fetch a whole
    batch's lines at once instead of one molecule after the other (about 2x faster assembly).
    """
    acc = 0.0
    for m in range(lo, hi):
        i = mols[m]
        o = offsets[i]
        n = offsets[i + 1] - o
        acc += Es[i] + (Qs[i] if Qs.shape[0] else 0.0)
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


@numba.njit(cache=True, nogil=True, inline="always")
def _molecule_pairs(
    o: int, n: int, la: np.int32, p: int, p_end: int, Rs: np.ndarray, c2: np.float32, use_cutoff: bool,
    t_start: np.ndarray, t_dst: np.ndarray, t_src: np.ndarray, dst: np.ndarray, src: np.ndarray,
) -> int:  # fmt: skip
    """Write the pairs of a molecule (atoms ``o .. o+n`` of ``Rs``, first slot ``la``) from ``p``; return the end.

    All ordered pairs are the size-``n`` template shifted by ``la`` (a vectorised copy); with
    ``use_cutoff`` only those closer than ``sqrt(c2)``.
    """
    t0 = t_start[n]
    pc = n * (n - 1)
    td, ts = t_dst[t0 : t0 + pc], t_src[t0 : t0 + pc]
    if not use_cutoff:
        if p + pc > p_end:
            raise ValueError("batch exceeds its pair budget")
        out_d, out_s = dst[p : p + pc], src[p : p + pc]
        for q in range(pc):
            out_d[q] = td[q] + la
            out_s[q] = ts[q] + la
        return p + pc
    for q in range(pc):
        if _within(Rs, o + td[q], o + ts[q], c2):
            if p >= p_end:
                raise ValueError("batch exceeds its pair budget")
            dst[p] = td[q] + la
            src[p] = ts[q] + la
            p += 1
    return p


@numba.njit(cache=True, nogil=True)
def fill_packed(
    mols: np.ndarray, lo: np.ndarray, hi: np.ndarray, offsets: np.ndarray,
    Zs: np.ndarray, Rs: np.ndarray, Fs: np.ndarray, Es: np.ndarray, Qs: np.ndarray, c2: np.float32, use_cutoff: bool,
    t_start: np.ndarray, t_dst: np.ndarray, t_src: np.ndarray,
    Z: np.ndarray, R: np.ndarray, F: np.ndarray, atom_mask: np.ndarray, seg: np.ndarray,
    E: np.ndarray, Qtot: np.ndarray, N: np.ndarray, mol_mask: np.ndarray, mol_idx: np.ndarray,
    dst: np.ndarray, src: np.ndarray, pair_mask: np.ndarray, marks: np.ndarray,
) -> float:  # fmt: skip
    """Fill ``k`` packed batches of shape (A, M, P) in place; return ``_touch``'s meaningless sum.

    Args:
        mols: (L,) int64 dataset indices; lo, hi: (k,) int64 bounds of each batch in ``mols``.
        offsets: (N+1,) int64 atom offsets. Zs (T,) int32, Rs (3T,) f32, Fs (3T,) or (0,) f32,
            Es (N,) f64, Qs (N,) or (0,) f64: the dataset (memmap views).
        c2: float32 squared cutoff, used when ``use_cutoff``.
        t_start, t_dst, t_src: ``pair_templates`` of the largest molecule.
        Z (k*A,) int32, R, F (3*k*A,) f32, atom_mask (k*A,) bool, seg (k*A,) int32,
        E, Qtot (k*M,) f64, N (k*M,) int32, mol_mask (k*M,) bool, mol_idx (k*M,) int64,
        dst, src (k*P,) int32, pair_mask (k*P,) bool: the outputs.
        marks: (k, 3) int64 real atoms, molecules, pairs of the content each batch holds (-1: a
            fresh buffer, dirty everywhere); updated.
    """
    k = lo.shape[0]
    A, M, P = Z.shape[0] // k, E.shape[0] // k, dst.shape[0] // k
    acc = 0.0
    for b in range(k):
        acc += _touch(mols, lo[b], hi[b], offsets, Zs, Rs, Fs, Es, Qs)
        a0, m0, p0 = b * A, b * M, b * P
        fresh = marks[b, 0] < 0
        a, p = a0, p0
        m_real = hi[b] - lo[b]
        for m in range(m_real):
            i = mols[lo[b] + m]
            o = offsets[i]
            n = offsets[i + 1] - o
            if a + n > a0 + A - 1 or m + 1 > M - 1:
                raise ValueError("batch exceeds its atom or molecule budget")
            E[m0 + m] = Es[i]
            Qtot[m0 + m] = Qs[i] if Qs.shape[0] else 0.0
            N[m0 + m] = n
            mol_mask[m0 + m] = True
            mol_idx[m0 + m] = i
            _copy_atoms(o, n, a, Zs, Rs, Fs, Z, R, F, atom_mask)
            seg[a : a + n] = m
            p = _molecule_pairs(o, n, np.int32(a - a0), p, p0 + P, Rs, c2, use_cutoff, t_start, t_dst, t_src, dst, src)
            a += n
        old_a = a0 + (A if fresh else marks[b, 0])
        old_m = m0 + (M if fresh else marks[b, 1])
        old_p = p0 + (P if fresh else marks[b, 2])
        _clear_atoms(a, old_a, Z, R, F, atom_mask)
        seg[a:old_a] = M - 1
        E[m0 + m_real : old_m] = 0.0
        Qtot[m0 + m_real : old_m] = 0.0
        N[m0 + m_real : old_m] = 0
        mol_mask[m0 + m_real : old_m] = False
        mol_idx[m0 + m_real : old_m] = -1
        dst[p:old_p] = A - 1
        src[p:old_p] = A - 1
        pair_mask[p0 if fresh else old_p : p] = True  # [p0, old_p) is True already
        pair_mask[p:old_p] = False
        marks[b, 0], marks[b, 1], marks[b, 2] = a - a0, m_real, p - p0
    return acc


@numba.njit(cache=True, nogil=True)
def fill_padded(
    mols: np.ndarray, lo: np.ndarray, hi: np.ndarray, offsets: np.ndarray,
    Zs: np.ndarray, Rs: np.ndarray, Fs: np.ndarray, Es: np.ndarray, Qs: np.ndarray, c2: np.float32, use_cutoff: bool,
    na: int, Z: np.ndarray, R: np.ndarray, F: np.ndarray, atom_mask: np.ndarray,
    E: np.ndarray, Qtot: np.ndarray, N: np.ndarray, mol_mask: np.ndarray, mol_idx: np.ndarray, pair_mask: np.ndarray,
) -> float:  # fmt: skip
    """Fill ``k`` padded batches of ``M`` slots of ``na`` atoms in place; return ``_touch``'s sum.

    Arguments as ``fill_packed``; there is no ``seg``, ``dst`` or ``src`` (shared constants) and no
    ``marks``: the old ``N`` of each slot says how far its previous content reaches (a fresh buffer
    has ``N = na``). ``pair_mask`` is (k*M*na*(na-1),): slot ``j`` owns rows ``d`` of ``na - 1``
    entries, row ``d`` listing ``s = 0 .. na-1`` without ``d`` (the order of ``pair_templates``).
    """
    k = lo.shape[0]
    M = N.shape[0] // k
    per = na * (na - 1)
    acc = 0.0
    for b in range(k):
        acc += _touch(mols, lo[b], hi[b], offsets, Zs, Rs, Fs, Es, Qs)
    for slot in range(N.shape[0]):
        b, j = slot // M, slot % M
        old = N[slot]
        n, o = 0, 0
        if j < hi[b] - lo[b]:
            i = mols[lo[b] + j]
            o = offsets[i]
            n = offsets[i + 1] - o
            if n > na:
                raise ValueError("molecule larger than num_atoms")
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
            row = pair_mask[slot * per + d * (na - 1) : slot * per + d * (na - 1) + top - 1]
            if d >= n:
                row[:] = False
            elif use_cutoff:
                for c in range(top - 1):
                    s = c if c < d else c + 1
                    row[c] = s < n and _within(Rs, o + d, o + s, c2)
            else:
                row[: n - 1] = True
                row[n - 1 :] = False
    return acc


# --------------------------------------------------------------------------------------------
# Assembly: buffers and items
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutSpec:
    """How to assemble batches: layout, padded size, optional cutoff (Å)."""

    layout: str  # "padded" or "packed"
    num_atoms: int = 0  # padded layout only
    cutoff: float | None = None


class _Buffers:
    """One set of output arrays for an item of ``group`` batches of one shape, and its views.

    ``arrays`` are the flat outputs the kernels write; ``views`` are the batch dict (reshaped to a
    leading axis ``group`` when ``group > 1``), read-only when the set is reused.
    """

    def __init__(self, shape: BatchShape, group: int, padded: bool, consts: dict[str, np.ndarray], reused: bool):
        A, M, P = (group * x for x in shape)
        self.arrays = {
            "Z": np.empty(A, np.int32), "R": np.empty(3 * A, np.float32), "F": np.empty(3 * A, np.float32),
            "atom_mask": np.empty(A, bool), "E": np.empty(M), "Qtot": np.empty(M), "mol_mask": np.empty(M, bool),
            "mol_idx": np.empty(M, np.int64), "pair_mask": np.empty(P, bool),
        }  # fmt: skip
        if padded:
            self.arrays["N"] = np.full(M, shape.A // shape.M, np.int32)  # fresh: dirty up to num_atoms
        else:
            self.arrays["N"] = np.empty(M, np.int32)
            self.arrays.update(
                batch_segments=np.empty(A, np.int32), dst_idx=np.empty(P, np.int32), src_idx=np.empty(P, np.int32)
            )
            self.marks = np.full((group, 3), -1, dtype=np.int64)  # fresh: dirty everywhere
        views = {**self.arrays, **consts, "R": self.arrays["R"].reshape(A, 3), "F": self.arrays["F"].reshape(A, 3)}
        if group > 1:
            views = {key: _stack_view(value, group) for key, value in views.items()}
        if reused:
            for key in self.arrays:
                views[key] = views[key].view()
                views[key].setflags(write=False)
        self.views = {key: views[key] for key in BATCH_KEYS}


def _stack_view(array: np.ndarray, group: int) -> np.ndarray:
    """(group * n, ...) -> (group, n, ...) view; a shared constant (n, ...) is broadcast instead."""
    if not array.flags.writeable:  # the padded layout's shared constants
        return np.broadcast_to(array, (group,) + array.shape)
    return array.reshape((group, array.shape[0] // group) + array.shape[1:])


class Assembler:
    """Builds batch dicts from a packed dataset with the compiled kernels.

    Args:
        ds: the packed dataset (memmaps).
        offsets: (N+1,) int64 atom offsets, in memory.
        spec: the layout.
        shapes: the classes of the epoch plan.
        max_atoms: the largest molecule the items can hold (sizes the pair templates).
        group: batches per item (1: plain batches; D: stacked with a leading axis D).
        ring: 0 gives every item fresh arrays; r > 0 cycles through r buffer sets per class, so an
            item is overwritten by the r-th item of its class after it.
    """

    def __init__(
        self, ds: PackedDataset, offsets: np.ndarray, spec: LayoutSpec, shapes: tuple[BatchShape, ...],
        max_atoms: int, group: int = 1, ring: int = 0,
    ) -> None:  # fmt: skip
        self.spec = spec
        self.shapes = shapes
        self.group = group
        self.ring = ring
        self.offsets = offsets
        self.sources = (
            np.asarray(ds.Z), np.asarray(ds.R).reshape(-1),
            np.zeros(0, np.float32) if ds.F is None else np.asarray(ds.F).reshape(-1),
            np.asarray(ds.E), np.zeros(0) if ds.Qtot is None else np.asarray(ds.Qtot),
        )  # fmt: skip
        self.c2 = squared_cutoff(spec.cutoff) if spec.cutoff is not None else np.float32(0.0)
        self.templates = pair_templates(max_atoms)
        self.consts = padded_constants(spec.num_atoms, shapes[0].M) if spec.layout == "padded" else {}
        self._sets: list[list[_Buffers]] = [[] for _ in shapes]
        self._next = [0] * len(shapes)

    def _buffers(self, shape_id: int) -> _Buffers:
        if self.ring == 0:
            return self._new(shape_id)
        sets, at = self._sets[shape_id], self._next[shape_id]
        if len(sets) <= at:
            sets.append(self._new(shape_id))
        self._next[shape_id] = (at + 1) % self.ring
        return sets[at]

    def _new(self, shape_id: int) -> _Buffers:
        padded = self.spec.layout == "padded"
        return _Buffers(self.shapes[shape_id], self.group, padded, self.consts, self.ring > 0)

    def assemble(self, mols: np.ndarray, lo: np.ndarray, hi: np.ndarray, shape_id: int) -> dict[str, np.ndarray]:
        """The item of ``group`` batches ``mols[lo[b]:hi[b]]`` (lo == hi: all padding) of class ``shape_id``.

        Args:
            mols: (L,) int64 dataset indices of the epoch, batch after batch.
            lo, hi: (group,) int64 bounds of each batch in ``mols``.
        """
        buf = self._buffers(shape_id)
        out = buf.arrays
        common = (mols, lo, hi, self.offsets, *self.sources, self.c2, self.spec.cutoff is not None)
        if self.spec.layout == "padded":
            fill_padded(
                *common, self.spec.num_atoms, out["Z"], out["R"], out["F"], out["atom_mask"], out["E"],
                out["Qtot"], out["N"], out["mol_mask"], out["mol_idx"], out["pair_mask"],
            )  # fmt: skip
        else:
            fill_packed(
                *common, *self.templates, out["Z"], out["R"], out["F"], out["atom_mask"], out["batch_segments"], out["E"],
                out["Qtot"], out["N"], out["mol_mask"], out["mol_idx"], out["dst_idx"], out["src_idx"],
                out["pair_mask"], buf.marks,
            )  # fmt: skip
        return dict(buf.views)


@functools.lru_cache(maxsize=8)
def padded_constants(num_atoms: int, batch_size: int) -> dict[str, np.ndarray]:
    """Shared read-only ``dst_idx``, ``src_idx`` (P,) and ``batch_segments`` (A,) int32 of the padded layout."""
    na = num_atoms
    start, t_dst, t_src = pair_templates(na)
    per = na * (na - 1)
    shift = np.repeat(np.arange(batch_size, dtype=np.int32) * na, per)
    out = {
        "dst_idx": np.tile(t_dst[start[na] : start[na + 1]], batch_size) + shift,
        "src_idx": np.tile(t_src[start[na] : start[na + 1]], batch_size) + shift,
        "batch_segments": np.repeat(np.arange(batch_size, dtype=np.int32), na),
    }
    for array in out.values():
        array.setflags(write=False)
    return out
