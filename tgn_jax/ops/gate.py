"""The gate between the inertia and geometry channels, and token routing.

A hard gate is 0/1 in the forward pass with a straight-through gradient. The
expensive channel is evaluated only at the tokens that need it: `route` gathers
them into a static capacity, picked by `lax.switch` from a few buckets on the
batch's largest count (bucket 0 skips the work entirely), and scatters the result
back. No selected token is ever dropped, so the result equals the dense computation.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any


def hard_gate(prob_BT: Array, *, threshold: float = 0.5, key: Optional[Array] = None) -> Array:
  """The open/closed decision, bool [B, T]: prob > threshold, or Bernoulli(prob) given a key."""
  if key is not None:
    return jax.random.bernoulli(key, prob_BT.astype(jnp.float32))
  return prob_BT > threshold


def exploration_mask(closed_BT: Array, fraction: float, key: Optional[Array]) -> Array:
  """A random `fraction` of the closed tokens, bool [B, T]; none without a key."""
  if key is None or fraction <= 0.0:
    return jnp.zeros_like(closed_BT, dtype=bool)
  return closed_BT & jax.random.bernoulli(key, fraction, closed_BT.shape)


def straight_through(prob_BT: Array, open_BT: Array, grad_weight_BT: Array) -> Array:
  """A gate whose value is open_BT (0/1) and whose derivative in prob is grad_weight_BT.

  float32 [B, T]. With weight 1 this is the usual straight-through estimator.
  """
  prob = prob_BT.astype(jnp.float32)
  return open_BT.astype(jnp.float32) + grad_weight_BT * (prob - jax.lax.stop_gradient(prob))


def capacity_buckets(seq_len: int, fractions: Sequence[float], multiple: int = 8) -> tuple[int, ...]:
  """Static capacities (0, c_1, ..., seq_len) for `route`: each fraction of seq_len
  rounded up to a multiple of `multiple` and capped at seq_len."""
  caps = {min(seq_len, multiple * math.ceil(f * seq_len / multiple)) for f in fractions}
  caps.add(seq_len)
  caps.discard(0)
  return (0,) + tuple(sorted(caps))


def bucket_index(selected_BT: Array, capacities: Sequence[int]) -> Array:
  """Index of the smallest capacity holding every row's selected count, int32 scalar."""
  count = jnp.max(jnp.sum(selected_BT, axis=1, dtype=jnp.int32))
  return jnp.sum(count > jnp.asarray(capacities, jnp.int32), dtype=jnp.int32)


def route(fn: Callable[..., PyTree], selected_BT: Array, operands: PyTree,
          capacities: Sequence[int]) -> PyTree:
  """Evaluates fn at the selected tokens only; zeros elsewhere.

  Args:
    fn: fn(gathered, positions_BC, valid_BC) -> pytree of [B, C, ...] arrays, where
      `gathered` is `operands` gathered at the selected tokens in increasing position
      order, positions_BC their int32 positions, valid_BC False in padding slots
      (whose outputs are discarded). fn may close over arrays (weights, keys).
    selected_BT: bool [B, T].
    operands: pytree of [B, T, ...] arrays.
    capacities: increasing static ints from `capacity_buckets` (first 0, last >= T).

  Returns:
    fn's outputs scattered to [B, T, ...], zero at tokens not selected.

  Under differentiation the taken branch is recomputed in the backward pass.
  """
  batch, seq_len = selected_BT.shape
  capacities = tuple(int(c) for c in capacities)
  if capacities[0] != 0 or capacities[-1] < seq_len or list(capacities) != sorted(set(capacities)):
    raise ValueError(f"capacities must increase from 0 to at least T={seq_len}, got {capacities}")
  rows = jnp.arange(batch)[:, None]

  def gathered_branch(capacity: int):
    def branch(selected, operands):
      positions = jax.vmap(lambda m: jnp.nonzero(m, size=capacity, fill_value=seq_len)[0])(selected)
      valid = positions < seq_len
      clipped = jnp.minimum(positions, seq_len - 1).astype(jnp.int32)
      outputs = fn(jax.tree.map(lambda x: x[rows, clipped], operands), clipped, valid)
      return jax.tree.map(
          lambda y: jnp.zeros((batch, seq_len) + y.shape[2:], y.dtype).at[rows, positions].set(
              y, mode="drop"), outputs)
    return branch

  # Each branch is rematerialised: a differentiated lax.switch saves the residuals of
  # every branch, zero-filled when not taken, and with capacity-sized residuals that
  # costs more than the attention it skips. Checkpointed branches save only their
  # inputs, the same arrays in every branch, and the backward pass recomputes the
  # taken branch alone.
  branches = [jax.checkpoint(gathered_branch(c)) for c in capacities[1:]]
  out_shapes = jax.eval_shape(branches[0], selected_BT, operands)

  def skip(selected, operands):
    del selected, operands
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shapes)

  index = bucket_index(selected_BT, capacities)
  return jax.lax.switch(index, [skip] + branches, selected_BT, operands)


def route_causal_segments(fn: Callable[..., PyTree], selected_BT: Array, operands: PyTree,
                          fractions: Sequence[float], segment_len: int,
                          multiple: int = 8) -> PyTree:
  """`route` run separately on consecutive segments of the sequence.

  fn(gathered, positions_BC, valid_BC, segment_end) also gets the static end of the
  segment (positions are absolute), so a causal consumer such as attention reads only
  the key prefix [0, segment_end): about half the work of one gather over the whole
  sequence, and each segment picks its own capacity bucket.
  Capacities are `fractions` of the segment length rounded up to `multiple`.
  """
  seq_len = selected_BT.shape[1]
  if segment_len < 1:
    raise ValueError(f"segment_len must be positive, got {segment_len}")
  outputs = []
  for start in range(0, seq_len, segment_len):
    end = min(start + segment_len, seq_len)
    segment_fn = lambda x, pos, valid, start=start, end=end: fn(x, pos + start, valid, end)
    outputs.append(route(segment_fn, selected_BT[:, start:end],
                         jax.tree.map(lambda x: x[:, start:end], operands),
                         capacity_buckets(end - start, fractions, multiple)))
  return jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=1), *outputs)
