"""Index order, shape classes (budgets) and pair counts: the plan of an epoch.

Everything here works on plain numpy arrays and a :class:`~packedqdc.format.PackedDataset`; the
batches themselves are assembled by :mod:`packedqdc.assembly` (into the buffers of
:mod:`packedqdc.buffers`, with the kernels of :mod:`packedqdc.kernels`), and the loader
(:mod:`packedqdc.loader`) adds epochs, prefetch, sharding and resumable position on top.

Two layouts share one batch contract (``docs/architecture.md``):

- ``padded``: ``M = batch_size`` molecule slots of ``num_atoms`` atom slots each, so
  ``A = M * num_atoms`` and ``P = M * num_atoms * (num_atoms - 1)``. ``dst_idx``, ``src_idx`` and
  ``batch_segments`` are the same for every batch (shared read-only arrays); ``pair_mask`` selects
  the real pairs of each slot.
- ``packed``: molecules fill an atom budget ``A`` and a pair budget ``P`` back to back; a few budget
  classes ``(A, M, P)`` keep padding small. The last atom slot and the last molecule slot of a
  packed batch are always padding, so padding atoms and pairs have a valid place to point.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .errors import ConfigError
from .format import PackedDataset
from .index import (
    block_cuts,
    count_dtype,
    first_over,
    greedy_plan,
    index_dtype,
    read_entries,
    take_in_place,
    totals,
)
from .kernels import count_within
from .shuffle import ORDER_VERSION, sample_positions, shuffled, shuffled_with

BATCH_KEYS = (
    "Z", "R", "F", "atom_mask", "batch_segments",
    "E", "Qtot", "N", "mol_mask", "mol_idx",
    "dst_idx", "src_idx", "pair_mask",
)  # fmt: skip

MAX_CLASSES = 4
#: order version 2 designs budgets from a trial epoch of this many molecules (a random sample) at most
BUDGET_TRIAL_MOLECULES = 1 << 22
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
        mols: (n,) dataset indices of the molecules, batch after batch (int32 below 2^31 molecules).
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


def cutoff_pair_counts(ds: PackedDataset, offsets: np.ndarray, cutoff: float, sizes: np.ndarray) -> np.ndarray:
    """(N,) ordered pairs closer than ``cutoff`` Å in each molecule of ``ds``, in the smallest
    unsigned dtype that holds ``n (n - 1)`` of the largest molecule.

    One compiled pass over ``R`` straight from the memmap (no copies; memory stays bounded).

    Args:
        offsets: (N+1,) int64 atom offsets of ``ds`` (in memory or memory-mapped).
        sizes: (N,) atoms of every molecule.
    """
    n_max = int(sizes.max(initial=0))
    out = np.zeros(ds.n_molecules, dtype=count_dtype(n_max * (n_max - 1)))
    count_within(offsets, np.asarray(ds.R).reshape(-1), squared_cutoff(cutoff), out)
    return out


def pair_counts_of(sizes: np.ndarray, mols: np.ndarray, pair_counts: np.ndarray | None) -> np.ndarray:
    """(len(mols),) int64 pairs of the molecules ``mols``: ``pair_counts[mols]``, or all ordered pairs."""
    if pair_counts is None:
        return all_pair_counts(sizes[mols])
    return np.asarray(pair_counts)[mols].astype(np.int64)


def _counts_arg(pair_counts: np.ndarray | None) -> np.ndarray:
    """The compiled passes' form of ``pair_counts``: the array, or (0,) for all ordered pairs."""
    return np.zeros(0, np.int64) if pair_counts is None else np.asarray(pair_counts)


def _per_position(indices: np.ndarray, sizes: np.ndarray, pair_counts: np.ndarray | None,
                  rng: np.random.Generator | None, version: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(``indices`` in the epoch's random order, their atoms, their pairs or (0,) for all ordered
    pairs). ``rng`` None keeps the order of ``indices``. ``sizes`` and ``pair_counts`` are
    by dataset molecule; they are read along with the shuffle (``shuffle.shuffled_with``)."""
    by_value = (sizes,) if pair_counts is None else (sizes, np.asarray(pair_counts))
    if rng is None:  # the plan may share ``indices`` (neither is ever written)
        L = indices.shape[0]
        mols = np.asarray(indices, dtype=index_dtype(max(int(indices.max(initial=0)) + 1, L)))
        carried = tuple(np.asarray(a)[mols] for a in by_value)  # in index order: a local gather
    else:
        mols, carried = shuffled_with(indices, by_value, rng, version)
    return mols, carried[0], (carried[1] if pair_counts is not None else _counts_arg(None))


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
    version: int = ORDER_VERSION,
) -> EpochPlan:
    """The seed's order: shuffle, sort by size within buckets, cut into batches, shuffle the batches.

    Args:
        indices: (L,) int64 dataset indices of the loader's molecules.
        n_atoms: (N,) atoms per molecule of the whole dataset.
        rng: the epoch's generator, or None for the plain order (no shuffle, no bucketing).
        version: of the shuffle (``packedqdc.shuffle``).

    Only the last batch of the epoch can be partial; it keeps the full shape (padding slots).
    """
    L = indices.shape[0]
    n_b = -(-L // batch_size)
    mols, sizes, _ = _per_position(indices, n_atoms, None, rng, version)
    counts = np.full(n_b, batch_size, dtype=np.int64)
    if n_b:
        counts[-1] = L - (n_b - 1) * batch_size
    if rng is not None and L:
        bucket = np.arange(L) // max(bucket_size, 1)
        mols = mols[np.lexsort((sizes, bucket))]
        order = rng.permutation(n_b)
        mols = mols[ranges(order * batch_size, counts[order])]
        counts = counts[order]
    shape = BatchShape(batch_size * num_atoms, batch_size, batch_size * num_atoms * (num_atoms - 1))
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return EpochPlan(mols, bounds, np.zeros(n_b, dtype=np.int32), (shape,))


def block_bounds(indices: np.ndarray, n_atoms: np.ndarray, block_atoms: int) -> np.ndarray:
    """(n_blocks + 1,) int64 bounds cutting ``indices`` into runs of about ``block_atoms`` atoms.

    Blocks are consecutive entries of ``indices`` (sorted indices: contiguous bytes of the files);
    each holds at least one molecule. A block ends after the molecule whose running atom total first
    reaches a multiple of ``block_atoms`` (one compiled pass, no cumulative-sum array).
    """
    if indices.shape[0] == 0:
        return np.zeros(1, dtype=np.int64)
    return block_cuts(indices, n_atoms, int(block_atoms))


def block_order(
    indices: np.ndarray, offsets: np.ndarray, bounds: np.ndarray, window: int, rng: np.random.Generator,
    version: int = ORDER_VERSION,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One epoch of block order: the blocks dealt into windows of about ``window`` blocks, the
    windows in a random order, the molecules of each window shuffled together.

    Version 2 deals the blocks *stratified by place in the file*: the blocks are taken in runs of
    ``n_windows`` neighbours (strata), and each run's blocks go to distinct windows at random, so
    every window holds one block from each stratum, i.e. a sample spread evenly over the whole file
    (data stored in molecule order: every window holds conformers of molecules from everywhere in
    the dataset, not of a few). Version 1 took runs of ``window`` blocks of a random permutation.
    Each window (the shuffle buffer) is read as a whole. Every molecule of ``indices`` appears
    exactly once.

    Returns:
        order: (L,) positions into ``indices`` (int32 below 2^31), in epoch order.
        window_start: (W,) int64 position in ``order`` where each window begins.
        span_ptr, spans: as ``WindowReads`` (the file spans of each window's blocks).
    """
    n_blocks = bounds.shape[0] - 1
    sizes = np.diff(bounds)
    if version == 1:
        perm = rng.permutation(n_blocks)
        cuts = np.append(np.arange(0, n_blocks, window, dtype=np.int64), n_blocks)
    else:
        perm, cuts = _stratified_windows(n_blocks, window, rng)
    order = np.empty(indices.shape[0], dtype=index_dtype(indices.shape[0]))
    starts, at = [], 0
    for w in range(cuts.shape[0] - 1):
        blocks = perm[cuts[w] : cuts[w + 1]]
        pos = ranges(bounds[blocks], sizes[blocks])
        if version == 1:
            rng.shuffle(pos)
        else:
            pos = shuffled(pos, rng, version)
        starts.append(at)
        order[at : at + pos.shape[0]] = pos
        at += pos.shape[0]
    first = indices[bounds[perm]]
    last = indices[bounds[perm + 1] - 1]
    lo, hi = np.minimum(first, last), np.maximum(first, last) + 1  # sorted indices: the block's span
    spans = np.stack([read_entries(offsets, lo), read_entries(offsets, hi), lo, hi], axis=1).astype(np.int64)
    return order, np.asarray(starts, dtype=np.int64), cuts.astype(np.int64), spans


def _stratified_windows(n_blocks: int, window: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(blocks in epoch order, (n_windows + 1,) bounds of each window in it): ``n_windows =
    ceil(n_blocks / window)``; stratum ``s`` (blocks ``s * n_windows ...``, the last one partial)
    sends one block to each of as many windows, drawn at random; windows come in a random order."""
    if n_blocks == 0:
        return np.zeros(0, np.int64), np.zeros(1, np.int64)
    n_windows = -(-n_blocks // window)
    n_strata = -(-n_blocks // n_windows)
    dest = np.argsort(rng.random((n_strata, n_windows)), axis=1).ravel()[:n_blocks]  # window of each block
    visit = rng.permutation(n_windows)  # the epoch's order of the windows
    rank = np.empty(n_windows, np.int64)
    rank[visit] = np.arange(n_windows)
    perm = np.argsort(rank[dest], kind="stable").astype(np.int64)
    counts = np.bincount(rank[dest], minlength=n_windows)
    return perm, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def block_plan(
    indices: np.ndarray, n_atoms: np.ndarray, offsets: np.ndarray, pair_counts: np.ndarray | None,
    budgets: list[BatchShape] | None, batch_size: int, num_atoms: int, block_atoms: int, window: int,
    rng: np.random.Generator, version: int = ORDER_VERSION,
) -> EpochPlan:  # fmt: skip
    """Block order, packed (``budgets``, with the dataset's ``pair_counts`` or None for all pairs)
    or padded (``batch_size`` slots of ``num_atoms``): the epoch's sequence of ``block_order``, cut
    into batches of the same static shapes as the molecule order."""
    bounds = block_bounds(indices, n_atoms, block_atoms)
    order, window_start, span_ptr, spans = block_order(indices, offsets, bounds, window, rng, version)
    mols = take_in_place(order, indices)
    if budgets is not None:
        plan = packed_plan(mols, n_atoms, pair_counts, budgets, None)
    else:
        plan = padded_plan(mols, n_atoms, batch_size, num_atoms, 1, None)
    first_batch = np.searchsorted(plan.bounds, window_start, side="right") - 1
    reads = WindowReads(first_batch.astype(np.int64), span_ptr, spans)
    return EpochPlan(plan.mols, plan.bounds, plan.shape_ids, plan.shapes, reads)


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
    indices: np.ndarray, n_atoms: np.ndarray, pair_counts: np.ndarray | None, batch_size: int, seed: int,
    max_classes: int = MAX_CLASSES, version: int = ORDER_VERSION,
) -> list[BatchShape]:  # fmt: skip
    """Budget classes for the packed layout from the size distribution of the loader's molecules.

    The atom budget is ``batch_size * mean(n) + mean(n) / 2`` (greedy filling leaves on average
    half a molecule free, so batches average ``batch_size`` molecules), plus one padding atom. A
    trial epoch (order version 2: of a random ``BUDGET_TRIAL_MOLECULES`` when there are more)
    filled to that atom budget gives per-batch pair totals; ``choose_levels`` picks up
    to ``max_classes`` pair budgets from them. ``M`` covers the most molecules seen in a batch,
    with 10% headroom and one padding slot.

    Args:
        indices: (L,) dataset indices of the loader's molecules.
        n_atoms: (N,) atoms of every dataset molecule.
        pair_counts: (N,) pairs of every dataset molecule (within a cutoff), or None: all ordered pairs.
    """
    L = indices.shape[0]
    if L == 0:
        return [BatchShape(2, 2, 1)]
    counts = _counts_arg(pair_counts)
    n_max, _, atoms_total, pairs_total = totals(indices, n_atoms, counts)
    mean_n = atoms_total / L
    a_cap = max(int(round(batch_size * mean_n + mean_n / 2)), n_max)
    rng = np.random.default_rng([seed, _BUDGET_STREAM])
    sample = indices
    if version >= 2 and L > BUDGET_TRIAL_MOLECULES:  # a random sample is as good for the distribution
        sample = take_in_place(sample_positions(L, BUDGET_TRIAL_MOLECULES, rng), indices)
    _, sizes, pairs = _per_position(sample, n_atoms, pair_counts, rng, version)
    bounds, _, p_batch = greedy_plan(sizes, pairs, a_cap, pairs_total + 1, sample.shape[0])
    del sizes, pairs
    m_max = int(np.diff(bounds).max())
    m_budget = int(np.ceil(m_max * 1.1)) + 1
    return [BatchShape(a_cap + 1, m_budget, p) for p in choose_levels(p_batch, max_classes)]


def check_budgets(
    budgets: list[BatchShape], indices: np.ndarray, n_atoms: np.ndarray, pair_counts: np.ndarray | None
) -> None:  # fmt: skip
    """ConfigError naming the first molecule that fits no budget (one atom and slot stay padding)."""
    a_cap = max(b.A for b in budgets) - 1
    p_cap = max(b.P for b in budgets)
    if max(b.M for b in budgets) < 2 or a_cap < 1:
        raise ConfigError(f"budgets {budgets}: need A >= 2 and M >= 2 (one atom and one slot stay padding)")
    j = first_over(indices, n_atoms, _counts_arg(pair_counts), a_cap, p_cap)
    if j >= 0:
        i = int(indices[j])
        n = int(n_atoms[i])
        pairs = int(pair_counts[i]) if pair_counts is not None else n * (n - 1)
        raise ConfigError(
            f"molecule {i} has {n} atoms and {pairs} pairs; the largest "
            f"budget holds {a_cap} atoms and {p_cap} pairs"
        )


def packed_plan(
    indices: np.ndarray,
    n_atoms: np.ndarray,
    pair_counts: np.ndarray | None,
    budgets: list[BatchShape],
    rng: np.random.Generator | None,
    version: int = ORDER_VERSION,
) -> EpochPlan:
    """Shuffle, fill batches greedily to the largest budget, and give each the smallest class that holds it.

    Args:
        indices: (L,) dataset indices of the loader's molecules.
        n_atoms: (N,) atoms per molecule of the whole dataset.
        pair_counts: (N,) pairs of every dataset molecule (within the cutoff), or None: all ordered pairs.
        budgets: the classes; ``check_budgets`` must have passed.
        rng: the epoch's generator, or None to keep the order of ``indices``.
        version: of the shuffle (``packedqdc.shuffle``).
    """
    shapes = tuple(sorted((BatchShape(*b) for b in budgets), key=lambda s: (s.P, s.A, s.M)))
    mols, sizes, pairs = _per_position(indices, n_atoms, pair_counts, rng, version)
    a_cap = max(s.A for s in shapes) - 1
    m_cap = max(s.M for s in shapes) - 1
    p_cap = max(s.P for s in shapes)
    bounds, a_b, p_b = greedy_plan(sizes, pairs, a_cap, p_cap, m_cap)
    del sizes, pairs
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
        sizes: (N,) the dealing key of every dataset molecule (atoms, or pairs within a cutoff; any integer dtype).
        part_classes: ``part_shapes`` of ``plan.shapes``.
    """
    n_b = plan.n_batches
    counts = np.diff(plan.bounds)
    batch = np.repeat(np.arange(n_b, dtype=np.int64), counts)
    by_size = np.lexsort((-np.asarray(sizes)[plan.mols].astype(np.int64), batch))  # within each batch, largest first
    rank = np.arange(plan.mols.shape[0], dtype=np.int64) - np.repeat(plan.bounds[:-1], counts)
    row, col = np.divmod(rank, parts)
    part = np.where(row % 2 == 0, col, parts - 1 - col)
    mols = plan.mols[by_size][np.lexsort((rank, part, batch))]  # rank, part, batch: of the sorted sequence
    per_part = np.zeros(n_b * parts, dtype=np.int64)
    np.add.at(per_part, batch * parts + part, 1)
    bounds = np.concatenate([[0], np.cumsum(per_part)]).astype(np.int64)
    return EpochPlan(mols, bounds, np.repeat(plan.shape_ids, parts), part_classes)


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutSpec:
    """How to assemble batches: layout, padded size, optional cutoff (Å)."""

    layout: str  # "padded" or "packed"
    num_atoms: int = 0  # padded layout only
    cutoff: float | None = None


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
