"""Host time per training step of ``packedqdc train``'s own code path, with a tiny model on CPU.

    python benchmarks/train_host.py [--molecules 20000] [--features 8] [--num-iterations 1]
        [--batch-size 32] [--steps 600] [--loader-threads 1]

A run is started exactly as ``packedqdc train`` starts it (``packedqdc.train.session.start_run``:
split, loaders, ``LoaderStream``, placement, jitted step) on synthetic QM9-sized molecules, and the
training loop of ``packedqdc.train.loop.fit`` is mirrored step by step. Printed per step:

- ``wall``: wall time of a step in the steady state (compiled, after a warm-up epoch);
- ``host``: CPU time of the training thread per step (``time.thread_time``): drawing the next
  batch from the stream (assembly and ``prepare_global`` when they run in this thread), placing it
  (``trainer.put``), dispatching the step and reading the previous step's sums. Waiting (for the
  prefetch thread or the step) costs no CPU time and is not counted. With a tiny model on CPU,
  this is where the loader and Python overheads show.
- ``data path alone``: the same CPU time per batch for drawing and placing batches with no step.
- ``steps alone``: wall time per step of the jitted steps dispatched back to back on batches
  already placed (one per shape class): the devices' time per step when the host keeps ahead; its
  ratio to ``wall`` estimates how busy the devices are during training (issue 13's GPU target:
  >= 90% at batch 32 and 128, features 128: ``--features 128 --num-iterations 3 --batch-size 128``).

To compare with another version of packedqdc side by side, alternate runs, e.g.
``PYTHONPATH=/tmp/old python benchmarks/train_host.py --rounds 1`` and the same without
``PYTHONPATH``, a few times (the machine may be shared: alternate, do not run one after the other).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from packedqdc.train import TrainConfig
from packedqdc.train.session import start_run

try:
    from packedqdc.train.metrics import sums_to_host  # how fit reads a step's sums
except ImportError:  # versions before it (run beside them with PYTHONPATH) read them with device_get
    sums_to_host = jax.device_get

from train import qm9_like  # benchmarks/train.py


def measure(trainer, steps: int) -> tuple[float, float]:
    """(wall s/step, training-thread CPU s/step) over ``steps`` steady-state steps."""
    done = 0
    pending = None
    t_start, cpu_start = time.perf_counter(), time.thread_time()
    while done < steps:
        it = iter(trainer.train_data.epoch())
        while done < steps:
            try:
                global_batch, mol_idx = next(it)
            except StopIteration:
                break
            new_state, sums = trainer.train_step(trainer.state, trainer.put(global_batch))
            if pending is not None:
                sums_to_host(pending)  # the loop reads the previous step's sums while this one runs
            pending = sums
            trainer.state = new_state
            done += 1
        it.close()
    jax.block_until_ready(trainer.state)
    return (time.perf_counter() - t_start) / steps, (time.thread_time() - cpu_start) / steps


def measure_stream(trainer, steps: int) -> float:
    """Training-thread CPU s/step of the data path alone: next batch from the stream, placed."""
    done, cpu_start = 0, time.thread_time()
    while done < steps:
        for global_batch, _ in trainer.train_data.epoch():
            jax.block_until_ready(trainer.put(global_batch))
            done += 1
            if done == steps:
                break
    return (time.thread_time() - cpu_start) / steps


def measure_device(trainer, steps: int) -> float:
    """Wall s/step of the steps alone: the first batch of every shape class placed on the devices
    once, then ``steps`` steps dispatched back to back over them (no loader, no sums read). When the
    host keeps ahead of the devices this is the devices' time per step; over the loop's wall time
    per step it is the fraction of the step the devices are busy."""
    placed, seen = [], set()
    for global_batch, _ in trainer.train_data.epoch():
        shape = tuple(np.shape(v) for v in global_batch.values())
        if shape not in seen:
            seen.add(shape)
            placed.append(trainer.put(global_batch))
    state = trainer.state
    for batch in placed:  # compiled already; one warm step each
        state, _ = trainer.train_step(state, batch)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(steps):
        state, _ = trainer.train_step(state, placed[i % len(placed)])
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecules", type=int, default=20000)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--num-iterations", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loader-threads", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = qm9_like(Path(tmp) / "qm9like", args.molecules)
        extra = {} if args.loader_threads is None else {"loader_threads": args.loader_threads}
        cfg = TrainConfig(data_path=str(data), runs_dir=str(Path(tmp) / "runs"), name="bench",
                          features=args.features, num_iterations=args.num_iterations,
                          batch_size=args.batch_size, num_epochs=1, **extra)
        trainer = start_run(cfg)
        measure(trainer, args.steps)  # compiles every shape class, fills the buffers
        import packedqdc

        print(f"packedqdc from {Path(packedqdc.__file__).parent}")
        print(f"{args.molecules} QM9-sized molecules, batch {args.batch_size}, features {args.features}, "
              f"{args.num_iterations} module(s), device {jax.devices()[0].platform}, {extra or 'defaults'}")
        for r in range(args.rounds):
            wall, host = measure(trainer, args.steps)
            data = measure_stream(trainer, args.steps)
            device = measure_device(trainer, args.steps)
            print(f"round {r}: wall {wall * 1e6:7.0f} us/step, host {host * 1e6:7.0f} us/step "
                  f"({args.steps} steps); data path alone {data * 1e6:6.0f} us/step of training-thread CPU; "
                  f"steps alone {device * 1e6:7.0f} us/step: devices busy ~{min(device / wall, 1.0):.0%}, "
                  f"{args.batch_size / wall:,.0f} molecules/s")  # fmt: skip


if __name__ == "__main__":
    main()
