"""What a dipole term does to energy and force errors: GFN2-xTB data with dipoles, trained with and without it.

    python benchmarks/dipoles.py generate --cache CACHE [--molecules 30] [--per-molecule 100]
        The first ``--molecules`` molecules of benchmarks/accuracy.py's list plus its ions (2-33 atoms,
        H C N O F S Cl), ``--per-molecule`` displaced conformers each (as accuracy.py: RDKit ETKDG +
        MMFF94, Gaussian noise with a per-conformer std from [0.02, 0.06] Å), GFN2-xTB energies,
        forces and dipoles from tblite. tblite reports dipoles in e·bohr about the coordinate origin
        (an ion's then depends on where it sits); they are written in e·Å and ``pack npz`` moves
        them to each molecule's centroid (``--dipole-origin coordinates``). 20 conformers of each
        molecule are held out: CACHE/train and CACHE/test (packed, with D.f64).

    python benchmarks/dipoles.py compare --cache CACHE --runs-dir RUNS [--epochs 12] [--seeds 0 1]
            [--weights 0 27.21] [-- TRAIN FLAGS]
        For every seed and dipole weight, ``packedqdc train`` for a fixed number of epochs (equal
        steps), then ``packedqdc evaluate`` on CACHE/test; prints energy, force and dipole MAE side
        by side with the mean over seeds.

Needs ``pip install tblite rdkit`` for ``generate`` only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import BOHR_TO_ANGSTROM, FORCE_TO_KCAL_MOL_ANGSTROM, HARTREE_TO_KCAL_MOL, MOLECULES, SIGMA, _embed  # noqa: E402

TEST_PER_MOLECULE = 20


def _xtb(numbers: np.ndarray, positions: np.ndarray, charge: int) -> tuple[float, np.ndarray, np.ndarray]:
    """GFN2-xTB energy (kcal/mol), forces (kcal/mol/Å) and dipole (e·Å, about the coordinate origin)."""
    from tblite.interface import Calculator

    calc = Calculator("GFN2-xTB", numbers, positions / BOHR_TO_ANGSTROM, charge=float(charge),
                      uhf=int(numbers.sum() - charge) % 2)
    calc.set("verbosity", 0)
    result = calc.singlepoint()
    return (float(result.get("energy")) * HARTREE_TO_KCAL_MOL,
            -np.asarray(result.get("gradient")) * FORCE_TO_KCAL_MOL_ANGSTROM,
            np.asarray(result.get("dipole")) * BOHR_TO_ANGSTROM)


def _molecule(args: tuple[int, int, int]) -> tuple[str, dict]:
    index, per_molecule, seed = args
    name, smiles = MOLECULES[index]
    rng = np.random.default_rng([seed, index, 7])
    numbers, geometries, charge = _embed(smiles, 10, seed + index)
    R, E, F, D = [], [], [], []
    while len(R) < per_molecule:
        base = geometries[rng.integers(len(geometries))]
        pos = base + rng.normal(scale=rng.uniform(*SIGMA), size=base.shape)
        try:
            e, f, d = _xtb(numbers, pos, charge)
        except Exception:  # an SCF that does not converge on a wild geometry: draw another
            continue
        R.append(pos), E.append(e), F.append(f), D.append(d)
    return name, {"Z": numbers, "R": np.array(R), "E": np.array(E), "F": np.array(F), "D": np.array(D),
                  "Q": float(charge)}


def generate(cache: Path, n_molecules: int, per_molecule: int, workers: int, seed: int = 0) -> None:
    from packedqdc.pack import pack_npz

    cache.mkdir(parents=True, exist_ok=True)
    ions = [i for i, (_, s) in enumerate(MOLECULES) if "+" in s or "-]" in s]
    chosen = sorted(set(range(n_molecules)) | set(ions))
    start = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(_molecule, [(i, per_molecule, seed) for i in chosen]))
    print(f"xTB: {len(chosen)} molecules x {per_molecule} conformers in {time.perf_counter() - start:.0f} s")
    splits: dict[str, list] = {"train": [], "test": []}
    for name, d in results:
        for rank, k in enumerate(np.random.default_rng([seed, len(name)]).permutation(per_molecule)):
            record = (d["Z"], d["R"][k], d["E"][k], d["F"][k], d["Q"], d["D"][k])
            splits["test" if rank < TEST_PER_MOLECULE else "train"].append(record)
    for split, records in splits.items():
        records = [records[i] for i in np.random.default_rng([seed, 99]).permutation(len(records))]
        a, m = max(len(r[0]) for r in records), len(records)
        out = {"R": np.zeros((m, a, 3), np.float32), "Z": np.zeros((m, a), np.int32),
               "N": np.array([len(r[0]) for r in records], np.int32), "E": np.array([r[2] for r in records]),
               "F": np.zeros((m, a, 3), np.float32), "Q": np.array([r[4] for r in records]),
               "D": np.array([r[5] for r in records])}
        for i, (Z, R, _, F, _, _) in enumerate(records):
            out["Z"][i, :len(Z)], out["R"][i, :len(Z)], out["F"][i, :len(Z)] = Z, R, F
        npz = cache / f"{split}.npz"
        np.savez(npz, **out)
        pack_npz(npz, cache / split, energy_unit="kcal/mol", length_unit="ang", force=(cache / split).exists())
        npz.unlink()
        print(f"packed {m} {split} conformers into {cache / split}")


def compare(cache: Path, runs_dir: Path, epochs: int, seeds: list[int], weights: list[float], flags: list[str]) -> None:
    results: dict[float, list[dict]] = {w: [] for w in weights}
    for seed in seeds:
        for w in weights:
            name = f"dip-w{w:g}-s{seed}"
            cmd = [sys.executable, "-m", "packedqdc", "train", "--data-path", str(cache / "train"), "--runs-dir",
                   str(runs_dir), "--name", name, "--num-epochs", str(epochs), "--seed", str(seed),
                   "--dipole-weight", str(w), *flags]
            print("$", " ".join(cmd[1:]), flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            out = subprocess.run([sys.executable, "-m", "packedqdc", "evaluate", str(runs_dir / name), "--data-path",
                                  str(cache / "test"), "--json"], check=True, capture_output=True, text=True)
            r = {**json.loads(out.stdout), "seconds": seconds, "load": os.getloadavg()[0]}
            results[w].append(r)
            print(f"  w_D={w:g} seed {seed}: E MAE {r['energy_mae']:.3f} kcal/mol, F MAE {r['forces_mae']:.3f} "
                  f"kcal/mol/Å, D MAE {r['dipole_mae']:.4f} e·Å ({seconds:.0f} s, load {r['load']:.1f})", flush=True)
    print(f"\n{'w_D':>6s} {'E MAE':>8s} {'F MAE':>8s} {'D MAE':>8s}   (mean over seeds {seeds}, {epochs} epochs)")
    for w, rs in results.items():
        mean = {k: float(np.mean([r[k] for r in rs])) for k in ("energy_mae", "forces_mae", "dipole_mae")}
        print(f"{w:6g} {mean['energy_mae']:8.3f} {mean['forces_mae']:8.3f} {mean['dipole_mae']:8.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--cache", type=Path, required=True)
    g.add_argument("--molecules", type=int, default=30)
    g.add_argument("--per-molecule", type=int, default=100)
    g.add_argument("--workers", type=int, default=2)
    c = sub.add_parser("compare")
    c.add_argument("--cache", type=Path, required=True)
    c.add_argument("--runs-dir", type=Path, required=True)
    c.add_argument("--epochs", type=int, default=12)
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    c.add_argument("--weights", type=float, nargs="+", default=[0.0, 27.211386024367243])
    c.add_argument("flags", nargs=argparse.REMAINDER, help="flags for packedqdc train, after --")
    args = parser.parse_args()
    if args.command == "generate":
        generate(args.cache, args.molecules, args.per_molecule, args.workers)
    else:
        compare(args.cache, args.runs_dir, args.epochs, args.seeds, args.weights, [f for f in args.flags if f != "--"])


if __name__ == "__main__":
    main()
