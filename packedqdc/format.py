"""The packed directory format (v1): file names, dtypes, ``meta.json``, reading and atomic writing.

A packed directory holds ``N`` molecules with ``A = sum(n_atoms)`` atoms in total:

================  ==========  ==========  =========================================
file              dtype       shape       content
================  ==========  ==========  =========================================
``offsets.npy``   int64       (N+1,)      atom offsets; ``offsets[0] = 0``, ``offsets[-1] = A``
``n_atoms.npy``   int32       (N,)        ``diff(offsets)``
``Z_pack.int32``  int32 raw   (A,)        atomic numbers 1..118
``R_pack.f32``    float32 raw (A, 3)      positions, Å
``F_pack.f32``    float32 raw (A, 3)      forces (-dE/dR), kcal/mol/Å (optional)
``E.f64``         float64 raw (N,)        energies, kcal/mol
``Qtot.f64``      float64 raw (N,)        total charges, e (optional; absent means neutral)
``D.f64``         float64 raw (N, 3)      dipole moments, e·Å, about the molecule's centroid (optional)
``meta.json``     JSON                    format, counts, units, provenance, sha256 per file
================  ==========  ==========  =========================================

The seven data files of the seed are byte-compatible with the seed document's format, so a directory written
by the seed's snippet opens here and one written here opens in the seed's loader. ``meta.json`` is
written last; a directory without it is still valid input.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
import queue
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; leftovers are then never removed
    fcntl = None  # type: ignore[assignment]

from .elements import MAX_Z, element_histogram, symbol
from .errors import FormatError, SourceError, TargetExistsError

FORMAT_NAME = "packedqdc"
FORMAT_VERSION = 1

OFFSETS = "offsets.npy"
N_ATOMS = "n_atoms.npy"
Z_FILE = "Z_pack.int32"
R_FILE = "R_pack.f32"
F_FILE = "F_pack.f32"
E_FILE = "E.f64"
QTOT_FILE = "Qtot.f64"
D_FILE = "D.f64"
META = "meta.json"

UNITS = {"energy": "kcal/mol", "length": "angstrom", "forces": "kcal/mol/angstrom", "charge": "e"}
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class RawFileSpec:
    """A headerless data file: its dtype, its row width and whether rows are atoms or molecules."""

    name: str
    dtype: np.dtype
    width: int  # values per row: 1 or 3
    per: str  # "atom" or "molecule"
    required: bool


RAW_FILES: tuple[RawFileSpec, ...] = (
    RawFileSpec(Z_FILE, np.dtype(np.int32), 1, "atom", True),
    RawFileSpec(R_FILE, np.dtype(np.float32), 3, "atom", True),
    RawFileSpec(F_FILE, np.dtype(np.float32), 3, "atom", False),
    RawFileSpec(E_FILE, np.dtype(np.float64), 1, "molecule", True),
    RawFileSpec(QTOT_FILE, np.dtype(np.float64), 1, "molecule", False),
    RawFileSpec(D_FILE, np.dtype(np.float64), 3, "molecule", False),
)
RAW_BY_NAME = {spec.name: spec for spec in RAW_FILES}


def expected_nbytes(spec: RawFileSpec, n_molecules: int, n_atoms_total: int) -> int:
    """Size in bytes that ``spec``'s file must have for the given counts."""
    rows = n_atoms_total if spec.per == "atom" else n_molecules
    return rows * spec.width * spec.dtype.itemsize


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedDataset:
    """Read-only views of a packed directory. Nothing is read into memory until indexed.

    Attributes:
        path: the directory.
        offsets: (N+1,) int64, atom offsets (memory-mapped).
        n_atoms: (N,) int32, atoms per molecule (memory-mapped).
        Z: (A,) int32 atomic numbers.
        R: (A, 3) float32 positions, Å.
        F: (A, 3) float32 forces, kcal/mol/Å, or None when the directory has none.
        E: (N,) float64 energies, kcal/mol.
        Qtot: (N,) float64 total charges, e, or None (neutral).
        meta: parsed ``meta.json``, or None for a directory made without one.
        D: (N, 3) float64 dipole moments, e·Å, about each molecule's centroid (the mean position
            of its atoms), or None when the directory has no ``D.f64``.
    """

    path: Path
    offsets: np.ndarray
    n_atoms: np.ndarray
    Z: np.ndarray
    R: np.ndarray
    F: np.ndarray | None
    E: np.ndarray
    Qtot: np.ndarray | None
    meta: dict[str, Any] | None
    D: np.ndarray | None = None

    @property
    def n_molecules(self) -> int:
        return int(self.n_atoms.shape[0])

    @property
    def n_atoms_total(self) -> int:
        return int(self.Z.shape[0])

    def molecule(self, i: int) -> dict[str, Any]:
        """Molecule ``i`` as in-memory arrays: Z (n,), R (n, 3), F (n, 3) or None, E, Qtot floats,
        D (3,) or None."""
        if not 0 <= i < self.n_molecules:
            raise IndexError(f"molecule {i} out of range for {self.n_molecules} molecules")
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return {
            "Z": np.array(self.Z[lo:hi]),
            "R": np.array(self.R[lo:hi]),
            "F": None if self.F is None else np.array(self.F[lo:hi]),
            "E": float(self.E[i]),
            "Qtot": 0.0 if self.Qtot is None else float(self.Qtot[i]),
            "D": None if self.D is None else np.array(self.D[i]),
        }


def load_npy_index(path: Path, name: str) -> np.ndarray:
    """Memory-map ``path/name`` (a ``.npy`` file), turning any read failure into a FormatError."""
    file = path / name
    if not file.is_file():
        raise FormatError(f"{file}: required file is missing")
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise FormatError(f"{file}: not a readable .npy file ({exc})") from None


def read_meta(path: Path) -> dict[str, Any] | None:
    """Parsed ``meta.json`` of ``path``, None if absent; FormatError if it is not valid JSON."""
    file = path / META
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text())
    except (ValueError, OSError) as exc:
        raise FormatError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise FormatError(f"{file}: top level must be a JSON object")
    return meta


def open_packed(path: str | os.PathLike[str]) -> PackedDataset:
    """Open a packed directory as read-only memmaps after cheap checks.

    Checked here (in O(1) time): required files present, ``offsets`` 1-D int64 of length N+1 with
    ``offsets[0] == 0``, ``n_atoms`` 1-D of length N, and every raw file exactly as large as the
    counts imply. Value checks (monotone offsets, finite numbers, Z range) are ``validate``'s job.

    Raises:
        FormatError: naming the file and what is wrong.
    """
    root = Path(path)
    if not root.is_dir():
        raise FormatError(f"{root}: not a directory")
    offsets = load_npy_index(root, OFFSETS)
    if offsets.ndim != 1 or offsets.dtype != np.int64:
        raise FormatError(f"{root / OFFSETS}: must be 1-D int64, found {offsets.ndim}-D {offsets.dtype}")
    if offsets.shape[0] < 1:
        raise FormatError(f"{root / OFFSETS}: empty; needs N+1 entries starting with 0")
    if int(offsets[0]) != 0:
        raise FormatError(f"{root / OFFSETS}: offsets[0] is {int(offsets[0])}, must be 0")
    n_molecules = offsets.shape[0] - 1
    n_atoms_total = int(offsets[-1])
    if n_atoms_total < 0:
        raise FormatError(f"{root / OFFSETS}: offsets[-1] is negative ({n_atoms_total})")
    n_atoms = load_npy_index(root, N_ATOMS)
    if n_atoms.ndim != 1 or n_atoms.shape[0] != n_molecules:
        raise FormatError(
            f"{root / N_ATOMS}: shape {n_atoms.shape} does not match {n_molecules} molecules in {OFFSETS}"
        )
    arrays: dict[str, np.ndarray | None] = {}
    for spec in RAW_FILES:
        file = root / spec.name
        if not file.is_file():
            if spec.required:
                raise FormatError(f"{file}: required file is missing")
            arrays[spec.name] = None
            continue
        expected = expected_nbytes(spec, n_molecules, n_atoms_total)
        actual = file.stat().st_size
        if actual != expected:
            rows = n_atoms_total if spec.per == "atom" else n_molecules
            raise FormatError(
                f"{file}: size mismatch: {actual} bytes, expected {expected} "
                f"({rows} {spec.per}s x {spec.width} x {spec.dtype.itemsize} bytes)"
            )
        shape = (expected // (spec.width * spec.dtype.itemsize),) + ((spec.width,) if spec.width > 1 else ())
        arrays[spec.name] = _memmap(file, spec.dtype, shape)
    return PackedDataset(
        path=root,
        offsets=offsets,
        n_atoms=n_atoms,
        Z=arrays[Z_FILE],
        R=arrays[R_FILE],
        F=arrays[F_FILE],
        E=arrays[E_FILE],
        Qtot=arrays[QTOT_FILE],
        meta=check_meta_header(root, read_meta(root)),
        D=arrays[D_FILE],
    )


def check_meta_header(root: Path, meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """``meta`` if it describes this format, version and units; FormatError otherwise.

    A directory without meta.json (the seed's) is taken as it is. One whose meta.json names another
    format, a version this code does not know, or other units is refused: its numbers would be
    read as kcal/mol and Å when they are not.
    """
    if meta is None:
        return None
    file = root / META
    if meta.get("format") != FORMAT_NAME:
        raise FormatError(f"{file}: format is {meta.get('format')!r}, not {FORMAT_NAME!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{file}: format_version {meta.get('format_version')!r} is not supported "
                          f"(this packedqdc reads version {FORMAT_VERSION})")
    if "units" in meta and meta["units"] != UNITS:
        raise FormatError(f"{file}: units {meta['units']!r} differ from packedqdc's {UNITS}; repack the data")
    return meta


def _memmap(file: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if shape[0] == 0:  # np.memmap cannot map an empty file
        return np.zeros(shape, dtype=dtype)
    return np.memmap(file, dtype=dtype, mode="r", shape=shape)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@dataclass
class MoleculeChunk:
    """A flat block of ``m`` molecules, as sources yield them and the writer takes them.

    Attributes:
        n_atoms: (m,) int32 atoms per molecule, each >= 1.
        Z: (sum n_atoms,) int32 atomic numbers.
        R: (sum n_atoms, 3) float32 positions, Å.
        E: (m,) float64 energies, kcal/mol.
        F: (sum n_atoms, 3) float32 forces, kcal/mol/Å, or None.
        Qtot: (m,) float64 total charges, e, or None.
        D: (m, 3) float64 dipole moments, e·Å, about each molecule's centroid, or None.
        index: (m,) int64 numbers of these molecules in the input (for messages), or None when
            they are simply the next ``m`` molecules of the input.
    """

    n_atoms: np.ndarray
    Z: np.ndarray
    R: np.ndarray
    E: np.ndarray
    F: np.ndarray | None = None
    Qtot: np.ndarray | None = None
    index: np.ndarray | None = None
    D: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.n_atoms.shape[0])


#: A writer's thread flushes its file to disk whenever this many bytes are unflushed (see below).
EARLY_SYNC_BYTES = 8 << 20
_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class _HashingWriter:
    """Appends bytes to a file and feeds them to sha256 in a background thread.

    hashlib releases the GIL on large buffers, so hashing overlaps with the next chunk's I/O. The
    same thread also ``fdatasync``s the file every ``EARLY_SYNC_BYTES`` bytes it has hashed (those
    bytes are already written): the disk writes go on while the pack does, and the final fsync in
    ``close`` only has the tail left to flush.
    """

    def __init__(self, file: Path) -> None:
        self.file = file
        self._fh = open(file, "wb", buffering=0)
        self._sha = hashlib.sha256()
        self._queue: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=4)
        self._thread = threading.Thread(target=self._hash_loop, daemon=True)
        self._thread.start()
        self.nbytes = 0

    def _hash_loop(self) -> None:
        unsynced, early_sync = 0, True
        while (buf := self._queue.get()) is not None:
            self._sha.update(buf)
            unsynced += buf.nbytes
            if early_sync and unsynced >= EARLY_SYNC_BYTES:
                try:
                    _fdatasync(self._fh.fileno())
                except OSError:  # only a head start: the fsync in close() reports real failures
                    early_sync = False
                unsynced = 0

    def write(self, array: np.ndarray) -> None:
        buf = memoryview(np.ascontiguousarray(array)).cast("B")
        self._fh.write(buf)
        self._queue.put(buf)
        self.nbytes += buf.nbytes

    def close(self) -> str:
        """Flush, fsync, close; return the hex sha256 of everything written."""
        self._queue.put(None)
        self._thread.join()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return self._sha.hexdigest()

    def discard(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._fh.close()


def sha256_file(file: Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in blocks of ``block`` bytes."""
    sha = hashlib.sha256()
    with open(file, "rb", buffering=0) as fh:
        buf = bytearray(block)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            sha.update(view[:n])
    return sha.hexdigest()


@dataclass
class PackStats:
    """Running totals a writer keeps while molecules stream through it."""

    n_molecules: int = 0
    n_atoms_total: int = 0
    max_atoms: int = 0
    element_counts: np.ndarray = field(default_factory=lambda: np.zeros(MAX_Z + 1, dtype=np.int64))
    n_charged: int = 0


class PackedWriter:
    """Streams molecules into a new packed directory and publishes it atomically.

    Everything is built in a hidden temporary sibling of ``target``; ``commit()`` writes the index
    files and ``meta.json``, fsyncs, and renames it into place. If anything fails, or the process
    is killed, the target is untouched (no half-written directory ever appears there). Memory is
    bounded by one chunk: molecule counts go to a scratch file, not a growing list.

    Use as a context manager::

        with PackedWriter(out, has_forces=True, has_qtot=True, provenance={...}) as w:
            for chunk in source:
                w.append(chunk)
            w.commit()

    Leaving the block without ``commit()`` (or with an exception) removes the temporary directory.
    """

    def __init__(
        self,
        target: str | os.PathLike[str],
        *,
        has_forces: bool,
        has_qtot: bool,
        provenance: dict[str, Any] | None = None,
        force: bool = False,
        inputs: Sequence[str | os.PathLike[str]] = (),
        has_dipoles: bool = False,
    ) -> None:
        self.target = Path(target).absolute()
        self.has_forces = has_forces
        self.has_qtot = has_qtot
        self.has_dipoles = has_dipoles
        self.provenance = dict(provenance or {})
        self.force = force
        self.inputs = tuple(Path(p) for p in inputs)
        self.stats = PackStats()
        self._check_target()
        parent = self.target.parent
        if not parent.is_dir():
            raise TargetExistsError(f"{parent}: parent directory of the output does not exist")
        #: stale temporary directories of earlier, killed packs to this target, removed here
        self.removed_leftovers = remove_stale_leftovers(self.target)
        self.tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(self.target), dir=parent))
        self._tmp_lock = _lock_directory(self.tmp)
        os.chmod(self.tmp, 0o777 & ~_current_umask())  # mkdtemp makes it 0700; publish like mkdir
        self._writers: dict[str, _HashingWriter] = {}
        self._counts = None
        self._done = False
        try:
            for name, wanted in ((Z_FILE, True), (R_FILE, True), (E_FILE, True),
                                 (F_FILE, has_forces), (QTOT_FILE, has_qtot), (D_FILE, has_dipoles)):
                if wanted:
                    self._writers[name] = _HashingWriter(self.tmp / name)
            self._counts = open(self.tmp / SCRATCH, "wb")
        except BaseException:
            self.abort()
            raise

    def _check_target(self) -> None:
        """Refuse a target that exists (without ``force``), or that ``force`` may not replace."""
        target = self.target
        for given in self.inputs:
            if _is_within(Path(given), target):
                raise TargetExistsError(f"{target}: the output directory holds the input {given}; "
                                        "choose another OUTPUT_DIR")
        if not (target.exists() or target.is_symlink()):
            return
        if not self.force:
            raise TargetExistsError(f"{target}: already exists; pass --force to replace it")
        if _is_within(Path.cwd(), target):
            raise TargetExistsError(f"{target}: --force will not replace the current working directory "
                                    "or a directory above it")
        reason = not_replaceable_reason(target)
        if reason is not None:
            raise TargetExistsError(f"{target}: --force only replaces a packed directory, and this {reason}; "
                                    "nothing was changed")

    def __enter__(self) -> PackedWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self._done:
            self.abort()

    def append(self, chunk: MoleculeChunk) -> None:
        """Append a chunk of molecules (values already checked and in packedqdc units)."""
        m = len(chunk)
        if m == 0:
            return
        n_atoms = np.asarray(chunk.n_atoms, dtype=np.int32)
        atoms = int(n_atoms.sum(dtype=np.int64))
        first = self.stats.n_molecules
        _check_chunk_shapes(chunk, m, atoms, first)
        if (chunk.F is None) == self.has_forces:
            raise SourceError(f"molecules {first}..{first + m - 1}: forces present in some chunks only")
        if chunk.Qtot is None and self.has_qtot:
            raise SourceError(f"molecules {first}..{first + m - 1}: total charge present in some chunks only")
        if (chunk.D is None) == self.has_dipoles:
            raise SourceError(f"molecules {first}..{first + m - 1}: dipoles present in some chunks only")
        self._writers[Z_FILE].write(np.asarray(chunk.Z, dtype=np.int32))
        self._writers[R_FILE].write(np.asarray(chunk.R, dtype=np.float32))
        self._writers[E_FILE].write(np.asarray(chunk.E, dtype=np.float64))
        if self.has_forces:
            self._writers[F_FILE].write(np.asarray(chunk.F, dtype=np.float32))
        if self.has_qtot:
            qtot = np.asarray(chunk.Qtot, dtype=np.float64)
            self._writers[QTOT_FILE].write(qtot)
            self.stats.n_charged += int(np.count_nonzero(qtot))
        if self.has_dipoles:
            self._writers[D_FILE].write(np.asarray(chunk.D, dtype=np.float64))
        self._counts.write(memoryview(n_atoms).cast("B"))
        self.stats.n_molecules += m
        self.stats.n_atoms_total += atoms
        self.stats.max_atoms = max(self.stats.max_atoms, int(n_atoms.max()))
        self.stats.element_counts += element_histogram(np.asarray(chunk.Z))[: MAX_Z + 1]

    def commit(self, extra_meta: dict[str, Any] | None = None) -> Path:
        """Finish the files, write ``meta.json`` last, and rename the directory into place."""
        # fsync releases the GIL: flushing the files side by side keeps the device queue full.
        with ThreadPoolExecutor(max_workers=len(self._writers)) as pool:
            closing = {name: pool.submit(w.close) for name, w in self._writers.items()}
            checksums = {name: future.result() for name, future in closing.items()}
        self._writers = {}
        self._counts.close()
        checksums.update(self._write_index_files())
        (self.tmp / SCRATCH).unlink()
        meta = self._meta(checksums, extra_meta or {})
        meta_file = self.tmp / META
        meta_file.write_text(json.dumps(meta, indent=2) + "\n")
        _fsync_path(meta_file)
        _fsync_path(self.tmp)
        self._publish()
        self._done = True
        return self.target

    def abort(self) -> None:
        """Drop everything written so far; the target is left as it was."""
        for w in self._writers.values():
            w.discard()
        self._writers = {}
        if self._counts is not None and not self._counts.closed:
            self._counts.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.close(self._tmp_lock)
        self._done = True

    def _write_index_files(self, block: int = 1 << 22) -> dict[str, str]:
        """Write ``n_atoms.npy`` and ``offsets.npy`` from the scratch counts, block by block."""
        n = self.stats.n_molecules
        counts = (
            np.memmap(self.tmp / SCRATCH, dtype=np.int32, mode="r", shape=(n,))
            if n
            else np.zeros(0, dtype=np.int32)
        )
        n_atoms = np.lib.format.open_memmap(self.tmp / N_ATOMS, mode="w+", dtype=np.int32, shape=(n,))
        offsets = np.lib.format.open_memmap(self.tmp / OFFSETS, mode="w+", dtype=np.int64, shape=(n + 1,))
        offsets[0] = 0
        running = np.int64(0)
        for lo in range(0, n, block):
            part = np.asarray(counts[lo : lo + block])
            n_atoms[lo : lo + part.shape[0]] = part
            cums = np.cumsum(part, dtype=np.int64) + running
            offsets[lo + 1 : lo + 1 + part.shape[0]] = cums
            running = cums[-1]
        n_atoms.flush()
        offsets.flush()
        del n_atoms, offsets, counts
        out = {}
        for name in (N_ATOMS, OFFSETS):
            _fsync_path(self.tmp / name)
            out[name] = sha256_file(self.tmp / name)
        return out

    def _meta(self, checksums: dict[str, str], extra: dict[str, Any]) -> dict[str, Any]:
        s = self.stats
        elements = {symbol(z): int(c) for z, c in enumerate(s.element_counts) if c and z > 0}
        meta: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "n_molecules": s.n_molecules,
            "n_atoms_total": s.n_atoms_total,
            "max_atoms": s.max_atoms,
            "units": dict(UNITS),
            "has_forces": self.has_forces,
            "has_qtot": self.has_qtot,
            "has_dipoles": self.has_dipoles,
            "n_charged_molecules": s.n_charged if self.has_qtot else 0,
            "element_counts": elements,
            "provenance": self.provenance,
            "sha256": dict(sorted(checksums.items())),
        }
        if not self.has_qtot:
            meta["qtot_note"] = "no Qtot.f64: every molecule is neutral"
        if not self.has_forces:
            meta["forces_note"] = "no F_pack.f32: the source has no forces"
        meta.update(extra)
        return meta

    def _publish(self) -> None:
        """Move the finished directory to ``target``; an old one (``force``) is swapped out.

        On Linux the swap is one atomic ``renameat2(RENAME_EXCHANGE)``: at every instant ``target``
        is either the complete old directory or the complete new one. Elsewhere, two renames.
        """
        if self.target.exists() or self.target.is_symlink():
            self._check_target()  # again: the target may have changed while we packed
            if _exchange(self.tmp, self.target):
                old = self.tmp  # the old directory now sits at our locked temporary path
            else:
                old = Path(tempfile.mkdtemp(prefix=_old_prefix(self.target), dir=self.target.parent))
                os.rmdir(old)
                os.rename(self.target, old)
                try:
                    os.rename(self.tmp, self.target)
                except OSError:
                    os.rename(old, self.target)
                    raise
            _fsync_path(self.target.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.target)
            _fsync_path(self.target.parent)
        os.close(self._tmp_lock)


#: The only entries of a packed directory: data and index files and meta.json.
PACKED_NAMES = frozenset(spec.name for spec in RAW_FILES) | {OFFSETS, N_ATOMS, META}
#: The writer's scratch file of molecule sizes (only ever inside its temporary directory).
SCRATCH = "n_atoms.scratch"


def not_replaceable_reason(target: Path) -> str | None:
    """Why ``--force`` may not replace ``target`` (a phrase), or None when it may.

    Only a directory that packedqdc (or the seed's snippet) wrote may be replaced: regular files
    with the format's names, ``offsets.npy`` among them, and a ``meta.json`` of this format if any.
    Anything else is the user's, and is never deleted.
    """
    if target.is_symlink():
        return "is a symbolic link"
    if not target.is_dir():
        return "is not a directory"
    entries = sorted(os.listdir(target))
    foreign = [name for name in entries if name not in PACKED_NAMES or not (target / name).is_file()
               or (target / name).is_symlink()]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        return f"one holds {foreign[0]!r}{more}, which packedqdc did not write"
    if OFFSETS not in entries:
        return f"one has no {OFFSETS}" if entries else "one is empty"
    if META in entries:
        try:
            meta = json.loads((target / META).read_text())
        except (OSError, ValueError):
            return f"one's {META} is not readable JSON"
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            return f"one's {META} is not packedqdc's"
    return None


def remove_stale_leftovers(target: Path) -> list[Path]:
    """Remove temporary directories that killed packs to ``target`` left beside it; return them.

    A leftover is removed only when all of these hold: its name is one the writer makes for this
    target, it is a real directory holding nothing but the writer's files, and no live process
    holds its lock (a running pack keeps an exclusive ``flock`` on its directory until it ends).
    """
    removed = []
    parent = target.parent
    if not parent.is_dir():
        return removed
    prefixes = (_tmp_prefix(target), _old_prefix(target))
    for entry in os.scandir(parent):
        if not entry.name.startswith(prefixes) or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        try:
            names = os.listdir(path)
            if any(name not in PACKED_NAMES | {SCRATCH} or not (path / name).is_file() for name in names):
                continue
            fd = _lock_directory(path, blocking=False)
        except OSError:
            continue  # held by a running pack, or not ours to read
        try:
            shutil.rmtree(path)
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _old_prefix(target: Path) -> str:
    return f".{target.name}.old-"


def _is_within(path: Path, directory: Path) -> bool:
    """True when ``path`` is ``directory`` or lies below it (both resolved through links)."""
    try:
        path, directory = path.resolve(), directory.resolve()
    except OSError:
        return False
    return path == directory or directory in path.parents


def _lock_directory(path: Path, blocking: bool = True) -> int:
    """An fd of ``path`` holding an exclusive ``flock`` (released when the fd is closed or the
    process dies); OSError when ``blocking`` is false and another process holds it."""
    fd = os.open(path, os.O_RDONLY)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError:
            os.close(fd)
            raise
    return fd


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step (Linux ``renameat2``); False if unsupported."""
    rename2 = getattr(_libc(), "renameat2", None)
    if rename2 is None:
        return False
    rename2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if rename2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # kernel or file system without the flag
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _check_chunk_shapes(chunk: MoleculeChunk, m: int, atoms: int, first: int) -> None:
    where = f"molecules {first}..{first + m - 1}"
    if np.shape(chunk.Z) != (atoms,):
        raise SourceError(f"{where}: Z has shape {np.shape(chunk.Z)}, expected ({atoms},)")
    if np.shape(chunk.R) != (atoms, 3):
        raise SourceError(f"{where}: R has shape {np.shape(chunk.R)}, expected ({atoms}, 3)")
    if np.shape(chunk.E) != (m,):
        raise SourceError(f"{where}: E has shape {np.shape(chunk.E)}, expected ({m},)")
    if chunk.F is not None and np.shape(chunk.F) != (atoms, 3):
        raise SourceError(f"{where}: F has shape {np.shape(chunk.F)}, expected ({atoms}, 3)")
    if chunk.Qtot is not None and np.shape(chunk.Qtot) != (m,):
        raise SourceError(f"{where}: Qtot has shape {np.shape(chunk.Qtot)}, expected ({m},)")
    if chunk.D is not None and np.shape(chunk.D) != (m, 3):
        raise SourceError(f"{where}: D has shape {np.shape(chunk.D)}, expected ({m}, 3)")


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
