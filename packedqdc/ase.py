"""ASE calculator of a trained run: energy, forces and partial charges in ASE's units.

    from packedqdc.ase import Calculator
    atoms.calc = Calculator("runs/NAME", checkpoint="best")   # or Potential.load(run).calculator()
    atoms.get_potential_energy()   # eV
    atoms.get_forces()             # (n, 3) eV/Å
    atoms.get_charges()            # (n,) e, the model's partial charges (they sum to the total charge)

The total charge of a molecule is ``atoms.info["charge"]`` when present, else the calculator's
``charge`` argument (default 0). PhysNet describes isolated molecules: periodic ``Atoms`` and elements
the model was not trained on are refused with a one-line ``ConfigError``.

Each molecule of n atoms is evaluated as one padded batch of the shape (2^ceil(log2(n+1)) atoms,
2 molecule slots, 2^ceil(log2(n(n-1))) pairs), so a molecular dynamics run or an optimisation
compiles once (once per size class when the atom count changes), not once per step. Needs the
``ase`` extra: ``pip install 'packedqdc[ase]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import ConfigError
from .sources.toolkit import require_extra
from .units import energy_factor

require_extra("ase", "ase", "packedqdc.ase")

from ase import Atoms  # noqa: E402
from ase.calculators.calculator import Calculator as _ASECalculator  # noqa: E402
from ase.calculators.calculator import all_changes  # noqa: E402

from .train.predict import Potential, molecule_batch  # noqa: E402

#: kcal/mol per eV, from packedqdc.units (one definition of the conversion).
KCAL_MOL_PER_EV = energy_factor("ev")


class Calculator(_ASECalculator):
    """ASE calculator of a trained PhysNet (EMA weights of the run's ``best`` or ``latest`` checkpoint).

    Args:
        run: a run directory (``runs/NAME``) or a loaded ``Potential``.
        checkpoint: ``"best"`` (default) or ``"latest"``; ignored when ``run`` is a ``Potential``.
        charge: total charge (e) of molecules whose ``atoms.info`` has no ``"charge"`` (default 0).
        **kwargs: passed to ``ase.calculators.calculator.Calculator``.

    Results: ``energy`` and ``free_energy`` (eV, float64), ``forces`` ((n, 3) eV/Å), ``charges``
    ((n,) e).
    """

    implemented_properties = ["energy", "free_energy", "forces", "charges"]

    def __init__(self, run: str | Path | Potential, checkpoint: str = "best", charge: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.potential = run if isinstance(run, Potential) else Potential.load(run, checkpoint)
        self.charge = charge
        self._charge_used: float | None = None
        self._template: tuple[bytes, float, dict[str, np.ndarray]] | None = None

    def total_charge(self, atoms: Atoms) -> float:
        """``atoms.info["charge"]``, else the calculator's ``charge``, else 0 (e)."""
        value = atoms.info.get("charge", self.charge)
        try:
            return 0.0 if value is None else float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"ASE calculator: atoms.info['charge'] must be a number, got {value!r}") from None

    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> list[str]:
        """ASE's changes, plus ``"charge"`` when the total charge differs from the last calculation
        (ASE does not compare ``atoms.info``)."""
        changes = super().check_state(atoms, tol)
        if self._charge_used is not None and self.total_charge(atoms) != self._charge_used:
            changes.append("charge")
        return changes

    def calculate(self, atoms: Atoms | None = None, properties: Sequence[str] = ("energy",),
                  system_changes: Sequence[str] = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        if atoms.pbc.any():
            raise ConfigError(f"ASE calculator: {atoms.get_chemical_formula()} is periodic (pbc={atoms.pbc.tolist()}); "
                              "the model describes isolated molecules: set atoms.pbc = False")
        if len(atoms) == 0:
            raise ConfigError("ASE calculator: the Atoms object has no atoms")
        qtot = self.total_charge(atoms)
        batch = self._batch(atoms.numbers, atoms.positions, qtot)
        energy, forces, charges = self.potential.predict_on_batch(batch)
        n = len(atoms)
        self._charge_used = qtot
        self.results = {
            "energy": float(energy[0]) / KCAL_MOL_PER_EV,
            "free_energy": float(energy[0]) / KCAL_MOL_PER_EV,
            "forces": forces[:n].astype(np.float64) / KCAL_MOL_PER_EV,
            "charges": charges[:n].astype(np.float64),
        }

    def _batch(self, numbers: np.ndarray, positions: np.ndarray, qtot: float) -> dict[str, np.ndarray]:
        """The padded batch of one molecule; the pair lists are kept while the elements and the
        charge stay the same (every MD step), and only the positions are written. They hold all
        ordered pairs, also for a model trained on cutoff pairs: its network gives nothing beyond the
        cutoff and its Coulomb term covers every pair by itself, so the result is the same, and a
        fixed list keeps one compiled shape for a whole MD run."""
        key = np.asarray(numbers, np.int32).tobytes()
        if self._template is None or self._template[0] != key or self._template[1] != qtot:
            self.potential.reference.check_elements(
                numbers, where=f"ASE calculator: {Atoms(numbers=numbers).get_chemical_formula()}")
            self._template = (key, qtot, molecule_batch([numbers], [positions], [qtot]))
        batch = dict(self._template[2])
        R = np.zeros_like(batch["R"])
        R[:len(numbers)] = positions
        batch["R"] = R
        return batch
