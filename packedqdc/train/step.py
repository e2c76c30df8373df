"""Pure, jitted train and eval steps on global batches, and the host-side batch preparation.

Host side (numpy, float64 where it matters): ``prepare_batch`` subtracts the reference energies in
float64 and casts the residual targets to float32; ``stack_global`` adds the leading device axis.
Device side: ``make_train_step`` / ``make_eval_step`` close over the model and the loss settings and
are compiled once per shape class of the global batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..model.physnet import PhysNet
from ..units import EV_TO_KCAL_MOL
from .config import TrainConfig
from .loss import LossWeights, global_batch_sums, loss_from_sums
from .optim import ema_update, learning_rate, make_optimizer
from .reference import ReferenceEnergies
from .state import TrainState

#: Keys of a prepared batch, with their device dtypes.
DEVICE_KEYS: dict[str, Any] = {
    "Z": np.int32, "R": np.float32, "F": np.float32, "atom_mask": bool, "batch_segments": np.int32,
    "E": np.float32, "Qtot": np.float32, "N": np.int32, "mol_mask": bool,
    "dst_idx": np.int32, "src_idx": np.int32, "pair_mask": bool,
}

Sums = dict[str, jax.Array]
#: Optional key of a global batch: (D,) float32, the run's progress in [0, 1] for the learning-rate
#: schedule (``optim.schedule_progress``), the same value for every device.
PROGRESS_KEY = "schedule_progress"


def loss_weights(cfg: TrainConfig, has_forces: bool = True, has_dipoles: bool = False) -> LossWeights:
    """The loss settings of ``cfg``; the force term is dropped for data without forces, the dipole
    term for data without dipoles.

    The errors come in kcal/mol; with ``loss_unit="ev"`` the energy and force terms are converted
    to eV (÷ 23.06 for "mae", ÷ 23.06² for "mse"). The charge and nh weights are energies in the
    loss unit; unset, they are PhysNet's (14.40 eV per e, 0.01 eV) in that unit, so the balance of
    the terms is PhysNet's in either unit.
    """
    unit = 1.0 if cfg.loss_unit == "kcal/mol" else 1.0 / EV_TO_KCAL_MOL
    scale = unit if cfg.loss == "mae" else unit * unit
    charge, nh = cfg.loss_term_weights()
    dipole = cfg.dipole_term_weight()
    return LossWeights(energy=cfg.energy_weight * scale, forces=cfg.forces_weight * scale if has_forces else 0.0,
                       charge=charge, nh=nh, kind=cfg.loss, dipole=dipole if has_dipoles else 0.0)


def prepare_batch(batch: Mapping[str, np.ndarray], reference: ReferenceEnergies) -> dict[str, np.ndarray]:
    """A loader batch -> the arrays the steps take (host numpy, no device axis).

    ``E`` becomes the float32 residual ``E - reference`` (computed in float64; 0 on padding slots),
    ``Qtot`` float32 (0 when the batch has none), ``D`` (dipoles, when the batch has them) float32.
    Other keys are cast to ``DEVICE_KEYS`` dtypes; keys the steps do not use (``mol_idx``) are dropped.
    """
    mol_mask = np.asarray(batch["mol_mask"], dtype=bool)
    qtot = np.asarray(batch["Qtot"], dtype=np.float64) if batch.get("Qtot") is not None \
        else np.zeros(mol_mask.shape[0])
    e_ref = reference.molecule_energies(batch["Z"], batch["batch_segments"], qtot)
    residual = np.where(mol_mask, np.asarray(batch["E"], dtype=np.float64) - e_ref, 0.0)
    out = {key: np.asarray(batch[key], dtype=dtype) for key, dtype in DEVICE_KEYS.items()
           if key not in ("E", "Qtot")}
    out["E"] = residual.astype(np.float32)
    out["Qtot"] = qtot.astype(np.float32)
    if batch.get("D") is not None:
        out["D"] = np.where(mol_mask[:, None], np.asarray(batch["D"], dtype=np.float64), 0.0).astype(np.float32)
    return out


def stack_global(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack ``D`` prepared sub-batches of one shape class into a global batch (leading axis D)."""
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


def prepare_global(global_batch: Mapping[str, np.ndarray], reference: ReferenceEnergies) -> dict[str, np.ndarray]:
    """``prepare_batch`` of each sub-batch of a loader global batch (leading axis D), restacked."""
    d = int(np.shape(global_batch["Z"])[0])
    return stack_global([prepare_batch({k: v[i] for k, v in global_batch.items()}, reference) for i in range(d)])


@functools.lru_cache(maxsize=8)
def make_train_step(model: PhysNet, cfg: TrainConfig, weights: LossWeights
                    ) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, Sums]]:
    """Jitted ``step(state, global_batch) -> (state, sums)`` with the optimiser of ``cfg``.

    ``sums`` holds the error sums of the global batch under the parameters *before* the update,
    plus ``loss`` (the minimised value) and ``lr`` (the learning rate used). Cached on its
    (hashable) arguments, so runs of one configuration in a process share compiled code.
    """
    optimizer = make_optimizer(cfg)

    def step(state: TrainState, global_batch: Mapping[str, jax.Array]) -> tuple[TrainState, Sums]:
        def objective(params: Any) -> tuple[jax.Array, Sums]:
            sums = global_batch_sums(model, params, global_batch)
            return loss_from_sums(sums, weights), sums

        (loss, sums), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        direction, opt_state = optimizer.update(grads, state.opt_state, state.params)
        # the host's schedule progress rides with the batch, one copy per device (PROGRESS_KEY)
        progress = jnp.max(global_batch[PROGRESS_KEY]) if PROGRESS_KEY in global_batch else 0.0
        lr = learning_rate(cfg, state.step, state.lr_scale, progress)
        params = jax.tree.map(lambda p, u: p - lr * u, state.params, direction)
        new_state = state.replace(
            params=params,
            opt_state=opt_state,
            ema_params=ema_update(state.ema_params, params, state.step, cfg.ema_decay),
            step=state.step + 1,
        )
        return new_state, {**sums, "loss": loss, "lr": jnp.asarray(lr, jnp.float32)}

    return jax.jit(step)


@functools.lru_cache(maxsize=8)
def make_eval_step(model: PhysNet, weights: LossWeights) -> Callable[[Any, Mapping[str, jax.Array]], Sums]:
    """Jitted ``eval(params, global_batch) -> sums`` (with ``loss``); pass the EMA parameters."""

    def evaluate(params: Any, global_batch: Mapping[str, jax.Array]) -> Sums:
        sums = global_batch_sums(model, params, global_batch)
        return {**sums, "loss": loss_from_sums(sums, weights)}

    return jax.jit(evaluate)
