"""Accuracy per CPU-minute: a held-out GFN2-xTB benchmark, a timed ``packedqdc train``, and the errors.

Three steps, each usable alone (``CACHE`` is any directory; nothing is shipped in the package):

    python benchmarks/accuracy.py generate --cache CACHE [--workers 2]
        60 molecules (2-33 atoms, H C N O F S Cl; 11 of them ions), 380 conformers each: RDKit ETKDG
        conformers relaxed with MMFF94 and displaced by Gaussian noise (per-coordinate std drawn
        from [0.02, 0.06] Å per conformer, so energies spread), GFN2-xTB energies and forces from
        tblite (as scripts/make_sample.py). 42 conformers of each molecule are held out for testing:
        20,280 train and 2,520 test conformers, packed into CACHE/train and CACHE/test, with
        CACHE/test_molecules.json naming the molecule of every test conformer.
        Each molecule is computed by one process into CACHE/conformers/NAME.npz (written atomically;
        a lock file per molecule keeps concurrent generators apart), so a killed or concurrent
        generation resumes where it stopped.

    python benchmarks/accuracy.py train --cache CACHE --runs-dir RUNS --name NAME --max-time 480 [-- TRAIN FLAGS]
        ``packedqdc train --data-path CACHE/train --max-time ...`` with the given extra flags.

    python benchmarks/accuracy.py evaluate --cache CACHE --run RUNS/NAME [--json OUT]
        Energy and force MAE on CACHE/test, neutral and ions apart, and a per-molecule table
        (worst first: the tail), from the run's best checkpoint (EMA weights).

``run`` does train then evaluate. Needs ``pip install tblite rdkit`` for ``generate`` only.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HARTREE_TO_KCAL_MOL = 627.509474
BOHR_TO_ANGSTROM = 0.529177210903
FORCE_TO_KCAL_MOL_ANGSTROM = HARTREE_TO_KCAL_MOL / BOHR_TO_ANGSTROM

#: (name, SMILES); the total charge is the SMILES's formal charge. 49 neutral molecules, 11 ions.
MOLECULES: tuple[tuple[str, str], ...] = (
    ("hydrogen-fluoride", "F"), ("hydrogen-chloride", "Cl"), ("water", "O"), ("hydrogen-sulfide", "S"),
    ("ammonia", "N"), ("methane", "C"), ("acetylene", "C#C"), ("hydrogen-cyanide", "C#N"),
    ("formaldehyde", "C=O"), ("methanol", "CO"), ("methanethiol", "CS"), ("chloromethane", "CCl"),
    ("fluoromethane", "CF"), ("ethylene", "C=C"), ("ethane", "CC"), ("acetonitrile", "CC#N"),
    ("formic-acid", "OC=O"), ("acetaldehyde", "CC=O"), ("ethanol", "CCO"), ("dimethyl-ether", "COC"),
    ("formamide", "NC=O"), ("methylamine", "CN"), ("acetone", "CC(C)=O"), ("acetic-acid", "CC(=O)O"),
    ("dimethyl-sulfide", "CSC"), ("dichloromethane", "ClCCl"), ("fluoroform", "FC(F)F"), ("urea", "NC(N)=O"),
    ("glycine", "NCC(=O)O"), ("malonaldehyde", "O=CC=CO"), ("propane", "CCC"), ("cyclopropane", "C1CC1"),
    ("1-butanol", "CCCCO"), ("cyclohexane", "C1CCCCC1"), ("benzene", "c1ccccc1"), ("pyridine", "c1ccncc1"),
    ("furan", "c1ccoc1"), ("thiophene", "c1ccsc1"), ("pyrrole", "c1cc[nH]c1"), ("phenol", "Oc1ccccc1"),
    ("toluene", "Cc1ccccc1"), ("chlorobenzene", "Clc1ccccc1"), ("N-methylacetamide", "CC(=O)NC"),
    ("2,2,2-trifluoroethanol", "OCC(F)(F)F"), ("alanine", "CC(N)C(=O)O"), ("dimethyl-sulfoxide", "CS(C)=O"),
    ("aspirin", "CC(=O)Oc1ccccc1C(=O)O"), ("caffeine", "Cn1cnc2c1c(=O)n(C)c(=O)n2C"),
    ("ibuprofen", "CC(C)Cc1ccc(cc1)C(C)C(=O)O"),
    # ions
    ("hydroxide", "[OH-]"), ("hydronium", "[OH3+]"), ("ammonium", "[NH4+]"), ("formate", "O=C[O-]"),
    ("acetate", "CC(=O)[O-]"), ("methanethiolate", "C[S-]"), ("methylammonium", "C[NH3+]"),
    ("phenolate", "[O-]c1ccccc1"), ("imidazolium", "c1c[nH+]c[nH]1"), ("guanidinium", "NC(N)=[NH2+]"),
    ("trimethylammonium", "C[NH+](C)C"),
)
PER_MOLECULE = 380
TEST_PER_MOLECULE = 42
SIGMA = (0.02, 0.06)  # Å, as scripts/make_sample.py


# --------------------------------------------------------------------------------------------- generate
def _xtb(numbers: np.ndarray, positions: np.ndarray, charge: int) -> tuple[float, np.ndarray]:
    """GFN2-xTB energy (kcal/mol) and forces (kcal/mol/Å) at positions in Å."""
    from tblite.interface import Calculator

    calc = Calculator("GFN2-xTB", numbers, positions / BOHR_TO_ANGSTROM, charge=float(charge),
                      uhf=int(numbers.sum() - charge) % 2)
    calc.set("verbosity", 0)
    result = calc.singlepoint()
    return (float(result.get("energy")) * HARTREE_TO_KCAL_MOL,
            -np.asarray(result.get("gradient")) * FORCE_TO_KCAL_MOL_ANGSTROM)


def _embed(smiles: str, n_conformers: int, seed: int) -> tuple[np.ndarray, list[np.ndarray], int]:
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=n_conformers, params=params))
    if not ids:
        raise RuntimeError(f"{smiles}: RDKit could not embed a conformer")
    AllChem.MMFFOptimizeMoleculeConfs(mol, maxIters=500)
    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int32)
    return numbers, [np.array(mol.GetConformer(i).GetPositions()) for i in ids], Chem.GetFormalCharge(mol)


def generate_molecule(cache: Path, index: int, seed: int = 0) -> str:
    """Compute CACHE/conformers/NAME.npz for MOLECULES[index] unless it exists or another process
    holds its lock; returns a line for the log."""
    name, smiles = MOLECULES[index]
    out_dir = cache / "conformers"
    target = out_dir / f"{name}.npz"
    if target.exists():
        return f"{name}: done before"
    with open(out_dir / f"{name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return f"{name}: another process is on it"
        if target.exists():
            return f"{name}: done before"
        start = time.perf_counter()
        rng = np.random.default_rng([seed, index])
        numbers, geometries, charge = _embed(smiles, 10, seed + index)
        R = np.zeros((PER_MOLECULE, len(numbers), 3))
        F = np.zeros_like(R)
        E = np.zeros(PER_MOLECULE)
        sigma = np.zeros(PER_MOLECULE)
        k = 0
        while k < PER_MOLECULE:
            base = geometries[rng.integers(len(geometries))]
            sigma[k] = rng.uniform(*SIGMA)
            R[k] = base + rng.normal(scale=sigma[k], size=base.shape)
            try:
                E[k], F[k] = _xtb(numbers, R[k], charge)
            except Exception:  # an SCF that does not converge on a wild geometry: draw another
                continue
            k += 1
        tmp = out_dir / f".{name}.{os.getpid()}.npz"
        np.savez(tmp, Z=numbers, R=R, E=E, F=F, Q=np.float64(charge), sigma=sigma, smiles=np.str_(smiles))
        os.replace(tmp, target)
        return (f"{name:24s} {smiles:28s} q={charge:+d} atoms={len(numbers):2d} E spread {np.ptp(E):7.1f} "
                f"kcal/mol  {time.perf_counter() - start:6.1f} s")


def _to_padded(records: list[tuple[np.ndarray, np.ndarray, float, np.ndarray, float]], info: str) -> dict:
    a = max(len(r[0]) for r in records)
    m = len(records)
    out = {"R": np.zeros((m, a, 3), np.float32), "Z": np.zeros((m, a), np.int32),
           "N": np.array([len(r[0]) for r in records], np.int32), "E": np.array([r[2] for r in records]),
           "F": np.zeros((m, a, 3), np.float32), "Q": np.array([r[4] for r in records]), "info": np.str_(info)}
    for i, (Z, R, _, F, _) in enumerate(records):
        out["Z"][i, :len(Z)], out["R"][i, :len(Z)], out["F"][i, :len(Z)] = Z, R, F
    return out


def assemble(cache: Path, seed: int = 0) -> None:
    """Split every molecule's conformers into train and test, shuffle, pack CACHE/train and CACHE/test."""
    from packedqdc.pack import pack_npz

    train, test, test_names = [], [], []
    for index, (name, _) in enumerate(MOLECULES):
        d = np.load(cache / "conformers" / f"{name}.npz")
        order = np.random.default_rng([seed, index, 1]).permutation(PER_MOLECULE)
        for rank, k in enumerate(order):
            record = (d["Z"], d["R"][k], float(d["E"][k]), d["F"][k], float(d["Q"]))
            if rank < TEST_PER_MOLECULE:
                test.append(record)
                test_names.append(name)
            else:
                train.append(record)
    rng = np.random.default_rng([seed, 99])
    train = [train[i] for i in rng.permutation(len(train))]
    perm = rng.permutation(len(test))
    test, test_names = [test[i] for i in perm], [test_names[i] for i in perm]
    info = ("packedqdc accuracy benchmark (benchmarks/accuracy.py): GFN2-xTB (tblite) single points of RDKit "
            f"ETKDG+MMFF conformers displaced by N(0, s) per coordinate, s ~ U{SIGMA} Å")
    for split, records in (("train", train), ("test", test)):
        npz = cache / f"{split}.npz"
        np.savez(npz, **_to_padded(records, info))
        pack_npz(npz, cache / split, energy_unit="kcal/mol", length_unit="ang", force=(cache / split).exists())
        npz.unlink()
    charges = {name: int(np.load(cache / "conformers" / f"{name}.npz")["Q"]) for name, _ in MOLECULES}
    (cache / "test_molecules.json").write_text(json.dumps({"molecule": test_names, "charge": charges}))
    print(f"packed {len(train)} train and {len(test)} test conformers of {len(MOLECULES)} molecules into {cache}")


def generate(cache: Path, workers: int) -> None:
    (cache / "conformers").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(workers) as pool:
        # largest molecules first, so the pool ends evenly
        order = sorted(range(len(MOLECULES)), key=lambda i: -len(MOLECULES[i][1]))
        for line in pool.map(generate_molecule, [cache] * len(order), order):
            print(line, flush=True)
    missing = [name for name, _ in MOLECULES if not (cache / "conformers" / f"{name}.npz").exists()]
    if missing:
        raise SystemExit(f"not finished (another generator holds them?): {', '.join(missing)}")
    if not (cache / "test_molecules.json").exists():
        assemble(cache)
    print(f"generate: {time.perf_counter() - start:.0f} s wall with {workers} worker(s)")


# ----------------------------------------------------------------------------------------- train, evaluate
def train(cache: Path, runs_dir: Path, name: str, max_time: float, flags: list[str]) -> None:
    cmd = [sys.executable, "-m", "packedqdc", "train", "--data-path", str(cache / "train"), "--runs-dir",
           str(runs_dir), "--name", name, "--max-time", str(max_time), "--num-epochs", "100000", *flags]
    print("$", " ".join(cmd[1:]), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"train: {time.perf_counter() - start:.0f} s wall, {cpu:.0f} CPU-s (user+sys) used by the run; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)


def evaluate(cache: Path, run: Path, json_out: Path | None, chunk: int = 128) -> dict:
    """Per-conformer errors of the run's best checkpoint on CACHE/test: overall, neutral/ions, per molecule."""
    from packedqdc.format import open_packed
    from packedqdc.train import Potential

    meta = json.loads((cache / "test_molecules.json").read_text())
    names, charges = meta["molecule"], meta["charge"]
    data = open_packed(cache / "test")
    from packedqdc.train import RunCheckpoints

    # a run stopped by --max-time inside its first epoch has no "best" yet
    which = "best" if RunCheckpoints(run).latest_step("best") is not None else "latest"
    pot = Potential.load(run, which)
    n = data.n_molecules
    mols = [data.molecule(i) for i in range(n)]
    e_err = np.zeros(n)
    f_abs = np.zeros(n)
    f_cnt = np.zeros(n)
    start = time.perf_counter()
    for lo in range(0, n, chunk):
        part = mols[lo:lo + chunk]
        E, F = pot.predict_batch([m["Z"] for m in part], [m["R"] for m in part], [float(m["Qtot"]) for m in part])
        for k, m in enumerate(part):
            e_err[lo + k] = E[k] - float(m["E"])
            f_abs[lo + k] = np.abs(F[k] - m["F"]).sum()
            f_cnt[lo + k] = m["F"].size
    names_a = np.array(names)
    ion = np.array([charges[x] != 0 for x in names])
    energies = np.array([float(m["E"]) for m in mols])

    def block(mask: np.ndarray) -> dict:
        return {"n": int(mask.sum()), "energy_mae": float(np.abs(e_err[mask]).mean()),
                "energy_rmse": float(np.sqrt((e_err[mask] ** 2).mean())),
                "forces_mae": float(f_abs[mask].sum() / f_cnt[mask].sum())}

    result = {"run": str(run), "all": block(np.ones(n, bool)), "neutral": block(~ion), "ions": block(ion),
              "energy_abs_p50": float(np.percentile(np.abs(e_err), 50)),
              "energy_abs_p99": float(np.percentile(np.abs(e_err), 99)), "molecules": {}}
    for name in sorted(set(names)):
        mask = names_a == name
        result["molecules"][name] = {**block(mask), "charge": charges[name],
                                     "energy_bias": float(e_err[mask].mean()),
                                     "energy_spread": float(np.ptp(energies[mask])),
                                     "n_atoms": int(mols[int(np.flatnonzero(mask)[0])]["Z"].size)}
    result["checkpoint"] = which
    print(f"evaluated {n} test conformers in {time.perf_counter() - start:.0f} s: {run} ({which} checkpoint)")
    for key in ("all", "neutral", "ions"):
        b = result[key]
        print(f"  {key:8s} n={b['n']:5d}  energy MAE {b['energy_mae']:6.2f} (RMSE {b['energy_rmse']:6.2f}) kcal/mol"
              f"  forces MAE {b['forces_mae']:5.2f} kcal/mol/Å")
    print(f"  |ΔE| median {result['energy_abs_p50']:.2f}, 99th percentile {result['energy_abs_p99']:.2f} kcal/mol")
    # bias = mean signed error: |bias| close to the MAE means the molecule is off by a constant
    print(f"  {'molecule':24s} {'q':>3s} {'atoms':>5s} {'E MAE':>7s} {'E bias':>7s} {'E spread':>8s} {'F MAE':>6s}")
    rows = sorted(result["molecules"].items(), key=lambda kv: -kv[1]["energy_mae"])
    for name, b in rows[:15]:
        print(f"  {name:24s} {b['charge']:+3d} {b['n_atoms']:5d} {b['energy_mae']:7.2f} {b['energy_bias']:+7.2f} "
              f"{b['energy_spread']:8.1f} "
              f"{b['forces_mae']:6.2f}")
    print(f"  ... ({len(rows) - 15} more; the best: {rows[-1][0]} {rows[-1][1]['energy_mae']:.2f})")
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--cache", type=Path, required=True)
    g.add_argument("--workers", type=int, default=2)
    for cmd in ("train", "run"):
        t = sub.add_parser(cmd)
        t.add_argument("--cache", type=Path, required=True)
        t.add_argument("--runs-dir", type=Path, required=True)
        t.add_argument("--name", required=True)
        t.add_argument("--max-time", type=float, default=480.0)
        t.add_argument("--json", type=Path)
        t.add_argument("flags", nargs=argparse.REMAINDER, help="flags for packedqdc train, after --")
    e = sub.add_parser("evaluate")
    e.add_argument("--cache", type=Path, required=True)
    e.add_argument("--run", type=Path, required=True)
    e.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.command == "generate":
        generate(args.cache, args.workers)
        return
    if args.command == "evaluate":
        evaluate(args.cache, args.run, args.json)
        return
    flags = [f for f in args.flags if f != "--"]
    train(args.cache, args.runs_dir, args.name, args.max_time, flags)
    if args.command == "run":
        evaluate(args.cache, args.runs_dir / args.name, args.json)


if __name__ == "__main__":
    main()
