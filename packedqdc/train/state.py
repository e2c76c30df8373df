"""The training state: one pytree with everything a step changes, saved whole in checkpoints."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything that evolves during training (all leaves are arrays: checkpointable as is).

    Attributes:
        params: model parameters (float32 pytree).
        opt_state: optax state of the gradient transformation (clipping + AMSGrad moments).
        ema_params: exponential moving average of ``params`` (validation, best checkpoint, predict).
        step: () int32, optimizer updates done.
        epoch: () int32, epochs completed.
        rng: (2,) uint32 PRNG key of the run (from ``seed``; parameters are initialised from a split
            of it); stored so that a resumed run carries the same key.
        lr_scale: () float32, reduce-on-plateau factor on the learning rate (1 for "exponential").
        plateau_best: () float32, best valid loss seen by the plateau rule.
        plateau_count: () int32, epochs since ``plateau_best`` improved.
    """

    params: Any
    opt_state: Any
    ema_params: Any
    step: jax.Array
    epoch: jax.Array
    rng: jax.Array
    lr_scale: jax.Array
    plateau_best: jax.Array
    plateau_count: jax.Array


def create_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """Fresh state at step 0: EMA = params, plateau scale 1."""
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        ema_params=jax.tree.map(jnp.array, params),
        step=jnp.zeros((), jnp.int32),
        epoch=jnp.zeros((), jnp.int32),
        rng=rng,
        lr_scale=jnp.ones((), jnp.float32),
        plateau_best=jnp.full((), jnp.inf, jnp.float32),
        plateau_count=jnp.zeros((), jnp.int32),
    )
