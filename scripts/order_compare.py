"""Held-out error of block order vs molecule order, on data stored with conformers side by side.

    python scripts/order_compare.py TRAIN.npz HELD_OUT.npz [--epochs 12] [--seeds 0 1] [--block-mib 0.008]
        [--window-blocks 64]

``TRAIN.npz`` is a PhysNet-style NPZ with a ``smiles`` array (``scripts/make_sample.py``); its
conformers are first stored in molecule order (a stable sort by SMILES: all conformers of one
molecule side by side), the worst case for block order: a block holds conformers of one molecule
only. Both files are packed (``pack_npz``); then for every seed a run is trained with ``order="molecule"`` and one with
``order="block"`` (blocks of ``--block-mib`` MiB, so that the small set has many blocks; windows of
``--window-blocks``, by default the loader's), same configuration otherwise, and the best checkpoint is evaluated on the held-out
set (``evaluate_run``). Prints energy and force MAE per run, and the spread between seeds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np

from packedqdc.pack import pack_npz
from packedqdc.train import TrainConfig, evaluate_run, fit, start_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train", type=Path)
    ap.add_argument("held_out", type=Path)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--block-mib", type=float, default=0.008)
    ap.add_argument("--window-blocks", type=int, default=None, help="default: the loader's (64)")
    ap.add_argument("--orders", nargs="+", default=["molecule", "block"], choices=["molecule", "block"])
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--num-iterations", type=int, default=2)
    ap.add_argument("--energy-unit", default=None, help="of the NPZ energies (pack npz's --energy-unit)")
    ap.add_argument("--length-unit", default=None, help="of the NPZ positions (pack npz's --length-unit)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        grouped = Path(tmp) / "grouped.npz"
        with np.load(args.train) as npz:
            arrays = {key: npz[key] for key in npz.files}
        order = np.argsort(arrays["smiles"], kind="stable")
        np.savez(grouped, **{k: (v[order] if v.ndim and v.shape[0] == order.shape[0] else v) for k, v in arrays.items()})
        units = {"energy_unit": args.energy_unit, "length_unit": args.length_unit}
        train = pack_npz(grouped, Path(tmp) / "train", **units).path
        held = pack_npz(args.held_out, Path(tmp) / "held", **units).path
        results: dict[str, list[tuple[float, float]]] = {order: [] for order in args.orders}
        for seed in args.seeds:
            for order in args.orders:
                cfg = TrainConfig(data_path=str(train), runs_dir=str(Path(tmp) / "runs"), name=f"{order}-{seed}",
                                  features=args.features, num_iterations=args.num_iterations, num_basis=32, batch_size=16,
                                  num_epochs=args.epochs, seed=seed,
                                  order=order)
                trainer = start_run(cfg)
                loader = trainer.train_data.loader
                loader.block_mib = args.block_mib
                if args.window_blocks is not None:
                    loader.window_blocks = args.window_blocks
                fit(trainer)
                trainer.checkpoints.close()
                res = evaluate_run(trainer.run_dir, held)
                results[order].append((res.energy_mae, res.forces_mae))
                blocks = "" if order == "molecule" else f", blocks of {args.block_mib} MiB, windows of {loader.window_blocks}"
                print(f"seed {seed} {order:8}: held-out energy MAE {res.energy_mae:.3f} kcal/mol, "
                      f"forces MAE {res.forces_mae:.3f} kcal/mol/Å ({res.n_molecules} molecules{blocks})", flush=True)
        for order, rows in results.items():
            e = [r[0] for r in rows]
            f = [r[1] for r in rows]
            print(f"{order:8}: energy MAE mean {statistics.mean(e):.3f} (range {min(e):.3f}-{max(e):.3f}), "
                  f"forces MAE mean {statistics.mean(f):.3f} (range {min(f):.3f}-{max(f):.3f})")


if __name__ == "__main__":
    main()
