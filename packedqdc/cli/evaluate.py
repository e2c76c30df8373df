"""``packedqdc evaluate RUN_DIR --data-path DIR [--json]``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .app import app, console, handles_errors, json_text


@app.command("evaluate")
@handles_errors
def evaluate(
    run_dir: Path = typer.Argument(..., help="Run directory (runs/NAME)."),
    data_path: Path = typer.Option(..., "--data-path", "--data_path", help="Packed directory to evaluate on."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or latest."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """Energy and force MAE/RMSE of a run's EMA weights on a packed directory (kcal/mol, kcal/mol/Å)."""
    from ..train.evaluate import evaluate_run

    result = evaluate_run(run_dir, data_path, which=checkpoint)
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
    console.print(table)
