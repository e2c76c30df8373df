"""The epoch loop: train steps, NaN guard, validation with the EMA weights, checkpoints, metrics.

The loop is a library function driven by callbacks (the CLI draws a rich progress bar with them).
Batches come from a ``BatchStream`` (global batches with a leading device axis) and are placed on
devices by ``Trainer.put`` (``jax.device_put`` on one device; a sharding placement for data
parallelism), so the loop does not care where batches come from or where they go.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import jax
import numpy as np

from ..errors import TrainingError
from ..model.physnet import PhysNet
from ..parallel import is_main_process
from .checkpoint import RunCheckpoints
from .config import TrainConfig
from .loss import LossWeights
from .metrics import MetricsCSV, SumAccumulator, summarize, sums_to_host
from .optim import learning_rate, plateau_update, schedule_progress
from .reference import ReferenceEnergies
from .runlock import RunLock
from .state import TrainState
from .step import PROGRESS_KEY


class BatchStream(Protocol):
    """A resumable source of prepared global batches (see ``packedqdc.train.data``)."""

    def epoch(self) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """Yield ``(global_batch, mol_idx)`` for the rest of the current epoch, then move to the next.

        ``global_batch``: prepared arrays with a leading device axis; ``mol_idx``: dataset indices
        of its real molecules (for error messages).
        """
        ...

    def num_steps(self) -> int:
        """Global batches in a full epoch."""
        ...

    def state(self) -> dict[str, Any]:
        """JSON-ready position: the next ``epoch()`` continues from here after ``restore``."""
        ...

    def restore(self, state: Mapping[str, Any]) -> None:
        ...


@dataclass
class Callbacks:
    """Optional hooks: ``epoch_start(epoch, num_steps)``, ``step(n_molecules)``, ``epoch_end(row)``,
    ``message(text)`` (one-line notes: checkpoints, stops), and ``stop_requested()``, polled after
    every step: a reason it returns (e.g. "interrupted", "terminated" from a signal handler) stops
    the run at that step boundary with a ``latest`` checkpoint."""

    epoch_start: Callable[[int, int], None] | None = None
    step: Callable[[int], None] | None = None
    epoch_end: Callable[[dict[str, Any]], None] | None = None
    message: Callable[[str], None] | None = None
    stop_requested: Callable[[], str | None] | None = None

    def note(self, text: str) -> None:
        if self.message is not None:
            self.message(text)


@dataclass
class Trainer:
    """A run in progress: everything the loop needs, state passed explicitly through it.

    ``train_step(state, global_batch) -> (state, sums)`` and ``eval_step(params, global_batch) ->
    sums`` are the jitted steps of ``packedqdc.train.step``; ``put`` moves a host global batch to
    the devices.
    """

    cfg: TrainConfig
    run_dir: Path
    model: PhysNet
    reference: ReferenceEnergies
    weights: LossWeights
    state: TrainState
    train_data: BatchStream
    valid_data: BatchStream
    train_step: Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]
    eval_step: Callable[[Any, Any], dict[str, jax.Array]]
    checkpoints: RunCheckpoints
    has_forces: bool = True
    best_valid_loss: float = math.inf
    put: Callable[[Mapping[str, np.ndarray]], Any] = jax.device_put
    place_state: Callable[[TrainState], TrainState] = jax.device_put
    extra_meta: dict[str, Any] = field(default_factory=dict)
    lock: RunLock | None = None

    @property
    def metrics_csv(self) -> MetricsCSV:
        return MetricsCSV(self.run_dir / "metrics.csv")

    def meta(self, reason: str, epoch_complete: bool, loader: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The JSON item stored with each checkpoint; ``loader``: the position to store (default: the
        stream's own)."""
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.return_attributes(),
            "reference": self.reference.to_dict(),
            "loader": dict(self.train_data.state() if loader is None else loader),
            "epoch": int(self.state.epoch),
            "step": int(self.state.step),
            "epoch_complete": epoch_complete,
            "best_valid_loss": None if math.isinf(self.best_valid_loss) else self.best_valid_loss,
            "has_forces": self.has_forces,
            "reason": reason,
            **self.extra_meta,
        }

    def save(self, kind: str, reason: str, epoch_complete: bool, loader: Mapping[str, Any] | None = None) -> None:
        """Write the ``kind`` checkpoint; TrainingError (nothing written) if the weights are not finite."""
        if not _finite_tree(self.state.params):
            raise TrainingError(f"the weights became non-finite by step {int(self.state.step)} (learning rate "
                                f"too high?); the {reason} checkpoint was not written, the last good one is "
                                f"kept in {self.checkpoints.root}")
        self.checkpoints.save(kind, self.state, self.meta(reason, epoch_complete, loader))

    def close(self) -> None:
        """Close the checkpoint managers and release the run's lock."""
        self.checkpoints.close()
        if self.lock is not None:
            self.lock.release()


def _finite_tree(tree: Any) -> bool:
    return all(bool(jax.numpy.isfinite(leaf).all()) for leaf in jax.tree.leaves(tree))


@dataclass(frozen=True)
class FitResult:
    """How ``fit`` ended: ``reason`` is "completed", "max_time", or a reason ``stop_requested`` gave
    ("interrupted", "terminated")."""

    reason: str
    epoch: int
    step: int
    best_valid_loss: float


def evaluate_stream(eval_step: Callable[[Any, Any], dict[str, jax.Array]], params: Any,
                    stream: BatchStream, put: Callable[[Mapping[str, np.ndarray]], Any],
                    on_batch: Callable[[dict[str, np.ndarray], np.ndarray], None] | None = None) -> dict[str, float]:
    """Accumulated error sums of ``params`` over one full epoch of ``stream`` (float64 totals);
    ``on_batch(global_batch, mol_idx)`` sees each host batch as it goes to the devices."""
    acc = SumAccumulator()
    pending = []
    for global_batch, mol_idx in stream.epoch():
        if on_batch is not None:
            on_batch(global_batch, mol_idx)
        pending.append(eval_step(params, put(global_batch)))
    for sums in pending:
        acc.add(sums_to_host(sums))
    return acc.totals


def _check_finite(sums: Mapping[str, Any], trainer: Trainer, epoch: int, step: int, mol_idx: np.ndarray) -> None:
    loss = float(sums["loss"])
    if math.isfinite(loss):
        return
    kept = trainer.checkpoints.latest_step("latest") is not None
    where = (f"last good checkpoint kept in {trainer.checkpoints.root / 'latest'}" if kept
             else "no checkpoint was written before it")
    first = ", ".join(str(int(i)) for i in mol_idx[:8])
    raise TrainingError(
        f"non-finite training loss ({loss}) at epoch {epoch + 1}, step {step}, in a batch of molecules "
        f"{first}{', ...' if mol_idx.size > 8 else ''}; training stopped; {where}"
    )


STOP_NOTES = {
    "max_time": "--max-time reached",
    "interrupted": "interrupted",
    "terminated": "terminated (SIGTERM)",
}


def fit(trainer: Trainer, callbacks: Callbacks | None = None) -> FitResult:
    """Train from ``trainer.state`` to ``cfg.num_epochs`` epochs (or ``cfg.max_time`` seconds).

    After every epoch: validation with the EMA weights, a ``metrics.csv`` row, the ``latest``
    checkpoint, and ``best`` when the valid loss improved. ``max_time`` and ``callbacks.stop_requested``
    stop the loop at a step boundary and write ``latest`` mid-epoch (``FitResult.reason`` says
    which). A KeyboardInterrupt raised inside a step (Ctrl-C without a handler) writes ``latest`` at
    the last completed step, with the loader position of that step, and is re-raised. A non-finite
    loss raises TrainingError without writing anything, so the last good checkpoint stays.
    """
    cb = callbacks or Callbacks()
    cfg = trainer.cfg
    start = time.monotonic()
    epoch = int(trainer.state.epoch)
    acc = SumAccumulator()
    pending: tuple[dict[str, jax.Array], np.ndarray, int] | None = None
    resume_point = trainer.train_data.state()  # loader position matching trainer.state
    start_progress = float(trainer.extra_meta.get(PROGRESS_KEY, 0.0))
    try:
        while epoch < cfg.num_epochs:
            if cb.epoch_start is not None:
                cb.epoch_start(epoch, trainer.train_data.num_steps())
            acc = SumAccumulator()
            epoch_start = time.monotonic()
            stop = None
            steps_per_epoch = trainer.train_data.num_steps()
            for global_batch, mol_idx in trainer.train_data.epoch():
                progress = schedule_progress(cfg, int(pending[2]) + 1 if pending else int(trainer.state.step),
                                             steps_per_epoch, time.monotonic() - start, start_progress)
                trainer.extra_meta[PROGRESS_KEY] = progress  # saved with checkpoints, read on resume
                devices = int(np.shape(global_batch["Z"])[0])
                global_batch = {**global_batch, PROGRESS_KEY: np.full((devices,), progress, np.float32)}
                new_state, sums = trainer.train_step(trainer.state, trainer.put(global_batch))
                if pending is not None:  # read the previous step's sums while this one runs
                    _consume(pending, trainer, epoch, acc, cb)
                pending = (sums, mol_idx, int(trainer.state.step))
                trainer.state = new_state
                resume_point = trainer.train_data.state()
                stop = _stop_reason(cfg, start, cb)
                if stop is not None:
                    break
            if pending is not None:
                _consume(pending, trainer, epoch, acc, cb)
                pending = None
            if stop is not None:
                trainer.save("latest", stop, epoch_complete=False, loader=resume_point)
                cb.note(f"{STOP_NOTES.get(stop, stop)}: stopped at epoch {epoch + 1}, step "
                        f"{int(trainer.state.step)}; checkpoint written (resume with --resume)")
                return FitResult(stop, epoch, int(trainer.state.step), trainer.best_valid_loss)
            row = _end_epoch(trainer, epoch, acc, time.monotonic() - epoch_start)
            resume_point = trainer.train_data.state()
            if cb.epoch_end is not None:
                cb.epoch_end(row)
            epoch += 1
            stop = _stop_reason(cfg, start, cb) if epoch < cfg.num_epochs else None
            if stop is not None:  # the epoch's checkpoint is already written
                cb.note(f"{STOP_NOTES.get(stop, stop)}: stopped after epoch {epoch}; checkpoint written "
                        f"(resume with --resume)")
                return FitResult(stop, epoch, int(trainer.state.step), trainer.best_valid_loss)
    except KeyboardInterrupt:
        if pending is not None:
            try:
                _consume(pending, trainer, epoch, acc, cb)
            except TrainingError:
                raise KeyboardInterrupt from None
        if int(trainer.state.epoch) != int(resume_point["epoch"]):  # stopped inside _end_epoch, after
            resume_point = {**resume_point, "epoch": int(trainer.state.epoch), "position": 0}  # its update
        trainer.save("latest", "interrupted", epoch_complete=False, loader=resume_point)
        cb.note(f"interrupted: checkpoint written at step {int(trainer.state.step)} (resume with --resume)")
        raise
    return FitResult("completed", epoch, int(trainer.state.step), trainer.best_valid_loss)


def _stop_reason(cfg: TrainConfig, start: float, cb: Callbacks) -> str | None:
    if cb.stop_requested is not None:
        reason = cb.stop_requested()
        if reason is not None:
            return reason
    if cfg.max_time is not None and time.monotonic() - start >= cfg.max_time:
        return "max_time"
    return None


def _consume(pending: tuple[dict[str, jax.Array], np.ndarray, int], trainer: Trainer, epoch: int,
             acc: SumAccumulator, cb: Callbacks) -> None:
    sums, mol_idx, step = pending
    host = sums_to_host(sums)
    _check_finite(host, trainer, epoch, step, mol_idx)
    acc.add(host)
    if cb.step is not None:
        cb.step(int(round(float(host["n_mol"]))))


def _end_epoch(trainer: Trainer, epoch: int, acc: SumAccumulator, seconds: float) -> dict[str, Any]:
    """Validate, update plateau/best, write the metrics row and checkpoints; return the row."""
    cfg = trainer.cfg
    valid_totals = evaluate_stream(trainer.eval_step, trainer.state.ema_params, trainer.valid_data, trainer.put)
    train = summarize(acc.totals, trainer.weights)
    valid = summarize(valid_totals, trainer.weights)
    lr = float(learning_rate(cfg, trainer.state.step, trainer.state.lr_scale,
                             trainer.extra_meta.get(PROGRESS_KEY, 0.0)))
    if not math.isfinite(valid["loss"]):
        raise TrainingError(f"non-finite validation loss ({valid['loss']}) after epoch {epoch + 1}; "
                            f"training stopped; last good checkpoint kept in {trainer.checkpoints.root}")
    trainer.state = trainer.place_state(  # host-side updates back onto the devices of the steps
        plateau_update(cfg, trainer.state, valid["loss"]).replace(epoch=trainer.state.epoch + 1))
    best = valid["loss"] < trainer.best_valid_loss
    if best:
        trainer.best_valid_loss = valid["loss"]
    row: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": int(trainer.state.step),
        "lr": lr,
        "epoch_time_s": seconds,
        "train_mol_per_s": acc.totals["n_mol"] / seconds if seconds > 0 else math.nan,
        **{f"train_{k}": v for k, v in train.items()},
        **{f"valid_{k}": v for k, v in valid.items()},
        "best": int(best),
    }
    if is_main_process():
        trainer.metrics_csv.append(row)
    trainer.save("latest", "epoch", epoch_complete=True)
    if best:
        trainer.save("best", "best", epoch_complete=True)
    return row
