"""The fast extended XYZ reader: the same values as ASE's, about 6x sooner (see ``xyz.py``).

The text is read 8 MB at a time and walked frame by frame; each comment line is parsed by a strict
regular expression; the atom lines of a run of frames that share a ``Properties`` string are parsed
in one call of NumPy's C ``loadtxt``. Anything beyond what it handles raises
:class:`FastReaderFallback` at that frame, after every earlier frame has been yielded, so that
ASE can read on from there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..elements import NUMBERS
from ..errors import SourceError
from .xyz_ase import MISSING, OK, FrameBlock, XyzKeys

#: text read per step
READ_BYTES = 8 << 20




class FastReaderFallback(Exception):
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
    """key -> raw value text of a comment line, or FastReaderFallback if it is not plain ``key=value``s."""
    text = comment.strip()
    if not _COMMENT.fullmatch(text):
        raise FastReaderFallback(frame, "comment line beyond plain key=value pairs")
    entries = {}
    for key, value in _PAIRS.findall(text):
        if key in entries:
            raise FastReaderFallback(frame, f"key {key} repeated")
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
        raise FastReaderFallback(frame, "entry that is not one number") from None


def _pbc(entries: dict[str, str], frame: int) -> tuple[bool, bool, bool]:
    if "pbc" in entries:
        flags = [_BOOLS.get(t) for t in entries["pbc"].split()]
        if len(flags) != 3 or None in flags:
            raise FastReaderFallback(frame, "pbc not three T/F values")
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
            raise FastReaderFallback(frame, "Properties not NAME:TYPE:COLS triples")
        names = fields[::3]
        if "Z" in names or names[:2] != ["species", "pos"] or len(set(names)) != len(names):
            raise FastReaderFallback(frame, "Properties other than species, pos, ...")
        # text columns are not used (species aside): one character each keeps loadtxt fast
        kinds = {"R": "f8", "I": "i8", "S": "U1", "L": "U1"}
        dtype: list[tuple[str, str]] = []
        has_forces = False
        for name, kind, cols_text in zip(names, fields[1::3], fields[2::3]):
            if kind not in kinds or not cols_text.isdigit() or int(cols_text) < 1:
                raise FastReaderFallback(frame, f"Properties column {name}:{kind}:{cols_text}")
            cols = int(cols_text)
            if name == "pos" and (kind, cols) != ("R", 3) or name == "species" and (kind, cols) != ("S", 1):
                raise FastReaderFallback(frame, f"Properties column {name}:{kind}:{cols}")
            if name == forces_key:
                if (kind, cols) != ("R", 3):
                    raise FastReaderFallback(frame, f"forces column {name}:{kind}:{cols}")
                has_forces = True
            # species: 3 characters, so a longer (non-element) token shows as 3 characters, not cut to 2
            dtype += [(f"{name}{c}", "U3" if name == "species" else kinds[kind]) for c in range(cols)]
        return _Columns(np.dtype(dtype), has_forces)


def _atomic_numbers(symbols: np.ndarray, frame: int) -> np.ndarray:
    """(A,) int64 from a 'U3' species column, capitalised as ASE does; unknown -> FastReaderFallback."""
    codes = np.ascontiguousarray(symbols).view(np.uint32).reshape(-1, 3).astype(np.int64)
    keys = codes[:, 0] | (codes[:, 1] << 21) | (codes[:, 2] << 42)  # code points are < 2**21
    uniques, inverse = np.unique(keys, return_inverse=True)
    table = np.empty(uniques.shape[0], dtype=np.int64)
    for i, key in enumerate(uniques.tolist()):
        text = "".join(chr((key >> shift) & 0x1FFFFF) for shift in (0, 21, 42)).rstrip("\x00")
        z = NUMBERS.get(text.capitalize())
        if z is None:
            raise FastReaderFallback(frame, f"species {text!r}")
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
                raise FastReaderFallback(self.first, f"atom lines: {exc}") from None
            if table.shape[0] != atoms:  # loadtxt skips blank lines; ASE does not
                raise FastReaderFallback(self.first, "blank atom line")
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
    """Frames of ``path`` by the fast path; raises FastReaderFallback(frame) where ASE must take over.

    Frames before ``frame`` have all been yielded when FastReaderFallback is raised.

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
                    raise FastReaderFallback(frame, "not UTF-8") from None
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
            raise FastReaderFallback(frame, "VEC cell lines")
        try:
            entries = _comment_entries(lines[i + 1], frame)
            properties = entries.get("Properties", _DEFAULT_PROPERTIES)
            energy = _number(entries.get(keys.energy), frame)
            charge = _number(entries.get(keys.charge), frame) if keys.charge is not None else (0.0, OK)
            pbc = _pbc(entries, frame)
            columns = None if run is not None and properties == run.properties else (
                _Columns.parse(properties, keys.forces, frame)
            )
        except FastReaderFallback:
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


__all__ = ["READ_BYTES", "FastReaderFallback", "fast_blocks"]
