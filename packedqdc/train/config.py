"""Training configuration: one dataclass holding every option of ``packedqdc train``.

``TrainConfig`` is written to ``runs/NAME/config.json`` and stored in every checkpoint, so a run can
be resumed, evaluated or loaded for prediction from its directory alone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError

#: PhysNet's force weight (Unke & Meuwly 2019, config.txt): Bohr/Å in PhysNet's eV units.
PHYSNET_FORCES_WEIGHT = 52.91772105638412
#: PhysNet's charge weight (config.txt): k_e in eV·Å/e².
PHYSNET_CHARGE_WEIGHT = 14.399645351950548

LAYOUTS = ("packed", "padded")
ORDERS = ("auto", "molecule", "block")  # the loader's (packedqdc.loader.ORDERS)
LOSSES = ("mae", "mse")
LR_SCHEDULES = ("exponential", "plateau")


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run. Units: kcal/mol, Å, e, seconds.

    Data: ``data_path`` (packed directory; None means the bundled sample, packed into a cache),
    ``valid_fraction`` of molecules held out (seeded shuffle), ``layout`` of the batches,
    ``batch_size`` molecules per batch, ``num_atoms`` (largest molecule allowed; the padded layout
    pads every molecule to it), ``bucket_size`` (loader shuffle buckets), ``order`` of each epoch
    ("molecule", "block", or "auto": a new run saves the order auto chose), ``loader_threads``
    (threads that assemble a batch; they do not change the batches).

    Model (PhysNet): ``features``, ``num_iterations`` (modules), ``num_basis`` (radial functions),
    ``cutoff`` (Å), ``electrostatics`` (None: on iff the training data has charged molecules).

    Loss: ``loss`` ("mae" as PhysNet, or "mse") with ``energy_weight``, ``forces_weight``,
    ``charge_weight`` and ``nh_weight`` (non-hierarchicality penalty).

    Optimiser: AMSGrad (``b1``, ``b2``, ``eps``) after global-norm clipping at ``clip_norm``;
    ``learning_rate`` decays as ``lr * decay_rate ** (step / decay_steps)`` ("exponential") or is
    multiplied by ``plateau_factor`` after ``plateau_patience`` epochs without a new best valid loss
    ("plateau", down to ``lr * plateau_min_scale``). ``ema_decay`` of the weight average.

    Run: ``name`` under ``runs_dir``, ``num_epochs``, ``seed``, ``max_time`` (s, None: no limit).
    """

    data_path: str | None = None
    name: str | None = None
    runs_dir: str = "runs"
    batch_size: int = 32
    num_epochs: int = 100
    learning_rate: float = 1e-3
    num_atoms: int = 60
    bucket_size: int = 8192
    layout: str = "packed"
    valid_fraction: float = 0.1
    seed: int = 0
    features: int = 128
    num_iterations: int = 3
    num_basis: int = 64
    cutoff: float = 5.0
    electrostatics: bool | None = None
    loss: str = "mae"
    energy_weight: float = 1.0
    forces_weight: float = PHYSNET_FORCES_WEIGHT
    charge_weight: float = PHYSNET_CHARGE_WEIGHT
    nh_weight: float = 0.01
    lr_schedule: str = "exponential"
    decay_rate: float = 0.1
    decay_steps: int = 10_000_000
    plateau_patience: int = 5
    plateau_factor: float = 0.5
    plateau_min_scale: float = 0.01
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-3
    clip_norm: float = 1000.0
    ema_decay: float = 0.999
    max_time: float | None = None
    loader_threads: int = 2
    order: str = "auto"

    def __post_init__(self) -> None:
        checks = [
            (self.layout in LAYOUTS, f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}"),
            (self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}"),
            (self.lr_schedule in LR_SCHEDULES,
             f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.num_epochs >= 0, f"num_epochs must be >= 0, got {self.num_epochs}"),
            (self.num_atoms >= 1, f"num_atoms must be >= 1, got {self.num_atoms}"),
            (0.0 < self.valid_fraction < 1.0, f"valid_fraction must be in (0, 1), got {self.valid_fraction}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (self.features >= 1 and self.num_iterations >= 1 and self.num_basis >= 1,
             "features, num_iterations and num_basis must be >= 1"),
            (self.cutoff > 0, f"cutoff must be > 0, got {self.cutoff}"),
            (self.decay_steps >= 1, f"decay_steps must be >= 1, got {self.decay_steps}"),
            (0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (self.max_time is None or self.max_time > 0, f"max_time must be > 0, got {self.max_time}"),
            (self.loader_threads >= 1, f"loader_threads must be >= 1, got {self.loader_threads}"),
            (self.order in ORDERS, f"order must be one of {', '.join(ORDERS)}, got {self.order!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"train config: {message}")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_dict``; unknown keys are a ConfigError (a newer or foreign file)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"train config: unknown option(s) {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        file = Path(path)
        try:
            return cls.from_json(file.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{file}: cannot read the training configuration ({exc})") from None
