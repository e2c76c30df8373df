"""Set up a run (new or resumed): data, split, reference energies, model, state, steps, checkpoints.

``start_run(cfg)`` makes ``runs/NAME`` (refusing an existing one), fits the reference energies on
the training split, initialises PhysNet with PhysNet's scale/shift from the residual energies per
atom, and writes ``config.json``. ``resume_run(run_dir)`` restores everything from the ``latest``
checkpoint (state, loader position, reference energies, configuration) so training continues
exactly where it stopped.
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ..errors import ConfigError, TargetExistsError
from ..loader import PackedMemmapLoader
from ..model.physnet import PhysNet, init_params
from ..parallel import Placement, check_device_count, is_main_process, main_first, make_placement, sync
from .checkpoint import RunCheckpoints
from .config import TrainConfig
from .data import LoaderStream, default_data_path, split
from .loop import Trainer
from .optim import make_optimizer
from .reference import ReferenceEnergies, fit_reference_energies
from .state import TrainState, create_state
from .step import loss_weights, make_eval_step, make_train_step

CONFIG_FILE = "config.json"


def run_name(cfg: TrainConfig) -> str:
    """``cfg.name`` or a timestamped default."""
    return cfg.name or _dt.datetime.now().strftime("physnet-%Y%m%d-%H%M%S")


def build_model(model_attrs: dict[str, Any]) -> PhysNet:
    """PhysNet from stored attributes (``PhysNet.return_attributes``)."""
    attrs = dict(model_attrs)
    attrs.pop("dtype", None)
    return PhysNet(**attrs)


def model_for(cfg: TrainConfig, reference: ReferenceEnergies, electrostatics: bool) -> PhysNet:
    """The PhysNet of ``cfg``; energy scale/shift start at the std/mean of the residual per atom."""
    return PhysNet(features=cfg.features, num_basis=cfg.num_basis, cutoff=cfg.cutoff,
                   num_iterations=cfg.num_iterations, electrostatics=electrostatics,
                   energy_scale_init=max(reference.per_atom_std, 1e-3),
                   energy_shift_init=reference.per_atom_mean, natoms=cfg.num_atoms)


def _loaders(cfg: TrainConfig) -> tuple[PackedMemmapLoader, PackedMemmapLoader]:
    """(train, valid) loaders of this process's shard (the whole split on one process).

    ``cfg.batch_size`` is the global batch: the loaders plan batches of ``batch_size`` molecules
    exactly as on one device, and every step's batch is dealt out over the job's devices (about
    ``batch_size / D`` molecules each; ``PackedMemmapLoader.shard``). A run on D devices therefore
    sees the molecules of the one-device run in every step, and follows its trajectory up to float
    rounding.
    """
    loaders = split(cfg.data_path, cfg.batch_size, cfg.bucket_size, cfg.seed, cfg.valid_fraction,
                    threads=cfg.loader_threads, order=cfg.order)
    return tuple(loader.shard(jax.process_index(), jax.process_count()) for loader in loaders)


def _streams(cfg: TrainConfig, loaders: tuple[PackedMemmapLoader, PackedMemmapLoader],
             reference: ReferenceEnergies, placement: Placement) -> tuple[LoaderStream, LoaderStream]:
    """Streams that prepare and place each batch in the loader's prefetch thread, ahead of its step."""
    return tuple(LoaderStream(loader, reference, layout=cfg.layout, num_atoms=cfg.num_atoms,
                              devices=placement.num_local_devices, put=placement.put_batch)
                 for loader in loaders)


def _assemble(cfg: TrainConfig, run_dir: Path, model: PhysNet, reference: ReferenceEnergies,
              state: TrainState, streams: tuple[LoaderStream, LoaderStream], has_forces: bool,
              placement: Placement) -> Trainer:
    weights = loss_weights(cfg, has_forces)
    return Trainer(cfg=cfg, run_dir=run_dir, model=model, reference=reference, weights=weights,
                   state=placement.replicate(state), train_data=streams[0], valid_data=streams[1],
                   train_step=placement.jit(make_train_step(model, cfg, weights)),
                   eval_step=placement.jit(make_eval_step(model, weights)), checkpoints=RunCheckpoints(run_dir),
                   has_forces=has_forces, put=_placed, place_state=placement.replicate,
                   extra_meta=dict(placement.layout))


def _placed(global_batch: Any) -> Any:
    """The streams place batches on the devices in their prefetch thread: nothing left to do."""
    return global_batch


def initial_state(cfg: TrainConfig, model: PhysNet, stream: LoaderStream) -> TrainState:
    """Fresh state: parameters initialised on the first training batch from ``cfg.seed``."""
    init_key, state_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    batches = stream.epoch()
    first, _ = next(batches)
    batches.close()
    stream.restore({"seed": cfg.seed, "epoch": 0, "position": 0, "devices": stream.devices})
    params = init_params(model, init_key, {key: value[0] for key, value in first.items()})
    return create_state(params, make_optimizer(cfg), state_key)


def start_run(cfg: TrainConfig, placement: Placement | None = None) -> Trainer:
    """A new run in ``cfg.runs_dir / name``; TargetExistsError if that directory exists.

    ``placement`` (default: one device) says where the run trains (``packedqdc.parallel``); in a
    multi-process job every process calls this with the same ``cfg`` (and an explicit ``name``).
    """
    placement = placement or make_placement(1)
    name = run_name(cfg)
    cfg = cfg.replace(name=name)
    run_dir = Path(cfg.runs_dir) / name
    exists = run_dir.exists()
    sync("packedqdc-start-run")  # every process looks before process 0 creates it
    if exists:
        raise TargetExistsError(f"{run_dir}: run already exists; pass --resume to continue it or choose another --name")
    data_path = Path(cfg.data_path) if cfg.data_path else main_first(lambda: default_data_path(cfg.runs_dir))
    if not data_path.exists():
        raise ConfigError(f"{data_path}: --data-path does not exist")
    cfg = cfg.replace(data_path=str(data_path))
    loaders = _loaders(cfg)
    cfg = cfg.replace(order=loaders[0].order)  # what "auto" chose: a resumed run keeps it
    ds, train_idx = loaders[0].dataset, loaders[0].indices
    reference = fit_reference_energies(ds, train_idx)
    charged = ds.Qtot is not None and bool((np.asarray(ds.Qtot)[train_idx] != 0).any())
    electrostatics = charged if cfg.electrostatics is None else cfg.electrostatics
    cfg = cfg.replace(electrostatics=electrostatics)
    model = model_for(cfg, reference, electrostatics)
    streams = _streams(cfg, loaders, reference, placement)
    state = initial_state(cfg, model, streams[0])
    if is_main_process():
        run_dir.mkdir(parents=True)
        cfg.save(run_dir / CONFIG_FILE)
    sync("packedqdc-run-dir")
    return _assemble(cfg, run_dir, model, reference, state, streams, ds.F is not None, placement)


def resume_run(run_dir: str | Path, *, num_epochs: int | None = None, max_time: float | None = None,
               placement: Placement | None = None) -> Trainer:
    """Continue ``run_dir`` from its ``latest`` checkpoint; ``num_epochs``/``max_time`` may change.

    ``placement`` (default: one device) must have the devices and processes the run had.
    """
    placement = placement or make_placement(1)
    run_dir = Path(run_dir)
    checkpoints = RunCheckpoints(run_dir)
    meta = checkpoints.read_meta("latest")
    check_device_count(meta, placement, run=str(run_dir))
    cfg = TrainConfig.from_dict(meta["config"])
    cfg = cfg.replace(num_epochs=cfg.num_epochs if num_epochs is None else num_epochs, max_time=max_time)
    reference = ReferenceEnergies.from_dict(meta["reference"])
    model = build_model(meta["model"])
    streams = _streams(cfg, _loaders(cfg), reference, placement)
    template = placement.replicate(initial_state(cfg, model, streams[0]))
    state, meta = checkpoints.restore("latest", template)
    streams[0].restore(meta["loader"])
    trainer = _assemble(cfg, run_dir, model, reference, state, streams, bool(meta["has_forces"]), placement)
    best = meta.get("best_valid_loss")
    trainer.best_valid_loss = math.inf if best is None else float(best)
    if is_main_process():
        cfg.save(run_dir / CONFIG_FILE)
        trainer.metrics_csv.truncate_after(int(meta["epoch"]))
    sync("packedqdc-resume-run")
    return trainer
