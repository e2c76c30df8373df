"""Using a trained model: the ASE calculator's time per call, compilations in MD, and batch prediction
throughput beside training throughput of the same model.

    python benchmarks/predict.py [--features 128] [--epochs 3] [--md-steps 1000] [--repeats 200]
                                 [--run RUN] [--data DIR]

1. Trains PhysNet (``--features``, 3 modules) for ``--epochs`` epochs on ``--data`` (default: the
   bundled sample, packed into a temporary directory) with ``packedqdc.train``'s defaults (packed
   layout, batch 32), unless ``--run`` names a trained run. Training molecules/s is the last epoch's
   ``train_mol_per_s`` of metrics.csv (epoch 1 compiles).
2. ``get_forces`` of the ASE calculator on hexane (C6H14, 20 atoms, embedded by RDKit, or a
   zig-zag chain without it): the mean over ``--repeats`` calls at moved positions after warm-up.
3. NVE velocity Verlet, ``--md-steps`` steps of 0.5 fs on hexane and then on water (another size
   class): XLA compilations counted with ``packedqdc.compiles`` (expected: 0 on hexane after
   warm-up, 1 for water's class).
4. ``predict_packed`` over the data (all local devices) at the run's batch size: molecules/s of a
   second pass (the first compiles the budget classes), beside the training figure.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from ase import Atoms, units
from ase.md.verlet import VelocityVerlet

from packedqdc.compiles import CountCompilations
from packedqdc.data import SAMPLE_NPZ
from packedqdc.pack import pack_npz
from packedqdc.train import Potential, TrainConfig, fit, start_run
from packedqdc.train.inference import predict_packed


def hexane() -> Atoms:
    """C6H14 (20 atoms) in a reasonable geometry."""
    try:
        from rdkit import Chem
        from rdkit.Chem import AllChem

        mol = Chem.AddHs(Chem.MolFromSmiles("CCCCCC"))
        AllChem.EmbedMolecule(mol, randomSeed=0)
        AllChem.MMFFOptimizeMolecule(mol)
        return Atoms(numbers=[a.GetAtomicNum() for a in mol.GetAtoms()], positions=mol.GetConformer().GetPositions())
    except ImportError:  # a zig-zag chain with tetrahedral hydrogens
        numbers, positions = [], []
        for i in range(6):
            c = np.array([1.25 * i, 0.45 * (-1) ** i, 0.0])
            numbers.append(6)
            positions.append(c)
            hs = [(0, -0.9 * (-1) ** i, 0.9), (0, -0.9 * (-1) ** i, -0.9)] + ([(-1.0, 0.3, 0)] if i == 0 else []) \
                + ([(1.0, 0.3, 0)] if i == 5 else [])
            for h in hs:
                numbers.append(1)
                positions.append(c + np.array(h) * 1.09 / np.linalg.norm(h))
        return Atoms(numbers=numbers, positions=positions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--md-steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--run", type=Path)
    parser.add_argument("--data", type=Path)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, devices {jax.devices()}, load average {os.getloadavg()}")
    tmp = Path(tempfile.mkdtemp(prefix="packedqdc-bench-predict-"))
    data = args.data or pack_npz(SAMPLE_NPZ, tmp / "sample").path
    run = args.run
    if run is None:
        trainer = start_run(TrainConfig(data_path=str(data), runs_dir=str(tmp), name="bench",
                                        features=args.features, num_epochs=args.epochs))
        fit(trainer)
        trainer.close()
        run = trainer.run_dir
    with open(run / "metrics.csv", newline="") as fh:
        train_rate = float(list(csv.DictReader(fh))[-1]["train_mol_per_s"])
    potential = Potential.load(run)
    features = potential.model.features

    atoms = hexane()
    atoms.calc = potential.calculator()
    atoms.get_forces()  # warm-up: compiles hexane's size class
    rng = np.random.default_rng(0)
    start_positions = atoms.positions.copy()
    times = []
    for _ in range(args.repeats):
        atoms.positions = start_positions + rng.normal(scale=0.01, size=start_positions.shape)
        t0 = time.perf_counter()
        atoms.get_forces()
        times.append(time.perf_counter() - t0)
    times_ms = np.asarray(times) * 1e3
    print(f"get_forces, C6H14 (20 atoms), features {features}: mean {times_ms.mean():.3f} ms, "
          f"median {np.median(times_ms):.3f} ms over {args.repeats} calls after warm-up")

    atoms.positions = start_positions
    atoms.set_momenta(rng.normal(size=(20, 3)) * np.sqrt(atoms.get_masses() * units.kB * 300)[:, None])
    with CountCompilations() as hexane_md:
        t0 = time.perf_counter()
        VelocityVerlet(atoms, 0.5 * units.fs).run(args.md_steps)
        md_s = time.perf_counter() - t0
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    water.calc = potential.calculator()
    with CountCompilations() as water_md:
        VelocityVerlet(water, 0.5 * units.fs).run(args.md_steps)
    print(f"MD {args.md_steps} steps: C6H14 {hexane_md.count} compilations ({md_s / args.md_steps * 1e3:.3f} ms/step), "
          f"then H2O (a new size class) {water_md.count} compilation(s)")

    first = predict_packed(potential, data)
    second = predict_packed(potential, data)
    n = second.n_molecules
    print(f"predict over {data} ({n} molecules, {len(jax.local_devices())} device(s)): "
          f"{n / second.seconds:,.0f} molecules/s (first pass with compilation {n / first.seconds:,.0f}); "
          f"training the same model: {train_rate:,.0f} molecules/s")


if __name__ == "__main__":
    main()
