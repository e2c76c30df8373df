"""Advice to the kernel about how the data files of a packed directory will be read (``madvise``).

Molecule order reads molecules at random places: every page fault would otherwise read ~128 KiB
around the faulting page (the kernel's read-around), hundreds of times the molecule's bytes when
the files are not in the page cache. ``MADV_RANDOM`` makes a fault read only its page. Block order
reads windows of contiguous blocks: ``MADV_WILLNEED`` on the next window starts its reads early,
as large sequential requests, while the current window is assembled.

Only the per-atom files (Z, R, F) and per-molecule files (E, Qtot) are advised; the index
(``offsets``, ``n_atoms``) is read whole. Advice is a hint: on a system without ``madvise`` (or a
map that cannot take it) nothing happens.

``release`` hands the pages a loader has mapped back (``MADV_DONTNEED`` on every map: they leave
the process's resident memory and stay in the page cache). Without it a pass over data larger than
memory keeps every page it touched mapped, and a kernel that caches files in large folios maps a
whole folio (up to 2 MiB) per touched molecule: 4.3 GiB resident after 200 random batches of a
100M-molecule directory here.
"""

from __future__ import annotations

import mmap

import numpy as np

from .format import PackedDataset

RANDOM = getattr(mmap, "MADV_RANDOM", None)
NORMAL = getattr(mmap, "MADV_NORMAL", None)
WILLNEED = getattr(mmap, "MADV_WILLNEED", None)
DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def _maps(ds: PackedDataset) -> tuple[list[tuple[np.ndarray, int]], list[tuple[np.ndarray, int]]]:
    """(per-atom arrays, per-molecule arrays) with their bytes per atom or molecule."""
    atoms = [(a, a.itemsize * (3 if a.ndim == 2 else 1)) for a in (ds.Z, ds.R, ds.F) if a is not None]
    mols = [(a, a.itemsize) for a in (ds.E, ds.Qtot) if a is not None]
    return atoms, mols


def _advise(array: np.ndarray, advice: int | None, start: int = 0, length: int | None = None) -> None:
    handle = getattr(array, "_mmap", None)
    if advice is None or handle is None or not hasattr(handle, "madvise"):
        return
    base = int(getattr(array, "offset", 0))
    size = len(handle)
    lo = base + start
    hi = size if length is None else min(size, lo + length)
    lo -= lo % mmap.PAGESIZE  # madvise takes page-aligned starts
    if hi <= lo:
        return
    try:
        handle.madvise(advice, lo, hi - lo)
    except (OSError, ValueError):  # a hint only
        pass


def advise_random(ds: PackedDataset, random: bool) -> None:
    """``MADV_RANDOM`` (``random``: a fault reads its page only) or ``MADV_NORMAL`` on the data maps."""
    atoms, mols = _maps(ds)
    for array, _ in atoms + mols:
        _advise(array, RANDOM if random else NORMAL)


def release(ds: PackedDataset) -> None:
    """``MADV_DONTNEED`` on every memory map of ``ds`` (data and index): its mapped pages leave this
    process's resident memory; the file contents stay in the page cache, and a later read maps them
    again. Safe while other threads read the maps (read-only shared file maps)."""
    for array in (ds.Z, ds.R, ds.F, ds.E, ds.Qtot, ds.D, ds.offsets, ds.n_atoms):
        if array is not None:
            _advise(array, DONTNEED)


def will_need(ds: PackedDataset, spans: np.ndarray) -> None:
    """Start reading ``spans`` ((k, 4) int64 rows: first atom, end atom, first molecule, end
    molecule) of every data file in the background (``MADV_WILLNEED``)."""
    atoms, mols = _maps(ds)
    for a0, a1, m0, m1 in np.asarray(spans, dtype=np.int64).tolist():
        for array, per in atoms:
            _advise(array, WILLNEED, a0 * per, (a1 - a0) * per)
        for array, per in mols:
            _advise(array, WILLNEED, m0 * per, (m1 - m0) * per)


def chunks(array: np.ndarray, rows: int):  # noqa: ANN201 - Iterator[np.ndarray]
    """In-memory copies of ``rows`` rows of a memory-mapped ``array`` at a time, each chunk's pages
    handed back after it is copied (``MADV_DONTNEED``: they leave this process's resident memory
    and stay in the page cache), so a pass over a file larger than memory keeps its resident
    memory at one chunk. A plain array is sliced (and copied) the same way."""
    per = array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
    for lo in range(0, array.shape[0], rows):
        part = np.array(array[lo : lo + rows])
        _advise(array, DONTNEED, lo * per, part.shape[0] * per)
        yield part
