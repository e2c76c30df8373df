"""Element symbols by atomic number (1..118)."""

from __future__ import annotations

SYMBOLS: tuple[str, ...] = tuple(
    """X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se
    Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho
    Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm
    Md No Lr Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og""".split()
)

MAX_Z = 118
assert len(SYMBOLS) == MAX_Z + 1


def symbol(z: int) -> str:
    """Chemical symbol of atomic number ``z`` (``"X"`` for 0, the padding number)."""
    return SYMBOLS[z] if 0 <= z <= MAX_Z else f"Z{z}"
