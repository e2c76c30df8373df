"""Optimiser, learning-rate rules and the weight average, as in PhysNet (Unke & Meuwly 2019).

- Gradient transformation: global-norm clipping, then AMSGrad (β1 0.9, β2 0.99, ε 1e-3); the
  learning rate is applied in the train step, ``update = -lr(step) * amsgrad_direction``.
- ``exponential``: ``lr(step) = lr0 * decay_rate ** (step / decay_steps)``, continuous (PhysNet:
  0.1 per 10^7 steps).
- ``plateau``: ``lr = lr0 * lr_scale`` where ``lr_scale`` is multiplied by ``plateau_factor`` after
  ``plateau_patience`` epochs whose valid loss did not improve (host-side, once per epoch).
- ``cosine``: ``lr = lr0 * (f + (1 - f) * (1 + cos(π p)) / 2)`` with ``f = final_lr_scale`` and ``p``
  the run's progress in [0, 1] (``schedule_progress``: steps of ``num_epochs``, or time of
  ``max_time`` when that ends the run first), so the decay fits the run whatever its length.
- Every schedule is multiplied by a linear warm-up ``min(1, (step + 1) / warmup_steps)``.
- EMA: ``ema ← d·ema + (1-d)·params`` with ``d = min(ema_decay, (1+t)/(10+t))`` (TF's warm-up).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .config import TrainConfig
from .state import TrainState


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clipping + AMSGrad direction (unit learning rate: see ``learning_rate``)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.scale_by_amsgrad(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
    )


def learning_rate(cfg: TrainConfig, step: Any, lr_scale: Any, progress: Any = 0.0) -> Any:
    """Learning rate at ``step`` and run ``progress`` in [0, 1] (jax or numpy scalars)."""
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1.0) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.lr_schedule == "exponential":
        return cfg.learning_rate * cfg.decay_rate ** (step / cfg.decay_steps) * lr_scale * warm
    if cfg.lr_schedule == "cosine":
        p = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
        f = cfg.final_lr_scale
        return cfg.learning_rate * (f + (1.0 - f) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))) * lr_scale * warm
    return cfg.learning_rate * lr_scale * warm


def schedule_progress(cfg: TrainConfig, step: int, steps_per_epoch: int, elapsed: float, start_progress: float
                      ) -> float:
    """How far the run is, in [0, 1]: ``step / (num_epochs · steps_per_epoch)``, or, when
    ``max_time`` ends the run first, the time used: ``start_progress`` (where this process took the
    run over) plus its share of the rest, ``(1 - start_progress) · elapsed / max_time``."""
    by_steps = step / max(cfg.num_epochs * steps_per_epoch, 1)
    if cfg.max_time is None:
        return float(min(by_steps, 1.0))
    by_time = start_progress + (1.0 - start_progress) * elapsed / cfg.max_time
    return float(min(max(by_steps, by_time), 1.0))


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
    """One EMA update at optimizer step ``step`` (0 for the first update)."""
    t = step.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def plateau_update(cfg: TrainConfig, state: TrainState, valid_loss: float) -> TrainState:
    """Reduce-on-plateau bookkeeping after an epoch (a no-op for the exponential schedule)."""
    if cfg.lr_schedule != "plateau":
        return state
    best = float(state.plateau_best)
    if valid_loss < best:
        return state.replace(plateau_best=jnp.float32(valid_loss), plateau_count=jnp.int32(0))
    count = int(state.plateau_count) + 1
    scale = float(state.lr_scale)
    if count >= cfg.plateau_patience:
        scale = float(np.maximum(scale * cfg.plateau_factor, cfg.plateau_min_scale))
        count = 0
    return state.replace(lr_scale=jnp.float32(scale), plateau_count=jnp.int32(count))
