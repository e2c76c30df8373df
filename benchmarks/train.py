"""Training throughput (molecules/s) of the packed layout vs the padded layout, same model and data.

    python benchmarks/train.py [--molecules 512] [--features 64] [--batch-size 32] [--seconds 20]

Data: synthetic QM9-sized molecules (9-29 atoms, mean about 18, elements H C N O F, positions in a
compact cluster), written to a temporary packed directory. Both layouts train the same PhysNet with
the same jitted step (``packedqdc.train.step``) over the same molecules: ``padded`` pads every
molecule to ``--num-atoms`` (60, all pairs) as the seed does; ``packed`` fills atom/pair budgets.
Compilation of every shape class (for host and for device-resident state) is done before timing; the figure is real molecules per second of
train steps (batch assembly in the loader's prefetch thread included).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from packedqdc.format import MoleculeChunk, PackedWriter
from packedqdc.loader import PackedMemmapLoader
from packedqdc.model.physnet import PhysNet, init_params
from packedqdc.train import TrainConfig, fit_reference_energies
from packedqdc.train.data import LoaderStream
from packedqdc.train.optim import make_optimizer
from packedqdc.train.state import create_state
from packedqdc.train.step import loss_weights, make_train_step


def qm9_like(path: Path, m: int, seed: int = 0) -> Path:
    """``m`` synthetic molecules with QM9's size range; energies and forces are random numbers."""
    rng = np.random.default_rng(seed)
    n = np.clip(np.rint(rng.normal(18, 3, size=m)), 9, 29).astype(np.int32)
    Z = rng.choice([1, 6, 7, 8, 9], p=[0.51, 0.35, 0.06, 0.07, 0.01], size=int(n.sum())).astype(np.int32)
    R = (rng.normal(size=(Z.size, 3)) * 1.8).astype(np.float32)
    E = rng.normal(-250000, 5000, size=m)
    F = rng.normal(0, 20, size=(Z.size, 3)).astype(np.float32)
    with PackedWriter(path, has_forces=True, has_qtot=True) as writer:
        writer.append(MoleculeChunk(n_atoms=n, Z=Z, R=R, E=E, F=F, Qtot=np.zeros(m)))
        writer.commit()
    return path


def throughput(data: Path, layout: str, args: argparse.Namespace) -> tuple[float, int]:
    """(molecules/s, number of shape classes) of train steps over ``data`` in ``layout``."""
    loader = PackedMemmapLoader(data, batch_size=args.batch_size, seed=0)
    reference = fit_reference_energies(loader.dataset, loader.indices)
    stream = LoaderStream(loader, reference, layout=layout, num_atoms=args.num_atoms)
    cfg = TrainConfig(features=args.features, batch_size=args.batch_size)
    model = PhysNet(features=args.features, num_iterations=3, electrostatics=False)
    weights = loss_weights(cfg)
    step = make_train_step(model, cfg, weights)
    batches = list(stream.epoch())
    params = init_params(model, jax.random.PRNGKey(0), {k: v[0] for k, v in batches[0][0].items()})
    state = create_state(params, make_optimizer(cfg), jax.random.PRNGKey(1))
    shapes = {}
    for global_batch, _ in batches:  # compile every shape class first
        shapes.setdefault((global_batch["Z"].shape, global_batch["E"].shape, global_batch["dst_idx"].shape), global_batch)
    for global_batch in shapes.values():
        # twice: the initial state is uncommitted host data, later states are device-committed
        # arrays, and jit compiles one executable for each
        for _ in range(2):
            state, _ = step(state, global_batch)
    jax.block_until_ready(state)
    molecules, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        for global_batch, mol_idx in stream.epoch():
            state, sums = step(state, global_batch)
            molecules += mol_idx.size
            if time.perf_counter() - start >= args.seconds:
                break
    jax.block_until_ready(state)
    return molecules / (time.perf_counter() - start), len(shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecules", type=int, default=512)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-atoms", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = qm9_like(Path(tmp) / "qm9like", args.molecules)
        print(f"{args.molecules} QM9-sized molecules, PhysNet features={args.features}, 3 modules, "
              f"batch {args.batch_size}, device {jax.devices()[0].platform}")
        results = {}
        for layout in ("packed", "padded"):
            rate, classes = throughput(data, layout, args)
            results[layout] = rate
            print(f"{layout:>7}: {rate:8.1f} molecules/s ({classes} shape class{'es' if classes > 1 else ''})")
        print(f"packed / padded: {results['packed'] / results['padded']:.1f}x")


if __name__ == "__main__":
    main()
