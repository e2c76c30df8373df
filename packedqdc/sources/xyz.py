"""Extended XYZ files -> ``MoleculeChunk``s (``packedqdc pack xyz``; needs the ``ase`` extra).

ASE's extxyz reader (``ase.io.iread``) is the reference. It parses every frame in Python (about
8,000 QM9-sized frames/s, ~16 MB/s), so frames are read by a fast path by default: the text is
walked frame by frame, each comment line is parsed by a strict regular expression, and the atom
lines of a run of frames are parsed at once by NumPy's C ``loadtxt``. Every value it yields is the
value ASE yields (tests check equality). Whenever a frame uses syntax the fast path does not
handle (quotes other than ``"``, escapes, keys without values, ``VEC`` cell lines, a ``Z``
column, unknown symbols, ...), ASE reads the file from that frame on. ``parser="ase"`` reads with
ASE only.

Which entries are read (decided on the first frame of the first file, the same for all files):

- energy: ``--energy-key``, else ``energy`` (ASE's writer; ASE moves it to a
  ``SinglePointCalculator``) or ``REF_energy`` (MACE); a first frame with both is ambiguous;
- forces: ``--forces-key``, else the per-atom ``forces`` or ``REF_forces`` column; none on the
  first frame and no ``--forces-key``: the pack has no forces;
- total charge: ``--charge-key``, else ``charge`` or ``total_charge`` from the comment line;
  none on the first frame: every molecule is neutral (Qtot zeros, provenance says so).

A frame that is periodic (``pbc`` true in any direction, or a ``Lattice`` without ``pbc``; the
packed format has no cell), lacks one of the chosen entries, or holds a bad value is an error
naming the file, the frame (0-based, per file) and the field, or is skipped with ``skip_invalid``.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..elements import NUMBERS
from ..errors import ConfigError, SourceError
from ..format import MoleculeChunk
from ..units import energy_factor, length_factor
from .toolkit import (
    FileDigest,
    SkipLog,
    check_input_file,
    file_provenance,
    require_extra,
    screen,
    select,
    to_chunk,
    value_flags,
)

ENERGY_KEYS = ("energy", "REF_energy")
FORCES_KEYS = ("forces", "REF_forces")
CHARGE_KEYS = ("charge", "total_charge")
PARSERS = ("auto", "fast", "ase")
#: text read per step of the fast path
READ_BYTES = 8 << 20
#: frames gathered per block by the ASE path
ASE_FRAMES = 4096

# entry states of a frame
OK, MISSING, NOT_A_NUMBER = 0, 1, 2


def expand_inputs(files: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The input files in order: each argument as is, or its sorted glob matches if it has none.

    Raises:
        UnreadableSourceError: an argument names no file and matches none.
    """
    out: list[Path] = []
    for item in files:
        path = Path(item)
        if not path.exists() and glob.has_magic(str(item)):
            matches = sorted(glob.glob(str(item)))
            if not matches:
                check_input_file(path)  # raises: no such file
            out.extend(Path(m) for m in matches)
        else:
            out.append(path)
    if not out:
        raise ConfigError("pack xyz: give at least one FILE")
    for path in out:
        check_input_file(path)
    return out


@dataclass(frozen=True)
class XyzKeys:
    """The entries read from every frame (None: the pack has none of that kind)."""

    energy: str
    forces: str | None
    charge: str | None


@dataclass
class FrameBlock:
    """Frames ``first .. first + m - 1`` of one file in the file's units.

    Attributes:
        counts: (m,) int64 atoms per frame.
        Z: (A,) int64 atomic numbers.
        R: (A, 3) float64 positions.
        E: (m,) float64 energies (NaN where ``E_state`` is not OK).
        E_state, F_state, Q_state: (m,) int8 OK, MISSING or NOT_A_NUMBER.
        F: (A, 3) float64 forces (zeros where missing), or None when no forces are read.
        Q: (m,) float64 total charges (0 where missing), or None when no charges are read.
        pbc: (m, 3) bool periodic directions.
    """

    first: int
    counts: np.ndarray
    Z: np.ndarray
    R: np.ndarray
    E: np.ndarray
    E_state: np.ndarray
    F: np.ndarray | None
    F_state: np.ndarray
    Q: np.ndarray | None
    Q_state: np.ndarray
    pbc: np.ndarray


# --------------------------------------------------------------------------------------------
# The ASE path (reference, and fallback of the fast path)
# --------------------------------------------------------------------------------------------


def _ase_entry(atoms: Any, key: str, per_atom: bool) -> Any:
    """An entry of an ASE frame: calculator results first (ASE moves ``energy``/``forces`` there),
    then ``atoms.arrays`` (per-atom) or ``atoms.info`` (per-frame); None when absent."""
    calc = getattr(atoms, "calc", None)
    results = getattr(calc, "results", None) or {}
    if key in results:
        return results[key]
    return (atoms.arrays if per_atom else atoms.info).get(key)


def _scalar(value: Any) -> tuple[float, int]:
    """(value as float, state) of a per-frame entry: a real number is OK (bools are not)."""
    if value is None:
        return np.nan, MISSING
    arr = np.asarray(value)
    if arr.shape != () or arr.dtype.kind not in "iuf":
        return np.nan, NOT_A_NUMBER
    return float(arr), OK


class _BlockBuilder:
    """Frames appended one at a time (ASE path), handed out as a FrameBlock."""

    def __init__(self, keys: XyzKeys) -> None:
        self.keys = keys
        self.first = 0
        self._reset()

    def _reset(self) -> None:
        self.counts: list[int] = []
        self.Z: list[np.ndarray] = []
        self.R: list[np.ndarray] = []
        self.F: list[np.ndarray] = []
        self.E: list[float] = []
        self.Q: list[float] = []
        self.states: list[tuple[int, int, int]] = []
        self.pbc: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.counts)

    def add(self, atoms: Any) -> None:
        n = len(atoms)
        keys = self.keys
        energy, e_state = _scalar(_ase_entry(atoms, keys.energy, per_atom=False))
        f_state, forces = OK, np.zeros((n, 3))
        if keys.forces is not None:
            raw = _ase_entry(atoms, keys.forces, per_atom=True)
            if raw is None:
                f_state = MISSING
            elif np.shape(raw) != (n, 3) or np.asarray(raw).dtype.kind not in "iuf":
                f_state = NOT_A_NUMBER
            else:
                forces = np.asarray(raw, dtype=np.float64)
        charge, q_state = (0.0, OK) if keys.charge is None else _scalar(atoms.info.get(keys.charge))
        self.counts.append(n)
        self.Z.append(np.asarray(atoms.numbers, dtype=np.int64))
        self.R.append(np.asarray(atoms.positions, dtype=np.float64))
        self.F.append(forces)
        self.E.append(energy)
        self.Q.append(0.0 if q_state != OK else charge)
        self.states.append((e_state, f_state, q_state))
        self.pbc.append(np.asarray(atoms.pbc, dtype=bool))

    def take(self) -> FrameBlock:
        states = np.asarray(self.states, dtype=np.int8).reshape(-1, 3)
        m = len(self.counts)
        block = FrameBlock(
            first=self.first,
            counts=np.asarray(self.counts, dtype=np.int64),
            Z=np.concatenate(self.Z) if m else np.zeros(0, np.int64),
            R=np.concatenate(self.R) if m else np.zeros((0, 3)),
            E=np.asarray(self.E, dtype=np.float64),
            E_state=states[:, 0],
            F=(np.concatenate(self.F) if m else np.zeros((0, 3))) if self.keys.forces is not None else None,
            F_state=states[:, 1],
            Q=np.asarray(self.Q, dtype=np.float64) if self.keys.charge is not None else None,
            Q_state=states[:, 2],
            pbc=np.asarray(self.pbc, dtype=bool).reshape(-1, 3),
        )
        self.first += m
        self._reset()
        return block


def ase_blocks(path: Path, keys: XyzKeys, start: int = 0) -> Iterator[FrameBlock]:
    """Frames ``start ..`` of ``path`` read by ``ase.io.iread``, ``ASE_FRAMES`` per block."""
    ase_io = require_extra("ase.io", "ase", "pack xyz")
    builder = _BlockBuilder(keys)
    builder.first = start
    frames = ase_io.iread(str(path), index=slice(start, None), format="extxyz")
    while True:
        try:
            atoms = next(frames)
        except StopIteration:
            break
        except Exception as exc:  # ASE raises XYZError, ValueError, KeyError, ... on bad text
            frame = builder.first + len(builder)
            raise SourceError(f"{path}: frame {frame}: not readable as extended XYZ ({_one_line(exc)})") from None
        builder.add(atoms)
        if len(builder) >= ASE_FRAMES:
            yield builder.take()
    if len(builder):
        yield builder.take()


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def resolve_keys(path: Path, energy: str | None, forces: str | None, charge: str | None) -> XyzKeys:
    """The entries to read, from the first frame of ``path`` (see the module docstring).

    ``forces`` or ``charge`` given as ``"none"`` read none.

    Raises:
        SourceError: the first frame is unreadable, has no energy entry, or has two candidates.
    """
    ase_io = require_extra("ase.io", "ase", "pack xyz")
    try:
        atoms = next(ase_io.iread(str(path), index=slice(0, 1), format="extxyz"))
    except StopIteration:
        raise SourceError(f"{path}: no frames") from None
    except Exception as exc:
        raise SourceError(f"{path}: frame 0: not readable as extended XYZ ({_one_line(exc)})") from None

    def pick(given: str | None, defaults: tuple[str, ...], per_atom: bool, what: str, option: str) -> str | None:
        if given is not None:
            return None if given.lower() == "none" else given
        found = [k for k in defaults if _ase_entry(atoms, k, per_atom) is not None]
        if len(found) > 1:
            raise SourceError(
                f"{path}: frame 0: both {found[0]!r} and {found[1]!r} hold {what}; choose one with {option}"
            )
        return found[0] if found else None

    energy_key = pick(energy, ENERGY_KEYS, False, "energies", "--energy-key")
    if energy_key is None:
        have = sorted(set(atoms.info) | set(getattr(atoms.calc, "results", {}) or {}))
        raise SourceError(
            f"{path}: frame 0: energy: no {' or '.join(map(repr, ENERGY_KEYS))} entry "
            f"(the frame has {', '.join(have) or 'no per-frame entries'}); name it with --energy-key"
        )
    return XyzKeys(
        energy=energy_key,
        forces=pick(forces, FORCES_KEYS, True, "forces", "--forces-key"),
        charge=pick(charge, CHARGE_KEYS, False, "total charges", "--charge-key"),
    )


# --------------------------------------------------------------------------------------------
# The fast path
# --------------------------------------------------------------------------------------------


class _Fallback(Exception):
    """The fast path meets syntax it does not handle; ASE reads on from frame ``frame``."""

    def __init__(self, frame: int, why: str) -> None:
        super().__init__(why)
        self.frame = frame


_PAIR = r'([A-Za-z_][A-Za-z0-9_\-]*)=("[^"\\]*"|[^\s"\'{}\[\]=\\]+)'
_COMMENT = re.compile(rf"(?:{_PAIR}(?:\s+|$))*")
_PAIRS = re.compile(_PAIR)
_BOOLS = {"T": True, "F": False, "True": True, "False": False, "true": True, "false": False,
          "TRUE": True, "FALSE": False}
_DEFAULT_PROPERTIES = "species:S:1:pos:R:3"


def _comment_entries(comment: str, frame: int) -> dict[str, str]:
    """key -> raw value text of a comment line, or _Fallback if it is not plain ``key=value``s."""
    text = comment.strip()
    if not _COMMENT.fullmatch(text):
        raise _Fallback(frame, "comment line beyond plain key=value pairs")
    entries = {}
    for key, value in _PAIRS.findall(text):
        if key in entries:
            raise _Fallback(frame, f"key {key} repeated")
        entries[key] = value[1:-1] if value.startswith('"') else value
    return entries


def _number(text: str | None, frame: int) -> tuple[float, int]:
    """A per-frame number as ASE parses it (int, else float; a bare value only)."""
    if text is None:
        return np.nan, MISSING
    try:
        return float(int(text)), OK
    except ValueError:
        pass
    try:
        return float(text), OK  # "1,2", "1 2" and words fail here: ASE reads them as arrays or text
    except ValueError:
        raise _Fallback(frame, "entry that is not one number") from None


def _pbc(entries: dict[str, str], frame: int) -> tuple[bool, bool, bool]:
    if "pbc" in entries:
        flags = [_BOOLS.get(t) for t in entries["pbc"].split()]
        if len(flags) != 3 or None in flags:
            raise _Fallback(frame, "pbc not three T/F values")
        return tuple(flags)  # type: ignore[return-value]
    return (True, True, True) if "Lattice" in entries else (False, False, False)


@dataclass(frozen=True)
class _Columns:
    """Column layout of a ``Properties`` string: the loadtxt dtype and where our columns are."""

    dtype: np.dtype
    forces: bool  # whether the forces key is a column here

    @staticmethod
    def parse(properties: str, forces_key: str | None, frame: int) -> _Columns:
        fields = properties.split(":")
        if len(fields) % 3:
            raise _Fallback(frame, "Properties not NAME:TYPE:COLS triples")
        names = fields[::3]
        if "Z" in names or names[:2] != ["species", "pos"] or len(set(names)) != len(names):
            raise _Fallback(frame, "Properties other than species, pos, ...")
        # text columns are not used (species aside): one character each keeps loadtxt fast
        kinds = {"R": "f8", "I": "i8", "S": "U1", "L": "U1"}
        dtype: list[tuple[str, str]] = []
        has_forces = False
        for name, kind, cols_text in zip(names, fields[1::3], fields[2::3]):
            if kind not in kinds or not cols_text.isdigit() or int(cols_text) < 1:
                raise _Fallback(frame, f"Properties column {name}:{kind}:{cols_text}")
            cols = int(cols_text)
            if name == "pos" and (kind, cols) != ("R", 3) or name == "species" and (kind, cols) != ("S", 1):
                raise _Fallback(frame, f"Properties column {name}:{kind}:{cols}")
            if name == forces_key:
                if (kind, cols) != ("R", 3):
                    raise _Fallback(frame, f"forces column {name}:{kind}:{cols}")
                has_forces = True
            # species: 3 characters, so a longer (non-element) token shows as 3 characters, not cut to 2
            dtype += [(f"{name}{c}", "U3" if name == "species" else kinds[kind]) for c in range(cols)]
        return _Columns(np.dtype(dtype), has_forces)


def _atomic_numbers(symbols: np.ndarray, frame: int) -> np.ndarray:
    """(A,) int64 from a 'U3' species column, capitalised as ASE does; unknown -> _Fallback."""
    codes = np.ascontiguousarray(symbols).view(np.uint32).reshape(-1, 3).astype(np.int64)
    keys = codes[:, 0] | (codes[:, 1] << 21) | (codes[:, 2] << 42)  # code points are < 2**21
    uniques, inverse = np.unique(keys, return_inverse=True)
    table = np.empty(uniques.shape[0], dtype=np.int64)
    for i, key in enumerate(uniques.tolist()):
        text = "".join(chr((key >> shift) & 0x1FFFFF) for shift in (0, 21, 42)).rstrip("\x00")
        z = NUMBERS.get(text.capitalize())
        if z is None:
            raise _Fallback(frame, f"species {text!r}")
        table[i] = z
    return table[inverse.reshape(-1)]


class _Run:
    """Consecutive frames of one text block that share a ``Properties`` string."""

    def __init__(self, first: int, properties: str, columns: _Columns) -> None:
        self.first = first
        self.properties = properties
        self.columns = columns
        self.lines: list[str] = []
        self.counts: list[int] = []
        self.E: list[tuple[float, int]] = []
        self.Q: list[tuple[float, int]] = []
        self.pbc: list[tuple[bool, bool, bool]] = []

    def block(self, keys: XyzKeys) -> FrameBlock:
        m, atoms = len(self.counts), sum(self.counts)
        if atoms:
            try:
                table = np.loadtxt(self.lines, dtype=self.columns.dtype, comments=None, ndmin=1)
            except (ValueError, TypeError, IndexError) as exc:  # ASE reads on and reports the frame
                raise _Fallback(self.first, f"atom lines: {exc}") from None
            if table.shape[0] != atoms:  # loadtxt skips blank lines; ASE does not
                raise _Fallback(self.first, "blank atom line")
            Z = _atomic_numbers(table["species0"], self.first)
            R = np.column_stack([table[f"pos{c}"] for c in range(3)])
        else:
            Z, R = np.zeros(0, np.int64), np.zeros((0, 3))
        F = None
        f_state = np.full(m, OK, dtype=np.int8)
        if keys.forces is not None:
            if self.columns.forces and atoms:
                F = np.column_stack([table[f"{keys.forces}{c}"] for c in range(3)])
            else:
                F = np.zeros((atoms, 3))
                f_state[:] = MISSING if not self.columns.forces else OK
        E = np.asarray([e for e, _ in self.E], dtype=np.float64)
        Q = np.asarray([q if s == OK else 0.0 for q, s in self.Q], dtype=np.float64)
        return FrameBlock(
            first=self.first,
            counts=np.asarray(self.counts, dtype=np.int64),
            Z=Z,
            R=R,
            E=E,
            E_state=np.asarray([s for _, s in self.E], dtype=np.int8),
            F=F,
            F_state=f_state,
            Q=Q if keys.charge is not None else None,
            Q_state=np.asarray([s for _, s in self.Q], dtype=np.int8),
            pbc=np.asarray(self.pbc, dtype=bool).reshape(-1, 3),
        )


def fast_blocks(path: Path, keys: XyzKeys) -> Iterator[FrameBlock]:
    """Frames of ``path`` by the fast path; raises _Fallback(frame) where ASE must take over.

    Frames before ``frame`` have all been yielded when _Fallback is raised.

    Raises:
        SourceError: a header line that is not an atom count, or a file that ends inside a frame
            (ASE refuses both as well).
    """
    frame = 0
    buffer, eof = "", False
    with open(path, encoding="utf-8", errors="strict", newline=None) as fh:
        while True:
            if not eof:
                try:
                    text = fh.read(READ_BYTES)
                except UnicodeDecodeError:
                    raise _Fallback(frame, "not UTF-8") from None
                eof = text == ""
                buffer += text
            lines = buffer.split("\n")
            partial = "" if eof else lines.pop()  # an unfinished line, completed by the next read
            if eof and lines and lines[-1] == "":
                lines.pop()
            i, runs, done = _walk(lines, frame, keys, eof, path)
            for run in runs:
                yield run.block(keys)
            frame += sum(len(r.counts) for r in runs)
            if done:
                return
            # the rest: an unfinished frame, or (after an early stop) a frame ASE must read
            buffer = "\n".join(lines[i:] + [partial])


def _walk(lines: list[str], frame: int, keys: XyzKeys, eof: bool, path: Path) -> tuple[int, list[_Run], bool]:
    """Group the complete frames of ``lines`` into runs.

    Returns (lines consumed, runs, whether the frames have ended: a blank header line or EOF).
    """
    runs: list[_Run] = []
    run: _Run | None = None
    i, n_lines = 0, len(lines)
    while i < n_lines:
        header = lines[i]
        if header.strip() == "":
            return i, runs, True  # ASE stops at a blank header line
        try:
            n = int(header)
        except ValueError:
            raise SourceError(f"{path}: frame {frame}: header line {header.strip()[:40]!r} is not an atom count") from None
        end = i + 2 + n
        if end > n_lines or (end == n_lines and not eof):
            if eof:
                raise SourceError(
                    f"{path}: frame {frame}: the file ends inside the frame ({max(n_lines - i - 2, 0)} of {n} "
                    "atom lines; truncated?)"
                )
            break  # the next read completes the frame (the line after it tells about VEC lines)
        if end < n_lines and lines[end].lstrip().startswith("VEC"):
            if runs or run is not None:
                break  # yield what we have; the next call meets the VEC frame first
            raise _Fallback(frame, "VEC cell lines")
        try:
            entries = _comment_entries(lines[i + 1], frame)
            properties = entries.get("Properties", _DEFAULT_PROPERTIES)
            energy = _number(entries.get(keys.energy), frame)
            charge = _number(entries.get(keys.charge), frame) if keys.charge is not None else (0.0, OK)
            pbc = _pbc(entries, frame)
            columns = None if run is not None and properties == run.properties else (
                _Columns.parse(properties, keys.forces, frame)
            )
        except _Fallback:
            if runs:
                break  # yield the frames before this one first; the next call falls back here
            raise
        if columns is not None:
            run = _Run(frame, properties, columns)
            runs.append(run)
        assert run is not None
        run.lines.extend(lines[i + 2 : end])
        run.counts.append(n)
        run.E.append(energy)
        run.Q.append(charge)
        run.pbc.append(pbc)
        frame += 1
        i = end
    return i, runs, eof and i >= n_lines


# --------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------


class XyzSource:
    """Extended XYZ files as a :class:`packedqdc.sources.MoleculeSource`.

    Args:
        files: paths or glob patterns, read in order.
        energy_key, forces_key, charge_key: entries to read (None: the defaults, see the module
            docstring; ``"none"`` for forces or charge: read none).
        energy_unit: unit of the energies (and of the forces' numerator); default eV (ASE's).
        length_unit: unit of positions (and of the forces' denominator); default Å.
        skip_invalid: drop periodic frames, frames missing an entry and frames with bad values
            instead of stopping at the first.
        parser: ``auto`` (fast path, ASE where it cannot), ``fast`` (fast path only: refuse what it
            cannot read) or ``ase`` (ASE only).

    Attributes:
        n_molecules: frames read so far (the total once ``chunks()`` is exhausted; the input is
            not scanned twice).
        has_forces, has_qtot: from the first frame's entries.
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike[str]],
        *,
        energy_key: str | None = None,
        forces_key: str | None = None,
        charge_key: str | None = None,
        energy_unit: str = "eV",
        length_unit: str = "Ang",
        skip_invalid: bool = False,
        parser: str = "auto",
    ) -> None:
        if parser not in PARSERS:
            raise ConfigError(f"unknown parser {parser!r}; use one of {', '.join(PARSERS)}")
        require_extra("ase.io", "ase", "pack xyz")
        self.files = expand_inputs(files)
        self.energy_unit, self.length_unit = energy_unit, length_unit
        self.factors = {
            "energy_factor": energy_factor(energy_unit),
            "length_factor": length_factor(length_unit),
        }
        self.factors["force_factor"] = self.factors["energy_factor"] / self.factors["length_factor"]
        self.keys = resolve_keys(self.files[0], energy_key, forces_key, charge_key)
        self.skip_invalid = skip_invalid
        self.parser = parser
        self.name = str(self.files[0]) if len(self.files) == 1 else f"{self.files[0]} (+{len(self.files) - 1} files)"
        self.input_paths = tuple(self.files)
        self.has_forces = self.keys.forces is not None
        self.has_qtot = True  # zeros (neutral) when no charge entry is read; provenance says so
        self.n_molecules: int | None = None
        self.skips = SkipLog()
        self.skipped_first = self.skips.first
        self._per_file: list[dict[str, Any]] = []

    def chunks(self) -> Iterator[MoleculeChunk]:
        """Valid frames of every file in order, one chunk per block of frames."""
        total = 0
        for path in self.files:
            digest = FileDigest(path)
            frames = 0
            for block in self._blocks(path):
                chunk = self._convert(path, block, total + block.first)
                frames = block.first + block.counts.shape[0]
                if chunk is not None:
                    yield chunk
            self._per_file.append({**file_provenance(path, digest), "frames": frames, "parser": self._used})
            total += frames
            self.n_molecules = total
        self.n_molecules = total

    def _blocks(self, path: Path) -> Iterator[FrameBlock]:
        if self.parser == "ase":
            self._used = "ase"
            yield from ase_blocks(path, self.keys)
            return
        self._used = "fast"
        try:
            yield from fast_blocks(path, self.keys)
        except _Fallback as fallback:
            if self.parser == "fast":
                raise SourceError(
                    f"{path}: frame {fallback.frame}: the fast extended XYZ reader cannot read it ({fallback}); "
                    "use --parser auto or ase"
                ) from None
            self._used = f"fast, then ase from frame {fallback.frame} ({fallback})"
            yield from ase_blocks(path, self.keys, start=fallback.frame)

    def _convert(self, path: Path, block: FrameBlock, first: int) -> MoleculeChunk | None:
        """The block's frames in packedqdc units, screened; ``first``: input number of frame 0."""
        keys, m = self.keys, block.counts.shape[0]
        chunk = to_chunk(block.counts, block.Z, block.R, block.E, block.F, block.Q, first=first, **self.factors)
        flags = []
        periodic = block.pbc.any(axis=1)
        if periodic.any():
            flags.append(("pbc", "periodic frame (the packed format has no cell; molecules only)", periodic))
        for key, states, what in ((keys.energy, block.E_state, "energy"), (keys.forces, block.F_state, "forces"),
                                  (keys.charge, block.Q_state, "total charge")):
            if key is None:
                continue
            for state, reason in ((MISSING, f"missing (no {what} entry)"), (NOT_A_NUMBER, "not a real number")):
                mask = states == state
                if mask.any():
                    flags.append((key, reason, mask))
        flags += value_flags(chunk)
        keep = screen(flags, m, lambda i: f"{path}: frame {block.first + i}", names=self._names,
                      skip=self.skip_invalid, log=self.skips)
        if keep is None:
            return chunk
        return select(chunk, keep) if keep.any() else None

    @property
    def _names(self) -> dict[str, str]:
        """Chunk field -> its name in an extended XYZ frame."""
        k = self.keys
        return {"n_atoms": "species", "Z": "species", "R": "pos", "E": k.energy, "F": k.forces or "F",
                "Qtot": k.charge or "charge"}

    @property
    def field_names(self) -> dict[str, str]:
        """How ``pack_source``'s value screen names each chunk field."""
        return {role: f"key {name!r}" for role, name in self._names.items()}

    def provenance(self) -> dict[str, Any]:
        """Files (path, size, sha256, frames, parser used), keys and units chosen, frames skipped."""
        return {
            "source": "xyz",
            "input": str(self.files[0]) if len(self.files) == 1 else f"{len(self.files)} files",
            "files": self._per_file,
            "keys": {"energy": self.keys.energy, "forces": self.keys.forces, "charge": self.keys.charge},
            "source_units": {"energy": self.energy_unit, "length": self.length_unit},
            "factors": {k.removesuffix("_factor"): v for k, v in self.factors.items()},
            "had_forces": self.has_forces,
            "had_charges": self.keys.charge is not None,
            "n_source_frames": self.n_molecules,
            "skipped_invalid": self.skips.total,
            "skipped_by_reason": dict(self.skips.counts),
        }


__all__ = ["CHARGE_KEYS", "ENERGY_KEYS", "FORCES_KEYS", "PARSERS", "XyzKeys", "XyzSource", "expand_inputs"]
