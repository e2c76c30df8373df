"""Benchmark ``pack npz`` against ``cp`` of the same bytes.

Writes a synthetic uncompressed NPZ of QM9-sized molecules in the PhysNet padded layout (mean 18
atoms, padded to 29; R, Z, N, E, F, Q), in chunks so that generating it needs little memory; packs
it in a child process (Python start-up and imports included); prints the pack's MB/s and peak RSS beside the time of ``cp`` (and of
``cp`` + ``sync`` of the copy, since the pack fsyncs its output) of the same file to the same disk.
Each is run ``--repeat`` times from a synced page cache (the input stays cached); the best time of
each is shown. Peak RSS is the largest ``ru_maxrss`` of the child processes (the pack dominates).

    python benchmarks/pack.py                      # 1M molecules, in a temp dir under ./
    python benchmarks/pack.py --molecules 100000 --workdir /mnt/fast
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

WIDTH = 29
MEAN_ATOMS = 18

PACK_CHILD = """
import sys
from packedqdc.pack import pack_npz
print(pack_npz(sys.argv[1], sys.argv[2], chunk_size=int(sys.argv[3])).seconds)
"""


def write_npz(path: Path, n_molecules: int, chunk: int = 50_000, seed: int = 0) -> None:
    """Write an ``np.savez``-compatible (stored, zip64) NPZ member by member, ``chunk`` molecules at a time."""
    rng = np.random.default_rng(seed)
    n = np.clip(np.rint(rng.normal(MEAN_ATOMS, 3.0, size=n_molecules)), 1, WIDTH).astype(np.int32)
    members = {
        "R": (np.float32, (WIDTH, 3)),
        "Z": (np.int32, (WIDTH,)),
        "N": (np.int32, ()),
        "E": (np.float64, ()),
        "F": (np.float32, (WIDTH, 3)),
        "Q": (np.float64, ()),
    }
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, (dtype, tail) in members.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as fh:
                header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": (n_molecules, *tail)}
                np.lib.format.write_array_header_1_0(fh, header)
                for lo in range(0, n_molecules, chunk):
                    fh.write(_member_chunk(key, n[lo : lo + chunk], rng).astype(dtype).tobytes())


def _member_chunk(key: str, n: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Values of member ``key`` for molecules with atom counts ``n``; padding atoms are zero."""
    m = n.shape[0]
    real = np.arange(WIDTH) < n[:, None]
    if key == "N":
        return n
    if key == "E":
        return rng.normal(-250_000.0, 25_000.0, size=m)
    if key == "Q":
        return np.zeros(m)
    if key == "Z":
        return np.where(real, rng.choice([1, 6, 7, 8, 9], size=(m, WIDTH), p=[0.5, 0.3, 0.08, 0.1, 0.02]), 0)
    scale = 1.5 if key == "R" else 30.0
    return np.where(real[..., None], rng.normal(0.0, scale, size=(m, WIDTH, 3)).astype(np.float32), 0)


def timed(cmd: list[str]) -> tuple[float, str]:
    """Wall time and stdout of ``cmd``, started with no dirty pages pending so runs do not pay for each other."""
    os.sync()
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--molecules", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("."), help="Where to write (same disk for all).")
    parser.add_argument("--chunk-size", type=int, default=65536)
    parser.add_argument("--repeat", type=int, default=3, help="Runs of each; the best time of each is shown.")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="packedqdc-bench-", dir=args.workdir))
    try:
        npz = tmp / "synthetic.npz"
        start = time.perf_counter()
        write_npz(npz, args.molecules)
        size = npz.stat().st_size
        print(f"wrote {npz.name}: {args.molecules} molecules, {size / 1e6:.0f} MB in {time.perf_counter() - start:.1f} s")

        t_pack = t_inner = t_cp = t_cp_sync = float("inf")
        for _ in range(args.repeat):
            shutil.rmtree(tmp / "packed", ignore_errors=True)
            wall, out = timed([sys.executable, "-c", PACK_CHILD, str(npz), str(tmp / "packed"), str(args.chunk_size)])
            t_pack, t_inner = min(t_pack, wall), min(t_inner, float(out))
            t_cp = min(t_cp, timed(["cp", str(npz), str(tmp / "copy.npz")])[0])
            (tmp / "copy.npz").unlink()
            t_cp_sync = min(t_cp_sync, timed(["sh", "-c", f"cp '{npz}' '{tmp}/copy.npz' && sync '{tmp}/copy.npz'"])[0])
            (tmp / "copy.npz").unlink()
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        out_bytes = sum(p.stat().st_size for p in (tmp / "packed").iterdir())
        print(f"pack npz : {t_pack:6.2f} s  {size / t_pack / 1e6:7.0f} MB/s in  "
              f"({out_bytes / 1e6:.0f} MB out)  peak RSS {peak_mb:.0f} MB")
        print(f"  in-process (pack_npz, no interpreter start-up): {t_inner:.2f} s  "
              f"{size / t_inner / 1e6:.0f} MB/s  -> pack/cp = {t_inner / t_cp:.2f}x")
        print(f"cp       : {t_cp:6.2f} s  {size / t_cp / 1e6:7.0f} MB/s   -> pack/cp = {t_pack / t_cp:.2f}x")
        print(f"cp + sync: {t_cp_sync:6.2f} s  {size / t_cp_sync / 1e6:7.0f} MB/s   -> pack/(cp+sync) = "
              f"{t_pack / t_cp_sync:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
