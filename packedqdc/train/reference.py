"""Per-element reference energies: E ≈ Σ_atoms e_Z + c · Qtot, fitted by least squares.

The fit streams over the packed memmaps in blocks of molecules (memory O(block)), accumulating the
normal equations in float64. Training targets are ``E - reference(molecule)`` computed in float64 on
the host and only then cast to float32, so totals of 10^4..10^5 kcal/mol lose no detail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..element_fit import ElementEnergyFit
from ..elements import MAX_Z, element_counts, symbol
from ..errors import ConfigError, SourceError
from ..format import E_FILE, Z_FILE, PackedDataset

NUM_ROWS = MAX_Z + 1  # rows of the element table: index 0 (padding) is always 0


@dataclass(frozen=True)
class ReferenceEnergies:
    """The fitted linear model.

    Attributes:
        table: (119,) float64, kcal/mol per atom of element Z (0 for elements absent from the fit).
        charge_coef: float, kcal/mol per e of total charge.
        per_atom_mean, per_atom_std: mean and std of the residual ``(E - reference) / N`` over the
            fitted molecules, kcal/mol per atom (PhysNet's initial energy shift and scale).
        elements: sorted atomic numbers present in the fitted (training) molecules: the elements
            the model has learned. A model knows nothing of any other element.
    """

    table: np.ndarray
    charge_coef: float
    per_atom_mean: float
    per_atom_std: float
    elements: tuple[int, ...] = ()

    def unknown_elements(self, Z: np.ndarray) -> np.ndarray:
        """Sorted atomic numbers in ``Z`` (any shape; 0 is padding and ignored) the model never saw."""
        present = np.unique(np.asarray(Z))
        present = present[present != 0]
        return present[~np.isin(present, np.asarray(self.elements, dtype=present.dtype))]

    def check_elements(self, Z: np.ndarray, where: str) -> None:
        """Raise ConfigError naming ``where`` if ``Z`` holds an element outside ``elements``.

        A model's energy for an unseen element is its untrained embedding plus a zero reference
        energy: numbers with no meaning, so predicting them is refused rather than reported.
        """
        unknown = self.unknown_elements(Z)
        if unknown.size:
            names = ", ".join(symbol(int(z)) for z in unknown)
            known = ", ".join(symbol(z) for z in self.elements)
            raise ConfigError(f"{where}: element(s) {names} not in the model's training data (it knows {known})")

    def molecule_energies(self, Z: np.ndarray, segments: np.ndarray, Qtot: np.ndarray) -> np.ndarray:
        """Reference energy of each molecule slot, float64 (M,), kcal/mol.

        Args:
            Z: (A,) int atomic numbers (0 for padding: contributes 0).
            segments: (A,) int molecule slot of each atom, in [0, M).
            Qtot: (M,) float total charges, e.
        """
        per_atom = self.table[np.clip(np.asarray(Z), 0, MAX_Z)]
        qtot = np.asarray(Qtot, dtype=np.float64)
        summed = np.bincount(np.asarray(segments), weights=per_atom, minlength=qtot.shape[0])
        return summed[: qtot.shape[0]] + self.charge_coef * qtot

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; floats round-trip exactly through ``json``."""
        return {
            "table": [float(v) for v in self.table],
            "charge_coef": float(self.charge_coef),
            "per_atom_mean": float(self.per_atom_mean),
            "per_atom_std": float(self.per_atom_std),
            "elements": [int(z) for z in self.elements],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReferenceEnergies:
        table = np.asarray(data["table"], dtype=np.float64)
        # runs saved before ``elements`` was recorded: the fit gives every seen element a
        # non-zero energy (an exact 0.0 from least squares on real data does not happen)
        elements = data.get("elements", np.flatnonzero(table).tolist())
        return cls(
            table=table,
            elements=tuple(int(z) for z in elements),
            charge_coef=float(data["charge_coef"]),
            per_atom_mean=float(data["per_atom_mean"]),
            per_atom_std=float(data["per_atom_std"]),
        )


def _blocks(data: PackedDataset, selected: np.ndarray, block: int
            ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (counts (m, 119) float64, Qtot (m,), E (m,), n_atoms (m,)) of the selected molecules,
    one contiguous block of the files at a time."""
    n = data.n_molecules
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        keep = selected[lo:hi]
        if not keep.any():
            continue
        a0, a1 = int(data.offsets[lo]), int(data.offsets[hi])
        n_atoms = np.asarray(data.n_atoms[lo:hi], dtype=np.int64)
        Z = np.asarray(data.Z[a0:a1], dtype=np.int64)
        if Z.size and (Z.min() < 1 or Z.max() > MAX_Z):  # the embedding would clip it silently
            mol = np.repeat(np.arange(hi - lo), n_atoms)
            atom = int(np.flatnonzero((Z < 1) | (Z > MAX_Z))[0])
            raise SourceError(f"{data.path / Z_FILE}: molecule {lo + int(mol[atom])}: atomic number "
                              f"{int(Z[atom])} outside 1..{MAX_Z}")
        counts = element_counts(Z, n_atoms)
        qtot = np.zeros(hi - lo) if data.Qtot is None else np.asarray(data.Qtot[lo:hi], dtype=np.float64)
        energies = np.asarray(data.E[lo:hi], dtype=np.float64)
        bad = np.flatnonzero(keep & ~np.isfinite(energies))
        if bad.size:
            raise SourceError(f"{data.path / E_FILE}: molecule {lo + int(bad[0])} has a non-finite energy")
        yield counts[keep], qtot[keep], energies[keep], n_atoms[keep]


def fit_reference_energies(data: PackedDataset, indices: np.ndarray, block: int = 65536) -> ReferenceEnergies:
    """Least-squares fit of per-element energies and a total-charge coefficient.

    Args:
        data: the packed dataset.
        indices: (n,) int molecule indices to fit on (the training split).
        block: molecules read per block.

    Returns the fit (``packedqdc.element_fit``, the same one ``pack openqdc`` uses); elements
    absent from ``indices`` get 0, collinear columns get the minimum-norm solution (only
    predictions matter). Raises SourceError on a non-finite energy.
    """
    selected = np.zeros(data.n_molecules, dtype=bool)
    selected[np.asarray(indices, dtype=np.int64)] = True
    fit = ElementEnergyFit(with_charge=True)
    for counts, qtot, energies, _ in _blocks(data, selected, block):
        fit.add(counts, energies, qtot)
    table, charge_coef = fit.solve()
    elements = tuple(int(z) for z in np.flatnonzero(np.isfinite(table)) if z > 0)
    table = np.nan_to_num(table, nan=0.0)

    total, total_sq, count = 0.0, 0.0, 0
    for counts, qtot, energies, n_atoms in _blocks(data, selected, block):
        residual = (energies - counts @ table - charge_coef * qtot) / np.maximum(n_atoms, 1)
        total += float(residual.sum())
        total_sq += float((residual * residual).sum())
        count += residual.shape[0]
    mean = total / max(count, 1)
    std = float(np.sqrt(max(total_sq / max(count, 1) - mean * mean, 0.0)))
    return ReferenceEnergies(table=table, charge_coef=charge_coef, per_atom_mean=mean, per_atom_std=std,
                             elements=elements)

