"""The ASE calculator on a tiny model trained on the sample (session fixture ``trained_run``):
finite-difference forces, agreement with Potential.predict (units), charges, no recompilation in MD,
BFGS, NVE energy conservation, and the one-line refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ase")

from ase import Atoms, units  # noqa: E402
from ase.calculators.fd import calculate_numerical_forces  # noqa: E402
from ase.md.velocitydistribution import Stationary, ZeroRotation  # noqa: E402
from ase.md.verlet import VelocityVerlet  # noqa: E402
from ase.optimize import BFGS  # noqa: E402

from packedqdc.ase import KCAL_MOL_PER_EV, Calculator  # noqa: E402
from packedqdc.compiles import CountCompilations  # noqa: E402
from packedqdc.errors import ConfigError  # noqa: E402
from packedqdc.format import open_packed  # noqa: E402
from packedqdc.train import Potential  # noqa: E402
from packedqdc.train.predict import _jitted_properties  # noqa: E402

#: NVE 2,000 x 0.25 fs (0.5 ps) at 300 K, eV/atom: bounds on the systematic drift (least-squares line
#: of the total energy, over the run) and on its fluctuation (max - min); justified in docs/ase.md.
NVE_DRIFT_BOUND = 5e-5
NVE_FLUCTUATION_BOUND = 1e-3


def _molecule(data: Path, n_atoms: int, charged: bool | None = None) -> tuple[Atoms, float]:
    """The first sample molecule with ``n_atoms`` atoms (and a nonzero charge if ``charged``)."""
    ds = open_packed(data)
    qtot = np.asarray(ds.Qtot)
    for i in range(ds.n_molecules):
        if int(ds.n_atoms[i]) == n_atoms and (charged is None or bool(qtot[i] != 0) == charged):
            m = ds.molecule(i)
            return Atoms(numbers=m["Z"], positions=m["R"].astype(np.float64), info={"charge": m["Qtot"]}), m["E"]
    raise AssertionError(f"no molecule of {n_atoms} atoms")


def _thermalize(atoms: Atoms, temperature_K: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    sigma = np.sqrt(atoms.get_masses() * units.kB * temperature_K)
    atoms.set_momenta(rng.normal(size=(len(atoms), 3)) * sigma[:, None])
    Stationary(atoms)
    ZeroRotation(atoms)


@pytest.fixture(scope="module")
def potential(trained_run: Path) -> Potential:
    return Potential.load(trained_run)


def test_forces_are_minus_the_energy_gradient(potential: Potential, sample_dir: Path) -> None:
    atoms, _ = _molecule(sample_dir, 10, charged=True)  # an ion: electrostatics and charge correction
    atoms.calc = potential.calculator()
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 0.1
    numerical = calculate_numerical_forces(atoms, eps=1e-3)
    np.testing.assert_allclose(forces, numerical, atol=5e-3)


def test_equals_potential_predict_in_ase_units(potential: Potential, sample_dir: Path, trained_run: Path) -> None:
    atoms, _ = _molecule(sample_dir, 8, charged=True)
    qtot = atoms.info["charge"]
    energy, forces = potential.predict(atoms.numbers, atoms.positions, qtot)
    atoms.calc = Calculator(trained_run, checkpoint="best")
    ev_per_kcal_mol = units.kcal / units.mol  # ASE's own constant, CODATA of its version
    assert atoms.get_potential_energy() == pytest.approx(energy * ev_per_kcal_mol, rel=1e-6)
    assert atoms.get_potential_energy() == pytest.approx(energy / KCAL_MOL_PER_EV, rel=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), forces / KCAL_MOL_PER_EV, rtol=1e-6, atol=1e-7)
    charges = atoms.get_charges()
    assert charges.shape == (len(atoms),) and charges.sum() == pytest.approx(qtot, abs=1e-5)
    assert np.ptp(charges) > 0


def test_total_charge_from_info_or_argument(potential: Potential, sample_dir: Path) -> None:
    atoms, _ = _molecule(sample_dir, 8, charged=True)
    qtot = atoms.info.pop("charge")
    atoms.calc = potential.calculator(charge=qtot)
    from_argument = atoms.get_potential_energy()
    assert atoms.get_charges().sum() == pytest.approx(qtot, abs=1e-5)
    atoms.info["charge"] = 0.0  # info wins over the argument, and a change is noticed
    neutral = atoms.get_potential_energy()
    assert atoms.get_charges().sum() == pytest.approx(0.0, abs=1e-5)
    e_neutral, _ = potential.predict(atoms.numbers, atoms.positions, 0.0)
    assert neutral == pytest.approx(e_neutral / KCAL_MOL_PER_EV, rel=1e-9)
    assert neutral != pytest.approx(from_argument, rel=1e-6)


def test_md_compiles_once_per_size_class(potential: Potential, sample_dir: Path) -> None:
    atoms, _ = _molecule(sample_dir, 10, charged=False)
    atoms.calc = potential.calculator()
    _thermalize(atoms, 300.0, seed=0)
    atoms.get_forces()  # warm-up: compiles this size class if no earlier test did
    cache = _jitted_properties._cache_size()
    with CountCompilations() as compiled:
        VelocityVerlet(atoms, 0.5 * units.fs).run(200)
    assert compiled.count == 0 and _jitted_properties._cache_size() == cache
    water, _ = _molecule(sample_dir, 3)  # another size class (4 atom slots): one more shape
    water.calc = potential.calculator()
    _thermalize(water, 300.0, seed=1)
    with CountCompilations() as compiled:
        VelocityVerlet(water, 0.5 * units.fs).run(50)
    assert compiled.count <= 1 and _jitted_properties._cache_size() <= cache + 1


def test_bfgs_converges(potential: Potential, sample_dir: Path) -> None:
    atoms, _ = _molecule(sample_dir, 10, charged=False)
    bonds = np.triu(atoms.get_all_distances() < 1.6, k=1)  # covalent bonds of the sample geometry
    atoms.calc = potential.calculator()
    assert BFGS(atoms, logfile=None).run(fmax=0.05, steps=1000)
    assert np.linalg.norm(atoms.get_forces(), axis=1).max() < 0.05
    # a minimum of the molecule, not of its fragments: no bond broke
    assert atoms.get_all_distances()[bonds].max() < 2.0


def test_nve_conserves_energy(potential: Potential, sample_dir: Path) -> None:
    """NVE velocity Verlet, 0.25 fs x 2,000 steps at 300 K after BFGS: the bound of docs/ase.md."""
    atoms, _ = _molecule(sample_dir, 10, charged=False)
    atoms.calc = potential.calculator()
    BFGS(atoms, logfile=None).run(fmax=0.05, steps=1000)
    _thermalize(atoms, 300.0, seed=2)
    energies: list[float] = []
    dyn = VelocityVerlet(atoms, 0.25 * units.fs)
    dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=10)
    dyn.run(2000)
    total = np.asarray(energies) / len(atoms)
    drift = abs(np.polyfit(np.arange(total.size), total, 1)[0]) * (total.size - 1)
    assert atoms.get_temperature() > 50  # the molecule moved, it did not freeze
    assert drift < NVE_DRIFT_BOUND, f"drift {drift:.2e} eV/atom"
    assert np.ptp(total) < NVE_FLUCTUATION_BOUND, f"fluctuation {np.ptp(total):.2e} eV/atom"


def test_refusals_are_one_line(potential: Potential) -> None:
    chloride = Atoms("CCl", positions=[[0, 0, 0], [1.8, 0, 0]])
    chloride.calc = potential.calculator()
    with pytest.raises(ConfigError, match=r"element\(s\) Cl not in the model's training data") as info:
        chloride.get_potential_energy()
    assert "\n" not in str(info.value)
    periodic = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], cell=[10, 10, 10], pbc=True)
    periodic.calc = potential.calculator()
    with pytest.raises(ConfigError, match="periodic") as info:
        periodic.get_forces()
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"Cl not in the model's training data"):
        potential.predict(np.array([6, 17]), np.array([[0, 0, 0], [1.8, 0, 0]]))


def test_missing_ase_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ase", None)  # import ase raises ImportError
    monkeypatch.delitem(sys.modules, "packedqdc.ase")
    with pytest.raises(ConfigError, match=r"pip install 'packedqdc\[ase\]'"):
        import packedqdc.ase  # noqa: F401
