"""Reading from cold storage: molecule order vs block order vs a sequential read of the same files.

    python benchmarks/cold.py --kind qm9 --molecules 5000000 --dir /tmp/cold   # 2.5 GB QM9-sized
    python benchmarks/cold.py --kind spice --molecules 1000000 --dir /tmp/cold # 1.1 GB SPICE-sized

Writes a synthetic packed directory (``benchmarks/loader.py``'s generator, through
``PackedWriter``) unless it exists, then for each row: opens a loader and makes its epoch plan,
drops the directory's data files from the page cache (``os.posix_fadvise(fd, 0, 0,
POSIX_FADV_DONTNEED)``, no root needed), and reads for ``--seconds`` (or ``--max-molecules``).
Reported: molecules/s, and storage bytes read (``read_bytes`` of ``/proc/self/io``) per byte of
the molecules delivered (Z, R, F, E, Qtot of each molecule: 28 bytes an atom plus 16). Rows:

- ``sequential read``: every data file read front to back in 8 MiB reads (the disk's rate,
  expressed in molecules/s of this data set);
- ``molecule order``: ``batches(layout="packed")`` (the default call), cold, then warm (every
  file read into the page cache first);
- ``block order``: the same with ``order="block"``, cold, then warm.

Delete the directory afterwards (``--delete``) if it was only made for this.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from loader import write  # noqa: E402  benchmarks/loader.py's synthetic data

from packedqdc.loader import PackedMemmapLoader  # noqa: E402

def data_files(path: Path) -> list[Path]:
    """The per-atom and per-molecule data files (not the index: offsets, n_atoms, meta)."""
    from packedqdc.format import open_packed

    ds = open_packed(path)
    return [Path(a.filename) for a in (ds.Z, ds.R, ds.F, ds.E, ds.Qtot) if a is not None]


def evict(path: Path) -> None:
    for f in data_files(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no read_bytes in /proc/self/io")


def sequential(path: Path, n_mol: int, evict_first: bool = True) -> tuple[float, float, float]:
    """(molecules/s equivalent, read/delivered, seconds) of reading every data file front to back."""
    if evict_first:
        evict(path)
    r0, t0 = read_bytes(), time.perf_counter()
    total = 0
    buf = bytearray(8 << 20)
    for f in data_files(path):
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    dt = time.perf_counter() - t0
    return n_mol / dt, (read_bytes() - r0) / max(total, 1), dt


def run(path: Path, order: str, cold: bool, args: argparse.Namespace) -> tuple[float, float, int]:
    """(molecules/s, storage bytes read per delivered byte, molecules) of one timed read."""
    loader = PackedMemmapLoader(path, args.batch_size, seed=args.seed, order=order, threads=args.threads)
    loader.num_batches(layout="packed")  # the plan (index reads) before the clock starts
    n_atoms = loader.n_atoms
    if cold:
        evict(path)
    else:
        sequential(path, 0, evict_first=False)  # every page in the cache
    r0, t0 = read_bytes(), time.perf_counter()
    mols = delivered = 0
    for batch in loader.batches(layout="packed"):
        ids = batch["mol_idx"][batch["mol_mask"]]
        mols += ids.shape[0]
        delivered += int(n_atoms[ids].sum()) * 28 + 16 * ids.shape[0]
        if time.perf_counter() - t0 > args.seconds or mols >= args.max_molecules:
            break
    dt = time.perf_counter() - t0
    return mols / dt, (read_bytes() - r0) / max(delivered, 1), mols


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=("qm9", "spice"), default="qm9")
    ap.add_argument("--molecules", type=int, default=5_000_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/packedqdc-cold"))
    ap.add_argument("--seconds", type=float, default=20.0, help="time limit of each timed read")
    ap.add_argument("--max-molecules", type=int, default=2_000_000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--delete", action="store_true", help="delete the directory at the end")
    args = ap.parse_args()
    path = args.dir / f"{args.kind}-{args.molecules}"
    if not path.exists():
        args.dir.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        write(path, args.kind, args.molecules)
        print(f"wrote {args.molecules:,} {args.kind}-sized molecules in {time.perf_counter() - t:.0f} s", flush=True)
    size = sum(f.stat().st_size for f in data_files(path))
    print(f"{path}: {args.molecules:,} molecules, {size / 2**30:.2f} GiB of data files; "
          f"batch {args.batch_size}, threads {args.threads}, {args.seconds:.0f} s or {args.max_molecules:,} "
          f"molecules per row", flush=True)
    print(f"{'row':28} {'mol/s':>11} {'read/delivered':>15} {'molecules':>10}")
    rate, amp, dt = sequential(path, args.molecules)
    print(f"{'sequential read (cold)':28} {rate:11,.0f} {amp:14.2f}x {args.molecules:>10,}  "
          f"({size / dt / 2**20:,.0f} MiB/s)", flush=True)
    for order in ("molecule", "block"):
        for cold in (True, False):
            rate, amp, mols = run(path, order, cold, args)
            label = f"{order} order ({'cold' if cold else 'warm'})"
            print(f"{label:28} {rate:11,.0f} {amp:14.2f}x {mols:>10,}", flush=True)
    if args.delete:
        shutil.rmtree(path)


if __name__ == "__main__":
    main()
