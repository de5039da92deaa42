"""The TGN block: pre-norm, recurrence, gate, attention, mix, residual, MLP.

  y_t = (1 - g_t) r_t + g_t a_t,   x <- x + y,   x <- x + MLP(norm(x))

The same block gives the baselines: mixer="attention" (y = a, no recurrence or
gate) and mixer="recurrent" (y = r, no attention or gate). The mix is resolved once,
from the config, into one of MIXES; one call serves training, prefill and decoding.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from tgn_jax.config import TGNConfig
from tgn_jax.nn.attention import GibbsAttention
from tgn_jax.nn.layers import MLP, GateHead, rms_norm
from tgn_jax.nn.recurrence import make_recurrence
from tgn_jax.ops import gate as gate_ops
from tgn_jax.ops.attention import ThermoStats

# attention: y = a.  recurrence: y = r.  soft: y = r + p (a - r), attention everywhere.
# hard: y = r + g (a - r), g in {0, 1} (straight-through), attention where computed.
MIXES = ("attention", "recurrence", "soft", "hard")


def resolve_mix(config: TGNConfig) -> str:
  """The block's mix, one of MIXES."""
  if config.mixer == "attention" or (config.mixer == "tgn" and config.gate == "open"):
    return "attention"
  if config.mixer == "recurrent" or config.gate == "closed":
    return "recurrence"
  return config.gate


class LayerAux(NamedTuple):
  """What one layer reports, each [B, T] (stats [B, T, N], NaN where not computed)."""

  gate_prob: jax.Array   # float32 open probability sigmoid(MLP(r))
  gate: jax.Array        # float32 gate value applied in the mix (0/1 for the hard gate)
  is_open: jax.Array     # bool: the hard decision (soft gate: what hardening would give)
  computed: jax.Array    # bool: attention was computed at this token (open or explored)
  stats_mask: jax.Array  # bool: the token's attention was mixed into the output
  stats: Optional[ThermoStats]
  overflow: jax.Array    # bool scalar: routing dropped tokens (the result must be redone)
  needed: jax.Array      # float32 scalar: the smallest capacity fraction that fits


class LayerCache(NamedTuple):
  """Decoding state of one layer: keys/values [B, S, K, H] and recurrent state f32 [B, D]."""

  k: Optional[jax.Array]
  v: Optional[jax.Array]
  state: Optional[jax.Array]


class Block(nnx.Module):

  def __init__(self, config: TGNConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.mix = resolve_mix(config)
    self.norm_mix = rms_norm(config, rngs=rngs)
    self.recurrence = make_recurrence(config, rngs=rngs) if config.has_recurrence else None
    self.gate_head = GateHead(config, rngs=rngs) if config.has_gate else None
    self.attention = GibbsAttention(config, rngs=rngs) if config.has_attention else None
    self.norm_mlp = rms_norm(config, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, *,
               cache: Optional[LayerCache] = None, key: Optional[jax.Array] = None,
               return_stats: bool = False, capacity: float = 1.0
               ) -> tuple[jax.Array, LayerAux, Optional[LayerCache]]:
    """One layer over T tokens at positions_BT.

    Training: no cache. Prefill: an empty cache and positions from 0; the layer computes
    as in training and writes its keys, values and last recurrent state into the cache.
    Decoding: T = 1 at the cache's next position; the token attends to the cache, each
    row reading its keys up to the position (a row whose hard gate is closed reads none).
    key: training randomness (gate sampling, exploration); None = deterministic.
    capacity: the hard gate's routing capacity, a fraction of each segment; a capacity
      that rounds up to the whole segment (1.0 always) computes attention densely (exact,
      cannot overflow).
    Returns (x [B, T, D], LayerAux, the updated cache or None).
    """
    h = self.norm_mix(x_BTD)
    decoding = cache is not None and h.shape[1] == 1
    r = state = None
    if self.recurrence is not None:
      r, state = self.recurrence(h, None if cache is None else cache.state)
    k = v = None
    if self.attention is not None:
      k, v = self.attention.keys_values(h, positions_BT)
    if cache is not None:
      if k is not None:
        start = positions_BT[0, 0]
        write = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), start, 1)
        cache = LayerCache(k=write(cache.k, k), v=write(cache.v, v), state=state)
        if decoding:  # prefill attends among its own tokens, a decoding step to the cache
          k, v = cache.k, cache.v
      else:
        cache = LayerCache(k=None, v=None, state=state)

    prob, is_open, computed, explored_fraction = self._gate(r, key, h.shape[:2])
    stats, report = None, gate_ops.RouteReport(jnp.bool_(False), jnp.float32(0.0))
    a = None
    if self.attention is not None:
      a, stats, report = self._attend(h, positions_BT, k, v, computed, decoding=decoding,
                                      return_stats=return_stats, capacity=capacity)
      if stats is not None:
        stats = jax.tree.map(lambda s: jnp.where(computed[..., None], s, jnp.nan), stats)
    y, gate = self._mix(r, a, prob, is_open, computed, explored_fraction)
    x = x_BTD + y.astype(x_BTD.dtype)
    x = x + self.mlp(self.norm_mlp(x))
    aux = LayerAux(gate_prob=prob, gate=gate, is_open=is_open, computed=computed,
                   stats_mask=is_open if self.mix == "hard" else computed, stats=stats,
                   overflow=report.overflow, needed=report.needed)
    return x, aux, cache

  def _gate(self, r_BTD, key, shape):
    """(open probability float32 [B, T], open bool [B, T], attention computed bool [B, T],
    the fraction of closed tokens explored, float32 scalar)."""
    none = jnp.float32(0.0)
    if self.mix in ("attention", "recurrence"):
      forced = jnp.full(shape, self.mix == "attention")
      return forced.astype(jnp.float32), forced, forced, none
    cfg = self.config
    prob = jax.nn.sigmoid(self.gate_head(r_BTD))
    if self.mix == "soft":
      return prob, prob > cfg.gate_threshold, jnp.ones(shape, bool), none
    sample_key, explore_key = jax.random.split(key) if key is not None else (None, None)
    is_open = gate_ops.hard_gate(prob, threshold=cfg.gate_threshold,
                                 key=sample_key if cfg.gate_sampling else None)
    if explore_key is None or cfg.exploration == 0.0:
      return prob, is_open, is_open, none
    fraction = gate_ops.exploration_fraction(is_open, cfg.exploration, cfg.exploration_floor)
    explore = gate_ops.exploration_mask(~is_open, fraction, explore_key)
    return prob, is_open, is_open | explore, fraction

  def _attend(self, h_BTD, positions_BT, k, v, computed_BT, *, decoding: bool,
              return_stats: bool, capacity: float):
    """Attention output [B, T, D] (zero where a routed token was not computed), its
    observables or None, and the RouteReport."""
    cfg = self.config
    no_report = gate_ops.RouteReport(jnp.bool_(False), jnp.float32(0.0))
    if decoding:
      reads = jnp.where(computed_BT[:, 0], positions_BT[:, 0] + 1, 0)
      a, _ = self.attention.attend(h_BTD, positions_BT, k, v, mask="lengths",
                                   kv_lengths=reads.astype(jnp.int32))
      return a, None, no_report
    if self.mix != "hard":
      a, stats = self.attention.attend(h_BTD, positions_BT, k, v, mask="causal",
                                       return_stats=return_stats)
      return a, stats, no_report
    if cfg.execution == "dense" or gate_ops.computes_densely(
        h_BTD.shape[1], capacity, cfg.segment_len, cfg.capacity_multiple):
      a, stats = self.attention.attend(h_BTD, positions_BT, k, v, mask="causal",
                                       return_stats=return_stats)
      return a, stats, gate_ops.count_report(computed_BT, 1.0, cfg.segment_len,
                                             cfg.capacity_multiple)
    (a, stats), report = gate_ops.route_causal_segments(
        lambda h_BCD, pos_BC, lengths_B, end: self.attention.attend(
            h_BCD, pos_BC, k[:, :end], v[:, :end], mask="positions", q_lengths=lengths_B,
            return_stats=return_stats),
        computed_BT, h_BTD, capacity, cfg.segment_len, cfg.capacity_multiple)
    return a, stats, report

  def _mix(self, r, a, prob, is_open, computed, explored_fraction):
    """(y [B, T, D], the gate value applied, float32 [B, T])."""
    if self.mix == "attention":
      return a, prob
    if self.mix == "recurrence":
      return r, prob
    if self.mix == "soft":
      return r + prob[..., None] * (a - r), prob
    # Explored tokens carry the straight-through gradient scaled by 1/fraction, so its
    # expectation matches the gradient with attention computed at every closed token.
    weight = jnp.where(is_open, 1.0, jnp.where(computed, 1.0 / explored_fraction, 0.0))
    gate = gate_ops.straight_through(prob, is_open, weight)
    return r + gate[..., None] * (a - r), jax.lax.stop_gradient(gate)
