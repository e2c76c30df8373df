"""Source -> packed directory, streaming, with an optional progress callback (no UI here)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .checks import SKIPPED_SHOWN, ValueScreen
from .errors import SourceError
from .format import PackedWriter
from .sources import MoleculeSource
from .sources.npz import DEFAULT_CHUNK_SIZE, NpzSource

#: called after each chunk with (molecules written so far, molecules in the input); a last call
#: reports (total, total) once the input is exhausted, so skipped molecules still end at 100 %
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class PackResult:
    """What a pack produced.

    Attributes:
        path: the published directory.
        n_molecules: molecules written.
        n_atoms_total: atoms written.
        skipped: molecules dropped as invalid (only with ``skip_invalid``).
        skipped_first: one-line reasons of the first few chunks' first skipped molecule.
        seconds: wall time of the pack.
        removed_leftovers: temporary directories of earlier killed packs to the same output,
            removed before this one started.
    """

    path: Path
    n_molecules: int
    n_atoms_total: int
    skipped: int = 0
    skipped_first: list[str] = field(default_factory=list)
    seconds: float = 0.0
    removed_leftovers: list[Path] = field(default_factory=list)


def pack_source(
    source: MoleculeSource,
    output: str | os.PathLike[str],
    *,
    skip_invalid: bool = False,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> PackResult:
    """Stream every chunk of ``source`` into a new packed directory at ``output``, atomically.

    Every chunk passes :class:`packedqdc.checks.ValueScreen` (values as they will be stored) before
    it is written: the first invalid molecule raises, or with ``skip_invalid`` invalid molecules
    are dropped and counted. On any error the temporary directory is removed and ``output`` is
    left as it was. ``force`` replaces an existing packed directory, and nothing else (see
    ``PackedWriter``).

    Raises:
        TargetExistsError: ``output`` exists and ``force`` is false, or it may not be replaced.
        SourceError: from the source or the screen, or when no valid molecule remains.
    """
    start = time.perf_counter()
    label = str(getattr(source, "name", "input"))
    screen = ValueScreen(label, getattr(source, "field_names", {}), skip_invalid=skip_invalid)
    with PackedWriter(output, has_forces=source.has_forces, has_qtot=source.has_qtot, force=force,
                      inputs=getattr(source, "input_paths", ())) as writer:
        for chunk in source.chunks():
            writer.append(screen(chunk))
            if progress is not None:
                progress(writer.stats.n_molecules, source.n_molecules)
        if progress is not None:
            progress(source.n_molecules, source.n_molecules)
        provenance = source.provenance()
        provenance["skipped_invalid"] = int(provenance.get("skipped_invalid", 0)) + screen.skipped
        if writer.stats.n_molecules == 0:
            skipped = provenance["skipped_invalid"]
            why = f" ({skipped} skipped as invalid)" if skipped else ""
            raise SourceError(f"{label}: no valid molecules to pack{why}")
        writer.provenance.update(provenance)
        extra = {} if provenance.get("had_charges", True) else {
            "qtot_note": "the source has no total charges: Qtot.f64 is all zeros (neutral)"
        }
        path = writer.commit(extra)
    return PackResult(
        path=path,
        n_molecules=writer.stats.n_molecules,
        n_atoms_total=writer.stats.n_atoms_total,
        skipped=provenance["skipped_invalid"],
        skipped_first=(list(getattr(source, "skipped_first", [])) + screen.skipped_first)[:SKIPPED_SHOWN],
        removed_leftovers=writer.removed_leftovers,
        seconds=time.perf_counter() - start,
    )


def pack_npz(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    keys: dict[str, str] | None = None,
    energy_unit: str | None = None,
    length_unit: str | None = None,
    skip_invalid: bool = False,
    force: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: ProgressCallback | None = None,
) -> PackResult:
    """Pack an NPZ file (PhysNet padded, sGDML/MD17/rMD17 trajectory, or flat layout).

    Energies go to kcal/mol, lengths to Å, forces to kcal/mol/Å. Units default to the file's
    ``e_unit``/``r_unit`` entries when present, else kcal/mol and Å. See :class:`NpzSource`.
    """
    with NpzSource(
        input,
        keys=keys,
        energy_unit=energy_unit,
        length_unit=length_unit,
        skip_invalid=skip_invalid,
        chunk_size=chunk_size,
    ) as source:
        return pack_source(source, output, skip_invalid=skip_invalid, force=force, progress=progress)


__all__ = ["PackResult", "ProgressCallback", "pack_npz", "pack_source"]
