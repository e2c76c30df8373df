"""Rendering shared by the pack commands: the progress bar and the summary lines."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..pack import PackResult
from .app import console, err_console


def molecule_progress() -> Progress:
    """A molecules progress bar on stderr, shown only on a terminal."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("molecules"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    )


def print_pack_result(result: PackResult, skipped_what: str) -> None:
    """Summary of a pack; ``skipped_what`` says why molecules were skipped (e.g. "invalid")."""
    console.print(
        f"Packed {result.n_molecules} molecules ({result.n_atoms_total} atoms) into {result.path} "
        f"in {result.seconds:.1f} s",
        highlight=False,
        soft_wrap=True,
    )
    for path in result.removed_leftovers:
        console.print(f"Removed {path}, left behind by an earlier pack that was killed", highlight=False,
                      soft_wrap=True)
    if result.skipped:
        console.print(f"Skipped {result.skipped} {skipped_what} molecules; first ones:", highlight=False)
        for reason in result.skipped_first:
            console.print(f"  {reason}", highlight=False, soft_wrap=True)
