"""Recurrences: parallel == sequential, one-step decoding == full scan, GRU == torch equations."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tgn_jax import TGNConfig
from tgn_jax.nn.recurrence import GRU, MinGRU
from tgn_jax.ops import recurrence as rec
from reference import gru_reference_np, sigmoid


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


def test_min_gru_parallel_sequential_and_step_agree():
  gate, cand = randn(3, 2, 33, 5), randn(4, 2, 33, 5)
  par = rec.min_gru(gate, cand)
  seq = rec.min_gru(gate, cand, parallel=False)
  np.testing.assert_allclose(par, seq, rtol=1e-5, atol=1e-6)
  h = jnp.zeros((2, 5))
  for t in range(33):
    h = rec.min_gru_step(gate[:, t], cand[:, t], h)
    np.testing.assert_allclose(par[:, t], h, rtol=1e-5, atol=1e-6)
  z = sigmoid(np.asarray(gate[:, 0], np.float64))
  np.testing.assert_allclose(par[:, 0], z * np.asarray(cand[:, 0]), rtol=1e-5)


def test_min_gru_bfloat16_inputs_accumulate_in_float32():
  gate, cand = randn(5, 2, 64, 8), randn(6, 2, 64, 8)
  out = rec.min_gru(gate.astype(jnp.bfloat16), cand.astype(jnp.bfloat16))
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  ref = rec.min_gru(gate.astype(jnp.bfloat16).astype(jnp.float32),
                    cand.astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_gru_matches_torch_equations_and_step():
  d = 6
  x_proj, w_hh, b_hh, h0 = randn(7, 2, 20, 3 * d), 0.5 * randn(8, d, 3 * d), randn(9, 3 * d), randn(10, 2, d)
  out = rec.gru(x_proj, w_hh, b_hh, h0)
  np.testing.assert_allclose(out, gru_reference_np(x_proj, w_hh, b_hh, h0), rtol=1e-5, atol=1e-5)
  h = h0
  for t in range(20):
    h = rec.gru_step(x_proj[:, t], w_hh, b_hh, h)
  np.testing.assert_allclose(h, out[:, -1], rtol=1e-5, atol=1e-6)


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
      out, h = module(x[:, t:t + 1], h)
      np.testing.assert_allclose(out[:, 0], full[:, t], rtol=1e-5, atol=1e-5, err_msg=cls.__name__)
    first, h = module(x[:, :6])
    rest, _ = module(x[:, 6:], h)
    np.testing.assert_allclose(jnp.concatenate([first, rest], axis=1), full, rtol=1e-5, atol=1e-5)


def test_gru_init_follows_torch_bounds():
  module = GRU(TGNConfig(vocab_size=10, d_model=16, n_heads=2), rngs=nnx.Rngs(0))
  bound = 1 / np.sqrt(16)
  for p in (module.w_hh[...], module.b_hh[...], module.in_proj.kernel[...], module.in_proj.bias[...]):
    assert float(jnp.max(jnp.abs(p))) <= bound and float(jnp.std(p)) > bound / 3
