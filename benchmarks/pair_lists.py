"""SPICE-sized molecules: training on all pairs against cutoff pair lists (with full-range Coulomb).

    python benchmarks/pair_lists.py generate --cache CACHE [--per-molecule 250] [--workers 2]
        Seven drug-like molecules of 49-113 atoms (two of them ions), ``--per-molecule`` conformers
        each: RDKit ETKDG + MMFF94 geometries displaced by Gaussian noise (per-conformer std from
        [0.02, 0.06] Å, as benchmarks/accuracy.py), GFN2-xTB energies and forces from tblite. 40
        conformers of each molecule are held out: CACHE/train, CACHE/test.

    python benchmarks/pair_lists.py compare --cache CACHE --runs-dir RUNS [--epochs 6] [--seeds 0]
            [-- TRAIN FLAGS]
        For every seed, ``packedqdc train --pair-list all`` and ``--pair-list cutoff`` for the same
        number of epochs (equal steps), run one after the other, then ``packedqdc evaluate`` on
        CACHE/test. Prints training molecules/s (epochs after the first, which compiles) and the
        held-out errors side by side, and the pair counts of both lists.

    python benchmarks/pair_lists.py speed --data DIR [--steps 20] [--rounds 3] [--features 64]
        The jitted train step alone on DIR's packed batches, all pairs against cutoff lists with the
        banded Coulomb term (the model each ``--pair-list`` builds), taking turns ``--rounds`` times
        on the same machine; best round of each. For any packed directory (small molecules too).

Needs ``pip install tblite rdkit`` for ``generate`` only.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import SIGMA, _embed, _xtb  # noqa: E402
from step_timing import best_pass_seconds, run_pass  # noqa: E402

#: (name, SMILES): drug-like molecules of SPICE's sizes; the charge is the SMILES's formal charge
MOLECULES: tuple[tuple[str, str], ...] = (
    ("palmitic-acid", "CCCCCCCCCCCCCCCC(=O)O"),
    ("sildenafil", "CCCc1nn(C)c2c(=O)[nH]c(-c3cc(S(=O)(=O)N4CCN(C)CC4)ccc3OCC)nc12"),
    ("imatinib-H+", "Cc1ccc(NC(=O)c2ccc(C[NH+]3CCN(C)CC3)cc2)cc1Nc1nccc(-c2cccnc2)n1"),
    ("cholesterol", "CC(C)CCC[C@@H](C)[C@H]1CC[C@H]2[C@@H]3CC=C4C[C@@H](O)CC[C@]4(C)[C@H]3CC[C@]12C"),
    ("atorvastatin-", "CC(C)c1c(C(=O)Nc2ccccc2)c(-c2ccccc2)c(-c2ccc(F)cc2)n1CC[C@@H](O)C[C@@H](O)CC(=O)[O-]"),
    ("peptide-AGSLV", "CC(C)C[C@H](NC(=O)[C@H](CO)NC(=O)CNC(=O)[C@H](C)N)C(=O)N[C@@H](C(C)C)C(=O)O"),
    ("paclitaxel", "CC1=C2[C@@]([C@]([C@H]([C@@H]3[C@]4([C@H](OC4)C[C@@H]([C@]3(C(=O)[C@@H]2OC(=O)C)C)O)"
                   "OC(=O)C)OC(=O)c5ccccc5)(C[C@@H]1OC(=O)[C@H](O)[C@@H](NC(=O)c6ccccc6)c7ccccc7)O)(C)C"),
)
TEST_PER_MOLECULE = 40


def _molecule(args: tuple[int, int, int]) -> tuple[str, dict]:
    index, per_molecule, seed = args
    name, smiles = MOLECULES[index]
    rng = np.random.default_rng([seed, index, 11])
    numbers, geometries, charge = _embed(smiles, 10, seed + index)
    R, E, F = [], [], []
    start = time.perf_counter()
    while len(R) < per_molecule:
        base = geometries[rng.integers(len(geometries))]
        pos = base + rng.normal(scale=rng.uniform(*SIGMA), size=base.shape)
        try:
            e, f = _xtb(numbers, pos, charge)
        except Exception:  # an SCF that does not converge: draw another geometry
            continue
        R.append(pos), E.append(e), F.append(f)
    print(f"{name:16s} q={charge:+d} atoms={len(numbers):3d} E spread {np.ptp(E):6.1f} kcal/mol "
          f"{time.perf_counter() - start:5.0f} s", flush=True)
    return name, {"Z": numbers, "R": np.array(R), "E": np.array(E), "F": np.array(F), "Q": float(charge)}


def generate(cache: Path, per_molecule: int, workers: int, seed: int = 0) -> None:
    from packedqdc.pack import pack_npz

    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(_molecule, [(i, per_molecule, seed) for i in range(len(MOLECULES))]))
    splits: dict[str, list] = {"train": [], "test": []}
    for index, (_, d) in enumerate(results):
        for rank, k in enumerate(np.random.default_rng([seed, index, 1]).permutation(per_molecule)):
            splits["test" if rank < TEST_PER_MOLECULE else "train"].append((d["Z"], d["R"][k], d["E"][k], d["F"][k], d["Q"]))
    for split, records in splits.items():
        records = [records[i] for i in np.random.default_rng([seed, 99]).permutation(len(records))]
        a, m = max(len(r[0]) for r in records), len(records)
        out = {"R": np.zeros((m, a, 3), np.float32), "Z": np.zeros((m, a), np.int32),
               "N": np.array([len(r[0]) for r in records], np.int32), "E": np.array([r[2] for r in records]),
               "F": np.zeros((m, a, 3), np.float32), "Q": np.array([r[4] for r in records])}
        for i, (Z, R, _, F, _) in enumerate(records):
            out["Z"][i, :len(Z)], out["R"][i, :len(Z)], out["F"][i, :len(Z)] = Z, R, F
        npz = cache / f"{split}.npz"
        np.savez(npz, **out)
        pack_npz(npz, cache / split, energy_unit="kcal/mol", length_unit="ang", force=(cache / split).exists())
        npz.unlink()
        print(f"packed {m} {split} conformers into {cache / split}")


def _pair_counts(data: Path, cutoff: float) -> tuple[int, int]:
    from packedqdc.batching import all_pair_counts, cutoff_pair_counts
    from packedqdc.format import open_packed

    ds = open_packed(data)
    return (int(all_pair_counts(np.asarray(ds.n_atoms)).sum()),
            int(cutoff_pair_counts(ds, np.asarray(ds.offsets, dtype=np.int64), cutoff).sum()))


def compare(cache: Path, runs_dir: Path, epochs: int, seeds: list[int], flags: list[str], cutoff: float) -> None:
    every, near = _pair_counts(cache / "train", cutoff)
    print(f"pairs in the training set: all {every:,}, within {cutoff} Å {near:,} ({near / every:.0%})")
    rows = []
    for seed in seeds:
        for pair_list in ("all", "cutoff"):
            name = f"pairs-{pair_list}-s{seed}"
            cmd = [sys.executable, "-m", "packedqdc", "train", "--data-path", str(cache / "train"), "--runs-dir",
                   str(runs_dir), "--name", name, "--num-epochs", str(epochs), "--seed", str(seed), "--pair-list",
                   pair_list, "--cutoff", str(cutoff), *flags]
            print("$", " ".join(cmd[1:]), flush=True)
            load = os.getloadavg()[0]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            with open(runs_dir / name / "metrics.csv", newline="") as fh:
                speeds = [float(r["train_mol_per_s"]) for r in csv.DictReader(fh)][1:]
            out = subprocess.run([sys.executable, "-m", "packedqdc", "evaluate", str(runs_dir / name), "--data-path",
                                  str(cache / "test"), "--json"], check=True, capture_output=True, text=True)
            r = {"pair_list": pair_list, "seed": seed, **json.loads(out.stdout), "seconds": seconds,
                 "mol_per_s": float(np.mean(speeds)) if speeds else float("nan"), "load": load}
            rows.append(r)
            print(f"  {pair_list:6s} seed {seed}: {r['mol_per_s']:6.1f} molecules/s, E MAE {r['energy_mae']:.2f} "
                  f"kcal/mol, F MAE {r['forces_mae']:.2f} kcal/mol/Å ({seconds:.0f} s, load {load:.1f} at start)",
                  flush=True)
    print(f"\n{'pairs':8s} {'mol/s':>7s} {'E MAE':>7s} {'F MAE':>7s}   (mean over seeds {seeds}, {epochs} epochs)")
    for pair_list in ("all", "cutoff"):
        rs = [r for r in rows if r["pair_list"] == pair_list]
        print(f"{pair_list:8s} {np.mean([r['mol_per_s'] for r in rs]):7.1f} {np.mean([r['energy_mae'] for r in rs]):7.2f} "
              f"{np.mean([r['forces_mae'] for r in rs]):7.2f}")


def speed(data: Path, steps: int, rounds: int, features: int, cutoff: float, batch_size: int) -> None:
    import jax

    from packedqdc.loader import PackedMemmapLoader
    from packedqdc.model.physnet import init_params
    from packedqdc.train import TrainConfig, fit_reference_energies
    from packedqdc.train.data import LoaderStream
    from packedqdc.train.optim import make_optimizer
    from packedqdc.train.session import model_for
    from packedqdc.train.state import create_state
    from packedqdc.train.step import loss_weights, make_train_step

    loader = PackedMemmapLoader(data, batch_size=batch_size, shuffle=True, seed=0)
    reference = fit_reference_energies(loader.dataset, np.arange(loader.N))
    max_atoms = int(loader.n_atoms.max())
    runs, counts = {}, {}
    for pair_list in ("all", "cutoff"):
        cfg = TrainConfig(features=features, cutoff=cutoff, batch_size=batch_size, pair_list=pair_list)
        stream = LoaderStream(loader, reference, layout="packed", num_atoms=max_atoms,
                              cutoff=cutoff if pair_list == "cutoff" else None)
        batches = []
        for global_batch, _ in stream.epoch():
            batches.append(jax.device_put(global_batch))
            if len(batches) == steps:
                break
        loader.restore({"seed": 0, "epoch": 0, "position": 0})
        n_mol = sum(int(np.asarray(b["mol_mask"]).sum()) for b in batches)
        n_pairs = sum(int(np.asarray(b["pair_mask"]).sum()) for b in batches)
        model = model_for(cfg, reference, True, max_atoms)
        params = init_params(model, jax.random.PRNGKey(0), {k: v[0] for k, v in batches[0].items()})
        step = make_train_step(model, cfg, loss_weights(cfg))
        state = run_pass(step, create_state(params, make_optimizer(cfg), jax.random.PRNGKey(1)), batches)
        runs[pair_list] = (step, state, batches)
        counts[pair_list] = (n_mol, n_pairs)
    best = best_pass_seconds(runs, rounds)
    print(f"{data}: largest molecule {max_atoms} atoms, features {features}, cutoff {cutoff} Å, {steps} steps of "
          f"~{batch_size} molecules, best of {rounds} rounds; load average {os.getloadavg()[0]:.1f}")
    for pair_list, (n_mol, n_pairs) in counts.items():
        print(f"  {pair_list:6s} {n_mol / best[pair_list]:7.1f} molecules/s  ({n_pairs / n_mol:7.1f} real pairs per molecule)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--cache", type=Path, required=True)
    g.add_argument("--per-molecule", type=int, default=250)
    g.add_argument("--workers", type=int, default=2)
    c = sub.add_parser("compare")
    c.add_argument("--cache", type=Path, required=True)
    c.add_argument("--runs-dir", type=Path, required=True)
    c.add_argument("--epochs", type=int, default=6)
    c.add_argument("--seeds", type=int, nargs="+", default=[0])
    c.add_argument("--cutoff", type=float, default=5.0)
    c.add_argument("flags", nargs=argparse.REMAINDER, help="flags for packedqdc train, after --")
    s = sub.add_parser("speed")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--features", type=int, default=64)
    s.add_argument("--cutoff", type=float, default=5.0)
    s.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if args.command == "generate":
        generate(args.cache, args.per_molecule, args.workers)
    elif args.command == "speed":
        speed(args.data, args.steps, args.rounds, args.features, args.cutoff, args.batch_size)
    else:
        compare(args.cache, args.runs_dir, args.epochs, args.seeds, [f for f in args.flags if f != "--"], args.cutoff)


if __name__ == "__main__":
    main()
