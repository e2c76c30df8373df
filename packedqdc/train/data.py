"""Training data: the default dataset, the seeded split, and resumable streams of global batches.

``LoaderStream`` wraps a ``PackedMemmapLoader`` (``packedqdc.loader``): it asks for stacked batches
with a leading device axis ``D`` (``D = 1`` on one device), prepares them for the steps (reference
energies subtracted in float64, then float32) and exposes the loader's resumable position. The
loader shuffles each epoch from ``(seed, epoch)`` alone, so its ``state()`` is all a checkpoint
needs to continue exactly where a run stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ..data import SAMPLE_NPZ
from ..errors import ConfigError
from ..loader import PackedMemmapLoader, split_loader
from ..shuffle import ORDER_VERSION
from .reference import ReferenceEnergies
from .step import prepare_global

#: Batches assembled ahead of the train step in a background thread.
PREFETCH = 2


def default_data_path(runs_dir: str | Path) -> Path:
    """The bundled sample (``packedqdc.data.SAMPLE_NPZ``) packed once into ``runs_dir/.cache/sample``."""
    from ..pack import pack_npz

    target = Path(runs_dir) / ".cache" / "sample"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        pack_npz(SAMPLE_NPZ, target)
    return target


def split(data_path: str | Path, batch_size: int, bucket_size: int, seed: int, valid_fraction: float,
          threads: int = 1, order: str = "auto", order_version: int = ORDER_VERSION
          ) -> tuple[PackedMemmapLoader, PackedMemmapLoader]:
    """(train, valid) loaders of a seeded random split; valid keeps index order.

    ``threads`` assemble each batch (``PackedMemmapLoader(threads=...)``); ``order`` is the
    training loader's epoch order (``loader.order`` holds what ``"auto"`` chose); ``order_version``
    the algorithms of the split and the orders (``packedqdc.shuffle``).
    """
    loader = PackedMemmapLoader(data_path, batch_size=batch_size, shuffle=True, bucket_size=bucket_size,
                                seed=seed, prefetch=PREFETCH, threads=threads, order=order,
                                order_version=order_version)
    if loader.N < 2:
        raise ConfigError(f"{data_path}: {loader.N} molecule(s); training needs at least 2")
    train, valid = split_loader(loader, train_fraction=1.0 - valid_fraction, seed=seed)
    if valid.N == 0 or train.N == 0:
        raise ConfigError(f"{data_path}: --valid-fraction {valid_fraction} leaves an empty split of {loader.N} molecules")
    return train, valid


class LoaderStream:
    """Prepared global batches (leading axis ``devices``) from a loader, with its position.

    Everything a step needs from the host happens in the loader's prefetch thread, ``PREFETCH``
    batches ahead of the step: assembly (into recycled buffers, on the loader's threads), the
    preparation (``prepare_global``) and, with ``put``, the placement on the devices. The
    training thread only dispatches steps.

    Args:
        loader: the loader of this stream's molecules.
        reference: subtracted from the energies (float64) before the cast to float32.
        layout: "packed" or "padded".
        num_atoms: padded layout: atom slots per molecule (a larger molecule is a ConfigError).
        devices: ``D``, sub-batches per global batch.
        cutoff: pair lists of the pairs closer than this (Å), for a model on cutoff pairs
            (``PhysNet.coulomb_window > 0``); None: all ordered pairs of each molecule.
        put: places a prepared global batch on the devices (e.g. ``Placement.put_batch``); None:
            ``epoch()`` yields host numpy arrays.
    """

    def __init__(self, loader: PackedMemmapLoader, reference: ReferenceEnergies, *, layout: str,
                 num_atoms: int, devices: int = 1,
                 put: Callable[[Mapping[str, np.ndarray]], Any] | None = None, cutoff: float | None = None) -> None:
        self.loader = loader
        self.reference = reference
        self.layout = layout
        self.num_atoms = num_atoms if layout == "padded" else None
        self.devices = devices
        self.put = put
        self.cutoff = cutoff
        loader.shapes(layout=layout, num_atoms=self.num_atoms, cutoff=cutoff)  # fail early on a molecule too large

    def _prepare(self, item: Mapping[str, np.ndarray]) -> tuple[Any, np.ndarray]:
        if np.ndim(item["Z"]) == 1:  # one device: the loader yields plain batches
            item = {key: np.asarray(value)[None] for key, value in item.items()}
        mol_idx = np.asarray(item["mol_idx"])[np.asarray(item["mol_mask"])]
        prepared = prepare_global(item, self.reference)
        return (prepared if self.put is None else self.put(prepared)), mol_idx

    def epoch(self) -> Iterator[tuple[Any, np.ndarray]]:
        """``(global batch, mol_idx of its real molecules)`` for the rest of the epoch."""
        yield from self.loader.stacked_batches(
            self.devices, num_atoms=self.num_atoms, layout=self.layout, cutoff=self.cutoff, transfer=self._prepare)

    def num_steps(self) -> int:
        return self.loader.num_batches(layout=self.layout, num_atoms=self.num_atoms, cutoff=self.cutoff,
                                       num_devices=self.devices)

    def state(self) -> dict[str, Any]:
        return {**self.loader.state(), "devices": self.devices}

    def restore(self, state: Mapping[str, Any]) -> None:
        if int(state.get("devices", 1)) != self.devices:
            raise ConfigError(f"the loader position was saved for {state.get('devices')} device(s), "
                              f"this run has {self.devices}")
        self.loader.restore({key: state[key] for key in ("seed", "epoch", "position")})
