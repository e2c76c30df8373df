"""Bundled sample dataset.

``SAMPLE_NPZ`` is a small real dataset in the PhysNet padded NPZ layout: 504 conformers of 12 small
molecules (42 each; 3 to 15 atoms; elements H, C, N, O, F, S), 168 of them ions (acetate -1,
methylammonium +1, imidazolium +1, guanidinium +1). Energies and forces are GFN2-xTB single points
(tblite) on RDKit ETKDG + MMFF94 geometries with random Gaussian displacements.

Keys and units:

- ``R`` (504, 15, 3) float32: positions, Å, zero-padded
- ``Z`` (504, 15) int32: atomic numbers, zero-padded
- ``N`` (504,) int32: atoms per conformer
- ``E`` (504,) float64: total energy, kcal/mol (about -3e3 to -1.5e4)
- ``F`` (504, 15, 3) float32: forces (-dE/dR), kcal/mol/Å, zero-padded
- ``Q`` (504,) float64: total charge, e
- ``smiles`` (504,) str and ``info`` () str: extra keys that PhysNet readers ignore

Conformers are shuffled so that molecules are interleaved. See ``docs/sample-data.md``; the file
is made by ``scripts/make_sample.py``.
"""

from pathlib import Path

SAMPLE_NPZ: Path = Path(__file__).parent / "sample.npz"
"""Path of the bundled sample NPZ (PhysNet padded layout, kcal/mol and Å)."""

__all__ = ["SAMPLE_NPZ"]
