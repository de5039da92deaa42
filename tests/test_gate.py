"""Gate ops: straight-through values and gradients, exploration, and routing that
computes only the selected tokens yet equals the dense computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgn_jax.ops import gate as gate_ops


def test_capacity_buckets():
  assert gate_ops.capacity_buckets(100, (0.0625, 0.125, 0.25, 0.5, 1.0)) == (0, 8, 16, 32, 56, 100)
  assert gate_ops.capacity_buckets(2048, (0.0625, 0.125, 0.15625, 1.0), multiple=64) == (
      0, 128, 256, 320, 2048)
  assert gate_ops.capacity_buckets(32, (0.0625, 0.5, 1.0), multiple=64) == (0, 32)
  assert gate_ops.capacity_buckets(4, (0.5, 1.0), multiple=1) == (0, 2, 4)
  assert gate_ops.capacity_buckets(5, (0.01,)) == (0, 5)


def test_bucket_index_uses_the_largest_row_count():
  caps = (0, 2, 4, 8)
  sel = jnp.zeros((3, 8), bool)
  assert int(gate_ops.bucket_index(sel, caps)) == 0
  assert int(gate_ops.bucket_index(sel.at[1, :2].set(True), caps)) == 1
  assert int(gate_ops.bucket_index(sel.at[1, :3].set(True).at[0, 0].set(True), caps)) == 2
  assert int(gate_ops.bucket_index(jnp.ones((3, 8), bool), caps)) == 3


def test_straight_through_value_and_gradient():
  prob = jnp.array([[0.2, 0.7, 0.4]])
  is_open = prob > 0.5
  weight = jnp.array([[0.0, 1.0, 5.0]])
  g = gate_ops.straight_through(prob, is_open, weight)
  np.testing.assert_array_equal(g, [[0.0, 1.0, 0.0]])
  upstream = jnp.array([[1.0, 2.0, 3.0]])
  grad = jax.grad(lambda p: jnp.sum(gate_ops.straight_through(p, is_open, weight) * upstream))(prob)
  np.testing.assert_allclose(grad, weight * upstream)


def test_hard_gate_threshold_and_sampling():
  prob = jnp.full((200, 100), 0.3)
  assert not bool(jnp.any(gate_ops.hard_gate(prob)))
  sampled = gate_ops.hard_gate(prob, key=jax.random.key(0))
  assert abs(float(jnp.mean(sampled)) - 0.3) < 0.01


def test_exploration_only_among_closed_tokens():
  closed = jax.random.bernoulli(jax.random.key(1), 0.5, (100, 100))
  explore = gate_ops.exploration_mask(closed, 0.1, jax.random.key(2))
  assert not bool(jnp.any(explore & ~closed))
  assert abs(float(jnp.sum(explore) / jnp.sum(closed)) - 0.1) < 0.02
  assert not bool(jnp.any(gate_ops.exploration_mask(closed, 0.1, None)))
  assert not bool(jnp.any(gate_ops.exploration_mask(closed, 0.0, jax.random.key(2))))


def expensive(x_BCD, pos_BC, valid_BC):
  """A per-token function that also depends on the position."""
  return jnp.tanh(x_BCD * 2.0) + pos_BC[..., None].astype(x_BCD.dtype)


@pytest.mark.parametrize("pattern", ["random", "none", "all", "one_row"])
def test_route_equals_dense_masked_values_and_gradients(pattern):
  batch, seq_len, d = 3, 20, 4
  x = jax.random.normal(jax.random.key(3), (batch, seq_len, d))
  sel = {"random": jax.random.bernoulli(jax.random.key(4), 0.3, (batch, seq_len)),
         "none": jnp.zeros((batch, seq_len), bool),
         "all": jnp.ones((batch, seq_len), bool),
         "one_row": jnp.zeros((batch, seq_len), bool).at[1, 5:9].set(True)}[pattern]
  caps = gate_ops.capacity_buckets(seq_len, (0.25, 0.5, 1.0))
  pos = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))

  def sparse(x):
    return gate_ops.route(expensive, sel, x, caps)

  def dense(x):
    return jnp.where(sel[..., None], expensive(x, pos, None), 0.0)

  np.testing.assert_allclose(jax.jit(sparse)(x), dense(x), rtol=1e-6, atol=1e-5)
  w = jax.random.normal(jax.random.key(5), (batch, seq_len, d))
  g_sparse = jax.grad(lambda x: jnp.sum(sparse(x) * w))(x)
  g_dense = jax.grad(lambda x: jnp.sum(dense(x) * w))(x)
  np.testing.assert_allclose(g_sparse, g_dense, rtol=1e-6, atol=1e-5)


def test_route_runs_only_the_chosen_capacity():
  """The expensive function runs once, at the smallest sufficient capacity, or not at all."""
  seen = []

  def record(x_BCD, pos_BC, valid_BC):
    jax.debug.callback(lambda c: seen.append(int(c)), jnp.int32(x_BCD.shape[1]))
    return x_BCD

  caps = (0, 4, 8, 16)
  f = jax.jit(lambda sel, x: gate_ops.route(record, sel, x, caps))
  x = jnp.ones((2, 16, 3))
  for count, expected in [(0, []), (3, [4]), (4, [4]), (5, [8]), (16, [16])]:
    seen.clear()
    sel = jnp.zeros((2, 16), bool).at[1, :count].set(True)
    jax.block_until_ready(f(sel, x))
    jax.effects_barrier()
    assert seen == expected, (count, seen)


def test_route_rejects_bad_capacities():
  with pytest.raises(ValueError, match="capacities"):
    gate_ops.route(expensive, jnp.ones((1, 8), bool), jnp.ones((1, 8, 2)), (0, 4))


@pytest.mark.parametrize("segment_len", [1, 5, 7, 20, 64])
def test_route_causal_segments_equals_dense(segment_len):
  """Per-segment routing with absolute positions and key prefixes equals the dense causal sum."""
  batch, seq_len = 2, 20
  keys = jax.random.normal(jax.random.key(6), (batch, seq_len))
  x = jax.random.normal(jax.random.key(7), (batch, seq_len, 1))
  sel = jax.random.bernoulli(jax.random.key(8), 0.4, (batch, seq_len))

  def prefix_sum(x_BC1, pos_BC, valid_BC, end):
    visible = jnp.arange(end)[None, None, :] <= pos_BC[:, :, None]
    return x_BC1 * jnp.sum(jnp.where(visible, keys[:, None, :end], 0.0), axis=-1, keepdims=True)

  sparse = jax.jit(lambda x: gate_ops.route_causal_segments(prefix_sum, sel, x, (0.5, 1.0),
                                                            segment_len))
  dense = jnp.where(sel[..., None], x * jnp.cumsum(keys, axis=1)[..., None], 0.0)
  np.testing.assert_allclose(sparse(x), dense, rtol=1e-5, atol=1e-5)


def test_route_gradient_saves_no_per_capacity_residuals():
  """The backward pass keeps the branch inputs, not every capacity's intermediates: the
  residuals do not grow with the number of buckets (a differentiated lax.switch would
  hold a zero-filled copy of each branch's residuals)."""
  batch, seq_len, d = 2, 64, 8
  x = jax.random.normal(jax.random.key(0), (batch, seq_len, d))
  sel = jax.random.bernoulli(jax.random.key(1), 0.2, (batch, seq_len))
  weight = jax.random.normal(jax.random.key(2), (d, d))

  def expensive_matmul(x_BCD, pos_BC, valid_BC):
    hidden = jnp.tanh(x_BCD @ weight)  # [B, C, D] intermediates, saved unless recomputed
    return jnp.tanh(hidden @ weight) * pos_BC[..., None]

  def residual_bytes(fractions):
    caps = gate_ops.capacity_buckets(seq_len, fractions, multiple=1)
    _, pullback = jax.vjp(lambda x: gate_ops.route(expensive_matmul, sel, x, caps), x)
    return sum(leaf.nbytes for leaf in jax.tree.leaves(pullback))

  few = residual_bytes((0.5, 1.0))
  many = residual_bytes((0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0))
  assert many <= few * 1.1, (few, many)
