"""``packedqdc stats``."""

from __future__ import annotations

import typer

from .app import app, err_console


@app.command("stats")
def stats() -> None:
    """Not built yet."""
    err_console.print("stats is not built yet.")
    raise typer.Exit(2)
