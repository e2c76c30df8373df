"""``packedqdc plot RUN --output curves.png``: training curves from the run's metrics.csv."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, check_output_file, console, handles_errors


@app.command("plot")
@handles_errors
def plot(
    run_dir: Path = typer.Argument(..., help="Run directory (runs/NAME)."),
    output: Path = typer.Option(..., "--output", "-o", help="Image file (.png, .pdf or .svg)."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
) -> None:
    """Train/valid loss, energy and force MAE, and learning rate against epoch (needs the plot extra)."""
    from ..train.plots import check_plot_target, plot_curves

    check_output_file(output, "--output")
    check_plot_target(output, force)
    epochs = plot_curves(run_dir, output)
    console.print(f"{epochs} epochs plotted to {output}")
