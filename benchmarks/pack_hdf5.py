"""Benchmark ``packedqdc pack hdf5 --layout spice`` beside h5py reading the same arrays.

Writes a SPICE-layout HDF5 file with h5py (one group per molecule: ``smiles``, ``subset``,
``atomic_numbers``, ``conformations`` float32 bohr, ``dft_total_energy`` float64 hartree,
``dft_total_gradient`` float32 hartree/bohr; 50 conformers per group and 40 atoms per molecule
by default, about SPICE's averages) holding ``--conformers`` conformers (1M by default). Each run
is a fresh child process whose wall time and peak RSS (``ru_maxrss`` from ``wait4``) are measured,
with the file evicted from the page cache before it (``posix_fadvise(DONTNEED)``):

- ``packedqdc pack hdf5 FILE OUT --layout spice`` (output fsynced, sha256 of input and output);
- h5py alone: open the file and read every group's ``atomic_numbers``, ``smiles``,
  ``conformations``, ``dft_total_energy`` and ``dft_total_gradient`` into NumPy arrays, group by
  group (the floor for any reader of this file through h5py).

    python benchmarks/pack_hdf5.py                          # 1M conformers
    python benchmarks/pack_hdf5.py --conformers 200000 --workdir /mnt/fast
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack_openqdc import run_child  # noqa: E402
from pack_xyz import evict  # noqa: E402

H5PY_CHILD = """
import sys
import h5py
n = 0
with h5py.File(sys.argv[1], "r") as f:
    for name in f:
        g = f[name]
        z = g["atomic_numbers"][()]
        smiles = g["smiles"][0]
        r = g["conformations"][()]
        e = g["dft_total_energy"][()]
        grad = g["dft_total_gradient"][()]
        n += r.shape[0]
print(n)
"""

SMILES = ("[C:1]([H:2])([H:3])([H:4])[N+:5]([H:6])([H:7])[H:8]", "[O-:1][C:2](=[O:3])[H:4]", "[C:1]#[N:2]")


def write_spice(path: Path, conformers: int, per_group: int, atoms: int, seed: int = 0) -> int:
    """A SPICE-layout file of ``conformers`` conformers; returns the number of groups."""
    import h5py

    rng = np.random.default_rng(seed)
    groups = -(-conformers // per_group)
    with h5py.File(path, "w") as f:
        left = conformers
        for i in range(groups):
            c = min(per_group, left)
            left -= c
            g = f.create_group(f"mol{i:07d}")
            g.create_dataset("smiles", data=[SMILES[i % len(SMILES)]], dtype=h5py.string_dtype())
            g.create_dataset("subset", data=[b"SPICE PubChem Set 1 Single Points Dataset v1.2"])
            g.create_dataset("atomic_numbers", data=rng.choice([1, 6, 7, 8, 16], size=atoms).astype(np.int16))
            g.create_dataset("conformations", data=rng.normal(0, 4.0, (c, atoms, 3)).astype(np.float32))
            g.create_dataset("dft_total_energy", data=rng.normal(-1500.0, 10.0, c))
            g.create_dataset("dft_total_gradient", data=rng.normal(0, 0.02, (c, atoms, 3)).astype(np.float32))
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conformers", type=int, default=1_000_000)
    parser.add_argument("--per-group", type=int, default=50, help="conformers per molecule group")
    parser.add_argument("--atoms", type=int, default=40, help="atoms per molecule")
    parser.add_argument("--workdir", type=Path, default=Path("."))
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--write-file", type=Path, help=argparse.SUPPRESS)  # internal: child that writes
    args = parser.parse_args()
    if args.write_file is not None:
        write_spice(args.write_file, args.conformers, args.per_group, args.atoms)
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench-hdf5-", dir=args.workdir))
    try:
        start = time.perf_counter()
        src = tmp / "spice.hdf5"
        # written by a child: Linux carries a parent's peak RSS into ru_maxrss of children it forks
        subprocess.run([sys.executable, *sys.argv, "--write-file", str(src)], check=True)
        size = src.stat().st_size / 1e6
        print(f"file: {args.conformers} conformers in groups of {args.per_group} x {args.atoms} atoms, "
              f"{size:.0f} MB, written in {time.perf_counter() - start:.1f} s")
        runs = [
            ("packedqdc pack hdf5 --layout spice",
             [args.python, "-m", "packedqdc", "pack", "hdf5", str(src), str(tmp / "out"), "--layout", "spice"]),
            ("h5py reads the same arrays", [args.python, "-c", H5PY_CHILD, str(src)]),
        ]
        print(f"{'run':36s} {'wall s':>8s} {'MB/s':>8s} {'conformers/s':>13s} {'peak RSS MB':>12s}")
        for label, argv in runs:
            evict(src)
            seconds, rss, _ = run_child(argv)
            print(f"{label:36s} {seconds:8.1f} {size / seconds:8.1f} {args.conformers / seconds:13.0f} {rss:12.0f}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
