"""The TGN block: pre-norm, recurrence, gate, attention, mix, residual, MLP.

  y_t = (1 - g_t) r_t + g_t a_t,   x <- x + y,   x <- x + MLP(norm(x))

The same block gives the baselines: mixer="attention" (y = a, no recurrence or
gate) and mixer="recurrent" (y = r, no attention or gate). The mix is resolved once,
from the config, into one of MIXES; one call serves training, prefill and decoding.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
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

  gate_logit: jax.Array  # float32 gate logit MLP(input) - offset (0 without a gate)
  gate_prob: jax.Array  # float32 open probability sigmoid(logit) (soft: sigmoid(logit / temp))
  gate: jax.Array  # float32 gate value applied in the mix (0/1 for the hard gate)
  is_open: jax.Array  # bool: the hard decision (soft gate: what hardening would give)
  computed: jax.Array  # bool: attention was computed at this token (open or explored)
  stats_mask: jax.Array  # bool: the token's attention was mixed into the output
  stats: Optional[ThermoStats]
  overflow: jax.Array  # bool scalar: routing dropped tokens (the result must be redone)
  needed: jax.Array  # float32 scalar: the smallest capacity fraction that fits


class LayerCache(NamedTuple):
  """Decoding state of one layer: keys/values [B, S, K, H] and recurrent state f32 [B, D].

  kv="all": slot j holds position j. kv="open": slots hold the open tokens in order,
  `positions` int32 [B, S] theirs and `count` int32 [B] how many slots are in use.
  """

  k: Optional[jax.Array]
  v: Optional[jax.Array]
  state: Optional[jax.Array]
  positions: Optional[jax.Array] = None
  count: Optional[jax.Array] = None


class Keys(NamedTuple):
  """The keys and values a layer's queries attend: [B, S, K, H], their positions int32
  [B, S] (None: slot j is position j), slots in use int32 [B] (None: all), and the
  routing report of gathering them."""

  k: jax.Array
  v: jax.Array
  positions: Optional[jax.Array]
  lengths: Optional[jax.Array]
  report: gate_ops.RouteReport


_NO_REPORT = gate_ops.RouteReport(np.bool_(False), np.float32(0.0))


def _merge_reports(a: gate_ops.RouteReport, b: gate_ops.RouteReport) -> gate_ops.RouteReport:
  return gate_ops.RouteReport(a.overflow | b.overflow, jnp.maximum(a.needed, b.needed))


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

  def __call__(
    self,
    x_BTD: jax.Array,
    positions_BT: jax.Array,
    *,
    cache: Optional[LayerCache] = None,
    key: Optional[jax.Array] = None,
    return_stats: bool = False,
    capacity: float = 1.0,
    open_BT: Optional[jax.Array] = None,
    gate_temperature=1.0,
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
    open_BT: bool [B, T], a given hard-gate decision in place of the learned one (reference
      gates for ablations: oracle, random); no exploration then.
    gate_temperature: the soft gate's sigmoid temperature, g = sigmoid(logit / temperature)
      (a float or traced scalar; annealed towards 0, the soft mix approaches the hard one).
      The hard gate ignores it.
    Returns (x [B, T, D], LayerAux, the updated cache or None).
    """
    h = self.norm_mix(x_BTD)
    decoding = cache is not None and h.shape[1] == 1
    r = state = None
    if self.recurrence is not None:
      r, state = self.recurrence(h, None if cache is None else cache.state)
    logit, prob, is_open, computed, explored_fraction = self._gate(
      h, r, key, open_BT, gate_temperature
    )
    stats, report, a = None, _NO_REPORT, None
    if self.attention is not None:
      keys, cache = self._keys(
        h, positions_BT, is_open, cache, decoding=decoding, capacity=capacity
      )
      a, stats, report = self._attend(
        h,
        positions_BT,
        keys,
        computed,
        decoding=decoding,
        return_stats=return_stats,
        capacity=capacity,
      )
      if stats is not None:
        stats = jax.tree.map(lambda s: jnp.where(computed[..., None], s, jnp.nan), stats)
    if cache is not None:
      cache = cache._replace(state=state)
    y, gate = self._mix(r, a, logit, prob, is_open, computed, explored_fraction)
    x = x_BTD + y.astype(x_BTD.dtype)
    x = x + self.mlp(self.norm_mlp(x))
    aux = LayerAux(
      gate_logit=logit,
      gate_prob=prob,
      gate=gate,
      is_open=is_open,
      computed=computed,
      stats_mask=is_open if self.mix == "hard" else computed,
      stats=stats,
      overflow=report.overflow,
      needed=report.needed,
    )
    return x, aux, cache

  def _keys(
    self,
    h_BTD,
    positions_BT,
    is_open_BT,
    cache: Optional[LayerCache],
    *,
    decoding: bool,
    capacity: float,
  ) -> tuple[Keys, Optional[LayerCache]]:
    """The keys the queries attend, and the cache with this call's keys written in.

    kv="all": every token's key; a prefill writes them at their positions and a decoding
    step reads the cache up to its position. kv="open": the open tokens' keys only,
    gathered into one capacity over the sequence (a prefill keeps them as the cache);
    a decoding step appends an open token's key to its row of the cache.
    """
    cfg = self.config
    k, v = self.attention.keys_values(h_BTD, positions_BT)
    batch, seq_len = positions_BT.shape
    if cfg.kv == "all":
      if cache is None:
        return Keys(k, v, None, None, _NO_REPORT), None
      start = positions_BT[0, 0]
      write = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), start, 1)
      cache = cache._replace(k=write(cache.k, k), v=write(cache.v, v))
      if decoding:  # a decoding step reads the cache, a prefill attends among its own tokens
        return Keys(cache.k, cache.v, None, None, _NO_REPORT), cache
      return Keys(k, v, None, None, _NO_REPORT), cache
    rows = jnp.arange(batch)[:, None]
    if decoding:
      opened = is_open_BT[:, 0]
      slot = jnp.where(opened, cache.count, cache.k.shape[1])[:, None]  # closed: dropped
      write = lambda c, x: c.at[rows, slot].set(x.astype(c.dtype), mode="drop")
      cache = cache._replace(
        k=write(cache.k, k),
        v=write(cache.v, v),
        positions=write(cache.positions, positions_BT),
        count=cache.count + opened.astype(jnp.int32),
      )
      return Keys(cache.k, cache.v, cache.positions, cache.count, _NO_REPORT), cache
    dense = cfg.execution == "dense" or gate_ops.computes_densely(
      seq_len, capacity, cfg.segment_len, cfg.capacity_multiple
    )
    key_capacity = (
      seq_len if dense else gate_ops.capacity_tokens(seq_len, capacity, cfg.capacity_multiple)
    )
    slots = gate_ops.token_slots(is_open_BT, key_capacity)
    keys = Keys(
      k[rows, slots.positions_BC],
      v[rows, slots.positions_BC],
      slots.positions_BC,
      slots.lengths_B,
      gate_ops.count_report(
        is_open_BT, capacity if not dense else 1.0, seq_len, cfg.capacity_multiple
      ),
    )
    if cache is not None:  # prefill: the gathered keys are the cache
      cache = LayerCache(
        k=keys.k, v=keys.v, state=None, positions=keys.positions, count=keys.lengths
      )
    return keys, cache

  def _gate(self, h_BTD, r_BTD, key, open_BT, temperature):
    """(logit and open probability float32 [B, T], open bool [B, T], attention computed
    bool [B, T], the fraction of closed tokens explored, float32 scalar)."""
    none = jnp.float32(0.0)
    shape = h_BTD.shape[:2]
    if self.mix in ("attention", "recurrence"):
      forced = jnp.full(shape, self.mix == "attention")
      return jnp.zeros(shape, jnp.float32), forced.astype(jnp.float32), forced, forced, none
    cfg = self.config
    gate_input = (
      r_BTD
      if cfg.gate_input == "recurrence"
      else jnp.concatenate([h_BTD, r_BTD.astype(h_BTD.dtype)], axis=-1)
    )
    logit = self.gate_head(gate_input)
    if self.mix == "soft":
      prob = jax.nn.sigmoid(logit / temperature)
      return logit, prob, prob > cfg.gate_threshold, jnp.ones(shape, bool), none
    if cfg.center_gate_gradient:
      logit = gate_ops.level_free(logit)
    prob = jax.nn.sigmoid(logit)
    if open_BT is not None:
      given = jnp.asarray(open_BT, bool)
      return logit, prob, given, given, none
    sample_key, explore_key = jax.random.split(key) if key is not None else (None, None)
    is_open = gate_ops.hard_gate(
      prob, threshold=cfg.gate_threshold, key=sample_key if cfg.gate_sampling else None
    )
    if explore_key is None or cfg.exploration == 0.0:
      return logit, prob, is_open, is_open, none
    fraction = gate_ops.exploration_fraction(is_open, cfg.exploration, cfg.exploration_floor)
    explore = gate_ops.exploration_mask(~is_open, fraction, explore_key)
    return logit, prob, is_open, is_open | explore, fraction

  def _attend(
    self,
    h_BTD,
    positions_BT,
    keys: Keys,
    computed_BT,
    *,
    decoding: bool,
    return_stats: bool,
    capacity: float,
  ):
    """Attention output [B, T, D] (zero where a routed token was not computed), its
    observables or None, and the RouteReport of queries and keys."""
    cfg = self.config
    attend = functools.partial(
      self.attention.attend,
      kv_positions=keys.positions,
      kv_lengths=keys.lengths,
      return_stats=return_stats,
    )
    if decoding:
      # A row reads its keys up to its position (kv="all") or its open tokens' (kv="open");
      # a row whose hard gate is closed reads none.
      reads = positions_BT[:, 0] + 1 if keys.lengths is None else keys.lengths
      reads = jnp.where(computed_BT[:, 0], reads, 0).astype(jnp.int32)
      a, _ = self.attention.attend(
        h_BTD, positions_BT, keys.k, keys.v, mask="lengths", kv_lengths=reads
      )
      return a, None, _NO_REPORT
    plain = "causal" if keys.positions is None else "positions"
    if self.mix != "hard":
      a, stats = attend(h_BTD, positions_BT, keys.k, keys.v, mask=plain)
      return a, stats, _NO_REPORT
    if cfg.execution == "dense" or gate_ops.computes_densely(
      h_BTD.shape[1], capacity, cfg.segment_len, cfg.capacity_multiple
    ):
      a, stats = attend(h_BTD, positions_BT, keys.k, keys.v, mask=plain)
      queries = gate_ops.count_report(computed_BT, 1.0, cfg.segment_len, cfg.capacity_multiple)
      return a, stats, _merge_reports(queries, keys.report)
    # Segments read the key prefix up to their end; gathered keys are read by position.
    prefix = lambda x, end: x[:, :end] if keys.positions is None else x
    (a, stats), queries = gate_ops.route_causal_segments(
      lambda h_BCD, pos_BC, lengths_B, end: attend(
        h_BCD,
        pos_BC,
        prefix(keys.k, end),
        prefix(keys.v, end),
        mask="positions",
        q_lengths=lengths_B,
      ),
      computed_BT,
      h_BTD,
      capacity,
      cfg.segment_len,
      cfg.capacity_multiple,
    )
    return a, stats, _merge_reports(queries, keys.report)

  def _mix(self, r, a, logit, prob, is_open, computed, explored_fraction):
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
    if self.config.gate_gradient == "spread":
      prob = jax.nn.sigmoid(logit / gate_ops.logit_spread(logit))
    gate = gate_ops.straight_through(prob, is_open, weight)
    return r + gate[..., None] * (a - r), jax.lax.stop_gradient(gate)
