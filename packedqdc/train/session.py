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
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ..errors import ConfigError, TargetExistsError
from ..format import E_FILE, OFFSETS, Z_FILE, PackedDataset, open_packed, sha256_file
from ..loader import PackedMemmapLoader
from ..model.physnet import PhysNet, init_params
from ..parallel import Placement, check_device_count, is_main_process, main_first, make_placement, sync
from .checkpoint import RunCheckpoints
from .config import AUTO_CUTOFF_MIN_ATOMS, TrainConfig
from .data import LoaderStream, default_data_path, split
from .loop import Trainer
from .optim import make_optimizer
from .reference import ReferenceEnergies, fit_charges, fit_reference_energies, with_initial_coulomb
from .runlock import LOCK_FILE, RunLock
from .state import TrainState, create_state
from .step import PROGRESS_KEY, loss_weights, make_eval_step, make_train_step

CONFIG_FILE = "config.json"
#: files whose sha256 (from meta.json) identify a dataset when a run is resumed on a copy
IDENTITY_FILES = (OFFSETS, Z_FILE, E_FILE)


def run_name(cfg: TrainConfig) -> str:
    """``cfg.name`` or a timestamped default."""
    return cfg.name or _dt.datetime.now().strftime("physnet-%Y%m%d-%H%M%S")


def build_model(model_attrs: dict[str, Any]) -> PhysNet:
    """PhysNet from stored attributes (``PhysNet.return_attributes``)."""
    attrs = dict(model_attrs)
    attrs.pop("dtype", None)
    return PhysNet(**attrs)


def model_for(cfg: TrainConfig, reference: ReferenceEnergies, electrostatics: bool, max_atoms: int = 1) -> PhysNet:
    """The PhysNet of ``cfg``; energy scale/shift start at the std/mean of the residual per atom.
    With ``cfg.pair_list == "cutoff"`` its Coulomb term covers every pair of molecules of up to
    ``max_atoms`` atoms by itself (``PhysNet.coulomb_window``)."""
    window = max(int(max_atoms) - 1, 1) if cfg.pair_list == "cutoff" else 0
    return PhysNet(features=cfg.features, num_basis=cfg.num_basis, cutoff=cfg.cutoff,
                   num_iterations=cfg.num_iterations, electrostatics=electrostatics,
                   energy_scale_init=max(reference.per_atom_std, 1e-3),
                   energy_shift_init=reference.per_atom_mean, natoms=cfg.num_atoms,
                   charge_embedding=cfg.charge_embedding, coulomb_window=window)


def resolve_pair_list(cfg: TrainConfig, max_atoms: int) -> str:
    """``cfg.pair_list`` with "auto" decided: cutoff pair lists when the largest molecule has more
    than ``AUTO_CUTOFF_MIN_ATOMS`` atoms (where they pay: docs/training.md), else all pairs."""
    if cfg.pair_list != "auto":
        return cfg.pair_list
    return "cutoff" if max_atoms > AUTO_CUTOFF_MIN_ATOMS else "all"


def _loaders(cfg: TrainConfig) -> tuple[PackedMemmapLoader, PackedMemmapLoader]:
    """(train, valid) loaders of this process's shard (the whole split on one process).

    ``cfg.batch_size`` is the global batch: the loaders plan batches of ``batch_size`` molecules
    exactly as on one device, and every step's batch is dealt out over the job's devices (about
    ``batch_size / D`` molecules each; ``PackedMemmapLoader.shard``). A run on D devices therefore
    sees the molecules of the one-device run in every step, and follows its trajectory up to float
    rounding.
    """
    loaders = split(cfg.data_path, cfg.batch_size, cfg.bucket_size, cfg.seed, cfg.valid_fraction,
                    threads=cfg.loader_threads, order=cfg.order, order_version=cfg.order_version)
    return tuple(loader.shard(jax.process_index(), jax.process_count()) for loader in loaders)


def _streams(cfg: TrainConfig, loaders: tuple[PackedMemmapLoader, PackedMemmapLoader],
             reference: ReferenceEnergies, placement: Placement) -> tuple[LoaderStream, LoaderStream]:
    """Streams that prepare and place each batch in the loader's prefetch thread, ahead of its step."""
    cutoff = cfg.cutoff if cfg.pair_list == "cutoff" else None
    return tuple(LoaderStream(loader, reference, layout=cfg.layout, num_atoms=cfg.num_atoms,
                              devices=placement.num_local_devices, put=placement.put_batch, cutoff=cutoff)
                 for loader in loaders)


def _assemble(cfg: TrainConfig, run_dir: Path, model: PhysNet, reference: ReferenceEnergies,
              state: TrainState, streams: tuple[LoaderStream, LoaderStream], has_forces: bool,
              placement: Placement, dataset: dict[str, Any], lock: RunLock | None,
              checkpoints: RunCheckpoints | None = None) -> Trainer:
    weights = loss_weights(cfg, has_forces, streams[0].loader.has_dipoles)
    return Trainer(cfg=cfg, run_dir=run_dir, model=model, reference=reference, weights=weights,
                   state=placement.replicate(state), train_data=streams[0], valid_data=streams[1],
                   train_step=placement.jit(make_train_step(model, cfg, weights)),
                   eval_step=placement.jit(make_eval_step(model, weights)),
                   checkpoints=checkpoints or RunCheckpoints(run_dir),
                   has_forces=has_forces, put=_placed, place_state=placement.replicate,
                   extra_meta={**placement.layout, "dataset": dataset}, lock=lock)


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


def dataset_identity(data: PackedDataset) -> dict[str, Any]:
    """What identifies a dataset for resuming: its counts and the sha256 of its index, Z and E
    files as its meta.json records them (none for a directory without meta.json)."""
    sums = (data.meta or {}).get("sha256") or {}
    return {"n_molecules": data.n_molecules, "n_atoms_total": data.n_atoms_total,
            "sha256": {name: sums[name] for name in IDENTITY_FILES if name in sums}}


def check_same_dataset(saved: dict[str, Any] | None, data_path: Path) -> None:
    """ConfigError unless ``data_path`` holds the dataset ``saved`` (a ``dataset_identity``) describes.

    Counts must agree, and every sha256 the run recorded must match the new directory's (from its
    meta.json, else computed from the files).
    """
    data = open_packed(data_path)
    if saved is None:  # a run from before identities were recorded: the counts are all we can say
        return
    now = dataset_identity(data)
    for key in ("n_molecules", "n_atoms_total"):
        if saved.get(key) != now[key]:
            raise ConfigError(f"{data_path}: not the dataset this run trained on ({key} {now[key]}, "
                              f"the run's had {saved.get(key)}); resume only with the same data")
    for name, digest in saved.get("sha256", {}).items():
        actual = now["sha256"].get(name) or sha256_file(data.path / name)
        if actual != digest:
            raise ConfigError(f"{data_path}: not the dataset this run trained on ({name} differs); "
                              "resume only with the same data")


def _make_run_dir(run_dir: Path) -> RunLock | None:
    """Create ``run_dir`` (exclusively: two runs of one name cannot both start) and lock it, on
    process 0; the other processes of a job wait for it."""
    lock = None
    if is_main_process():
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            run_dir.mkdir()
        except FileExistsError:
            raise TargetExistsError(f"{run_dir}: run already exists; pass --resume to continue it or "
                                    "choose another --name") from None
        lock = RunLock(run_dir)
    sync("packedqdc-run-dir")
    return lock


def _remove_unstarted(run_dir: Path, lock: RunLock | None) -> None:
    """Undo ``_make_run_dir`` when set-up failed before anything was written into the run."""
    if lock is None:
        return
    lock.release()
    if {p.name for p in run_dir.iterdir()} <= {LOCK_FILE}:
        shutil.rmtree(run_dir, ignore_errors=True)


def _check_valid_charges(ds: PackedDataset, valid_idx: np.ndarray, reference: ReferenceEnergies) -> None:
    """ConfigError, before training, if a total charge occurs only in the validation split: the
    reference energies have an offset only for the charges of the training split."""
    selected = np.zeros(ds.n_molecules, dtype=bool)
    selected[np.asarray(valid_idx, dtype=np.int64)] = True
    missing = sorted(set(fit_charges(ds, selected)) - set(reference.charges))
    if missing:
        raise ConfigError(f"{ds.path}: total charge(s) {', '.join(f'{q:+d}' for q in missing)} occur only in the "
                          "validation split; choose another --seed or a smaller --valid-fraction")


def start_run(cfg: TrainConfig, placement: Placement | None = None) -> Trainer:
    """A new run in ``cfg.runs_dir / name``; TargetExistsError if that directory exists.

    Paths are stored absolute, so the run can be resumed and evaluated from any directory.
    ``placement`` (default: one device) says where the run trains (``packedqdc.parallel``); in a
    multi-process job every process calls this with the same ``cfg`` (and an explicit ``name``).
    """
    placement = placement or make_placement(1)
    runs_dir = Path(cfg.runs_dir).absolute()
    cfg = cfg.replace(name=run_name(cfg), runs_dir=str(runs_dir))
    run_dir = runs_dir / cfg.name
    exists = run_dir.exists()
    sync("packedqdc-start-run")  # every process looks before process 0 creates it
    if exists:
        raise TargetExistsError(f"{run_dir}: run already exists; pass --resume to continue it or choose another --name")
    lock = _make_run_dir(run_dir)
    try:
        return _start(cfg, run_dir, placement, lock)
    except BaseException:
        _remove_unstarted(run_dir, lock)
        raise


def _start(cfg: TrainConfig, run_dir: Path, placement: Placement, lock: RunLock | None) -> Trainer:
    data_path = Path(cfg.data_path) if cfg.data_path else main_first(lambda: default_data_path(cfg.runs_dir))
    if not data_path.exists():
        raise ConfigError(f"{data_path}: --data-path does not exist")
    cfg = cfg.replace(data_path=str(data_path.absolute()))
    loaders = _loaders(cfg)
    max_atoms = int(loaders[0].n_atoms.max(initial=1))  # the whole dataset's (train and valid)
    # what "auto" chose: a resumed run keeps it
    cfg = cfg.replace(order=loaders[0].order, pair_list=resolve_pair_list(cfg, max_atoms))
    ds, train_idx = loaders[0].dataset, loaders[0].indices
    reference = fit_reference_energies(ds, train_idx)
    _check_valid_charges(ds, loaders[1].indices, reference)
    charged = ds.Qtot is not None and bool((np.asarray(ds.Qtot)[train_idx] != 0).any())
    electrostatics = charged if cfg.electrostatics is None else cfg.electrostatics
    cfg = cfg.replace(electrostatics=electrostatics)
    if electrostatics:  # ions start near their energies, not 60-85 kcal/mol above them
        reference = with_initial_coulomb(reference, ds, train_idx, cfg.cutoff, seed=cfg.seed)
    model = model_for(cfg, reference, electrostatics, max_atoms)
    streams = _streams(cfg, loaders, reference, placement)
    state = initial_state(cfg, model, streams[0])
    if is_main_process():
        cfg.save(run_dir / CONFIG_FILE)
    sync("packedqdc-config")
    return _assemble(cfg, run_dir, model, reference, state, streams, ds.F is not None, placement,
                     dataset_identity(ds), lock)


def resume_run(run_dir: str | Path, *, num_epochs: int | None = None, max_time: float | None = None,
               data_path: str | Path | None = None, placement: Placement | None = None) -> Trainer:
    """Continue ``run_dir`` from its ``latest`` checkpoint; ``num_epochs``/``max_time`` may change.

    ``data_path`` points the run at a copy of its dataset (moved, or on another machine): it must
    hold the same molecules (``check_same_dataset``). ``placement`` (default: one device) must have
    the devices and processes the run had.
    """
    placement = placement or make_placement(1)
    run_dir = Path(run_dir).absolute()
    lock = RunLock(run_dir) if is_main_process() else None
    try:
        return _resume(run_dir, num_epochs, max_time, data_path, placement, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _resume(run_dir: Path, num_epochs: int | None, max_time: float | None, data_path: str | Path | None,
            placement: Placement, lock: RunLock | None) -> Trainer:
    checkpoints = RunCheckpoints(run_dir)
    meta = checkpoints.read_meta("latest")
    check_device_count(meta, placement, run=str(run_dir))
    cfg = TrainConfig.from_dict({"order": "molecule", **meta["config"]})  # runs saved before --order: molecule
    cfg = cfg.replace(num_epochs=cfg.num_epochs if num_epochs is None else num_epochs, max_time=max_time,
                      runs_dir=str(run_dir.parent), name=run_dir.name)
    if data_path is not None:
        check_same_dataset(meta.get("dataset"), Path(data_path))
        cfg = cfg.replace(data_path=str(Path(data_path).absolute()))
    elif not Path(cfg.data_path).exists():
        raise ConfigError(f"{cfg.data_path}: the run's dataset is not there (moved or deleted?); "
                          "pass --data-path to a copy of it")
    reference = ReferenceEnergies.from_dict(meta["reference"])
    model = build_model(meta["model"])
    streams = _streams(cfg, _loaders(cfg), reference, placement)
    template = placement.replicate(initial_state(cfg, model, streams[0]))
    state, meta = checkpoints.restore("latest", template)
    streams[0].restore(meta["loader"])
    identity = meta.get("dataset") or dataset_identity(streams[0].loader.dataset)
    trainer = _assemble(cfg, run_dir, model, reference, state, streams, bool(meta["has_forces"]), placement,
                        identity, lock, checkpoints)
    if PROGRESS_KEY in meta:  # where the learning-rate schedule had got to
        trainer.extra_meta[PROGRESS_KEY] = float(meta[PROGRESS_KEY])
    best = meta.get("best_valid_loss")
    trainer.best_valid_loss = math.inf if best is None else float(best)
    if is_main_process():
        cfg.save(run_dir / CONFIG_FILE)
        trainer.metrics_csv.truncate_after(int(meta["epoch"]))
    sync("packedqdc-resume-run")
    return trainer
