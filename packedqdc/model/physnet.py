"""PhysNet (Unke & Meuwly, JCTC 2019) in flax.linen, in kcal/mol, Å and e.

The model consumes the flat batch of docs/architecture.md: ``A`` atom slots, ``M`` molecule slots,
``P`` ordered pair slots, with ``atom_mask`` and ``pair_mask`` marking the real ones. Padding atoms
and masked pairs contribute exactly nothing to any output. See docs/model.md.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from packedqdc.model.electrostatics import (
    banded_electrostatic_energy,
    correct_charges,
    electrostatic_energy_per_atom,
)
from packedqdc.model.layers import (
    ExpNormalRBF,
    InteractionBlock,
    OutputBlock,
    uniform_sqrt3,
)

Array = jax.Array
Dtype = Any
ElementInit = Union[float, Sequence[float]]

#: Batch keys the model reads (``Qtot`` is optional: missing means neutral molecules).
MODEL_INPUT_KEYS = ("Z", "R", "dst_idx", "src_idx", "batch_segments", "atom_mask", "pair_mask",
                    "Qtot")


def _element_table_init(value: ElementInit, num_rows: int):
    """Initialiser for a per-element table (num_rows,) float32 from a scalar or a sequence."""

    def init(_key: Array) -> Array:
        arr = np.asarray(value, dtype=np.float32)
        if arr.ndim == 0:
            return jnp.full((num_rows,), arr, dtype=jnp.float32)
        if arr.shape != (num_rows,):
            raise ValueError(f"per-element init has shape {arr.shape}, expected ({num_rows},)")
        return jnp.asarray(arr)

    return init


class PhysNet(nn.Module):
    """PhysNet energy/charge model.

    Fields (defaults):
      features (128): feature width F.
      num_basis (64): number of radial basis functions K.
      cutoff (5.0 Å): short-range cutoff of the RBF; the electrostatic switch goes from the
        shielded to the plain 1/r kernel over [0, cutoff/2].
      num_iterations (3): number of modules (interaction block + output block). PhysNet's default
        is 5; 3 is the seed's default.
      num_res_atomic (2), num_res_interaction (3), num_res_output (1): residual layers per block.
      max_z (118): largest atomic number; tables have max_z + 1 rows (row 0 = padding, whose
        outputs are always masked). Z outside [0, max_z] is clipped, so keep data inside it.
      electrostatics (True): add the shielded Coulomb energy of the corrected charges.
      energy_scale_init (1.0), energy_shift_init (0.0): initial per-element scale s^E and shift
        μ^E of the atomic energies (kcal/mol); a scalar (all elements) or a sequence of max_z + 1.
        PhysNet sets them to the std and mean of E/N over the training set.
      charge_scale_init (1.0), charge_shift_init (0.0): same for atomic charges (e).
      natoms (60): accepted for the seed's ``EF`` API; not used for shapes.
      charge_embedding (False): add to each atom's initial features the molecule's total charge
        per atom, q̄ = Qtot/N, through two learned vectors (one for q̄ > 0, one for q̄ < 0; zero at
        initialisation), so that atoms can tell a cation from an anion from a neutral molecule (a
        simple form of SpookyNet's electronic embedding). Without it atoms see Qtot only through
        the charge correction.
      coulomb_window (0): 0: the Coulomb term sums over the batch's pair list, which must then hold
        every pair of each molecule (all-pairs lists). k > 0: it sums over every pair of atoms of a
        molecule at most k slots apart in the batch (``banded_electrostatic_energy``), so the pair
        list may be a cutoff list (the network needs no pair beyond ``cutoff``: its radial basis
        vanishes there) while Coulomb keeps its full range. k must be at least the largest
        molecule's atom count minus one; it only sets shapes (``with_coulomb_window``), never
        parameters. A model with k > 0 is fed cutoff pair lists (``cutoff_pairs``).
      dtype (float32): compute dtype. Parameters are always stored in float32.
      precision ("highest"): matmul precision of the dense layers (a ``jax.lax.Precision`` or its
        name). "highest" keeps true float32 on GPUs whose default is TF32; None uses JAX's
        default (faster on Ampere/Hopper, ~1e-4 relative error in energies).

    Call: see ``__call__``. Returns a dict (see ``__call__``).
    """

    features: int = 128
    num_basis: int = 64
    cutoff: float = 5.0
    num_iterations: int = 3
    num_res_atomic: int = 2
    num_res_interaction: int = 3
    num_res_output: int = 1
    max_z: int = 118
    electrostatics: bool = True
    energy_scale_init: ElementInit = 1.0
    energy_shift_init: ElementInit = 0.0
    charge_scale_init: ElementInit = 1.0
    charge_shift_init: ElementInit = 0.0
    natoms: int = 60
    charge_embedding: bool = False
    coulomb_window: int = 0
    dtype: Dtype = jnp.float32
    precision: Any = "highest"

    def return_attributes(self) -> dict[str, Any]:
        """The constructor fields as a plain dict (for checkpoints); ``dtype`` as a string."""
        out = {}
        for name in ("features", "num_basis", "cutoff", "num_iterations", "num_res_atomic",
                     "num_res_interaction", "num_res_output", "max_z", "electrostatics",
                     "energy_scale_init", "energy_shift_init", "charge_scale_init",
                     "charge_shift_init", "natoms", "charge_embedding", "coulomb_window", "precision"):
            value = getattr(self, name)
            if isinstance(value, (tuple, list)):
                value = list(value)
            elif name == "precision" and value is not None and not isinstance(value, str):
                value = str(value)
            out[name] = value
        out["dtype"] = jnp.dtype(self.dtype).name
        return out

    @nn.compact
    def __call__(self, Z: Array, R: Array, dst_idx: Array, src_idx: Array,
                 batch_segments: Array, atom_mask: Array, pair_mask: Array,
                 Qtot: Array | None = None, num_molecules: int | None = None) -> dict[str, Array]:
        """Forward pass on a flat batch.

        Args:
          Z: (A,) int, atomic numbers (0 on padding atoms).
          R: (A, 3) float, positions in Å.
          dst_idx, src_idx: (P,) int, ordered pairs i = dst, j = src inside one molecule; any
            valid index (even dst == src) on masked pairs.
          batch_segments: (A,) int in [0, M), molecule slot of each atom.
          atom_mask: (A,) bool, real atoms.
          pair_mask: (P,) bool, real pairs.
          Qtot: (M,) float, total charge per molecule slot in e; None means all zero.
          num_molecules: static M; defaults to ``Qtot.shape[0]`` (one of the two is required).

        Returns a dict (all in ``dtype``, float32 by default):
          energy: (M,) kcal/mol, total energy per molecule slot (0 for empty slots).
          atomic_energy: (A,) kcal/mol, s^E_Z Σ_m E_i^m + μ^E_Z (0 on padding atoms); excludes
            electrostatics.
          electrostatic_energy: (M,) kcal/mol (zeros when ``electrostatics`` is False).
          charges: (A,) e, corrected charges q̃ (sum per molecule = Qtot; 0 on padding).
          charges_uncorrected: (A,) e, s^Q_Z Σ_m q_i^m + μ^Q_Z (0 on padding).
          sum_charges: (M,) e, per-molecule sum of the uncorrected charges (PhysNet's charge
            loss compares this with Qtot).
          dipole: (M, 3) e·Å, Σ_i q̃_i (R_i − c) over the molecule's atoms, with c the molecule's
            centroid (mean atom position): PhysNet's dipole of the corrected charges, taken about
            the centroid so that an ion's dipole does not depend on where it sits (the packed
            format's ``D.f64`` convention; 0 for empty slots).
          nh_loss: () non-hierarchicality penalty Σ_{m≥1} mean((o^m)² / ((o^m)² + (o^{m−1})² +
            1e−7)), the mean over real atoms and both output channels.
        """
        if num_molecules is None:
            if Qtot is None:
                raise ValueError("PhysNet: pass num_molecules or Qtot")
            num_molecules = int(Qtot.shape[0])
        num_molecules = int(num_molecules)
        dt = self.dtype
        kw = {"dtype": dt, "precision": self.precision}
        num_atoms = Z.shape[0]

        Z = jnp.asarray(Z).astype(jnp.int32)
        R = jnp.asarray(R).astype(dt)
        dst_idx = jnp.asarray(dst_idx).astype(jnp.int32)
        src_idx = jnp.asarray(src_idx).astype(jnp.int32)
        batch_segments = jnp.asarray(batch_segments).astype(jnp.int32)
        atom_mask = jnp.asarray(atom_mask).astype(bool)
        pair_mask = jnp.asarray(pair_mask).astype(bool)
        if Qtot is None:
            Qtot = jnp.zeros((num_molecules,), dt)
        Qtot = jnp.asarray(Qtot).astype(dt)
        amask = atom_mask.astype(dt)
        pmask = pair_mask.astype(dt)

        # Geometry: distances that are safe (no NaN value or gradient) on masked pairs.
        rij = jnp.take(R, src_idx, axis=0, mode="clip") - jnp.take(R, dst_idx, axis=0, mode="clip")
        d2 = jnp.sum(rij * rij, axis=-1)
        r = jnp.sqrt(jnp.where(pair_mask, d2, jnp.ones_like(d2)))              # (P,) Å

        rbf = ExpNormalRBF(self.num_basis, self.cutoff, dtype=dt, name="rbf")(r)  # (P, K)
        rbf = rbf * pmask[:, None]

        num_rows = self.max_z + 1
        emb = self.param("embeddings", uniform_sqrt3, (num_rows, self.features), jnp.float32)
        x = jnp.take(emb.astype(dt), Z, axis=0, mode="clip")                    # (A, F)
        if self.charge_embedding:
            n_mol = jax.ops.segment_sum(amask, batch_segments, num_segments=num_molecules)
            share = (Qtot / jnp.maximum(n_mol, 1.0))[batch_segments] * amask    # (A,) e per atom
            k_pos = self.param("charge_embedding_positive", nn.initializers.zeros, (self.features,), jnp.float32)
            k_neg = self.param("charge_embedding_negative", nn.initializers.zeros, (self.features,), jnp.float32)
            x = (x + jnp.maximum(share, 0.0)[:, None] * k_pos.astype(dt)
                 + jnp.maximum(-share, 0.0)[:, None] * k_neg.astype(dt))

        out_sum = jnp.zeros((num_atoms, 2), dt)
        nh_loss = jnp.zeros((), dt)
        n_real = jnp.maximum(jnp.sum(amask), 1.0)
        prev_sq = None
        for m in range(self.num_iterations):
            x = InteractionBlock(self.features, self.num_res_atomic, self.num_res_interaction,
                                 **kw, name=f"interaction_block_{m}")(x, rbf, dst_idx, src_idx)
            out = OutputBlock(self.features, self.num_res_output, **kw,
                              name=f"output_block_{m}")(x)                      # (A, 2)
            out = out * amask[:, None]
            out_sum = out_sum + out
            sq = out * out
            if prev_sq is not None:
                ratio = sq / (sq + prev_sq + 1e-7)
                nh_loss = nh_loss + jnp.sum(ratio * amask[:, None]) / (2.0 * n_real)
            prev_sq = sq

        e_scale = self.param("energy_scale", _element_table_init(self.energy_scale_init, num_rows))
        e_shift = self.param("energy_shift", _element_table_init(self.energy_shift_init, num_rows))
        q_scale = self.param("charge_scale", _element_table_init(self.charge_scale_init, num_rows))
        q_shift = self.param("charge_shift", _element_table_init(self.charge_shift_init, num_rows))

        def per_element(table: Array) -> Array:
            return jnp.take(table.astype(dt), Z, mode="clip")

        atomic_energy = (per_element(e_scale) * out_sum[:, 0] + per_element(e_shift)) * amask
        charges_raw = (per_element(q_scale) * out_sum[:, 1] + per_element(q_shift)) * amask
        sum_charges = jax.ops.segment_sum(charges_raw, batch_segments, num_segments=num_molecules)
        charges = correct_charges(charges_raw, batch_segments, atom_mask, Qtot, num_molecules)
        dipole = molecular_dipoles(charges, R, batch_segments, atom_mask, num_molecules)

        if self.electrostatics and self.coulomb_window > 0:
            e_ele = banded_electrostatic_energy(charges, R, batch_segments, atom_mask, num_molecules,
                                                int(self.coulomb_window), self.cutoff)
        elif self.electrostatics:
            e_ele_atom = electrostatic_energy_per_atom(charges, r, dst_idx, src_idx, pair_mask,
                                                       self.cutoff) * amask
            e_ele = jax.ops.segment_sum(e_ele_atom, batch_segments, num_segments=num_molecules)
        else:
            e_ele = jnp.zeros((num_molecules,), dt)

        energy = jax.ops.segment_sum(atomic_energy, batch_segments,
                                     num_segments=num_molecules) + e_ele
        return {
            "energy": energy,
            "atomic_energy": atomic_energy,
            "electrostatic_energy": e_ele,
            "charges": charges,
            "charges_uncorrected": charges_raw,
            "sum_charges": sum_charges,
            "dipole": dipole,
            "nh_loss": nh_loss,
        }


def molecular_dipoles(charges: Array, R: Array, batch_segments: Array, atom_mask: Array,
                      num_molecules: int) -> Array:
    """(M, 3) e·Å dipoles Σ_i q_i (R_i − c_m) about each molecule's centroid c_m.

    Args: charges (A,) e (0 on padding); R (A, 3) Å; batch_segments (A,) molecule slots;
    atom_mask (A,) bool; num_molecules M (static).
    """
    amask = atom_mask.astype(R.dtype)
    count = jax.ops.segment_sum(amask, batch_segments, num_segments=num_molecules)
    centroid = jax.ops.segment_sum(R * amask[:, None], batch_segments, num_segments=num_molecules)
    centroid = centroid / jnp.maximum(count, 1.0)[:, None]
    arm = (R - centroid[batch_segments]) * amask[:, None]
    return jax.ops.segment_sum(charges[:, None] * arm, batch_segments, num_segments=num_molecules)


#: The seed's name for the model: ``EF(features=128, num_iterations=3, cutoff=5.0, natoms=60)``.
EF = PhysNet


def cutoff_pairs(model: PhysNet) -> float | None:
    """The pair-list cutoff (Å) a model is fed: its ``cutoff`` when it computes Coulomb over every
    pair by itself (``coulomb_window > 0``), else None (all ordered pairs of each molecule)."""
    return float(model.cutoff) if model.coulomb_window > 0 else None


def with_coulomb_window(model: PhysNet, max_atoms: int) -> PhysNet:
    """``model`` able to take molecules of up to ``max_atoms`` atoms: a model on cutoff pair lists
    gets a Coulomb window of at least ``max_atoms - 1`` (the parameters are unchanged); a model on
    all-pairs lists is returned as it is."""
    if model.coulomb_window <= 0 or model.coulomb_window >= max_atoms - 1:
        return model
    return model.clone(coulomb_window=int(max_atoms) - 1)


# --------------------------------------------------------------------------------------------------
# batch-dict helpers (pure functions; jit them with the model as a static argument)


def _num_molecules(batch: Mapping[str, Any]) -> int:
    for key in ("Qtot", "mol_mask", "N", "E"):
        if batch.get(key) is not None:
            return int(np.shape(batch[key])[0])
    raise KeyError("batch: cannot tell the number of molecule slots (no Qtot, mol_mask, N or E)")


def _model_args(batch: Mapping[str, Any], R: Array | None = None) -> tuple:
    return (batch["Z"], batch["R"] if R is None else R, batch["dst_idx"], batch["src_idx"],
            batch["batch_segments"], batch["atom_mask"], batch["pair_mask"], batch.get("Qtot"))


def init_params(model: PhysNet, rng: Array, batch: Mapping[str, Any]) -> Any:
    """Initialise parameters on a batch dict (any batch of the contract; shapes don't matter)."""
    return model.init(rng, *_model_args(batch), num_molecules=_num_molecules(batch))


def predict(model: PhysNet, params: Any, batch: Mapping[str, Any]) -> dict[str, Array]:
    """``model.apply`` on a batch dict of the contract; returns the model's output dict."""
    return model.apply(params, *_model_args(batch), num_molecules=_num_molecules(batch))


def energy_and_forces(model: PhysNet, params: Any, batch: Mapping[str, Any]
                      ) -> tuple[Array, Array, dict[str, Array]]:
    """Energies and forces on a batch dict.

    Returns ``(energy, forces, aux)``: energy (M,) kcal/mol; forces (A, 3) kcal/mol/Å =
    −∂(Σ energy)/∂R, 0 on padding atoms; aux the full output dict of ``PhysNet.__call__``.
    Pure and jit-friendly: ``jax.jit(energy_and_forces, static_argnums=0)``.
    """
    num_molecules = _num_molecules(batch)
    R = jnp.asarray(batch["R"]).astype(model.dtype)

    def total_energy(pos: Array):
        out = model.apply(params, *_model_args(batch, pos), num_molecules=num_molecules)
        return jnp.sum(out["energy"]), out

    grad, aux = jax.grad(total_energy, has_aux=True)(R)
    mask = jnp.asarray(batch["atom_mask"]).astype(grad.dtype)
    forces = -grad * mask[:, None]
    return aux["energy"], forces, aux


def charge_sum(aux: Mapping[str, Array]) -> Array:
    """(M,) e: per-molecule sum of the uncorrected charges from an output dict (PhysNet's charge
    loss is |charge_sum − Qtot|; the corrected charges sum to Qtot by construction)."""
    return aux["sum_charges"]
