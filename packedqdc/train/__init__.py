"""Training PhysNet on packed directories: configuration, reference energies, loss, optimiser, state,
checkpoints, the epoch loop, evaluation and prediction. See docs/training.md.

Names are imported on first use, so ``packedqdc.train.config`` can be read without loading JAX.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

_LAZY = {
    "RunCheckpoints": ".checkpoint",
    "TrainConfig": ".config",
    "EvalResult": ".evaluate",
    "evaluate_run": ".evaluate",
    "Callbacks": ".loop",
    "FitResult": ".loop",
    "Trainer": ".loop",
    "fit": ".loop",
    "Potential": ".predict",
    "load_run_state": ".predict",
    "ReferenceEnergies": ".reference",
    "fit_reference_energies": ".reference",
    "resume_run": ".session",
    "start_run": ".session",
    "TrainState": ".state",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = sorted(_LAZY)
