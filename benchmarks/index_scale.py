"""The index at scale: open, first batch and peak memory of a loader over 100M molecules, and stats.

    python benchmarks/index_scale.py [--molecules 100000000] [--workdir /tmp/index-scale] [--epochs 3]
    PYTHONPATH=/path/to/other/version python benchmarks/index_scale.py ...   # the same for another version

Builds (unless present) a packed directory of ``--molecules`` QM9-sized molecules (3..29 atoms)
whose index is real (``offsets.npy``, ``n_atoms.npy``, written in chunks), as is ``Z`` (all
hydrogen: ``stats`` checks every atomic number; 4 bytes an atom), while ``R``, ``E``, ``Qtot``
(and ``F`` with ``--forces``) are sparse files made with ``truncate``: all zeros, costing no disk,
which is enough to measure the index side of the loader. Then, each
step in a subprocess of its own (so that peak RSS, ``VmHWM`` of /proc/self/status, is the step's):

- ``open``: ``PackedMemmapLoader(dir, 32, threads=2)`` plus ``split_loader(loader, 0.9)``, as
  ``packedqdc train`` makes them;
- for each order (molecule, block): for ``--epochs`` epochs, the time until the first item of
  ``train.stacked_batches(1, layout="packed")`` (the call ``packedqdc train`` makes: recycled
  buffers, prefetch thread; epoch 0 includes the budget design, ``train.shapes``), then
  ``--batches`` more items, and VmHWM and RssAnon after each epoch;
- ``stats``: ``packedqdc.stats.dataset_stats`` (what ``packedqdc stats DIR`` computes).

Prints one line per figure, with ``uptime``'s load average. Delete the directory afterwards
(``--delete``) if it was made only for this.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def build(path: Path, n: int, forces: bool, seed: int = 0, chunk: int = 1 << 22) -> None:
    """A packed directory of ``n`` molecules: real offsets.npy and n_atoms.npy, sparse data files."""
    if (path / "offsets.npy").is_file():
        return
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    n_atoms = np.lib.format.open_memmap(tmp / "n_atoms.npy", mode="w+", dtype=np.int32, shape=(n,))
    offsets = np.lib.format.open_memmap(tmp / "offsets.npy", mode="w+", dtype=np.int64, shape=(n + 1,))
    offsets[0] = 0
    total = 0
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        sizes = rng.integers(3, 30, m, dtype=np.int32)
        n_atoms[lo : lo + m] = sizes
        offsets[lo + 1 : lo + m + 1] = total + np.cumsum(sizes, dtype=np.int64)
        total = int(offsets[lo + m])
    n_atoms.flush()
    offsets.flush()
    del n_atoms, offsets
    ones = np.ones(1 << 24, np.int32)
    with open(tmp / "Z_pack.int32", "wb") as f:
        for lo in range(0, total, ones.shape[0]):
            ones[: min(ones.shape[0], total - lo)].tofile(f)
    files = {"R_pack.f32": 12 * total, "E.f64": 8 * n, "Qtot.f64": 8 * n}
    if forces:
        files["F_pack.f32"] = 12 * total
    for name, size in files.items():
        with open(tmp / name, "wb") as f:
            f.truncate(size)
    tmp.rename(path)


def memory() -> dict[str, float]:
    """VmHWM (peak resident), VmRSS, RssAnon and RssFile of this process, MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) / 1024
    return out


def step_open(path: str) -> dict:
    from packedqdc.loader import PackedMemmapLoader, split_loader

    t0 = time.perf_counter()
    loader = PackedMemmapLoader(path, 32, threads=2)
    t1 = time.perf_counter()
    train, valid = split_loader(loader, 0.9)
    t2 = time.perf_counter()
    return {"constructor_s": t1 - t0, "split_s": t2 - t1, "open_s": t2 - t0, **memory()}


def step_epochs(path: str, order: str, epochs: int, batches: int) -> dict:
    from packedqdc.loader import PackedMemmapLoader, split_loader

    t0 = time.perf_counter()
    loader = PackedMemmapLoader(path, 32, threads=2, order=order)
    train, _ = split_loader(loader, 0.9)
    out = {"open_s": time.perf_counter() - t0, "epochs": []}
    for epoch in range(epochs):
        t0 = time.perf_counter()
        if epoch == 0:
            train.shapes(layout="packed")  # what LoaderStream asks first (the budget design)
        it = train.stacked_batches(1, layout="packed")
        next(it)
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(batches):
            next(it)
        rate = batches / (time.perf_counter() - t1)
        it.close()
        train.epoch = epoch + 1  # the next epoch, without reading the rest of this one
        out["epochs"].append({"epoch": epoch, "first_batch_s": first, "batches_per_s": rate, **memory()})
    return out


def step_stats(path: str) -> dict:
    from packedqdc.stats import dataset_stats

    t0 = time.perf_counter()
    s = dataset_stats(path, bucket_size=8192, batch_size=32, num_atoms=29)
    return {"stats_s": time.perf_counter() - t0, "packed_atom_efficiency": s["packed"]["atom_efficiency"], **memory()}


def run_step(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--step", *args], capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:] or done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--molecules", type=int, default=100_000_000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/index-scale"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batches", type=int, default=200, help="items drawn after the first, per epoch")
    ap.add_argument("--orders", default="molecule,block")
    ap.add_argument("--forces", action="store_true", help="also a (sparse) F file")
    ap.add_argument("--no-stats", action="store_true")
    ap.add_argument("--delete", action="store_true", help="delete the directory at the end")
    ap.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        kind, *rest = args.step
        if kind == "open":
            result = step_open(rest[0])
        elif kind == "epochs":
            result = step_epochs(rest[0], rest[1], int(rest[2]), int(rest[3]))
        else:
            result = step_stats(rest[0])
        print(json.dumps(result))
        return
    path = args.workdir / f"qm9z-{args.molecules}{'-F' if args.forces else ''}"
    t0 = time.perf_counter()
    build(path, args.molecules, args.forces)
    print(f"directory {path} ready in {time.perf_counter() - t0:.1f} s", flush=True)
    import packedqdc

    print(f"packedqdc from {Path(packedqdc.__file__).parent}; load {os.getloadavg()}", flush=True)
    r = run_step(["open", str(path)])
    print(f"open: {json.dumps(_round(r))}", flush=True)
    for order in filter(None, args.orders.split(",")):
        r = run_step(["epochs", str(path), order, str(args.epochs), str(args.batches)])
        print(f"order={order}: {json.dumps(_round(r))}", flush=True)
    if not args.no_stats:
        r = run_step(["stats", str(path)])
        print(f"stats: {json.dumps(_round(r))}", flush=True)
    print(f"load {os.getloadavg()}", flush=True)
    if args.delete:
        shutil.rmtree(path)


def _round(obj):
    if isinstance(obj, float):
        return round(obj, 3 if obj < 10 else 1)
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    return obj


if __name__ == "__main__":
    main()
