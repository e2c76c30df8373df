"""Benchmark ``packedqdc pack openqdc`` beside openqdc's own loader opening the same cache.

Writes a synthetic Spice-like OpenQDC memmap cache (hartree, bohr, gradients in hartree/bohr; 20
atoms per molecule by default) directly with ``np.memmap`` in chunks plus ``props.pkl``, the layout
``docs/openqdc.md`` describes. Then, each in a fresh child process (start-up and imports
included), it times and takes the peak RSS (``ru_maxrss`` from ``wait4``) of:

- ``packedqdc pack openqdc Spice --list-methods``: start-up and imports only (openqdc, jax), a baseline;
- ``packedqdc pack openqdc Spice OUT --cache-dir CACHE`` (the full pack, output fsynced);
- ``Spice(cache_dir=CACHE, skip_statistics=True)``: openqdc opening it in its stored units;
- the same with ``energy_unit="kcal/mol", distance_unit="ang"`` (the units packedqdc writes).

    python benchmarks/pack_openqdc.py                                  # 1M molecules
    python benchmarks/pack_openqdc.py --molecules 100000 --workdir /mnt/fast

Both children use ``--python`` (default: this interpreter), which needs packedqdc and openqdc.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OPENQDC_CHILD = """
import sys
from openqdc.datasets import Spice
kwargs = dict(energy_unit="kcal/mol", distance_unit="ang") if sys.argv[2] == "convert" else {}
ds = Spice(cache_dir=sys.argv[1], skip_statistics=True, energy_type="formation", **kwargs)
print(len(ds))
"""


def write_spice_cache(cache: Path, n_molecules: int, n_atoms: int, chunk: int = 50_000, seed: int = 0) -> Path:
    """Write a Spice-format memmap cache of ``n_molecules`` x ``n_atoms`` under ``cache``; return its dir.

    Files (M = n_molecules * n_atoms): atomic_inputs (M, 5) f32 [Z, charge, x, y, z in bohr],
    position_idx_range (N, 2) i32, energies (N, 1) f64 hartree, forces (M, 3, 1) f32 hartree/bohr,
    props.pkl with ``name``/``subset`` as (uniques, inverse) and ``n_atoms`` (N,) i32.
    """
    path = cache / "spice" / "preprocessed"
    path.mkdir(parents=True, exist_ok=True)
    m = n_molecules * n_atoms
    rng = np.random.default_rng(seed)
    files = {
        "atomic_inputs": np.memmap(path / "atomic_inputs.mmap", np.float32, "w+", shape=(m, 5)),
        "position_idx_range": np.memmap(path / "position_idx_range.mmap", np.int32, "w+", shape=(n_molecules, 2)),
        "energies": np.memmap(path / "energies.mmap", np.float64, "w+", shape=(n_molecules, 1)),
        "forces": np.memmap(path / "forces.mmap", np.float32, "w+", shape=(m, 3, 1)),
    }
    elements = np.array([1, 6, 7, 8], dtype=np.float32)
    for lo in range(0, n_molecules, chunk):
        hi = min(lo + chunk, n_molecules)
        a0, a1 = lo * n_atoms, hi * n_atoms
        starts = np.arange(lo, hi, dtype=np.int64) * n_atoms
        files["position_idx_range"][lo:hi] = np.column_stack([starts, starts + n_atoms])
        z = rng.choice(elements, size=a1 - a0)
        charge = np.zeros(a1 - a0, dtype=np.float32)
        charge[::n_atoms * 7] = 1.0
        files["atomic_inputs"][a0:a1] = np.column_stack([z, charge, rng.normal(0, 3, (a1 - a0, 3))])
        files["energies"][lo:hi, 0] = -40.0 * n_atoms + rng.normal(0, 0.1, hi - lo)
        files["forces"][a0:a1] = rng.normal(0, 0.02, (a1 - a0, 3, 1))
    for array in files.values():
        array.flush()
    del files
    names = np.array([f"mol{i}" for i in range(1000)])
    props = {
        "name": (names, np.arange(n_molecules) % 1000),
        "subset": (np.array(["PubChem", "Dipeptides"]), np.arange(n_molecules) % 2),
        "n_atoms": np.full(n_molecules, n_atoms, dtype=np.int32),
    }
    with open(path / "props.pkl", "wb") as fh:
        pickle.dump(props, fh)
    return path


def run_child(argv: list[str]) -> tuple[float, float, str]:
    """Run ``argv``; return (wall seconds, peak RSS in MB, last output line). Raises on failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{output}")
    lines = output.strip().splitlines()
    return seconds, usage.ru_maxrss / 1024.0, lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecules", type=int, default=1_000_000)
    parser.add_argument("--atoms", type=int, default=20, help="atoms per molecule")
    parser.add_argument("--workdir", type=Path, default=Path("."), help="where the temporary cache goes")
    parser.add_argument("--python", default=sys.executable, help="interpreter with packedqdc and openqdc")
    parser.add_argument("--keep", action="store_true", help="keep the cache and the packed output")
    parser.add_argument("--write-cache", type=Path, help=argparse.SUPPRESS)  # internal: child that writes
    args = parser.parse_args()
    if args.write_cache is not None:
        write_spice_cache(args.write_cache, args.molecules, args.atoms)
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench-openqdc-", dir=args.workdir))
    try:
        start = time.perf_counter()
        # written by a child: Linux carries a parent's peak RSS into ru_maxrss of children it forks
        argv = [sys.executable, __file__, "--molecules", str(args.molecules), "--atoms", str(args.atoms)]
        subprocess.run([*argv, "--write-cache", str(tmp / "cache")], check=True)
        path = tmp / "cache" / "spice" / "preprocessed"
        size_mb = sum(f.stat().st_size for f in path.iterdir()) / 1e6
        print(f"cache: {args.molecules} molecules x {args.atoms} atoms, {size_mb:.0f} MB, "
              f"written in {time.perf_counter() - start:.1f} s ({path})")
        runs = {
            "packedqdc imports (--list-methods)": [args.python, "-m", "packedqdc", "pack", "openqdc", "Spice",
                                                   "--list-methods"],
            "packedqdc pack openqdc": [args.python, "-m", "packedqdc", "pack", "openqdc", "Spice",
                                       str(tmp / "packed"), "--cache-dir", str(tmp / "cache")],
            "openqdc Spice(), stored units": [args.python, "-c", OPENQDC_CHILD, str(tmp / "cache"), "stored"],
            "openqdc Spice(), kcal/mol + ang": [args.python, "-c", OPENQDC_CHILD, str(tmp / "cache"), "convert"],
        }
        print(f"{'run':34s} {'wall s':>8s} {'peak RSS MB':>12s}")
        for label, argv in runs.items():
            seconds, rss, _ = run_child(argv)
            print(f"{label:34s} {seconds:8.1f} {rss:12.0f}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
