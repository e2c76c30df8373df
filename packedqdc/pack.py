"""Every ``pack_*`` entry point: a source -> a packed directory, streaming, atomically published.

Sources (``packedqdc.sources.*``) only yield ``MoleculeChunk``s and describe their provenance;
:func:`pack_source` drives one into a ``PackedWriter``. No UI here: progress is a callback.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .checks import SKIPPED_SHOWN, ValueScreen
from .errors import SourceError
from .format import PackedWriter
from .sources import MoleculeSource
from .sources.npz import DEFAULT_CHUNK_SIZE, NpzSource

#: called after each chunk with (molecules written so far, molecules in the input, or None while a
#: streamed input's size is unknown); a last call reports (total, total) once the input is
#: exhausted, so skipped molecules still end at 100 %
ProgressCallback = Callable[[int, "int | None"], None]


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
                      inputs=getattr(source, "input_paths", ()),
                      has_dipoles=bool(getattr(source, "has_dipoles", False))) as writer:
        for chunk in source.chunks():
            writer.append(screen(chunk))
            if progress is not None:
                progress(writer.stats.n_molecules, source.n_molecules)
        if progress is not None:
            total = source.n_molecules if source.n_molecules is not None else writer.stats.n_molecules
            progress(total, total)
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
    dipole_origin: str = "coordinates",
) -> PackResult:
    """Pack an NPZ file (PhysNet padded, sGDML/MD17/rMD17 trajectory, or flat layout).

    Energies go to kcal/mol, lengths to Å, forces to kcal/mol/Å, dipoles (a ``D`` key) to e·Å
    about each molecule's centroid (``dipole_origin`` says where the file's are taken: about the
    coordinate origin, as xTB reports them, or already about the centroid). Units default to the
    file's ``e_unit``/``r_unit`` entries when present, else kcal/mol and Å. See :class:`NpzSource`.
    """
    with NpzSource(
        input,
        keys=keys,
        energy_unit=energy_unit,
        length_unit=length_unit,
        skip_invalid=skip_invalid,
        chunk_size=chunk_size,
        dipole_origin=dipole_origin,
    ) as source:
        return pack_source(source, output, skip_invalid=skip_invalid, force=force, progress=progress)


def pack_openqdc(
    name: str,
    output: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    energy_method: int | str = 0,
    energy_type: str = "total",
    subset: str | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> PackResult:
    """Pack the OpenQDC dataset ``name`` from its local cache into the directory ``output``.

    Output: E float64 kcal/mol (total, or minus reference energies), R float32 Å, F float32
    kcal/mol/Å when the method has forces (else absent), Qtot float64 = sum of formal charges,
    int64 offsets. Molecules whose energy (or packed forces) is NaN are skipped and counted.

    Args:
        name: dataset class, e.g. ``"Spice"``, ``"QM9"``, ``"ANI1X"`` (case-insensitive).
        output: packed directory to create (atomically).
        cache_dir: cache root; default ``$OPENQDC_CACHE_DIR`` or ``~/.cache/openqdc``.
        energy_method: index, method string or target name of the level of theory.
        energy_type: ``total``, ``formation`` (tabulated isolated-atom E0, charge-aware) or
            ``regression`` (fitted per-element E0).
        subset: keep only this subset (name as stored in the cache).
        force: replace ``output`` if it exists.
        progress: called as ``progress(done, total)``; a regression fit counts as a first pass.

    Raises:
        ConfigError: openqdc missing, unknown dataset/method/subset/energy type.
        CacheMissingError: the cache is not on disk (nothing is created).
        SourceError: malformed cache, or no molecule left.
        TargetExistsError: ``output`` exists and ``force`` is false.
    """
    from .sources.openqdc import OpenQDCSource

    report = progress or _no_progress
    source = OpenQDCSource(
        name, cache_dir=cache_dir, energy_method=energy_method, energy_type=energy_type, subset=subset
    )
    n = source.n_molecules
    passes = 2 if source.needs_fit else 1
    source.prepare(lambda done, _total: report(done, passes * n))
    return pack_source(source, output, force=force, progress=lambda done, _total: report((passes - 1) * n + done, passes * n))


def pack_xyz(
    files: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    energy_key: str | None = None,
    forces_key: str | None = None,
    charge_key: str | None = None,
    energy_unit: str = "eV",
    length_unit: str = "Ang",
    skip_invalid: bool = False,
    parser: str = "auto",
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> PackResult:
    """Pack extended XYZ files (ASE's writer, MACE, NequIP, rMD17 ...) into the directory ``output``.

    Energies go from ``energy_unit`` (default eV) to kcal/mol, positions from ``length_unit``
    (default Å) to Å, forces to kcal/mol/Å. See :class:`packedqdc.sources.xyz.XyzSource` for the
    keys read, the frames refused and the fast parser (needs the ``ase`` extra).
    """
    from .sources.xyz import XyzSource

    source = XyzSource(
        files,
        energy_key=energy_key,
        forces_key=forces_key,
        charge_key=charge_key,
        energy_unit=energy_unit,
        length_unit=length_unit,
        skip_invalid=skip_invalid,
        parser=parser,
    )
    return pack_source(source, output, skip_invalid=skip_invalid, force=force, progress=progress)


def pack_hdf5(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    layout: str,
    energy_key: str | None = None,
    forces_key: str | None = None,
    energy_unit: str | None = None,
    length_unit: str | None = None,
    skip_invalid: bool = False,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> PackResult:
    """Pack an HDF5 file in SPICE's (``layout="spice"``) or ANI-1x's (``"ani"``) layout.

    Energies go to kcal/mol, positions to Å, forces (the negated gradient for SPICE) to
    kcal/mol/Å; SPICE's total charges come from each group's SMILES. Conformers with a NaN energy
    or NaN forces are skipped and counted. See :class:`packedqdc.sources.hdf5.Hdf5Source` (needs
    the ``hdf5`` extra).
    """
    from .sources.hdf5 import Hdf5Source

    with Hdf5Source(
        input,
        layout=layout,
        energy_key=energy_key,
        forces_key=forces_key,
        energy_unit=energy_unit,
        length_unit=length_unit,
        skip_invalid=skip_invalid,
    ) as source:
        return pack_source(source, output, skip_invalid=skip_invalid, force=force, progress=progress)


def _no_progress(done: int, total: int | None) -> None:
    """Default progress callback: report nothing."""


__all__ = ["PackResult", "ProgressCallback", "pack_hdf5", "pack_npz", "pack_openqdc", "pack_source", "pack_xyz"]
