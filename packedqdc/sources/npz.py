"""NPZ files -> chunks of molecules, streamed with bounded memory.

Layouts (detected from the shapes, see ``docs/pack-and-validate.md``):

- ``padded`` (PhysNet/SN2): ``R (M, A, 3)``, ``Z (M, A)`` zero-padded, ``N (M,)`` (inferred as the
  count of ``Z > 0`` per row when absent), ``E (M,)`` or ``(M, 1)``, optional ``F (M, A, 3)``, ``Q (M,)``,
  ``D (M, 3)`` (dipole moments, e × the length unit).
- ``trajectory`` (sGDML/MD17/MD22, rMD17): ``z (A,)`` shared by every frame, ``R (M, A, 3)``, ``E``, ``F``.
- ``flat`` (DimeNet-style ragged): ``N (M,)``, ``Z (sum N,)``, ``R (sum N, 3)``, optional ``F (sum N, 3)``.

Members are never loaded whole. A member stored uncompressed (``np.savez``) is read by row range
straight from its byte range in the zip file; a compressed one (``np.savez_compressed``) is
decompressed sequentially, chunk by chunk. Unknown keys (``smiles``, ``info``, ...) are ignored.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..checks import SKIPPED_SHOWN
from ..errors import ConfigError, SourceError
from ..format import MoleculeChunk
from ..units import energy_factor, length_factor
from . import UnreadableSourceError
from ..dipoles import about_centroid
from .toolkit import scaled as _scaled

ROLES = ("R", "Z", "E", "F", "N", "Q", "D")
DEFAULT_KEYS: dict[str, tuple[str, ...]] = {
    "R": ("R", "coords", "positions"),
    "Z": ("Z", "z", "nuclear_charges", "atomic_numbers"),
    "E": ("E", "energies", "energy"),
    "F": ("F", "forces"),
    "N": ("N",),
    "Q": ("Q", "Qtot", "charge"),
    "D": ("D", "dipole", "dipoles"),
}
#: where the dipoles of an NPZ are taken: about the coordinate origin (as xTB/tblite report them)
#: or already about each molecule's centroid (the packed format's convention)
DIPOLE_ORIGINS = ("coordinates", "centroid")
REQUIRED_ROLES = ("R", "Z", "E")
#: what a damaged zip container raises while members are opened or inflated
DAMAGED_ZIP = (zipfile.BadZipFile, zlib.error, EOFError)
DEFAULT_CHUNK_SIZE = 65536


def parse_keys(spec: str | None) -> dict[str, str]:
    """Parse ``--keys R=coords,Z=atomic_numbers`` into ``{"R": "coords", "Z": "atomic_numbers"}``.

    Raises:
        ConfigError: on a malformed item or a role other than R, Z, E, F, N, Q, D.
    """
    if not spec:
        return {}
    out: dict[str, str] = {}
    for item in spec.split(","):
        role, sep, name = (part.strip() for part in item.partition("="))
        if not sep or not name:
            raise ConfigError(f"--keys: {item.strip()!r} is not ROLE=NAME (e.g. R=coords)")
        if role not in ROLES:
            raise ConfigError(f"--keys: unknown role {role!r}; roles are {', '.join(ROLES)}")
        out[role] = name
    return out


# --------------------------------------------------------------------------------------------
# One .npy member of the zip, read by row range
# --------------------------------------------------------------------------------------------


class _Member:
    """A ``.npy`` member of an NPZ, readable by row ranges along its first axis.

    Stored (``np.savez``) C-ordered members are mapped one row range at a time: ``rows`` returns a
    read-only view of the page cache, so the caller copies the real atoms straight out of it (no
    intermediate read buffer), and the mapping goes when the chunk's arrays do. A stored member
    that the file cannot hold in full (truncated) is read with seeks instead, so the rows before the
    damage still read and the first missing row raises a clear error. Compressed members are
    decompressed sequentially; going back re-opens the stream.
    """

    def __init__(self, source: str, zf: zipfile.ZipFile, raw: IO[bytes], info: zipfile.ZipInfo, key: str):
        self.key = key
        self._where = f"{source}: key {key!r}"
        self._zf, self._raw, self._info = zf, raw, info
        self._stream: IO[bytes] | None = None
        self._row = 0
        try:
            with zf.open(info) as fh:
                self.shape, self.fortran, self.dtype = _read_npy_header(fh, self._where)
                header_len = fh.tell()
        except DAMAGED_ZIP as exc:
            raise UnreadableSourceError(f"{self._where}: damaged zip member ({exc})") from None
        if self.dtype.hasobject:
            raise SourceError(f"{self._where}: object (pickled) arrays are not supported")
        self.stored = info.compress_type == zipfile.ZIP_STORED
        if self.fortran and not self.stored:
            raise SourceError(f"{self._where}: Fortran-ordered compressed arrays are not supported")
        self._data_offset = _local_data_offset(raw, info, self._where) + header_len if self.stored else 0
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        data_bytes = self.rows_total * self._row_bytes
        if self.stored and info.file_size != header_len + data_bytes:
            raise SourceError(
                f"{self._where}: the member holds {info.file_size - header_len} bytes of data but its "
                f"header's shape {self.shape} {self.dtype} needs {data_bytes}"
            )
        data_end = self._data_offset + data_bytes
        self._mapped = self.stored and not self.fortran and data_end <= os.fstat(raw.fileno()).st_size

    @property
    def rows_total(self) -> int:
        return int(self.shape[0]) if self.shape else 1

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi``, shape ``(hi - lo, *shape[1:])``: a read-only view of the mapped file for
        stored members (see the class), else a new in-memory array."""
        if not self.shape:
            return self.read_all()
        n = hi - lo
        if self._mapped and n:
            return np.asarray(np.memmap(self._raw, dtype=self.dtype, mode="r",
                                        offset=self._data_offset + lo * self._row_bytes, shape=(n, *self.shape[1:])))
        if self.fortran:
            full = np.memmap(self._raw, dtype=self.dtype, mode="r", offset=self._data_offset,
                             shape=self.shape, order="F")
            return np.array(full[lo:hi])
        out = np.empty((n,) + tuple(self.shape[1:]), dtype=self.dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
        if self.stored:
            self._raw.seek(self._data_offset + lo * self._row_bytes)
            _read_exact(self._raw, buf, self._where)
        else:
            self._seek_stream(lo)
            assert self._stream is not None
            _read_exact(self._stream, buf, self._where)
            self._row = hi
        return out

    def read_all(self) -> np.ndarray:
        """The whole member (only for small ones: shared ``z``, unit strings)."""
        with self._zf.open(self._info) as fh:
            try:
                return np.lib.format.read_array(fh, allow_pickle=False)
            except ValueError as exc:
                raise SourceError(f"{self._where}: unreadable ({exc})") from None

    def _seek_stream(self, row: int) -> None:
        if self._stream is None or row < self._row:
            self.close()
            self._stream = self._zf.open(self._info)
            _read_npy_header(self._stream, self._where)
            self._row = 0
        skip = (row - self._row) * self._row_bytes
        while skip:
            got = len(self._stream.read(min(skip, 1 << 24)))
            if not got:
                raise SourceError(f"{self._where}: member ends early")
            skip -= got
        self._row = row

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def _read_npy_header(fh: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the ``.npy`` stream ``fh``, leaving it at the data."""
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fh)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(fh)
    except ValueError as exc:
        raise UnreadableSourceError(f"{where}: not a readable .npy member ({exc})") from None
    raise UnreadableSourceError(f"{where}: unsupported .npy format version {version}")


def _local_data_offset(raw: IO[bytes], info: zipfile.ZipInfo, where: str) -> int:
    """Byte offset in the zip file where a stored member's data begins (after its local header)."""
    raw.seek(info.header_offset)
    header = raw.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise UnreadableSourceError(f"{where}: corrupt zip local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _read_exact(fh: IO[bytes], buf: memoryview, where: str) -> None:
    pos = 0
    while pos < len(buf):
        got = fh.readinto(buf[pos:])
        if not got:
            raise SourceError(f"{where}: member ends early (truncated file?)")
        pos += got


# --------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------


@dataclass
class _Raw:
    """One chunk as read, before checks: flat atoms, per-molecule values, source units.

    ``counts`` (m,) int64 are the atoms kept per molecule (declared N clipped to [0, A]);
    ``n_declared`` (m,) int64 the declared N; ``width`` the padded width A (None if not padded).
    """

    counts: np.ndarray
    n_declared: np.ndarray
    width: int | None
    Z: np.ndarray
    R: np.ndarray
    E: np.ndarray
    F: np.ndarray | None
    Q: np.ndarray | None
    D: np.ndarray | None = None


class NpzSource:
    """Molecules of an NPZ file, yielded as ``MoleculeChunk`` in kcal/mol, Å and kcal/mol/Å.

    Args:
        path: the ``.npz`` file.
        keys: role -> member name overrides (roles R, Z, E, F, N, Q, D), see :func:`parse_keys`.
        energy_unit: unit of E (and of F's numerator); None: the file's ``e_unit``, else kcal/mol.
        length_unit: unit of R (and of F's denominator); None: the file's ``r_unit``, else Å.
        skip_invalid: drop molecules with bad values instead of raising.
        chunk_size: molecules per chunk; memory is bounded by one chunk.
        dipole_origin: ``"coordinates"`` (default): the ``D`` values are about the coordinate origin,
            as xTB reports them, and are moved to each molecule's centroid (``D - Qtot * centroid``;
            no change for neutral molecules); ``"centroid"``: they are already about the centroid.

    Raises:
        UnreadableSourceError: the file is missing or not a readable NPZ.
        SourceError: a required key is missing, shapes disagree, or (in ``chunks()``) a value is bad.
        ConfigError: an unknown unit.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        keys: dict[str, str] | None = None,
        energy_unit: str | None = None,
        length_unit: str | None = None,
        skip_invalid: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        dipole_origin: str = "coordinates",
    ) -> None:
        if dipole_origin not in DIPOLE_ORIGINS:
            raise ConfigError(f"--dipole-origin must be one of {', '.join(DIPOLE_ORIGINS)}, got {dipole_origin!r}")
        self.dipole_origin = dipole_origin
        self.path = Path(path)
        self.name = str(path)
        if chunk_size < 1:
            raise ConfigError(f"--chunk-size must be at least 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.skip_invalid = skip_invalid
        self.skipped = 0
        self.skipped_first: list[str] = []
        self._open_zip()
        try:
            self._members = self._resolve(keys or {})
            self.layout = self._detect_layout()
            self.n_molecules = self._check_shapes()
            self._units = self._resolve_units(energy_unit, length_unit)
        except BaseException:
            self.close()
            raise
        self.has_forces = "F" in self._members
        self.has_qtot = True  # without Q, Qtot is written as zeros (provenance says so)
        self.has_dipoles = "D" in self._members

    # ---- opening ------------------------------------------------------------------------

    def _open_zip(self) -> None:
        if not self.path.is_file():
            what = ("is a directory, not an NPZ file" if self.path.is_dir()
                    else "is not a regular file" if self.path.exists() else "no such file")
            raise UnreadableSourceError(f"{self.name}: {what}")
        try:
            self._raw: IO[bytes] = open(self.path, "rb")
            self._zf = zipfile.ZipFile(self._raw)
        except (OSError, zipfile.BadZipFile) as exc:
            if hasattr(self, "_raw"):
                self._raw.close()
            raise UnreadableSourceError(f"{self.name}: not a readable NPZ file ({exc})") from None
        self._infos = {
            info.filename[:-4]: info for info in self._zf.infolist() if info.filename.endswith(".npy")
        }

    def _resolve(self, keys: dict[str, str]) -> dict[str, _Member]:
        members: dict[str, _Member] = {}
        for role in ROLES:
            if role in keys:
                if keys[role] not in self._infos:
                    raise SourceError(f"{self.name}: key {keys[role]!r} (given for {role}) is not in the file")
                name: str | None = keys[role]
            else:
                name = next((k for k in DEFAULT_KEYS[role] if k in self._infos), None)
            if name is not None:
                members[role] = _Member(self.name, self._zf, self._raw, self._infos[name], name)
        for role in REQUIRED_ROLES:
            if role not in members:
                tried = " or ".join(repr(k) for k in DEFAULT_KEYS[role])
                raise SourceError(
                    f"{self.name}: key {tried}: required key is missing (name it with --keys {role}=NAME)"
                )
        return members

    def _detect_layout(self) -> str:
        z, r = self._members["Z"], self._members["R"]
        if len(z.shape) == 2 and len(r.shape) == 3:
            return "padded"
        if len(z.shape) == 1 and len(r.shape) == 3:
            return "trajectory"
        if len(z.shape) == 1 and len(r.shape) == 2 and "N" in self._members:
            return "flat"
        raise SourceError(
            f"{self.name}: key {z.key!r}: cannot tell the layout from Z shape {z.shape} and "
            f"{r.key!r} shape {r.shape} (flat layouts need N)"
        )

    def _check_shapes(self) -> int:
        """Check every member's shape against the layout; return the number of molecules M."""
        m = self._members
        if self.layout == "flat":
            n_mol = m["N"].rows_total
            atoms = self._sum_n()
            self._expect("Z", (atoms,))
            self._expect("R", (atoms, 3))
            self._expect("F", (atoms, 3))
        else:
            n_mol, width = m["R"].shape[0], m["R"].shape[1]
            self._expect("R", (n_mol, width, 3))
            self._expect("Z", (n_mol, width) if self.layout == "padded" else (width,))
            self._expect("F", (n_mol, width, 3))
            self._expect("N", (n_mol,))
        self._expect("D", (n_mol, 3))
        for role in ("E", "Q"):
            if role in m and m[role].shape not in ((n_mol,), (n_mol, 1)):
                raise SourceError(
                    f"{self.name}: key {m[role].key!r}: shape {m[role].shape}, expected ({n_mol},) or ({n_mol}, 1)"
                )
        for role in ("Z", "N"):
            if role in m and m[role].dtype.kind not in "iu":
                raise SourceError(f"{self.name}: key {m[role].key!r}: dtype {m[role].dtype}, expected integers")
        for role in ("R", "E", "F", "Q", "D"):
            if role in m and m[role].dtype.kind not in "fiu":
                raise SourceError(f"{self.name}: key {m[role].key!r}: dtype {m[role].dtype}, expected numbers")
        return int(n_mol)

    def _expect(self, role: str, shape: tuple[int, ...]) -> None:
        member = self._members.get(role)
        if member is not None and tuple(member.shape) != shape:
            raise SourceError(f"{self.name}: key {member.key!r}: shape {member.shape}, expected {shape}")

    def _sum_n(self) -> int:
        """Total atoms of a flat layout: the sum of N, read in chunks (negative N count as 0)."""
        n = self._members["N"]
        total = 0
        for lo in range(0, n.rows_total, self.chunk_size):
            total += int(np.clip(n.rows(lo, min(lo + self.chunk_size, n.rows_total)), 0, None).sum())
        return total

    def _resolve_units(self, energy_unit: str | None, length_unit: str | None) -> dict[str, Any]:
        e_unit, e_from = self._unit(energy_unit, "e_unit", "kcal/mol")
        r_unit, r_from = self._unit(length_unit, "r_unit", "ang")
        try:
            e_factor, r_factor = energy_factor(e_unit), length_factor(r_unit)
        except ConfigError as exc:
            if "file" in (e_from, r_from):
                raise SourceError(f"{self.name}: unit metadata: {exc}") from None
            raise
        return {
            "energy": e_unit,
            "energy_from": e_from,
            "length": r_unit,
            "length_from": r_from,
            "energy_factor": e_factor,
            "length_factor": r_factor,
            "force_factor": e_factor / r_factor,
        }

    def _unit(self, given: str | None, key: str, default: str) -> tuple[str, str]:
        """(unit, where it came from: "option", "file" or "default")."""
        if given is not None:
            return given, "option"
        if key in self._infos:
            value = _Member(self.name, self._zf, self._raw, self._infos[key], key).read_all()
            return str(value.reshape(-1)[0]) if value.size else default, "file"
        return default, "default"

    # ---- reading ------------------------------------------------------------------------

    def chunks(self) -> Iterator[MoleculeChunk]:
        """Yield the valid molecules in order, ``chunk_size`` input molecules at a time.

        A worker thread reads, checks and converts the next chunk while the caller writes this one
        (file reads, copies and writes release the GIL), so at most two chunks are in memory.
        """
        try:
            yield from self._chunks()
        except DAMAGED_ZIP as exc:  # a compressed member failing its CRC or inflating badly
            raise UnreadableSourceError(f"{self.name}: damaged zip member ({exc})") from None

    def _chunks(self) -> Iterator[MoleculeChunk]:
        self._shared_z = self._members["Z"].read_all().astype(np.int64) if self.layout == "trajectory" else None
        self._atom_cursor = 0
        starts = list(range(0, self.n_molecules, self.chunk_size))
        if not starts:  # a file of zero molecules: nothing to yield (pack_source says so)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="npz-read") as pool:
            pending = pool.submit(self._chunk, starts[0])
            for lo in starts[1:] + [None]:
                chunk = pending.result()
                pending = None if lo is None else pool.submit(self._chunk, lo)
                if chunk is not None:
                    yield chunk

    def _chunk(self, lo: int) -> MoleculeChunk | None:
        """Input molecules ``lo:lo+chunk_size`` read, checked and converted; None if all were skipped."""
        hi = min(lo + self.chunk_size, self.n_molecules)
        if self.layout == "padded":
            raw = self._read_padded(lo, hi)
        elif self.layout == "trajectory":
            raw = self._read_trajectory(lo, hi, self._shared_z)
        else:
            raw = self._read_flat(lo, hi, self._atom_cursor)
            self._atom_cursor += int(raw.counts.sum())
        raw, index = self._checked(raw, lo)
        return self._converted(raw, index) if raw.counts.shape[0] else None

    def _get(self, role: str, lo: int, hi: int) -> np.ndarray | None:
        member = self._members.get(role)
        return None if member is None else member.rows(lo, hi)

    def _read_padded(self, lo: int, hi: int) -> _Raw:
        z = self._get("Z", lo, hi)
        width = z.shape[1]
        n = self._get("N", lo, hi)
        n_declared = (z > 0).sum(axis=1) if n is None else n.astype(np.int64)
        counts = np.clip(n_declared, 0, width)
        mask = (np.arange(width) < counts[:, None]).reshape(-1)
        return _Raw(
            counts=counts,
            n_declared=n_declared,
            width=width,
            Z=z.reshape(-1)[mask],
            R=_rows_masked(self._get("R", lo, hi), mask),
            E=self._get("E", lo, hi).reshape(-1),
            F=_rows_masked(self._get("F", lo, hi), mask),
            Q=_flat_or_none(self._get("Q", lo, hi)),
            D=self._get("D", lo, hi),
        )

    def _read_trajectory(self, lo: int, hi: int, z: np.ndarray) -> _Raw:
        m, width = hi - lo, z.shape[0]
        counts = np.full(m, width, dtype=np.int64)
        r, f = self._get("R", lo, hi), self._get("F", lo, hi)
        return _Raw(
            counts=counts,
            n_declared=counts,
            width=width,
            Z=np.tile(z, m),
            R=r.reshape(-1, 3),
            E=self._get("E", lo, hi).reshape(-1),
            F=None if f is None else f.reshape(-1, 3),
            Q=_flat_or_none(self._get("Q", lo, hi)),
            D=self._get("D", lo, hi),
        )

    def _read_flat(self, lo: int, hi: int, atom_lo: int) -> _Raw:
        n_declared = self._get("N", lo, hi).astype(np.int64)
        counts = np.clip(n_declared, 0, None)
        atom_hi = atom_lo + int(counts.sum())
        return _Raw(
            counts=counts,
            n_declared=n_declared,
            width=None,
            Z=self._get("Z", atom_lo, atom_hi),
            R=self._get("R", atom_lo, atom_hi),
            E=self._get("E", lo, hi).reshape(-1),
            F=self._get("F", atom_lo, atom_hi),
            Q=_flat_or_none(self._get("Q", lo, hi)),
            D=self._get("D", lo, hi),
        )

    def _checked(self, raw: _Raw, lo: int) -> tuple[_Raw, np.ndarray]:
        """Raise on the first molecule whose atoms cannot be laid out, or drop such molecules when
        skipping; returns the rest and their numbers in the file. (Values are judged after
        conversion, by ``packedqdc.checks.ValueScreen``.)"""
        index = np.arange(lo, lo + raw.counts.shape[0], dtype=np.int64)
        flags = _bad_layout(raw, self._members)
        if not flags:
            return raw, index
        bad = np.logical_or.reduce([mask for _, _, mask in flags])
        first = int(np.argmax(bad))
        key, reason = next((k, r) for k, r, mask in flags if mask[first])
        message = f"{self.name}: key {key!r}: molecule {lo + first}: {reason}"
        if not self.skip_invalid:
            raise SourceError(message)
        bad_idx = np.flatnonzero(bad)
        self.skipped += int(bad_idx.shape[0])
        if len(self.skipped_first) < SKIPPED_SHOWN:
            self.skipped_first.append(message)
        return _subset(raw, ~bad), index[~bad]

    def _converted(self, raw: _Raw, index: np.ndarray) -> MoleculeChunk:
        u = self._units
        qtot = np.zeros(raw.counts.shape[0]) if raw.Q is None else raw.Q.astype(np.float64, copy=False)
        dipoles = None
        if raw.D is not None:
            dipoles = _scaled(raw.D, u["length_factor"], np.float64)
            if self.dipole_origin == "coordinates":
                dipoles = about_centroid(dipoles, qtot, _scaled(raw.R, u["length_factor"], np.float64), raw.counts)
        return MoleculeChunk(
            index=index,
            n_atoms=raw.counts.astype(np.int32),
            Z=raw.Z,  # as stored: cast to int32 by the writer once the range is checked
            R=_scaled(raw.R, u["length_factor"], np.float32),
            E=_scaled(raw.E, u["energy_factor"], np.float64),
            F=None if raw.F is None else _scaled(raw.F, u["force_factor"], np.float32),
            Qtot=qtot,
            D=dipoles,
        )

    # ---- reporting ----------------------------------------------------------------------

    @property
    def field_names(self) -> dict[str, str]:
        """How messages name each chunk field: by the NPZ key it was read from."""
        roles = {"n_atoms": "N" if "N" in self._members else "Z", "Qtot": "Q"}
        names = {}
        for name in ("n_atoms", "Z", "R", "F", "E", "Qtot", "D"):
            member = self._members.get(roles.get(name, name))
            if member is not None:
                names[name] = f"key {member.key!r}"
        return names

    @property
    def input_paths(self) -> tuple[Path, ...]:
        return (self.path,)

    def provenance(self) -> dict[str, Any]:
        """Source kind, file, layout, keys and units used, what the file had, molecules skipped."""
        return {
            "source": "npz",
            "input": self.path.name,
            "input_bytes": self.path.stat().st_size,
            "layout": self.layout,
            "keys": {role: member.key for role, member in self._members.items()},
            "source_units": {"energy": self._units["energy"], "length": self._units["length"]},
            "units_from": {"energy": self._units["energy_from"], "length": self._units["length_from"]},
            "factors": {k: self._units[f"{k}_factor"] for k in ("energy", "length", "force")},
            "had_forces": self.has_forces,
            "had_charges": "Q" in self._members,
            "had_dipoles": self.has_dipoles,
            **({"dipole_origin": self.dipole_origin} if self.has_dipoles else {}),
            "skipped_invalid": self.skipped,
        }

    def close(self) -> None:
        """Close the zip file and any open member streams."""
        for member in getattr(self, "_members", {}).values():
            member.close()
        self._zf.close()
        self._raw.close()

    def __enter__(self) -> NpzSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Vectorised helpers
# --------------------------------------------------------------------------------------------


def _rows_masked(a: np.ndarray | None, mask: np.ndarray) -> np.ndarray | None:
    """Real atoms of a padded ``(m, A, 3)`` array as ``(sum N, 3)``, given the flat ``(m*A,)`` mask.

    Rows are viewed as opaque 3-value records so that numpy's fast 1-D boolean path does the copy
    (about 30x faster than boolean indexing over two axes).
    """
    if a is None:
        return None
    a = np.ascontiguousarray(a)
    records = a.reshape(-1).view(np.dtype((np.void, 3 * a.dtype.itemsize)))
    return records[mask].view(a.dtype).reshape(-1, 3)


def _flat_or_none(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else a.reshape(-1)


def _bad_layout(raw: _Raw, members: dict[str, _Member]) -> list[tuple[str, str, np.ndarray]]:
    """(key, reason, (m,) bool) for molecules whose declared atom count cannot be laid out."""
    flags: list[tuple[str, str, np.ndarray]] = []

    def add(role: str, reason: str, mask: np.ndarray) -> None:
        if mask.any():
            flags.append((members[role].key if role in members else role, reason, mask))

    n_role = "N" if "N" in members else "Z"
    add(n_role, "no atoms (N < 1)", raw.n_declared < 1)
    if raw.width is not None:
        add(n_role, f"N larger than the padded width {raw.width}", raw.n_declared > raw.width)
    return flags


def _subset(raw: _Raw, keep: np.ndarray) -> _Raw:
    """The molecules of ``raw`` where ``keep`` (m,) is true."""
    atoms = np.repeat(keep, raw.counts)
    return _Raw(
        counts=raw.counts[keep],
        n_declared=raw.n_declared[keep],
        width=raw.width,
        Z=raw.Z[atoms],
        R=raw.R[atoms],
        E=raw.E[keep],
        F=None if raw.F is None else raw.F[atoms],
        Q=None if raw.Q is None else raw.Q[keep],
        D=None if raw.D is None else raw.D[keep],
    )


__all__ = ["DEFAULT_CHUNK_SIZE", "NpzSource", "parse_keys"]
