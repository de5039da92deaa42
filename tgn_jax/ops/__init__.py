"""Pure array functions (no Flax): attention and its observables, recurrences, gate and routing."""

from tgn_jax.ops.attention import ThermoStats, attention_stats, default_positions, gibbs_attention
from tgn_jax.ops.gate import (
  CapacityLadder,
  RouteReport,
  Slots,
  capacity_tokens,
  computes_densely,
  count_report,
  distinct_fractions,
  exploration_mask,
  gathered_slots,
  hard_gate,
  level_free,
  route,
  route_causal_segments,
  segment_bounds,
  straight_through,
  token_slots,
)
from tgn_jax.ops.recurrence import gru, gru_step, linear_recurrence, min_gru, min_gru_step
from tgn_jax.ops.rope import apply_rope

__all__ = [
  "ThermoStats",
  "attention_stats",
  "default_positions",
  "gibbs_attention",
  "CapacityLadder",
  "RouteReport",
  "Slots",
  "capacity_tokens",
  "computes_densely",
  "count_report",
  "distinct_fractions",
  "exploration_mask",
  "gathered_slots",
  "hard_gate",
  "level_free",
  "route",
  "route_causal_segments",
  "segment_bounds",
  "straight_through",
  "token_slots",
  "gru",
  "gru_step",
  "linear_recurrence",
  "min_gru",
  "min_gru_step",
  "apply_rope",
]
