"""Training PhysNet on packed directories: configuration, reference energies, loss, optimiser, state,
checkpoints, the epoch loop, evaluation and prediction. See docs/training.md.

Names are imported on first use, so ``packedqdc.train.config`` can be read without loading JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'packedqdc.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = sorted(_LAZY)
