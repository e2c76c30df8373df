"""``PackedMemmapLoader``: the seed's loader API with correct, static-shape, prefetched batches.

A loader owns the molecule order: each epoch is shuffled by ``(seed, epoch)``, every molecule of
``indices`` appears exactly once, batches have static shapes, and the position within the epoch can
be saved (``state()``) and restored (``restore()``). See ``docs/loader.md`` for the user guide and
``docs/architecture.md`` for the batch contract.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .assembly import Assembler
from .batching import (
    BatchShape,
    EpochPlan,
    LayoutSpec,
    block_plan,
    check_budgets,
    cutoff_pair_counts,
    design_budgets,
    packed_plan,
    padded_plan,
    part_shapes,
    split_plan,
)
from .errors import ConfigError, FormatError
from .format import open_packed
from .index import atom_counts, increasing, index_dtype, take_in_place, totals
from .prefetch import prefetched
from .readahead import advise_random, release, will_need
from .shuffle import ORDER_VERSION, check_version, split_positions

LAYOUTS = ("padded", "packed")
ORDERS = ("auto", "molecule", "block")
#: order="auto" takes block order when the data files exceed this fraction of available memory, and
#: then (whatever the order) the loader hands back its mapped pages (``readahead.release``) as it
#: goes: every RELEASE_BATCHES batches in molecule order, at every new window in block order
AUTO_MEMORY_FRACTION = 0.5
RELEASE_BATCHES = 8
#: block order's shuffle window, in blocks, by order version (64 blocks of 4 MiB: a 256 MiB buffer)
DEFAULT_WINDOW_BLOCKS = {1: 16, 2: 64}
VALID_DRAWS = 1  # with reuse_buffers, a batch stays valid until this many more have been drawn

Batch = dict[str, Any]


class PackedMemmapLoader:
    """Batches of a packed directory, in the seed's API.

    Args:
        path: packed directory (see ``packedqdc.format``).
        batch_size: molecules per batch (``padded``), or the average molecules per batch (``packed``).
        shuffle: reshuffle every epoch, seeded by ``(seed, epoch)``; False keeps ``indices`` order.
        bucket_size: ``padded`` layout only: after shuffling, molecules are sorted by size within
            buckets of this many (the seed's bucketing); batches are then shuffled.
        seed: seed of every shuffle.
        budgets: fixed ``(A, M, P)`` classes for the ``packed`` layout instead of automatic ones.
        prefetch: batches assembled ahead in background threads; 0 assembles in the caller.
        workers: threads assembling batches when ``prefetch`` > 0 (the kernels release the GIL);
            worker ``w`` builds batches ``w, w + workers, ...`` and the order is unchanged.
        threads: threads that fill a kernel call's batches together, in runs of equal work (a
            call fills ``4 * threads`` batches when buffers are reused); 1: the assembling thread
            alone. The threads are packedqdc's own (no numba threading layer is used).
        process_index, process_count: this process's shard (see ``shard``).
        order: ``"molecule"``: each epoch is a shuffle of all molecules (reads one page per file
            per molecule: for data in memory). ``"block"``: each epoch deals contiguous blocks of
            about ``block_mib`` MiB of atoms into windows of ``window_blocks`` (one block from every
            part of the file each, ``batching.block_order``), visits the windows in a random order
            and shuffles each window's molecules (reads whole blocks: for data larger than memory).
            ``"auto"`` (default): block order when the data files exceed half the available
            memory, else molecule order; ``order`` then holds the choice, ``order_note`` why.
        block_mib, window_blocks: block order's block size (MiB of atom data) and shuffle window
            (blocks; default ``DEFAULT_WINDOW_BLOCKS`` of the order version: 64, i.e. 256 MiB).
        order_version: the algorithms of the orders (``packedqdc.shuffle``): 2 (default), or 1 to
            reproduce the split and orders of loaders made before version 2 existed.

    Attributes:
        dataset: the open ``PackedDataset`` (memmaps).
        n_atoms: (N_dataset,) atoms of every molecule of the dataset, in memory, in the smallest
            unsigned dtype that holds them (uint8 below 256 atoms; cast before arithmetic).
        has_forces: the dataset has forces (``F`` is zeros otherwise); has_qtot likewise for ``Qtot``.
        has_dipoles: the dataset has dipoles (``D.f64``): batches then carry ``D`` (M, 3) float64,
            e·Å, per molecule slot (zeros on padding slots), gathered by ``mol_idx``.
        epoch, position: the next batch to yield: epoch number and batches already yielded in it.

    Raises:
        FormatError: the directory is missing, damaged or inconsistent.
        ConfigError: invalid options.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        batch_size: int,
        shuffle: bool = True,
        bucket_size: int = 8192,
        seed: int = 0,
        *,
        budgets: list[tuple[int, int, int]] | None = None,
        prefetch: int = 2,
        workers: int = 1,
        threads: int = 1,
        process_index: int = 0,
        process_count: int = 1,
        order: str = "auto",
        block_mib: float = 4.0,
        window_blocks: int | None = None,
        order_version: int = ORDER_VERSION,
    ) -> None:
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if int(bucket_size) < 1:
            raise ConfigError(f"bucket_size must be >= 1, got {bucket_size}")
        if int(prefetch) < 0:
            raise ConfigError(f"prefetch must be >= 0, got {prefetch}")
        if int(workers) < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        if int(threads) < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        if order not in ORDERS:
            raise ConfigError(f"order must be one of {ORDERS}, got {order!r}")
        order_version = check_version(order_version)
        if window_blocks is None:
            window_blocks = DEFAULT_WINDOW_BLOCKS[order_version]
        if not float(block_mib) > 0 or int(window_blocks) < 1:
            raise ConfigError(f"block_mib must be > 0 and window_blocks >= 1, got {block_mib}, {window_blocks}")
        self.path = Path(path)
        self.dataset = open_packed(path)
        self.n_atoms = atom_counts(self.dataset)  # checked against the offsets
        self._offsets = np.asarray(self.dataset.offsets)  # memory-mapped, not copied
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.bucket_size = int(bucket_size)
        self.seed = int(seed)
        self.prefetch = int(prefetch)
        self.workers = int(workers)
        self.threads = int(threads)
        self.budgets = None if budgets is None else [BatchShape(*(int(x) for x in b)) for b in budgets]
        self.process_index, self.process_count = _check_shard(process_index, process_count)
        self.has_forces = self.dataset.F is not None
        self.has_qtot = self.dataset.Qtot is not None
        self.has_dipoles = self.dataset.D is not None
        self._at = EpochPosition()  # the position of the latest iterator (it advances it)
        self._indices: np.ndarray | None = None  # None: every molecule (made on first use)
        data, available = _data_bytes(self.dataset), available_memory()
        self.order, self.order_note = _resolve_order(order, data, available)
        # data larger than memory: hand back mapped pages every RELEASE_BATCHES (readahead.release)
        self._release_every = RELEASE_BATCHES if data > AUTO_MEMORY_FRACTION * available else 0
        self.block_mib = float(block_mib)
        self.window_blocks = int(window_blocks)
        self.order_version = order_version
        self._pair_counts: dict[float, np.ndarray] = {}  # dataset-wide, per cutoff, compact; shared by derived loaders
        self._budget_cache: dict[float | None, list[BatchShape]] = {}
        self._plan_cache: tuple[Any, EpochPlan] | None = None
        self._split_cache: tuple[EpochPlan, int, EpochPlan] | None = None  # (plan, parts, its split)
        self._assemblers: dict[tuple, list[Assembler]] = {}  # idle ones, kept for the next epoch

    # ---- the seed's attributes -------------------------------------------------------------

    @property
    def indices(self) -> np.ndarray:
        """(N,) dataset indices this loader serves (int32 below 2^31 molecules). Setting it also sets ``N``."""
        if self._indices is None:
            self._indices = np.arange(self.dataset.n_molecules, dtype=index_dtype(self.dataset.n_molecules))
        return self._indices

    @indices.setter
    def indices(self, value: Any) -> None:
        idx = np.asarray(value)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ConfigError(f"indices must be a 1-D integer array, got shape {idx.shape} {idx.dtype}")
        idx = idx.astype(index_dtype(self.dataset.n_molecules), copy=False)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self.dataset.n_molecules):
            bad = np.flatnonzero((idx < 0) | (idx >= self.dataset.n_molecules))
            raise ConfigError(
                f"indices[{int(bad[0])}] = {int(idx[bad[0]])} is outside the dataset's "
                f"{self.dataset.n_molecules} molecules"
            )
        self._indices = idx
        self._budget_cache = {}
        self._plan_cache = None
        self._assemblers = {}

    @property
    def N(self) -> int:
        """Number of molecules served (``len(indices)``). Assigning the same value is accepted."""
        return self.dataset.n_molecules if self._indices is None else int(self._indices.shape[0])

    @N.setter
    def N(self, value: int) -> None:
        if int(value) != self.N:
            raise ConfigError(f"N = {value} does not match len(indices) = {self.N}; set indices instead")

    def __len__(self) -> int:
        return self.N

    def __repr__(self) -> str:
        shard = f", shard={self.process_index}/{self.process_count}" if self.process_count > 1 else ""
        return (
            f"PackedMemmapLoader(path='{self.path}', N={self.N}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, bucket_size={self.bucket_size}, seed={self.seed}, "
            f"order={self.order}, epoch={self.epoch}, position={self.position}{shard})"
        )

    @property
    def epoch(self) -> int:
        """The epoch of the next item: that of the latest iterator (or of ``restore``)."""
        return self._at.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._at = EpochPosition(int(value), 0)

    @property
    def position(self) -> int:
        """Items already yielded in ``epoch`` (by the latest iterator, which advances it)."""
        return self._at.position

    @position.setter
    def position(self, value: int) -> None:
        self._at = EpochPosition(self._at.epoch, int(value))

    # ---- derived loaders ---------------------------------------------------------------------

    def _derive(self, indices: np.ndarray | None = None, **changes: Any) -> PackedMemmapLoader:
        """A loader over the same dataset with ``changes``, and ``indices`` (taken from this loader's
        own, so not checked again: a range check of 90M indices costs 50 ms) in their dtype."""
        other = copy.copy(self)
        other._budget_cache = {}
        other._plan_cache = None
        other._assemblers = {}
        other._at = EpochPosition()
        for key, value in changes.items():
            setattr(other, key, value)
        if indices is not None:
            other._indices = np.asarray(indices, dtype=index_dtype(self.dataset.n_molecules))
        return other

    def shard(self, index: int, count: int) -> PackedMemmapLoader:
        """A loader for process ``index`` of ``count`` over the same molecules and seed.

        Every process computes the same epoch plan of ``batch_size``-molecule batches (global
        batches); each batch is dealt out into ``count`` parts (times the devices of
        ``stacked_batches``) of one static shape per class, balanced in molecules, atoms and pairs,
        and process ``index`` takes its part of each. So every process yields the same number of
        batches per epoch with the same shapes in the same order, each molecule is seen once per
        epoch by exactly one process, and the parts of a step together hold exactly the molecules
        of the unsharded loader's batch at that step. A part of a batch with fewer molecules than
        parts is all padding (``mol_mask`` all False).
        """
        process_index, process_count = _check_shard(index, count)
        return self._derive(process_index=process_index, process_count=process_count)

    # ---- state -----------------------------------------------------------------------------

    def state(self) -> dict[str, int]:
        """JSON-able position: ``{"seed", "epoch", "position"}`` (position: items yielded this epoch)."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a ``state()``: the next iterator yields exactly what the saved one would have."""
        try:
            seed, epoch, position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"loader state {state!r}: needs integer seed, epoch, position ({exc})") from None
        if epoch < 0 or position < 0:
            raise ConfigError(f"loader state {state!r}: epoch and position must be >= 0")
        self.seed, self._at = seed, EpochPosition(epoch, position)
        self._budget_cache = {}
        self._plan_cache = None
        self._assemblers = {}

    # ---- shapes and plans --------------------------------------------------------------------

    def _spec(self, layout: str | None, num_atoms: int | None, cutoff: float | None) -> LayoutSpec:
        layout = layout or "padded"
        if layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if cutoff is not None and not float(cutoff) > 0:
            raise ConfigError(f"cutoff must be > 0 Å, got {cutoff}")
        cutoff = None if cutoff is None else float(cutoff)
        if layout == "packed":
            if num_atoms is not None:
                raise ConfigError("num_atoms applies to layout='padded'; the packed layout uses budgets")
            return LayoutSpec("packed", 0, cutoff)
        sizes = self.n_atoms[self.indices]
        na = int(self.n_atoms.max(initial=1)) if num_atoms is None else int(num_atoms)
        if na < 1:
            raise ConfigError(f"num_atoms must be >= 1, got {na}")
        bad = np.flatnonzero(sizes > na)
        if bad.size:
            i = int(bad[0])
            raise ConfigError(
                f"molecule {int(self.indices[i])} has {int(sizes[i])} atoms, more than num_atoms={na}"
            )
        return LayoutSpec("padded", na, cutoff)

    def _pairs(self, cutoff: float | None) -> np.ndarray | None:
        """(N_dataset,) pairs within ``cutoff`` of every dataset molecule (compact, counted once per
        cutoff on first use), or None for all ordered pairs (computed from ``n_atoms`` where needed)."""
        if cutoff is None:
            return None
        if cutoff not in self._pair_counts:
            self._pair_counts[cutoff] = cutoff_pair_counts(self.dataset, self._offsets, cutoff, self.n_atoms)
        return self._pair_counts[cutoff]

    def _budgets(self, cutoff: float | None) -> list[BatchShape]:
        if cutoff not in self._budget_cache:
            pairs = self._pairs(cutoff)
            if self.budgets is not None:
                check_budgets(self.budgets, self.indices, self.n_atoms, pairs)
                self._budget_cache[cutoff] = list(self.budgets)
            else:
                self._budget_cache[cutoff] = design_budgets(self.indices, self.n_atoms, pairs, self.batch_size,
                                                            self.seed, version=self.order_version)  # fmt: skip
        return self._budget_cache[cutoff]

    def _plan(self, spec: LayoutSpec, epoch: int) -> EpochPlan:
        key = (spec, epoch, self.seed, self.shuffle, self.batch_size, self.bucket_size, self.order, self.block_mib,
               self.window_blocks, self.order_version)
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        self._plan_cache = self._split_cache = None  # let the last epoch's arrays go before making these
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        if rng is not None and self.order == "block":
            packed = spec.layout == "packed"
            per_atom = sum(a.itemsize * (3 if a.ndim == 2 else 1) for a in (self.dataset.Z, self.dataset.R,
                                                                            self.dataset.F) if a is not None)
            plan = block_plan(
                self.indices, self.n_atoms, self.dataset.offsets, self._pairs(spec.cutoff) if packed else None,
                self._budgets(spec.cutoff) if packed else None, self.batch_size, spec.num_atoms,
                int(self.block_mib * 2**20 / per_atom), self.window_blocks, rng, self.order_version,
            )  # fmt: skip
        elif spec.layout == "padded":
            plan = padded_plan(self.indices, self.n_atoms, self.batch_size, spec.num_atoms, self.bucket_size, rng,
                               self.order_version)
        else:
            budgets = self._budgets(spec.cutoff)
            plan = packed_plan(self.indices, self.n_atoms, self._pairs(spec.cutoff), budgets, rng, self.order_version)
        self._plan_cache = (key, plan)
        return plan

    def _steps(self, spec: LayoutSpec, epoch: int, num_devices: int) -> tuple[EpochPlan, np.ndarray, np.ndarray]:
        """The epoch's plan of parts, this process's (n_steps, num_devices) part ids, and each step's class.

        One step is one batch of the plan (``batch_size`` molecules, the global batch). With
        ``G = process_count * num_devices > 1`` every batch is dealt out into ``G`` parts of one
        static shape (``split_plan``), and this process takes parts ``[index * D, (index + 1) * D)``
        of each: the job sees the molecules of the one-device step, whatever the device count.
        """
        plan = self._plan(spec, epoch)
        parts = self.process_count * num_devices
        if parts == 1:
            return plan, np.arange(plan.n_batches, dtype=np.int64)[:, None], plan.shape_ids
        cached = self._split_cache
        if cached is not None and cached[0] is plan and cached[1] == parts:
            split = cached[2]
        else:  # num_batches() and the iterator of an epoch share one split, as they share the plan
            sizes = self.n_atoms if _deal_by_atoms(spec) else self._pair_counts[spec.cutoff]  # filled by _plan
            split = split_plan(plan, parts, sizes, self._part_classes(spec, plan.shapes, parts))
            self._split_cache = (plan, parts, split)
        ids = np.arange(split.n_batches, dtype=np.int64).reshape(plan.n_batches, parts)
        lo = self.process_index * num_devices
        return split, ids[:, lo : lo + num_devices], plan.shape_ids

    def _part_classes(self, spec: LayoutSpec, shapes: tuple[BatchShape, ...], parts: int) -> tuple[BatchShape, ...]:
        """Shapes of the parts of batches of ``shapes`` dealt ``parts`` ways (``part_shapes``)."""
        if parts == 1:
            return shapes
        pairs = self._pairs(spec.cutoff)
        max_atoms, max_pairs, _, _ = totals(self.indices, self.n_atoms, np.zeros(0, np.int64) if pairs is None else pairs)
        max_atoms = max(max_atoms, 1)
        max_pairs = max_pairs if spec.layout == "packed" else 0
        return part_shapes(shapes, parts, spec.layout, max_atoms, max_pairs, _deal_by_atoms(spec))

    def shapes(
        self, layout: str | None = None, num_atoms: int | None = None, cutoff: float | None = None,
        num_devices: int = 1,
    ) -> list[BatchShape]:  # fmt: skip
        """The distinct ``(A, M, P)`` shapes a layout yields (one for ``padded``, at most 4 for ``packed``).

        These are the shapes of this process's batches: of the parts of each global batch when the
        loader is sharded or ``num_devices > 1`` (``stacked_batches``: per device).
        """
        spec = self._spec(layout, num_atoms, cutoff)
        if spec.layout == "padded":
            na, B = spec.num_atoms, self.batch_size
            whole = (BatchShape(B * na, B, B * na * (na - 1)),)
        else:
            whole = tuple(sorted(self._budgets(spec.cutoff), key=lambda s: (s.P, s.A, s.M)))
        return list(self._part_classes(spec, whole, self.process_count * int(num_devices)))

    def num_batches(
        self,
        layout: str | None = None,
        num_atoms: int | None = None,
        cutoff: float | None = None,
        num_devices: int = 1,
        epoch: int | None = None,
    ) -> int:
        """Items this process yields in ``epoch`` (default: the current one), from its start.

        ``padded``: ``ceil(N / batch_size)`` (divided over shards). ``packed``: depends slightly on
        the epoch's order, so it is computed from that epoch's plan (cheap: no data is read).
        With ``num_devices`` > 1 it counts ``stacked_batches`` items.
        """
        spec = self._spec(layout, num_atoms, cutoff)
        _, steps, _ = self._steps(spec, self.epoch if epoch is None else int(epoch), int(num_devices))
        return int(steps.shape[0])

    # ---- iteration ---------------------------------------------------------------------------

    def batches(
        self,
        num_atoms: int | None = None,
        physnet_format: bool = True,
        layout: str | None = None,
        cutoff: float | None = None,
        *,
        prefetch: int | None = None,
        transfer: Callable[[Batch], Any] | None = None,
        reuse_buffers: bool = False,
        workers: int | None = None,
        threads: int | None = None,
    ) -> Iterator[Batch]:
        """Iterate over the rest of the current epoch (all of it from a fresh loader), then advance.

        Args:
            num_atoms: ``padded`` layout: atom slots per molecule; None uses the dataset's largest
                molecule (static for every epoch).
            physnet_format: True: the flat batch contract of ``docs/architecture.md``. False
                (``padded`` only): the seed's ``(B, num_atoms)`` arrays Z, R, F, mask plus
                E, N, Qtot, mol_mask, mol_idx of shape (B,).
            layout: ``"padded"`` (default; the seed's meaning of ``batches(num_atoms=60)``) or
                ``"packed"`` (budget classes; ``num_atoms`` must be None).
            cutoff: keep only pairs closer than this (Å); None: all ordered pairs of each molecule.
            prefetch: batches assembled ahead in background threads (default: the loader's).
            transfer: applied to each batch in the background thread, e.g. ``jax.device_put``.
            reuse_buffers: False (default): every batch has its own arrays, safe to keep. True:
                batches are read-only views of reused buffers (a few sets per shape class, see
                ``docs/loader.md``), which later batches overwrite: a batch stays valid until
                one more batch has been drawn (until the next ``next()``); copy what you keep
                longer. Much faster: no page faults on fresh memory, only the padding that the
                previous content dirtied is rewritten, and several batches are filled per call.
            workers: assembly threads when ``prefetch`` > 0 (default: the loader's); each has its
                own buffers, and batches still come in order.
            threads: threads that fill batches together (default: the loader's).

        Raises:
            ConfigError: at the call, before any batch, e.g. a molecule larger than ``num_atoms``.
        """
        spec = self._spec(layout, num_atoms, cutoff)
        if not physnet_format and spec.layout != "padded":
            raise ConfigError("physnet_format=False needs layout='padded'")
        convert = None if physnet_format else _seed_format
        return self._iterate(spec, 1, convert, prefetch, transfer, reuse_buffers, workers, threads)

    def stacked_batches(
        self,
        num_devices: int,
        num_atoms: int | None = None,
        layout: str | None = None,
        cutoff: float | None = None,
        *,
        prefetch: int | None = None,
        transfer: Callable[[Batch], Any] | None = None,
        reuse_buffers: bool = False,
        workers: int | None = None,
        threads: int | None = None,
    ) -> Iterator[Batch]:
        """Like ``batches`` but each item is one batch dealt out into ``num_devices`` parts.

        ``batch_size`` stays the global batch: item ``t`` holds exactly the molecules of batch ``t``
        of ``batches()`` (of this process's share, when sharded), dealt into ``num_devices`` parts of
        one static shape per class (see ``shard``). Every array gains a leading axis
        ``num_devices`` (e.g. ``R`` is ``(D, A', 3)``), ready to be sharded over devices; with
        ``num_devices=1`` the items are plain batches. ``reuse_buffers``, ``prefetch`` and
        ``workers``, ``threads`` as in ``batches``: a reused item stays valid until one more has been drawn.
        """
        if int(num_devices) < 1:
            raise ConfigError(f"num_devices must be >= 1, got {num_devices}")
        spec = self._spec(layout, num_atoms, cutoff)
        return self._iterate(spec, int(num_devices), None, prefetch, transfer, reuse_buffers, workers, threads)

    def _iterate(
        self,
        spec: LayoutSpec,
        num_devices: int,
        convert: Callable[[Batch], Batch] | None,
        prefetch: int | None,
        transfer: Callable[[Batch], Any] | None,
        reuse_buffers: bool,
        workers: int | None = None,
        threads: int | None = None,
    ) -> Iterator[Batch]:
        epoch, start = self._at.epoch, self._at.position
        plan, steps, shape_ids = self._steps(spec, epoch, num_devices)
        depth = max(self.prefetch if prefetch is None else int(prefetch), 0)
        n_workers = max(self.workers if workers is None else int(workers), 1) if depth else 1
        per_worker = -(-depth // n_workers)
        # items handed out that must stay intact while a worker fills its next ones: its queue, and
        # VALID_DRAWS in the consumer's hands
        hold = per_worker + VALID_DRAWS
        first, last = plan.bounds[steps], plan.bounds[steps + 1]  # (n_steps, num_devices) bounds in plan.mols
        n_threads = self.threads if threads is None else int(threads)
        if n_threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        pair_counts = self._pair_counts.get(spec.cutoff) if spec.cutoff is not None else None  # filled by _plan
        key = (spec, plan.shapes, num_devices, reuse_buffers, hold, n_threads)
        reads = self._plan(spec, epoch).reads  # block order: windows to read ahead
        advise_random(self.dataset, random=self.shuffle and reads is None)
        dipoles = self.dataset.D
        if dipoles is not None:  # per molecule: gathered here by mol_idx, outside the kernels
            inner = convert
            convert = lambda item: _with_dipoles(item, dipoles, inner)  # noqa: E731

        def produce(worker: int) -> Iterator[Batch]:
            assembler = self._take_assembler(key, pair_counts)
            advised = -1  # windows up to this one were read ahead
            since_release = 0  # batches assembled since the mapped pages were last handed back
            if self._release_every:
                release(self.dataset)  # what planning mapped (block order reads offsets at block bounds)
            try:
                mine = range(start + worker, steps.shape[0], n_workers)
                for at in range(0, len(mine), assembler.chunk):
                    ids = mine[at : at + assembler.chunk]
                    if reads is not None:  # this window and the next are being read
                        ahead = min(reads.window_of(ids[-1]) + 1, reads.first_batch.shape[0] - 1)
                        if ahead > advised:
                            if self._release_every and advised >= 0:
                                release(self.dataset)  # the windows before this one are done
                            lo = max(advised + 1, reads.window_of(ids[0]))
                            will_need(self.dataset, reads.spans[reads.span_ptr[lo] : reads.span_ptr[ahead + 1]])
                            advised = ahead
                    elif self._release_every:
                        since_release += len(ids)
                        if since_release >= self._release_every:
                            release(self.dataset)  # resident memory stays flat on data larger than memory
                            since_release = 0
                    rows = slice(ids.start, ids.stop, ids.step)
                    for item in assembler.assemble(plan.mols, first[rows], last[rows], shape_ids[rows]):
                        yield item if convert is None else convert(item)
            finally:
                self._assemblers.setdefault(key, []).append(assembler)

        sources = [produce(w) for w in range(n_workers)]
        iterator = EpochIterator(prefetched(sources, per_worker, transfer), EpochPosition(epoch, start))
        self._at = iterator.at
        return iterator

    def _take_assembler(self, key: tuple, pair_counts: np.ndarray | None) -> Assembler:
        """An idle assembler of ``key`` (spec, shapes, devices, reuse, hold, threads), or a new one.

        Assemblers (and their buffer rings, whose first touch is slow) live from epoch to epoch;
        one iterator holds one at a time, so two live iterators never share buffers.
        """
        try:
            return self._assemblers.get(key, []).pop()
        except IndexError:
            spec, shapes, devices, reuse, hold, threads = key
            return Assembler(self.dataset, self._offsets, spec, shapes, devices, reuse, hold, pair_counts, threads)


@dataclass
class EpochPosition:
    """Where an epoch's iteration stands: ``epoch`` and ``position``, the items yielded in it."""

    epoch: int = 0
    position: int = 0


class EpochIterator(Iterator[Batch]):
    """The rest of one epoch of a loader (what ``batches()`` returns); it owns its position.

    ``at`` advances by one with every item drawn; once the epoch is exhausted it is the start of the
    next epoch, ``(epoch + 1, 0)``; an iterator closed early leaves it where it stopped. The loader
    reads the position of its latest iterator (``state()``) and never changes it.

    Args:
        items: the epoch's remaining items (a generator: closing it stops its threads).
        at: the position of the first item.
    """

    def __init__(self, items: Iterator[Batch], at: EpochPosition) -> None:
        self._items = items
        self.at = at
        self._done = False

    def __iter__(self) -> EpochIterator:
        return self

    def __next__(self) -> Batch:
        if self._done:
            raise StopIteration
        try:
            item = next(self._items)
        except StopIteration:
            self._done = True
            self.at.epoch, self.at.position = self.at.epoch + 1, 0
            raise
        except BaseException:
            self.close()
            raise
        self.at.position += 1
        return item

    def close(self) -> None:
        """Stop early (background threads too); the position stays where it is."""
        self._done = True
        self._items.close()  # type: ignore[attr-defined]

    @property
    def epoch(self) -> int:
        return self.at.epoch

    @property
    def position(self) -> int:
        return self.at.position


def _data_bytes(ds: Any) -> int:
    """Bytes of the data files (Z, R, F, E, Qtot) of an open directory."""
    return sum(int(a.nbytes) for a in (ds.Z, ds.R, ds.F, ds.E, ds.Qtot) if a is not None)


def _resolve_order(order: str, data: int, available: int) -> tuple[str, str]:
    """(``"molecule"`` or ``"block"``, a sentence saying why) for the loader option ``order``, with
    ``data`` bytes of data files and ``available`` bytes of memory."""
    if order != "auto":
        return order, f"order={order} (as asked)"
    chosen = "block" if data > AUTO_MEMORY_FRACTION * available else "molecule"
    return chosen, (
        f"order=auto chose {chosen} order: {data / 2**30:.2f} GiB of data files, "
        f"{available / 2**30:.1f} GiB of memory available"
    )


def available_memory() -> int:
    """Bytes of memory available for new data (``MemAvailable`` of /proc/meminfo; else physical)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _deal_by_atoms(spec: LayoutSpec) -> bool:
    """Batches are dealt over devices by atom count, except packed cutoff pair lists (by pairs)."""
    return spec.layout == "padded" or spec.cutoff is None


def _with_dipoles(batch: Batch, dipoles: np.ndarray, then: Callable[[Batch], Batch] | None) -> Batch:
    """``batch`` (a new dict) with ``D``: the (..., M, 3) float64 dipoles of its molecule slots, e·Å,
    read from ``dipoles`` (N, 3) by ``mol_idx`` (zeros where ``mol_idx`` is -1); then ``then``."""
    idx = np.asarray(batch["mol_idx"])
    out = {**batch, "D": np.where((idx >= 0)[..., None], dipoles[np.maximum(idx, 0)], 0.0)}
    return out if then is None else then(out)


def _seed_format(batch: Batch) -> Batch:
    """The seed's non-PhysNet padded format: (B, num_atoms) arrays plus ``mask``."""
    B = batch["N"].shape[0]
    return {
        "Z": batch["Z"].reshape(B, -1),
        "R": batch["R"].reshape(B, -1, 3),
        "F": batch["F"].reshape(B, -1, 3),
        "mask": batch["atom_mask"].reshape(B, -1),
        "E": batch["E"],
        "N": batch["N"],
        "Qtot": batch["Qtot"],
        "mol_mask": batch["mol_mask"],
        "mol_idx": batch["mol_idx"],
        **({"D": batch["D"]} if "D" in batch else {}),
    }


def _check_shard(index: int, count: int) -> tuple[int, int]:
    index, count = int(index), int(count)
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard {index} of {count}: need count >= 1 and 0 <= index < count")
    return index, count


def split_loader(
    loader: PackedMemmapLoader, train_fraction: float = 0.9, seed: int | None = None
) -> tuple[PackedMemmapLoader, PackedMemmapLoader]:
    """Disjoint, reproducible train/validation split of ``loader``'s molecules.

    A seeded random ``round(train_fraction * N)`` of the molecules go to training, the rest to
    validation (``seed``: default the loader's; the loader's ``order_version`` 1 takes the first
    of a permutation, as the seed's reference does, 2 selection sampling: ``shuffle.split_positions``,
    0.3 s at 100M molecules instead of 6.4 s). Both loaders share the
    open dataset; the training loader keeps ``loader.shuffle``, the validation loader does not
    shuffle. Indices are sorted within each split (reads stay local when not shuffled).
    """
    if not 0.0 < float(train_fraction) < 1.0:
        raise ConfigError(f"train_fraction must be between 0 and 1 (exclusive), got {train_fraction}")
    rng = np.random.default_rng(loader.seed if seed is None else int(seed))
    N = loader.N
    n_train = int(round(float(train_fraction) * N))
    train_idx, valid_idx = split_positions(N, n_train, rng, loader.order_version)  # sorted positions
    if loader._indices is not None:
        values = loader._indices
        if increasing(values) and values.dtype == train_idx.dtype:  # sorted values in place: no copy
            take_in_place(train_idx, values)
            take_in_place(valid_idx, values)
        else:
            train_idx, valid_idx = np.sort(values[train_idx]), np.sort(values[valid_idx])
    train = loader._derive(train_idx)
    valid = loader._derive(valid_idx, shuffle=False)
    return train, valid
