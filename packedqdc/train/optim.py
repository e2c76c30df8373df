"""Optimiser, learning-rate rules and the weight average, as in PhysNet (Unke & Meuwly 2019).

- Gradient transformation: global-norm clipping, then AMSGrad (β1 0.9, β2 0.99, ε 1e-3); the
  learning rate is applied in the train step, ``update = -lr(step) * amsgrad_direction``.
- ``exponential``: ``lr(step) = lr0 * decay_rate ** (step / decay_steps)``, continuous (PhysNet:
  0.1 per 10^7 steps).
- ``plateau``: ``lr = lr0 * lr_scale`` where ``lr_scale`` is multiplied by ``plateau_factor`` after
  ``plateau_patience`` epochs whose valid loss did not improve (host-side, once per epoch).
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


def learning_rate(cfg: TrainConfig, step: Any, lr_scale: Any) -> Any:
    """Learning rate at ``step`` (jax or numpy scalars)."""
    if cfg.lr_schedule == "exponential":
        decay = cfg.decay_rate ** (jnp.asarray(step, jnp.float32) / cfg.decay_steps)
        return cfg.learning_rate * decay * lr_scale
    return cfg.learning_rate * lr_scale


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
