"""Training configuration: one dataclass holding every option of ``packedqdc train``.

``TrainConfig`` is written to ``runs/NAME/config.json`` and stored in every checkpoint, so a run can
be resumed, evaluated or loaded for prediction from its directory alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..shuffle import ORDER_VERSION, ORDER_VERSIONS
from ..units import EV_TO_KCAL_MOL

#: packedqdc's default force weight (Å): about a fifth of PhysNet's 52.9177 (Unke & Meuwly 2019,
#: config.txt; pass it as --forces-weight for PhysNet's balance). Forces say nothing about a molecule's
#: constant energy offset, which only the energy term teaches; at PhysNet's weight that term is ~2% of
#: the loss and offsets are learned far too slowly (docs/training.md, "Measured").
DEFAULT_FORCES_WEIGHT = 10.0
#: PhysNet's charge weight (config.txt): k_e in eV·Å/e².
PHYSNET_CHARGE_WEIGHT = 14.399645351950548

LAYOUTS = ("packed", "padded")
ORDERS = ("auto", "molecule", "block")  # the loader's (packedqdc.loader.ORDERS)
LOSSES = ("mae", "mse")
#: Pair lists of the network: every ordered pair of each molecule, or those within --cutoff.
PAIR_LISTS = ("auto", "all", "cutoff")
#: pair_list="auto" takes cutoff pair lists when the training data's largest molecule has more atoms
AUTO_CUTOFF_MIN_ATOMS = 40
LR_SCHEDULES = ("exponential", "plateau", "cosine")
#: Energy units the loss can be computed in (the data are always kcal/mol).
LOSS_UNITS = ("ev", "kcal/mol")
#: Values of options added after a run's config.json was written that reproduce what such a run did.
LEGACY_VALUES: dict[str, Any] = {"loss_unit": "kcal/mol", "warmup_steps": 0, "charge_embedding": False,
                                 "pair_list": "all", "order_version": 1}
#: PhysNet's non-hierarchicality weight (config.txt), in eV.
PHYSNET_NH_WEIGHT = 0.01
#: Default charge and nh weights, kcal/mol per e and kcal/mol: PhysNet's numbers read in kcal/mol,
#: i.e. 23x weaker than PhysNet's eV values; measured better in short runs (docs/training.md).
DEFAULT_CHARGE_WEIGHT_KCAL = PHYSNET_CHARGE_WEIGHT
DEFAULT_NH_WEIGHT_KCAL = 0.01
#: PhysNet's dipole weight (config.txt, eV per e·Å), read in kcal/mol per e·Å like the charge weight;
#: used only when the training data has dipoles (D.f64).
DEFAULT_DIPOLE_WEIGHT_KCAL = 27.211386024367243
#: A run name is one plain directory name, so that a run stays inside its runs directory.
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=@-]*")


def option(default: Any, panel: str, help: str, *, cli: str | None = None, choices: tuple[str, ...] | None = None,
           on_resume: bool = False) -> Any:
    """A ``TrainConfig`` field with what ``packedqdc train`` needs to offer it as a flag.

    ``panel`` groups the flag in ``--help``; ``help`` says what it means (without the default,
    which the CLI shows); ``cli="path"`` takes a path; ``choices`` lists the accepted strings;
    ``on_resume`` marks the options a resumed run takes from the command line (all others come
    from the run's saved configuration).
    """
    meta = {"panel": panel, "help": help, "cli": cli, "choices": choices, "on_resume": on_resume}
    return dataclasses.field(default=default, metadata=meta)


def check_run_name(name: str) -> None:
    """ConfigError unless ``name`` is a plain directory name (no path separators, not ``..``)."""
    if not RUN_NAME.fullmatch(name) or len(name) > 200:
        raise ConfigError(f"--name {name!r}: a run name is one directory name of letters, digits and "
                          "'._+=@-' (no '/', not starting with '.' or '-'); put runs elsewhere with --runs-dir")


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run. Units: kcal/mol, Å, e, seconds.

    Data: ``data_path`` (packed directory; None means the bundled sample, packed into a cache),
    ``valid_fraction`` of molecules held out (seeded shuffle), ``layout`` of the batches,
    ``batch_size`` molecules per batch, ``num_atoms`` (largest molecule allowed; the padded layout
    pads every molecule to it), ``bucket_size`` (loader shuffle buckets).

    Model (PhysNet): ``features``, ``num_iterations`` (modules), ``num_basis`` (radial functions),
    ``cutoff`` (Å), ``electrostatics`` (None: on iff the training data has charged molecules).

    Loss: ``loss`` ("mae" as PhysNet, or "mse") with ``energy_weight``, ``forces_weight``,
    ``charge_weight``, ``dipole_weight`` (only for data with dipoles) and ``nh_weight``
    (non-hierarchicality penalty).

    Optimiser: AMSGrad (``b1``, ``b2``, ``eps``) after global-norm clipping at ``clip_norm``;
    ``learning_rate`` decays as ``lr * decay_rate ** (step / decay_steps)`` ("exponential") or is
    multiplied by ``plateau_factor`` after ``plateau_patience`` epochs without a new best valid loss
    ("plateau", down to ``lr * plateau_min_scale``). ``ema_decay`` of the weight average.

    Run: ``name`` under ``runs_dir``, ``num_epochs``, ``seed``, ``max_time`` (s, None: no limit).
    """

    data_path: str | None = option(
        None, "Data", "Packed directory [default: the bundled sample, packed into RUNS_DIR/.cache].",
        cli="path", on_resume=True)
    name: str | None = option(None, "Run", "Run name: outputs go to RUNS_DIR/NAME [default: physnet-DATE-TIME].",
                              on_resume=True)
    runs_dir: str = option("runs", "Run", "Directory of runs.", cli="path", on_resume=True)
    batch_size: int = option(32, "Data", "Molecules per step over all devices, the global batch "
                             "(packed layout: on average).")
    num_epochs: int = option(100, "Run", "Epochs to train in all (also when resuming).", on_resume=True)
    learning_rate: float = option(3e-3, "Optimiser", "Peak learning rate (AMSGrad; PhysNet's is 1e-3).")
    num_atoms: int = option(60, "Data", "Padded layout: atom slots per molecule (largest molecule allowed).")
    bucket_size: int = option(8192, "Data", "Padded layout: molecules sorted by size within buckets of this many.")
    layout: str = option("packed", "Data", "Batch layout.", choices=LAYOUTS)
    valid_fraction: float = option(0.1, "Data", "Fraction of molecules held out for validation.")
    seed: int = option(0, "Run", "Seed of the split, the epoch order and the initial weights.")
    features: int = option(128, "Model", "PhysNet feature width.")
    num_iterations: int = option(3, "Model", "PhysNet modules (interaction + output blocks).")
    num_basis: int = option(32, "Model", "Radial basis functions (PhysNet's: 64; 32 trains 1.6x faster on CPU "
                            "and was as accurate per epoch, docs/training.md).")
    cutoff: float = option(5.0, "Model", "Short-range cutoff, Å.")
    pair_list: str = option(
        "auto", "Model", "Pairs the network sees: all (every ordered pair of each molecule) or cutoff (only pairs "
        "closer than --cutoff; the Coulomb term still covers every pair); auto: cutoff when the largest molecule has "
        f"more than {AUTO_CUTOFF_MIN_ATOMS} atoms (the choice is saved). Same model either way, see docs/training.md.",
        choices=PAIR_LISTS)
    electrostatics: bool | None = option(
        None, "Model", "Shielded Coulomb energy of the atomic charges [default: on iff the training data has "
        "charged molecules].")
    charge_embedding: bool = option(
        False, "Model", "Give atoms the molecule's total charge per atom through learned vectors (for data "
        "with ions; see docs/model.md).")
    loss: str = option("mae", "Loss", "Error form: mae (PhysNet) or mse.", choices=LOSSES)
    energy_weight: float = option(1.0, "Loss", "Weight of the energy term.")
    forces_weight: float = option(DEFAULT_FORCES_WEIGHT, "Loss", "Weight of the forces term, Å (energy error per "
                                  "unit of force error; PhysNet's is 52.92, see docs/training.md).")
    charge_weight: float | None = option(
        None, "Loss", "Weight of the total-charge term, energy per e in the loss unit [default: 14.40 kcal/mol "
        "per e (0.624 with --loss-unit ev); PhysNet's k_e is 332.06 kcal/mol per e, see docs/training.md].")
    nh_weight: float | None = option(
        None, "Loss", "Weight of the non-hierarchicality penalty, energy in the loss unit [default: 0.01 "
        "kcal/mol (4.3e-4 with --loss-unit ev); PhysNet's is 0.01 eV = 0.2306 kcal/mol].")
    dipole_weight: float | None = option(
        None, "Loss", "Weight of the dipole term, energy per e·Å in the loss unit; used only when the data has "
        "dipoles (D.f64) [default: 27.21 kcal/mol per e·Å (1.18 with --loss-unit ev), PhysNet's number; 0 turns "
        "the term off, see docs/training.md].")
    loss_unit: str = option(
        "kcal/mol", "Loss", "Energy unit of the loss: errors are converted to it before weighting (ev: PhysNet's "
        "own units, whose AMSGrad ε is then 23x larger relative to the gradients).", choices=LOSS_UNITS)
    lr_schedule: str = option("cosine", "Optimiser", "Learning-rate schedule: cosine (decays to "
                              "--final-lr-scale over the run: --num-epochs, or --max-time when that ends it "
                              "first), exponential (PhysNet's) or plateau.", choices=LR_SCHEDULES)
    warmup_steps: int = option(0, "Optimiser", "Steps of linear learning-rate warm-up (every schedule).")
    final_lr_scale: float = option(0.01, "Optimiser", "Cosine schedule: the last learning rate, as a fraction "
                                   "of --learning-rate.")
    decay_rate: float = option(0.1, "Optimiser", "Exponential schedule: factor per --decay-steps.")
    decay_steps: int = option(10_000_000, "Optimiser", "Exponential schedule: steps per --decay-rate factor.")
    plateau_patience: int = option(5, "Optimiser", "Plateau schedule: epochs without improvement before a cut.")
    plateau_factor: float = option(0.5, "Optimiser", "Plateau schedule: factor of each cut.")
    plateau_min_scale: float = option(0.01, "Optimiser", "Plateau schedule: lowest rate, as a fraction of "
                                      "--learning-rate.")
    b1: float = option(0.9, "Optimiser", "AMSGrad β1.")
    b2: float = option(0.99, "Optimiser", "AMSGrad β2.")
    eps: float = option(1e-3, "Optimiser", "AMSGrad ε.")
    clip_norm: float = option(1000.0, "Optimiser", "Global-norm gradient clipping.")
    ema_decay: float = option(0.999, "Optimiser", "Decay of the weight average (with warm-up).")
    max_time: float | None = option(None, "Run", "Stop cleanly with a checkpoint after this many seconds "
                                    "[default: no limit].", on_resume=True)
    order: str = option("auto", "Data", "Epoch order: molecule (a full shuffle each epoch: data in memory), block "
                        "(shuffled contiguous blocks mixed in a shuffle buffer: sequential reads, for data larger "
                        "than memory) or auto (block when the data files exceed half the available memory; the "
                        "choice is saved).", choices=ORDERS)
    order_version: int = option(ORDER_VERSION, "Data", "Algorithms of the split and the epoch orders "
                                "(packedqdc.shuffle): 2, fast at 100M molecules; 1, those of runs saved before "
                                "version 2 (a resumed run keeps its own).")
    loader_threads: int = option(2, "Data", "Threads that assemble each batch (packedqdc's own; used only while "
                                 "faster than one; the batches do not depend on it).")

    def __post_init__(self) -> None:
        checks = [
            (self.layout in LAYOUTS, f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}"),
            (self.pair_list in PAIR_LISTS, f"pair_list must be one of {', '.join(PAIR_LISTS)}, got {self.pair_list!r}"),
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
            (self.loss_unit in LOSS_UNITS, f"loss_unit must be one of {', '.join(LOSS_UNITS)}, got {self.loss_unit!r}"),
            (self.dipole_weight is None or self.dipole_weight >= 0,
             f"dipole_weight must be >= 0, got {self.dipole_weight}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (0.0 <= self.final_lr_scale <= 1.0, f"final_lr_scale must be in [0, 1], got {self.final_lr_scale}"),
            (0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (self.max_time is None or self.max_time > 0, f"max_time must be > 0, got {self.max_time}"),
            (self.loader_threads >= 1, f"loader_threads must be >= 1, got {self.loader_threads}"),
            (self.order in ORDERS, f"order must be one of {', '.join(ORDERS)}, got {self.order!r}"),
            (self.order_version in ORDER_VERSIONS,
             f"order_version must be one of {', '.join(map(str, ORDER_VERSIONS))}, got {self.order_version}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"train config: {message}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"train config: {f.name} must be a finite number, got {value}")
        if self.name is not None:
            check_run_name(self.name)

    def loss_term_weights(self) -> tuple[float, float]:
        """(charge weight, nh weight) in the loss unit: the given ones, or the defaults (kcal/mol per
        e and kcal/mol) converted to it, so a default means the same in either unit."""
        per_kcal = 1.0 if self.loss_unit == "kcal/mol" else 1.0 / EV_TO_KCAL_MOL
        charge = DEFAULT_CHARGE_WEIGHT_KCAL * per_kcal if self.charge_weight is None else self.charge_weight
        nh = DEFAULT_NH_WEIGHT_KCAL * per_kcal if self.nh_weight is None else self.nh_weight
        return charge, nh

    def dipole_term_weight(self) -> float:
        """The dipole weight in the loss unit: the given one, or the default (kcal/mol per e·Å)
        converted to it. Applies only to data with dipoles (``step.loss_weights``)."""
        per_kcal = 1.0 if self.loss_unit == "kcal/mol" else 1.0 / EV_TO_KCAL_MOL
        return DEFAULT_DIPOLE_WEIGHT_KCAL * per_kcal if self.dipole_weight is None else self.dipole_weight

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_dict``; unknown keys are a ConfigError (a newer or foreign file). Options
        missing from an older file take their ``LEGACY_VALUES``, so an old run resumes as it ran."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"train config: unknown option(s) {', '.join(unknown)}")
        return cls(**{**{k: v for k, v in LEGACY_VALUES.items() if k not in data}, **data})

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
