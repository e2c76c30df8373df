"""``packedqdc evaluate RUN_DIR --data-path DIR [--json]``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .app import app, check_output_file, console, handles_errors, json_text


@app.command("evaluate")
@handles_errors
def evaluate(
    run_dir: Path = typer.Argument(..., help="Run directory (runs/NAME)."),
    data_path: Path = typer.Option(..., "--data-path", "--data_path", help="Packed directory to evaluate on."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or latest."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write energy and force parity plots and the force error by element (PNG/PDF/SVG; needs the plot extra)."),
) -> None:
    """Energy and force MAE/RMSE of a run's EMA weights on a packed directory (kcal/mol, kcal/mol/Å), and
    dipole MAE/RMSE (e·Å) when it has dipoles."""
    from ..compile_cache import enable_compilation_cache
    from ..train.evaluate import evaluate_run

    enable_compilation_cache()

    if plot is not None:
        from ..train.plots import check_plot_target

        check_output_file(plot, "--plot")
        check_plot_target(plot, hint="remove it or choose another --plot name")
    result = evaluate_run(run_dir, data_path, which=checkpoint)
    if plot is not None:
        from ..train.plots import parity_run

        parity_run(run_dir, data_path, checkpoint, plot)
    if as_json:
        typer.echo(json_text(result.summary()))
        return
    table = Table(title=f"{run_dir} ({checkpoint}, EMA) on {data_path}: {result.n_molecules} molecules")
    for column in ("", "MAE", "RMSE", "baseline MAE"):
        table.add_column(column, justify="right")
    table.add_row("energy (kcal/mol)", f"{result.energy_mae:.4f}", f"{result.energy_rmse:.4f}",
                  f"{result.baseline_energy_mae:.4f} (per-element linear regression)")
    table.add_row("forces (kcal/mol/Å)", f"{result.forces_mae:.4f}", f"{result.forces_rmse:.4f}",
                  f"{result.baseline_forces_mae:.4f} (zero forces)")
    if result.has_dipoles:
        table.add_row("dipoles (e·Å)", f"{result.dipole_mae:.4f}", f"{result.dipole_rmse:.4f}",
                      f"{result.baseline_dipole_mae:.4f} (zero dipoles)")
    console.print(table)
    if plot is not None:
        console.print(f"parity plots written to {plot}")
