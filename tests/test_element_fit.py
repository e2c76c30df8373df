"""The one streaming least-squares element fit (``packedqdc.element_fit``)."""

from __future__ import annotations

import numpy as np

from packedqdc.element_fit import ElementEnergyFit
from packedqdc.elements import MAX_Z, element_counts


def _molecules(rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
    n_atoms = rng.integers(2, 12, size=m)
    Z = rng.choice([1, 6, 7, 8], size=int(n_atoms.sum()))
    return Z, n_atoms


def test_element_counts_per_molecule() -> None:
    counts = element_counts(np.array([1, 1, 8, 6, 1, 1, 1, 1]), np.array([3, 5]))
    assert counts.shape == (2, MAX_Z + 1)
    assert counts[0, [1, 8]].tolist() == [2, 1] and counts[1, [1, 6]].tolist() == [4, 1]
    assert counts.sum() == 8


def test_streamed_blocks_equal_one_lstsq_and_recover_energies() -> None:
    rng = np.random.default_rng(0)
    Z, n_atoms = _molecules(rng, 400)
    e0 = {1: -0.5, 6: -37.8, 7: -54.6, 8: -75.1}
    qtot = rng.integers(-1, 2, size=400).astype(float)
    counts = element_counts(Z, n_atoms)
    energies = sum(counts[:, z] * v for z, v in e0.items()) * 627.5 + 3.0 * qtot + rng.normal(0, 0.01, 400)

    fit = ElementEnergyFit(with_charge=True)
    for lo in range(0, 400, 37):  # several uneven blocks
        fit.add(counts[lo : lo + 37], energies[lo : lo + 37], qtot[lo : lo + 37])
    table, charge = fit.solve()

    x = np.concatenate([counts[:, [1, 6, 7, 8]], qtot[:, None]], axis=1)
    direct = np.linalg.lstsq(x, energies, rcond=None)[0]
    np.testing.assert_allclose(table[[1, 6, 7, 8]], direct[:4], rtol=1e-9)
    assert abs(charge - direct[4]) < 1e-6
    np.testing.assert_allclose(table[[1, 6, 7, 8]], [v * 627.5 for v in e0.values()], atol=0.05)
    absent = np.ones(MAX_Z + 1, dtype=bool)
    absent[[1, 6, 7, 8]] = False
    assert np.isnan(table[absent]).all()  # elements no molecule holds, and column 0


def test_without_charge_column() -> None:
    rng = np.random.default_rng(1)
    Z, n_atoms = _molecules(rng, 100)
    counts = element_counts(Z, n_atoms)
    energies = counts[:, 1] * -1.0 + counts[:, 6] * -2.0 + counts[:, 7] * -3.0 + counts[:, 8] * -4.0
    fit = ElementEnergyFit()
    fit.add(counts, energies)
    table, charge = fit.solve()
    np.testing.assert_allclose(table[[1, 6, 7, 8]], [-1.0, -2.0, -3.0, -4.0], rtol=1e-10)
    assert charge == 0.0
