"""An OpenQDC cache as a stream of ``MoleculeChunk``: units, class fixes, E0s, NaN labels skipped."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ...elements import MAX_Z
from ...errors import ConfigError, SourceError
from ...format import MoleculeChunk
from .cache import CacheReader, RawBlock, find_cache, resolve_cache_dir
from .classes import DatasetInfo, EnergyMethod, resolve_dataset, select_method
from .references import ProgressFn, IsolatedAtomEnergies, formation_references, regression_references

ENERGY_TYPES = ("total", "formation", "regression")


@dataclass
class PackCounts:
    """Molecules seen, kept and skipped while packing."""

    n_source: int = 0
    n_kept: int = 0
    skipped_nan_energy: int = 0
    skipped_nan_forces: int = 0
    skipped_other_subsets: int = 0


@dataclass(frozen=True)
class Conversion:
    """How one block of raw cache rows becomes a MoleculeChunk.

    Attributes:
        info: the dataset class.
        method: the level of theory packed.
        subset: index of the only subset kept, or None for all.
        subset_index: (N,) int64 subset of every molecule.
        references: E0s to subtract (formation/regression) or None (total).
        cache: the preprocessed directory, as messages name it.
    """

    info: DatasetInfo
    method: EnergyMethod
    subset: int | None
    subset_index: np.ndarray
    references: IsolatedAtomEnergies | None
    cache: Path

    def __call__(self, block: RawBlock, counts: PackCounts, reasons: list[str]) -> MoleculeChunk:
        """Apply units and fixes, drop NaN-labelled or other-subset molecules, count them.

        The first few skip reasons are appended to ``reasons``.
        """
        m = block.hi - block.lo
        counts.n_source += m
        keep = np.ones(m, dtype=bool)
        if self.subset is not None:
            keep = self.subset_index[block.lo : block.hi] == self.subset
            counts.skipped_other_subsets += int(m - keep.sum())
        mol = np.repeat(np.arange(m), block.n_atoms)
        energy = block.energies[:, self.method.index].astype(np.float64) * self.info.energy_to_kcal
        counts.skipped_nan_energy += _drop(keep, np.isfinite(energy), block.lo, "energy is NaN (missing label)", reasons)
        forces = None
        if self.method.has_forces:
            forces = block.forces.astype(np.float64) * self.info.force_to_kcal_ang
            finite_f = np.bincount(mol[~np.isfinite(forces).all(axis=1)], minlength=m) == 0
            counts.skipped_nan_forces += _drop(keep, finite_f, block.lo, "forces are not finite", reasons)
        atom_keep = keep[mol]
        z, charge, mol = _as_int(block.atomic[atom_keep, 0]), _as_int(block.atomic[atom_keep, 1]), mol[atom_keep]
        _check_atoms(self.cache / "atomic_inputs.mmap", z, block.atomic[atom_keep, 2:5], mol, block.lo)
        if self.references is not None:
            energy = energy - self.references.per_molecule(z, charge, mol, m, block.lo)
        counts.n_kept += int(keep.sum())
        return MoleculeChunk(
            n_atoms=block.n_atoms[keep].astype(np.int32),
            Z=z.astype(np.int32),
            R=(block.atomic[atom_keep, 2:5].astype(np.float64) * self.info.length_to_ang).astype(np.float32),
            E=energy[keep],
            F=None if forces is None else forces[atom_keep].astype(np.float32),
            Qtot=np.bincount(mol, weights=charge, minlength=m)[keep].astype(np.float64),
        )


MAX_REASONS = 5


def _drop(keep: np.ndarray, good: np.ndarray, first: int, why: str, reasons: list[str]) -> int:
    """Clear ``keep`` (in place) where ``good`` is false; return how many kept molecules that dropped.

    The first dropped molecule's reason is added to ``reasons`` while it holds fewer than
    ``MAX_REASONS`` entries.
    """
    dropped = np.flatnonzero(keep & ~good)
    if dropped.size and len(reasons) < MAX_REASONS:
        reasons.append(f"molecule {first + int(dropped[0])}: {why}")
    keep[dropped] = False
    return int(dropped.size)


def _as_int(column: np.ndarray) -> np.ndarray:
    """(A,) int64 from a float32 atomic_inputs column holding integers."""
    return np.rint(column).astype(np.int64)


def _check_atoms(file: Path, z: np.ndarray, positions: np.ndarray, mol: np.ndarray, first: int) -> None:
    """Raise SourceError naming the first kept molecule with a bad Z or a non-finite position."""
    bad = (z < 1) | (z > MAX_Z) | ~np.isfinite(positions).all(axis=1)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise SourceError(
            f"{file}: molecule {first + int(mol[k])}: atom with Z={int(z[k])} "
            f"at {positions[k].tolist()} (Z must be 1..{MAX_Z}, positions finite)"
        )


def _no_progress(done: int, total: int) -> None:
    """Default progress callback: report nothing."""


class OpenQDCSource:
    """An OpenQDC cache as a :class:`packedqdc.sources.MoleculeSource`.

    Construction resolves the class, the method and the cache; :meth:`prepare` then loads (or,
    for regression without openqdc's pickle, fits) the reference energies. Nothing is written.

    Attributes:
        n_molecules: molecules in the cache (before skipping).
        has_forces: whether the chosen method has forces.
        has_qtot: always True (openqdc stores formal charges).
        counts: molecules seen, kept and skipped so far.
        skipped_first: one-line reasons for the first few skipped molecules.
    """

    has_qtot = True

    def __init__(
        self,
        name: str,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        energy_method: int | str = 0,
        energy_type: str = "total",
        subset: str | None = None,
    ) -> None:
        if energy_type not in ENERGY_TYPES:
            raise ConfigError(f"unknown energy type {energy_type!r}; use one of {', '.join(ENERGY_TYPES)}")
        self.info = resolve_dataset(name)
        self.method = select_method(self.info, energy_method)
        self.energy_type = energy_type
        self.cache_root = resolve_cache_dir(cache_dir)
        self.reader = CacheReader(self.info, find_cache(self.info, self.cache_root))
        self.name = str(self.reader.path)  # how messages name the input
        self.input_paths = (self.reader.path,)
        self.n_molecules = self.reader.n_molecules
        self.has_forces = self.method.has_forces
        self.subset = _select_subset(self.reader, subset)
        self.references: IsolatedAtomEnergies | None = None
        self._prepared = False
        self.counts = PackCounts()
        self.skipped_first: list[str] = []

    @property
    def needs_fit(self) -> bool:
        """Whether regression E0s must be fitted here (openqdc's pickle is absent)."""
        return self.energy_type == "regression" and not self.regression_pkl.is_file()

    @property
    def regression_pkl(self) -> Path:
        """Where openqdc keeps fitted E0s: ``<cache>/<root>/preprocessed/regressionenergy.pkl``."""
        return self.cache_root / self.info.root_dir / "preprocessed" / "regressionenergy.pkl"

    def prepare(self, progress: ProgressFn | None = None) -> None:
        """Load or fit the reference energies of ``energy_type`` (a fit reports through ``progress``)."""
        if self.energy_type == "formation":
            self.references = formation_references(self.info, self.method)
        elif self.energy_type == "regression":
            pkl, report = self.regression_pkl, progress or _no_progress
            self.references = regression_references(self.info, self.method, self.reader, pkl, report)
        self._prepared = True

    def chunks(self) -> Iterator[MoleculeChunk]:
        """Kept molecules in cache order, at most ``ATOM_BLOCK`` atoms (or one molecule) per chunk."""
        if not self._prepared:
            self.prepare()
        convert = Conversion(self.info, self.method, self.subset, self.reader.subset_index, self.references,
                             self.reader.path)
        for block in self.reader.blocks(self.method.force_column):
            yield convert(block, self.counts, self.skipped_first)

    def provenance(self) -> dict[str, Any]:
        """Provenance for meta.json: class, version, cache, method, units, fixes, subsets, counts."""
        info, method, c = self.info, self.method, self.counts
        names = self.reader.subset_names
        return {
            "source": "openqdc",
            "dataset_class": info.class_name,
            "openqdc_name": info.openqdc_name,
            "openqdc_version": info.openqdc_version,
            "input": str(self.reader.path),
            "cache_path": str(self.reader.path),
            "energy_method": {"index": method.index, "name": method.name, "target_name": method.target},
            "level_of_theory": method.name,
            "energy_type": self.energy_type,
            "reference_energies": None if self.references is None else self.references.source,
            "forces_method": {"name": method.name, "column": method.force_column} if method.has_forces else None,
            "source_units": {"energy": info.energy_unit, "distance": info.distance_unit, "forces": info.forces_unit},
            "conversion_factors": {
                "energy_to_kcal_mol": info.energy_to_kcal,
                "distance_to_angstrom": info.length_to_ang,
                "forces_to_kcal_mol_angstrom": info.force_to_kcal_ang if method.has_forces else None,
            },
            "class_fixes": {"energy": info.energy_fix, "distance": info.distance_fix, "forces": info.force_fix},
            "subsets": names if self.subset is None else [names[self.subset]],
            "qtot": "sum of per-atom formal charges (atomic_inputs column 1)",
            "n_source_molecules": self.n_molecules,
            "skipped_invalid": c.skipped_nan_energy + c.skipped_nan_forces,
            "skipped_nan_energy": c.skipped_nan_energy,
            "skipped_nan_forces": c.skipped_nan_forces,
            "skipped_other_subsets": c.skipped_other_subsets,
            "forces_note": self._forces_note(),
        }

    def _forces_note(self) -> str:
        method = self.method
        if method.has_forces:
            return f"forces of {method.label}, column {method.force_column} of forces.mmap"
        why = "has no force methods" if self.info.n_force_columns == 0 else "has no forces for this method"
        return f"no F_pack.f32: OpenQDC {self.info.class_name} {why} ({method.label})"


def _select_subset(reader: CacheReader, subset: str | None) -> int | None:
    """Index of ``subset`` among the cache's subset names (case-insensitive), None for all."""
    if subset is None:
        return None
    lowered = [s.lower() for s in reader.subset_names]
    if subset.lower() not in lowered:
        raise ConfigError(f"{reader.path}: no subset {subset!r}; subsets: {', '.join(reader.subset_names)}")
    return lowered.index(subset.lower())
