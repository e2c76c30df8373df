"""Index order, shape classes (budgets), vectorised batch assembly and pair lists.

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

Assembly is vectorised over a *chunk* of many batches: one fancy index per packed file gathers the
atoms of every molecule in the chunk, and pair lists come from cached per-size templates offset with
``np.repeat``. Each batch is a set of views into the chunk's fresh arrays, so a batch is never
overwritten while a consumer holds it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

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


def exclusive_cumsum(values: np.ndarray) -> np.ndarray:
    """(k,) int64 running totals before each entry: ``[0, v0, v0 + v1, ...]`` without the grand total."""
    out = np.cumsum(values, dtype=np.int64)
    out -= values
    return out


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


def within_cutoff(R: np.ndarray, dst: np.ndarray, src: np.ndarray, cutoff: float) -> np.ndarray:
    """(k,) bool: pairs whose distance is below ``cutoff`` Å, in float32.

    The same arithmetic is used for counting pairs ahead of an epoch and for building them, so the
    counts and the lists always agree.
    """
    d = R[dst] - R[src]
    d2 = d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2]
    return d2 < np.float32(cutoff) * np.float32(cutoff)


def cutoff_pair_counts(ds: PackedDataset, n_atoms: np.ndarray, cutoff: float, chunk_atoms: int = 1 << 20) -> np.ndarray:
    """(N,) int64 ordered pairs closer than ``cutoff`` Å in each molecule of ``ds``.

    One streaming pass over ``R`` in chunks of about ``chunk_atoms`` atoms (bounded memory).
    """
    offsets = np.asarray(ds.offsets)
    out = np.zeros(ds.n_molecules, dtype=np.int64)
    start, t_dst, t_src = pair_templates(int(n_atoms.max(initial=0)))
    lo = 0
    while lo < ds.n_molecules:
        hi = int(np.searchsorted(offsets, offsets[lo] + chunk_atoms, side="right")) - 1
        hi = min(max(hi, lo + 1), ds.n_molecules)
        n = n_atoms[lo:hi].astype(np.int64)
        R = np.asarray(ds.R[offsets[lo] : offsets[hi]])
        pc = n * (n - 1)
        tpos = ranges(start[n], pc)
        atom0 = np.repeat(offsets[lo:hi] - offsets[lo], pc)
        keep = within_cutoff(R, t_dst[tpos] + atom0, t_src[tpos] + atom0, cutoff)
        owner = np.repeat(np.arange(hi - lo), pc)
        out[lo:hi] = np.bincount(owner[keep], minlength=hi - lo)
        lo = hi
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


def group_batches(plan: EpochPlan, group_size: int, rng: np.random.Generator | None) -> np.ndarray:
    """Arrange the epoch's batches in groups of ``group_size`` batches of one shape class.

    Groups feed data parallelism: a group is one global step, split over processes and devices,
    which must all see the same shape. Each class's batches are cut into groups in plan order;
    the last group of a class is completed with all-padding batches (-1). Groups are then put in
    a (seeded) random order, or kept in class order when ``rng`` is None.

    Returns:
        (n_groups, group_size) int64 batch ids into ``plan``, -1 for an all-padding batch.
    """
    ids = np.arange(plan.n_batches, dtype=np.int64)
    if group_size == 1:
        return ids[:, None]
    groups = []
    for k in range(len(plan.shapes)):
        mine = ids[plan.shape_ids == k]
        pad = (-mine.shape[0]) % group_size
        groups.append(np.concatenate([mine, np.full(pad, -1, dtype=np.int64)]).reshape(-1, group_size))
    out = np.concatenate(groups) if groups else np.zeros((0, group_size), dtype=np.int64)
    if rng is not None:
        out = out[rng.permutation(out.shape[0])]
    return out


def group_shape_ids(plan: EpochPlan, groups: np.ndarray) -> np.ndarray:
    """(n_groups,) int32 class of each group (every batch in a group has it)."""
    first = np.max(groups, axis=1)  # any real batch; a group has at least one
    return plan.shape_ids[first]


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutSpec:
    """How to assemble batches: layout, padded size, optional cutoff (Å)."""

    layout: str  # "padded" or "packed"
    num_atoms: int = 0  # padded layout only
    cutoff: float | None = None


class Assembler:
    """Builds batch dicts from a packed dataset, a chunk of batches at a time.

    Args:
        ds: the packed dataset (memmaps).
        n_atoms: (N,) int32 atoms per molecule, in memory.
        offsets: (N+1,) int64 atom offsets, in memory.
        spec: the layout.
    """

    def __init__(self, ds: PackedDataset, n_atoms: np.ndarray, offsets: np.ndarray, spec: LayoutSpec) -> None:
        self.ds = ds
        self.n_atoms = n_atoms
        self.offsets = offsets
        self.spec = spec
        self.atom_arrays = {"Z": np.asarray(ds.Z), "R": np.asarray(ds.R)}  # plain views: faster take
        if ds.F is not None:
            self.atom_arrays["F"] = np.asarray(ds.F)
        if spec.layout == "padded":
            self._padded_constants(spec.num_atoms)

    def _padded_constants(self, na: int) -> None:
        start, t_dst, t_src = pair_templates(na)
        self._local_dst = t_dst[start[na] : start[na + 1]]
        self._local_src = t_src[start[na] : start[na + 1]]
        sizes = np.arange(na + 1, dtype=np.int32)[:, None]
        self._mask_table = (self._local_dst[None, :] < sizes) & (self._local_src[None, :] < sizes)
        self._padded_cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def padded_indices(self, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Shared read-only ``dst_idx``, ``src_idx`` (P,) and ``batch_segments`` (A,) of the padded layout."""
        if batch_size not in self._padded_cache:
            na = self.spec.num_atoms
            per = self._local_dst.shape[0]
            shift = np.repeat(np.arange(batch_size, dtype=np.int32) * na, per)
            dst = np.tile(self._local_dst, batch_size) + shift
            src = np.tile(self._local_src, batch_size) + shift
            seg = np.repeat(np.arange(batch_size, dtype=np.int32), na)
            for array in (dst, src, seg):
                array.setflags(write=False)
            self._padded_cache[batch_size] = (dst, src, seg)
        return self._padded_cache[batch_size]

    def assemble(
        self, plan: EpochPlan, batch_ids: np.ndarray, shape_ids: np.ndarray, group: int = 1
    ) -> list[dict[str, np.ndarray]]:
        """Batch dicts for ``batch_ids`` (-1: all padding) with classes ``shape_ids``, as views of one chunk.

        Args:
            plan: the epoch plan the ids refer to.
            batch_ids: (k,) int64 batch ids.
            shape_ids: (k,) int32 class of each (needed for all-padding batches).
            group: 1 for one dict per batch; D > 1 for one dict per D consecutive batches (which must
                share a class), each array with a leading axis D.
        """
        real = batch_ids >= 0
        lo = np.where(real, plan.bounds[np.maximum(batch_ids, 0)], 0)
        hi = np.where(real, plan.bounds[np.maximum(batch_ids, 0) + 1], 0)
        counts = hi - lo
        mols = plan.mols[ranges(lo, counts)]
        shapes = np.asarray([plan.shapes[s] for s in shape_ids], dtype=np.int64).reshape(-1, 3)
        chunk = _Chunk(self, mols, counts, shapes)
        return chunk.split() if group == 1 else chunk.stacked(group)


class _Chunk:
    """One vectorised assembly of ``k`` batches into flat arrays (batch after batch)."""

    def __init__(self, asm: Assembler, mols: np.ndarray, counts: np.ndarray, shapes: np.ndarray) -> None:
        self.asm = asm
        self.padded = asm.spec.layout == "padded"
        self.k = counts.shape[0]
        self.shapes = shapes
        self.A_base = exclusive_cumsum(shapes[:, 0])
        self.M_base = exclusive_cumsum(shapes[:, 1])
        self.P_base = exclusive_cumsum(shapes[:, 2])
        self.mols = mols
        self.n = asm.n_atoms[mols].astype(np.int64)
        self.mol_batch = np.repeat(np.arange(self.k), counts)
        self.slot = np.arange(mols.shape[0], dtype=np.int64) - np.repeat(exclusive_cumsum(counts), counts)
        if self.padded:
            self.atom_start = self.slot * asm.spec.num_atoms  # first atom of each molecule, in its batch
        else:
            cum_n = exclusive_cumsum(self.n)
            first = np.repeat(exclusive_cumsum(counts), counts)
            self.atom_start = cum_n - cum_n[first] if mols.size else cum_n
        self.out: dict[str, np.ndarray] = {}
        self._molecules()
        self._atoms()
        self._pairs()

    def _molecules(self) -> None:
        ds, TM = self.asm.ds, int(self.shapes[:, 1].sum())
        where = self.M_base[self.mol_batch] + self.slot
        E = np.zeros(TM, dtype=np.float64)
        E[where] = ds.E[self.mols]
        Q = np.zeros(TM, dtype=np.float64)
        if ds.Qtot is not None:
            Q[where] = ds.Qtot[self.mols]
        N = np.zeros(TM, dtype=np.int32)
        N[where] = self.n
        mask = np.zeros(TM, dtype=bool)
        mask[where] = True
        idx = np.full(TM, -1, dtype=np.int64)
        idx[where] = self.mols
        self.out.update(E=E, Qtot=Q, N=N, mol_mask=mask, mol_idx=idx)

    def _atoms(self) -> None:
        asm, TA = self.asm, int(self.shapes[:, 0].sum())
        src = ranges(asm.offsets[self.mols], self.n)
        gathered = {key: array.take(src, axis=0) for key, array in asm.atom_arrays.items()}
        out = {
            "Z": np.zeros(TA, dtype=np.int32),
            "R": np.zeros((TA, 3), dtype=np.float32),
            "F": np.zeros((TA, 3), dtype=np.float32),
            "atom_mask": np.zeros(TA, dtype=bool),
        }
        gathered["atom_mask"] = np.ones(src.shape[0], dtype=bool)
        if self.padded:
            dest = ranges(self.A_base[self.mol_batch] + self.atom_start, self.n)
            for key, values in gathered.items():
                out[key][dest] = values
        else:
            seg = np.repeat(self.shapes[:, 1] - 1, self.shapes[:, 0]).astype(np.int32)
            gathered["batch_segments"] = np.repeat(self.slot.astype(np.int32), self.n)
            out["batch_segments"] = seg
            real = np.bincount(self.mol_batch, weights=self.n, minlength=self.k).astype(np.int64)
            first = exclusive_cumsum(real)
            for b in range(self.k):
                a0, f, r = int(self.A_base[b]), int(first[b]), int(real[b])
                for key, values in gathered.items():
                    out[key][a0 : a0 + r] = values[f : f + r]
        self.out.update(out)

    def _pairs(self) -> None:
        if self.padded:
            self._padded_pair_mask()
        else:
            self._packed_pairs()

    def _padded_pair_mask(self) -> None:
        asm = self.asm
        mask = asm._mask_table[self.out["N"]].reshape(-1)
        cutoff = asm.spec.cutoff
        if cutoff is not None and mask.any():
            B = int(self.shapes[0, 1])
            dst, src, _ = asm.padded_indices(B)
            real = np.flatnonzero(mask)
            per_batch = dst.shape[0]
            batch = real // per_batch
            base = (batch * int(self.shapes[0, 0])).astype(np.int64)
            within = within_cutoff(self.out["R"], dst[real % per_batch] + base, src[real % per_batch] + base, cutoff)
            mask[real[~within]] = False
        self.out["pair_mask"] = mask

    def _packed_pairs(self) -> None:
        """Pair lists of the packed layout: real pairs first in each batch, then padding pairs.

        ``dst`` is each atom repeated ``n - 1`` times (dst-sorted, as e3x); ``src`` comes from the
        cached per-size templates, shifted by the molecule's first atom.
        """
        n32 = self.n.astype(np.int32)
        pc = n32 * (n32 - 1)
        start, _, t_src = pair_templates(int(self.n.max(initial=0)))
        local_atoms = ranges(self.atom_start, self.n).astype(np.int32)
        dst = np.repeat(local_atoms, np.repeat(n32 - 1, n32))
        tpos = np.repeat((start[self.n] - exclusive_cumsum(pc)).astype(np.int32), pc)
        tpos += np.arange(tpos.shape[0], dtype=np.int32)
        src = t_src.take(tpos)
        src += np.repeat(self.atom_start.astype(np.int32), pc)
        pair_batch_counts = np.bincount(self.mol_batch, weights=pc, minlength=self.k).astype(np.int64)
        cutoff = self.asm.spec.cutoff
        if cutoff is not None:
            pair_batch = np.repeat(np.arange(self.k), pair_batch_counts)
            base = self.A_base[pair_batch].astype(np.int32)
            keep = within_cutoff(self.out["R"], dst + base, src + base, cutoff)
            dst, src = dst[keep], src[keep]
            pair_batch_counts = np.bincount(pair_batch[keep], minlength=self.k)
        TP = int(self.shapes[:, 2].sum())
        out_dst = np.empty(TP, dtype=np.int32)
        out_src = np.empty(TP, dtype=np.int32)
        mask = np.zeros(TP, dtype=bool)
        first = exclusive_cumsum(pair_batch_counts)
        for b in range(self.k):
            p0, real, P = int(self.P_base[b]), int(pair_batch_counts[b]), int(self.shapes[b, 2])
            f = int(first[b])
            out_dst[p0 : p0 + real] = dst[f : f + real]
            out_src[p0 : p0 + real] = src[f : f + real]
            mask[p0 : p0 + real] = True
            pad_atom = int(self.shapes[b, 0]) - 1  # always a padding atom in the packed layout
            out_dst[p0 + real : p0 + P] = pad_atom
            out_src[p0 + real : p0 + P] = pad_atom
        self.out.update(dst_idx=out_dst, src_idx=out_src, pair_mask=mask)

    def split(self) -> list[dict[str, np.ndarray]]:
        """Per-batch dicts of views into the chunk arrays."""
        out = self.out
        padded_consts = None
        if self.padded and self.k:
            dst, src, seg = self.asm.padded_indices(int(self.shapes[0, 1]))
            padded_consts = {"dst_idx": dst, "src_idx": src, "batch_segments": seg}
        batches = []
        for b in range(self.k):
            A, M, P = (int(x) for x in self.shapes[b])
            a0, m0, p0 = int(self.A_base[b]), int(self.M_base[b]), int(self.P_base[b])
            batch = {
                "Z": out["Z"][a0 : a0 + A],
                "R": out["R"][a0 : a0 + A],
                "F": out["F"][a0 : a0 + A],
                "atom_mask": out["atom_mask"][a0 : a0 + A],
                "E": out["E"][m0 : m0 + M],
                "Qtot": out["Qtot"][m0 : m0 + M],
                "N": out["N"][m0 : m0 + M],
                "mol_mask": out["mol_mask"][m0 : m0 + M],
                "mol_idx": out["mol_idx"][m0 : m0 + M],
                "pair_mask": out["pair_mask"][p0 : p0 + P],
            }
            if padded_consts is not None:
                batch.update(padded_consts)
            else:
                batch["batch_segments"] = out["batch_segments"][a0 : a0 + A]
                batch["dst_idx"] = out["dst_idx"][p0 : p0 + P]
                batch["src_idx"] = out["src_idx"][p0 : p0 + P]
            batches.append({key: batch[key] for key in BATCH_KEYS})
        return batches

    def stacked(self, group: int) -> list[dict[str, np.ndarray]]:
        """Dicts with a leading axis ``group``: consecutive batches of one shape, as reshaped views."""
        out = self.out
        stacks = []
        for g in range(0, self.k, group):
            A, M, P = (int(x) for x in self.shapes[g])
            a0, m0, p0 = int(self.A_base[g]), int(self.M_base[g]), int(self.P_base[g])
            stack = {}
            for key, base, size in (
                ("Z", a0, A), ("R", a0, A), ("F", a0, A), ("atom_mask", a0, A),
                ("E", m0, M), ("Qtot", m0, M), ("N", m0, M), ("mol_mask", m0, M), ("mol_idx", m0, M),
                ("pair_mask", p0, P),
            ):  # fmt: skip
                part = out[key][base : base + group * size]
                stack[key] = part.reshape((group, size) + part.shape[1:])
            if self.padded:
                dst, src, seg = self.asm.padded_indices(M)
                stack["dst_idx"] = np.broadcast_to(dst, (group,) + dst.shape)
                stack["src_idx"] = np.broadcast_to(src, (group,) + src.shape)
                stack["batch_segments"] = np.broadcast_to(seg, (group,) + seg.shape)
            else:
                stack["batch_segments"] = out["batch_segments"][a0 : a0 + group * A].reshape(group, A)
                stack["dst_idx"] = out["dst_idx"][p0 : p0 + group * P].reshape(group, P)
                stack["src_idx"] = out["src_idx"][p0 : p0 + group * P].reshape(group, P)
            stacks.append({key: stack[key] for key in BATCH_KEYS})
        return stacks
