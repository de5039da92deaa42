"""Multi-head Gibbs attention: projections, RoPE and a temperature per head."""

from __future__ import annotations

import math
from typing import Literal, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from tgn_jax.config import TGNConfig
from tgn_jax.nn.layers import linear
from tgn_jax.ops.attention import ThermoStats, gibbs_attention
from tgn_jax.ops.rope import apply_rope


class GibbsAttention(nnx.Module):
  """Causal softmax attention with grouped KV heads.

  Keys and values are computed for every token (`keys_values`); queries, the
  attention itself and the output projection for any subset of tokens (`attend`),
  so the gated block can run the expensive part on gathered tokens only.
  """

  def __init__(self, config: TGNConfig, *, rngs: nnx.Rngs):
    self.config = config
    d, n, kv, h = config.d_model, config.n_heads, config.kv_heads, config.head_dim
    self.q_proj = linear(config, d, n * h, rngs=rngs)
    self.kv_proj = linear(config, d, 2 * kv * h, rngs=rngs)
    self.o_proj = linear(config, n * h, d, rngs=rngs)
    if config.temperature == "learned":
      self.log_temperature = nnx.Param(jnp.full((n,), 0.5 * math.log(h), jnp.float32))

  def temperature(self):
    """None (sqrt(head_dim)), a float, or the learned float32 [N] temperatures."""
    if self.config.temperature == "learned":
      return jnp.exp(self.log_temperature[...])
    return self.config.temperature

  def keys_values(self, x_BTD: jax.Array, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys (rotated) and values, each [B, T, K, H]."""
    cfg = self.config
    batch, seq_len, _ = x_BTD.shape
    kv = self.kv_proj(x_BTD).reshape(batch, seq_len, 2, cfg.kv_heads, cfg.head_dim)
    k, v = kv[:, :, 0], kv[:, :, 1]
    if cfg.rope:
      k = apply_rope(k, positions_BT, cfg.rope_base)
    return k, v

  def attend(
    self,
    x_BCD: jax.Array,
    positions_BC: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: Literal["causal", "positions", "lengths"] = "positions",
    q_lengths: Optional[jax.Array] = None,
    kv_positions: Optional[jax.Array] = None,
    kv_lengths: Optional[jax.Array] = None,
    return_stats: bool = False,
  ) -> tuple[jax.Array, Optional[ThermoStats]]:
    """Attention output [B, C, D] for queries at positions_BC over keys k, v [B, S, K, H].

    mask: "causal" (the queries are the whole sequence 0..S-1: plain causal masking, the
      fast path), "positions" (gathered queries: key j is visible iff its position,
      kv_positions[j] or j, is <= the query's) or "lengths" (decoding: row b sees its
      first kv_lengths[b] keys).
    q_lengths / kv_positions / kv_lengths: as in gibbs_attention.
    Returns (output, zero where a query sees no key; ThermoStats [B, C, N] or None).
    """
    cfg = self.config
    batch, count, _ = x_BCD.shape
    q = self.q_proj(x_BCD).reshape(batch, count, cfg.n_heads, cfg.head_dim)
    if cfg.rope:
      q = apply_rope(q, positions_BC, cfg.rope_base)
    result = gibbs_attention(
      q,
      k,
      v,
      temperature=self.temperature(),
      is_causal=mask != "lengths",
      q_positions=positions_BC if mask == "positions" else None,
      q_lengths=q_lengths,
      kv_positions=kv_positions,
      kv_lengths=kv_lengths,
      return_stats=return_stats,
      implementation=cfg.attention_impl,
    )
    out, stats = result if return_stats else (result, None)
    return self.o_proj(out.reshape(batch, count, cfg.n_heads * cfg.head_dim)), stats
