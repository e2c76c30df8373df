"""Charge correction and PhysNet's shielded electrostatics, in kcal/mol, Å and e.

Shapes: ``A`` atom slots, ``P`` ordered pair slots, ``M`` molecule slots (flat batch contract of
docs/architecture.md).
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
