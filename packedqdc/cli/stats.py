"""``packedqdc stats``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..errors import ConfigError
from ..stats import dataset_stats, plot_stats
from .app import app, check_output_file, console, handles_errors, json_text


@app.command("stats")
@handles_errors
def stats(
    directory: Path = typer.Argument(..., help="Packed directory."),
    bucket_size: int = typer.Option(8192, "--bucket-size", help="The seed's bucket size (padded layout)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Molecules per batch (average, for packed)."),
    num_atoms: int = typer.Option(60, "--num-atoms", help="Atom slots per molecule in the padded layout."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON (for scripts)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the histogram and efficiency curves to a PNG."),
) -> None:
    """Sizes, elements, energy and force ranges, and padding efficiency of padded vs packed batches."""
    if min(bucket_size, batch_size, num_atoms) < 1:
        raise ConfigError("--bucket-size, --batch-size and --num-atoms must be >= 1")
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("--plot needs matplotlib: pip install 'packedqdc[plot]'") from None
        check_output_file(plot, "--plot")
    result = dataset_stats(directory, batch_size=batch_size, num_atoms=num_atoms, bucket_size=bucket_size)
    if plot is not None:
        plot_stats(result, plot)
    if as_json:
        typer.echo(json_text(result, indent=2))
        return
    _render(result)
    if plot is not None:
        console.print(f"plot written to {plot}")


def _render(s: dict[str, Any]) -> None:
    n = s["atoms_per_molecule"]
    console.print(
        f"[bold]{s['path']}[/]: {s['n_molecules']:,} molecules, {s['n_atoms_total']:,} atoms, "
        f"{n['min']}..{n['max']} atoms per molecule (mean {n['mean']:.1f})"
    )
    hist = Table(title="molecule sizes")
    hist.add_column("atoms", justify="right")
    hist.add_column("molecules", justify="right")
    hist.add_column("", justify="left")
    top = max(s["size_histogram"].values(), default=1)
    for size, count in s["size_histogram"].items():
        hist.add_row(str(size), f"{count:,}", "█" * max(1, round(30 * count / top)))
    console.print(hist)
    elements = Table(title="elements")
    elements.add_column("element")
    elements.add_column("atoms", justify="right")
    for sym, count in sorted(s["elements"].items(), key=lambda kv: -kv[1]):
        elements.add_row(sym, f"{count:,}")
    console.print(elements)
    ranges = Table(title="value ranges")
    for col in ("quantity", "min", "max", "mean", "std"):
        ranges.add_column(col, justify="right")
    for name, key in (("E (kcal/mol)", "energy_kcal_mol"), ("F (kcal/mol/Å)", "forces_kcal_mol_A")):
        r = s.get(key)
        if r:
            ranges.add_row(name, *(f"{r[k]:.4g}" for k in ("min", "max", "mean", "std")))
            if r["non_finite"]:
                console.print(f"[bold red]warning:[/] {r['non_finite']:,} non-finite value(s) in {name} "
                              f"(left out of the figures; run packedqdc validate)")
        else:
            ranges.add_row(name, "absent", "", "", "")
    console.print(ranges)
    if "packed" not in s:
        return
    cfg = s["settings"]
    eff = Table(title=f"padding per epoch (batch_size={cfg['batch_size']})")
    for col in ("layout", "atom slots real", "pair slots real", "shapes", "batches"):
        eff.add_column(col, justify="right")
    padded = s["padded"]
    if padded["fits"]:
        eff.add_row(f"padded, num_atoms={cfg['num_atoms']}", *_eff_cells(padded))
    else:
        eff.add_row(f"padded, num_atoms={cfg['num_atoms']}", f"molecule {padded['first_too_large']} too large", "", "", "")
    eff.add_row("packed (auto budgets)", *_eff_cells(s["packed"]))
    for row in s["bucket_sweep"]:
        eff.add_row(f"padded per batch, bucket {row['bucket_size']}", *_eff_cells(row))
    console.print(eff)
    console.print(f"packed budgets (A, M, P): {', '.join(str(tuple(b)) for b in s['packed']['budgets'])}")
    console.print(f"[bold]recommendation:[/] {s['recommendation']}")


def _eff_cells(row: dict[str, Any]) -> list[str]:
    return [f"{row['atom_efficiency']:.1%}", f"{row['pair_efficiency']:.1%}", str(row["shapes"]), f"{row['batches']:,}"]
