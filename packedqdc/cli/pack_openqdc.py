"""``packedqdc pack openqdc``: an OpenQDC cache -> a packed directory (needs the openqdc extra)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ..errors import ConfigError
from .app import handles_errors, pack_app
from .render import molecule_progress, print_pack_result

if TYPE_CHECKING:
    from ..sources.openqdc import DatasetInfo


class EnergyType(str, Enum):
    """Values of ``--energy-type``."""

    total = "total"
    formation = "formation"
    regression = "regression"


@pack_app.command("openqdc")
@handles_errors
def pack_openqdc_command(
    name: str = typer.Argument(..., help="OpenQDC dataset class, e.g. Spice, QM9, ANI1X (case-insensitive)."),
    output_dir: Optional[Path] = typer.Argument(None, help="Packed directory to create.", show_default=False),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="OpenQDC cache root. Default: $OPENQDC_CACHE_DIR, else ~/.cache/openqdc."
    ),
    energy_method: str = typer.Option(
        "0", "--energy-method", "-m", help="Level of theory: index, method string or target name."
    ),
    energy_type: EnergyType = typer.Option(
        EnergyType.total, "--energy-type", case_sensitive=False, help="total, formation or regression."
    ),
    subset: Optional[str] = typer.Option(None, "--subset", help="Keep only this subset."),
    list_methods: bool = typer.Option(False, "--list-methods", help="Print the levels of theory and exit."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT_DIR if it exists."),
) -> None:
    """Convert a downloaded OpenQDC dataset into a packed directory.

    Reads the cache files directly: bounded memory, no network.
    Energies become kcal/mol, positions Å, forces kcal/mol/Å; NaN-labelled molecules are skipped.
    """
    from ..pack import pack_openqdc
    from ..sources.openqdc import import_openqdc, resolve_dataset

    import_openqdc()  # fail early, with the install hint, when openqdc is missing

    if list_methods:
        _print_methods(resolve_dataset(name))
        return
    if output_dir is None:
        raise ConfigError("give OUTPUT_DIR (or --list-methods)")
    with molecule_progress() as progress:
        task = progress.add_task(f"packing {name}", total=None)
        result = pack_openqdc(
            name,
            output_dir,
            cache_dir=cache_dir,
            energy_method=energy_method,
            energy_type=energy_type.value,
            subset=subset,
            force=force,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    print_pack_result(result, "NaN-labelled")


def _print_methods(info: DatasetInfo) -> None:
    """Tab-separated lines, one per level of theory: index, method string, target name, forces."""
    typer.echo(
        f"{info.class_name}: {len(info.methods)} energy methods "
        f"(stored in {info.energy_unit}, distances in {info.distance_unit})"
    )
    typer.echo("index\tmethod\ttarget name\tforces")
    for m in info.methods:
        typer.echo(f"{m.index}\t{m.name or '-'}\t{m.target}\t{'forces' if m.has_forces else 'no forces'}")
