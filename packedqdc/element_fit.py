"""Per-element energies by streaming least squares: E ≈ Σ_Z count_Z · e_Z (+ c · Qtot).

One fit for the project: ``pack openqdc --energy-type regression`` (isolated-atom energies of a
cache) and training's reference energies (``packedqdc.train.reference``) both accumulate the normal
equations XᵀX and Xᵀy here, block by block, in float64, so memory is O(block) whatever the data.
"""

from __future__ import annotations

import numpy as np

from .elements import MAX_Z

NUM_ELEMENTS = MAX_Z + 1  # columns of the element table; column 0 (padding) is never fitted


class ElementEnergyFit:
    """Accumulates blocks of (element counts, energies[, total charges]) and solves once.

    Args:
        with_charge: fit a coefficient of the total charge as well (one extra column).

    Usage::

        fit = ElementEnergyFit(with_charge=True)
        for counts, energies, qtot in blocks:
            fit.add(counts, energies, qtot)
        table, charge_coef = fit.solve()
    """

    def __init__(self, *, with_charge: bool = False) -> None:
        self.with_charge = with_charge
        width = NUM_ELEMENTS + int(with_charge)
        self.xtx = np.zeros((width, width))
        self.xty = np.zeros(width)
        self.n_rows = 0

    def add(self, counts: np.ndarray, energies: np.ndarray, qtot: np.ndarray | None = None) -> None:
        """Add molecules to the fit.

        Args:
            counts: (m, MAX_Z + 1) float64 element counts (``elements.element_counts``).
            energies: (m,) float64 energies, kcal/mol (must be finite: filter before).
            qtot: (m,) float64 total charges, e (only with ``with_charge``; None: neutral).
        """
        x = np.asarray(counts, dtype=np.float64)
        if self.with_charge:
            q = np.zeros(x.shape[0]) if qtot is None else np.asarray(qtot, dtype=np.float64)
            x = np.concatenate([x, q[:, None]], axis=1)
        y = np.asarray(energies, dtype=np.float64)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.n_rows += x.shape[0]

    def solve(self) -> tuple[np.ndarray, float]:
        """The least-squares coefficients.

        Returns:
            table: (MAX_Z + 1,) float64 kcal/mol per atom of each element; NaN for elements that
                no added molecule holds (and for column 0).
            charge_coef: kcal/mol per e of total charge (0.0 without ``with_charge`` or charges).

        Columns are scaled to unit diagonal before solving (keeps the normal equations well
        conditioned); collinear columns get the minimum-norm solution, which leaves the fitted
        energies of the added molecules unchanged.
        """
        active = np.flatnonzero(np.diag(self.xtx) > 0)
        active = active[active != 0]  # column 0 counts padding atoms, which carry no energy
        coef = np.full(self.xtx.shape[0], np.nan)
        if active.size:
            sub = self.xtx[np.ix_(active, active)]
            scale = np.sqrt(np.diag(sub))
            solution = np.linalg.lstsq(sub / np.outer(scale, scale), self.xty[active] / scale, rcond=None)[0]
            coef[active] = solution / scale
        table = coef[:NUM_ELEMENTS].copy()
        charge = float(coef[NUM_ELEMENTS]) if self.with_charge and np.isfinite(coef[NUM_ELEMENTS]) else 0.0
        return table, charge


__all__ = ["NUM_ELEMENTS", "ElementEnergyFit"]
