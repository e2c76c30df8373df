"""Isolated-atom reference energies for ``--energy-type formation`` and ``regression``.

``formation`` uses openqdc's tabulated energies (by element and formal charge); ``regression``
uses openqdc's fitted ``regressionenergy.pkl`` when present, else the project's one streaming
least-squares fit (``packedqdc.element_fit``) over the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...element_fit import ElementEnergyFit
from ...elements import MAX_Z, element_counts, symbol
from ...errors import ConfigError, SourceError
from ...units import energy_factor
from ..safe_pickle import NUMPY_GLOBALS, OPENQDC_E0_GLOBALS, load_restricted
from .cache import CacheReader
from .classes import DatasetInfo, EnergyMethod

MAX_CHARGE = 10  # openqdc's E0 tables cover formal atomic charges -10..10

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class IsolatedAtomEnergies:
    """Per-atom energies subtracted from total energies, in kcal/mol.

    Attributes:
        table: (MAX_Z + 1, 2 * MAX_CHARGE + 1) float64, E0 by [Z, formal charge + MAX_CHARGE].
        known: same shape, bool, whether the table has a value (missing pairs are an error).
        source: where the values come from, for meta.json.
    """

    table: np.ndarray
    known: np.ndarray
    source: str

    def per_molecule(self, z: np.ndarray, charge: np.ndarray, mol: np.ndarray, m: int, first: int) -> np.ndarray:
        """(m,) float64 sum of E0 over the atoms of each molecule.

        Args:
            z, charge: (A,) int64 atomic numbers and formal charges.
            mol: (A,) int64 molecule of each atom within the block, 0..m-1.
            first: cache index of the block's first molecule, for error messages.

        Raises:
            SourceError: an (element, charge) pair without a reference energy.
        """
        col = charge + MAX_CHARGE
        ok = (col >= 0) & (col < self.table.shape[1])
        ok[ok] = self.known[z[ok], col[ok]]
        if not ok.all():
            k = int(np.flatnonzero(~ok)[0])
            raise SourceError(
                f"molecule {first + int(mol[k])}: no reference energy for {symbol(int(z[k]))} with formal "
                f"charge {int(charge[k])} ({self.source}); use --energy-type total"
            )
        return np.bincount(mol, weights=self.table[z, col], minlength=m)


def formation_references(info: DatasetInfo, method: EnergyMethod) -> IsolatedAtomEnergies:
    """openqdc's tabulated isolated-atom energies of ``method``, charge-aware, in kcal/mol.

    Built from the method's ``atom_energies_dict`` (hartree), not openqdc's ``to_e_matrix``.

    Raises:
        ConfigError: openqdc has no table for the method (it would silently use zeros).
    """
    from openqdc.methods.atom_energies import atom_energy_collection
    from openqdc.utils.constants import ATOMIC_NUMBERS

    enum = info.instance.__energy_methods__[method.index]
    entries = atom_energy_collection.get(str(enum).lower(), {})
    if not entries:
        raise ConfigError(
            f"{info.class_name}: openqdc has no isolated-atom energies for method {method.label}; "
            "use --energy-type total or regression"
        )
    shape = (MAX_Z + 1, 2 * MAX_CHARGE + 1)
    table, known = np.zeros(shape), np.zeros(shape, dtype=bool)
    for (element, charge), value in entries.items():
        z, col = ATOMIC_NUMBERS[element], int(charge) + MAX_CHARGE
        table[z, col] = float(np.asarray(value, dtype=np.float64).reshape(-1)[0]) * energy_factor("hartree")
        known[z, col] = True
    return IsolatedAtomEnergies(table, known, f"openqdc isolated-atom energies of {method.name}")


def regression_references(
    info: DatasetInfo, method: EnergyMethod, reader: CacheReader, pkl: Path, progress: ProgressFn
) -> IsolatedAtomEnergies:
    """Per-element E0 (same for every charge) in kcal/mol for ``--energy-type regression``.

    Uses openqdc's fitted E0s from ``pkl`` (its ``regressionenergy.pkl``) when present, otherwise
    a least-squares fit over every molecule of the cache with a finite energy for ``method``.
    """
    if pkl.is_file():
        per_z, source = _load_regression_pkl(pkl, info, method), f"openqdc fit ({pkl})"
    else:
        per_z = fit_element_energies(reader, method, progress)
        source = f"least-squares fit by packedqdc over the {info.class_name} cache"
    known = np.zeros((MAX_Z + 1, 2 * MAX_CHARGE + 1), dtype=bool)
    known[np.isfinite(per_z)] = True
    table = np.repeat(np.nan_to_num(per_z)[:, None], known.shape[1], axis=1)
    return IsolatedAtomEnergies(table, known, source)


def _load_regression_pkl(pkl: Path, info: DatasetInfo, method: EnergyMethod) -> np.ndarray:
    """(MAX_Z + 1,) float64 E0 per element in kcal/mol from openqdc's regression pickle (NaN: absent)."""
    entries = load_restricted(pkl, NUMPY_GLOBALS | OPENQDC_E0_GLOBALS)
    try:
        per_z = np.full(MAX_Z + 1, np.nan)
        for species, energy in entries.items():
            means = np.asarray(energy.mean, dtype=np.float64).reshape(-1)
            if means.shape[0] != len(info.methods):
                raise ValueError(f"{means.shape[0]} methods, {info.class_name} has {len(info.methods)}")
            per_z[int(species.number)] = means[method.index] * info.energy_to_kcal
    except (AttributeError, ValueError, TypeError, IndexError) as exc:
        raise SourceError(f"{pkl}: not a regression E0 file for {info.class_name} ({exc}); delete it to refit") from None
    return per_z


def fit_element_energies(reader: CacheReader, method: EnergyMethod, progress: ProgressFn) -> np.ndarray:
    """Least-squares per-element energies over the cache, streaming (``packedqdc.element_fit``).

    X is (molecules, elements) atom counts and y the method's total energies in kcal/mol, over
    every molecule with a finite energy; the fitted energies equal openqdc's ``lstsq`` fit.

    Returns:
        (MAX_Z + 1,) float64 E0 in kcal/mol, NaN for elements absent from the fit.

    Raises:
        SourceError: no molecule has a finite energy for ``method``.
    """
    fit = ElementEnergyFit()
    for block in reader.blocks(force_column=None):
        y = block.energies[:, method.index].astype(np.float64) * reader.info.energy_to_kcal
        good = np.isfinite(y)
        counts = element_counts(np.rint(block.atomic[:, 0]).astype(np.int64), block.n_atoms)
        fit.add(counts[good], y[good])
        progress(block.hi, reader.n_molecules)
    per_z, _ = fit.solve()
    if not np.isfinite(per_z).any():
        raise SourceError(f"{reader.path}: no molecule with a finite energy for method {method.label}")
    return per_z
