"""``packedqdc pack hdf5``: a SPICE- or ANI-layout HDF5 file -> a packed directory (needs the hdf5 extra)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ..pack import pack_hdf5
from .app import handles_errors, pack_app
from .render import molecule_progress, print_pack_result


class Layout(str, Enum):
    """Values of ``--layout``."""

    spice = "spice"
    ani = "ani"


@pack_app.command("hdf5")
@handles_errors
def pack_hdf5_command(
    input: Path = typer.Argument(..., help="HDF5 file, e.g. SPICE-2.0.1.hdf5 or ani1x-release.h5.", show_default=False),
    output_dir: Path = typer.Argument(..., help="Packed directory to create.", show_default=False),
    layout: Layout = typer.Option(..., "--layout", case_sensitive=False, help="spice or ani.", show_default=False),
    energy_key: Optional[str] = typer.Option(
        None, "--energy-key", help="Energy dataset \\[default: dft_total_energy (spice), wb97x_dz.energy (ani)]."
    ),
    forces_key: Optional[str] = typer.Option(
        None, "--forces-key",
        help="Forces dataset (names ending in 'gradient' are negated), or 'none' "
        "\\[default: dft_total_gradient (spice); the energy's level + '.forces' if present (ani)].",
    ),
    energy_unit: Optional[str] = typer.Option(None, "--energy-unit", help="\\[default: hartree]."),
    length_unit: Optional[str] = typer.Option(None, "--length-unit", help="\\[default: bohr (spice), ang (ani)]."),
    skip_invalid: bool = typer.Option(
        False, "--skip-invalid", help="Skip conformers with bad values (NaN labels are always skipped and counted)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT_DIR if it exists."),
) -> None:
    """Convert an HDF5 file in SPICE's or ANI-1x's published layout into a packed directory.

    Streams group by group. Energies become kcal/mol, positions Å, forces kcal/mol/Å; SPICE's total
    charge comes from each molecule's SMILES. Conformers with a NaN energy or forces are skipped.
    """
    with molecule_progress() as progress:
        task = progress.add_task(f"packing {input.name}", total=None)
        result = pack_hdf5(
            input,
            output_dir,
            layout=layout.value,
            energy_key=energy_key,
            forces_key=forces_key,
            energy_unit=energy_unit,
            length_unit=length_unit,
            skip_invalid=skip_invalid,
            force=force,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    print_pack_result(result, "NaN-labelled or invalid")
