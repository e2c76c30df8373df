"""PhysNet's loss on a global batch, as sums that add up across sub-batches (devices).

A *global batch* is a batch dict of docs/architecture.md whose arrays carry a leading device axis
``D`` (``D = 1`` on one device). Each sub-batch yields error **sums** and counts; the loss is the sum
over sub-batches divided by the totals of the global batch, so ``D`` devices holding ``D``
sub-batches compute exactly the loss of one device holding all of them.

Loss (``kind="mae"``, PhysNet's L1; ``"mse"`` squares each error instead)::

    L = w_E Σ|ΔE| / n_mol + w_F Σ|ΔF| / (3 n_atoms) + w_Q Σ|Σq - Qtot| / n_mol
        + w_D Σ|Δμ| / (3 n_dip) + λ_nh · nh

with ΔE in kcal/mol (target: E minus the reference energy), ΔF in kcal/mol/Å (per Cartesian
component), Σq the model's uncorrected total charge (e), Δμ the error of the model's dipole
Σ q̃_i (R_i − centroid) against the data's ``D`` (e·Å, per Cartesian component; ``n_dip``
molecules have one: all real molecules of a batch with ``D``, none otherwise) and ``nh`` the
non-hierarchicality penalty averaged over real atoms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from ..model.physnet import PhysNet, energy_and_forces

#: Keys of the per-(sub-)batch sums, all float32 scalars.
SUM_KEYS = ("n_mol", "n_atoms", "e_abs", "e_sq", "e_abs_pa", "e_sq_pa", "f_abs", "f_sq",
            "q_abs", "q_sq", "n_dip", "d_abs", "d_sq", "nh")


@dataclass(frozen=True)
class LossWeights:
    """Weights and form of the loss (hashable: a static argument of the jitted steps)."""

    energy: float
    forces: float
    charge: float
    nh: float
    kind: str = "mae"
    dipole: float = 0.0


def batch_sums(model: PhysNet, params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Error sums of one sub-batch (no device axis).

    ``batch["E"]`` must already be the float32 residual target (E - reference, kcal/mol) and
    ``batch["Qtot"]`` float32; ``batch["D"]`` (M, 3) float32 e·Å is optional. Returns the scalars of
    ``SUM_KEYS``: counts of real molecules and atoms; Σ|ΔE|, ΔE², Σ|ΔE/N|, Σ(ΔE/N)² over molecules;
    Σ|ΔF|, ΣΔF² over atom components; Σ|ΔQ|, ΣΔQ² over molecules; the molecules with a dipole
    target and Σ|Δμ|, ΣΔμ² over their components (zeros without ``D``); the nh penalty times n_atoms.
    """
    energy, forces, aux = energy_and_forces(model, params, batch)
    mol_mask = batch["mol_mask"].astype(jnp.float32)
    atom_mask = batch["atom_mask"].astype(jnp.float32)
    n_per_mol = jnp.maximum(batch["N"].astype(jnp.float32), 1.0)
    d_e = (energy - batch["E"]) * mol_mask
    d_e_pa = d_e / n_per_mol
    d_f = (forces - batch["F"]) * atom_mask[:, None]
    d_q = (aux["sum_charges"] - batch["Qtot"]) * mol_mask
    n_atoms = jnp.sum(atom_mask)
    if batch.get("D") is not None:
        d_mu = (aux["dipole"] - batch["D"]) * mol_mask[:, None]
        n_dip = jnp.sum(mol_mask)
    else:
        d_mu = jnp.zeros((1, 3), energy.dtype)
        n_dip = jnp.zeros((), energy.dtype)
    return {
        "n_mol": jnp.sum(mol_mask),
        "n_atoms": n_atoms,
        "e_abs": jnp.sum(jnp.abs(d_e)),
        "e_sq": jnp.sum(d_e * d_e),
        "e_abs_pa": jnp.sum(jnp.abs(d_e_pa)),
        "e_sq_pa": jnp.sum(d_e_pa * d_e_pa),
        "f_abs": jnp.sum(jnp.abs(d_f)),
        "f_sq": jnp.sum(d_f * d_f),
        "q_abs": jnp.sum(jnp.abs(d_q)),
        "q_sq": jnp.sum(d_q * d_q),
        "n_dip": n_dip,
        "d_abs": jnp.sum(jnp.abs(d_mu)),
        "d_sq": jnp.sum(d_mu * d_mu),
        "nh": aux["nh_loss"] * n_atoms,
    }


def global_batch_sums(model: PhysNet, params: Any, global_batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """``batch_sums`` of each sub-batch along the leading device axis (vmap), summed over it."""
    per_device = jax.vmap(lambda b: batch_sums(model, params, b))(dict(global_batch))
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), per_device)


def loss_from_sums(sums: Mapping[str, Any], weights: LossWeights) -> Any:
    """The loss from (accumulated) sums; works on jax arrays and on host floats alike."""
    n_mol = jnp.maximum(sums["n_mol"], 1.0)
    n_atoms = jnp.maximum(sums["n_atoms"], 1.0)
    suffix = "abs" if weights.kind == "mae" else "sq"
    loss = (weights.energy * sums[f"e_{suffix}"] / n_mol
            + weights.forces * sums[f"f_{suffix}"] / (3.0 * n_atoms)
            + weights.charge * sums[f"q_{suffix}"] / n_mol
            + weights.nh * sums["nh"] / n_atoms)
    if weights.dipole:
        loss = loss + weights.dipole * sums[f"d_{suffix}"] / (3.0 * jnp.maximum(sums["n_dip"], 1.0))
    return loss
