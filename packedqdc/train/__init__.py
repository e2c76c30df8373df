"""Training PhysNet on packed directories: configuration, reference energies, loss, optimiser, state,
checkpoints, the epoch loop, evaluation and prediction. See docs/training.md."""

from .checkpoint import RunCheckpoints
from .config import TrainConfig
from .evaluate import EvalResult, evaluate_run
from .loop import Callbacks, FitResult, Trainer, fit
from .predict import Potential, load_run_state
from .reference import ReferenceEnergies, fit_reference_energies
from .session import resume_run, start_run
from .state import TrainState

__all__ = [
    "Callbacks",
    "EvalResult",
    "FitResult",
    "Potential",
    "ReferenceEnergies",
    "RunCheckpoints",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "evaluate_run",
    "fit",
    "fit_reference_energies",
    "load_run_state",
    "resume_run",
    "start_run",
]
