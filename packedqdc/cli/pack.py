"""``packedqdc pack npz``; ``pack openqdc``, ``pack xyz`` and ``pack hdf5`` register from their modules."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import ConfigError
from ..pack import pack_npz
from ..sources.npz import DEFAULT_CHUNK_SIZE, parse_keys
from .app import handles_errors, pack_app
from .render import molecule_progress, print_pack_result


@pack_app.command("npz")
@handles_errors
def pack_npz_command(
    input: Optional[Path] = typer.Argument(None, help="NPZ file (omit with --sample).", show_default=False),
    output_dir: Optional[Path] = typer.Argument(None, help="Packed directory to create.", show_default=False),
    keys: Optional[str] = typer.Option(
        None, "--keys", help="Member names for roles R,Z,E,F,N,Q,D, e.g. 'R=coords,Z=atomic_numbers'."
    ),
    energy_unit: Optional[str] = typer.Option(
        None, "--energy-unit", help="kcal/mol, ev, hartree or kj/mol \\[default: the file's e_unit, else kcal/mol]."
    ),
    length_unit: Optional[str] = typer.Option(
        None, "--length-unit", help="ang or bohr \\[default: the file's r_unit, else ang]."
    ),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Drop bad molecules instead of failing."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT_DIR if it exists."),
    chunk_size: int = typer.Option(DEFAULT_CHUNK_SIZE, "--chunk-size", help="Molecules per chunk (bounds memory)."),
    sample: bool = typer.Option(False, "--sample", help="Pack the bundled sample; then the only argument is OUTPUT_DIR."),
    dipole_origin: str = typer.Option(
        "coordinates", "--dipole-origin",
        help="Where the file's dipoles (key D) are taken: 'coordinates' (the coordinate origin, as xTB reports "
             "them; moved to each molecule's centroid) or 'centroid' (stored as they are)."),
) -> None:
    """Convert an NPZ file (PhysNet padded, sGDML/MD17/rMD17, or flat layout) into a packed directory.

    Energies become kcal/mol, positions Å, forces kcal/mol/Å, dipoles e·Å about each molecule's centroid.
    """
    source, target = _input_and_output(input, output_dir, sample)
    with molecule_progress() as progress:
        task = progress.add_task("packing", total=None)
        result = pack_npz(
            source,
            target,
            keys=parse_keys(keys),
            energy_unit=energy_unit,
            length_unit=length_unit,
            skip_invalid=skip_invalid,
            force=force,
            chunk_size=chunk_size,
            dipole_origin=dipole_origin,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    print_pack_result(result, "invalid")


def _input_and_output(input: Path | None, output_dir: Path | None, sample: bool) -> tuple[Path, Path]:
    """(NPZ file, output directory) from the arguments; with ``--sample`` the one argument is the output."""
    if sample:
        from ..data import SAMPLE_NPZ

        if output_dir is not None or input is None:
            raise ConfigError("with --sample give only OUTPUT_DIR")
        return SAMPLE_NPZ, input
    if input is None or output_dir is None:
        raise ConfigError("give INPUT and OUTPUT_DIR (or --sample OUTPUT_DIR)")
    return input, output_dir


from . import pack_openqdc as _pack_openqdc  # noqa: E402,F401  (registers ``pack openqdc``)
from . import pack_xyz as _pack_xyz  # noqa: E402,F401  (registers ``pack xyz``)
from . import pack_hdf5 as _pack_hdf5  # noqa: E402,F401  (registers ``pack hdf5``)
