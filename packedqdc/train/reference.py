"""Per-element reference energies with one offset per total charge: E ≈ Σ_atoms e_Z + c_Q, fitted
by least squares.

One linear coefficient (``Σ e_Z + c·Qtot``, the fit of runs before 0.2) cannot place cations and
anions at once: removing an electron costs the ionisation energy, adding one gains the electron
affinity, and the two differ by hundreds of kcal/mol. So every total charge Q seen in training gets
its own offset ``c_Q`` (``c_0 = 0`` when neutral molecules are present, so neutral references are
the element sums). Runs saved with a linear coefficient still load and predict as they did.

The fit streams over the packed memmaps in blocks of molecules (memory O(block)), accumulating the
normal equations in float64. Training targets are ``E - reference(molecule)`` computed in float64 on
the host and only then cast to float32, so totals of 10^4..10^5 kcal/mol lose no detail.
"""

from __future__ import annotations

import dataclasses
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
        charge_coef: float, kcal/mol per e of total charge: the linear charge term of runs saved
            before per-charge offsets (0.0 in new fits).
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
    charge_offsets: tuple[tuple[int, float], ...] = ()

    @property
    def charges(self) -> tuple[int, ...]:
        """Total charges (e) with an offset: those of the fitted molecules (empty for old fits)."""
        return tuple(q for q, _ in self.charge_offsets)

    def charge_offset(self, Qtot: np.ndarray) -> np.ndarray:
        """Offset of each total charge, float64 like ``Qtot``, kcal/mol: ``c_Q`` of the per-charge fit,
        or ``charge_coef · Qtot`` for fits saved before it.

        Raises ConfigError for a total charge the fit never saw (or not an integer): the model
        has no reference for it.
        """
        qtot = np.asarray(Qtot, dtype=np.float64)
        if not self.charge_offsets:
            return self.charge_coef * qtot
        q_int = np.rint(qtot)
        known = np.array(self.charges, dtype=np.float64)
        bad = ~np.isclose(qtot, q_int, atol=1e-6) | ~np.isin(q_int, known)
        if bad.any():
            first = float(qtot[np.flatnonzero(bad)[0]])
            raise ConfigError(f"total charge {first:+g} not in the model's training data (it knows "
                              f"{', '.join(f'{q:+d}' for q in self.charges)})")
        values = np.array([c for _, c in self.charge_offsets], dtype=np.float64)
        return values[np.searchsorted(known, q_int)]

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
        return summed[: qtot.shape[0]] + self.charge_offset(qtot)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; floats round-trip exactly through ``json``."""
        return {
            "table": [float(v) for v in self.table],
            "charge_coef": float(self.charge_coef),
            "per_atom_mean": float(self.per_atom_mean),
            "per_atom_std": float(self.per_atom_std),
            "elements": [int(z) for z in self.elements],
            "charge_offsets": [[int(q), float(c)] for q, c in self.charge_offsets],
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
            charge_offsets=tuple((int(q), float(c)) for q, c in data.get("charge_offsets", [])),
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


def fit_charges(data: PackedDataset, selected: np.ndarray) -> tuple[int, ...]:
    """Sorted distinct total charges (integers, e) of the selected molecules; SourceError on a
    non-integer total charge."""
    if data.Qtot is None:
        return (0,)
    qtot = np.asarray(data.Qtot, dtype=np.float64)[selected]
    values = np.unique(qtot)
    bad = values[~np.isclose(values, np.rint(values), atol=1e-6)]
    if bad.size:
        first = int(np.flatnonzero(selected)[np.flatnonzero(qtot == bad[0])[0]])
        raise SourceError(f"{data.path}: molecule {first}: total charge {bad[0]} is not an integer")
    return tuple(sorted({int(q) for q in np.rint(values)}))


def fit_reference_energies(data: PackedDataset, indices: np.ndarray, block: int = 65536) -> ReferenceEnergies:
    """Least-squares fit of per-element energies and one offset per total charge.

    Args:
        data: the packed dataset.
        indices: (n,) int molecule indices to fit on (the training split).
        block: molecules read per block.

    Returns the fit (``packedqdc.element_fit``, the same one ``pack openqdc`` uses): ``E ≈ Σ e_Z +
    c_Q``, with ``c_0 = 0`` when neutral molecules are present (the offsets of the other charges are
    then relative to the neutral element sums). Elements absent from ``indices`` get 0, collinear
    columns the minimum-norm solution (only predictions matter). Raises SourceError on a non-finite
    energy or a non-integer total charge.
    """
    selected = np.zeros(data.n_molecules, dtype=bool)
    selected[np.asarray(indices, dtype=np.int64)] = True
    charges = fit_charges(data, selected)
    fit = ElementEnergyFit(offset_charges=tuple(q for q in charges if q != 0) if 0 in charges else charges)
    for counts, qtot, energies, _ in _blocks(data, selected, block):
        fit.add(counts, energies, qtot)
    table, _, fitted = fit.solve_all()
    elements = tuple(int(z) for z in np.flatnonzero(np.isfinite(table)) if z > 0)
    table = np.nan_to_num(table, nan=0.0)
    offsets = tuple((q, float(fitted.get(q, 0.0))) for q in charges)
    reference = ReferenceEnergies(table=table, charge_coef=0.0, per_atom_mean=0.0, per_atom_std=0.0,
                                  elements=elements, charge_offsets=offsets)

    total, total_sq, count = 0.0, 0.0, 0
    for counts, qtot, energies, n_atoms in _blocks(data, selected, block):
        residual = (energies - counts @ table - reference.charge_offset(qtot)) / np.maximum(n_atoms, 1)
        total += float(residual.sum())
        total_sq += float((residual * residual).sum())
        count += residual.shape[0]
    mean = total / max(count, 1)
    std = float(np.sqrt(max(total_sq / max(count, 1) - mean * mean, 0.0)))
    return dataclasses.replace(reference, per_atom_mean=mean, per_atom_std=std)


def uniform_charge_coulomb(R: np.ndarray, qtot: float, cutoff: float) -> float:
    """Coulomb energy (kcal/mol) of PhysNet's electrostatics when the total charge ``qtot`` is spread
    evenly over the ``N`` atoms at ``R`` (N, 3) Å: what the model adds at initialisation, where its
    own charges are zero and the charge correction makes every q̃_i = qtot/N."""
    return float(_uniform_charge_coulomb([np.asarray(R, dtype=np.float64)], [qtot], cutoff)[0])


def _uniform_charge_coulomb(Rs: list[np.ndarray], qtots: list[float], cutoff: float) -> np.ndarray:
    """``uniform_charge_coulomb`` of many molecules with one call of the kernel: (m,) float64."""
    from ..model.electrostatics import COULOMB_CONSTANT, coulomb_kernel

    distances, owners = [], []
    for k, R in enumerate(Rs):
        n = R.shape[0]
        d = np.linalg.norm(R[:, None, :] - R[None, :, :], axis=-1)[~np.eye(n, dtype=bool)]
        distances.append(d)
        owners.append(np.full(d.size, k))
    if not distances or not sum(d.size for d in distances):
        return np.zeros(len(Rs))
    chi = np.asarray(coulomb_kernel(np.concatenate(distances).astype(np.float32), cutoff), dtype=np.float64)
    sums = np.bincount(np.concatenate(owners), weights=chi, minlength=len(Rs))
    n_atoms = np.array([max(R.shape[0], 1) for R in Rs], dtype=np.float64)
    return 0.5 * COULOMB_CONSTANT * (np.asarray(qtots, dtype=np.float64) / n_atoms) ** 2 * sums


def with_initial_coulomb(reference: ReferenceEnergies, data: PackedDataset, indices: np.ndarray, cutoff: float,
                         per_charge: int = 512, seed: int = 0) -> ReferenceEnergies:
    """The reference with each charged offset ``c_Q`` lowered by the mean Coulomb energy the model
    starts with on molecules of charge Q (``uniform_charge_coulomb``, over up to ``per_charge``
    seeded molecules of the split).

    Without it every ion starts 60-85 kcal/mol too high (cations and anions alike: a like-signed
    charge spread over a few Å), and atoms that do not see the total charge must learn to cancel
    it. Neutral molecules are unchanged (their uniform charge is 0).
    """
    if not reference.charge_offsets or data.Qtot is None:
        return reference
    indices = np.asarray(indices, dtype=np.int64)
    qtot = np.rint(np.asarray(data.Qtot, dtype=np.float64)[indices])
    rng = np.random.default_rng(seed)
    offsets = []
    for q, c in reference.charge_offsets:
        members = indices[qtot == q]
        if q == 0 or members.size == 0:
            offsets.append((q, c))
            continue
        chosen = np.sort(rng.choice(members, size=min(per_charge, members.size), replace=False))
        Rs = [np.asarray(data.molecule(int(i))["R"], dtype=np.float64) for i in chosen]
        mean = float(_uniform_charge_coulomb(Rs, [float(q)] * len(Rs), cutoff).mean())
        offsets.append((q, c - mean))
    return dataclasses.replace(reference, charge_offsets=tuple(offsets))
