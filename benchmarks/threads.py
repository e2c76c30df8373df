"""One thread vs ``threads=2``, reused buffers and the default call: paired epochs, order alternated.

    python benchmarks/threads.py [--rounds 10] [--dir /tmp/packedqdc-threads]
    NUMBA_THREADING_LAYER=omp PYTHONPATH=/path/to/other/version python benchmarks/threads.py

Writes 200k QM9-like and 100k SPICE-like molecules (``benchmarks/loader.py``'s generator) unless
present. For each call (``batches(layout="packed", reuse_buffers=True, prefetch=0)``, and the
default ``batches(layout="packed")``) it times ``--rounds`` pairs of epochs, one thread and two,
on two loaders of the same directory, the pair's order alternated round by round, and prints the
median rate of each and the median of the pairs' ratios (two threads over one). The same pairs
with one thread on both sides (``A/A``) give the noise floor of such a ratio on this machine.
Alternate runs of two versions to compare them on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from loader import write  # noqa: E402

from packedqdc.loader import PackedMemmapLoader  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/packedqdc-threads"))
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    for kind, n in (("qm9", 200_000), ("spice", 100_000)):
        path = args.dir / kind
        if not path.exists():
            write(path, kind, n)
        loaders = (PackedMemmapLoader(path, 32), PackedMemmapLoader(path, 32))

        def epoch(side: int, threads: int, reuse: bool) -> float:
            kw = {"reuse_buffers": True, "prefetch": 0} if reuse else {}
            t0, mols = time.perf_counter(), 0
            for b in loaders[side].batches(layout="packed", threads=threads, **kw):
                mols += int(b["mol_mask"].sum())
            return mols / (time.perf_counter() - t0)

        for call, reuse in (("reuse pf=0", True), ("default", False)):
            for pair in ((1, 1), (1, 2)):  # (threads of loader 0, threads of loader 1)
                for side in (0, 1):
                    epoch(side, pair[side], reuse)  # warm: kernels, buffers, the thread choice
                rates: tuple[list[float], list[float]] = ([], [])
                for r in range(args.rounds):
                    for side in (0, 1) if r % 2 else (1, 0):
                        rates[side].append(epoch(side, pair[side], reuse))
                ratio = statistics.median(b / a for a, b in zip(*rates))
                name = "A/A t=1 vs t=1" if pair == (1, 1) else "t=2 vs t=1    "
                print(f"{kind:6} {call:11} {name} {statistics.median(rates[0]) / 1e3:6.0f}k/s "
                      f"{statistics.median(rates[1]) / 1e3:6.0f}k/s  ratio {ratio:.3f}", flush=True)  # fmt: skip

if __name__ == "__main__":
    main()
