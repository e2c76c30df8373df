"""Molecular dynamics with a trained PhysNet through ASE: BFGS, then NVE velocity Verlet, and the drift.

    python examples/md_ase.py                       # train briefly on the bundled sample first
    python examples/md_ase.py --run runs/NAME       # or use a trained run
    python examples/md_ase.py --molecule 9 --steps 2000 --dt 0.25 --temperature 300

Without ``--run`` it trains a small PhysNet (``--features``, ``--epochs``) on the bundled sample into
``--runs-dir`` (reused when it is already there). It takes a sample molecule (``--molecule``: index in
the sample; default the first 1-butanol conformer, 15 atoms), optimises it with BFGS to fmax < 0.05
eV/Å, draws Maxwell-Boltzmann velocities at ``--temperature``, runs NVE velocity Verlet and prints
the total energy every 10% of the run, then its drift per atom: end minus start, the slope of a
least-squares line over the run (the systematic part), and the fluctuation (max - min); and the XLA
compilations the run needed (one per size class, 0 once the calculator is warm). Needs the ``ase``
extra.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.md.velocitydistribution import Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

from packedqdc.compiles import CountCompilations
from packedqdc.format import open_packed
from packedqdc.train import Potential, TrainConfig, fit, start_run
from packedqdc.train.data import default_data_path


def train_on_sample(runs_dir: Path, features: int, epochs: int) -> Path:
    """A short run on the bundled sample (reused if ``runs_dir/md-example`` exists)."""
    run = runs_dir / "md-example"
    if (run / "checkpoints" / "best").is_dir():
        print(f"using the existing run {run}")
        return run
    print(f"training PhysNet (features {features}, {epochs} epochs) on the bundled sample into {run} ...")
    trainer = start_run(TrainConfig(runs_dir=str(runs_dir), name="md-example", features=features,
                                    num_epochs=epochs, batch_size=16, layout="padded", num_atoms=15,
                                    learning_rate=3e-3, valid_fraction=0.1))
    result = fit(trainer)
    trainer.close()
    print(f"trained: best valid loss {result.best_valid_loss:.4g}")
    return run


def sample_molecule(data: Path, index: int | None) -> Atoms:
    """Molecule ``index`` of the packed sample (default: the first with 15 atoms) as ASE Atoms."""
    ds = open_packed(data)
    if index is None:
        index = int(np.flatnonzero(np.asarray(ds.n_atoms) == 15)[0])
    m = ds.molecule(index)
    return Atoms(numbers=m["Z"], positions=m["R"].astype(np.float64), info={"charge": m["Qtot"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="trained run directory (default: train on the sample)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--molecule", type=int, default=None, help="index in the sample")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--dt", type=float, default=0.25, help="time step, fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="initial temperature, K")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    run = args.run or train_on_sample(args.runs_dir, args.features, args.epochs)
    atoms = sample_molecule(default_data_path(args.runs_dir), args.molecule)
    atoms.calc = Potential.load(run).calculator()
    print(f"{atoms.get_chemical_formula()} (charge {atoms.info['charge']:+g} e): "
          f"E = {atoms.get_potential_energy():.4f} eV, max |F| = {np.abs(atoms.get_forces()).max():.3f} eV/Å")

    optimizer = BFGS(atoms, logfile=None)
    converged = optimizer.run(fmax=0.05, steps=1000)
    fmax = np.linalg.norm(atoms.get_forces(), axis=1).max()
    print(f"BFGS: {'converged' if converged else 'NOT converged'} in {optimizer.nsteps} steps, "
          f"fmax {fmax:.4f} eV/Å, E = {atoms.get_potential_energy():.4f} eV")

    rng = np.random.default_rng(args.seed)
    sigma = np.sqrt(atoms.get_masses() * units.kB * args.temperature)
    atoms.set_momenta(rng.normal(size=(len(atoms), 3)) * sigma[:, None])
    Stationary(atoms)
    ZeroRotation(atoms)
    dyn = VelocityVerlet(atoms, args.dt * units.fs)
    totals: list[float] = []
    report = max(args.steps // 10, 1)

    def record() -> None:
        totals.append(atoms.get_total_energy())
        if (dyn.nsteps % report) == 0:
            print(f"  step {dyn.nsteps:>6}  t = {dyn.nsteps * args.dt / 1000:.3f} ps  E_tot = {totals[-1]:.6f} eV  "
                  f"T = {atoms.get_temperature():6.1f} K")

    dyn.attach(record, interval=1)
    print(f"NVE velocity Verlet: {args.steps} steps of {args.dt} fs ({args.steps * args.dt / 1000:.3f} ps)")
    with CountCompilations() as compiled:
        dyn.run(args.steps)
    total = np.asarray(totals) / len(atoms)
    slope = np.polyfit(np.arange(total.size), total, 1)[0] * (total.size - 1)
    print(f"total-energy drift per atom over {args.steps * args.dt / 1000:.3f} ps: end - start "
          f"{(total[-1] - total[0]) * 1e3:+.4f} meV/atom, fitted {slope * 1e3:+.4f} meV/atom, "
          f"fluctuation (max - min) {np.ptp(total) * 1e3:.4f} meV/atom")
    print(f"XLA compilations during the MD run: {compiled.count}")


if __name__ == "__main__":
    main()
