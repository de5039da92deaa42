"""Holding the hard gate's open rate at a chosen value from outside the library.

The gate opens a token when sigmoid(logit) > threshold, and the gate head's output layer
adds a bias to the logit. Shifting each layer's bias by the right amount opens the wanted
fraction of a calibration batch's tokens. Layers are calibrated in order, each on a fresh
forward pass, since layer l's gates depend on which tokens layers < l opened.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from tgn_jax import functional
from tgn_jax.ops import gate as gate_ops


def gate_bias(params):
  """The gate heads' output bias Param, float32 [L, 1] (stacked over layers)."""
  return params["blocks"]["gate_head"]["out"]["bias"]


def calibrate_open_rate(
  model_def, params, tokens_BT: jax.Array, target: float, threshold: float
) -> tuple[object, jax.Array]:
  """Params (a copy) whose hard gate opens a `target` fraction of the tokens of every layer.

  tokens_BT: int [B, T], the calibration batch. threshold: the config's gate_threshold.
  Returns the new params and the open gates they give on the batch, bool [L, B, T]
  (deterministic forward: threshold gate, no exploration).
  """
  params = jax.tree.map(lambda x: x, params)  # fresh Variables; the caller's stay untouched
  gates = jax.jit(lambda p, t: functional.apply(model_def, p, t, stats=None)[1])
  threshold_logit = math.log(threshold / (1.0 - threshold))
  bias = gate_bias(params)
  for layer in range(bias.shape[0]):
    prob = np.asarray(gates(params, tokens_BT).gate_prob[layer], np.float64).ravel()
    prob = np.clip(prob, 1e-12, 1.0 - 1e-12)
    logits = np.sort(np.log(prob) - np.log1p(-prob))
    cut = _cut_between(logits, round((1.0 - target) * logits.size))
    bias[...] = bias[...].at[layer].add(threshold_logit - cut)
  return params, gates(params, tokens_BT).is_open


def layer_rates(open_LBT: jax.Array) -> list[float]:
  """Fraction of open gates in each layer."""
  return [float(r) for r in jnp.mean(open_LBT, axis=(1, 2), dtype=jnp.float32)]


def gathered_fraction(seq_len: int, capacity: float, segment_len: int, multiple: int) -> float:
  """Query slots attention computes per token at this routing capacity (1.0 when it
  computes densely): what the attention work scales with."""
  return gate_ops.gathered_slots(seq_len, capacity, segment_len, multiple) / seq_len


def _cut_between(sorted_logits: np.ndarray, closed: int) -> float:
  """A logit with `closed` of the sorted values below it and the rest above, midway
  between neighbours so that rounding in low precision moves as few tokens as possible."""
  if closed <= 0:
    return float(sorted_logits[0]) - 1.0
  if closed >= sorted_logits.size:
    return float(sorted_logits[-1]) + 1.0
  return 0.5 * float(sorted_logits[closed - 1] + sorted_logits[closed])
