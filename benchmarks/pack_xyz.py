"""Benchmark ``packedqdc pack xyz`` beside ASE's own ``ase.io.read(index=":")`` of the same file.

Writes a QM9-sized extended XYZ file: a block of distinct molecules (18 atoms, H C N O F, energy
and forces in eV and eV/Å) written by ASE's own writer (``ase.io.write(format="extxyz")``),
repeated until the file holds ``--frames`` frames (1M by default, about 2 GB with forces). Each
run is a fresh child process (start-up and imports included) whose wall time and peak RSS
(``ru_maxrss`` from ``wait4``) are measured; the file is evicted from the page cache before each
(``posix_fadvise(DONTNEED)``), so every run reads it from disk:

- ``packedqdc pack xyz FILE OUT``: the default fast reader (ASE where it cannot read a frame);
- ``packedqdc pack xyz FILE OUT --parser ase``: ASE's streaming ``iread`` for every frame;
- ``ase.io.read(FILE, index=":")``: ASE building every ``Atoms`` in a list. It holds the whole
  file in RAM (several GB for 1M frames), so by default it runs on a prefix file of
  ``--ase-frames`` frames (100k); the fast reader is timed on that same prefix file as well.

    python benchmarks/pack_xyz.py                      # 1M frames
    python benchmarks/pack_xyz.py --frames 200000 --ase-frames 200000 --workdir /mnt/fast
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack_openqdc import run_child  # noqa: E402

ASE_READ_CHILD = """
import sys
import ase.io
frames = ase.io.read(sys.argv[1], index=":", format="extxyz")
print(len(frames))
"""


def write_block(path: Path, frames: int, atoms: int, forces: bool, seed: int = 0) -> None:
    """``frames`` distinct random molecules written by ASE's extxyz writer."""
    import ase
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(frames):
        mol = ase.Atoms(numbers=rng.choice([1, 6, 7, 8, 9], size=atoms, p=[0.5, 0.3, 0.08, 0.1, 0.02]),
                        positions=rng.normal(0.0, 1.8, size=(atoms, 3)))
        mol.calc = SinglePointCalculator(
            mol, energy=float(rng.normal(-11000.0, 50.0)), forces=rng.normal(0, 1.0, (atoms, 3)) if forces else None
        )
        out.append(mol)
    ase.io.write(path, out, format="extxyz")


def write_repeated(block: Path, target: Path, copies: int) -> None:
    data = block.read_bytes()
    with open(target, "wb") as fh:
        for _ in range(copies):
            fh.write(data)


def evict(path: Path) -> None:
    """Drop ``path`` from the page cache so the next run reads it from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--ase-frames", type=int, default=100_000, help="frames of the file ase.io.read gets")
    parser.add_argument("--block", type=int, default=10_000, help="distinct frames, repeated to fill the file")
    parser.add_argument("--atoms", type=int, default=18, help="atoms per frame (QM9: 18 on average)")
    parser.add_argument("--no-forces", action="store_true")
    parser.add_argument("--skip-ase-iread", action="store_true", help="skip --parser ase on the big file")
    parser.add_argument("--workdir", type=Path, default=Path("."))
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--write-files", type=Path, help=argparse.SUPPRESS)  # internal: child that writes
    args = parser.parse_args()
    big_name, small_name = f"frames-{args.frames}.extxyz", f"frames-{args.ase_frames}.extxyz"
    if args.write_files is not None:
        block = args.write_files / "block.extxyz"
        write_block(block, args.block, args.atoms, not args.no_forces)
        write_repeated(block, args.write_files / big_name, -(-args.frames // args.block))
        write_repeated(block, args.write_files / small_name, -(-args.ase_frames // args.block))
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench-xyz-", dir=args.workdir))
    try:
        start = time.perf_counter()
        # written by a child: Linux carries a parent's peak RSS into ru_maxrss of children it forks
        subprocess.run([sys.executable, *sys.argv, "--write-files", str(tmp)], check=True)
        big, small = tmp / big_name, tmp / small_name
        sizes = {p: p.stat().st_size / 1e6 for p in (big, small)}
        print(f"files: {big.name} {sizes[big]:.0f} MB, {small.name} {sizes[small]:.0f} MB "
              f"({args.atoms} atoms/frame, forces {not args.no_forces}), written in {time.perf_counter() - start:.1f} s")

        pack = [args.python, "-m", "packedqdc", "pack", "xyz"]
        runs = [
            ("packedqdc pack xyz (fast reader)", big, [*pack, str(big), str(tmp / "out-fast")]),
            ("packedqdc pack xyz --parser ase", big, [*pack, str(big), str(tmp / "out-ase"), "--parser", "ase"]),
            ("packedqdc pack xyz (fast reader)", small, [*pack, str(small), str(tmp / "small-fast")]),
            ("ase.io.read(index=':')", small, [args.python, "-c", ASE_READ_CHILD, str(small)]),
        ]
        if args.skip_ase_iread:
            runs.pop(1)
        print(f"{'run':36s} {'file':>22s} {'wall s':>8s} {'MB/s':>8s} {'frames/s':>10s} {'peak RSS MB':>12s}")
        for label, file, argv in runs:
            evict(file)
            seconds, rss, _ = run_child(argv)
            frames = args.frames if file == big else args.ase_frames
            print(f"{label:36s} {file.name:>22s} {seconds:8.1f} {sizes[file] / seconds:8.1f} "
                  f"{frames / seconds:10.0f} {rss:12.0f}")
        a, b = (tmp / "out-fast"), (tmp / "out-ase")
        if b.exists():
            same = all((a / n).read_bytes() == (b / n).read_bytes()
                       for n in ("Z_pack.int32", "R_pack.f32", "F_pack.f32", "E.f64", "offsets.npy")
                       if (a / n).exists() or (b / n).exists())
            print(f"fast reader and ASE reader packed files identical: {same}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
