"""``packedqdc train``."""

from __future__ import annotations

import typer

from .app import app, err_console


@app.command("train")
def train() -> None:
    """Not built yet."""
    err_console.print("train is not built yet.")
    raise typer.Exit(2)
