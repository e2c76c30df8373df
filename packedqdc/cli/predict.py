"""``packedqdc predict RUN INPUT --output FILE``: energies, forces and partial charges of every
molecule of a packed directory or of a structure file ASE can read."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .app import app, check_output_file, console, err_console, handles_errors


@app.command("predict")
@handles_errors
def predict(
    run_dir: Path = typer.Argument(..., help="Run directory (runs/NAME)."),
    input_path: Path = typer.Argument(..., metavar="INPUT", help="Packed directory, or a file ASE can read (extxyz, xyz, ASE db, ...)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output file: .npz (kcal/mol, kcal/mol/Å) or .xyz/.extxyz (eV, eV/Å)."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or latest."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Molecules per batch [default: the run's batch size]."),
    devices: Optional[int] = typer.Option(None, "--devices", help="Local devices for a packed directory [default: all]."),
    charge: float = typer.Option(0.0, "--charge", help="Total charge (e) of structures without info['charge'] (file input)."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
) -> None:
    """Predict energies, forces and partial charges of every molecule of INPUT, in input order."""
    from ..compile_cache import enable_compilation_cache
    from ..errors import ConfigError
    from ..predictions import output_format, read_structures, write_predictions
    from ..train.inference import pack_structures, predict_packed
    from ..train.predict import Potential

    enable_compilation_cache()

    check_output_file(output, "--output")
    output_format(output, force)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if not input_path.exists():
        raise ConfigError(f"{input_path}: INPUT does not exist")
    potential = Potential.load(run_dir, checkpoint)
    with _progress() as progress, tempfile.TemporaryDirectory(prefix=".packedqdc-predict-", dir=output.parent) as scratch:
        from ..format import open_packed

        data = input_path
        if not input_path.is_dir():  # a structure file: packed into the scratch directory first
            Zs, Rs, Qtots = read_structures(input_path, charge, known_elements=potential.reference)
            data = pack_structures(Zs, Rs, Qtots, Path(scratch) / "structures")
        task = progress.add_task("predict", total=open_packed(data).n_molecules)
        result = predict_packed(potential, data, batch_size, devices, scratch=Path(scratch),
                                on_batch=lambda n: progress.advance(task, n))
        write_predictions(result, output, force)
    rate = result.n_molecules / result.seconds if result.seconds > 0 else float("nan")
    console.print(f"{result.n_molecules:,} molecules in {result.seconds:.2f} s ({rate:,.0f} molecules/s, "
                  f"compilation included); written to {output}")


def _progress() -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("molecules"), TimeElapsedColumn(), console=err_console, transient=True,
                    disable=not err_console.is_terminal)
