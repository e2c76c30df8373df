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
    finite, whole-number total charges. "Non-finite" is judged on the values as stored, so a
    finite input that overflows in the conversion (R = 1e39 Å as float32) is reported too. Each check tests the whole chunk in one pass and maps
    failures to molecules only when there are some.
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
    for name, values in (("R", chunk.R), ("F", chunk.F)):
        if values is not None and not all_finite(values):
            add(name, "non-finite value",
                per_atom(~np.isfinite(np.asarray(values)).all(axis=1)))
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


__all__ = ["Invalid", "SKIPPED_SHOWN", "ValueScreen", "invalid_molecules", "select"]
