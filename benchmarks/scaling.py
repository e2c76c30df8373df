"""Data-parallel scaling of the real PhysNet train step: steps/s and molecules/s per device count.

Weak scaling: every device gets one packed sub-batch of ``--batch-size`` molecules, so a step over
``D`` devices trains ``D * batch_size`` molecules. Each forced-host-device count runs in its own
subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=D`` must be set before JAX is
imported); on a GPU machine one more subprocess times 1, 2, 4, ... of the real GPUs.

Forced host devices share the machine's CPU cores, so on CPU this measures the overhead of the
sharded step (collectives, partitioning), not a speed-up.

    python benchmarks/scaling.py                      # 1, 2, 4 host devices (+ GPUs if present)
    python benchmarks/scaling.py --features 128 --num-iterations 3 --batch-size 32 --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def synthetic_sub_batch(rng: np.random.Generator, molecules: int, min_atoms: int, max_atoms: int) -> dict:
    """One packed sub-batch of the batch contract (docs/architecture.md), all pairs, fixed budgets.

    Molecules of ``min_atoms..max_atoms`` atoms (H, C, N, O on a jittered grid, >= 1 Å apart),
    random residual energies and forces; atom budget ``molecules * max_atoms``, pair budget the
    same times ``max_atoms - 1``, so every sub-batch has one shape. Dtypes as ``prepare_batch``
    makes them (float32 targets).
    """
    A, P, M = molecules * max_atoms, molecules * max_atoms * (max_atoms - 1), molecules
    b = {"Z": np.zeros(A, np.int32), "R": np.zeros((A, 3), np.float32), "F": np.zeros((A, 3), np.float32),
         "atom_mask": np.zeros(A, bool), "batch_segments": np.zeros(A, np.int32),
         "E": np.zeros(M, np.float32), "Qtot": np.zeros(M, np.float32), "N": np.zeros(M, np.int32),
         "mol_mask": np.ones(M, bool), "dst_idx": np.zeros(P, np.int32), "src_idx": np.zeros(P, np.int32),
         "pair_mask": np.zeros(P, bool)}
    grid = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3) * 1.4
    atom, pair = 0, 0
    for m in range(M):
        n = int(rng.integers(min_atoms, max_atoms + 1))
        sl = slice(atom, atom + n)
        b["Z"][sl] = rng.choice([1, 6, 7, 8], n)
        b["R"][sl] = grid[rng.permutation(len(grid))[:n]] + rng.normal(0, 0.1, (n, 3))
        b["F"][sl] = rng.normal(0, 10, (n, 3))
        b["atom_mask"][sl] = True
        b["batch_segments"][sl] = m
        b["E"][m], b["N"][m] = rng.normal(0, 5), n
        i, j = np.nonzero(~np.eye(n, dtype=bool))
        ps = slice(pair, pair + len(i))
        b["dst_idx"][ps], b["src_idx"][ps], b["pair_mask"][ps] = atom + i, atom + j, True
        atom, pair = atom + n, pair + len(i)
    b["batch_segments"][atom:] = M - 1
    return b


def time_devices(args: argparse.Namespace, counts: list[int]) -> list[dict]:
    """Time the real train step on the first ``D`` local devices for each ``D`` in ``counts``."""
    import jax

    from packedqdc.model.physnet import PhysNet, init_params
    from packedqdc.parallel import make_placement
    from packedqdc.train.config import TrainConfig
    from packedqdc.train.optim import make_optimizer
    from packedqdc.train.state import create_state
    from packedqdc.train.step import loss_weights, make_train_step

    cfg = TrainConfig(features=args.features, num_iterations=args.num_iterations, num_basis=args.num_basis,
                      batch_size=args.batch_size, electrostatics=False)
    model = PhysNet(features=cfg.features, num_basis=cfg.num_basis, num_iterations=cfg.num_iterations,
                    cutoff=cfg.cutoff, electrostatics=False, natoms=args.max_atoms)
    optimizer = make_optimizer(cfg)
    rng = np.random.default_rng(0)
    subs = [synthetic_sub_batch(rng, args.batch_size, args.min_atoms, args.max_atoms) for _ in range(max(counts))]
    params = init_params(model, jax.random.PRNGKey(0), subs[0])
    step_fn = make_train_step(model, cfg, loss_weights(cfg))
    rows = []
    for d in counts:
        placement = make_placement(d)
        step = placement.jit(step_fn)
        state = placement.replicate(create_state(params, optimizer, jax.random.PRNGKey(0)))
        batch = placement.put_batch({k: np.stack([s[k] for s in subs[:d]]) for k in subs[0]})
        for _ in range(2):
            state, sums = step(state, batch)
        jax.block_until_ready(state)
        start = time.perf_counter()
        for _ in range(args.steps):
            state, sums = step(state, batch)
        jax.block_until_ready(state)
        seconds = time.perf_counter() - start
        rows.append({"platform": jax.devices()[0].platform, "devices": d,
                     "steps_per_s": args.steps / seconds,
                     "molecules_per_s": args.steps * d * args.batch_size / seconds,
                     "loss": float(sums["loss"])})
    return rows


def run_worker(args: argparse.Namespace, env: dict[str, str]) -> list[dict]:
    """Run this script as a worker subprocess with ``env``; its JSON rows (empty if it found none)."""
    argv = [sys.executable, __file__, "--worker", *sys.argv[1:]]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        sys.exit(f"worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host-devices", default="1,2,4", help="forced host device counts")
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--num-iterations", type=int, default=2)
    parser.add_argument("--num-basis", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16, help="molecules per device per step")
    parser.add_argument("--min-atoms", type=int, default=9)
    parser.add_argument("--max-atoms", type=int, default=19)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per device count")
    parser.add_argument("--no-gpu", action="store_true", help="skip the real-GPU measurement")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per worker subprocess")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import jax

        if jax.devices()[0].platform == "cpu":
            counts = [len(jax.devices())]
        else:
            n = len(jax.devices())
            counts = [d for d in (1, 2, 4, 8, 16) if d <= n] + ([n] if n not in (1, 2, 4, 8, 16) else [])
        print(json.dumps(time_devices(args, counts)))
        return

    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    rows = []
    for d in (int(x) for x in args.host_devices.split(",")):
        env = {**base, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={d}"}
        rows += run_worker(args, env)
    if not args.no_gpu:
        gpu_env = {k: v for k, v in base.items() if k != "JAX_PLATFORMS"}
        probe = subprocess.run([sys.executable, "-c", "import jax; print(len(jax.devices('gpu')))"],
                               env=gpu_env, capture_output=True, text=True, timeout=args.timeout)
        if probe.returncode == 0 and int(probe.stdout.split()[-1]) > 0:
            rows += run_worker(args, {**gpu_env, "JAX_PLATFORMS": "cuda"})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"PhysNet features={args.features} iterations={args.num_iterations} basis={args.num_basis}, "
          f"{args.batch_size} molecules of {args.min_atoms}-{args.max_atoms} atoms per device, all pairs")
    print(f"{'platform':>8} {'devices':>7} {'steps/s':>9} {'molecules/s':>12}")
    for r in rows:
        print(f"{r['platform']:>8} {r['devices']:>7} {r['steps_per_s']:>9.2f} {r['molecules_per_s']:>12.1f}")


if __name__ == "__main__":
    main()
