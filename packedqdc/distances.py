"""The closest pair of atoms in each molecule, for ``validate``'s duplicated-atom check.

Two atoms of one molecule at (nearly) the same place are corrupt data: duplicated atoms, or
padding counted as atoms. Every model with a 1/r term (PhysNet's electrostatics and ZBL
repulsion) or a gradient of |r| turns such a molecule into an infinite or NaN loss, hours into a
run; ``validate`` finds it (``checks.MIN_ATOM_DISTANCE``; ``pack`` leaves it out, see there).
Compiled with numba (``cache=True``); importing this module imports numba, so ``validate``
imports it only when it runs the check.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _closest_sq(offsets: np.ndarray, R: np.ndarray, out: np.ndarray) -> None:
    for m in range(out.shape[0]):
        lo, hi = offsets[m], offsets[m + 1]
        best = np.inf
        for i in range(lo, hi):
            xi, yi, zi = R[i, 0], R[i, 1], R[i, 2]
            for j in range(i + 1, hi):
                dx, dy, dz = R[j, 0] - xi, R[j, 1] - yi, R[j, 2] - zi
                d2 = dx * dx + dy * dy + dz * dz
                if d2 < best:
                    best = d2
        out[m] = best


def closest_pair_distances(offsets: np.ndarray, R: np.ndarray) -> np.ndarray:
    """(m,) float64 distance (units of ``R``) of the closest pair of atoms of each molecule.

    Args:
        offsets: (m + 1,) integer atom offsets of the molecules in ``R``, from 0.
        R: (offsets[-1], 3) float32 or float64 positions (computed in their own precision: the
            values as stored).

    Returns:
        inf for a molecule of one atom; NaN comparisons never count as close (a non-finite
        position is its own check).
    """
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    R = np.ascontiguousarray(R)
    out = np.empty(offsets.shape[0] - 1, dtype=np.float64)
    _closest_sq(offsets, R, out)
    return np.sqrt(out)


__all__ = ["closest_pair_distances"]
