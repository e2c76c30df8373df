"""Output buffers of batch assembly: rings of buffer sets, their rows, and recycling.

A ``BufferRing`` holds ``rows`` sets of the kernels' output arrays (``kernels.PackedOut`` or
``kernels.PaddedOut``) and hands out batch dicts that view one row. Writing into memory already
touched is what makes assembly fast (a fresh page costs a fault per 4 KiB, ~0.35 GB/s on a VM,
against ~10 GB/s into touched memory), so rows are used again:

- ``RowPool``: with ``reuse_buffers=True`` the rows of one ring are handed out over and over; an
  item stays intact while ``hold`` more are handed out, and the row given back last is taken first.
- ``RecycledRings``: with ``reuse_buffers=False`` every item has a one-row ring of its own, taken
  again once nothing references its arrays any more (no batch, no view, no device array aliasing it).
"""

from __future__ import annotations

import collections
import sys

import numpy as np

from .batching import BATCH_KEYS, BatchShape
from .kernels import PackedOut, PaddedOut

RECYCLE_SCAN = 4  # rings checked for reuse per item of batches(reuse_buffers=False)
RECYCLE_TRACK = 64  # rings of handed-out items tracked for reuse at most


class BufferRing:
    """``rows`` buffer sets for items of ``group`` batches of the classes ``shapes``, and their views.

    ``arrays`` are the kernels' outputs as (rows, group * largest size) arrays; an item of class
    ``c`` in row ``r`` uses the first ``group * (A, M, P)`` entries. ``out`` is the same arrays as
    the kernels take them (``PackedOut`` with ``marks`` (rows, group, 4) and ``owner`` (rows,), or
    ``PaddedOut``), as a plain tuple (numba dispatches it faster than a named one).
    ``views(row, c)`` is the batch dict of a row holding class ``c`` (leading axis ``group`` when
    ``group > 1``), read-only when the sets are reused.

    Args:
        shapes: the classes the rows serve; padded: one class.
        consts: the padded layout's shared read-only ``dst_idx``, ``src_idx``, ``batch_segments``.
        reused: views are read-only (the rows are overwritten by later items).
    """

    def __init__(
        self, shapes: tuple[BatchShape, ...], group: int, rows: int, padded: bool, consts: dict[str, np.ndarray],
        reused: bool,
    ) -> None:  # fmt: skip
        self.shapes, self.group, self.consts, self.reused = shapes, group, consts, reused
        self.padded = padded
        A, M, P = (group * max(s[i] for s in shapes) for i in range(3))
        self.arrays = {
            "Z": np.empty((rows, A), np.int32), "R": np.empty((rows, 3 * A), np.float32),
            "F": np.empty((rows, 3 * A), np.float32), "atom_mask": np.empty((rows, A), bool),
            "E": np.empty((rows, M)), "Qtot": np.empty((rows, M)), "mol_mask": np.empty((rows, M), bool),
            "mol_idx": np.empty((rows, M), np.int64), "pair_mask": np.empty((rows, P), bool),
        }  # fmt: skip
        if padded:  # one class
            self.arrays["N"] = np.full((rows, M), shapes[0].A // shapes[0].M, np.int32)  # fresh: dirty up to num_atoms
            self.out = tuple(PaddedOut(**{key: self.arrays[key] for key in PaddedOut._fields}))
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
            arrays = {**self.arrays, "marks": self.marks, "owner": self.owner}
            self.out = tuple(PackedOut(**{key: arrays[key] for key in PackedOut._fields}))
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
        if self.padded:
            self.arrays["N"].fill(num_atoms)
        else:
            self.marks.fill(-1)
            self.owner.fill(-1)


def _stack_view(array: np.ndarray, group: int) -> np.ndarray:
    """(group * n, ...) -> (group, n, ...) view; a shared constant (n, ...) is broadcast instead."""
    if not array.flags.writeable:  # the padded layout's shared constants
        return np.broadcast_to(array, (group,) + array.shape)
    return array.reshape((group, array.shape[0] // group) + array.shape[1:])


class RowPool:
    """The rows of a reused ring, handed out so that an item stays intact while ``hold`` more are.

    The ring has ``pools`` pools of ``slots`` rows (one for all classes, or one per class); pool
    ``p`` owns rows ``p * slots .. (p + 1) * slots``. Of the items handed out so far, all but the
    last ``hold`` give their rows back; the row given back last is taken first (its lines are the
    likeliest to be in cache), and a row never used only when none is free (rows never used are
    never touched and cost no memory).
    """

    def __init__(self, pools: int, slots: int, hold: int) -> None:
        self.slots = slots
        self.hold = hold
        self._free: list[list[int]] = [[] for _ in range(pools)]  # per pool, rows last given back first
        self._unused = [0] * pools  # per pool, rows never used so far
        self._held: collections.deque[tuple[int, int]] = collections.deque()  # (pool, row) handed out, in order

    def take(self, pools: list[int]) -> np.ndarray:
        """(G,) int64 rows for the next ``G`` items, item ``g`` from pool ``pools[g]``."""
        while len(self._held) > self.hold:
            pool, released = self._held.popleft()
            self._free[pool].append(released)
        rows = np.empty(len(pools), dtype=np.int64)
        for g, pool in enumerate(pools):
            if self._free[pool]:
                rows[g] = self._free[pool].pop()
            else:
                rows[g] = pool * self.slots + self._unused[pool]
                self._unused[pool] += 1
            self._held.append((pool, int(rows[g])))
        return rows


class RecycledRings:
    """Rings of ``rows`` rows (one per item of a kernel call) for items the caller owns
    (``reuse_buffers=False``), taken again once free: once no batch of the ring is alive.

    The oldest rings handed out are checked first: a ring none of whose arrays is referenced
    outside it (no batch, no view of one, no device array aliasing it) is taken again, with its
    padding marked dirty (the caller may have written into it); else a new ring. At most
    ``RECYCLE_SCAN`` rings are checked per item, and at most ``RECYCLE_TRACK`` are tracked (a
    caller that keeps every batch keeps them).
    """

    def __init__(self, shapes: tuple[BatchShape, ...], group: int, padded: bool, consts: dict[str, np.ndarray],
                 num_atoms: int, rows: int = 1) -> None:  # fmt: skip
        self.shapes, self.group, self.padded, self.consts, self.num_atoms = shapes, group, padded, consts, num_atoms
        self.rows = rows
        self._out: collections.deque[BufferRing] = collections.deque()  # rings handed out, oldest first

    def take(self) -> BufferRing:
        """A free ring (or a new one), counted as handed out from now on."""
        ring = self._free_ring()
        self._out.append(ring)
        return ring

    def tracked(self) -> list[BufferRing]:
        """The rings handed out and still tracked, oldest first."""
        return list(self._out)

    def _free_ring(self) -> BufferRing:
        for _ in range(min(RECYCLE_SCAN, len(self._out))):
            ring = self._out.popleft()
            if ring.unreferenced():
                ring.mark_dirty(self.num_atoms)
                return ring
            self._out.append(ring)  # still held: look again later
        while len(self._out) >= RECYCLE_TRACK:
            self._out.popleft()
        ring = BufferRing(self.shapes, self.group, self.rows, self.padded, self.consts, False)
        ring.track_references()
        return ring
