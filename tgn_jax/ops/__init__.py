"""Pure array functions (no Flax): attention and its observables, recurrences, gate and routing."""

from tgn_jax.ops.attention import ThermoStats, attention_stats, default_positions, gibbs_attention
from tgn_jax.ops.gate import (bucket_index, capacity_buckets, exploration_mask, hard_gate, route,
                              route_causal_segments, straight_through)
from tgn_jax.ops.recurrence import gru, gru_step, linear_recurrence, min_gru, min_gru_step
from tgn_jax.ops.rope import apply_rope

__all__ = [
    "ThermoStats", "attention_stats", "default_positions", "gibbs_attention",
    "bucket_index", "capacity_buckets", "exploration_mask", "hard_gate", "route",
    "route_causal_segments",
    "straight_through", "gru", "gru_step", "linear_recurrence", "min_gru", "min_gru_step",
    "apply_rope",
]
