"""PhysNet building blocks (Unke & Meuwly, JCTC 2019) in flax.linen.

Shapes use ``A`` for the number of atom slots in a flat batch, ``P`` for the number of ordered pair
slots, ``F`` for the feature width and ``K`` for the number of radial basis functions. Lengths are
in Å. All computation is float32 unless a module's ``dtype`` says otherwise.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

_LOG2 = math.log(2.0)
_SQRT3 = math.sqrt(3.0)


# --------------------------------------------------------------------------------------------------
# elementwise helpers and initialisers


def shifted_softplus(x: Array) -> Array:
    """Shifted softplus σ(x) = ln(1 + eˣ) − ln 2, so that σ(0) = 0. Any shape, same dtype."""
    return jax.nn.softplus(x) - jnp.asarray(_LOG2, dtype=x.dtype)


def softplus_inverse(x: Array) -> Array:
    """Inverse of softplus, x + ln(−expm1(−x)), stable for large x (no overflow). x > 0."""
    x = jnp.asarray(x)
    return x + jnp.log(-jnp.expm1(-x))


def glorot_orthogonal(scale: float = 2.0) -> Callable[..., Array]:
    """Semi-orthogonal Glorot initialiser of the original PhysNet code.

    Draws a random (semi-)orthogonal matrix of shape ``(n_in, n_out)`` and rescales it so that the
    empirical variance of its entries is ``scale / (n_in + n_out)`` (Glorot variance for
    ``scale = 2``). Only 2-D kernels are supported.
    """

    orth = jax.nn.initializers.orthogonal()

    def init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
        if len(shape) != 2:
            raise ValueError(f"glorot_orthogonal: expected a 2-D kernel shape, got {shape}")
        n_in, n_out = shape
        w = orth(key, shape, jnp.float32)
        var = jnp.var(w)
        w = w * jnp.sqrt(scale / ((n_in + n_out) * var))
        return w.astype(dtype)

    return init


def uniform_sqrt3(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
    """U(−√3, √3) initialiser (unit variance), used for the element embeddings."""
    return jax.random.uniform(key, shape, dtype, minval=-_SQRT3, maxval=_SQRT3)


def dense(features: int, *, use_bias: bool = True, zero_init: bool = False,
          dtype: Dtype = jnp.float32, precision: Any = None, name: str | None = None) -> nn.Dense:
    """A ``nn.Dense`` with the PhysNet initialisation (Glorot-orthogonal kernel, zero bias), or an
    all-zero kernel when ``zero_init``. Parameters are stored in float32. ``precision`` is passed
    to the matmul (None: JAX's default, which is TF32 on recent NVIDIA GPUs)."""
    kernel_init = nn.initializers.zeros if zero_init else glorot_orthogonal()
    return nn.Dense(features, use_bias=use_bias, kernel_init=kernel_init,
                    bias_init=nn.initializers.zeros, dtype=dtype, param_dtype=jnp.float32,
                    precision=precision, name=name)


def polynomial_cutoff(r: Array, cutoff: float) -> Array:
    """Smooth cutoff φ(r) = 1 − 6x⁵ + 15x⁴ − 10x³ with x = r/cutoff for r < cutoff, else 0.

    φ(0) = 1, φ(cutoff) = 0, with vanishing first and second derivatives at the cutoff.
    r: any shape, Å. Returns the same shape and dtype. Gradients are finite everywhere.
    """
    x = r / cutoff
    x3 = x * x * x
    poly = 1.0 - 6.0 * x3 * x * x + 15.0 * x3 * x - 10.0 * x3
    return jnp.where(x < 1.0, poly, jnp.zeros_like(poly))


# --------------------------------------------------------------------------------------------------
# modules


class ExpNormalRBF(nn.Module):
    """Exponential-normal radial basis g_k(r) = φ(r) · exp(−β_k (exp(−r) − μ_k)²).

    Centres μ_k start equally spaced from 1 down to exp(−cutoff); all widths β_k start at
    (K / (2 (1 − exp(−cutoff))))². Both are trainable and kept positive by a softplus
    parametrisation (params ``centers_raw`` and ``widths_raw``, shape (K,), float32).

    Call: ``r`` (P,) Å → (P, K) in ``dtype``.
    """

    num_basis: int
    cutoff: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, r: Array) -> Array:
        k = self.num_basis
        end = math.exp(-self.cutoff)
        centers0 = jnp.linspace(1.0, end, k, dtype=jnp.float32)
        width0 = (k / (2.0 * (1.0 - end))) ** 2
        widths0 = jnp.full((k,), width0, dtype=jnp.float32)
        centers_raw = self.param("centers_raw", lambda _key: softplus_inverse(centers0))
        widths_raw = self.param("widths_raw", lambda _key: softplus_inverse(widths0))
        mu = jax.nn.softplus(centers_raw.astype(self.dtype))
        beta = jax.nn.softplus(widths_raw.astype(self.dtype))
        r = r.astype(self.dtype)
        er = jnp.exp(-r)[:, None]
        g = jnp.exp(-beta[None, :] * (er - mu[None, :]) ** 2)
        return polynomial_cutoff(r, self.cutoff)[:, None] * g


class ResidualLayer(nn.Module):
    """Pre-activation residual layer y = x + W₂ σ(W₁ σ(x) + b₁) + b₂. (A, F) → (A, F)."""

    features: int
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = {"dtype": self.dtype, "precision": self.precision}
        y = dense(self.features, **kw, name="dense1")(shifted_softplus(x))
        y = dense(self.features, **kw, name="dense2")(shifted_softplus(y))
        return x + y


class InteractionLayer(nn.Module):
    """PhysNet interaction layer.

    a = σ(x); x̃_i = σ(W_I a_i + b_I); v_i = Σ_j (G g_ij) ∘ σ(W_J a_j + b_J) over pairs (i=dst,
    j=src); m = x̃ + v; ``num_res`` residual layers on m; m ← σ(m); x ← u ∘ x + W m + b.
    G (K→F, no bias) starts at zero, the gate u (F,) at ones.

    Call: x (A, F), rbf (P, K) — already multiplied by the cutoff and by the pair mask —,
    dst_idx (P,) int32, src_idx (P,) int32 → (A, F).
    """

    features: int
    num_res: int
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array, rbf: Array, dst_idx: Array, src_idx: Array) -> Array:
        kw = {"dtype": self.dtype, "precision": self.precision}
        num_atoms = x.shape[0]
        a = shifted_softplus(x)
        xi = shifted_softplus(dense(self.features, **kw, name="dense_i")(a))
        xj = shifted_softplus(dense(self.features, **kw, name="dense_j")(a))
        filt = dense(self.features, use_bias=False, zero_init=True, **kw,
                     name="rbf_to_features")(rbf)                              # (P, F)
        msg = filt * jnp.take(xj, src_idx, axis=0, mode="clip")               # (P, F)
        v = jax.ops.segment_sum(msg, dst_idx, num_segments=num_atoms,
                                indices_are_sorted=False)                     # (A, F)
        m = xi + v
        for i in range(self.num_res):
            m = ResidualLayer(self.features, **kw, name=f"residual_{i}")(m)
        m = shifted_softplus(m)
        u = self.param("gate", nn.initializers.ones, (self.features,), jnp.float32)
        out = dense(self.features, **kw, name="dense_out")(m)
        return u.astype(self.dtype) * x + out


class InteractionBlock(nn.Module):
    """Interaction layer followed by ``num_res_atomic`` residual layers on x. (A, F) → (A, F)."""

    features: int
    num_res_atomic: int
    num_res_interaction: int
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array, rbf: Array, dst_idx: Array, src_idx: Array) -> Array:
        kw = {"dtype": self.dtype, "precision": self.precision}
        x = InteractionLayer(self.features, self.num_res_interaction, **kw,
                             name="interaction")(x, rbf, dst_idx, src_idx)
        for i in range(self.num_res_atomic):
            x = ResidualLayer(self.features, **kw, name=f"residual_{i}")(x)
        return x


class OutputBlock(nn.Module):
    """``num_res`` residual layers, σ, then Dense F→2 (no bias, zero init).

    (A, F) → (A, 2): column 0 is the atomic energy contribution, column 1 the atomic charge
    contribution of this module (before the per-element scale and shift).
    """

    features: int
    num_res: int
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = {"dtype": self.dtype, "precision": self.precision}
        for i in range(self.num_res):
            x = ResidualLayer(self.features, **kw, name=f"residual_{i}")(x)
        x = shifted_softplus(x)
        return dense(2, use_bias=False, zero_init=True, **kw, name="dense_out")(x)
