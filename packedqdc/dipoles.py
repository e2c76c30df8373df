"""Dipole moments on the host: the origin convention of the packed format (``D.f64``).

The format stores each molecule's dipole about its **centroid** (the unweighted mean position of
its atoms). For a neutral molecule the origin does not matter; for an ion it does: a dipole taken
about the point ``c`` differs from one about the coordinate origin by ``-Qtot * c``. xTB (tblite)
reports ions' dipoles about the coordinate origin, so they change when the molecule is moved;
:func:`about_centroid` converts such values. The model's dipole output uses the same centroid
(``packedqdc.model.physnet``), so predictions and stored values compare directly.
"""

from __future__ import annotations

import numpy as np


def centroids(R: np.ndarray, n_atoms: np.ndarray) -> np.ndarray:
    """(m, 3) float64 mean position (Å) of each molecule's atoms.

    Args:
        R: (sum n_atoms, 3) positions, Å, molecule after molecule.
        n_atoms: (m,) atoms per molecule, each >= 1.
    """
    counts = np.asarray(n_atoms, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    sums = np.add.reduceat(np.asarray(R, dtype=np.float64), starts, axis=0) if counts.size else np.zeros((0, 3))
    return sums / np.maximum(counts, 1)[:, None]


def about_centroid(D: np.ndarray, Qtot: np.ndarray | None, R: np.ndarray, n_atoms: np.ndarray) -> np.ndarray:
    """(m, 3) float64 dipoles about each molecule's centroid, from dipoles about the coordinate origin.

    ``D_c = D_0 - Qtot * c`` with ``c`` the centroid; unchanged for neutral molecules.

    Args:
        D: (m, 3) dipoles about the coordinate origin, e·Å.
        Qtot: (m,) total charges, e (None: neutral).
        R: (sum n_atoms, 3) positions, Å. n_atoms: (m,) atoms per molecule.
    """
    D = np.asarray(D, dtype=np.float64)
    if Qtot is None:
        return D.copy()
    q = np.asarray(Qtot, dtype=np.float64)
    if not np.any(q):
        return D.copy()
    return D - q[:, None] * centroids(R, n_atoms)


__all__ = ["about_centroid", "centroids"]
