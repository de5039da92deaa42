"""Recurrent modules of the inertia channel. Each maps [B, T, D] -> float32 [B, T, D]
and has a one-step form with explicit float32 state [B, D] for decoding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from tgn_jax.config import TGNConfig
from tgn_jax.nn.layers import linear
from tgn_jax.ops import recurrence as rec


class MinGRU(nnx.Module):
  """minGRU: gate and candidate are linear in the input, so the scan is parallel."""

  def __init__(self, config: TGNConfig, *, rngs: nnx.Rngs):
    self.in_proj = linear(config, config.d_model, 2 * config.d_model, rngs=rngs, use_bias=True)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    gate, candidate = jnp.split(self.in_proj(x_BTD), 2, axis=-1)
    return rec.min_gru(gate, candidate)

  def step(self, x_B1D: jax.Array, h_BD: jax.Array) -> tuple[jax.Array, jax.Array]:
    gate, candidate = jnp.split(self.in_proj(x_B1D[:, 0]), 2, axis=-1)
    h = rec.min_gru_step(gate, candidate, h_BD)
    return h[:, None], h


class GRU(nnx.Module):
  """torch.nn.GRU (one layer, batch_first), including its U(-1/sqrt(D), 1/sqrt(D)) init."""

  def __init__(self, config: TGNConfig, *, rngs: nnx.Rngs):
    d = config.d_model
    init = nnx.initializers.uniform(scale=2.0 / math.sqrt(d))
    shifted = lambda key, shape, dtype: init(key, shape, dtype) - 1.0 / math.sqrt(d)
    self.in_proj = linear(config, d, 3 * d, rngs=rngs, use_bias=True,
                          kernel_init=shifted, bias_init=shifted)
    self.w_hh = nnx.Param(shifted(rngs.params(), (d, 3 * d), config.weight_dtype))
    self.b_hh = nnx.Param(shifted(rngs.params(), (3 * d,), config.weight_dtype))

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    return rec.gru(self.in_proj(x_BTD), self.w_hh[...], self.b_hh[...])

  def step(self, x_B1D: jax.Array, h_BD: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = rec.gru_step(self.in_proj(x_B1D[:, 0]), self.w_hh[...], self.b_hh[...], h_BD)
    return h[:, None], h


def make_recurrence(config: TGNConfig, *, rngs: nnx.Rngs):
  return {"mingru": MinGRU, "gru": GRU}[config.recurrence](config, rngs=rngs)
