"""One thread vs ``threads=2``, reused buffers and the default call: one epoch each, interleaved.

    python benchmarks/threads.py [--rounds 3] [--dir /tmp/packedqdc-threads]
    NUMBA_THREADING_LAYER=omp PYTHONPATH=/path/to/other/version python benchmarks/threads.py

Writes 200k QM9-like and 100k SPICE-like molecules (``benchmarks/loader.py``'s generator) unless
present, warms every setting once, then times ``--rounds`` rounds of one epoch of
``batches(layout="packed", prefetch=0)`` per setting (one thread and two; ``reuse_buffers=True``
and the default call) and prints the median molecules/s of each. Alternate runs of two versions
to compare them on a shared machine.
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
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/packedqdc-threads"))
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    for kind, n in (("qm9", 200_000), ("spice", 100_000)):
        path = args.dir / kind
        if not path.exists():
            write(path, kind, n)
        loader = PackedMemmapLoader(path, 32)

        def epoch(threads: int, reuse: bool) -> float:
            t0, mols = time.perf_counter(), 0
            for b in loader.batches(layout="packed", reuse_buffers=reuse, prefetch=0, threads=threads):
                mols += int(b["mol_mask"].sum())
            return mols / (time.perf_counter() - t0)

        settings = {"t1 reuse": (1, True), "t2 reuse": (2, True), "t1 default": (1, False), "t2 default": (2, False)}
        for threads, reuse in settings.values():
            epoch(threads, reuse)
        rates: dict[str, list[float]] = {k: [] for k in settings}
        for _ in range(args.rounds):
            for label, (threads, reuse) in settings.items():
                rates[label].append(epoch(threads, reuse))
        print(kind, {k: f"{statistics.median(v) / 1e3:.0f}k/s" for k, v in rates.items()}, flush=True)


if __name__ == "__main__":
    main()
