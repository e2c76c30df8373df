"""Charge correction and PhysNet's shielded electrostatics, in kcal/mol, Å and e.

Shapes: ``A`` atom slots, ``P`` ordered pair slots, ``M`` molecule slots (flat batch contract of
docs/architecture.md).

Two ways to sum the Coulomb energy: over the batch's pair list (``electrostatic_energy_per_atom``:
exact when the list holds every pair of each molecule), or over every pair of atoms of one molecule
up to ``window`` slots apart in the batch (``banded_electrostatic_energy``: the atoms of a molecule
are contiguous, so a window of at least the largest molecule's size minus one holds all its pairs),
which lets the network use cutoff pair lists while the Coulomb term keeps its full range.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

#: Coulomb constant k_e in kcal·Å/(mol·e²).
COULOMB_CONSTANT = 332.0637
#: k_e / 2: pairs are ordered, so every unordered pair is counted twice.
COULOMB_CONSTANT_HALF = 0.5 * COULOMB_CONSTANT


def switch_function(r: Array, switch_distance: float) -> Array:
    """s(r) = 6y⁵ − 15y⁴ + 10y³ with y = r / switch_distance for r < switch_distance, else 1.

    s(0) = 0, s(switch_distance) = 1, with vanishing first and second derivatives at both ends.
    """
    y = r / switch_distance
    y3 = y * y * y
    poly = 6.0 * y3 * y * y - 15.0 * y3 * y + 10.0 * y3
    return jnp.where(y < 1.0, poly, jnp.ones_like(poly))


def coulomb_kernel(r: Array, cutoff: float) -> Array:
    """PhysNet's shielded Coulomb kernel χ(r), in 1/Å.

    χ(r) = (1 − s(r)) / √(r² + 1) + s(r) / r with s the switch over [0, cutoff/2]: shielded
    (finite, χ(0) = 1) at short range and exactly 1/r for r ≥ cutoff/2. ``cutoff`` is the
    short-range cutoff of the model (Å). ``r`` must be > 0 wherever the result is used with a
    gradient; callers substitute a safe value for masked pairs.
    """
    s = switch_function(r, 0.5 * cutoff)
    shielded = jax.lax.rsqrt(r * r + 1.0)
    # s/r: s ~ 10 (r/rs)^3 near 0, so guard only the r == 0 point itself.
    safe_r = jnp.where(r > 0.0, r, jnp.ones_like(r))
    plain = jnp.where(r > 0.0, s / safe_r, jnp.zeros_like(r))
    return (1.0 - s) * shielded + plain


def correct_charges(charges: Array, batch_segments: Array, atom_mask: Array, total_charge: Array,
                    num_molecules: int) -> Array:
    """Shift atomic charges so that each molecule sums to its total charge.

    q̃_i = q_i − (Σ_{j∈mol} q_j − Q_tot) / N_mol, counting real atoms only.

    charges (A,) e, batch_segments (A,) int32 in [0, M), atom_mask (A,) bool, total_charge (M,) e.
    Returns (A,) e, 0 on padding atoms.
    """
    mask = atom_mask.astype(charges.dtype)
    q = charges * mask
    q_sum = jax.ops.segment_sum(q, batch_segments, num_segments=num_molecules)
    n_mol = jax.ops.segment_sum(mask, batch_segments, num_segments=num_molecules)
    excess = (q_sum - total_charge.astype(charges.dtype)) / jnp.maximum(n_mol, 1.0)
    return (charges - jnp.take(excess, batch_segments, mode="clip")) * mask


def banded_electrostatic_energy(charges: Array, R: Array, batch_segments: Array, atom_mask: Array,
                                 num_molecules: int, window: int, cutoff: float) -> Array:
    """(M,) kcal/mol: k_e Σ_{i<j, same molecule} q_i q_j χ(r_ij) over all pairs of each molecule.

    Pairs are (i, i + k) for k = 1..``window`` over the batch's atom slots, kept when both atoms are
    real and in the same molecule slot: every unordered pair once, with no pair list. Exact when
    every molecule's atoms are contiguous and no molecule has more than ``window + 1`` atoms (the
    caller's to ensure, see ``PhysNet.coulomb_window``). Work and memory O(A · window): for SPICE-
    sized batches (A ~ 2,000 atom slots, window 109) about 0.2 M pair terms, a few MB per array.

    charges (A,) e (corrected; 0 on padding), R (A, 3) Å, batch_segments (A,) int32 in [0, M),
    atom_mask (A,) bool, ``cutoff`` the model's short-range cutoff (for χ's switch).
    """
    num_atoms = R.shape[0]
    i = jnp.arange(num_atoms)[:, None]                                   # (A, 1)
    j = i + jnp.arange(1, window + 1)[None, :]                            # (A, W)
    jc = jnp.minimum(j, num_atoms - 1)
    same = ((j < num_atoms) & (batch_segments[jc] == batch_segments[:, None])
            & atom_mask[:, None] & atom_mask[jc])
    d = jnp.take(R, jc, axis=0) - R[:, None, :]                           # (A, W, 3)
    d2 = jnp.sum(d * d, axis=-1)
    r = jnp.sqrt(jnp.where(same, d2, jnp.ones_like(d2)))                 # safe on masked pairs
    e_pair = COULOMB_CONSTANT * charges[:, None] * jnp.take(charges, jc) * coulomb_kernel(r, cutoff)
    e_atom = jnp.sum(e_pair * same.astype(e_pair.dtype), axis=1)
    return jax.ops.segment_sum(e_atom, batch_segments, num_segments=num_molecules)


def electrostatic_energy_per_atom(charges: Array, r: Array, dst_idx: Array, src_idx: Array,
                                  pair_mask: Array, cutoff: float) -> Array:
    """E_ele,i = (k_e/2) Σ_j q_i q_j χ(r_ij) over real ordered pairs (i = dst, j = src).

    charges (A,) e (corrected), r (P,) Å (safe value on masked pairs), dst/src (P,) int32,
    pair_mask (P,) bool. Returns (A,) kcal/mol.
    """
    qi = jnp.take(charges, dst_idx, mode="clip")
    qj = jnp.take(charges, src_idx, mode="clip")
    e_pair = COULOMB_CONSTANT_HALF * qi * qj * coulomb_kernel(r, cutoff)
    e_pair = e_pair * pair_mask.astype(e_pair.dtype)
    return jax.ops.segment_sum(e_pair, dst_idx, num_segments=charges.shape[0],
                               indices_are_sorted=False)
