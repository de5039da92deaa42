"""Recurrent modules of the inertia channel. Each maps x [B, T, D] and an optional float32
state h0 [B, D] (zeros if None) to (float32 states [B, T, D], the last state [B, D]), so one
call serves training, prefill (T tokens) and decoding (T = 1, the cache's state)."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from tgn_jax.config import TGNConfig
from tgn_jax.nn.layers import linear
from tgn_jax.ops import recurrence as rec


class MinGRU(nnx.Module):
  """minGRU: gate and candidate are linear in the input (with a bias), so the scan is parallel.

  The plain minGRU of Feng et al. ("Were RNNs all we needed?"): linear space, the candidate
  unconstrained. Not the log-space variant (candidate through g, positive states, no bias)
  of lucidrains/minGRU-pytorch; see tgn_jax.ops.recurrence.min_gru.
  """

  def __init__(self, config: TGNConfig, *, rngs: nnx.Rngs):
    self.in_proj = linear(config, config.d_model, 2 * config.d_model, rngs=rngs, use_bias=True)

  def __call__(
    self, x_BTD: jax.Array, h0_BD: Optional[jax.Array] = None
  ) -> tuple[jax.Array, jax.Array]:
    gate, candidate = jnp.split(self.in_proj(x_BTD), 2, axis=-1)
    h = rec.min_gru(gate, candidate, h0_BD)
    return h, h[:, -1]


class GRU(nnx.Module):
  """torch.nn.GRU (one layer, batch_first), including its U(-1/sqrt(D), 1/sqrt(D)) init."""

  def __init__(self, config: TGNConfig, *, rngs: nnx.Rngs):
    d = config.d_model
    init = nnx.initializers.uniform(scale=2.0 / math.sqrt(d))
    shifted = lambda key, shape, dtype: init(key, shape, dtype) - 1.0 / math.sqrt(d)
    self.in_proj = linear(
      config, d, 3 * d, rngs=rngs, use_bias=True, kernel_init=shifted, bias_init=shifted
    )
    self.w_hh = nnx.Param(shifted(rngs.params(), (d, 3 * d), config.weight_dtype))
    self.b_hh = nnx.Param(shifted(rngs.params(), (3 * d,), config.weight_dtype))

  def __call__(
    self, x_BTD: jax.Array, h0_BD: Optional[jax.Array] = None
  ) -> tuple[jax.Array, jax.Array]:
    h = rec.gru(self.in_proj(x_BTD), self.w_hh[...], self.b_hh[...], h0_BD)
    return h, h[:, -1]


def make_recurrence(config: TGNConfig, *, rngs: nnx.Rngs):
  return {"mingru": MinGRU, "gru": GRU}[config.recurrence](config, rngs=rngs)
