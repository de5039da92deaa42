"""gibbs_attention: equality with jax.nn.dot_product_attention, the thermodynamic
identities, gathered queries and bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from reference import attention_reference_np

from tgn_jax.ops import flash
from tgn_jax.ops.attention import attention_stats, gibbs_attention
from tgn_jax.ops.rope import apply_rope

FIELDS = ("log_partition", "free_energy", "internal_energy", "entropy", "specific_heat")


def qkv(
  seed, batch=2, q_len=12, k_len=12, heads=4, kv_heads=4, head_dim=8, scale=1.0, dtype=jnp.float32
):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = scale * jax.random.normal(kq, (batch, q_len, heads, head_dim))
  k = jax.random.normal(kk, (batch, k_len, kv_heads, head_dim))
  v = jax.random.normal(kv, (batch, k_len, kv_heads, head_dim))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


class JitAndEagerTest(chex.TestCase):
  """Core equalities, each run eagerly and under jax.jit (chex.variants)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(4, 2, 1)
  def test_equals_jax_dot_product_attention(self, kv_heads):
    q, k, v = qkv(0, kv_heads=kv_heads)
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    out = self.variant(gibbs_attention)(q, k, v)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_fewer_queries_than_keys_align_bottom_right(self):
    """Without q_positions the Tq < Tk queries are the last Tq positions (query i sees keys
    0..Tk - Tq + i), unlike jax.nn.dot_product_attention(is_causal=True), which aligns them
    top-left (query i sees keys 0..i) and equals q_positions = arange(Tq)."""
    q, k, v = qkv(17, q_len=3, k_len=10, kv_heads=2)
    attend = self.variant(
      lambda q, k, v, positions=None: gibbs_attention(q, k, v, q_positions=positions)
    )
    out = attend(q, k, v)
    np.testing.assert_array_equal(out, attend(q, k, v, jnp.broadcast_to(jnp.arange(7, 10), (2, 3))))
    top_left = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(
      attend(q, k, v, jnp.broadcast_to(jnp.arange(3), (2, 3))), top_left, rtol=1e-5, atol=1e-6
    )
    # Every query differs from top-left: it sees 7 more keys.
    assert float(jnp.min(jnp.max(jnp.abs(out - top_left), axis=(2, 3)))) > 0.1
    # Bottom-right, the last query sees every key, as without the causal mask.
    np.testing.assert_allclose(
      out[:, -1], gibbs_attention(q, k, v, is_causal=False)[:, -1], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("temperature", [None, 0.7, "per_head"])
def test_output_and_observables_match_float64_reference(temperature):
  q, k, v = qkv(1, kv_heads=2, scale=2.0)
  if temperature == "per_head":
    temperature = jnp.array([0.5, 1.0, 2.0, 4.0])
  out, stats = gibbs_attention(q, k, v, temperature=temperature, return_stats=True)
  t_ref = np.sqrt(8.0) if temperature is None else np.asarray(temperature)
  ref_out, ref = attention_reference_np(q, k, v, t_ref)
  np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5)
  for name in FIELDS:
    got = getattr(stats, name)
    assert got.dtype == jnp.float32 and got.shape == (2, 12, 4)
    np.testing.assert_allclose(got, ref[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_streamed_blocks_equal_single_block():
  """Chan-merged key blocks (and query blocks) give the same observables as one block."""
  q, k, _ = qkv(2, q_len=37, k_len=37, scale=3.0)
  whole = attention_stats(q, k)
  blocked = attention_stats(q, k, key_chunk=8, query_chunk=5)
  _, ref = attention_reference_np(q, k, k, np.sqrt(8.0))
  for name in FIELDS:
    np.testing.assert_allclose(
      getattr(blocked, name), getattr(whole, name), rtol=1e-5, atol=1e-5, err_msg=name
    )
    np.testing.assert_allclose(
      getattr(blocked, name), ref[name], rtol=1e-4, atol=1e-5, err_msg=name
    )


def test_free_energy_identity():
  q, k, v = qkv(3, scale=4.0)
  temperature = jnp.array([0.3, 1.0, 2.5, 9.0])
  _, s = gibbs_attention(q, k, v, temperature=temperature, return_stats=True)
  t = temperature[None, None, :]
  np.testing.assert_allclose(s.free_energy, s.internal_energy - t * s.entropy, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s.free_energy, -t * s.log_partition, rtol=1e-6, atol=1e-6)
  assert jnp.all(s.entropy >= -1e-6) and jnp.all(s.specific_heat >= 0)
  # Entropy is bounded by the log of the number of visible keys.
  visible = jnp.arange(1, 13, dtype=jnp.float32)[None, :, None]
  assert jnp.all(s.entropy <= jnp.log(visible) + 1e-5)


def test_specific_heat_is_dU_dT():
  q, k, v = qkv(4, scale=2.0)
  temperature = jnp.array([0.5, 1.0, 2.0, 3.0])

  def internal_energy(t):
    return gibbs_attention(q, k, v, temperature=t, return_stats=True)[1].internal_energy

  u, du_dt = jax.jvp(internal_energy, (temperature,), (jnp.ones(4),))
  c = gibbs_attention(q, k, v, temperature=temperature, return_stats=True)[1].specific_heat
  np.testing.assert_allclose(du_dt, c, rtol=2e-3, atol=2e-4)
  # and through jax.grad of a scalar temperature
  grad = jax.grad(lambda t: internal_energy(t)[0, 7, 2])(1.3)
  c13 = gibbs_attention(q, k, v, temperature=1.3, return_stats=True)[1].specific_heat[0, 7, 2]
  np.testing.assert_allclose(grad, c13, rtol=2e-3, atol=2e-4)


def test_temperature_is_differentiable_through_output():
  q, k, v = qkv(5)
  loss = lambda t: jnp.sum(gibbs_attention(q, k, v, temperature=t) ** 2)
  g = jax.grad(loss)(jnp.array([1.0, 2.0, 3.0, 4.0]))
  eps = 1e-3
  fd = (
    loss(jnp.array([1.0 + eps, 2.0, 3.0, 4.0])) - loss(jnp.array([1.0 - eps, 2.0, 3.0, 4.0]))
  ) / (2 * eps)
  np.testing.assert_allclose(g[0], fd, rtol=1e-2)


def test_gathered_queries_equal_rows_of_full_attention():
  q, k, v = qkv(6, batch=2, q_len=16, k_len=16, kv_heads=2)
  full, full_stats = gibbs_attention(q, k, v, return_stats=True)
  positions = jnp.array([[0, 3, 4, 15], [2, 7, 8, 9]])
  rows = jnp.arange(2)[:, None]
  out, stats = gibbs_attention(q[rows, positions], k, v, q_positions=positions, return_stats=True)
  np.testing.assert_allclose(out, full[rows, positions], rtol=1e-5, atol=1e-6)
  for name in FIELDS:
    np.testing.assert_allclose(
      getattr(stats, name),
      getattr(full_stats, name)[rows, positions],
      rtol=1e-5,
      atol=1e-6,
      err_msg=name,
    )


def test_lengths_pad_queries_and_hide_keys():
  """q_lengths: slots past a row's length output zero (stats NaN); kv_lengths: keys past it
  are invisible (a decoding row reads only its filled cache), 0 keys gives zero output;
  everything else equals the float64 reference on the kept keys."""
  q, k, v = qkv(14, batch=3, q_len=5, k_len=9, kv_heads=2)
  positions = jnp.array([[0, 2, 4, 6, 8]] * 3)
  q_lengths, kv_lengths = jnp.array([5, 3, 0]), jnp.array([9, 4, 7])
  out, s = gibbs_attention(
    q, k, v, q_positions=positions, q_lengths=q_lengths, kv_lengths=kv_lengths, return_stats=True
  )
  for b in range(3):
    n_q, n_k = int(q_lengths[b]), int(kv_lengths[b])
    assert not np.any(np.asarray(out[b, n_q:]))
    assert np.all(np.isnan(np.asarray(s.entropy[b, n_q:])))
    if n_q:
      ref_out, ref = attention_reference_np(
        q[b : b + 1, :n_q],
        k[b : b + 1, :n_k],
        v[b : b + 1, :n_k],
        np.sqrt(8.0),
        q_positions=positions[b : b + 1, :n_q],
      )
      np.testing.assert_allclose(out[b : b + 1, :n_q], ref_out, rtol=1e-5, atol=1e-6)
      for name in FIELDS:
        np.testing.assert_allclose(
          getattr(s, name)[b : b + 1, :n_q], ref[name], rtol=1e-4, atol=1e-5, err_msg=name
        )
  # Decoding: one query, no causal mask, per-row key counts (0 = a row that reads nothing).
  dq = q[:, :1]
  out = gibbs_attention(dq, k, v, is_causal=False, kv_lengths=jnp.array([9, 1, 0]))
  ref_out, _ = attention_reference_np(dq[:2], k[:2], v[:2], np.sqrt(8.0), is_causal=False)
  np.testing.assert_allclose(out[0], ref_out[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[1, 0], jnp.repeat(v[1, 0], 2, axis=0), rtol=1e-6)
  assert not np.any(np.asarray(out[2]))
  g = jax.grad(
    lambda v: jnp.sum(
      gibbs_attention(dq, k, v, is_causal=False, kv_lengths=jnp.array([9, 1, 0])) ** 2
    )
  )(v)
  assert np.all(np.isfinite(np.asarray(g))) and not np.any(np.asarray(g[2]))


def test_cudnn_gets_even_lengths_with_a_mask(monkeypatch):
  """cuDNN's backward with a bias needs even query and key lengths: odd ones are padded
  with a slot and a key that the lengths keep unread (checked here with XLA standing in
  for cuDNN)."""
  q, k, v = qkv(16, q_len=5, k_len=7)
  expected = gibbs_attention(
    q, k, v, q_positions=jnp.array([[1, 2, 3, 5, 6]] * 2), implementation="xla"
  )
  seen = []
  original = jax.nn.dot_product_attention

  def as_xla(q, k, v, *, implementation=None, **kwargs):
    seen.append(
      (q.shape[1], k.shape[1], kwargs["query_seq_lengths"], kwargs["key_value_seq_lengths"])
    )
    return original(q, k, v, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
  got = gibbs_attention(
    q, k, v, q_positions=jnp.array([[1, 2, 3, 5, 6]] * 2), implementation="cudnn"
  )
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  ((q_len, k_len, q_lengths, kv_lengths),) = seen
  assert (q_len, k_len) == (6, 8)
  np.testing.assert_array_equal(q_lengths, [5, 5]) and np.testing.assert_array_equal(
    kv_lengths, [7, 7]
  )


def test_default_positions_are_the_last_queries():
  q, k, v = qkv(7, q_len=3, k_len=10)
  out = gibbs_attention(q, k, v)
  ref_out, _ = attention_reference_np(q, k, v, np.sqrt(8.0))
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)


def test_query_seeing_one_key_is_finite_and_cold():
  q, k, v = qkv(8, scale=50.0)
  out, s = gibbs_attention(q, k, v, return_stats=True)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *s))
  np.testing.assert_allclose(out[:, 0], v[:, 0], rtol=1e-6)
  np.testing.assert_allclose(s.entropy[:, 0], 0.0, atol=1e-6)
  np.testing.assert_allclose(s.specific_heat[:, 0], 0.0, atol=1e-6)
  # huge logits elsewhere: still matches the float64 reference
  _, ref = attention_reference_np(q, k, v, np.sqrt(8.0))
  np.testing.assert_allclose(s.log_partition, ref["log_partition"], rtol=1e-5)
  np.testing.assert_allclose(s.entropy, ref["entropy"], atol=1e-4)


def test_non_causal():
  q, k, v = qkv(9, q_len=5, k_len=7)
  out, s = gibbs_attention(q, k, v, is_causal=False, return_stats=True)
  ref_out, ref = attention_reference_np(q, k, v, np.sqrt(8.0), is_causal=False)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s.specific_heat, ref["specific_heat"], rtol=1e-4, atol=1e-6)


def test_bfloat16_is_finite_and_close():
  q, k, v = qkv(10)
  out, s = gibbs_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), return_stats=True)
  assert out.dtype == jnp.bfloat16 and s.entropy.dtype == jnp.float32
  ref = gibbs_attention(q, k, v)
  assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.1


def test_jit_and_vmap_compose():
  q, k, v = qkv(11)
  f = jax.jit(lambda q, k, v: gibbs_attention(q, k, v, return_stats=True))
  out, s = f(q, k, v)
  vm = jax.vmap(lambda q, k, v: gibbs_attention(q[None], k[None], v[None])[0])(q, k, v)
  np.testing.assert_allclose(vm, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "case, error, match",
  [
    ("q3d", ValueError, "q must be a 4-D array"),
    ("kv_shape", ValueError, "k and v must have the same shape"),
    ("head_dim", ValueError, "same head_dim"),
    ("heads", ValueError, "multiple of k/v heads"),
    ("dtype", TypeError, "share a dtype"),
    ("int", TypeError, "q must be floating point"),
    ("temperature", ValueError, "temperature must be a scalar or a per-head"),
    ("negative_temperature", ValueError, "temperature must be positive"),
    ("positions_shape", ValueError, "q_positions must have shape"),
    ("positions_dtype", TypeError, "q_positions must be integer"),
    ("implementation", ValueError, "implementation must be"),
    ("q_lengths_shape", ValueError, r"q_lengths must have shape \[B\]"),
    ("kv_lengths_dtype", TypeError, "kv_lengths must be integer"),
    ("kv_lengths_range", ValueError, r"kv_lengths must lie in \[0, 12\]"),
  ],
)
def test_bad_input_names_the_argument(case, error, match):
  q, k, v = qkv(12)
  kwargs = {}
  if case == "q3d":
    q = q[0]
  elif case == "kv_shape":
    v = v[:, :5]
  elif case == "head_dim":
    q = q[..., :4]
  elif case == "heads":
    q = q[:, :, :3]
  elif case == "dtype":
    k = k.astype(jnp.bfloat16)
  elif case == "int":
    q, k, v = (x.astype(jnp.int32) for x in (q, k, v))
  elif case == "temperature":
    kwargs["temperature"] = jnp.ones(3)
  elif case == "negative_temperature":
    kwargs["temperature"] = -1.0
  elif case == "positions_shape":
    kwargs["q_positions"] = jnp.zeros((2, 5), jnp.int32)
  elif case == "positions_dtype":
    kwargs["q_positions"] = jnp.zeros((2, 12), jnp.float32)
  elif case == "implementation":
    kwargs["implementation"] = "flash"
  elif case == "q_lengths_shape":
    kwargs["q_lengths"] = jnp.zeros((3,), jnp.int32)
  elif case == "kv_lengths_dtype":
    kwargs["kv_lengths"] = jnp.zeros((2,), jnp.float32)
  elif case == "kv_lengths_range":
    kwargs["kv_lengths"] = jnp.array([3, 13])
  with pytest.raises(error, match=match):
    gibbs_attention(q, k, v, **kwargs)


# Calls of flash_attention(q, k, v, q_pos, kv_pos) and apply_rope(x, positions) with one bad
# argument, from good q [2, 12, 4, 8], k and v [2, 12, 2, 8] and positions p [2, 12].
BAD_CALLS = {
  "flash_rank": (
    lambda q, k, v, p: flash.flash_attention(q[0], k, v, p, p),
    ValueError,
    "flash_attention: q, k and v must be",
  ),
  "flash_heads": (
    lambda q, k, v, p: flash.flash_attention(q[:, :, :3], k, v, p, p),
    ValueError,
    "q heads must be a multiple of k/v heads",
  ),
  "flash_dtype": (
    lambda q, k, v, p: flash.flash_attention(q, k, v.astype(jnp.bfloat16), p, p),
    TypeError,
    "flash_attention: q, k and v must share a dtype",
  ),
  "flash_q_pos": (
    lambda q, k, v, p: flash.flash_attention(q, k, v, p[:, :5], p),
    ValueError,
    r"flash_attention: q_pos must be \[B, Tq\]",
  ),
  "flash_kv_pos": (
    lambda q, k, v, p: flash.flash_attention(q, k, v, p, p.astype(jnp.float32)),
    TypeError,
    "q_pos and kv_pos must be integer",
  ),
  "rope_positions": (
    lambda q, k, v, p: apply_rope(q, p[:, :5]),
    ValueError,
    r"apply_rope: positions must be \[B, T\]",
  ),
  "rope_odd": (
    lambda q, k, v, p: apply_rope(q[..., :7], p),
    ValueError,
    "head dimension H must be even",
  ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_flash_and_rope_bad_input_names_the_argument(case):
  call, error, match = BAD_CALLS[case]
  q, k, v = qkv(18, kv_heads=2)
  with pytest.raises(error, match=match):
    call(q, k, v, jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12)))


@pytest.mark.gpu
def test_cudnn_matches_xla_on_gpu():
  q, k, v = qkv(13, batch=2, q_len=256, k_len=256, heads=4, head_dim=64, dtype=jnp.bfloat16)
  fast = gibbs_attention(q, k, v, implementation="cudnn")
  ref = gibbs_attention(q, k, v, implementation="xla")
  err = jnp.linalg.norm((fast - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32))
  assert float(err) < 1e-2
  positions = jnp.sort(jax.random.choice(jax.random.key(0), 256, (2, 32), replace=False), axis=1)
  rows = jnp.arange(2)[:, None]
  gathered = gibbs_attention(
    q[rows, positions], k, v, q_positions=positions, implementation="cudnn"
  )
  err = jnp.linalg.norm((gathered - ref[rows, positions]).astype(jnp.float32)) / jnp.linalg.norm(
    ref[rows, positions].astype(jnp.float32)
  )
  assert float(err) < 1e-2


@pytest.mark.gpu
def test_cudnn_lengths_match_xla_on_gpu():
  """Gathered queries with per-row query lengths beside the position mask (training
  routing), and one query over per-row key lengths with a zero-length row (decoding):
  cuDNN equals XLA in values and in the gradients of q, k and v."""
  q, k, v = qkv(15, batch=3, q_len=256, k_len=256, heads=4, head_dim=64, dtype=jnp.bfloat16)
  positions = jnp.sort(jax.random.choice(jax.random.key(1), 256, (3, 64), replace=False), axis=1)
  rows = jnp.arange(3)[:, None]
  weights = jax.random.normal(jax.random.key(2), (3, 64, 4, 64), jnp.float32)

  def gathered(q, k, v, impl):
    out = gibbs_attention(
      q[rows, positions],
      k,
      v,
      q_positions=positions,
      q_lengths=jnp.array([64, 17, 0]),
      implementation=impl,
    )
    return jnp.sum(out.astype(jnp.float32) * weights), out

  def decoding(q, k, v, impl):
    return gibbs_attention(
      q[:, :1], k, v, is_causal=False, kv_lengths=jnp.array([256, 5, 0]), implementation=impl
    )

  def close(a, b, tol=2e-2):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    assert float(jnp.linalg.norm(a - b)) <= tol * float(jnp.linalg.norm(b)) + 1e-6

  grad = lambda impl: jax.grad(gathered, argnums=(0, 1, 2), has_aux=True)(q, k, v, impl)
  (gc, oc), (gx, ox) = grad("cudnn"), grad("xla")
  close(oc, ox)
  assert not bool(jnp.any(oc[2])) and not bool(jnp.any(oc[1, 17:]))
  for a, b in zip(gc, gx):
    close(a, b)
  dc, dx = decoding(q, k, v, "cudnn"), decoding(q, k, v, "xla")
  close(dc, dx)
  assert bool(jnp.all(jnp.isfinite(dc.astype(jnp.float32)))) and not bool(jnp.any(dc[2]))
