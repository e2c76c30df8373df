"""Unit conversion factors into packedqdc's units: kcal/mol, Å, kcal/mol/Å.

Values are CODATA 2018 based; 1 kcal = 4.184 kJ exactly (thermochemical calorie).
"""

from __future__ import annotations

from .errors import ConfigError

HARTREE_TO_KCAL_MOL = 627.5094740631
EV_TO_KCAL_MOL = 23.060547830619026
KJ_MOL_TO_KCAL_MOL = 1.0 / 4.184
BOHR_TO_ANGSTROM = 0.529177210903

#: energy unit name -> factor that converts it into kcal/mol
ENERGY_TO_KCAL_MOL: dict[str, float] = {
    "kcal/mol": 1.0,
    "ev": EV_TO_KCAL_MOL,
    "mev": EV_TO_KCAL_MOL * 1e-3,
    "hartree": HARTREE_TO_KCAL_MOL,
    "kj/mol": KJ_MOL_TO_KCAL_MOL,
    "ryd": HARTREE_TO_KCAL_MOL / 2.0,
}

#: length unit name -> factor that converts it into Å
LENGTH_TO_ANGSTROM: dict[str, float] = {
    "ang": 1.0,
    "bohr": BOHR_TO_ANGSTROM,
    "nm": 10.0,
}

_ALIASES = {
    "kcal": "kcal/mol",
    "kcal_mol": "kcal/mol",
    "kcal/mol": "kcal/mol",
    "ev": "ev",
    "mev": "mev",
    "hartree": "hartree",
    "ha": "hartree",
    "eh": "hartree",
    "kj/mol": "kj/mol",
    "kj_mol": "kj/mol",
    "kjmol": "kj/mol",
    "ryd": "ryd",
    "rydberg": "ryd",
    "ang": "ang",
    "angstrom": "ang",
    "a": "ang",
    "å": "ang",
    "bohr": "bohr",
    "a0": "bohr",
    "nm": "nm",
}


def _canonical(unit: str) -> str:
    return _ALIASES.get(unit.strip().lower(), unit.strip().lower())


def energy_factor(unit: str) -> float:
    """Factor that converts energies given in ``unit`` into kcal/mol."""
    key = _canonical(unit)
    if key not in ENERGY_TO_KCAL_MOL:
        raise ConfigError(f"unknown energy unit {unit!r}; use one of {', '.join(ENERGY_TO_KCAL_MOL)}")
    return ENERGY_TO_KCAL_MOL[key]


def length_factor(unit: str) -> float:
    """Factor that converts lengths given in ``unit`` into Å."""
    key = _canonical(unit)
    if key not in LENGTH_TO_ANGSTROM:
        raise ConfigError(f"unknown length unit {unit!r}; use one of {', '.join(LENGTH_TO_ANGSTROM)}")
    return LENGTH_TO_ANGSTROM[key]


def force_factor(energy_unit: str, length_unit: str) -> float:
    """Factor that converts forces in ``energy_unit/length_unit`` into kcal/mol/Å."""
    return energy_factor(energy_unit) / length_factor(length_unit)
