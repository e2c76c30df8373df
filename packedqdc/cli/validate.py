"""``packedqdc validate``."""

from __future__ import annotations

from pathlib import Path

import typer

from ..validate import ValidationReport, validate_packed
from .app import app, console, handles_errors, json_text


@app.command("validate")
@handles_errors
def validate(
    directory: Path = typer.Argument(..., help="Packed directory to check.", show_default=False),
    checksums: bool = typer.Option(False, "--checksums", help="Also verify the sha256 sums in meta.json."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (for scripts)."),
    max_problems: int = typer.Option(20, "--max-problems", min=1, help="Stop listing problems after this many."),
) -> None:
    """Check a packed directory: sizes, offsets, values, meta.json (and checksums).

    Exit 0 when clean, 1 with problems, 2 when the directory cannot be read.
    """
    report = validate_packed(directory, checksums=checksums, max_problems=max_problems)
    if as_json:
        typer.echo(json_text(report.to_dict(), indent=2))
    else:
        _print_report(report)
    raise typer.Exit(report.exit_code)


def _print_report(report: ValidationReport) -> None:
    counts = report.counts
    size = f"{counts['n_molecules']} molecules, {counts['n_atoms_total']} atoms" if counts else "unreadable"
    if report.ok:
        console.print(f"[green]OK[/] {report.path}: {size}", highlight=False, soft_wrap=True)
    else:
        total = len(report.problems) + report.problems_not_shown
        console.print(f"[red]{total} problem(s)[/] in {report.path} ({size}):", highlight=False, soft_wrap=True)
    for problem in report.problems:
        console.print(f"  {problem}", highlight=False, soft_wrap=True, markup=False)
    if report.problems_not_shown:
        console.print(f"  ... and {report.problems_not_shown} more (raise --max-problems)", highlight=False)
    for note in report.notes:
        console.print(f"  note: {note}", highlight=False, soft_wrap=True, markup=False)
