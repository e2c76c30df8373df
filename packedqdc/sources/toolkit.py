"""What every source shares: optional-extra imports, file provenance, unit conversion into a
``MoleculeChunk``, screening with messages in the source's own terms, and chunk buffering.

A source reads its format into flat arrays in the file's own units (``counts`` (m,) atoms per
molecule, ``Z`` (A,), ``R`` (A, 3), ``E`` (m,), ``F`` (A, 3) or None, ``Q`` (m,) or None, with
``A = counts.sum()``) and converts them with :func:`to_chunk`. Values are judged as stored by the
project's one check (``packedqdc.checks.invalid_molecules``, through :func:`value_flags`), together
with the source's own flags (a periodic frame, a missing entry), by :func:`screen`, which names the
file, the frame or group and the field the way the source does. ``pack_source`` screens every
chunk again (``checks.ValueScreen``); what a source has screened passes it unchanged.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..checks import SKIPPED_SHOWN, invalid_molecules, select
from ..errors import ConfigError, SourceError
from ..format import MoleculeChunk
from . import UnreadableSourceError

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
    if path.is_dir():
        raise UnreadableSourceError(f"{path}: is a directory, not a file")
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


def value_flags(chunk: MoleculeChunk) -> list[Flag]:
    """The project's value checks of a converted chunk (``checks.invalid_molecules``) as flags.

    Roles are the chunk's field names: ``n_atoms``, ``Z``, ``R``, ``F``, ``E``, ``Qtot``.
    """
    return [(bad.field, bad.reason, bad.molecules) for bad in invalid_molecules(chunk)]


def screen(
    flags: list[Flag],
    m: int,
    where: Callable[[int], str],
    *,
    names: Mapping[str, str],
    skip: bool,
    log: SkipLog,
    always_skip: frozenset[tuple[str, str]] = frozenset(),
) -> np.ndarray | None:
    """Raise on the first flagged molecule, or return the (m,) keep mask when skipping.

    Args:
        flags: the source's own flags, then :func:`value_flags`, in reporting order.
        m: molecules in the block.
        where: molecule index in the block -> ``"FILE: frame N"`` (or group/conformer).
        names: role -> the field's name in the file, for messages (a role not here is used as is).
        skip: drop flagged molecules instead of raising (``--skip-invalid``).
        log: records what was dropped, by ``"FIELD: REASON"``.
        always_skip: (role, reason) pairs dropped and counted even without ``skip`` (missing labels).

    Returns:
        None when nothing is flagged, else the mask of the molecules to keep.

    Raises:
        SourceError: ``FILE: frame N: FIELD: REASON`` for the first flagged molecule not skipped.
    """
    if not flags:
        return None
    keep = np.ones(m, dtype=bool)
    first_error: tuple[int, str] | None = None
    for role, reason, mask in flags:  # a molecule counts under the first flag that hits it
        hit = keep & mask
        if not hit.any():
            continue
        i = int(np.argmax(hit))
        name = names.get(role, role)
        message = f"{where(i)}: {name}: {reason}"
        if skip or (role, reason) in always_skip:
            log.add(f"{name}: {reason}", int(hit.sum()), message)
        elif first_error is None or i < first_error[0]:
            first_error = (i, message)
        keep &= ~mask
    if first_error is not None:
        raise SourceError(first_error[1])
    return keep


def scaled(a: np.ndarray, factor: float, dtype: type) -> np.ndarray:
    """``a * factor`` as ``dtype``, computed in float64; no arithmetic when ``factor`` is 1.

    A value that overflows (to inf in float32) is not warned about here: the value check
    (``checks.invalid_molecules``) reports it by molecule.
    """
    a = np.asarray(a)
    with np.errstate(over="ignore", invalid="ignore"):
        if factor == 1.0:
            return a.astype(dtype, copy=False)
        return (a.astype(np.float64) * factor).astype(dtype)


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
    first: int,
) -> MoleculeChunk:
    """The molecules in packedqdc units: E kcal/mol, R Å, F kcal/mol/Å, Qtot e (Q None: zeros).

    ``first`` is the input number of the first molecule (``chunk.index`` counts on from it). Z is
    kept as read (int64): the writer casts it once its range is checked.
    """
    m = counts.shape[0]
    return MoleculeChunk(
        n_atoms=np.asarray(counts, dtype=np.int32),
        Z=np.asarray(Z, dtype=np.int64),
        R=scaled(R, length_factor, np.float32),
        E=scaled(E, energy_factor, np.float64),
        F=None if F is None else scaled(F, force_factor, np.float32),
        Qtot=np.zeros(m) if Q is None else np.asarray(Q, dtype=np.float64),
        index=np.arange(first, first + m, dtype=np.int64),
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
            n_atoms=cat("n_atoms"), Z=cat("Z"), R=cat("R"), E=cat("E"), F=cat("F"), Qtot=cat("Qtot"),
            index=cat("index"),
        )


__all__ = [
    "CHUNK_ATOMS",
    "ChunkBuffer",
    "FileDigest",
    "SkipLog",
    "check_input_file",
    "file_provenance",
    "select",
    "require_extra",
    "scaled",
    "screen",
    "to_chunk",
    "value_flags",
]
