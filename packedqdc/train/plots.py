"""The plots people look at after training (matplotlib, the ``plot`` extra).

``plot_parity``: predicted against reference energies and force components with MAE/RMSE, and the
force error by element (``packedqdc evaluate --plot``). ``plot_curves``: train/valid loss, energy
and force MAE, and learning rate against epoch from a run's ``metrics.csv`` (``packedqdc plot``).
Energies are drawn minus the run's per-element reference energies: totals span thousands of kcal/mol
across compositions, which would hide errors of a few kcal/mol on a parity line; the errors
themselves (MAE/RMSE) are those of the total energies (the reference cancels in the difference).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..elements import symbol
from ..errors import ConfigError, TargetExistsError
from ..sources.toolkit import require_extra

#: Above this many points a parity panel is a hexbin density instead of a scatter.
SCATTER_LIMIT = 20_000


def check_plot_target(path: str | Path, force: bool = False, hint: str = "pass --force to replace it") -> None:
    """Before any work: ``path`` must end in .png, .pdf or .svg, its directory exist, and (unless
    ``force``) no file be there already; matplotlib must be installed."""
    require_extra("matplotlib", "plot", "plotting")
    path = Path(path)
    if path.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ConfigError(f"{path}: the plot file must end in .png, .pdf or .svg")
    if not path.parent.is_dir():
        raise ConfigError(f"{path}: directory {path.parent} does not exist")
    if path.exists() and not force:
        raise TargetExistsError(f"{path}: file exists; {hint}")


def _pyplot() -> Any:
    matplotlib = require_extra("matplotlib", "plot", "plotting")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> None:
    """Write the figure to a temporary name beside ``path``, then rename it into place."""
    plt = _pyplot()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=120, format=path.suffix.lower().lstrip("."))
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()


def _errors(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    diff = np.asarray(pred, np.float64) - np.asarray(ref, np.float64)
    return float(np.mean(np.abs(diff))), float(np.sqrt(np.mean(diff * diff)))


def _parity(ax: Any, ref: np.ndarray, pred: np.ndarray, unit: str, title: str, errors: tuple[float, float]) -> None:
    if ref.size > SCATTER_LIMIT:
        ax.hexbin(ref, pred, gridsize=120, bins="log", mincnt=1, cmap="viridis")
    else:
        ax.scatter(ref, pred, s=4, alpha=0.5, linewidths=0)
    lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--")
    ax.set(xlabel=f"reference ({unit})", ylabel=f"predicted ({unit})", title=title, aspect="equal")
    ax.text(0.04, 0.96, f"MAE {errors[0]:.3g}\nRMSE {errors[1]:.3g}\n({unit})", transform=ax.transAxes,
            va="top", fontsize=8, bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})


def plot_parity(E_ref: np.ndarray, E_pred: np.ndarray, E_linear: np.ndarray, Z: np.ndarray,
                F_ref: np.ndarray | None, F_pred: np.ndarray, file: str | Path, title: str = "") -> dict[str, float]:
    """Energy parity, force parity and force MAE by element to ``file``; returns the errors drawn.

    Args:
        E_ref, E_pred: (m,) float reference and predicted energies, kcal/mol.
        E_linear: (m,) float per-element reference energies of the molecules (subtracted for the
            energy panel), kcal/mol.
        Z: (n,) int atomic numbers. F_ref (None: the data has no forces), F_pred: (n, 3) kcal/mol/Å.

    Returns {"energy_mae", "energy_rmse", "forces_mae", "forces_rmse"} (NaN without forces).
    """
    plt = _pyplot()
    has_forces = F_ref is not None
    fig, axes = plt.subplots(1, 3 if has_forces else 1, figsize=(15 if has_forces else 5, 4.8), squeeze=False)
    e_err = _errors(E_pred, E_ref)
    _parity(axes[0, 0], np.asarray(E_ref, np.float64) - E_linear, np.asarray(E_pred, np.float64) - E_linear,
            "kcal/mol", f"energy minus per-element reference ({E_ref.shape[0]:,} molecules)", e_err)
    out = {"energy_mae": e_err[0], "energy_rmse": e_err[1], "forces_mae": math.nan, "forces_rmse": math.nan}
    if has_forces:
        f_ref, f_pred = np.asarray(F_ref, np.float32).ravel(), np.asarray(F_pred, np.float32).ravel()
        f_err = _errors(f_pred, f_ref)
        out["forces_mae"], out["forces_rmse"] = f_err
        _parity(axes[0, 1], f_ref, f_pred, "kcal/mol/Å", f"force components ({Z.shape[0]:,} atoms)", f_err)
        per_atom = np.abs(np.asarray(F_pred, np.float64) - np.asarray(F_ref, np.float64)).mean(axis=1)
        elements, inverse, counts = np.unique(np.asarray(Z), return_inverse=True, return_counts=True)
        mae = np.bincount(inverse, weights=per_atom) / counts
        ax = axes[0, 2]
        ax.bar([f"{symbol(int(z))}\n{c:,}" for z, c in zip(elements, counts)], mae, color="C1")
        ax.axhline(f_err[0], color="k", lw=0.8, ls="--", label=f"all atoms {f_err[0]:.3g}")
        ax.set(ylabel="force MAE (kcal/mol/Å)", title="force error by element (atoms below)")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, file)
    return out


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """Rows of ``run_dir/metrics.csv`` as floats (empty cells as NaN)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise ConfigError(f"{path}: no metrics (is {run_dir} a run directory with a completed epoch?)")
    with path.open(newline="") as fh:
        rows = [{key: _float(value) for key, value in row.items()} for row in csv.DictReader(fh)]
    if not rows:
        raise ConfigError(f"{path}: no epochs recorded yet")
    for key in ("epoch", "lr", "train_loss", "valid_loss"):
        if key not in rows[0]:
            raise ConfigError(f"{path}: column {key!r} missing")
    return rows


def _float(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


def plot_curves(run_dir: str | Path, file: str | Path) -> int:
    """Loss, energy MAE, force MAE (train and valid) and learning rate against epoch, from
    ``run_dir/metrics.csv``, to ``file``; the best epoch is marked. Returns the number of epochs."""
    rows = read_metrics(run_dir)
    plt = _pyplot()
    epoch = np.asarray([r["epoch"] for r in rows])
    best = [r["epoch"] for r in rows if r.get("best") == 1.0]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = (("loss", "loss", True), ("energy_mae", "energy MAE (kcal/mol)", True),
              ("forces_mae", "force MAE (kcal/mol/Å)", True))
    for ax, (key, label, log) in zip(axes.flat, panels):
        for split, style in (("train", "-"), ("valid", "--")):
            values = np.asarray([r.get(f"{split}_{key}", math.nan) for r in rows])
            if np.isfinite(values).any():
                ax.plot(epoch, values, style, marker="o", ms=3, label=split)
        ax.set(ylabel=label, yscale="log" if log else "linear")
        ax.legend(fontsize=8)
    ax = axes[1, 1]
    lr = np.asarray([r["lr"] for r in rows])
    ax.plot(epoch, lr, marker="o", ms=3, color="C2")
    spans_decades = np.isfinite(lr).any() and np.nanmin(lr) > 0 and np.nanmax(lr) / np.nanmin(lr) > 3
    ax.set(ylabel="learning rate", yscale="log" if spans_decades else "linear")
    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if best:
            ax.axvline(best[-1], color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    fig.suptitle(f"{Path(run_dir).name}: {len(rows)} epochs" + (f", best epoch {int(best[-1])} (dotted)" if best else ""),
                 fontsize=10)
    _save(fig, file)
    return len(rows)


def parity_run(run_dir: str | Path, data_path: str | Path, which: str, file: str | Path) -> dict[str, float]:
    """Predict every molecule of ``data_path`` with the run (``packedqdc.train.inference``) and
    draw ``plot_parity`` to ``file``; returns its errors."""
    from ..format import open_packed
    from .inference import predict_packed
    from .predict import Potential

    potential = Potential.load(run_dir, which)
    pred = predict_packed(potential, data_path)
    ds = open_packed(data_path)
    segments = np.repeat(np.arange(pred.n_molecules), pred.N)
    E_linear = potential.reference.molecule_energies(np.asarray(pred.Z), segments, pred.Qtot)
    return plot_parity(np.asarray(ds.E, np.float64), pred.E, E_linear, np.asarray(pred.Z),
                       None if ds.F is None else ds.F, pred.F, file,
                       title=f"{Path(run_dir).name} ({which}, EMA) on {ds.path}")
