"""Minimal 10-epoch PhysNet training loop over the library API (the seed's example, working).

    python examples/train_memmap_simple.py [PACKED_DIR]

Without an argument it packs the bundled sample (``packedqdc.data.SAMPLE_NPZ``) into a temporary
directory. It loads the data with ``PackedMemmapLoader`` + ``split_loader``, fits per-element
reference energies on the training split, builds ``EF`` (PhysNet) and runs the jitted train step
of ``packedqdc.train`` on packed batches, printing train/valid loss and valid MAEs per epoch.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import jax

from packedqdc import EF
from packedqdc.data import SAMPLE_NPZ
from packedqdc.loader import PackedMemmapLoader, split_loader
from packedqdc.model.physnet import init_params
from packedqdc.pack import pack_npz
from packedqdc.train import TrainConfig, fit_reference_energies
from packedqdc.train.data import LoaderStream
from packedqdc.train.loop import evaluate_stream
from packedqdc.train.metrics import SumAccumulator, summarize
from packedqdc.train.optim import make_optimizer
from packedqdc.train.state import create_state
from packedqdc.train.step import loss_weights, make_eval_step, make_train_step

BATCH, NUM_EPOCHS, LEARNING_RATE = 32, 10, 1e-3


def main(data_path: Path) -> None:
    loader = PackedMemmapLoader(data_path, batch_size=BATCH, shuffle=True, bucket_size=8192, seed=42)
    train_loader, valid_loader = split_loader(loader, train_fraction=0.9, seed=42)
    reference = fit_reference_energies(loader.dataset, train_loader.indices)
    train = LoaderStream(train_loader, reference, layout="packed", num_atoms=60)
    valid = LoaderStream(valid_loader, reference, layout="packed", num_atoms=60)

    model = EF(features=64, num_iterations=3, cutoff=5.0, natoms=60,
               energy_scale_init=reference.per_atom_std, energy_shift_init=reference.per_atom_mean)
    cfg = TrainConfig(learning_rate=LEARNING_RATE, batch_size=BATCH)
    weights = loss_weights(cfg)
    first, _ = next(iter(valid.epoch()))
    params = init_params(model, jax.random.PRNGKey(0), {k: v[0] for k, v in first.items()})
    state = create_state(params, make_optimizer(cfg), jax.random.PRNGKey(1))
    train_step, eval_step = make_train_step(model, cfg, weights), make_eval_step(model, weights)

    for epoch in range(NUM_EPOCHS):
        acc = SumAccumulator()
        for global_batch, _ in train.epoch():
            state, sums = train_step(state, global_batch)
            acc.add(jax.device_get(sums))
        tr = summarize(acc.totals, weights)
        va = summarize(evaluate_stream(eval_step, state.ema_params, valid, jax.device_put), weights)
        print(f"epoch {epoch + 1:2d}  train loss {tr['loss']:9.3f}  valid loss {va['loss']:9.3f}  "
              f"valid E MAE {va['energy_mae']:7.3f} kcal/mol  valid F MAE {va['forces_mae']:7.3f} kcal/mol/Å")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(pack_npz(SAMPLE_NPZ, Path(tmp) / "sample").path)
