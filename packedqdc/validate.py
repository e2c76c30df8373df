"""Check a packed directory and list every problem (up to a cap), each naming file and first molecule.

Unlike ``open_packed``, which raises on the first inconsistency, ``validate_packed`` reads with
low-level calls and keeps going, so that a truncated ``R_pack.f32`` and a NaN in ``E.f64`` are both
reported. Value checks stream each file in blocks (bounded memory) and are vectorised per block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checks import CLOSE_ATOMS, FAR_COORDINATE, MAX_COORDINATE, MIN_ATOM_DISTANCE
from .elements import MAX_Z, element_histogram, symbol
from .errors import FormatError
from .finite import all_finite
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    META,
    PACKED_NAMES,
    SHA256_HEX,
    UNITS,
    N_ATOMS,
    OFFSETS,
    QTOT_FILE,
    R_FILE,
    D_FILE,
    F_FILE,
    RAW_FILES,
    Z_FILE,
    RawFileSpec,
    expected_nbytes,
    read_meta,
    sha256_file,
)

#: rows read per block by the value checks (atoms or molecules): 24 MB for R
BLOCK_ROWS = 1 << 21


@dataclass(frozen=True)
class Problem:
    """One thing wrong: the file, the first offending molecule (None if not about one), what."""

    file: str
    molecule: int | None
    message: str

    def __str__(self) -> str:
        where = "" if self.molecule is None else f"molecule {self.molecule}: "
        return f"{self.file}: {where}{self.message}"


@dataclass
class ValidationReport:
    """Result of :func:`validate_packed`.

    Attributes:
        path: the directory checked.
        problems: at most ``max_problems`` problems, in the order found.
        notes: what could not be checked and why (missing optional files, no meta.json, ...).
        counts: ``n_molecules`` and ``n_atoms_total`` as the index files say (when readable).
        readable: false when the directory or its offsets cannot be read at all.
        problems_not_shown: problems found beyond the cap.
    """

    path: Path
    max_problems: int = 20
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    readable: bool = True
    problems_not_shown: int = 0

    @property
    def ok(self) -> bool:
        """True when readable and without problems."""
        return self.readable and not self.problems

    @property
    def exit_code(self) -> int:
        """0 clean, 1 problems, 2 unreadable."""
        return 2 if not self.readable else 1 if self.problems else 0

    def add(self, file: str, message: str, molecule: int | None = None) -> None:
        """Record a problem, or count it when the cap is reached."""
        if len(self.problems) < self.max_problems:
            self.problems.append(Problem(file, molecule, message))
        else:
            self.problems_not_shown += 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for ``validate --json``)."""
        return {
            "path": str(self.path),
            "ok": self.ok,
            "readable": self.readable,
            "exit_code": self.exit_code,
            "counts": dict(self.counts),
            "problems": [
                {"file": p.file, "molecule": p.molecule, "message": p.message, "text": str(p)} for p in self.problems
            ],
            "problems_not_shown": self.problems_not_shown,
            "notes": list(self.notes),
        }


def validate_packed(path: str | os.PathLike[str], checksums: bool = False, max_problems: int = 20) -> ValidationReport:
    """Check every file of a packed directory against the format (see ``docs/format.md``).

    Checks: sizes against offsets and N; offsets 1-D int64, starting at 0, non-decreasing, no
    empty molecule; n_atoms == diff(offsets); Z in 1..118; R, F, E, Qtot finite; Qtot integral;
    coordinates within ``checks.MAX_COORDINATE`` Å and no two atoms of a molecule at the same
    place (``checks.MIN_ATOM_DISTANCE``); meta.json consistent with the files; with ``checksums``, the sha256 sums. Never raises on a
    corrupt directory: everything goes into the report.
    """
    root = Path(path)
    report = ValidationReport(path=root, max_problems=max_problems)
    if not root.is_dir():
        report.readable = False
        report.add(str(root), "not a directory")
        return report
    offsets = _offsets(root, report)
    if offsets is None:
        report.readable = False
        return report
    n_mol, n_atoms_total = offsets.shape[0] - 1, int(offsets[-1])
    report.counts = {"n_molecules": n_mol, "n_atoms_total": n_atoms_total}
    _check_n_atoms(root, offsets, report)
    present = {spec.name: _check_size(root, spec, offsets, report) for spec in RAW_FILES}
    elements = _check_values(root, offsets, present, report)
    _check_meta(root, present, elements, checksums, report)
    return report


# --------------------------------------------------------------------------------------------
# Index files
# --------------------------------------------------------------------------------------------


def _load_npy(root: Path, name: str, report: ValidationReport) -> np.ndarray | None:
    file = root / name
    if not _present(file, name, report):
        report.add(name, "required file is missing")
        return None
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except OSError as exc:
        _unreadable(name, exc, report)
        return None
    except (ValueError, EOFError) as exc:
        report.add(name, f"not a readable .npy file ({exc})")
        return None


def _present(file: Path, name: str, report: ValidationReport) -> bool:
    """True for a regular file; a directory (or device, ...) in its place makes the report unreadable."""
    if file.is_file():
        return True
    if file.exists() or file.is_symlink():
        report.readable = False
        report.add(name, "not a regular file (a directory, a dangling link or a device?)")
    return False


def _unreadable(name: str, exc: OSError, report: ValidationReport) -> None:
    report.readable = False
    report.add(name, f"unreadable ({exc.strerror or exc})")


def _offsets(root: Path, report: ValidationReport) -> np.ndarray | None:
    """offsets.npy, after its own checks; None when nothing further can be checked."""
    offsets = _load_npy(root, OFFSETS, report)
    if offsets is None:
        return None
    if offsets.ndim != 1 or offsets.shape[0] < 1 or offsets.dtype.kind not in "iu":
        report.add(OFFSETS, f"must be 1-D int64 with N+1 >= 1 entries, found shape {offsets.shape} {offsets.dtype}")
        return None
    if offsets.dtype != np.int64:
        report.add(OFFSETS, f"dtype {offsets.dtype}, expected int64")
    if int(offsets[0]) != 0:
        report.add(OFFSETS, f"offsets[0] is {int(offsets[0])}, must be 0")
    if int(offsets[-1]) < 0:
        report.add(OFFSETS, f"offsets[-1] is negative ({int(offsets[-1])})")
        return None
    decreasing = _first_where(offsets, lambda d: d < 0)
    if decreasing is not None:
        report.add(OFFSETS, "offsets decrease (offsets[i+1] < offsets[i])", decreasing)
    empty = _first_where(offsets, lambda d: d == 0)
    if empty is not None:
        report.add(OFFSETS, "empty molecule (offsets[i+1] == offsets[i])", empty)
    return offsets


def _first_where(offsets: np.ndarray, test: Any) -> int | None:
    """First molecule i where ``test(offsets[i+1] - offsets[i])`` holds, streamed in blocks."""
    n = offsets.shape[0] - 1
    for lo in range(0, n, BLOCK_ROWS):
        diff = np.diff(np.asarray(offsets[lo : min(lo + BLOCK_ROWS, n) + 1], dtype=np.int64))
        hits = np.flatnonzero(test(diff))
        if hits.shape[0]:
            return lo + int(hits[0])
    return None


def _check_n_atoms(root: Path, offsets: np.ndarray, report: ValidationReport) -> None:
    n_atoms = _load_npy(root, N_ATOMS, report)
    if n_atoms is None:
        return
    n_mol = offsets.shape[0] - 1
    if n_atoms.shape != (n_mol,):
        report.add(N_ATOMS, f"shape {n_atoms.shape}, expected ({n_mol},) from {OFFSETS}")
        return
    if n_atoms.dtype != np.int32:
        report.add(N_ATOMS, f"dtype {n_atoms.dtype}, expected int32")
    for lo in range(0, n_mol, BLOCK_ROWS):
        hi = min(lo + BLOCK_ROWS, n_mol)
        diff = np.diff(np.asarray(offsets[lo : hi + 1], dtype=np.int64))
        counts = np.asarray(n_atoms[lo:hi], dtype=np.int64)
        bad = np.flatnonzero(counts != diff)
        if bad.shape[0]:
            i = int(bad[0])
            report.add(N_ATOMS, f"n_atoms is {counts[i]} but offsets give {diff[i]}", lo + i)
            return


# --------------------------------------------------------------------------------------------
# Raw files: sizes, then values
# --------------------------------------------------------------------------------------------


def _rows_expected(spec: RawFileSpec, offsets: np.ndarray) -> int:
    return int(offsets[-1]) if spec.per == "atom" else offsets.shape[0] - 1


def _molecule_of_row(spec: RawFileSpec, offsets: np.ndarray, row: int) -> int:
    """Molecule owning ``row`` of a file (atom rows map through offsets)."""
    if spec.per == "molecule":
        return row
    return int(np.searchsorted(offsets, row, side="right")) - 1


def _check_size(root: Path, spec: RawFileSpec, offsets: np.ndarray, report: ValidationReport) -> int | None:
    """Rows of ``spec``'s file that can be value-checked (complete and expected); None if absent."""
    file = root / spec.name
    if not _present(file, spec.name, report):
        if spec.required and report.readable:
            report.add(spec.name, "required file is missing")
        return None
    rows = _rows_expected(spec, offsets)
    expected = expected_nbytes(spec, offsets.shape[0] - 1, int(offsets[-1]))
    actual = file.stat().st_size
    row_bytes = spec.width * spec.dtype.itemsize
    if actual < expected:
        complete = actual // row_bytes
        report.add(
            spec.name,
            f"truncated: {actual} bytes, expected {expected}; data ends inside this molecule",
            _first_incomplete(spec, offsets, complete),
        )
        return complete
    if actual > expected:
        report.add(spec.name, f"oversized: {actual} bytes, expected {expected} ({actual - expected} bytes too many)")
    return rows


def _first_incomplete(spec: RawFileSpec, offsets: np.ndarray, complete_rows: int) -> int:
    if spec.per == "molecule":
        return complete_rows
    return int(np.searchsorted(offsets[1:], complete_rows, side="right"))


def _blocks(file: Path, spec: RawFileSpec, rows: int, offsets: np.ndarray | None = None) -> Any:
    """(first row, block) pairs covering rows ``0:rows`` of a raw file, about ``BLOCK_ROWS`` at a
    time; with ``offsets`` (sound, of an atom file) every block holds whole molecules."""
    row_bytes = spec.width * spec.dtype.itemsize
    lo = 0
    while lo < rows:
        hi = min(lo + BLOCK_ROWS, rows)
        if offsets is not None and hi < rows:  # back to the last molecule boundary, one molecule at least
            k = int(np.searchsorted(offsets, hi, side="right")) - 1
            hi = int(offsets[k]) if offsets[k] > lo else int(offsets[k + 1])
        block = np.fromfile(file, dtype=spec.dtype, count=(hi - lo) * spec.width, offset=lo * row_bytes)
        yield lo, block.reshape(hi - lo, spec.width) if spec.width > 1 else block
        lo = hi


@dataclass
class _Finding:
    """First bad row of one check, its value and how many rows failed it."""

    message: str
    first_row: int | None = None
    first_value: Any = None
    count: int = 0
    per_molecule: bool = False  # rows are molecules, whatever the file

    def update(self, lo: int, bad: np.ndarray, values: np.ndarray) -> None:
        hits = np.flatnonzero(bad)
        if not hits.shape[0]:
            return
        if self.first_row is None:
            self.first_row, self.first_value = lo + int(hits[0]), values[hits[0]]
        self.count += int(hits.shape[0])


def _check_values(
    root: Path, offsets: np.ndarray, present: dict[str, int | None], report: ValidationReport
) -> np.ndarray | None:
    """Value checks on every present raw file; returns Z's element counts (None if Z incomplete)."""
    elements = None
    for spec in RAW_FILES:
        rows = present[spec.name]
        if rows is None:
            continue
        # R of sound offsets is read in whole molecules, so that one pass also finds duplicated atoms
        whole = spec.name == R_FILE and rows == int(offsets[-1]) and not any(p.file == OFFSETS for p in report.problems)
        try:
            findings, counts = _scan(root / spec.name, spec, rows, offsets if whole else None)
        except OSError as exc:
            _unreadable(spec.name, exc, report)
            continue
        for finding in findings:
            if finding.count:
                per_molecule = finding.per_molecule or spec.per == "molecule"
                report.add(
                    spec.name,
                    finding.message.format(value=finding.first_value)
                    + f" ({finding.count} {'molecules' if per_molecule else 'atoms'} affected)",
                    finding.first_row if per_molecule else _molecule_of_row(spec, offsets, finding.first_row),
                )
        if spec.name == Z_FILE and rows == _rows_expected(spec, offsets):
            elements = counts
    return elements


def _scan(
    file: Path, spec: RawFileSpec, rows: int, offsets: np.ndarray | None = None
) -> tuple[list[_Finding], np.ndarray]:
    """Stream a raw file: per-check findings, and the element histogram when it is Z. With
    ``offsets`` (R, sound offsets) also the molecules with two atoms at the same place
    (``checks.MIN_ATOM_DISTANCE``), the blocks then holding whole molecules."""
    histogram = np.zeros(MAX_Z + 2, dtype=np.int64)
    if spec.name == Z_FILE:
        findings = [_Finding(f"atomic number {{value}} outside 1..{MAX_Z}")]
    else:
        findings = [_Finding("non-finite value")]
        if spec.name == QTOT_FILE:
            findings.append(_Finding("fractional total charge {value}"))
        if spec.name == R_FILE:
            findings.append(_Finding(FAR_COORDINATE))
    if offsets is not None:
        from .distances import closest_pair_distances  # numba: imported only when validating

        findings.append(_Finding(CLOSE_ATOMS, per_molecule=True))
    for lo, block in _blocks(file, spec, rows, offsets):
        if spec.name == Z_FILE:
            histogram += element_histogram(block)
            if block.min(initial=1) < 1 or block.max(initial=1) > MAX_Z:
                findings[0].update(lo, (block < 1) | (block > MAX_Z), block)
            continue
        if spec.name == R_FILE and (block.max() > MAX_COORDINATE or block.min() < -MAX_COORDINATE):
            far = np.isfinite(block).all(axis=1) & (np.abs(block) > MAX_COORDINATE).any(axis=1)  # NaN, inf: above
            findings[1].update(lo, far, block)
        if offsets is not None:
            m_lo, m_hi = np.searchsorted(offsets, [lo, lo + block.shape[0]])
            close = closest_pair_distances(offsets[m_lo : m_hi + 1] - lo, block) < MIN_ATOM_DISTANCE
            findings[2].update(int(m_lo), close, close)
        if spec.name != QTOT_FILE and all_finite(block):
            continue
        finite = np.isfinite(block) if spec.width == 1 else np.isfinite(block).all(axis=1)
        if not finite.all():
            findings[0].update(lo, ~finite, block)
        if spec.name == QTOT_FILE:
            findings[1].update(lo, finite & (block != np.round(block)), block)
    return findings, histogram


# --------------------------------------------------------------------------------------------
# meta.json
# --------------------------------------------------------------------------------------------


def _check_meta(
    root: Path,
    present: dict[str, int | None],
    elements: np.ndarray | None,
    checksums: bool,
    report: ValidationReport,
) -> None:
    absent_means = {F_FILE: "no forces", QTOT_FILE: "all molecules neutral"}  # most data has no dipoles: no note
    for spec in RAW_FILES:
        if present[spec.name] is None and spec.name in absent_means:
            report.notes.append(f"no {spec.name}: {absent_means[spec.name]}; nothing to check")
    try:
        meta = read_meta(root)
    except FormatError as exc:
        report.add(META, str(exc).split(": ", 1)[-1])
        return
    if meta is None:
        report.notes.append(f"no {META}: counts, units, element counts and checksums not checked")
        return
    _check_meta_fields(meta, present, report)
    if elements is not None:
        _check_elements(meta, elements, report)
    sums = meta.get("sha256")
    if sums is None:
        report.notes.append(f"{META} has no sha256 sums: checksums not checked")
    elif _well_formed_sums(sums, report):  # malformed entries are problems of their own
        if checksums:
            _check_checksums(root, sums, report)
        else:
            report.notes.append("checksums not verified (use --checksums)")


def _check_meta_fields(meta: dict[str, Any], present: dict[str, int | None], report: ValidationReport) -> None:
    if meta.get("format") != FORMAT_NAME:
        report.add(META, f"format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        report.add(META, f"format_version is {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    if meta.get("units") != UNITS:
        report.add(META, f"units are {meta.get('units')!r}; packedqdc stores {UNITS} (a directory in other "
                         "units would be read as if in these: repack it)")
    for key, actual in report.counts.items():
        if meta.get(key) != actual:
            report.add(META, f"{key} is {meta.get(key)!r} but the files hold {actual}")
    for key, name in (("has_forces", F_FILE), ("has_qtot", QTOT_FILE), ("has_dipoles", D_FILE)):
        if key in meta and bool(meta[key]) != (present[name] is not None):
            report.add(META, f"{key} is {meta[key]!r} but {name} is {'present' if present[name] is not None else 'absent'}")


def _check_elements(meta: dict[str, Any], histogram: np.ndarray, report: ValidationReport) -> None:
    actual = {symbol(z): int(c) for z, c in enumerate(histogram[1 : MAX_Z + 1], start=1) if c}
    recorded = meta.get("element_counts")
    if isinstance(recorded, dict) and recorded != actual:
        diff = sorted(k for k in set(recorded) | set(actual) if recorded.get(k) != actual.get(k))
        report.add(META, f"element_counts disagree with {Z_FILE} for {', '.join(diff[:5])}")


def _well_formed_sums(sums: Any, report: ValidationReport) -> bool:
    """sha256 must map names of the format's files to 64 hex digits; each deviation is a problem."""
    if not isinstance(sums, dict):
        report.add(META, f"sha256 must be an object of file name -> hex digest, found {type(sums).__name__}")
        return False
    ok = True
    for name, digest in sorted(sums.items()):
        if name not in PACKED_NAMES or name == META:
            report.add(META, f"sha256 lists {name!r}, which is not a file of the format")
            ok = False
        elif not (isinstance(digest, str) and SHA256_HEX.fullmatch(digest)):
            report.add(META, f"sha256 of {name} is {str(digest)[:20]!r}, not 64 hex digits")
            ok = False
    return ok


def _check_checksums(root: Path, sums: dict[str, Any], report: ValidationReport) -> None:
    for name, digest in sorted(sums.items()):
        file = root / name
        if not file.is_file():
            report.add(META, f"lists a sha256 for {name}, which is missing")
            continue
        actual = sha256_file(file)
        if actual != digest:
            report.add(name, f"sha256 mismatch: {META} has {str(digest)[:12]}..., file has {actual[:12]}...")


__all__ = ["Problem", "ValidationReport", "validate_packed"]
