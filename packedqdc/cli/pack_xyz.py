"""``packedqdc pack xyz``: extended XYZ files -> a packed directory (needs the ase extra)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from ..pack import pack_xyz
from .app import handles_errors, pack_app
from .render import molecule_progress, print_pack_result


class Parser(str, Enum):
    """Values of ``--parser``."""

    auto = "auto"
    fast = "fast"
    ase = "ase"


@pack_app.command("xyz")
@handles_errors
def pack_xyz_command(
    paths: List[Path] = typer.Argument(
        ..., help="Extended XYZ files (or quoted glob patterns), then the packed directory to create.",
        metavar="FILE... OUTPUT_DIR", show_default=False,
    ),
    energy_key: Optional[str] = typer.Option(
        None, "--energy-key", help="Per-frame energy entry \\[default: energy or REF_energy, whichever frame 0 has]."
    ),
    forces_key: Optional[str] = typer.Option(
        None, "--forces-key", help="Per-atom forces column, or 'none' \\[default: forces or REF_forces if frame 0 has one]."
    ),
    charge_key: Optional[str] = typer.Option(
        None, "--charge-key", help="Per-frame total charge, or 'none' \\[default: charge or total_charge if frame 0 has one]."
    ),
    energy_unit: str = typer.Option("eV", "--energy-unit", help="kcal/mol, ev, hartree or kj/mol (forces: per length unit)."),
    length_unit: str = typer.Option("ang", "--length-unit", help="ang, bohr or nm."),
    skip_invalid: bool = typer.Option(
        False, "--skip-invalid", help="Skip periodic frames, frames missing an entry and bad values (counted, first named)."
    ),
    parser: Parser = typer.Option(
        Parser.auto, "--parser", case_sensitive=False,
        help="auto: fast reader, ASE's where it cannot read a frame; ase: ASE's reader only; fast: never ASE.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT_DIR if it exists."),
) -> None:
    """Convert extended XYZ files (ASE, MACE, NequIP, rMD17 ...) into a packed directory.

    Streams frame by frame in bounded memory. Energies become kcal/mol, positions Å, forces kcal/mol/Å.
    Periodic frames and frames without an energy (or forces, when frame 0 has them) are refused.
    """
    from ..errors import ConfigError

    if len(paths) < 2:
        raise ConfigError("give FILE... and OUTPUT_DIR")
    *files, output_dir = paths
    with molecule_progress() as progress:
        task = progress.add_task("packing", total=None)
        result = pack_xyz(
            files,
            output_dir,
            energy_key=energy_key,
            forces_key=forces_key,
            charge_key=charge_key,
            energy_unit=energy_unit,
            length_unit=length_unit,
            skip_invalid=skip_invalid,
            parser=parser.value,
            force=force,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    print_pack_result(result, "invalid")
