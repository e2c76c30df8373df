"""Retrain a finished run with its initial parameters moved by one ulp: a rounding-only control.

Two runs of one configuration on different device counts differ only in the order of float
reductions; so does a 1-device run whose initial parameters are moved to the next float32. Training
amplifies either difference in the same way, so the spread between a run and this control measures
how far apart "the same training" can end, whatever the parallel code does (see docs/parallel.md,
"Held-out error").

The new run takes the configuration of ``RUN_DIR/config.json`` (data path, seed, model, schedule)
on one device, under ``--name`` in the same runs directory; compare both with ``packedqdc evaluate``.
Run it from the directory the original run was started in (``config.json`` keeps its paths as
they were given).

    python scripts/ulp_control.py runs/S0D1 --name S0U1
    packedqdc evaluate runs/S0U1 --data-path heldout --checkpoint latest
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from packedqdc.train.config import TrainConfig
from packedqdc.train.loop import fit
from packedqdc.train.session import start_run


def next_float(tree):
    """Every float leaf moved one ulp towards +inf (integers untouched)."""
    return jax.tree.map(
        lambda x: jnp.nextafter(x, jnp.inf) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="the finished run whose configuration to repeat")
    ap.add_argument("--name", required=True, help="name of the control run (in the same runs directory)")
    args = ap.parse_args()
    cfg = TrainConfig.from_dict(json.loads((args.run_dir / "config.json").read_text()))
    trainer = start_run(cfg.replace(name=args.name))
    state = trainer.state
    trainer.state = state.replace(params=next_float(state.params), ema_params=next_float(state.ema_params))
    result = fit(trainer)
    print(f"{result.reason}: epoch {result.epoch}, step {result.step}, best valid loss {result.best_valid_loss:.4g}; "
          f"outputs in {trainer.run_dir}")


if __name__ == "__main__":
    main()
