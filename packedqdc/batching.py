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

Assembly is one call of a compiled kernel (:mod:`packedqdc.kernels`) per item, in the calling
thread or cut into runs filled side by side on a small pool of threads (``threads``): atoms are copied as contiguous
slices of the memmaps, pair lists are written in place, and only the padding that the previous
content of a reused buffer dirtied is rewritten.
"""

from __future__ import annotations

import collections
import functools
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .errors import ConfigError
from .format import PackedDataset
from .kernels import (
    count_within,
    fill_packed,
    fill_packed_threaded,
    fill_padded,
    fill_padded_threaded,
    greedy_bounds,
    kernel_threads,
)

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
    reads: WindowReads | None = None  # block order: what each window reads, for read-ahead

    @property
    def n_batches(self) -> int:
        return int(self.bounds.shape[0] - 1)


@dataclass(frozen=True)
class WindowReads:
    """The file spans of block order's windows, so that a window can be read ahead of its batches.

    Attributes:
        first_batch: (W,) int64 the first batch of the plan holding a molecule of window ``w``.
        span_ptr: (W + 1,) int64; window ``w``'s spans are ``spans[span_ptr[w]:span_ptr[w + 1]]``.
        spans: (S, 4) int64 first atom, end atom, first molecule, end molecule (dataset indices)
            of each block of each window.
    """

    first_batch: np.ndarray
    span_ptr: np.ndarray
    spans: np.ndarray

    def window_of(self, batch: int) -> int:
        """The last window whose first batch is at or before ``batch``."""
        return int(np.searchsorted(self.first_batch, batch, side="right")) - 1


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
    count_within(offsets, np.asarray(ds.R).reshape(-1), squared_cutoff(cutoff), out)
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


def block_bounds(indices: np.ndarray, n_atoms: np.ndarray, block_atoms: int) -> np.ndarray:
    """(n_blocks + 1,) int64 bounds cutting ``indices`` into runs of about ``block_atoms`` atoms.

    Blocks are consecutive entries of ``indices`` (sorted indices: contiguous bytes of the files);
    each holds at least one molecule.
    """
    L = indices.shape[0]
    if L == 0:
        return np.zeros(1, dtype=np.int64)
    cum = np.cumsum(n_atoms[indices], dtype=np.int64)
    targets = np.arange(max(int(block_atoms), 1), int(cum[-1]), max(int(block_atoms), 1), dtype=np.int64)
    cuts = np.searchsorted(cum, targets, side="left") + 1
    return np.unique(np.concatenate([[0], cuts, [L]]).astype(np.int64))


def block_order(
    indices: np.ndarray, offsets: np.ndarray, bounds: np.ndarray, window: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One epoch of block order: the blocks in a random order, mixed ``window`` blocks at a time.

    The blocks (``bounds`` into ``indices``) are permuted; each run of ``window`` consecutive blocks
    of that permutation (a window: the shuffle buffer) is read as a whole and its molecules are
    shuffled together. Every molecule of ``indices`` appears exactly once.

    Returns:
        order: (L,) int64 positions into ``indices``, in epoch order.
        window_start: (W,) int64 position in ``order`` where each window begins.
        span_ptr, spans: as ``WindowReads`` (the file spans of each window's blocks).
    """
    n_blocks = bounds.shape[0] - 1
    sizes = np.diff(bounds)
    perm = rng.permutation(n_blocks)
    order = np.empty(indices.shape[0], dtype=np.int64)
    starts, at = [], 0
    for w in range(0, n_blocks, window):
        blocks = perm[w : w + window]
        pos = ranges(bounds[blocks], sizes[blocks])
        rng.shuffle(pos)
        starts.append(at)
        order[at : at + pos.shape[0]] = pos
        at += pos.shape[0]
    first = indices[bounds[perm]]
    last = indices[bounds[perm + 1] - 1]
    lo, hi = np.minimum(first, last), np.maximum(first, last) + 1  # sorted indices: the block's span
    spans = np.stack([offsets[lo], offsets[hi], lo, hi], axis=1).astype(np.int64)
    span_ptr = np.minimum(np.arange(0, n_blocks + window, window, dtype=np.int64), n_blocks)[: len(starts) + 1]
    return order, np.asarray(starts, dtype=np.int64), span_ptr, spans


def block_plan(
    indices: np.ndarray, n_atoms: np.ndarray, offsets: np.ndarray, pairs: np.ndarray | None,
    budgets: list[BatchShape] | None, batch_size: int, num_atoms: int, block_atoms: int, window: int,
    rng: np.random.Generator,
) -> EpochPlan:  # fmt: skip
    """Block order, packed (``budgets``, with ``pairs`` of each molecule of ``indices``) or padded
    (``batch_size`` slots of ``num_atoms``): the epoch's sequence of ``block_order``, cut into
    batches of the same static shapes as the molecule order."""
    bounds = block_bounds(indices, n_atoms, block_atoms)
    order, window_start, span_ptr, spans = block_order(indices, offsets, bounds, window, rng)
    mols = indices[order]
    if budgets is not None:
        plan = packed_plan(mols, n_atoms, np.asarray(pairs)[order], budgets, None)
    else:
        plan = padded_plan(mols, n_atoms, batch_size, num_atoms, 1, None)
    first_batch = np.searchsorted(plan.bounds, window_start, side="right") - 1
    reads = WindowReads(first_batch.astype(np.int64), span_ptr, spans)
    return EpochPlan(plan.mols, plan.bounds, plan.shape_ids, plan.shapes, reads)


def greedy_fill(atoms: np.ndarray, pairs: np.ndarray, a_cap: int, p_cap: int, m_cap: int) -> np.ndarray:
    """Cut a sequence of molecules into batches, each as long as fits all three caps.

    Args:
        atoms, pairs: (L,) atoms and pairs of each molecule in order; each must fit the caps.
        a_cap, p_cap, m_cap: most real atoms, pairs and molecules in one batch.

    Returns:
        (n_batches + 1,) int64 bounds into the sequence.
    """
    atoms = np.asarray(atoms, dtype=np.int64)
    pairs = np.asarray(pairs, dtype=np.int64)
    return greedy_bounds(atoms, pairs, int(a_cap), int(p_cap), int(m_cap))


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
# Assembly: buffers and items
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutSpec:
    """How to assemble batches: layout, padded size, optional cutoff (Å)."""

    layout: str  # "padded" or "packed"
    num_atoms: int = 0  # padded layout only
    cutoff: float | None = None


# the kernels' output arguments, in order
_PADDED_OUTPUTS = ("Z", "R", "F", "atom_mask", "E", "Qtot", "N", "mol_mask", "mol_idx", "pair_mask")
_PACKED_OUTPUTS = (
    "Z", "R", "F", "atom_mask", "batch_segments", "E", "Qtot", "N", "mol_mask", "mol_idx",
    "dst_idx", "src_idx", "pair_mask",
)  # fmt: skip

ITEMS_PER_CALL = 4  # items a kernel call fills per thread when buffers are reused
RECYCLE_SCAN = 4  # rings checked for reuse per item of batches(reuse_buffers=False)
RECYCLE_TRACK = 64  # rings of handed-out items tracked for reuse at most


class _Ring:
    """``rows`` buffer sets for items of ``group`` batches of the classes ``shapes``, and their views.

    ``arrays`` are the kernels' outputs as (rows, group * largest size) arrays; an item of class
    ``c`` in row ``r`` uses the first ``group * (A, M, P)`` entries. ``marks`` (packed) are the
    (rows, group, 4) extents of each row's content and valid pair padding, ``owner`` the (rows,)
    class of its content (-1: fresh). ``views(row, c)`` is the batch dict of a row holding class
    ``c`` (leading axis ``group`` when ``group > 1``), read-only when the sets are reused.
    """

    def __init__(
        self, shapes: tuple[BatchShape, ...], group: int, rows: int, padded: bool, consts: dict[str, np.ndarray],
        reused: bool,
    ) -> None:  # fmt: skip
        self.shapes, self.group, self.consts, self.reused = shapes, group, consts, reused
        A, M, P = (group * max(s[i] for s in shapes) for i in range(3))
        self.arrays = {
            "Z": np.empty((rows, A), np.int32), "R": np.empty((rows, 3 * A), np.float32),
            "F": np.empty((rows, 3 * A), np.float32), "atom_mask": np.empty((rows, A), bool),
            "E": np.empty((rows, M)), "Qtot": np.empty((rows, M)), "mol_mask": np.empty((rows, M), bool),
            "mol_idx": np.empty((rows, M), np.int64), "pair_mask": np.empty((rows, P), bool),
        }  # fmt: skip
        if padded:  # one class
            self.arrays["N"] = np.full((rows, M), shapes[0].A // shapes[0].M, np.int32)  # fresh: dirty up to num_atoms
            self.outputs = tuple(self.arrays[key] for key in _PADDED_OUTPUTS)  # the kernels' order
        else:
            self.arrays["N"] = np.empty((rows, M), np.int32)
            self.arrays.update(
                batch_segments=np.empty((rows, A), np.int32),
                dst_idx=np.empty((rows, P), np.int32),
                src_idx=np.empty((rows, P), np.int32),
            )
            self.marks = np.empty((rows, group, 4), dtype=np.int64)
            self.owner = np.empty(rows, dtype=np.int64)
            self.marks.fill(-1)
            self.owner.fill(-1)  # fresh: dirty everywhere
            self.outputs = tuple(self.arrays[key] for key in _PACKED_OUTPUTS) + (self.marks, self.owner)
        self._views: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    def views(self, row: int, c: int) -> dict[str, np.ndarray]:
        """The batch dict of ``row`` holding class ``c`` (read-only views when reused; built once)."""
        if (row, c) not in self._views:
            self._views[(row, c)] = self.new_views(row, c)
        return self._views[(row, c)]

    def new_views(self, row: int, c: int) -> dict[str, np.ndarray]:
        """New view objects of ``row`` holding class ``c`` (read-only when the sets are reused)."""
        if len(self.shapes) == 1:  # rows are exactly as wide as the class
            own = {key: array[row] for key, array in self.arrays.items()}
        else:
            A, M, P = (self.group * x for x in self.shapes[c])
            size = {"Z": A, "R": 3 * A, "F": 3 * A, "atom_mask": A, "batch_segments": A, "dst_idx": P,
                    "src_idx": P, "pair_mask": P}  # fmt: skip
            own = {key: array[row, : size.get(key, M)] for key, array in self.arrays.items()}
        views = {**own, **self.consts, "R": own["R"].reshape(-1, 3), "F": own["F"].reshape(-1, 3)}
        if self.group > 1:
            views = {key: _stack_view(value, self.group) for key, value in views.items()}
        if self.reused:
            for key in own:
                views[key].setflags(write=False)
        return {key: views[key] for key in BATCH_KEYS}

    def unreferenced(self) -> bool:
        """No array of this ring is referenced outside it: no batch (or view of one) is alive."""
        return self._counts() == self._baseline

    def track_references(self) -> None:
        """Take the present reference counts of the arrays as the baseline of ``unreferenced``."""
        self._owners = list(self.arrays.values())
        self._baseline = self._counts()

    def _counts(self) -> list[int]:
        return [sys.getrefcount(array) for array in self._owners]  # the same frame for both uses

    def mark_dirty(self, num_atoms: int) -> None:
        """Forget what the rows hold: their next fill rewrites all padding (a caller may have written
        into the arrays of a batch handed out writable)."""
        if hasattr(self, "marks"):
            self.marks.fill(-1)
            self.owner.fill(-1)
        else:
            self.arrays["N"].fill(num_atoms)


def _stack_view(array: np.ndarray, group: int) -> np.ndarray:
    """(group * n, ...) -> (group, n, ...) view; a shared constant (n, ...) is broadcast instead."""
    if not array.flags.writeable:  # the padded layout's shared constants
        return np.broadcast_to(array, (group,) + array.shape)
    return array.reshape((group, array.shape[0] // group) + array.shape[1:])


class Assembler:
    """Builds batch dicts from a packed dataset with the compiled kernels, several items per call.

    Args:
        ds: the packed dataset (memmaps).
        offsets: (N+1,) int64 atom offsets, in memory.
        spec: the layout.
        shapes: the classes of the epoch plan.
        group: batches per item (1: plain batches; D: stacked with a leading axis D).
        reuse: True fills items into rows of reused buffers (a pool of at most ``hold + chunk``
            rows, shared by the classes when they differ in pair budget only, else one per class;
            the row given back last is taken first), so that an item handed out stays intact while
            ``hold`` more are handed out and the next ``chunk`` are filled; the views are
            read-only. False hands every item out in writable arrays of its own (one item per
            call), recycled once nothing references them any more (``_recycled_ring``).
        hold: see ``reuse``.
        pair_counts: packed layout with a cutoff: (N,) int64 pairs within it of every dataset
            molecule (``cutoff_pair_counts``); None otherwise.
        threads: threads that fill a call's items side by side (1: the calling thread alone; at
            most the cores of this process, ``kernels.kernel_threads``).

    Attributes:
        chunk: items per call (``assemble`` takes at most this many).
    """

    def __init__(
        self, ds: PackedDataset, offsets: np.ndarray, spec: LayoutSpec, shapes: tuple[BatchShape, ...],
        group: int = 1, reuse: bool = False, hold: int = 0, pair_counts: np.ndarray | None = None,
        threads: int = 1,
    ) -> None:  # fmt: skip
        if spec.layout == "packed" and spec.cutoff is not None and pair_counts is None:
            raise ValueError("the packed layout with a cutoff needs the pair counts within it")
        self.shapes = shapes
        self.group = group
        self.reuse = reuse
        self.threads = kernel_threads(threads)
        self.chunk = ITEMS_PER_CALL * self.threads if reuse else 1
        self._padded = spec.layout == "padded"
        counts = np.zeros(0, np.int64) if self._padded or spec.cutoff is None else pair_counts
        c2 = squared_cutoff(spec.cutoff) if spec.cutoff is not None else np.float32(0.0)
        sources = (
            offsets, np.asarray(ds.Z), np.asarray(ds.R).reshape(-1),
            np.zeros(0, np.float32) if ds.F is None else np.asarray(ds.F).reshape(-1),
            np.asarray(ds.E), np.zeros(0) if ds.Qtot is None else np.asarray(ds.Qtot), c2, spec.cutoff is not None,
        )  # fmt: skip
        if self._padded:
            self._inputs = (*sources, spec.num_atoms)
            self._kernels = (fill_padded, fill_padded_threaded)
        else:
            self._inputs = (*sources, np.asarray(counts, dtype=np.int64))
            self._kernels = (fill_packed, fill_packed_threaded)
        self._choice = ThreadChoice() if self.threads > 1 else None
        self.consts = padded_constants(spec.num_atoms, shapes[0].M) if self._padded else {}
        self._shapes = np.array(shapes, dtype=np.int64).reshape(-1, 3)
        self._hold = hold
        self._slots = hold + self.chunk  # rows per pool: all of a call's items may draw from one pool
        # One pool of rows for all classes when a row can pass from class to class keeping its marks
        # (one batch per item, same atom and molecule budgets: the automatic budgets), else one per class.
        self._shared = group == 1 and len({(s.A, s.M) for s in shapes}) == 1
        pools = 1 if self._shared else len(shapes)
        if reuse:
            self._ring = _Ring(shapes, group, pools * self._slots, self._padded, self.consts, True)
        self._one = np.zeros(1, np.int64)  # row 0 of a one-row ring
        self._out: collections.deque[_Ring] = collections.deque()  # one-row rings handed out (reuse=False)
        self._num_atoms = spec.num_atoms
        self._free: list[list[int]] = [[] for _ in range(pools)]  # per pool, rows last given back first
        self._unused = [0] * pools  # per pool, rows never used so far
        self._held: collections.deque[tuple[int, int]] = collections.deque()  # (pool, row) handed out, in order

    def _take_rows(self, cls: list[int]) -> np.ndarray:
        """(G,) int64 rows for the next items, of classes ``cls``, from their pools.

        Of the items handed out so far, all but the last ``hold`` give their rows back; the row given
        back last is taken first (its lines are the likeliest to be in cache), and a row never used
        only when none is free (rows never used are never touched and cost no memory).
        """
        while len(self._held) > self._hold:
            pool, released = self._held.popleft()
            self._free[pool].append(released)
        rows = np.empty(len(cls), dtype=np.int64)
        for g, c in enumerate(cls):
            pool = 0 if self._shared else c
            if self._free[pool]:
                rows[g] = self._free[pool].pop()
            else:
                rows[g] = pool * self._slots + self._unused[pool]
                self._unused[pool] += 1
            self._held.append((pool, int(rows[g])))
        return rows

    def assemble(self, mols: np.ndarray, lo: np.ndarray, hi: np.ndarray, shape_ids: np.ndarray) -> list[dict]:
        """Items of batches ``mols[lo[g, b]:hi[g, b]]`` (lo == hi: all padding), item ``g`` of class ``shape_ids[g]``.

        Args:
            mols: (L,) int64 dataset indices of the epoch, batch after batch.
            lo, hi: (G, group) int64 bounds in ``mols``; G <= ``chunk``.
            shape_ids: (G,) class of each item.
        """
        if self.reuse:
            ring, shapes = self._ring, self._shapes
            cls = np.asarray(shape_ids, dtype=np.int64)
            row = self._take_rows(cls.tolist())
        else:  # a one-row ring of its own, recycled once the caller dropped every batch of it
            ring = self._recycled_ring()
            shapes, cls, row = self._shapes, np.asarray(shape_ids[:1], dtype=np.int64), self._one
        lo, hi = np.ascontiguousarray(lo, dtype=np.int64), np.ascontiguousarray(hi, dtype=np.int64)
        threaded = self._choice is not None and self._choice.threaded()
        kernel, extra = (self._kernels[1], (self.threads,)) if threaded else (self._kernels[0], ())
        start = time.perf_counter()
        if self._padded:
            kernel(mols, lo, hi, row, *self._inputs, *ring.outputs, *extra)
        else:
            kernel(mols, lo, hi, cls, row, shapes, *self._inputs, *ring.outputs, *extra)
        if self._choice is not None:
            self._choice.record(threaded, (time.perf_counter() - start) / max(int(hi[-1, -1] - lo[0, 0]), 1))
        if not self.reuse:
            self._out.append(ring)
            return [ring.new_views(0, int(cls[0]))]
        return [dict(ring.views(r, c)) for r, c in zip(row.tolist(), cls.tolist())]

    def _recycled_ring(self) -> _Ring:
        """A one-row ring (all classes) for an item that the caller owns (``reuse=False``).

        The oldest rings handed out are checked first: a ring none of whose arrays is referenced
        outside it (no batch, no view of one, no device array aliasing it) is taken again, with
        its padding marked dirty; else a new ring. Writing into warm memory instead of fresh
        memory saves a page fault per 4 KiB. At most ``RECYCLE_SCAN`` rings are checked per item,
        and at most ``RECYCLE_TRACK`` are tracked (a caller that keeps every batch keeps them).
        """
        for _ in range(min(RECYCLE_SCAN, len(self._out))):
            ring = self._out.popleft()
            if ring.unreferenced():
                ring.mark_dirty(self._num_atoms)
                return ring
            self._out.append(ring)  # still held: look again later
        while len(self._out) >= RECYCLE_TRACK:
            self._out.popleft()
        ring = _Ring(self.shapes, self.group, 1, self._padded, self.consts, False)
        ring.track_references()
        return ring


class ThreadChoice:
    """Whether the next kernel call uses its helper threads: whichever of one thread and several
    was faster per molecule lately, the other one tried now and then.

    Helper threads only pay when they get a core of their own; on a machine whose cores are busy
    with other work they make a call slower (here 0.6-0.75x under full load from other
    processes, and a call whose helper was preempted waits for it: a whole time slice). Timing
    both keeps ``threads > 1`` from ever being much slower than one thread: the first
    ``2 * WARMUP`` calls alternate, then the better is used and the other is timed once every
    ``period`` calls; the period doubles (up to ``MAX_PROBE``) each time the threads lose, and is
    back to ``PROBE`` when they win. A mode's cost is the median of its last ``WINDOW`` timings
    (robust to a call preempted by another process).
    """

    WARMUP = 8
    PROBE = 32
    MAX_PROBE = 4096
    WINDOW = 9

    def __init__(self) -> None:
        self.calls = 0
        self.period = self.PROBE
        self.next_probe = 2 * self.WARMUP + self.PROBE
        self.recent: tuple[collections.deque, collections.deque] = (
            collections.deque(maxlen=self.WINDOW), collections.deque(maxlen=self.WINDOW))  # fmt: skip

    def threaded(self) -> bool:
        self.calls += 1
        if self.calls <= 2 * self.WARMUP:
            return bool(self.calls % 2)
        better = self.cost(True) < self.cost(False)
        if self.calls < self.next_probe:
            return better
        self.period = self.PROBE if better else min(2 * self.period, self.MAX_PROBE)
        self.next_probe = self.calls + self.period
        return not better

    def cost(self, threaded: bool) -> float:
        """Median seconds per molecule of the recent calls in one mode."""
        values = sorted(self.recent[int(threaded)])
        return values[len(values) // 2] if values else 0.0

    def record(self, threaded: bool, seconds_per_molecule: float) -> None:
        self.recent[int(threaded)].append(seconds_per_molecule)


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
