"""``packedqdc evaluate``."""

from __future__ import annotations

import typer

from .app import app, err_console


@app.command("evaluate")
def evaluate() -> None:
    """Not built yet."""
    err_console.print("evaluate is not built yet.")
    raise typer.Exit(2)
