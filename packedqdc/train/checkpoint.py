"""orbax checkpoints of a run: ``runs/NAME/checkpoints/{latest,best}/<n>/`` (``n`` counts saves).

Each checkpoint holds two items: ``state`` (the whole ``TrainState``: params, EMA, optimizer state,
step, epoch, rng, plateau state) and ``meta`` (JSON: training configuration, model attributes,
reference energies, loader position, epoch, best valid loss, why it was written). ``latest`` is
written after every epoch, on ``--max-time`` and on Ctrl-C; ``best`` when the valid loss (EMA
weights) improves. orbax writes each checkpoint to a temporary directory and renames it into place,
and keeps the previous one until the new one is complete, so a crash never leaves a torn checkpoint;
the next writer of the run removes such a crash's temporary directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from ..errors import TrainingError
from .state import TrainState

KINDS = ("latest", "best")


class RunCheckpoints:
    """The ``latest`` and ``best`` checkpoints of one run directory.

    Checkpoints are numbered by save, not by training step: a run can need two checkpoints at the
    same step (stopped on an epoch's last step, then the end of that epoch after a resume), and the
    newer must replace the older. The training step is in the state and in ``meta["step"]``.

    ``read_only`` (evaluate, predict) creates nothing on disk; a writer (training, which holds the
    run's lock) removes temporary directories of saves that a killed process left behind.
    """

    def __init__(self, run_dir: str | Path, read_only: bool = False) -> None:
        self.root = Path(run_dir).absolute() / "checkpoints"
        if read_only:  # orbax's read-only mode, stated in full so that it has nothing to warn about
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                                   save_interval_steps=0, enable_async_checkpointing=False)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False,
                                                   cleanup_tmp_directories=True)
        self._managers = {
            kind: ocp.CheckpointManager(self.root / kind, options=options, item_names=("state", "meta"))
            for kind in KINDS
            if not read_only or (self.root / kind).is_dir()
        }

    def latest_step(self, kind: str) -> int | None:
        """Number of the stored ``kind`` checkpoint, None when there is none."""
        manager = self._managers.get(kind)
        return None if manager is None else manager.latest_step()

    def save(self, kind: str, state: TrainState, meta: dict[str, Any]) -> None:
        """Write ``state`` and ``meta`` as the new ``kind`` checkpoint (the previous one goes once
        the new one is complete)."""
        manager = self._managers[kind]
        latest = manager.latest_step()
        number = 0 if latest is None else latest + 1
        manager.save(number, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()

    def read_meta(self, kind: str) -> dict[str, Any]:
        """The JSON item of the ``kind`` checkpoint."""
        step = self._require(kind)
        manager = self._managers[kind]
        try:
            return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except FileNotFoundError:
            raise TrainingError(f"{self.root / kind}: checkpoint {step} disappeared while reading it "
                                f"(is the run still training?)") from None

    def restore(self, kind: str, template: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """The ``kind`` checkpoint as (state shaped like ``template``, meta)."""
        step = self._require(kind)
        manager = self._managers[kind]
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except FileNotFoundError:
            raise TrainingError(f"{self.root / kind}: checkpoint {step} disappeared while reading it "
                                f"(is the run still training?)") from None
        except (ValueError, KeyError, TypeError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TrainingError(f"{self.root / kind}: checkpoint does not match the model ({message})") from None
        return restored["state"], restored["meta"]

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()

    def _require(self, kind: str) -> int:
        step = self.latest_step(kind)
        if step is None:
            raise TrainingError(f"{self.root / kind}: no checkpoint")
        return step
