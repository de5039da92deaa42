"""Gate ops: straight-through values and gradients, exploration, and routing that
computes only the selected tokens yet equals the dense computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgn_jax.ops import gate as gate_ops
from tgn_jax.ops.attention import gibbs_attention


def test_straight_through_value_and_gradient():
  prob = jnp.array([[0.2, 0.7, 0.4]])
  is_open = prob > 0.5
  weight = jnp.array([[0.0, 1.0, 5.0]])
  g = gate_ops.straight_through(prob, is_open, weight)
  np.testing.assert_array_equal(g, [[0.0, 1.0, 0.0]])
  upstream = jnp.array([[1.0, 2.0, 3.0]])
  grad = jax.grad(lambda p: jnp.sum(gate_ops.straight_through(p, is_open, weight) * upstream))(prob)
  np.testing.assert_allclose(grad, weight * upstream)


def test_logit_spread_is_the_std_at_least_one_without_gradient():
  wide = jnp.array([[-300.0, 10.0], [40.0, 90.0]])
  np.testing.assert_allclose(gate_ops.logit_spread(wide), np.std(np.asarray(wide)), rtol=1e-6)
  np.testing.assert_array_equal(gate_ops.logit_spread(jnp.array([[0.1, -0.2, 0.3]])), 1.0)
  np.testing.assert_array_equal(jax.grad(lambda x: gate_ops.logit_spread(x))(wide), 0.0)


def test_level_free_keeps_the_value_and_removes_the_gradients_mean():
  logit = jnp.array([[-3.0, 0.5, 2.0], [7.0, -1.0, 4.0]])
  upstream = jnp.array([[1.0, 2.0, 3.0], [0.5, -4.0, 10.0]])
  value, vjp = jax.vjp(gate_ops.level_free, logit)
  np.testing.assert_array_equal(value, logit)
  (grad,) = vjp(upstream)
  np.testing.assert_allclose(grad, upstream - np.mean(np.asarray(upstream)), atol=1e-6)
  np.testing.assert_allclose(float(jnp.sum(grad)), 0.0, atol=1e-5)


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


def test_attention_over_gathered_open_keys_equals_masked_dense_attention():
  """kv="open": queries attending the open tokens' keys gathered with their positions
  equal dense causal attention in which closed keys are masked out (an independent
  boolean mask), in values and gradients."""
  batch, seq_len, heads, head_dim = 3, 24, 2, 8
  kq, kk, kv, ko = jax.random.split(jax.random.key(11), 4)
  q, k, v = (jax.random.normal(key, (batch, seq_len, heads, head_dim)) for key in (kq, kk, kv))
  is_open = jax.random.bernoulli(ko, 0.3, (batch, seq_len)).at[:, 0].set(True)
  rows = jnp.arange(batch)[:, None]

  def gathered(q, k, v):
    slots = gate_ops.token_slots(is_open, 16)
    return gibbs_attention(
      q,
      k[rows, slots.positions_BC],
      v[rows, slots.positions_BC],
      q_positions=jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len)),
      kv_positions=slots.positions_BC,
      kv_lengths=slots.lengths_B,
    )

  def masked(q, k, v):
    mask = (jnp.tril(jnp.ones((seq_len, seq_len), bool))[None] & is_open[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask)

  np.testing.assert_allclose(gathered(q, k, v), masked(q, k, v), rtol=1e-5, atol=1e-6)
  w = jax.random.normal(jax.random.key(12), q.shape)
  for a, b in zip(
    jax.grad(lambda *x: jnp.sum(gathered(*x) * w), argnums=(0, 1, 2))(q, k, v),
    jax.grad(lambda *x: jnp.sum(masked(*x) * w), argnums=(0, 1, 2))(q, k, v),
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_exploration_fraction_is_a_budget_relative_to_the_open_tokens():
  is_open = jnp.zeros((4, 100), bool).at[:, :10].set(True)  # 10% open
  fraction = gate_ops.exploration_fraction(is_open, 0.05, 0.002)
  np.testing.assert_allclose(fraction, 0.05 * 40 / 360, rtol=1e-6)  # 5% more attention work
  none_open = jnp.zeros((4, 100), bool)
  np.testing.assert_allclose(gate_ops.exploration_fraction(none_open, 0.05, 0.002), 0.002)
  all_open = jnp.ones((4, 100), bool)
  assert float(gate_ops.exploration_fraction(all_open, 0.05, 0.002)) == 1.0  # nothing closed
  explore = gate_ops.exploration_mask(~is_open, fraction, jax.random.key(0))
  extra = float(jnp.sum(explore)) / float(jnp.sum(is_open))
  assert not bool(jnp.any(explore & is_open)) and 0.0 < extra < 0.15


def expensive(x_BCD, pos_BC, lengths_B):
  """A per-token function that also depends on the position."""
  return jnp.tanh(x_BCD * 2.0) + pos_BC[..., None].astype(x_BCD.dtype)


def dense_expensive(x, selected):
  pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
  return jnp.where(selected[..., None], expensive(x, pos, None), 0.0)


PATTERNS = {
  "random": lambda b, t: jax.random.bernoulli(jax.random.key(4), 0.3, (b, t)),
  "none": lambda b, t: jnp.zeros((b, t), bool),
  "all": lambda b, t: jnp.ones((b, t), bool),
  "one_row_full": lambda b, t: jnp.zeros((b, t), bool).at[1].set(True),
}


def test_capacity_tokens():
  assert gate_ops.capacity_tokens(100, 0.25) == 25
  assert gate_ops.capacity_tokens(2048, 0.1, multiple=64) == 256
  assert gate_ops.capacity_tokens(32, 0.0625, multiple=64) == 32
  assert gate_ops.capacity_tokens(5, 0.01) == 1
  assert gate_ops.capacity_tokens(7, 1.0, multiple=4) == 7
  with pytest.raises(ValueError, match="capacity fraction"):
    gate_ops.capacity_tokens(8, 0.0)


def test_token_slots_hold_positions_in_order_with_padding_at_zero():
  selected = jnp.array([[0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
  slots = gate_ops.token_slots(selected, 3)
  np.testing.assert_array_equal(slots.positions_BC, [[1, 3, 4], [0, 0, 0], [0, 1, 2]])
  np.testing.assert_array_equal(slots.lengths_B, [3, 0, 3])
  np.testing.assert_array_equal(slots.counts_B, [3, 0, 5])  # row 2 overflows
  # Scatter targets: sorted and unique, out of range (T + slot) in padding slots.
  np.testing.assert_array_equal(slots.scatter_BC, [[1, 3, 4], [6, 7, 8], [0, 1, 2]])


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_route_equals_dense_masked_values_and_gradients(pattern):
  batch, seq_len, d = 3, 20, 4
  x = jax.random.normal(jax.random.key(3), (batch, seq_len, d))
  sel = PATTERNS[pattern](batch, seq_len)
  capacity = max(1, int(jnp.max(jnp.sum(sel, axis=1))))  # the busiest row exactly fills it

  def sparse(x):
    out, counts = gate_ops.route(expensive, sel, x, capacity)
    return out

  np.testing.assert_allclose(jax.jit(sparse)(x), dense_expensive(x, sel), rtol=1e-6, atol=1e-5)
  w = jax.random.normal(jax.random.key(5), (batch, seq_len, d))
  g_sparse = jax.grad(lambda x: jnp.sum(sparse(x) * w))(x)
  g_dense = jax.grad(lambda x: jnp.sum(dense_expensive(x, sel) * w))(x)
  np.testing.assert_allclose(g_sparse, g_dense, rtol=1e-6, atol=1e-5)


def test_route_at_exactly_the_capacity_and_one_over():
  """A row whose count equals the capacity is complete; one more token overflows: the
  counts say so, and the first C tokens are still computed (the caller redoes the call)."""
  x = jax.random.normal(jax.random.key(0), (2, 16, 3))
  sel = jnp.zeros((2, 16), bool).at[0, 2:6].set(True).at[1, 5].set(True)
  out, counts = gate_ops.route(expensive, sel, x, 4)
  np.testing.assert_array_equal(counts, [4, 1])
  np.testing.assert_allclose(out, dense_expensive(x, sel), rtol=1e-6, atol=1e-6)
  over = sel.at[0, 10].set(True)
  out, counts = gate_ops.route(expensive, over, x, 4)
  np.testing.assert_array_equal(counts, [5, 1])
  np.testing.assert_allclose(out, dense_expensive(x, sel), rtol=1e-6, atol=1e-6)  # token 10 missing
  report = gate_ops.count_report(over, 4 / 16, segment_len=16)
  assert bool(report.overflow) and float(report.needed) == 5 / 16
  report = gate_ops.count_report(sel, 4 / 16, segment_len=16)
  assert not bool(report.overflow) and float(report.needed) == 4 / 16


def test_route_is_straight_line_code():
  """No conditional in the compiled gradient, no rematerialisation in its jaxpr, and fn
  traced once: the routed work is not recomputed in the backward pass."""
  x = jax.random.normal(jax.random.key(0), (2, 32, 4))
  sel = jax.random.bernoulli(jax.random.key(1), 0.3, (2, 32))
  traced = []

  def fn(x_BCD, pos_BC, lengths_B):
    traced.append(x_BCD.shape)
    return jnp.tanh(x_BCD) * pos_BC[..., None]

  loss = lambda x: jnp.sum(
    gate_ops.route_causal_segments(lambda x, p, n, end: fn(x, p, n), sel, x, 0.5, segment_len=16)[0]
    ** 2
  )
  grad = jax.jit(jax.grad(loss))
  assert " conditional(" not in grad.lower(x).compile().as_text()
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(x))
  assert "remat" not in jaxpr and "checkpoint" not in jaxpr and "cond[" not in jaxpr
  assert traced and all(shape == (2, 8, 4) for shape in traced)


def test_route_rejects_bad_capacity():
  with pytest.raises(ValueError, match="capacity"):
    gate_ops.route(expensive, jnp.ones((1, 8), bool), jnp.ones((1, 8, 2)), 9)
  with pytest.raises(ValueError, match="capacity"):
    gate_ops.route(expensive, jnp.ones((1, 8), bool), jnp.ones((1, 8, 2)), 0)


@pytest.mark.parametrize("segment_len", [1, 5, 7, 20, 64])
def test_route_causal_segments_equals_dense(segment_len):
  """Per-segment routing with absolute positions and key prefixes equals the dense causal sum."""
  batch, seq_len = 2, 20
  keys = jax.random.normal(jax.random.key(6), (batch, seq_len))
  x = jax.random.normal(jax.random.key(7), (batch, seq_len, 1))
  sel = jax.random.bernoulli(jax.random.key(8), 0.4, (batch, seq_len))

  def prefix_sum(x_BC1, pos_BC, lengths_B, end):
    visible = jnp.arange(end)[None, None, :] <= pos_BC[:, :, None]
    return x_BC1 * jnp.sum(jnp.where(visible, keys[:, None, :end], 0.0), axis=-1, keepdims=True)

  sparse = jax.jit(lambda x: gate_ops.route_causal_segments(prefix_sum, sel, x, 1.0, segment_len))
  dense = jnp.where(sel[..., None], x * jnp.cumsum(keys, axis=1)[..., None], 0.0)
  out, report = sparse(x)
  np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-5)
  assert not bool(report.overflow)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_routed_attention_equals_dense_attention(pattern):
  """Gathered queries attending with their positions and per-row lengths, per segment,
  equal rows of dense causal attention, in values and in gradients (q, k, v)."""
  batch, seq_len, heads, head_dim = 3, 24, 2, 8
  kq, kk, kv = jax.random.split(jax.random.key(9), 3)
  q, k, v = (jax.random.normal(key, (batch, seq_len, heads, head_dim)) for key in (kq, kk, kv))
  sel = PATTERNS[pattern](batch, seq_len)
  weights = jax.random.normal(jax.random.key(10), q.shape)

  def sparse(q, k, v):
    out, report = gate_ops.route_causal_segments(
      lambda q_BC, pos, lengths, end: gibbs_attention(
        q_BC, k[:, :end], v[:, :end], q_positions=pos, q_lengths=lengths
      ),
      sel,
      q,
      1.0 if pattern in ("all", "one_row_full") else 0.75,
      segment_len=8,
    )
    return jnp.sum(out * weights), report

  def dense(q, k, v):
    out = jnp.where(sel[..., None, None], gibbs_attention(q, k, v), 0.0)
    return jnp.sum(out * weights)

  (value, report), grads = jax.value_and_grad(sparse, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  assert not bool(report.overflow)
  np.testing.assert_allclose(value, dense(q, k, v), rtol=1e-5)
  for g_sparse, g_dense in zip(grads, jax.grad(dense, argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g_sparse, g_dense, rtol=1e-5, atol=1e-5)


def test_capacity_ladder_moves_up_at_once_and_down_after_a_window():
  ladder = gate_ops.CapacityLadder((0.125, 0.25, 0.5, 1.0), headroom=0.1, window=3)
  assert ladder.current == 1.0  # nothing known yet: every token
  assert not ladder.observe(False, 0.1)
  assert ladder.current == 0.125  # 0.1 * 1.1 fits
  assert not ladder.observe(False, 0.12)
  assert ladder.current == 0.25  # 0.12 * 1.1 > 0.125: headroom
  assert ladder.observe(True, 0.6)  # overflowed: redo ...
  assert ladder.current == 1.0  # ... at a capacity that holds what was needed
  assert not ladder.observe(False, 0.05) and ladder.current == 1.0  # 0.6 still in the window
  assert not ladder.observe(False, 0.05) and ladder.current == 1.0
  assert not ladder.observe(False, 0.05) and ladder.current == 0.125  # the window forgot it
  resumed = gate_ops.CapacityLadder(
    (0.125, 0.25, 0.5, 1.0), headroom=0.1, window=3, recent=ladder.recent
  )
  assert resumed.recent == ladder.recent and resumed.current == ladder.current
  # An overflow whose reported need is too low (later layers saw wrong activations)
  # still moves the ladder up, so redoing ends.
  low = gate_ops.CapacityLadder((0.125, 0.25, 0.5, 1.0), headroom=0.0, recent=[0.25])
  assert low.observe(True, 0.2) and low.current == 0.5
  for bad in [(0.5,), (0.5, 0.25, 1.0), (0.0, 1.0), ()]:
    with pytest.raises(ValueError, match="fractions"):
      gate_ops.CapacityLadder(bad)


def test_distinct_fractions_drop_duplicate_programs():
  buckets = (0.0625, 0.125, 0.15625, 0.1875, 0.25, 0.375, 0.5, 0.75, 1.0)
  # 64 tokens in tiles of 8: 0.0625 and 0.125 both hold 8 slots, 0.15625 to 0.25 hold 16.
  assert gate_ops.distinct_fractions(buckets, 64, 64, 8) == (0.125, 0.25, 0.375, 0.5, 0.75, 1.0)
  assert gate_ops.distinct_fractions(buckets, 32, 8192, 64) == (1.0,)  # all dense
  assert gate_ops.gathered_slots(64, 0.125, 32, 8) == 16  # two segments of 8 slots
  assert gate_ops.computes_densely(64, 0.9, 64, 8)


def test_oracle_gate_opens_exactly_the_scored_positions_of_the_last_layer():
  mask_BT = jnp.array([[0, 1, 0, 1], [1, 0, 0, 0]], jnp.float32)
  open_LBT = gate_ops.oracle_gate(mask_BT, 3)
  assert open_LBT.shape == (3, 2, 4) and open_LBT.dtype == jnp.bool_
  assert not open_LBT[:2].any()
  np.testing.assert_array_equal(open_LBT[2], mask_BT > 0)


def test_random_gate_opens_each_layer_at_its_rate():
  open_LBT = gate_ops.random_gate(jax.random.key(0), jnp.array([0.0, 0.1, 0.5]), (64, 512))
  rates = np.asarray(open_LBT.mean(axis=(1, 2)))
  np.testing.assert_allclose(rates, [0.0, 0.1, 0.5], atol=0.01)
  other = gate_ops.random_gate(jax.random.key(1), jnp.array([0.5, 0.5, 0.5]), (4, 64))
  assert not np.array_equal(other[0], other[1])  # layers draw independently
