"""The Pallas flash kernel (interpret mode off GPU): equal to the XLA path and a float64
reference in values and gradients, observables included, and it never reads a tile that
no query in it can see."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import attention_reference_np

from tgn_jax.ops import flash
from tgn_jax.ops.attention import gibbs_attention

FIELDS = ("log_partition", "free_energy", "internal_energy", "entropy", "specific_heat")
BLOCKS = flash.FlashBlocks(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
N_HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def case(seed, dtype=jnp.float32):
  """Three rows over Tq = 37 query slots and Tk = 45 keys (not tile multiples), grouped
  heads: row 0 has gaps on both sides and 29 keys; row 1 holds 13 queries, the last of
  them at the last key's position; row 2 holds no query at all."""
  rng = np.random.default_rng(seed)
  batch, q_len, k_len = 3, 37, 45
  q = rng.normal(size=(batch, q_len, N_HEADS, HEAD_DIM)) * 1.5
  k = rng.normal(size=(batch, k_len, KV_HEADS, HEAD_DIM))
  v = rng.normal(size=(batch, k_len, KV_HEADS, HEAD_DIM))
  kv_pos = np.stack([np.sort(rng.choice(150, k_len, replace=False)) for _ in range(batch)])
  q_pos = np.stack(
    [np.sort(rng.choice(np.arange(kv_pos[b, 0], 200), q_len, replace=False)) for b in range(batch)]
  )
  q_pos[1, :12] = np.sort(rng.choice(np.arange(kv_pos[1, 0], kv_pos[1, -1]), 12, replace=False))
  q_pos[1, 12] = kv_pos[1, -1]
  args = dict(
    q_positions=jnp.asarray(q_pos, jnp.int32),
    kv_positions=jnp.asarray(kv_pos, jnp.int32),
    q_lengths=jnp.array([37, 13, 0]),
    kv_lengths=jnp.array([29, 45, 45]),
  )
  cast = lambda x: jnp.asarray(x, jnp.float32).astype(dtype)
  return cast(q), cast(k), cast(v), args


TEMPERATURE = jnp.array([0.7, 1.0, 2.0, 3.5])


def valid(args):
  """bool [B, Tq, 1, 1]: query slots within their row's length."""
  return (jnp.arange(37)[None] < args["q_lengths"][:, None])[:, :, None, None]


def test_equals_xla_and_float64_reference_values_and_observables():
  q, k, v, args = case(0)
  out, stats = gibbs_attention(
    q,
    k,
    v,
    temperature=TEMPERATURE,
    return_stats=True,
    implementation="pallas",
    blocks=BLOCKS,
    **args,
  )
  xla = gibbs_attention(q, k, v, temperature=TEMPERATURE, implementation="xla", **args)
  ref_out, ref = attention_reference_np(q, k, v, TEMPERATURE, **args)
  np.testing.assert_allclose(out, xla, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(out[2])) and not np.any(np.asarray(out[1, 13:]))
  for name in FIELDS:
    np.testing.assert_allclose(getattr(stats, name), ref[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_gradients_equal_xla_for_q_k_v_and_temperature():
  q, k, v, args = case(1)
  weights = jax.random.normal(jax.random.key(0), q.shape)

  def loss(impl, **kw):
    def f(q, k, v, t):
      out = gibbs_attention(q, k, v, temperature=t, implementation=impl, **kw, **args)
      return jnp.sum(out * weights)

    return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))

  pallas = loss("pallas", blocks=BLOCKS)(q, k, v, TEMPERATURE)
  xla = loss("xla")(q, k, v, TEMPERATURE)
  for name, a, b in zip("qkvT", pallas, xla):
    np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(b)))), err_msg=name
    )
  assert float(jnp.max(jnp.abs(pallas[3]))) > 0  # the temperature does get a gradient


def test_log_partition_cotangent_flows_into_q_and_k():
  """The kernel's lse is an output with a gradient: d lse / d q = E_p[k] / T."""
  q, k, v, args = case(2)
  q_pos, kv_pos = (
    jnp.where(jnp.arange(x.shape[1])[None] < n[:, None], x, pad)
    for x, n, pad in (
      (args["q_positions"], args["q_lengths"], flash.PAD_QUERY),
      (args["kv_positions"], args["kv_lengths"], flash.PAD_KEY),
    )
  )

  def lse_sum(f):
    return lambda q, k: jnp.sum(jnp.where(jnp.isfinite(lse := f(q, k)), lse, 0.0))

  def kernel(q, k):
    return flash.flash_attention(q, k, v, q_pos, kv_pos, blocks=BLOCKS)[1]

  def dense(q, k):
    kr = jnp.repeat(k, N_HEADS // KV_HEADS, axis=2)
    s = jnp.einsum("bqnh,bknh->bqnk", q, kr)
    visible = (kv_pos[:, None, :] <= q_pos[:, :, None])[:, :, None, :]
    return jax.nn.logsumexp(jnp.where(visible, s, -jnp.inf), axis=-1)

  for a, b in zip(
    jax.grad(lse_sum(kernel), argnums=(0, 1))(q, k), jax.grad(lse_sum(dense), argnums=(0, 1))(q, k)
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_is_close(dtype):
  q, k, v, args = case(3, dtype)
  out = gibbs_attention(q, k, v, implementation="pallas", blocks=BLOCKS, **args)
  assert out.dtype == dtype
  ref_out, _ = attention_reference_np(
    q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), np.sqrt(HEAD_DIM), **args
  )
  assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out))) < 3e-2
  grads = jax.grad(
    lambda q: jnp.sum(
      gibbs_attention(q, k, v, implementation="pallas", blocks=BLOCKS, **args).astype(jnp.float32)
    )
  )(q)
  assert grads.dtype == dtype and bool(jnp.all(jnp.isfinite(grads.astype(jnp.float32))))


def test_tiles_nobody_sees_are_never_read():
  """Keys after every query's position, and a query tile holding only padding slots, are
  NaN: if any kernel (forward, dq, dk/dv) read those tiles, NaN would reach its outputs."""
  batch, q_len, k_len = 2, 48, 64
  rng = np.random.default_rng(4)
  q, k, v = (
    jnp.asarray(rng.normal(size=(batch, n, 2, 16)), jnp.float32) for n in (q_len, k_len, k_len)
  )
  q_pos = jnp.asarray(np.sort(rng.choice(32, size=(batch, q_len)), axis=1), jnp.int32)
  kv_pos = jnp.broadcast_to(jnp.arange(k_len, dtype=jnp.int32), (batch, k_len))
  q_pos = q_pos.at[:, 32:].set(flash.PAD_QUERY)  # query tile 2: padding only
  unread_keys = jnp.arange(k_len)[None, :, None, None] >= 32  # key tiles 2 and 3
  poisoned_k, poisoned_v = (jnp.where(unread_keys, jnp.nan, x) for x in (k, v))
  poisoned_q = q.at[:, 32:].set(jnp.nan)

  def loss(q, k, v):
    out, _ = flash.flash_attention(q, k, v, q_pos, kv_pos, blocks=BLOCKS)
    return jnp.sum(out[:, :32] * jnp.cos(jnp.arange(16.0))), out

  grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
  (dq, dk, dv), out = grad(poisoned_q, poisoned_k, poisoned_v)
  (dq_ref, dk_ref, dv_ref), out_ref = grad(q, k, v)
  np.testing.assert_allclose(out[:, :32], out_ref[:, :32], rtol=1e-6)
  assert not np.any(np.asarray(out[:, 32:]))
  np.testing.assert_allclose(dq[:, :32], dq_ref[:, :32], rtol=1e-6, atol=1e-6)
  for d, d_ref in ((dk, dk_ref), (dv, dv_ref)):
    assert bool(jnp.all(jnp.isfinite(d)))
    np.testing.assert_allclose(d[:, :32], d_ref[:, :32], rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(d[:, 32:]))


def dense_reference(q, k, v, q_pos, kv_pos):
  """(out, lse) of attention with the position rule written out densely."""
  kr = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
  vr = jnp.repeat(v, q.shape[2] // k.shape[2], axis=2)
  visible = (kv_pos[:, None, :] <= q_pos[:, :, None])[:, None]  # [B, 1, Tq, Tk]
  s = jnp.where(visible, jnp.einsum("bqnh,bknh->bnqk", q, kr), -jnp.inf)
  seen = jnp.any(visible, axis=-1)
  lse = jnp.where(seen, jax.nn.logsumexp(jnp.where(seen[..., None], s, 0.0), axis=-1), -jnp.inf)
  p = jnp.where(visible, jnp.exp(s - jnp.where(seen, lse, 0.0)[..., None]), 0.0)
  return jnp.einsum("bnqk,bknh->bqnh", p, vr), jnp.swapaxes(lse, 1, 2)


def random_positions(rng, batch, q_len, k_len):
  """Increasing positions with gaps, repeats, negative values, rows that see nothing at
  first, non-causal rows and trailing padding on both sides."""
  q_rows, kv_rows = [], []
  for _ in range(batch):
    span = int(rng.choice([k_len, 3 * k_len, 5]))
    kv = np.sort(rng.integers(-4, span, k_len))
    q = np.sort(rng.integers(int(kv[0]) - 3, int(kv[-1]) + 4, q_len))
    if rng.random() < 0.15:
      q[:] = flash.ALL_KEYS
    kv[int(rng.integers(0, k_len + 1)) if rng.random() < 0.4 else k_len :] = flash.PAD_KEY
    q[int(rng.integers(0, q_len + 1)) if rng.random() < 0.4 else q_len :] = flash.PAD_QUERY
    q_rows.append(q)
    kv_rows.append(kv)
  return jnp.asarray(np.stack(q_rows), jnp.int32), jnp.asarray(np.stack(kv_rows), jnp.int32)


@pytest.mark.parametrize(
  "blocks",
  [flash.FlashBlocks(16, 16, 16, 16), flash.FlashBlocks(32, 16, 16, 32)],
  ids=["16", "mixed"],
)
def test_random_positions_equal_dense_attention(blocks):
  """Values, log-sum-exp and gradients (with an lse cotangent) over random positions, with
  backward tiles that differ from the forward's; most cases run unmasked tiles too."""
  rng = np.random.default_rng(7)

  def loss(attend):
    def f(q, k, v, q_pos, kv_pos, w, w_lse):
      out, lse = attend(q, k, v, q_pos, kv_pos)
      return jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse * w_lse, 0.0))

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

  kernel = loss(functools.partial(flash.flash_attention, blocks=blocks))
  dense = loss(dense_reference)
  for q_len, k_len in ((37, 45), (70, 64), (5, 37)):
    for _ in range(4):
      q, w = (jnp.asarray(rng.normal(size=(2, q_len, 4, 8)), jnp.float32) for _ in range(2))
      k, v = (jnp.asarray(rng.normal(size=(2, k_len, 2, 8)), jnp.float32) for _ in range(2))
      w_lse = jnp.asarray(rng.normal(size=(2, q_len, 4)), jnp.float32)
      q_pos, kv_pos = random_positions(rng, 2, q_len, k_len)
      (value, grads), (ref_value, ref_grads) = (
        f(q, k, v, q_pos, kv_pos, w, w_lse) for f in (kernel, dense)
      )
      np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-4)
      for name, a, b in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(
          a,
          b,
          rtol=1e-5,
          atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(b)))),
          err_msg=f"d{name} {q_len}x{k_len}",
        )


def test_more_queries_than_keys_with_negative_default_positions():
  """Tq > Tk puts the first queries at negative positions (the last Tq of the key
  positions, extended back): they see nothing, and gradients still match XLA."""
  q, k, v, _ = case(8)
  q = jnp.concatenate([q, q[:, :13]], axis=1)[:, :50]  # 50 queries over 45 keys
  weights = jax.random.normal(jax.random.key(1), q.shape)
  grads = [
    jax.grad(
      lambda q, k, v: jnp.sum(gibbs_attention(q, k, v, implementation=impl, **kw) * weights),
      argnums=(0, 1, 2),
    )(q, k, v)
    for impl, kw in (("pallas", dict(blocks=BLOCKS)), ("xla", {}))
  ]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_tile_bounds():
  """Per tile: the keys every / some query sees, and per key tile the first query that
  sees it and the first from which all do."""
  q_pos = jnp.array([[3, 5, 20, 21, 40, 41, flash.PAD_QUERY, flash.PAD_QUERY]], jnp.int32)
  kv_pos = jnp.array([[0, 4, 5, 6, 22, 30, 40, flash.PAD_KEY]])
  every, some = flash._query_tile_bounds(q_pos, kv_pos, 2)
  np.testing.assert_array_equal(every, [[1, 4, 7, 0]])
  np.testing.assert_array_equal(some, [[3, 4, 7, 0]])
  starts, fulls, n = flash._key_tile_bounds(q_pos, kv_pos, 2)
  np.testing.assert_array_equal(starts, [[0, 1, 4, 4]])
  np.testing.assert_array_equal(fulls, [[1, 2, 4, 8]])
  np.testing.assert_array_equal(n, [6])


@pytest.mark.parametrize(
  "case_name, kwargs, error, match",
  [
    (
      "kv_shape",
      dict(kv_positions=jnp.zeros((3, 44), jnp.int32)),
      ValueError,
      "kv_positions must have shape",
    ),
    (
      "kv_dtype",
      dict(kv_positions=jnp.zeros((3, 45), jnp.float32)),
      TypeError,
      "kv_positions must be integer",
    ),
    (
      "decreasing",
      dict(kv_positions=jnp.broadcast_to(jnp.arange(45)[::-1], (3, 45))),
      ValueError,
      "kv_positions must increase along each row",
    ),
    (
      "blocks",
      dict(blocks=flash.FlashBlocks(), implementation="xla"),
      ValueError,
      "blocks are for implementation='pallas'",
    ),
  ],
)
def test_bad_input_names_the_argument(case_name, kwargs, error, match):
  q, k, v, _ = case(5)
  with pytest.raises(error, match=match):
    gibbs_attention(q, k, v, **kwargs)
  with pytest.raises(ValueError, match="power of two"):
    flash.FlashBlocks(block_q=24)


def test_kernels_lower_to_triton_for_cuda():
  """Without a GPU: the forward and both backward kernels lower through Pallas's Triton
  rules for CUDA (bf16, head_dim 64, grouped heads), as three Triton custom calls and no
  conditional. (Triton's own compiler runs only on a GPU: tests/test_flash.py there.)"""
  from jax import export

  q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
  pos = jax.ShapeDtypeStruct((2, 256), jnp.int32)

  def loss(q, k, v, q_pos, kv_pos):
    out, lse = flash.flash_attention(q, k, v, q_pos, kv_pos, interpret=False)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  exported = export.export(
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
    platforms=["cuda"],
    disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(q, k, k, pos, pos)
  module = exported.mlir_module()
  assert module.count("xla.gpu.triton") == 3 and "conditional" not in module
