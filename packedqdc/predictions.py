"""Files of ``packedqdc predict``: structures read with ASE, predictions written as NPZ or extxyz.

NPZ (packedqdc's units, the flat layout ``packedqdc pack npz`` reads back):
    N (m,) int32 atoms per molecule; Z (n,) int32; R (n, 3) float32 Å; Q (m,) float64 total charge, e;
    E (m,) float64 kcal/mol; F (n, 3) float32 kcal/mol/Å; charges (n,) float32 partial charges, e;
    energy_unit, force_unit: the unit names as 0-d strings.
extxyz (ASE's units, what ``ase.io.read`` gives back as ``atoms.get_potential_energy()`` etc.):
    one frame per molecule with energy (eV), forces (eV/Å) and charges (e) as calculator results,
    and ``info["charge"]`` the total charge.

Files are written to a temporary name beside the target and renamed into place when complete, so an
interrupted run leaves no half-written output; an existing file is only replaced when asked.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, SourceError, TargetExistsError
from .sources.toolkit import require_extra
from .units import energy_factor

#: Output suffixes and their formats.
FORMATS = {".npz": "npz", ".xyz": "extxyz", ".extxyz": "extxyz"}


def output_format(path: str | Path, force: bool = False) -> str:
    """The format of ``path`` by suffix; ConfigError for another suffix, TargetExistsError when the
    file exists and ``force`` is False (checked before any work)."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path}: --output must end in .npz, .xyz or .extxyz")
    if path.exists() and not force:
        raise TargetExistsError(f"{path}: output exists; pass --force to replace it")
    if not path.parent.is_dir():
        raise ConfigError(f"{path}: directory {path.parent} does not exist")
    return fmt


def read_structures(path: str | Path, charge: float = 0.0, known_elements: Any = None
                    ) -> tuple[list[np.ndarray], list[np.ndarray], list[float]]:
    """Every structure of a file ASE can read -> (Zs (n_i,) int32, Rs (n_i, 3) float64 Å, Qtots e).

    The total charge is ``atoms.info["charge"]`` when present, else ``charge``. ``known_elements``
    (a ``ReferenceEnergies``) checks each structure's elements.

    Raises:
        SourceError: ASE cannot read the file. ConfigError: a periodic structure, an empty one, or
        (with ``known_elements``) an element the model has not learned; the message names the
        structure.
    """
    ase_io = require_extra("ase.io", "ase", "predict on a structure file")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: INPUT is neither a packed directory nor a file")
    try:
        frames = ase_io.read(path, index=":")
    except Exception as exc:  # ASE raises many types (ValueError, KeyError, UnknownFileTypeError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"{path}: ASE cannot read it ({first})") from None
    Zs, Rs, Qtots = [], [], []
    for i, atoms in enumerate(frames):
        where = f"{path}: structure {i}"
        if len(atoms) == 0:
            raise ConfigError(f"{where} has no atoms")
        if atoms.pbc.any():
            raise ConfigError(f"{where} is periodic (pbc={atoms.pbc.tolist()}); the model describes "
                              "isolated molecules")
        if known_elements is not None:
            known_elements.check_elements(atoms.numbers, where=where)
        value = atoms.info.get("charge", charge)
        try:
            Qtots.append(float(value))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: info['charge'] must be a number, got {value!r}") from None
        Zs.append(np.asarray(atoms.numbers, dtype=np.int32))
        Rs.append(np.asarray(atoms.positions, dtype=np.float64))
    if not Zs:
        raise SourceError(f"{path}: no structures")
    return Zs, Rs, Qtots


def write_predictions(predictions: Any, path: str | Path, force: bool = False) -> None:
    """Write a ``PredictionSet`` to ``path`` (.npz or .xyz/.extxyz), atomically."""
    path = Path(path)
    fmt = output_format(path, force)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            if fmt == "npz":
                _write_npz(predictions, fh)
            else:
                _write_extxyz(predictions, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_npz(p: Any, fh: Any) -> None:
    np.savez(fh, N=np.asarray(p.N, np.int32), Z=p.Z, R=p.R, Q=p.Qtot, E=p.E, F=p.F, charges=p.charges,
             energy_unit=np.asarray("kcal/mol"), force_unit=np.asarray("kcal/mol/Å"))


def _write_extxyz(p: Any, fh: Any) -> None:
    require_extra("ase", "ase", "--output .xyz/.extxyz")
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    kcal_mol_per_ev = energy_factor("ev")
    offsets = p.offsets
    text = io.TextIOWrapper(fh, encoding="utf-8", newline="\n")
    for i in range(p.n_molecules):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        atoms = Atoms(numbers=np.asarray(p.Z[lo:hi]), positions=np.asarray(p.R[lo:hi], dtype=np.float64))
        atoms.info["charge"] = float(p.Qtot[i])
        atoms.calc = SinglePointCalculator(
            atoms, energy=float(p.E[i]) / kcal_mol_per_ev,
            forces=np.asarray(p.F[lo:hi], dtype=np.float64) / kcal_mol_per_ev,
            charges=np.asarray(p.charges[lo:hi], dtype=np.float64))
        write(text, atoms, format="extxyz")
    text.flush()
    text.detach()
