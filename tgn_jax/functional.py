"""The pure entry point: parameters as a pytree, the model structure as a static value.

  model_def, params = init(config, key)
  logits, aux = apply(model_def, params, tokens)        # composes with jit/grad/vmap

`TGNLM.__call__` and the training step both run the model through `apply`.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tgn_jax.config import TGNConfig
from tgn_jax.nn.model import (
  TGNLM,
  ModelAux,
  StatsMode,
  _apply,
  _check_tokens,
  _is_traced,
  _run_exact,
)


def init(config: TGNConfig, key: jax.Array) -> tuple[nnx.GraphDef, nnx.State]:
  """Initialises a TGNLM; returns (model_def, params) with params a pytree of arrays."""
  return nnx.split(TGNLM(config, rngs=nnx.Rngs(key)))


def model_def(config: TGNConfig) -> nnx.GraphDef:
  """The static structure of a TGNLM (what init returns first), without initialising its
  parameters."""
  return nnx.graphdef(nnx.eval_shape(lambda: TGNLM(config, rngs=nnx.Rngs(0))))


def apply(
  model_def: nnx.GraphDef,
  params: nnx.State,
  tokens_BT: jax.Array,
  *,
  rng: Optional[jax.Array] = None,
  stats: StatsMode = "mean",
  capacity: Optional[float] = None,
  open_LBT: Optional[jax.Array] = None,
  gate_temperature=None,
) -> tuple[jax.Array, ModelAux]:
  """Runs the model: logits float32 [B, T, V] and ModelAux. `TGNLM.__call__` is this.

  rng: training randomness (Bernoulli gate sampling, exploration of closed gates); None
    runs deterministically (threshold gate, no exploration).
  stats: "mean" (per-layer means of the attention observables), "token" (also the
    per-token values) or None (skip their extra pass).
  capacity: the hard gate's routing capacity, a fraction of each segment (static). None:
    called eagerly, the smallest of config.capacity_buckets that holds the tokens, found by
    a CapacityLadder kept per input shape (a call that overflows is redone, so no token is
    ever left out); under jit/grad/vmap, 1.0 (attention computed densely). An explicit
    fraction below 1 is the caller's promise to check aux.overflow and recompute at a
    larger one when it is set (tgn_jax.ops.CapacityLadder does the choice).
  open_LBT: bool [L, B, T], a given hard-gate decision per layer in place of the learned
    one (reference gates for ablations: see tgn_jax.ops.gate.oracle_gate, random_gate).
  gate_temperature: the soft gate's sigmoid temperature (float or traced scalar; None: 1),
    g = sigmoid(logit / temperature): the hardening schedule anneals it towards 0.
  """
  _check_params(model_def, params)
  config = _config_of(model_def)
  if config is None:
    raise TypeError("model_def must be the GraphDef of a TGNLM (from init or nnx.split)")
  _check_tokens(tokens_BT, config)
  if stats not in (None, "mean", "token"):
    raise ValueError(f"stats must be None, 'mean' or 'token', got {stats!r}")
  if open_LBT is not None:
    expected = (config.n_layers,) + tuple(tokens_BT.shape)
    if tuple(open_LBT.shape) != expected or not (config.has_gate and config.gate == "hard"):
      raise ValueError(
        f"open_LBT must be bool {list(expected)} [layers, batch, tokens] and "
        f"needs gate='hard'; got shape {tuple(open_LBT.shape)}, gate "
        f"{config.gate!r}"
      )
  if gate_temperature is None:
    gate_temperature = 1.0
  elif not _is_traced(gate_temperature) and not float(gate_temperature) > 0:
    raise ValueError(f"gate_temperature must be positive, got {gate_temperature!r}")
  temperature = jnp.float32(gate_temperature)
  run = lambda c: _apply(model_def, params, tokens_BT, rng, stats, c, open_LBT, temperature)
  return _run_exact(
    run,
    capacity,
    config,
    (model_def, tokens_BT.shape, rng is None),
    traced=_is_traced((tokens_BT, params, rng)),
  )


def _check_params(model_def: nnx.GraphDef, params: nnx.State) -> None:
  """ValueError naming the first parameter that is missing, extra or of another shape than
  the model needs: e.g. parameters of another configuration."""
  given = {
    jax.tree_util.keystr(path): tuple(np.shape(x))
    for path, x in jax.tree_util.tree_leaves_with_path(params)
  }
  config = _config_of(model_def)
  if config is None:  # not a TGNLM structure we can read: let merge judge
    return
  expected = _expected_shapes(config)
  hint = "the parameters are not this model's (another configuration?)"
  for name, shape in expected.items():
    if name not in given:
      raise ValueError(f"parameter {name} is missing: {hint}")
    if given[name] != shape:
      raise ValueError(
        f"parameter {name} has shape {given[name]} but this model needs {shape}: {hint}"
      )
  for name in given:
    if name not in expected:
      raise ValueError(f"parameter {name} is not one of this model's: {hint}")


def _config_of(model_def: nnx.GraphDef) -> Optional[TGNConfig]:
  """The TGNConfig a TGNLM's GraphDef carries as a static attribute, or None."""
  for _, attribute in getattr(model_def, "attributes", ()):
    value = getattr(attribute, "value", None)
    if isinstance(value, TGNConfig):
      return value
  return None


@functools.lru_cache(maxsize=32)
def _expected_shapes(config: TGNConfig) -> dict[str, tuple[int, ...]]:
  abstract = nnx.state(nnx.eval_shape(lambda: TGNLM(config, rngs=nnx.Rngs(0))))
  return {
    jax.tree_util.keystr(path): tuple(x.shape)
    for path, x in jax.tree_util.tree_leaves_with_path(abstract)
  }


# Where the moving-quantile control's per-layer offsets sit in a TGNLM's parameters.
_GATE_OFFSET_PATH = ("blocks", "gate_head", "offset")


def gate_offsets(params: nnx.State) -> jax.Array:
  """The gate-logit offsets (layers.GateOffset) of a TGNLM's parameters, float32 [L]."""
  node = params
  for key in _GATE_OFFSET_PATH:
    node = node[key]
  return node[...]


def with_gate_offsets(params: nnx.State, offsets_L: jax.Array) -> nnx.State:
  """params with the gate-logit offsets replaced by offsets_L (float32 [L]); pure."""

  def put(path, leaf):
    keys = tuple(getattr(k, "key", None) for k in path[: len(_GATE_OFFSET_PATH)])
    return jnp.asarray(offsets_L, leaf.dtype) if keys == _GATE_OFFSET_PATH else leaf

  return jax.tree_util.tree_map_with_path(put, params)
