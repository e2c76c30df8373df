"""An OpenQDC memmap cache on disk, read in bounded blocks (no openqdc code runs here).

The arrays are read straight from the cache's headerless ``.mmap`` files one bounded block at a
time; ``props.pkl`` is unpickled with the restricted unpickler (``sources/safe_pickle.py``).

Cache layout read here (``M`` atoms, ``N`` molecules, see ``docs/openqdc.md``):

=============================  =========  ===============  ======================================
file                           dtype      shape            content
=============================  =========  ===============  ======================================
``atomic_inputs.mmap``         float32    (M, 5)           Z, formal charge, x, y, z
``position_idx_range.mmap``    int32      (N, 2)           [start, end) atom rows of molecule i
``energies.mmap``              class      (N, n_methods)   total energies, NaN = missing label
``forces.mmap``                float32    (M, 3, n_force)  only for classes with force methods
``props.pkl``                  pickle                      ``subset`` as (uniques, inverse), ...
=============================  =========  ===============  ======================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ...errors import SourceError
from ..safe_pickle import load_restricted
from .classes import DatasetInfo

DEFAULT_CACHE = "~/.cache/openqdc"
MOLECULE_BLOCK = 1 << 16  # molecules whose index ranges are read at once
ATOM_BLOCK = 1 << 19  # atoms per chunk (10 MB of atomic_inputs, plus forces)


class CacheMissingError(SourceError):
    """The OpenQDC cache of a dataset is not on disk (nothing is downloaded)."""

    exit_code = 2


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """Cache root: ``cache_dir``, else ``$OPENQDC_CACHE_DIR``, else ``~/.cache/openqdc``."""
    raw = os.fspath(cache_dir) if cache_dir is not None else os.environ.get("OPENQDC_CACHE_DIR", DEFAULT_CACHE)
    return Path(os.path.normpath(os.path.expanduser(os.path.expandvars(raw))))


def required_files(info: DatasetInfo) -> list[str]:
    """Files the memmap cache of ``info`` must hold."""
    names = ["atomic_inputs.mmap", "position_idx_range.mmap", "energies.mmap", "props.pkl"]
    if info.n_force_columns:
        names.insert(3, "forces.mmap")
    return names


def find_cache(info: DatasetInfo, cache_root: Path) -> Path:
    """The preprocessed directory of ``info`` under ``cache_root``; creates nothing.

    Raises:
        CacheMissingError: a required file is missing; the message says where it looked and how
            to download the dataset.
    """
    path = cache_root / info.relative_dir
    missing = [name for name in required_files(info) if not (path / name).is_file()]
    if missing:
        what = "no OpenQDC cache" if len(missing) == len(required_files(info)) else f"missing {', '.join(missing)}"
        raise CacheMissingError(
            f"{path}: {what} for {info.class_name}; download it first with "
            f"`OPENQDC_CACHE_DIR={cache_root} openqdc download {info.class_name}` "
            f"(or `openqdc download {info.class_name} --cache-dir {cache_root}`), "
            "or point --cache-dir / OPENQDC_CACHE_DIR at an existing cache"
        )
    return path


def _read_rows(file: Path, dtype: np.dtype, row_shape: tuple[int, ...], lo: int, hi: int) -> np.ndarray:
    """Rows ``lo:hi`` of a headerless array file, copied out of a short-lived memmap.

    Mapping only the block (and unmapping it at once) keeps resident memory to one chunk.
    """
    if hi <= lo:
        return np.zeros((0, *row_shape), dtype=dtype)
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    block = np.memmap(file, dtype=dtype, mode="r", offset=lo * row_bytes, shape=(hi - lo, *row_shape))
    out = np.array(block)
    del block
    return out


def _load_subsets(file: Path, n_molecules: int) -> tuple[list[str], np.ndarray]:
    """Subset names and the (N,) int64 subset index of every molecule, from ``props.pkl``.

    openqdc stores ``np.unique(subsets, return_inverse=True)``; PCQM caches store a plain list.
    """
    props = load_restricted(file)
    try:
        raw = props["subset"]
    except (KeyError, TypeError, IndexError) as exc:
        raise SourceError(f"{file}: no 'subset' entry ({type(exc).__name__}: {exc})") from None
    if isinstance(raw, tuple) and len(raw) == 2:
        uniques, inverse = np.asarray(raw[0]), np.asarray(raw[1]).reshape(-1)
    else:
        uniques, inverse = np.unique(np.asarray(raw), return_inverse=True)
    if inverse.shape[0] != n_molecules:
        raise SourceError(f"{file}: key 'subset': {inverse.shape[0]} entries for {n_molecules} molecules")
    names = [u.decode() if isinstance(u, bytes) else str(u) for u in uniques.tolist()]
    return names, inverse.astype(np.int64)


@dataclass
class RawBlock:
    """Molecules ``lo:hi`` of the cache as stored (no units applied).

    Attributes:
        lo, hi: molecule range in the cache.
        n_atoms: (m,) int64 atoms per molecule.
        atomic: (A, 5) float32 atomic_inputs rows: Z, formal charge, x, y, z.
        energies: (m, n_methods) the cache's energies dtype.
        forces: (A, 3) float32 forces of the chosen force column, or None.
    """

    lo: int
    hi: int
    n_atoms: np.ndarray
    atomic: np.ndarray
    energies: np.ndarray
    forces: np.ndarray | None


class CacheReader:
    """Reads one OpenQDC memmap cache in bounded blocks.

    Attributes:
        path: the preprocessed directory.
        n_molecules: N.
        n_atoms_total: M.
        subset_names: names of the subsets.
        subset_index: (N,) int64 subset of every molecule.
    """

    def __init__(self, info: DatasetInfo, path: Path) -> None:
        self.info = info
        self.path = path
        self.n_atoms_total = self._rows("atomic_inputs.mmap", np.dtype(np.float32), 5)
        self.n_molecules = self._rows("position_idx_range.mmap", np.dtype(np.int32), 2)
        index = "position_idx_range.mmap"
        if self.n_molecules:  # the index's last range ends where the atoms end (a truncated file disagrees)
            end = int(_read_rows(path / index, np.dtype(np.int32), (2,), self.n_molecules - 1, self.n_molecules)[0, 1])
            if end != self.n_atoms_total:
                raise SourceError(f"{path / 'atomic_inputs.mmap'}: holds {self.n_atoms_total} atoms, but {index} "
                                  f"ends at atom {end}: one of them is truncated or oversized")
        n_methods = len(info.methods)
        energies = self._rows("energies.mmap", info.energies_dtype, n_methods)
        if energies != self.n_molecules:
            raise SourceError(
                f"{path / 'energies.mmap'}: holds {energies} molecules x {n_methods} methods of "
                f"{info.energies_dtype}, but {index} holds {self.n_molecules}: one of them is truncated or oversized"
            )
        if info.n_force_columns:
            forces = self._rows("forces.mmap", np.dtype(np.float32), 3 * info.n_force_columns)
            if forces != self.n_atoms_total:
                raise SourceError(
                    f"{path / 'forces.mmap'}: holds {forces} atoms x 3 x {info.n_force_columns} float32, but "
                    f"atomic_inputs.mmap holds {self.n_atoms_total}: one of them is truncated or oversized"
                )
        self.subset_names, self.subset_index = _load_subsets(path / "props.pkl", self.n_molecules)

    def _rows(self, name: str, dtype: np.dtype, width: int) -> int:
        file = self.path / name
        size, row = file.stat().st_size, dtype.itemsize * width
        if width == 0 or size % row:
            raise SourceError(f"{file}: {size} bytes is not a whole number of {width} x {dtype} rows")
        return size // row

    def blocks(self, force_column: int | None) -> Iterator[RawBlock]:
        """All molecules in order, as blocks of at most ``ATOM_BLOCK`` atoms (or one molecule).

        Raises:
            SourceError: the index ranges are not contiguous, ascending and within the atom count.
        """
        expected_start = 0
        for lo in range(0, self.n_molecules, MOLECULE_BLOCK):
            hi = min(lo + MOLECULE_BLOCK, self.n_molecules)
            ranges = _read_rows(self.path / "position_idx_range.mmap", np.dtype(np.int32), (2,), lo, hi)
            ranges = ranges.astype(np.int64)
            self._check_ranges(ranges, lo, expected_start)
            expected_start = int(ranges[-1, 1])
            ends = ranges[:, 1]
            i = 0
            while i < hi - lo:
                j = max(i + 1, int(np.searchsorted(ends, ranges[i, 0] + ATOM_BLOCK, side="right")))
                yield self._block(lo + i, lo + j, ranges[i:j], force_column)
                i = j

    def _check_ranges(self, ranges: np.ndarray, lo: int, expected_start: int) -> None:
        starts, ends = ranges[:, 0], ranges[:, 1]
        bad = np.flatnonzero(
            (starts != np.concatenate(([expected_start], ends[:-1]))) | (ends < starts) | (ends > self.n_atoms_total)
        )
        if bad.size:
            i = lo + int(bad[0])
            raise SourceError(
                f"{self.path / 'position_idx_range.mmap'}: molecule {i}: range {ranges[bad[0]].tolist()} "
                f"is not contiguous with the previous one or exceeds {self.n_atoms_total} atoms"
            )

    def _block(self, lo: int, hi: int, ranges: np.ndarray, force_column: int | None) -> RawBlock:
        a0, a1 = int(ranges[0, 0]), int(ranges[-1, 1])
        n_methods = len(self.info.methods)
        energies = _read_rows(self.path / "energies.mmap", self.info.energies_dtype, (n_methods,), lo, hi)
        atomic = _read_rows(self.path / "atomic_inputs.mmap", np.dtype(np.float32), (5,), a0, a1)
        forces = None
        if force_column is not None:
            shape = (3, self.info.n_force_columns)
            forces = _read_rows(self.path / "forces.mmap", np.dtype(np.float32), shape, a0, a1)[:, :, force_column]
        return RawBlock(lo, hi, ranges[:, 1] - ranges[:, 0], atomic, energies, forces)
