"""Batch assembly: the compiled kernels filling buffer rings, several items per call.

``Assembler`` turns an epoch plan's bounds into batch dicts: it takes rows of a ``BufferRing``
(``packedqdc.buffers``), calls the kernels of ``packedqdc.kernels`` once per ``chunk`` items, in
the calling thread or on the kernels' threads (whichever ``ThreadChoice`` timed faster), and hands
out views of the rows.
"""

from __future__ import annotations

import collections
import time

import numpy as np

from .batching import BatchShape, LayoutSpec, padded_constants, squared_cutoff
from .buffers import BufferRing, RecycledRings, RowPool
from .format import PackedDataset
from .kernels import (
    PairRule,
    Source,
    fill_packed,
    fill_packed_threaded,
    fill_padded,
    fill_padded_threaded,
    kernel_threads,
)

ITEMS_PER_CALL = 4  # items a kernel call fills (its threads share them)


class Assembler:
    """Builds batch dicts from a packed dataset with the compiled kernels, several items per call.

    Args:
        ds: the packed dataset (memmaps).
        offsets: (N+1,) int64 atom offsets (in memory or a read-only memmap).
        spec: the layout.
        shapes: the classes of the epoch plan.
        group: batches per item (1: plain batches; D: stacked with a leading axis D).
        reuse: True fills items into rows of reused buffers (a pool of at most ``hold + chunk``
            rows, shared by the classes when they differ in pair budget only, as automatic budgets
            do, else one per class; ``buffers.RowPool``), so that an item handed out stays intact
            while ``hold`` more are handed out and the next ``chunk`` are filled; the views are
            read-only. False hands every item out in writable arrays of its own: a call's items
            share one ring, recycled once nothing references any of them (``buffers.RecycledRings``).
        hold: see ``reuse``.
        pair_counts: packed layout with a cutoff: (N,) pairs within it of every dataset molecule
            (``cutoff_pair_counts``, any unsigned dtype); None otherwise.
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
        self.chunk = ITEMS_PER_CALL  # more per call would outgrow the cache (8 QM9-sized batches: 10% slower)
        self._padded = spec.layout == "padded"
        counts = np.zeros(0, np.int64) if self._padded or spec.cutoff is None else pair_counts
        self._source = tuple(Source(
            offsets, np.asarray(ds.Z), np.asarray(ds.R).reshape(-1),
            np.zeros(0, np.float32) if ds.F is None else np.asarray(ds.F).reshape(-1),
            np.asarray(ds.E), np.zeros(0) if ds.Qtot is None else np.asarray(ds.Qtot),
        ))  # fmt: skip  (plain tuples: see kernels' named structures)
        self._pairs = tuple(PairRule(
            squared_cutoff(spec.cutoff) if spec.cutoff is not None else np.float32(0.0), spec.cutoff is not None,
            np.asarray(counts),
        ))  # fmt: skip
        self._kernels = (fill_padded, fill_padded_threaded) if self._padded else (fill_packed, fill_packed_threaded)
        self._choice = ThreadChoice() if self.threads > 1 else None
        self.consts = padded_constants(spec.num_atoms, shapes[0].M) if self._padded else {}
        self._shapes = np.array(shapes, dtype=np.int64).reshape(-1, 3)
        # One pool of rows for all classes when a row can pass from class to class keeping its marks
        # (one batch per item, same atom and molecule budgets: the automatic budgets), else one per class.
        self._shared = group == 1 and len({(s.A, s.M) for s in shapes}) == 1
        pools = 1 if self._shared else len(shapes)
        slots = hold + self.chunk  # rows per pool: all of a call's items may draw from one pool
        if reuse:
            self._ring = BufferRing(shapes, group, pools * slots, self._padded, self.consts, True)
            self._rows = RowPool(pools, slots, hold)
        else:
            self._recycled = RecycledRings(shapes, group, self._padded, self.consts, spec.num_atoms, self.chunk)

    def assemble(self, mols: np.ndarray, lo: np.ndarray, hi: np.ndarray, shape_ids: np.ndarray) -> list[dict]:
        """Items of batches ``mols[lo[g, b]:hi[g, b]]`` (lo == hi: all padding), item ``g`` of class ``shape_ids[g]``.

        Args:
            mols: (L,) int64 dataset indices of the epoch, batch after batch.
            lo, hi: (G, group) int64 bounds in ``mols``; G <= ``chunk``.
            shape_ids: (G,) class of each item.
        """
        if self.reuse:
            ring = self._ring
            cls = np.asarray(shape_ids, dtype=np.int64)
            row = self._rows.take([0] * len(cls) if self._shared else cls.tolist())
        else:  # a ring of the call's own, recycled once the caller dropped every batch of it
            ring = self._recycled.take()
            cls = np.asarray(shape_ids, dtype=np.int64)
            row = np.arange(len(cls), dtype=np.int64)
        lo, hi = np.ascontiguousarray(lo, dtype=np.int64), np.ascontiguousarray(hi, dtype=np.int64)
        items = (mols, lo, hi, cls, row, self._shapes)  # kernels.Items, as a plain tuple
        threaded, timed = self._choice.next_call() if self._choice is not None else (False, False)
        if timed:
            start = time.perf_counter()
        if threaded:
            self._kernels[1](items, self._source, self._pairs, ring.out, self.threads)
        else:
            self._kernels[0](items, self._source, self._pairs, ring.out)
        if timed:
            self._choice.record(threaded, (time.perf_counter() - start) / max(int(hi[-1, -1] - lo[0, 0]), 1))
        if not self.reuse:
            return [ring.new_views(r, c) for r, c in zip(row.tolist(), cls.tolist())]
        return [dict(ring.views(r, c)) for r, c in zip(row.tolist(), cls.tolist())]


class ThreadChoice:
    """Whether the next kernel call uses its helper threads: whichever of one thread and several
    was faster per molecule lately, the other one tried now and then.

    Helper threads only pay when they get a core of their own; on a machine whose cores are busy
    with other work they make a call slower (here 0.6-0.75x under full load from other
    processes, and a call whose helper was preempted waits for it: a whole time slice). Timing
    both keeps ``threads > 1`` from being slower than one thread: the first ``2 * WARMUP`` calls
    alternate, then the better is used and the other is tried once every ``period`` calls; the
    period doubles (up to ``MAX_PROBE``) each time the threads lose, and is back to ``PROBE`` when
    they win or a probe beats the other mode's median. A mode's cost is the median of its last
    ``WINDOW`` timings (robust to a call preempted by another process). Between probes only the
    ``WINDOW`` calls before the next probe are timed, so that the choice costs a counter in the
    steady state (timing every call cost ~4 µs, 5% of a call of four QM9-sized batches).
    """

    WARMUP = 8
    PROBE = 32
    MAX_PROBE = 4096
    WINDOW = 9

    def __init__(self) -> None:
        self.calls = 0
        self.period = self.PROBE
        self.next_probe = 2 * self.WARMUP + self.PROBE
        self.better = False
        self.recent: tuple[collections.deque, collections.deque] = (
            collections.deque(maxlen=self.WINDOW), collections.deque(maxlen=self.WINDOW))  # fmt: skip

    def next_call(self) -> tuple[bool, bool]:
        """(use the helper threads, time the call and ``record`` it) for the next call."""
        self.calls += 1
        if self.calls <= 2 * self.WARMUP:
            return bool(self.calls % 2), True
        if self.calls < self.next_probe:
            return self.better, self.calls >= self.next_probe - self.WINDOW
        self.better = self._faster()
        self.period = self.PROBE if self.better else min(2 * self.period, self.MAX_PROBE)
        self.next_probe = self.calls + self.period
        return not self.better, True

    def cost(self, threaded: bool) -> float:
        """Median seconds per molecule of the recent calls in one mode."""
        values = sorted(self.recent[int(threaded)])
        return values[len(values) // 2] if values else 0.0

    def record(self, threaded: bool, seconds_per_molecule: float) -> None:
        probe = self.calls > 2 * self.WARMUP and threaded != self.better
        if probe and seconds_per_molecule < self.cost(self.better):  # promising: probe again soon
            self.period = self.PROBE
            self.next_probe = self.calls + self.period
        self.recent[int(threaded)].append(seconds_per_molecule)
        if probe or self.calls <= 2 * self.WARMUP:
            self.better = self._faster()

    def _faster(self) -> bool:
        """True when the helper threads were faster lately."""
        return self.cost(True) < self.cost(False)
