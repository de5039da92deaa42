"""Pure-function facade: parameters as a pytree, the model structure as a static value.

  model_def, params = init(config, key)
  logits, aux = apply(model_def, params, tokens)        # composes with jit/grad/vmap
"""

from __future__ import annotations

from typing import Optional

import jax
from flax import nnx

from tgn_jax.config import TGNConfig
from tgn_jax.nn.model import ModelAux, StatsMode, TGNLM


def init(config: TGNConfig, key: jax.Array) -> tuple[nnx.GraphDef, nnx.State]:
  """Initialises a TGNLM; returns (model_def, params) with params a pytree of arrays."""
  return nnx.split(TGNLM(config, rngs=nnx.Rngs(key)))


def apply(model_def: nnx.GraphDef, params: nnx.State, tokens_BT: jax.Array, *,
          rng: Optional[jax.Array] = None, stats: StatsMode = "mean",
          capacity: Optional[float] = None) -> tuple[jax.Array, ModelAux]:
  """Runs the model: logits float32 [B, T, V] and ModelAux (see TGNLM.__call__).

  capacity: the hard gate's routing capacity (static). Under jit/grad/vmap the default
  is 1.0 (attention computed densely); with a smaller fraction, check aux.overflow and
  recompute at a larger one when it is set (tgn_jax.ops.CapacityLadder does the choice).
  """
  return nnx.merge(model_def, params)(tokens_BT, rng=rng, stats=stats, capacity=capacity)
