"""The TGN block: pre-norm, recurrence, gate, attention, mix, residual, MLP.

  y_t = (1 - g_t) r_t + g_t a_t,   x <- x + y,   x <- x + MLP(norm(x))

The same block gives the baselines: mixer="attention" (y = a, no recurrence or
gate) and mixer="recurrent" (y = r, no attention or gate).
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


class LayerAux(NamedTuple):
  """What one layer reports, each [B, T] (stats [B, T, N], NaN where not computed)."""

  gate_prob: jax.Array   # float32 open probability sigmoid(MLP(r))
  gate: jax.Array        # float32 gate value applied in the mix (0/1 for the hard gate)
  computed: jax.Array    # bool: attention was computed at this token
  stats_mask: jax.Array  # bool: the token's attention was mixed into the output
  stats: Optional[ThermoStats]


class LayerCache(NamedTuple):
  """Decoding state of one layer: keys/values [B, S, K, H] and recurrent state f32 [B, D]."""

  k: Optional[jax.Array]
  v: Optional[jax.Array]
  state: Optional[jax.Array]


class Block(nnx.Module):

  def __init__(self, config: TGNConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.norm_mix = rms_norm(config, rngs=rngs)
    self.recurrence = make_recurrence(config, rngs=rngs) if config.has_recurrence else None
    self.gate_head = GateHead(config, rngs=rngs) if config.has_gate else None
    self.attention = GibbsAttention(config, rngs=rngs) if config.has_attention else None
    self.norm_mlp = rms_norm(config, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, *,
               key: Optional[jax.Array] = None, return_stats: bool = False,
               cache_len: Optional[int] = None
               ) -> tuple[jax.Array, LayerAux, Optional[LayerCache]]:
    """One layer over a whole sequence.

    key: randomness for training (gate sampling, exploration); None = deterministic.
    cache_len: if given, also return a LayerCache padded to this length (prefill).
    """
    cfg = self.config
    h = self.norm_mix(x_BTD)
    batch, seq_len, _ = h.shape
    ones = jnp.ones((batch, seq_len), jnp.float32)
    all_tokens = jnp.ones((batch, seq_len), bool)
    r = self.recurrence(h) if self.recurrence is not None else None
    k = v = None
    if self.attention is not None:
      k, v = self.attention.keys_values(h, positions_BT)

    def dense_attention():
      return self.attention.attend(h, positions_BT, k, v, return_stats=return_stats,
                                   gathered=False)

    stats = None
    if cfg.mixer == "attention" or (cfg.mixer == "tgn" and cfg.gate == "open"):
      y, stats = dense_attention()
      prob = gate = ones
      computed = stats_mask = all_tokens
    elif cfg.mixer == "recurrent" or cfg.gate == "closed":
      y = r
      prob = gate = 0.0 * ones
      computed = stats_mask = ~all_tokens
    elif cfg.gate == "soft":
      prob = gate = jax.nn.sigmoid(self.gate_head(r))
      a, stats = dense_attention()
      y = r + prob[..., None] * (a - r)
      computed = stats_mask = all_tokens
    else:
      prob = jax.nn.sigmoid(self.gate_head(r))
      sample_key, explore_key = jax.random.split(key) if key is not None else (None, None)
      is_open = gate_ops.hard_gate(prob, threshold=cfg.gate_threshold,
                                   key=sample_key if cfg.gate_sampling else None)
      explore = gate_ops.exploration_mask(~is_open, cfg.exploration, explore_key)
      computed = is_open | explore
      # Explored tokens carry the straight-through gradient scaled by 1/fraction, so its
      # expectation matches the gradient with attention computed at every closed token.
      weight = jnp.where(is_open, 1.0, jnp.where(explore, 1.0 / max(cfg.exploration, 1e-9), 0.0))
      gate = gate_ops.straight_through(prob, is_open, weight)
      if cfg.execution == "sparse":
        a, stats = gate_ops.route_causal_segments(
            lambda h_BCD, pos_BC, valid_BC, end: self.attention.attend(
                h_BCD, pos_BC, k[:, :end], v[:, :end], return_stats=return_stats),
            computed, h, cfg.capacity_buckets, cfg.segment_len, cfg.capacity_multiple)
      else:
        a, stats = dense_attention()
      y = r + gate[..., None] * (a - r)
      stats_mask = is_open

    if stats is not None:
      stats = jax.tree.map(lambda s: jnp.where(computed[..., None], s, jnp.nan), stats)
    x = x_BTD + y.astype(x_BTD.dtype)
    x = x + self.mlp(self.norm_mlp(x))
    aux = LayerAux(gate_prob=prob, gate=jax.lax.stop_gradient(gate) if cfg.gate == "hard"
                   else gate, computed=computed, stats_mask=stats_mask, stats=stats)
    cache = None
    if cache_len is not None:
      pad = ((0, 0), (0, cache_len - seq_len), (0, 0), (0, 0))
      cache = LayerCache(
          k=jnp.pad(k, pad) if k is not None else None,
          v=jnp.pad(v, pad) if v is not None else None,
          state=r[:, -1] if r is not None else None)
    return x, aux, cache

  def step(self, x_B1D: jax.Array, position: jax.Array, cache: LayerCache
           ) -> tuple[jax.Array, LayerCache]:
    """One decoding step at the scalar int `position`, updating the cache in place.

    With the hard gate, only rows whose gate is open attend, gathered by `route`
    over the batch; a step where every gate is closed skips attention entirely.
    """
    cfg = self.config
    h = self.norm_mix(x_B1D)
    batch = h.shape[0]
    positions_B1 = jnp.full((batch, 1), position, jnp.int32)
    r = state = None
    if self.recurrence is not None:
      r, state = self.recurrence.step(h, cache.state)
    k_cache = v_cache = None
    if self.attention is not None:
      k_new, v_new = self.attention.keys_values(h, positions_B1)
      k_cache = jax.lax.dynamic_update_slice_in_dim(cache.k, k_new, position, axis=1)
      v_cache = jax.lax.dynamic_update_slice_in_dim(cache.v, v_new, position, axis=1)

    def dense_attention():
      return self.attention.attend(h, positions_B1, k_cache, v_cache)[0]

    if cfg.mixer == "attention" or (cfg.mixer == "tgn" and cfg.gate == "open"):
      y = dense_attention()
    elif cfg.mixer == "recurrent" or cfg.gate == "closed":
      y = r
    elif cfg.gate == "soft":
      prob = jax.nn.sigmoid(self.gate_head(r))
      y = r + prob[..., None] * (dense_attention() - r)
    else:
      is_open = jax.nn.sigmoid(self.gate_head(r)[:, 0]) > cfg.gate_threshold  # [B]

      def attend_rows(h_1CD, rows_1C, valid_1C):
        rows = rows_1C[0]
        h_C1D = jnp.swapaxes(h_1CD, 0, 1)
        out, _ = self.attention.attend(h_C1D, positions_B1[rows], k_cache[rows], v_cache[rows])
        return jnp.swapaxes(out, 0, 1)

      row_capacities = gate_ops.capacity_buckets(batch, _powers_of_two(batch), multiple=1)
      a = jnp.swapaxes(gate_ops.route(attend_rows, is_open[None], jnp.swapaxes(h, 0, 1),
                                      row_capacities), 0, 1)
      y = r + is_open.astype(jnp.float32)[:, None, None] * (a - r)
    x = x_B1D + y.astype(x_B1D.dtype)
    x = x + self.mlp(self.norm_mlp(x))
    return x, LayerCache(k=k_cache, v=v_cache, state=state)


def _powers_of_two(n: int) -> tuple[float, ...]:
  fractions, c = [], 1
  while c < n:
    fractions.append(c / n)
    c *= 2
  return tuple(fractions) + (1.0,)
