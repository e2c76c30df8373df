"""Command-line interface: ``packedqdc pack|validate|stats|train|evaluate|predict|plot``.

Each command lives in its own module and only parses flags, calls the library and renders results.
"""

from __future__ import annotations

from . import evaluate, pack, plot, predict, stats, train, validate  # noqa: F401  (register commands)
from .app import app


def main() -> None:
    """Console-script entry point."""
    app()
