"""Make the bundled sample dataset ``packedqdc/data/sample.npz``.

Conformers of a dozen small molecules (four of them ions) are embedded with RDKit (ETKDG,
seeded), relaxed with MMFF94, and then randomly displaced (isotropic Gaussian noise on every
coordinate, its standard deviation drawn per conformer) so that energies and forces vary.
Each geometry gets a GFN2-xTB single point from tblite.

The output is a PhysNet-style padded NPZ in kcal/mol and Å:

    R (M, A, 3) float32   positions, Å, zero-padded
    Z (M, A)    int32     atomic numbers, zero-padded
    N (M,)      int32     atoms per molecule
    E (M,)      float64   total energy, kcal/mol
    F (M, A, 3) float32   forces (-dE/dR), kcal/mol/Å, zero-padded
    Q (M,)      float64   total charge, e
    smiles (M,) str       SMILES of each conformer's molecule
    info ()     str       level of theory, units, versions and the generating command

Install the dependencies (not needed by packedqdc itself) and run from the repository root:

    pip install tblite rdkit numpy
    python scripts/make_sample.py [--output packedqdc/data/sample.npz] [--seed 0]

Before writing, the script checks the forces of one (charged) conformer against a central finite
difference of the energy and stops if they disagree.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
from rdkit import Chem
from rdkit.Chem import AllChem
from tblite.interface import Calculator

HARTREE_TO_KCAL_MOL = 627.509474
BOHR_TO_ANGSTROM = 0.529177210903
FORCE_TO_KCAL_MOL_ANGSTROM = HARTREE_TO_KCAL_MOL / BOHR_TO_ANGSTROM

# (name, SMILES); the charge is the formal charge of the SMILES.
MOLECULES: tuple[tuple[str, str], ...] = (
    ("water", "O"),
    ("methanol", "CO"),
    ("methanethiol", "CS"),
    ("acetate", "CC(=O)[O-]"),
    ("methylammonium", "C[NH3+]"),
    ("2,2,2-trifluoroethanol", "OCC(F)(F)F"),
    ("glycine", "NCC(=O)O"),
    ("imidazolium", "c1c[nH+]c[nH]1"),
    ("guanidinium", "NC(N)=[NH2+]"),
    ("pyridine", "c1ccncc1"),
    ("N-methylacetamide", "CC(=O)NC"),
    ("1-butanol", "CCCCO"),
)


@dataclass(frozen=True)
class Conformer:
    """One labelled geometry: Å, kcal/mol, kcal/mol/Å."""

    smiles: str
    charge: int
    numbers: np.ndarray  # (n,) int
    positions: np.ndarray  # (n, 3) Å
    energy: float
    forces: np.ndarray  # (n, 3)


def embed(smiles: str, n_conformers: int, seed: int) -> tuple[np.ndarray, list[np.ndarray], int]:
    """Atomic numbers, MMFF-relaxed ETKDG conformers (Å) and formal charge of a SMILES."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    conf_ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=n_conformers, params=params))
    if not conf_ids:
        raise RuntimeError(f"{smiles}: RDKit could not embed a conformer")
    AllChem.MMFFOptimizeMoleculeConfs(mol, maxIters=500)
    numbers = np.array([atom.GetAtomicNum() for atom in mol.GetAtoms()], dtype=np.int32)
    geometries = [np.array(mol.GetConformer(i).GetPositions()) for i in conf_ids]
    return numbers, geometries, Chem.GetFormalCharge(mol)


def xtb_energy_forces(
    numbers: np.ndarray, positions: np.ndarray, charge: int
) -> tuple[float, np.ndarray]:
    """GFN2-xTB energy (kcal/mol) and forces (kcal/mol/Å) at positions in Å."""
    unpaired = int(numbers.sum() - charge) % 2
    calc = Calculator(
        "GFN2-xTB", numbers, positions / BOHR_TO_ANGSTROM, charge=float(charge), uhf=unpaired
    )
    calc.set("verbosity", 0)
    result = calc.singlepoint()
    energy = float(result.get("energy")) * HARTREE_TO_KCAL_MOL
    forces = -np.asarray(result.get("gradient")) * FORCE_TO_KCAL_MOL_ANGSTROM
    return energy, forces


def sample_molecule(
    smiles: str, count: int, sigma_range: tuple[float, float], rng: np.random.Generator, seed: int
) -> list[Conformer]:
    """`count` displaced conformers of one molecule with their xTB labels."""
    numbers, geometries, charge = embed(smiles, n_conformers=min(count, 10), seed=seed)
    conformers = []
    for _ in range(count):
        base = geometries[rng.integers(len(geometries))]
        positions = base + rng.normal(scale=rng.uniform(*sigma_range), size=base.shape)
        energy, forces = xtb_energy_forces(numbers, positions, charge)
        conformers.append(Conformer(smiles, charge, numbers, positions, energy, forces))
    return conformers


def finite_difference_error(conformer: Conformer, step: float = 1e-3) -> float:
    """Largest |F - (-dE/dR)| (kcal/mol/Å) with a central difference of `step` Å."""
    numeric = np.zeros_like(conformer.positions)
    for index in np.ndindex(*conformer.positions.shape):
        shifted = []
        for sign in (1.0, -1.0):
            positions = conformer.positions.copy()
            positions[index] += sign * step
            shifted.append(xtb_energy_forces(conformer.numbers, positions, conformer.charge)[0])
        numeric[index] = -(shifted[0] - shifted[1]) / (2 * step)
    return float(np.abs(numeric - conformer.forces).max())


def to_padded(conformers: list[Conformer], info: str) -> dict[str, np.ndarray]:
    """PhysNet padded arrays for a list of conformers."""
    m = len(conformers)
    a = max(len(c.numbers) for c in conformers)
    arrays = {
        "R": np.zeros((m, a, 3), np.float32),
        "Z": np.zeros((m, a), np.int32),
        "N": np.array([len(c.numbers) for c in conformers], np.int32),
        "E": np.array([c.energy for c in conformers], np.float64),
        "F": np.zeros((m, a, 3), np.float32),
        "Q": np.array([c.charge for c in conformers], np.float64),
        "smiles": np.array([c.smiles for c in conformers], dtype=np.str_),
        "info": np.array(info, dtype=np.str_),
    }
    for i, c in enumerate(conformers):
        n = len(c.numbers)
        arrays["R"][i, :n] = c.positions
        arrays["Z"][i, :n] = c.numbers
        arrays["F"][i, :n] = c.forces
    return arrays


def describe(args: argparse.Namespace) -> str:
    """The `info` string stored in the NPZ."""
    command = (
        f"python scripts/make_sample.py --seed {args.seed} --per-molecule {args.per_molecule} "
        f"--sigma-min {args.sigma_min} --sigma-max {args.sigma_max}"
    )
    return (
        "packedqdc sample dataset. Level of theory: GFN2-xTB single points "
        f"(tblite {version('tblite')}), geometries: RDKit {version('rdkit')} ETKDGv3 + MMFF94, "
        "displaced by isotropic Gaussian noise whose per-coordinate standard deviation is drawn "
        f"uniformly from [{args.sigma_min}, {args.sigma_max}] Å for each conformer. "
        "Units: R Å, E kcal/mol (total energy), F kcal/mol/Å (-dE/dR), Q e. "
        f"1 hartree = {HARTREE_TO_KCAL_MOL} kcal/mol, 1 bohr = {BOHR_TO_ANGSTROM} Å. "
        f"Generated with: {command} (Python {platform.python_version()})."
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output", type=Path, default=Path("packedqdc/data/sample.npz"), help="NPZ to write"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for RDKit and the noise")
    parser.add_argument("--per-molecule", type=int, default=42, help="conformers per molecule")
    parser.add_argument(
        "--sigma-min", type=float, default=0.02, help="smallest noise std per coordinate, Å"
    )
    parser.add_argument(
        "--sigma-max", type=float, default=0.06, help="largest noise std per coordinate, Å"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    conformers: list[Conformer] = []
    for offset, (name, smiles) in enumerate(MOLECULES):
        batch = sample_molecule(
            smiles, args.per_molecule, (args.sigma_min, args.sigma_max), rng, args.seed + offset
        )
        energies = np.array([c.energy for c in batch])
        print(
            f"{name:24s} {smiles:16s} q={batch[0].charge:+d} atoms={len(batch[0].numbers):2d} "
            f"E={energies.mean():.1f}±{energies.std():.1f} kcal/mol"
        )
        conformers.extend(batch)

    probe = next(c for c in conformers if c.charge != 0)
    error = finite_difference_error(probe)
    print(f"forces vs finite difference ({probe.smiles}): max |error| = {error:.2e} kcal/mol/Å")
    if error > 1e-2:
        raise SystemExit("forces disagree with the finite-difference gradient")

    order = rng.permutation(len(conformers))
    arrays = to_padded([conformers[i] for i in order], describe(args))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.output, **arrays)
    size_mb = args.output.stat().st_size / 1e6
    print(
        f"wrote {args.output}: {len(conformers)} conformers, {len(MOLECULES)} molecules, "
        f"{size_mb:.2f} MB in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
