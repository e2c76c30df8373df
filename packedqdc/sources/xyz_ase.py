"""Extended XYZ frames as ASE reads them (``ase.io.iread``, the reference), in blocks.

Also what the readers share: the entries read from each frame (:class:`XyzKeys`, chosen on the
first frame by :func:`resolve_keys`) and a block of frames in the file's units (:class:`FrameBlock`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SourceError
from .toolkit import require_extra

ENERGY_KEYS = ("energy", "REF_energy")
FORCES_KEYS = ("forces", "REF_forces")
CHARGE_KEYS = ("charge", "total_charge")
#: frames gathered per block by the ASE path
ASE_FRAMES = 4096

# entry states of a frame
OK, MISSING, NOT_A_NUMBER = 0, 1, 2


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
    """ASE's error on one line; the KeyError of a symbol not in the periodic table said as such."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        key = exc.args[0]
        if key.isalpha() and len(key) <= 3:
            return f"unknown element symbol {key!r}"
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


__all__ = [
    "ASE_FRAMES",
    "CHARGE_KEYS",
    "ENERGY_KEYS",
    "FORCES_KEYS",
    "FrameBlock",
    "XyzKeys",
    "ase_blocks",
    "resolve_keys",
]
