"""Element symbols by atomic number (1..118), and per-molecule element counts."""

from __future__ import annotations

import numpy as np

SYMBOLS: tuple[str, ...] = tuple(
    """X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se
    Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho
    Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm
    Md No Lr Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og""".split()
)

MAX_Z = 118
assert len(SYMBOLS) == MAX_Z + 1


#: chemical symbol -> atomic number
NUMBERS: dict[str, int] = {s: z for z, s in enumerate(SYMBOLS) if z > 0}


def symbol(z: int) -> str:
    """Chemical symbol of atomic number ``z`` (``"X"`` for 0, the padding number)."""
    return SYMBOLS[z] if 0 <= z <= MAX_Z else f"Z{z}"


def element_counts(Z: np.ndarray, n_atoms: np.ndarray) -> np.ndarray:
    """Atoms of each element in each molecule: the one element-count helper of the project.

    Args:
        Z: (sum n_atoms,) int atomic numbers, molecule after molecule (clipped to 0..MAX_Z).
        n_atoms: (m,) int atoms per molecule.

    Returns:
        (m, MAX_Z + 1) float64 counts; column 0 counts padding/unknown atoms.
    """
    n_atoms = np.asarray(n_atoms, dtype=np.int64)
    m, width = n_atoms.shape[0], MAX_Z + 1
    mol = np.repeat(np.arange(m, dtype=np.int64), n_atoms)
    z = np.clip(np.asarray(Z, dtype=np.int64), 0, MAX_Z)
    return np.bincount(mol * width + z, minlength=m * width).reshape(m, width).astype(np.float64)


def element_histogram(Z: np.ndarray, block: int = 1 << 24) -> np.ndarray:
    """Atoms per atomic number of ``Z`` (any integer array, e.g. a memmap), read ``block`` at a time.

    Returns (MAX_Z + 2,) int64: index z in 1..MAX_Z counts element z; index 0 counts values below 1
    and index MAX_Z + 1 values above MAX_Z (both invalid in a packed directory).
    """
    Z = Z.reshape(-1)
    counts = np.zeros(MAX_Z + 2, dtype=np.int64)
    for lo in range(0, Z.shape[0], block):
        part = np.clip(np.asarray(Z[lo : lo + block], dtype=np.int64), 0, MAX_Z + 1)
        counts += np.bincount(part, minlength=MAX_Z + 2)
    return counts
