"""Batch prediction over many molecules: a packed directory (the loader's packed batches, all devices),
or molecules in memory (e.g. read by ASE), first written to a scratch packed directory so that they
are batched the same way. Results are one ``PredictionSet`` in input order.

A packed directory is read with ``PackedMemmapLoader(..., shuffle=False)`` in its ``packed`` layout
(a few ``(A, M, P)`` budget classes, so a few compilations), each batch dealt over the devices of a
one-axis mesh (``packedqdc.parallel``); outputs are written straight into arrays indexed like the
dataset, which may be memmaps in a scratch directory so that memory stays bounded on large data.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from ..errors import TrainingError
from ..format import MoleculeChunk, PackedWriter, open_packed
from ..loader import PackedMemmapLoader
from ..model.physnet import PhysNet, cutoff_pairs, with_coulomb_window
from ..parallel import Placement, make_placement
from .predict import Potential, energy_forces_charges

#: Keys (and device dtypes) of a loader batch the model reads.
_MODEL_KEYS: dict[str, Any] = {
    "Z": np.int32, "R": np.float32, "dst_idx": np.int32, "src_idx": np.int32,
    "batch_segments": np.int32, "atom_mask": bool, "pair_mask": bool, "Qtot": np.float32,
}


@dataclass
class PredictionSet:
    """Inputs and model outputs of ``m`` molecules with ``n`` atoms in all, flat like the packed format.

    Attributes:
        N: (m,) int32 atoms per molecule; molecule ``i`` owns atoms ``offsets[i]:offsets[i + 1]``.
        Z: (n,) int32 atomic numbers. R: (n, 3) float32 positions, Å.
        Qtot: (m,) float64 total charges, e.
        E: (m,) float64 predicted energies, kcal/mol. F: (n, 3) float32 forces, kcal/mol/Å.
        charges: (n,) float32 partial charges, e.
        seconds: wall time of the prediction loop (compilation included).
    """

    N: np.ndarray
    Z: np.ndarray
    R: np.ndarray
    Qtot: np.ndarray
    E: np.ndarray
    F: np.ndarray
    charges: np.ndarray
    seconds: float = 0.0

    @property
    def offsets(self) -> np.ndarray:
        """(m + 1,) int64 start of each molecule's atoms."""
        return np.concatenate([[0], np.cumsum(self.N, dtype=np.int64)])

    @property
    def n_molecules(self) -> int:
        return int(self.N.shape[0])


def _outputs(m: int, n: int, scratch: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(E (m,) float64, F (n, 3) float32, charges (n,) float32) filled with NaN: in memory, or as
    ``.npy`` memmaps under ``scratch``."""
    shapes = {"E": ((m,), np.float64), "F": ((n, 3), np.float32), "charges": ((n,), np.float32)}
    out = []
    for name, (shape, dtype) in shapes.items():
        if scratch is None:
            out.append(np.full(shape, np.nan, dtype))
        else:
            array = np.lib.format.open_memmap(scratch / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
            array[...] = np.nan
            out.append(array)
    return tuple(out)  # type: ignore[return-value]


@functools.lru_cache(maxsize=8)
def _global_step(model: PhysNet, placement: Placement) -> Callable[[Any, Any], tuple[Any, Any, Any]]:
    """Jitted ``(params, global batch (D, ...)) -> (energy (D, M), forces (D, A, 3), charges (D, A))``,
    the batch and outputs sharded over the mesh, parameters replicated; cached, so calls in one
    process share compilations (one per budget class)."""
    def step(params: Any, global_batch: Any) -> tuple[Any, Any, Any]:
        return jax.vmap(lambda batch: energy_forces_charges(model, params, batch))(global_batch)

    return jax.jit(step, in_shardings=(placement.replicated, placement.batch), out_shardings=placement.batch)


def check_dataset_elements(potential: Potential, data_path: str | Path, chunk: int = 1 << 22) -> None:
    """ConfigError naming the first molecule of ``data_path`` with an element the model has not
    learned (the ``Z`` file is read in chunks of ``chunk`` atoms)."""
    ds = open_packed(data_path)
    known = np.zeros(256, bool)
    known[list(potential.reference.elements)] = True
    for lo in range(0, ds.n_atoms_total, chunk):
        z = np.asarray(ds.Z[lo:lo + chunk], dtype=np.int64)
        bad = np.flatnonzero(~known[np.clip(z, 0, 255)])
        if bad.size:
            mol = int(np.searchsorted(np.asarray(ds.offsets), lo + int(bad[0]), side="right")) - 1
            potential.reference.check_elements(z[bad], where=f"{ds.path}: molecule {mol}")


def predict_packed(potential: Potential, data_path: str | Path, batch_size: int | None = None,
                   num_devices: int | None = None, scratch: Path | None = None,
                   on_batch: Callable[[int], None] | None = None) -> PredictionSet:
    """Predict every molecule of a packed directory, in dataset order.

    Args:
        potential: the loaded model.
        data_path: packed directory.
        batch_size: average molecules per device batch times devices (the loader's global batch);
            default: the run's training batch size.
        num_devices: local devices to use (default: all).
        scratch: directory for memmapped outputs (default: in memory).
        on_batch: called with the number of molecules of each finished global batch.

    Raises:
        FormatError: the directory cannot be opened. ConfigError: an element the model has not learned.
    """
    check_dataset_elements(potential, data_path)
    placement = make_placement(num_devices)
    devices = placement.num_local_devices
    batch = int(batch_size or potential.meta["config"]["batch_size"])
    loader = PackedMemmapLoader(data_path, batch_size=max(batch, devices), shuffle=False, prefetch=2)
    ds = loader.dataset
    m, n = ds.n_molecules, ds.n_atoms_total
    offsets = np.asarray(ds.offsets, dtype=np.int64)
    E, F, charges = _outputs(m, n, scratch)
    done = np.zeros(m, bool)
    params = placement.replicate(potential.params)
    model = with_coulomb_window(potential.model, int(loader.n_atoms.max(initial=1)))
    step = _global_step(model, placement)
    cutoff = cutoff_pairs(model)  # the pairs the run trained on
    reference = potential.reference

    def store(item: dict[str, np.ndarray], result: tuple[Any, Any, Any]) -> None:
        energy, forces, q = (np.asarray(x) for x in jax.device_get(result))
        for d in range(item["Z"].shape[0]):
            mol_mask, atom_mask = item["mol_mask"][d], item["atom_mask"][d]
            seg = item["batch_segments"][d]
            e_ref = reference.molecule_energies(item["Z"][d], seg, item["Qtot"][d])
            idx = item["mol_idx"][d]
            E[idx[mol_mask]] = energy[d][mol_mask].astype(np.float64) + e_ref[mol_mask]
            done[idx[mol_mask]] = True
            # atoms of a molecule are contiguous in its batch: atom k of a run of one slot is atom k
            slots = seg[atom_mask]
            first = np.r_[True, slots[1:] != slots[:-1]]
            run_start = np.maximum.accumulate(np.where(first, np.arange(slots.size), 0))
            rows = offsets[idx[slots]] + (np.arange(slots.size) - run_start)
            F[rows] = forces[d][atom_mask]
            charges[rows] = q[d][atom_mask]
        if on_batch is not None:
            on_batch(int(item["mol_mask"].sum()))

    start = time.perf_counter()
    pending = None
    for item in loader.stacked_batches(devices, layout="packed", cutoff=cutoff):
        if np.ndim(item["Z"]) == 1:  # one device: plain batches
            item = {key: np.asarray(value)[None] for key, value in item.items()}
        if item.get("Qtot") is None:
            item["Qtot"] = np.zeros(item["mol_mask"].shape)
        device_batch = placement.put_batch({key: np.asarray(item[key], dtype=dtype)
                                            for key, dtype in _MODEL_KEYS.items()})
        result = step(params, device_batch)
        if pending is not None:  # copy the previous batch out while this one runs
            store(*pending)
        pending = (item, result)
    if pending is not None:
        store(*pending)
    missed = np.flatnonzero(~done)
    if missed.size:  # every molecule is in exactly one batch of an epoch; guard the bookkeeping
        raise TrainingError(f"{ds.path}: molecule {int(missed[0])} got no prediction ({missed.size} in all)")
    if isinstance(E, np.memmap):
        for array in (E, F, charges):
            array.flush()
    qtot = np.zeros(m) if ds.Qtot is None else np.asarray(ds.Qtot, dtype=np.float64)
    return PredictionSet(N=np.asarray(ds.n_atoms, np.int32), Z=ds.Z, R=ds.R, Qtot=qtot, E=E, F=F,
                         charges=charges, seconds=time.perf_counter() - start)


def pack_structures(Zs: Sequence[np.ndarray], Rs: Sequence[np.ndarray], Qtots: Sequence[float],
                    target: Path, chunk: int = 4096) -> Path:
    """Write molecules given in memory (Z (n_i,) int, R (n_i, 3) Å, Qtot e) as a packed directory
    ``target`` without labels (E = 0), so that ``predict_packed`` batches them like any dataset."""
    with PackedWriter(target, has_forces=False, has_qtot=True, provenance={"source": "packedqdc predict"}) as writer:
        for lo in range(0, len(Zs), chunk):
            z, r = Zs[lo:lo + chunk], Rs[lo:lo + chunk]
            writer.append(MoleculeChunk(
                n_atoms=np.asarray([len(x) for x in z], np.int32),
                Z=np.concatenate([np.asarray(x, np.int32) for x in z]),
                R=np.concatenate([np.asarray(x, np.float32).reshape(-1, 3) for x in r]),
                E=np.zeros(len(z)), Qtot=np.asarray(Qtots[lo:lo + chunk], np.float64)))
        writer.commit()
    return target
