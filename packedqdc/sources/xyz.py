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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


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
from .xyz_ase import (
    CHARGE_KEYS,
    ENERGY_KEYS,
    FORCES_KEYS,
    MISSING,
    NOT_A_NUMBER,
    FrameBlock,
    XyzKeys,
    ase_blocks,
    resolve_keys,
)
from .xyz_fast import FastReaderFallback, fast_blocks

PARSERS = ("auto", "fast", "ase")


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
        except FastReaderFallback as fallback:
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
