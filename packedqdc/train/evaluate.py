"""Errors of a trained run on a packed directory, next to the two trivial baselines.

Baselines: the per-element linear regression alone (the run's reference energies, i.e. a model
predicting zero residual) for energies, zero forces, and zero dipoles (data with ``D.f64``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import numpy as np

from ..elements import MAX_Z, element_histogram
from ..errors import ConfigError, FormatError, TrainingError
from ..finite import all_finite
from ..format import Z_FILE, PackedDataset
from ..loader import PackedMemmapLoader
from ..model.physnet import cutoff_pairs, with_coulomb_window
from .config import TrainConfig
from .data import LoaderStream
from .loop import evaluate_stream
from .metrics import summarize
from .predict import load_run_state
from .reference import ReferenceEnergies
from .step import loss_weights, make_eval_step


@dataclass(frozen=True)
class EvalResult:
    """kcal/mol and kcal/mol/Å (forces per Cartesian component); dipoles e·Å per Cartesian component
    (NaN when the data has no ``D.f64``)."""

    energy_mae: float
    energy_rmse: float
    forces_mae: float
    forces_rmse: float
    n_molecules: int
    baseline_energy_mae: float
    baseline_forces_mae: float
    dipole_mae: float = math.nan
    dipole_rmse: float = math.nan
    baseline_dipole_mae: float = math.nan

    @property
    def has_dipoles(self) -> bool:
        return math.isfinite(self.dipole_mae)

    def summary(self) -> dict[str, float | int]:
        """The keys of ``packedqdc evaluate --json``: five, plus dipole MAE and RMSE for data with dipoles."""
        keys = ("energy_mae", "energy_rmse", "forces_mae", "forces_rmse", "n_molecules")
        if self.has_dipoles:
            keys += ("dipole_mae", "dipole_rmse")
        return {key: asdict(self)[key] for key in keys}


def evaluate_run(run_dir: str | Path, data_path: str | Path, which: str = "best") -> EvalResult:
    """Errors of the ``which`` checkpoint's EMA weights on every molecule of ``data_path``.

    Refused with a one-line error, before any prediction: atomic numbers outside 1..118, elements
    the run never trained on (its predictions for them mean nothing), non-finite positions,
    energies or forces in the data (named by molecule), and non-finite predictions.
    """
    data_path = Path(data_path)
    if not data_path.exists():
        raise ConfigError(f"{data_path}: --data-path does not exist")
    model, state, reference, meta = load_run_state(run_dir, which)
    cfg = meta["config"]
    loader = PackedMemmapLoader(data_path, batch_size=int(cfg["batch_size"]), shuffle=False)
    check_elements(loader.dataset, reference)
    model = with_coulomb_window(model, int(loader.n_atoms.max(initial=1)))
    stream = LoaderStream(loader, reference, layout="packed", num_atoms=int(cfg["num_atoms"]),
                          cutoff=cutoff_pairs(model))  # the pairs the run trained on
    weights = loss_weights(TrainConfig.from_dict(meta["config"]), loader.has_forces, loader.has_dipoles)
    eval_step = make_eval_step(model, weights)
    baseline = _Baseline(loader.dataset)
    totals = evaluate_stream(eval_step, state.ema_params, stream, jax.device_put, on_batch=baseline.add)
    metrics = summarize(totals, weights)
    if not math.isfinite(metrics["energy_mae"]) or (loader.has_forces and not math.isfinite(metrics["forces_mae"])):
        raise TrainingError(f"{run_dir}: non-finite predictions on {data_path} (energy MAE "
                            f"{metrics['energy_mae']}); the {which} checkpoint's weights or the geometries "
                            "are broken (atoms on top of each other?)")
    forces_ok = loader.has_forces
    dipoles_ok = loader.has_dipoles and totals["n_dip"] > 0
    return EvalResult(
        energy_mae=metrics["energy_mae"],
        energy_rmse=metrics["energy_rmse"],
        forces_mae=metrics["forces_mae"] if forces_ok else math.nan,
        forces_rmse=metrics["forces_rmse"] if forces_ok else math.nan,
        n_molecules=baseline.n_mol,
        baseline_energy_mae=baseline.e / max(baseline.n_mol, 1),
        baseline_forces_mae=baseline.f / max(baseline.n_comp, 1) if forces_ok else math.nan,
        dipole_mae=metrics["dipole_mae"] if dipoles_ok else math.nan,
        dipole_rmse=math.sqrt(totals["d_sq"] / (3 * totals["n_dip"])) if dipoles_ok else math.nan,
        baseline_dipole_mae=baseline.d / max(3 * baseline.n_mol, 1) if dipoles_ok else math.nan,
    )


def check_elements(data: PackedDataset, reference: ReferenceEnergies) -> None:
    """One streaming pass over ``Z``: atomic numbers in 1..118 and all known to the model."""
    counts = element_histogram(data.Z)
    invalid = int(counts[0] + counts[-1])
    if invalid:
        raise FormatError(f"{data.path / Z_FILE}: {invalid} atomic number(s) outside 1..{MAX_Z}; "
                          f"run 'packedqdc validate {data.path}'")
    reference.check_elements(np.flatnonzero(counts), where=str(data.path))


class _Baseline:
    """Error sums of the trivial baselines (reference energies alone, zero forces), gathered from
    the batches the evaluation already reads; also refuses non-finite inputs, by molecule."""

    def __init__(self, data: PackedDataset) -> None:
        self.data = data
        self.e = self.f = self.d = 0.0
        self.n_mol = self.n_comp = 0

    def add(self, global_batch: dict[str, np.ndarray], mol_idx: np.ndarray) -> None:
        mol_mask, atom_mask = global_batch["mol_mask"], global_batch["atom_mask"]
        energies = global_batch["E"][mol_mask].astype(np.float64)
        forces = global_batch["F"][atom_mask].astype(np.float64)
        if not (all_finite(energies) and all_finite(forces) and all_finite(global_batch["R"])):
            self._name_bad_molecule(mol_idx)
        self.e += float(np.abs(energies).sum())
        self.f += float(np.abs(forces).sum())
        if "D" in global_batch:
            self.d += float(np.abs(global_batch["D"][mol_mask].astype(np.float64)).sum())
        self.n_mol += int(mol_mask.sum())
        self.n_comp += 3 * int(atom_mask.sum())

    def _name_bad_molecule(self, mol_idx: np.ndarray) -> None:
        for i in mol_idx:
            molecule = self.data.molecule(int(i))
            for name, value in (("R", molecule["R"]), ("E", molecule["E"]), ("F", molecule["F"])):
                if value is not None and not np.isfinite(value).all():
                    raise FormatError(f"{self.data.path}: molecule {int(i)}: non-finite {name}; "
                                      f"run 'packedqdc validate {self.data.path}'")
