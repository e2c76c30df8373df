"""What every source shares: optional-extra imports, file provenance, value screening, unit
conversion into a ``MoleculeChunk`` and chunk buffering.

A source reads its format into flat arrays in the file's own units (``counts`` (m,) atoms per
molecule, ``Z`` (A,), ``R`` (A, 3), ``E`` (m,), ``F`` (A, 3) or None, ``Q`` (m,) or None, with
``A = counts.sum()``), screens them with :func:`value_flags` and :func:`screen`, and converts the
kept molecules with :func:`to_chunk`.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..elements import MAX_Z
from ..errors import ConfigError, SourceError
from ..format import MoleculeChunk
from . import UnreadableSourceError

#: molecules of one screening report that are named in ``PackResult.skipped_first``
SKIPPED_SHOWN = 10
#: a buffered chunk is handed to the writer once it holds this many atoms
CHUNK_ATOMS = 1 << 19

#: (field, reason, (m,) bool mask of the molecules it applies to)
Flag = tuple[str, str, np.ndarray]


def require_extra(module: str, extra: str, command: str) -> ModuleType:
    """Import an optional dependency, or raise a one-line ConfigError naming the extra to install.

    Example: ``require_extra("h5py", "hdf5", "pack hdf5")``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"{command} needs the {module.split('.')[0]} package ({exc.name or module} missing): "
            f"pip install 'packedqdc[{extra}]'"
        ) from None


def check_input_file(path: Path) -> None:
    """Raise UnreadableSourceError (one line) unless ``path`` is a readable regular file."""
    if not path.is_file():
        raise UnreadableSourceError(f"{path}: no such file")
    if not os.access(path, os.R_OK):
        raise UnreadableSourceError(f"{path}: not readable (permission denied)")


class FileDigest:
    """The sha256 of a file, computed in a background thread while the source parses it.

    hashlib releases the GIL on large buffers, so hashing overlaps the parse; the file is read
    through the page cache the parse fills (or fills it for the parse).
    """

    def __init__(self, path: Path, block: int = 1 << 22) -> None:
        self.path = path
        self._sha = hashlib.sha256()
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, args=(block,), daemon=True)
        self._thread.start()

    def _run(self, block: int) -> None:
        try:
            with open(self.path, "rb", buffering=0) as fh:
                buf = bytearray(block)
                view = memoryview(buf)
                while n := fh.readinto(buf):
                    self._sha.update(view[:n])
        except OSError as exc:
            self._error = exc

    def hexdigest(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise SourceError(f"{self.path}: read failed while hashing ({self._error})")
        return self._sha.hexdigest()


def file_provenance(path: Path, digest: FileDigest) -> dict[str, Any]:
    """``{"file", "bytes", "sha256"}`` of an input file for ``meta.json``."""
    return {"file": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


@dataclass
class SkipLog:
    """Molecules dropped while reading: a count per reason and the first few messages."""

    counts: dict[str, int] = field(default_factory=dict)
    first: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, n: int, message: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        if len(self.first) < SKIPPED_SHOWN:
            self.first.append(message)


def value_flags(
    counts: np.ndarray,
    Z: np.ndarray,
    R: np.ndarray,
    E: np.ndarray | None,
    F: np.ndarray | None,
    Q: np.ndarray | None,
    names: dict[str, str],
) -> list[Flag]:
    """Value checks shared by the sources, as (field, reason, (m,) mask); empty when all pass.

    Checks, in reporting order: no atoms, atomic number outside 1..MAX_Z, non-finite position,
    force, energy or charge, fractional total charge. ``names`` maps the roles ``Z R E F Q`` to the
    field names of the file (for messages). Each check tests the whole block first.
    """
    flags: list[Flag] = []

    def add(role: str, reason: str, mask: np.ndarray | None) -> None:
        if mask is not None and mask.any():
            flags.append((names.get(role, role), reason, mask))

    add("Z", "no atoms", counts < 1)
    z = np.asarray(Z)
    if z.size and (z.min() < 1 or z.max() > MAX_Z):
        add("Z", f"atomic number outside 1..{MAX_Z}", per_molecule((z < 1) | (z > MAX_Z), counts))
    add("R", "non-finite position", _non_finite_rows(R, counts))
    if F is not None:
        add("F", "non-finite force", _non_finite_rows(F, counts))
    if E is not None:
        add("E", "non-finite energy", ~np.isfinite(E))
    if Q is not None:
        finite = np.isfinite(Q)
        add("Q", "non-finite total charge", ~finite)
        add("Q", "fractional total charge", finite & (Q != np.round(Q)))
    return flags


def per_molecule(per_atom: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(m,) bool: molecules owning at least one flagged atom; ``per_atom`` is (counts.sum(),) bool."""
    owner = np.repeat(np.arange(counts.shape[0]), counts)
    out = np.zeros(counts.shape[0], dtype=bool)
    out[owner[per_atom]] = True
    return out


def _non_finite_rows(a: np.ndarray, counts: np.ndarray) -> np.ndarray | None:
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(a.sum()):
            return None
    bad = ~np.isfinite(a).all(axis=1)
    return per_molecule(bad, counts) if bad.any() else None


def screen(
    flags: list[Flag],
    m: int,
    where: Callable[[int], str],
    *,
    skip: bool,
    log: SkipLog,
    always_skip: frozenset[str] = frozenset(),
) -> np.ndarray | None:
    """Raise on the first flagged molecule, or return the (m,) keep mask when skipping.

    Args:
        flags: from :func:`value_flags` and the source's own checks, in reporting order.
        m: molecules in the block.
        where: molecule index in the block -> ``"FILE: frame N"`` (or group/conformer).
        skip: drop flagged molecules instead of raising (``--skip-invalid``).
        log: records what was dropped.
        always_skip: reasons that are dropped and counted even without ``skip`` (missing labels).

    Returns:
        None when nothing is flagged, else the mask of the molecules to keep.

    Raises:
        SourceError: ``FILE: frame N: FIELD: REASON`` for the first flagged molecule not skipped.
    """
    if not flags:
        return None
    keep = np.ones(m, dtype=bool)
    first_error: tuple[int, str] | None = None
    for name, reason, mask in flags:  # a molecule counts under the first flag that hits it
        hit = keep & mask
        if not hit.any():
            continue
        i = int(np.argmax(hit))
        message = f"{where(i)}: {name}: {reason}"
        if skip or reason in always_skip:
            log.add(reason, int(hit.sum()), message)
        elif first_error is None or i < first_error[0]:
            first_error = (i, message)
        keep &= ~mask
    if first_error is not None:
        raise SourceError(first_error[1])
    return keep


def scaled(a: np.ndarray, factor: float, dtype: type) -> np.ndarray:
    """``a * factor`` as ``dtype``, computed in float64; no arithmetic when ``factor`` is 1."""
    if factor == 1.0:
        return np.asarray(a).astype(dtype, copy=False)
    return (np.asarray(a, dtype=np.float64) * factor).astype(dtype)


def to_chunk(
    counts: np.ndarray,
    Z: np.ndarray,
    R: np.ndarray,
    E: np.ndarray,
    F: np.ndarray | None,
    Q: np.ndarray | None,
    *,
    energy_factor: float,
    length_factor: float,
    force_factor: float,
    keep: np.ndarray | None = None,
) -> MoleculeChunk:
    """The kept molecules in packedqdc units: E kcal/mol, R Å, F kcal/mol/Å, Qtot e.

    ``keep`` (m,) bool selects molecules (None: all). Q None is written as zeros (neutral).
    """
    if keep is not None:
        atoms = np.repeat(keep, counts)
        counts, Z, R, E = counts[keep], Z[atoms], R[atoms], E[keep]
        F = None if F is None else F[atoms]
        Q = None if Q is None else Q[keep]
    return MoleculeChunk(
        n_atoms=np.asarray(counts, dtype=np.int32),
        Z=np.asarray(Z, dtype=np.int32),
        R=scaled(R, length_factor, np.float32),
        E=scaled(E, energy_factor, np.float64),
        F=None if F is None else scaled(F, force_factor, np.float32),
        Qtot=np.zeros(counts.shape[0]) if Q is None else np.asarray(Q, dtype=np.float64),
    )


class ChunkBuffer:
    """Gathers small chunks (one HDF5 group, a few frames) into chunks of about ``atoms`` atoms."""

    def __init__(self, atoms: int = CHUNK_ATOMS) -> None:
        self.limit = atoms
        self._parts: list[MoleculeChunk] = []
        self._atoms = 0

    def add(self, chunk: MoleculeChunk) -> MoleculeChunk | None:
        """Buffer ``chunk``; return a full chunk once ``atoms`` atoms are buffered, else None."""
        if len(chunk):
            self._parts.append(chunk)
            self._atoms += int(chunk.Z.shape[0])
        return self.flush() if self._atoms >= self.limit else None

    def flush(self) -> MoleculeChunk | None:
        """Everything buffered as one chunk (None when empty)."""
        parts, self._parts, self._atoms = self._parts, [], 0
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]

        def cat(name: str) -> np.ndarray | None:
            arrays = [getattr(p, name) for p in parts]
            return None if arrays[0] is None else np.concatenate(arrays)

        return MoleculeChunk(
            n_atoms=cat("n_atoms"), Z=cat("Z"), R=cat("R"), E=cat("E"), F=cat("F"), Qtot=cat("Qtot")
        )


__all__ = [
    "CHUNK_ATOMS",
    "ChunkBuffer",
    "FileDigest",
    "SkipLog",
    "check_input_file",
    "file_provenance",
    "per_molecule",
    "require_extra",
    "scaled",
    "screen",
    "to_chunk",
    "value_flags",
]
