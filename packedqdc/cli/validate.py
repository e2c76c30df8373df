"""``packedqdc validate``."""

from __future__ import annotations

import typer

from .app import app, err_console


@app.command("validate")
def validate() -> None:
    """Not built yet."""
    err_console.print("validate is not built yet.")
    raise typer.Exit(2)
