"""Where the CPU train step spends its time: molecules/s of ``packedqdc train``'s jitted step for a few
model settings (feature width, radial basis width, electrostatics), on the same packed batches.

    python benchmarks/step_profile.py --data DIR [--steps 30] [--rounds 3]

``DIR`` is any packed directory (e.g. the accuracy benchmark's ``CACHE/train``). Every setting is
compiled first; then the settings take turns, ``--steps`` steps each, for ``--rounds`` rounds (so a
shared, noisy machine slows them alike), and the best round of each is printed.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from packedqdc.loader import PackedMemmapLoader
from packedqdc.model.physnet import PhysNet, init_params
from packedqdc.train import TrainConfig, fit_reference_energies
from packedqdc.train.data import LoaderStream
from packedqdc.train.optim import make_optimizer
from packedqdc.train.state import create_state
from packedqdc.train.step import loss_weights, make_train_step
from step_timing import best_pass_seconds, run_pass

SETTINGS = (  # (features, num_basis, electrostatics)
    (64, 64, True), (64, 32, True), (64, 16, True), (64, 64, False), (128, 64, True), (128, 32, True),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    loader = PackedMemmapLoader(args.data, batch_size=args.batch_size, shuffle=True, seed=0)
    reference = fit_reference_energies(loader.dataset, np.arange(loader.N))
    stream = LoaderStream(loader, reference, layout="packed", num_atoms=60)
    batches = []
    for global_batch, _ in stream.epoch():
        batches.append(jax.device_put(global_batch))
        if len(batches) == args.steps:
            break
    n_mol = sum(int(np.asarray(b["mol_mask"]).sum()) for b in batches)
    runs = {}
    for features, basis, ele in SETTINGS:
        cfg = TrainConfig(features=features, num_basis=basis, cutoff=6.0, batch_size=args.batch_size)
        model = PhysNet(features=features, num_basis=basis, cutoff=6.0, electrostatics=ele)
        params = init_params(model, jax.random.PRNGKey(0), {k: v[0] for k, v in batches[0].items()})
        step = make_train_step(model, cfg, loss_weights(cfg))
        start = time.perf_counter()
        state = run_pass(step, create_state(params, make_optimizer(cfg), jax.random.PRNGKey(1)), batches)
        print(f"F={features:3d} K={basis:2d} electrostatics={'on ' if ele else 'off'} compiled + 1 pass in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        runs[(features, basis, ele)] = (step, state, batches)
    best = best_pass_seconds(runs, args.rounds)
    print(f"{args.steps} steps of ~{args.batch_size} molecules ({n_mol} molecules), best of {args.rounds} rounds; "
          f"load average {os.getloadavg()[0]:.1f}")
    for (features, basis, ele), seconds in best.items():
        print(f"  F={features:3d} K={basis:2d} electrostatics={'on ' if ele else 'off'}  "
              f"{n_mol / seconds:7.1f} molecules/s")


if __name__ == "__main__":
    main()
