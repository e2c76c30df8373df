"""Errors of a trained run on a packed directory, next to the two trivial baselines.

Baselines: the per-element linear regression alone (the run's reference energies, i.e. a model
predicting zero residual) for energies, and zero forces.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import numpy as np

from ..errors import ConfigError
from ..loader import PackedMemmapLoader
from .config import TrainConfig
from .data import LoaderStream
from .loop import evaluate_stream
from .metrics import summarize
from .predict import load_run_state
from .step import loss_weights, make_eval_step


@dataclass(frozen=True)
class EvalResult:
    """kcal/mol and kcal/mol/Å (forces per Cartesian component)."""

    energy_mae: float
    energy_rmse: float
    forces_mae: float
    forces_rmse: float
    n_molecules: int
    baseline_energy_mae: float
    baseline_forces_mae: float

    def summary(self) -> dict[str, float | int]:
        """The five keys of ``packedqdc evaluate --json``."""
        keys = ("energy_mae", "energy_rmse", "forces_mae", "forces_rmse", "n_molecules")
        return {key: asdict(self)[key] for key in keys}


def evaluate_run(run_dir: str | Path, data_path: str | Path, which: str = "best") -> EvalResult:
    """Errors of the ``which`` checkpoint's EMA weights on every molecule of ``data_path``."""
    if not Path(data_path).exists():
        raise ConfigError(f"{data_path}: --data-path does not exist")
    model, state, reference, meta = load_run_state(run_dir, which)
    cfg = meta["config"]
    loader = PackedMemmapLoader(data_path, batch_size=int(cfg["batch_size"]), shuffle=False)
    stream = LoaderStream(loader, reference, layout="packed", num_atoms=int(cfg["num_atoms"]))
    weights = loss_weights(TrainConfig.from_dict(meta["config"]), loader.has_forces)
    eval_step = make_eval_step(model, weights)
    totals = evaluate_stream(eval_step, state.ema_params, stream, jax.device_put)
    metrics = summarize(totals, weights)
    base_e, base_f, n_mol, n_comp = 0.0, 0.0, 0, 0
    for global_batch, _ in stream.epoch():
        mol_mask, atom_mask = global_batch["mol_mask"], global_batch["atom_mask"]
        base_e += float(np.abs(global_batch["E"][mol_mask].astype(np.float64)).sum())
        base_f += float(np.abs(global_batch["F"][atom_mask].astype(np.float64)).sum())
        n_mol += int(mol_mask.sum())
        n_comp += 3 * int(atom_mask.sum())
    forces_ok = loader.has_forces
    return EvalResult(
        energy_mae=metrics["energy_mae"],
        energy_rmse=metrics["energy_rmse"],
        forces_mae=metrics["forces_mae"] if forces_ok else math.nan,
        forces_rmse=metrics["forces_rmse"] if forces_ok else math.nan,
        n_molecules=n_mol,
        baseline_energy_mae=base_e / max(n_mol, 1),
        baseline_forces_mae=base_f / max(n_comp, 1) if forces_ok else math.nan,
    )
