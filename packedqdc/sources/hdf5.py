"""SPICE- and ANI-layout HDF5 files -> ``MoleculeChunk``s (``packedqdc pack hdf5``; needs the
``hdf5`` extra, h5py).

Both layouts hold one group per molecule (SPICE) or per formula (ANI-1x, ANI-1ccx), each with
``C`` conformers of the same ``n`` atoms:

========  ======================  ================  ===========================================
layout    dataset                 shape             content (units)
========  ======================  ================  ===========================================
spice     ``atomic_numbers``      (n,)              atomic numbers
spice     ``conformations``       (C, n, 3)         positions (bohr)
spice     ``dft_total_energy``    (C,)              energies (hartree)
spice     ``dft_total_gradient``  (C, n, 3)         dE/dR (hartree/bohr): forces are its negative
spice     ``smiles``              (1,)              mapped SMILES: total charge = Σ formal charges
ani       ``atomic_numbers``      (n,) or (C, n)    atomic numbers (``species`` also accepted)
ani       ``coordinates``         (C, n, 3)         positions (Å)
ani       ``wb97x_dz.energy``     (C,)              energies (hartree) under level-of-theory names
ani       ``wb97x_dz.forces``     (C, n, 3)         forces (hartree/Å); NaN where not computed
========  ======================  ================  ===========================================

Groups are found recursively (a group holding the positions dataset is a molecule group) and read
one at a time, in slices of at most ``CHUNK_ATOMS`` atoms, so memory stays bounded. Conformers
whose energy or forces are NaN (a missing label, as ANI-1x stores them) are skipped and counted;
any other bad value is an error naming the file, the group, the conformer and the dataset (or is
skipped with ``skip_invalid``). Any dataset whose name ends in ``gradient`` holds dE/dR and is
negated into forces.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, SourceError
from ..format import MoleculeChunk
from ..units import energy_factor, length_factor
from . import UnreadableSourceError
from .toolkit import (
    CHUNK_ATOMS,
    ChunkBuffer,
    FileDigest,
    SkipLog,
    check_input_file,
    file_provenance,
    require_extra,
    screen,
    select,
    to_chunk,
    value_flags,
)

#: groups read between re-openings of the file: HDF5 keeps per-object state for every object a
#: file handle has opened (RSS grew ~18 KB per SPICE group, 400 MB over 20,000 groups), which a
#: fresh handle drops (the same 20,000 groups then read in a flat ~60 MB)
REOPEN_GROUPS = 500
#: (field, reason) that mean "label missing": always skipped and counted
MISSING_LABEL = frozenset({("E", "non-finite value"), ("F", "non-finite value")})


@dataclass(frozen=True)
class Hdf5Layout:
    """Dataset names and default units of one published layout."""

    name: str
    numbers: tuple[str, ...]
    positions: str
    energy: str
    forces: str | None
    energy_unit: str
    length_unit: str
    smiles: str | None  # dataset holding a SMILES per group (total charge), or None (neutral)


LAYOUTS: dict[str, Hdf5Layout] = {
    "spice": Hdf5Layout(
        name="spice",
        numbers=("atomic_numbers",),
        positions="conformations",
        energy="dft_total_energy",
        forces="dft_total_gradient",
        energy_unit="hartree",
        length_unit="bohr",
        smiles="smiles",
    ),
    "ani": Hdf5Layout(
        name="ani",
        numbers=("atomic_numbers", "species"),
        positions="coordinates",
        energy="wb97x_dz.energy",
        forces=None,  # derived from the energy key: <level>.energy -> <level>.forces
        energy_unit="hartree",
        length_unit="ang",
        smiles=None,
    ),
}


_BRACKET_ATOM = re.compile(r"\[([^\[\]]+)\]")
_ATOM_CHARGE = re.compile(r"(\++|-+)(\d*)(?::\d+)?$")


def smiles_charge(smiles: str) -> int:
    """Total charge of a SMILES: the sum of its bracket atoms' formal charges (``[N+:3]``, ``[O-]``,
    ``[Fe+2]``, ``[N++]``); atoms outside brackets are neutral by the SMILES grammar."""
    total = 0
    for atom in _BRACKET_ATOM.findall(smiles):
        match = _ATOM_CHARGE.search(atom)
        if match:
            signs, digits = match.groups()
            total += (1 if signs[0] == "+" else -1) * (int(digits) if digits else len(signs))
    return total


def _is_gradient(name: str) -> bool:
    return name.rstrip("/").rsplit("/", 1)[-1].lower().endswith("gradient")


class Hdf5Source:
    """An HDF5 file in SPICE's or ANI-1x's layout as a :class:`packedqdc.sources.MoleculeSource`.

    Args:
        path: the ``.hdf5``/``.h5`` file.
        layout: ``spice`` or ``ani``.
        energy_key: energy dataset (default: the layout's: ``dft_total_energy``, ``wb97x_dz.energy``).
        forces_key: forces (or ``...gradient``) dataset, or ``"none"``; default: the layout's
            (SPICE ``dft_total_gradient``; ANI the energy key's level with ``.forces``, if present).
        energy_unit, length_unit: override the layout's units (hartree; bohr for SPICE, Å for ANI).
        skip_invalid: skip conformers with bad values (NaN labels are always skipped and counted).

    Raises:
        ConfigError: unknown layout or unit, h5py missing.
        UnreadableSourceError: missing, truncated or non-HDF5 file.
        SourceError: no molecule group, or a group without the layout's datasets.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        layout: str,
        energy_key: str | None = None,
        forces_key: str | None = None,
        energy_unit: str | None = None,
        length_unit: str | None = None,
        skip_invalid: bool = False,
    ) -> None:
        if layout not in LAYOUTS:
            raise ConfigError(f"unknown HDF5 layout {layout!r}; use one of {', '.join(LAYOUTS)}")
        self.h5py = require_extra("h5py", "hdf5", "pack hdf5")
        self.path = Path(path)
        check_input_file(self.path)
        self.layout = LAYOUTS[layout]
        self.energy_unit = energy_unit or self.layout.energy_unit
        self.length_unit = length_unit or self.layout.length_unit
        e, r = energy_factor(self.energy_unit), length_factor(self.length_unit)
        self.factors = {"energy_factor": e, "length_factor": r, "force_factor": e / r}
        self.skip_invalid = skip_invalid
        self.skips = SkipLog()
        self.skipped_first = self.skips.first
        try:
            self._file = self.h5py.File(self.path, "r")
        except OSError as exc:
            raise UnreadableSourceError(f"{self.path}: not a readable HDF5 file ({_one_line(exc)})") from None
        try:
            self.groups = self._molecule_groups()
            first = self._file[self.groups[0]]
            self.energy_key = energy_key or self.layout.energy
            self.forces_key = self._resolve_forces(first, forces_key)
            self.n_molecules = 0
            for i, name in enumerate(self.groups):
                if i and i % REOPEN_GROUPS == 0:
                    self._reopen()
                self.n_molecules += self._dataset(self._file[name], self.layout.positions).shape[0]
            self._reopen()
        except BaseException:
            self._file.close()
            raise
        self.has_forces = self.forces_key is not None
        self.has_qtot = True  # zeros (neutral) for ANI; provenance says so
        self.name = str(self.path)
        self.input_paths = (self.path,)
        self.field_names = {"n_atoms": "atomic numbers", "Z": "atomic numbers", "R": f"dataset {self.layout.positions!r}",
                            "E": f"dataset {self.energy_key!r}", "F": f"dataset {self.forces_key!r}",
                            "Qtot": "total charge"}
        self._seen = 0  # conformers of the groups read so far
        self.digest = FileDigest(self.path)

    # ---- structure ----------------------------------------------------------------------

    def _molecule_groups(self) -> list[str]:
        """Paths of the groups that hold the positions dataset, in h5py's (name) order.

        ``visit`` passes names only (no h5py object per member), which keeps a scan of 20,000
        SPICE groups to a fraction of a second.
        """
        found: list[str] = []
        positions = self.layout.positions

        def visit(name: str) -> None:
            parent, _, leaf = name.rpartition("/")
            if leaf == positions:
                found.append(parent or "/")

        try:
            self._file.visit(visit)
        except (OSError, RuntimeError, KeyError) as exc:
            raise SourceError(f"{self.path}: the group index is unreadable ({_one_line(exc)}); truncated?") from None
        if not found:
            raise SourceError(
                f"{self.path}: no group holds {positions!r}; is this the {self.layout.name} layout? "
                f"(layouts: {', '.join(LAYOUTS)})"
            )
        return found

    def _resolve_forces(self, first: Any, forces_key: str | None) -> str | None:
        if forces_key is not None:
            return None if forces_key.lower() == "none" else forces_key
        if self.layout.forces is not None:
            return self.layout.forces
        level, dot, kind = self.energy_key.rpartition(".")
        candidate = f"{level}.forces" if dot and kind == "energy" else None
        return candidate if candidate is not None and candidate in first else None

    def _reopen(self) -> None:
        """A fresh file handle (see ``REOPEN_GROUPS``)."""
        self._file.close()
        try:
            self._file = self.h5py.File(self.path, "r")
        except OSError as exc:
            raise UnreadableSourceError(f"{self.path}: not a readable HDF5 file ({_one_line(exc)})") from None

    def _dataset(self, group: Any, key: str) -> Any:
        """``group[key]``, with a one-line error naming the file, the group and the dataset."""
        try:
            return group[key]
        except KeyError:
            raise SourceError(f"{self.path}: group {group.name}: dataset {key!r}: missing") from None
        except (OSError, RuntimeError) as exc:
            raise SourceError(
                f"{self.path}: group {group.name}: dataset {key!r}: unreadable ({_one_line(exc)}); truncated file?"
            ) from None

    def _read(self, group: Any, dataset: Any, lo: int | None = None, hi: int | None = None) -> np.ndarray:
        """``dataset[lo:hi]`` (all of it without a range) as an array, with one-line errors."""
        try:
            return np.asarray(dataset[()] if lo is None else dataset[lo:hi])
        except (OSError, RuntimeError, ValueError, TypeError) as exc:
            name = dataset.name.rpartition("/")[2]
            raise SourceError(
                f"{self.path}: group {group.name}: dataset {name!r}: unreadable ({_one_line(exc)}); truncated file?"
            ) from None

    # ---- reading ------------------------------------------------------------------------

    def chunks(self) -> Iterator[MoleculeChunk]:
        """Kept conformers, group after group, in chunks of about ``CHUNK_ATOMS`` atoms."""
        buffer = ChunkBuffer()
        for i, name in enumerate(self.groups):
            if i and i % REOPEN_GROUPS == 0:
                self._reopen()
            for chunk in self._group_chunks(self._file[name]):
                full = buffer.add(chunk)
                if full is not None:
                    yield full
        last = buffer.flush()
        if last is not None:
            yield last

    def _group_chunks(self, group: Any) -> Iterator[MoleculeChunk]:
        layout = self.layout
        numbers = layout.numbers[0]
        if len(layout.numbers) > 1:
            numbers = next((k for k in layout.numbers if k in group), numbers)
        positions = self._dataset(group, layout.positions)
        energy = self._dataset(group, self.energy_key)
        forces = None if self.forces_key is None else self._dataset(group, self.forces_key)
        z_dataset = self._dataset(group, numbers)
        self._expect_kind(group, numbers, z_dataset, "iu", "integers")
        for key, dataset in ((layout.positions, positions), (self.energy_key, energy), (self.forces_key, forces)):
            if dataset is not None:
                self._expect_kind(group, key, dataset, "fiu", "numbers")
        z_all = self._read(group, z_dataset).astype(np.int64)
        shape = positions.shape
        if len(shape) != 3 or shape[2] != 3:
            raise SourceError(f"{self.path}: group {group.name}: dataset {layout.positions!r}: shape {shape}, expected (C, n, 3)")
        c, n = shape[0], shape[1]
        if z_all.shape not in ((n,), (c, n)):
            raise SourceError(
                f"{self.path}: group {group.name}: dataset {numbers!r}: shape {z_all.shape}, expected ({n},) or "
                f"({c}, {n}) to match {layout.positions!r} {tuple(shape)}"
            )
        self._expect(group, self.energy_key, energy.shape, ((c,), (c, 1)))
        if forces is not None:
            self._expect(group, self.forces_key, forces.shape, ((c, n, 3),))
        charge = self._group_charge(group)
        names = {"n_atoms": numbers, "Z": numbers, "R": layout.positions, "E": self.energy_key,
                 "F": self.forces_key or "F", "Qtot": layout.smiles or "charge"}
        step = max(1, CHUNK_ATOMS // max(n, 1))
        for lo in range(0, c, step):
            hi = min(lo + step, c)
            whole = (None, None) if (lo, hi) == (0, c) else (lo, hi)  # h5py reads a whole dataset fastest
            m = hi - lo
            counts = np.full(m, n, dtype=np.int64)
            Z = np.tile(z_all, m) if z_all.ndim == 1 else z_all[lo:hi].reshape(-1)
            R = self._read(group, positions, *whole).reshape(-1, 3)
            E = self._read(group, energy, *whole).reshape(-1).astype(np.float64)
            F = None
            if forces is not None:
                F = self._read(group, forces, *whole).reshape(-1, 3)
                if _is_gradient(self.forces_key):
                    F = -F.astype(np.float64)
            Q = None if charge is None else np.full(m, float(charge))
            chunk = to_chunk(counts, Z, R, E, F, Q, first=self._seen + lo, **self.factors)
            keep = screen(
                value_flags(chunk), m, lambda i: f"{self.path}: group {group.name}: conformer {lo + i}",
                names=names, skip=self.skip_invalid, log=self.skips, always_skip=MISSING_LABEL,
            )
            if keep is None:
                yield chunk
            elif keep.any():
                yield select(chunk, keep)
        self._seen += c

    def _expect(self, group: Any, key: str, shape: tuple[int, ...], shapes: tuple[tuple[int, ...], ...]) -> None:
        if tuple(shape) not in shapes:
            raise SourceError(
                f"{self.path}: group {group.name}: dataset {key!r}: shape {tuple(shape)}, "
                f"expected {' or '.join(map(str, shapes))}"
            )

    def _expect_kind(self, group: Any, key: str, dataset: Any, kinds: str, what: str) -> None:
        """A dataset of the wrong kind (text atomic numbers, float ones that a cast would truncate)
        as a one-line error naming file, group and dataset."""
        if dataset.dtype.kind not in kinds:
            raise SourceError(f"{self.path}: group {group.name}: dataset {key!r}: dtype {dataset.dtype}, expected {what}")

    def _group_charge(self, group: Any) -> int | None:
        if self.layout.smiles is None:
            return None
        raw = self._read(group, self._dataset(group, self.layout.smiles)).reshape(-1)
        if raw.shape[0] < 1:
            raise SourceError(f"{self.path}: group {group.name}: dataset {self.layout.smiles!r}: empty")
        value = raw[0]
        return smiles_charge(value.decode() if isinstance(value, bytes) else str(value))

    # ---- reporting ----------------------------------------------------------------------

    def provenance(self) -> dict[str, Any]:
        """File (path, size, sha256), layout, datasets and units chosen, conformers skipped."""
        forces = self.forces_key
        return {
            "source": "hdf5",
            "input": str(self.path),
            **file_provenance(self.path, self.digest),
            "layout": self.layout.name,
            "keys": {
                "atomic_numbers": "/".join(self.layout.numbers),
                "positions": self.layout.positions,
                "energy": self.energy_key,
                "forces": None if forces is None else (f"-{forces}" if _is_gradient(forces) else forces),
                "charge": f"sum of formal charges in {self.layout.smiles!r}" if self.layout.smiles else None,
            },
            "source_units": {"energy": self.energy_unit, "length": self.length_unit},
            "factors": {k.removesuffix("_factor"): v for k, v in self.factors.items()},
            "had_forces": self.has_forces,
            "had_charges": self.layout.smiles is not None,
            "n_groups": len(self.groups),
            "n_source_conformers": self.n_molecules,
            "skipped_invalid": self.skips.total,
            "skipped_by_reason": dict(self.skips.counts),
        }

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Hdf5Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


__all__ = ["LAYOUTS", "Hdf5Layout", "Hdf5Source", "smiles_charge"]
