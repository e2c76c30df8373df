"""Value checks of molecules as they will be stored: after unit conversion and the dtype casts.

Every source's chunks pass through :class:`ValueScreen` on their way to the writer
(``packedqdc.pack.pack_source``), so there is one place where values are judged, and it sees what
will be written: ``R = 1e39`` Å is finite in float64 but inf in float32, and ``E = 1e307`` hartree
overflows to inf in kcal/mol; both are caught here, whatever the source.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from .elements import MAX_Z
from .errors import SourceError
from .finite import all_finite
from .format import MoleculeChunk

#: how many skip reasons are kept for the pack summary
SKIPPED_SHOWN = 10

#: Å; two atoms of one molecule this close are at the same place: duplicated atoms (the shortest
#: bond, H2's, is 0.74 Å; strained geometries of reactive sampling stay above 0.4 Å). Far below
#: any real distance, so that synthetic sets of random positions pass too (two of 30 atoms drawn
#: with a spread of 1 Å come this close in one molecule of ~2.5e7). Checked by ``validate``, not
#: while packing: the O(n^2) pass per molecule and loading its compiled kernel would double the
#: time ``pack npz`` takes (0.25 s per 1M QM9-sized molecules, plus 0.7 s to load numba).
MIN_ATOM_DISTANCE = 0.001

#: Å; a coordinate beyond this keeps less than 0.01 Å of resolution in float32 (2^-7 Å at 1e5)
MAX_COORDINATE = 1e5

CLOSE_ATOMS = f"two atoms at the same place (closer than {MIN_ATOM_DISTANCE} Å: duplicated atoms?)"
FAR_COORDINATE = f"coordinate beyond {MAX_COORDINATE:g} Å (float32 keeps less than 0.01 Å there)"


@dataclass(frozen=True)
class Invalid:
    """One failed check: the chunk field (``n_atoms``, ``Z``, ``R``, ``F``, ``E``, ``Qtot``, ``D``), why, and
    which molecules of the chunk fail it, (m,) bool."""

    field: str
    reason: str
    molecules: np.ndarray


def invalid_molecules(chunk: MoleculeChunk) -> list[Invalid]:
    """Every failing check of ``chunk``, in reporting order; empty when all molecules are valid.

    Checks: at least one atom; atomic numbers in 1..118; finite R, F (float32), E and D (float64);
    coordinates within ``MAX_COORDINATE`` Å; finite, whole-number total charges. "Non-finite" is
    judged on the values as stored, so a finite input that overflows in the conversion (R = 1e39 Å
    as float32) is reported too. Each check tests the whole chunk in one pass and maps failures to
    molecules only when there are some. (Atoms at the same place, ``MIN_ATOM_DISTANCE``, are
    ``validate``'s check.)
    """
    counts = np.asarray(chunk.n_atoms, dtype=np.int64)
    found: list[Invalid] = []

    def add(name: str, reason: str, mask: np.ndarray | None) -> None:
        if mask is not None and mask.any():
            found.append(Invalid(name, reason, mask))

    def per_atom(bad_atoms: np.ndarray) -> np.ndarray:
        owner = np.repeat(np.arange(counts.shape[0]), counts)
        out = np.zeros(counts.shape[0], dtype=bool)
        out[owner[bad_atoms]] = True
        return out

    add("n_atoms", "no atoms", counts < 1)
    z = np.asarray(chunk.Z)
    if z.size and (z.min() < 1 or z.max() > MAX_Z):
        add("Z", f"atomic number outside 1..{MAX_Z}", per_atom((z < 1) | (z > MAX_Z)))
    r = np.asarray(chunk.R)
    if r.size and not (-MAX_COORDINATE <= r.min() and r.max() <= MAX_COORDINATE):  # NaN, inf or far
        finite = np.isfinite(r).all(axis=1)
        add("R", "non-finite value", per_atom(~finite))
        add("R", FAR_COORDINATE, per_atom(finite & (np.abs(r) > MAX_COORDINATE).any(axis=1)))
    if chunk.F is not None and not all_finite(chunk.F):
        add("F", "non-finite value", per_atom(~np.isfinite(np.asarray(chunk.F)).all(axis=1)))
    if not all_finite(chunk.E):
        add("E", "non-finite value", ~np.isfinite(np.asarray(chunk.E)))
    if chunk.Qtot is not None:
        q = np.asarray(chunk.Qtot, dtype=np.float64)
        finite = np.isfinite(q)
        add("Qtot", "non-finite value", ~finite)
        add("Qtot", "fractional total charge", finite & (q != np.round(q)))
    if chunk.D is not None and not all_finite(chunk.D):
        add("D", "non-finite value", ~np.isfinite(np.asarray(chunk.D)).all(axis=1))
    return found


def select(chunk: MoleculeChunk, keep: np.ndarray) -> MoleculeChunk:
    """The molecules of ``chunk`` where ``keep`` (m,) bool is true."""
    atoms = np.repeat(keep, np.asarray(chunk.n_atoms, dtype=np.int64))
    return replace(
        chunk,
        n_atoms=chunk.n_atoms[keep],
        Z=chunk.Z[atoms],
        R=chunk.R[atoms],
        E=chunk.E[keep],
        F=None if chunk.F is None else chunk.F[atoms],
        Qtot=None if chunk.Qtot is None else chunk.Qtot[keep],
        D=None if chunk.D is None else chunk.D[keep],
        index=None if chunk.index is None else chunk.index[keep],
    )


@dataclass
class ValueScreen:
    """Checks chunks on their way to the writer: raises on the first invalid molecule, or drops
    invalid molecules (``skip_invalid``) and counts them.

    Args:
        label: the input, as messages name it (a file path).
        field_names: how the input names a chunk field, e.g. ``{"R": "key 'coords'"}``; a field
            missing here is named ``field 'R'``.
        skip_invalid: drop invalid molecules instead of raising.

    Messages read ``LABEL: FIELD: molecule I: REASON``, with ``I`` the molecule's number in the
    input (``chunk.index``; without it, molecules are numbered as they arrive).
    """

    label: str
    field_names: Mapping[str, str] = field(default_factory=dict)
    skip_invalid: bool = False
    skipped: int = 0
    skipped_first: list[str] = field(default_factory=list)
    _seen: int = 0

    def __call__(self, chunk: MoleculeChunk) -> MoleculeChunk:
        m = len(chunk)
        first_number = self._seen
        self._seen += m
        found = invalid_molecules(chunk)
        if not found:
            return chunk
        bad = np.logical_or.reduce([f.molecules for f in found])
        first = int(np.argmax(bad))
        check = next(f for f in found if f.molecules[first])
        number = int(chunk.index[first]) if chunk.index is not None else first_number + first
        name = self.field_names.get(check.field, f"field {check.field!r}")
        message = f"{self.label}: {name}: molecule {number}: {check.reason}"
        if not self.skip_invalid:
            raise SourceError(message)
        self.skipped += int(bad.sum())
        if len(self.skipped_first) < SKIPPED_SHOWN:
            self.skipped_first.append(message)
        return select(chunk, ~bad)


__all__ = ["CLOSE_ATOMS", "FAR_COORDINATE", "Invalid", "MAX_COORDINATE", "MIN_ATOM_DISTANCE", "SKIPPED_SHOWN",
           "ValueScreen", "invalid_molecules", "select"]
