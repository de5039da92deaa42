"""Recurrences: parallel == sequential, one-step decoding == full scan, GRU == torch equations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import gru_reference_np, sigmoid

from tgn_jax import TGNConfig
from tgn_jax.nn.recurrence import GRU, MinGRU
from tgn_jax.ops import recurrence as rec


def randn(seed, *shape):
  return jax.random.normal(jax.random.key(seed), shape)


def test_linear_recurrence_parallel_equals_sequential():
  a = jax.random.uniform(jax.random.key(0), (3, 50, 7))
  b = randn(1, 3, 50, 7)
  h0 = randn(2, 3, 7)
  par = rec.linear_recurrence(a, b, h0)
  seq = rec.linear_recurrence(a, b, h0, parallel=False)
  np.testing.assert_allclose(par, seq, rtol=1e-5, atol=1e-5)
  # and both equal the definition, in float64
  h = np.asarray(h0, np.float64)
  for t in range(50):
    h = np.asarray(a[:, t], np.float64) * h + np.asarray(b[:, t], np.float64)
    np.testing.assert_allclose(par[:, t], h, rtol=1e-4, atol=1e-5)


class JitAndEagerTest(chex.TestCase):
  """Core equalities, each run eagerly and under jax.jit (chex.variants)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_min_gru_parallel_sequential_and_step_agree(self):
    gate, cand = randn(3, 2, 33, 5), randn(4, 2, 33, 5)
    par = self.variant(lambda g, c: rec.min_gru(g, c))(gate, cand)
    seq = self.variant(lambda g, c: rec.min_gru(g, c, parallel=False))(gate, cand)
    np.testing.assert_allclose(par, seq, rtol=1e-5, atol=1e-6)
    step = self.variant(rec.min_gru_step)
    h = jnp.zeros((2, 5))
    for t in range(33):
      h = step(gate[:, t], cand[:, t], h)
      np.testing.assert_allclose(par[:, t], h, rtol=1e-5, atol=1e-6)
    z = sigmoid(np.asarray(gate[:, 0], np.float64))
    np.testing.assert_allclose(par[:, 0], z * np.asarray(cand[:, 0]), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gru_matches_torch_equations_and_step(self):
    d = 6
    x_proj, w_hh, b_hh = randn(7, 2, 20, 3 * d), 0.5 * randn(8, d, 3 * d), randn(9, 3 * d)
    h0 = randn(10, 2, d)
    out = self.variant(rec.gru)(x_proj, w_hh, b_hh, h0)
    np.testing.assert_allclose(out, gru_reference_np(x_proj, w_hh, b_hh, h0), rtol=1e-5, atol=1e-5)
    step = self.variant(rec.gru_step)
    h = h0
    for t in range(20):
      h = step(x_proj[:, t], w_hh, b_hh, h)
    np.testing.assert_allclose(h, out[:, -1], rtol=1e-5, atol=1e-6)


def test_min_gru_bfloat16_inputs_accumulate_in_float32():
  gate, cand = randn(5, 2, 64, 8), randn(6, 2, 64, 8)
  out = rec.min_gru(gate.astype(jnp.bfloat16), cand.astype(jnp.bfloat16))
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  ref = rec.min_gru(
    gate.astype(jnp.bfloat16).astype(jnp.float32), cand.astype(jnp.bfloat16).astype(jnp.float32)
  )
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_modules_one_token_at_a_time_equals_full_scan():
  """The decoding form (T = 1 from the previous state) and chunks with a carried state
  give the full scan's states."""
  config = TGNConfig(vocab_size=10, d_model=8, n_heads=2)
  x = randn(11, 2, 15, 8)
  for cls in (MinGRU, GRU):
    module = cls(config, rngs=nnx.Rngs(0))
    full, last = module(x)
    np.testing.assert_array_equal(last, full[:, -1])
    h = None
    for t in range(15):
      out, h = module(x[:, t : t + 1], h)
      np.testing.assert_allclose(out[:, 0], full[:, t], rtol=1e-5, atol=1e-5, err_msg=cls.__name__)
    first, h = module(x[:, :6])
    rest, _ = module(x[:, 6:], h)
    np.testing.assert_allclose(jnp.concatenate([first, rest], axis=1), full, rtol=1e-5, atol=1e-5)


def test_gru_init_follows_torch_bounds():
  module = GRU(TGNConfig(vocab_size=10, d_model=16, n_heads=2), rngs=nnx.Rngs(0))
  bound = 1 / np.sqrt(16)
  for p in (
    module.w_hh[...],
    module.b_hh[...],
    module.in_proj.kernel[...],
    module.in_proj.bias[...],
  ):
    assert float(jnp.max(jnp.abs(p))) <= bound and float(jnp.std(p)) > bound / 3


# Each op called with one argument of the wrong shape (x is a good [B, T, D] = [2, 5, 4]).
BAD_CALLS = {
  "linear_recurrence": (
    lambda x: rec.linear_recurrence(x, x[:, :3]),
    r"linear_recurrence: a and b must have one shape",
  ),
  "min_gru_rank": (
    lambda x: rec.min_gru(x[0], x[0]),
    r"min_gru: gate_logits and candidate must be \[B, T, D\]",
  ),
  "min_gru_h0": (lambda x: rec.min_gru(x, x, jnp.zeros((2, 3))), r"min_gru: h0 must be \[B, D\]"),
  "min_gru_step": (
    lambda x: rec.min_gru_step(x[:, 0], x[:, 0], x[:, 0, :3]),
    r"min_gru_step: gate_logits, candidate and h must all be \[B, D\]",
  ),
  "gru_x_proj": (
    lambda x: rec.gru(x, jnp.zeros((4, 12)), jnp.zeros(12)),
    r"gru: x_proj must be \[B, T, 3D\]",
  ),
  "gru_w_hh": (
    lambda x: rec.gru(jnp.zeros((2, 5, 12)), jnp.zeros((12, 4)), jnp.zeros(12)),
    r"gru: w_hh must be \[D, 3D\]",
  ),
  "gru_step_b_hh": (
    lambda x: rec.gru_step(jnp.zeros((2, 12)), jnp.zeros((4, 12)), jnp.zeros(4), x[:, 0]),
    r"gru_step: b_hh must be \[3D\]",
  ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_shapes_name_the_op_and_argument(case):
  call, match = BAD_CALLS[case]
  with pytest.raises(ValueError, match=match):
    call(randn(12, 2, 5, 4))
