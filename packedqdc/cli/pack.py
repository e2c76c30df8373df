"""``packedqdc pack npz`` and ``packedqdc pack openqdc``."""

from __future__ import annotations

import typer

from .app import err_console, pack_app


@pack_app.command("npz")
def pack_npz() -> None:
    """Convert an NPZ file into a packed directory (not built yet)."""
    err_console.print("pack npz is not built yet.")
    raise typer.Exit(2)


@pack_app.command("openqdc")
def pack_openqdc() -> None:
    """Convert an OpenQDC dataset into a packed directory (not built yet)."""
    err_console.print("pack openqdc is not built yet (issue: pack openqdc).")
    raise typer.Exit(2)
