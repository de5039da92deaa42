"""Flash attention for queries and keys at arbitrary increasing positions (Pallas).

One rule covers every mask: key j is visible to query i iff kv_pos[j] <= q_pos[i]. With
positions increasing along each row, the keys a query sees are a prefix of the keys, so
each tile of queries reads a prefix of the key tiles, and only the key tiles that
straddle its first and last query need an element mask. The tile bounds are computed
before the kernels (searchsorted over the positions), and all three kernels -- forward,
dq, and dk/dv (which starts at the first query tile that sees its key tile) -- skip the
tiles no query in them can see. A query that sees no key outputs zero.

  out, lse = flash_attention(q, k, v, q_pos, kv_pos)

q [B, Tq, N, H], k and v [B, Tk, K, H] (N a multiple of K), q_pos int32 [B, Tq],
kv_pos int32 [B, Tk]; out [B, Tq, N, H] in q's dtype, lse float32 [B, Tq, N] (the
natural log of the softmax normaliser; NO_KEY_LSE where a query sees no key). Logits
are q.k (scale q beforehand). Differentiable in q, k and v (and through lse), by its
own backward kernels. Runs on GPU through Triton and anywhere else in interpret mode.

Padding conventions of callers (gibbs_attention): query slots that must see nothing at
position PAD_QUERY and keys that must never be seen at position PAD_KEY, both after a row's
real ones; queries that see every key (non-causal) at position ALL_KEYS. Real positions lie
strictly between PAD_QUERY and ALL_KEYS (negative ones included).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Array = jax.Array

PAD_QUERY = int(np.iinfo(np.int32).min)
PAD_KEY = int(np.iinfo(np.int32).max)
ALL_KEYS = PAD_KEY - 1
NO_KEY_LSE = float("-inf")
_NEG = -0.7 * float(np.finfo(np.float32).max)  # masked logits: finite, exp() is 0


@dataclasses.dataclass(frozen=True)
class FlashBlocks:
  """Tile sizes (powers of two, >= 16) and Triton launch settings.

  block_q, block_k: the forward kernel's query and key tiles. block_q_bwd, block_k_bwd:
  the backward kernels' (dq: a query tile against key tiles; dk/dv: a key tile against
  query tiles). Defaults follow FlashAttention-2's Triton settings for head_dim <= 128
  on H100-class GPUs; they are not tuned on this project's shapes yet.
  """

  block_q: int = 128
  block_k: int = 64
  block_q_bwd: int = 64
  block_k_bwd: int = 64
  num_warps: Optional[int] = None
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value!r}")


def flash_attention(
  q: Array,
  k: Array,
  v: Array,
  q_pos: Array,
  kv_pos: Array,
  *,
  blocks: FlashBlocks = FlashBlocks(),
  interpret: Optional[bool] = None,
) -> tuple[Array, Array]:
  """(out [B, Tq, N, H], lse float32 [B, Tq, N]); see the module docstring.

  Wrong ranks or shapes raise ValueError, wrong dtypes TypeError (chex assertions).
  """
  _check_arguments(q, k, v, q_pos, kv_pos)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  batch, q_len, n_heads, head_dim = q.shape
  k_len = k.shape[1]
  # Few queries (decoding: one): query tiles no larger than needed.
  fit = max(16, _next_power_of_2(q_len))
  blocks = dataclasses.replace(
    blocks, block_q=min(blocks.block_q, fit), block_q_bwd=min(blocks.block_q_bwd, fit)
  )
  q_tile = max(blocks.block_q, blocks.block_q_bwd)
  k_tile = max(blocks.block_k, blocks.block_k_bwd)
  q_pad, k_pad = -q_len % q_tile, -k_len % k_tile
  h_pad = max(16, _next_power_of_2(head_dim)) - head_dim  # Triton's dot: a power of 2, >= 16
  pad = lambda x, n, value=0: jnp.pad(
    x, ((0, 0), (0, n)) + ((0, 0),) * (x.ndim - 2), constant_values=value
  )
  pad_h = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, h_pad),)) if h_pad else x
  out, lse = _flash(
    pad_h(pad(q, q_pad)),
    pad_h(pad(k, k_pad)),
    pad_h(pad(v, k_pad)),
    pad(q_pos.astype(jnp.int32), q_pad, PAD_QUERY),
    pad(kv_pos.astype(jnp.int32), k_pad, PAD_KEY),
    blocks,
    interpret,
  )
  return out[:, :q_len, :, :head_dim], lse[:, :q_len]


def check_qkv(q, k, v, prefix: str = "") -> None:
  """q [B, Tq, N, H], k and v [B, Tk, K, H] of one shape with q's B and H, N a multiple of K,
  one dtype; ValueError or TypeError naming the problem (after `prefix`)."""
  chex.assert_equal_shape(
    [k, v], custom_message=f"{prefix}k and v must have the same shape", exception_type=ValueError
  )
  batch, _, n_heads, head_dim = q.shape
  chex.assert_shape(
    k,
    (batch, None, None, head_dim),
    exception_type=ValueError,
    custom_message=f"{prefix}k must be [B, Tk, K, H] with the same batch size and the same head_dim as q",
  )
  chex.assert_is_divisible(
    n_heads,
    k.shape[2],
    exception_type=ValueError,
    custom_message=f"{prefix}q heads must be a multiple of k/v heads",
  )
  chex.assert_trees_all_equal_dtypes(
    q, k, v, exception_type=TypeError, custom_message=f"{prefix}q, k and v must share a dtype"
  )


def _check_arguments(q, k, v, q_pos, kv_pos) -> None:
  layout = "flash_attention: q, k and v must be [B, T, heads, head_dim]"
  chex.assert_rank([q, k, v], 4, custom_message=layout, exception_type=ValueError)
  check_qkv(q, k, v, prefix="flash_attention: ")
  batch, q_len = q.shape[:2]
  chex.assert_shape(
    q_pos,
    (batch, q_len),
    exception_type=ValueError,
    custom_message="flash_attention: q_pos must be [B, Tq]",
  )
  chex.assert_shape(
    kv_pos,
    (batch, k.shape[1]),
    exception_type=ValueError,
    custom_message="flash_attention: kv_pos must be [B, Tk]",
  )
  chex.assert_type(
    [q_pos, kv_pos],
    int,
    exception_type=TypeError,
    custom_message="flash_attention: q_pos and kv_pos must be integer",
  )


# ------------------------------------------------------------------------------ bounds


def _query_tile_bounds(q_pos: Array, kv_pos: Array, block_q: int):
  """Per query tile, int32 [B, nQ]: (keys visible to every query of the tile, keys
  visible to some query of the tile). Both are prefixes of the keys."""
  batch, q_len = q_pos.shape
  tiles = q_pos.reshape(batch, q_len // block_q, block_q)
  valid = tiles != PAD_QUERY
  first = tiles[:, :, 0]
  last = jnp.max(jnp.where(valid, tiles, PAD_QUERY), axis=-1)
  count = jax.vmap(lambda keys, p: jnp.searchsorted(keys, p, side="right"))
  # Keys visible to the tile's first query are visible to all of them, unless the tile
  # holds padding slots (they see nothing): then every key tile is masked.
  every = jnp.where(jnp.all(valid, axis=-1), count(kv_pos, first), 0)
  some = jnp.where(jnp.any(valid, axis=-1), count(kv_pos, last), 0)
  return every.astype(jnp.int32), some.astype(jnp.int32)


def _key_tile_bounds(q_pos: Array, kv_pos: Array, block_k: int):
  """Per key tile, int32 [B, nK]: (the first query that sees some key of the tile, the
  first query from which every query sees all of them; Tq where there is none), and per
  row the number of real query slots, int32 [B]."""
  batch, k_len = kv_pos.shape
  tiles = kv_pos.reshape(batch, k_len // block_k, block_k)
  sorted_q = jnp.where(q_pos == PAD_QUERY, PAD_KEY, q_pos)  # padding last: still sorted
  first_seen = jax.vmap(lambda qs, p: jnp.searchsorted(qs, p, side="left"))
  starts = first_seen(sorted_q, tiles[:, :, 0])
  full_tile = jnp.all(tiles != PAD_KEY, axis=-1)
  fulls = jnp.where(full_tile, first_seen(sorted_q, tiles[:, :, -1]), q_pos.shape[1])
  n_queries = jnp.sum(q_pos != PAD_QUERY, axis=1)
  return starts.astype(jnp.int32), fulls.astype(jnp.int32), n_queries.astype(jnp.int32)


# ------------------------------------------------------------------------------ kernels


def _logits(q, k, f32: bool):
  return plgpu.dot(q, k, trans_b=True, allow_tf32=False if f32 else None)


def _forward_kernel(
  q_ref,
  k_ref,
  v_ref,
  q_pos_ref,
  kv_pos_ref,
  every_ref,
  some_ref,
  o_ref,
  lse_ref,
  *,
  block_k: int,
  f32: bool,
):
  q = q_ref[...]
  q_pos = q_pos_ref[...]
  block_q, head_dim = q.shape

  def step(masked: bool):
    def body(j, carry):
      o, m, l = carry
      keys = pl.ds(j * block_k, block_k)
      s = _logits(q, k_ref[keys, :], f32)
      if masked:
        visible = kv_pos_ref[keys][None, :] <= q_pos[:, None]
        s = jnp.where(visible, s, _NEG)
      m_next = jnp.maximum(m, jnp.max(s, axis=1))
      p = jnp.exp(s - m_next[:, None])
      if masked:  # a row with nothing visible yet must not count masked keys
        p = jnp.where(visible, p, 0.0)
      alpha = jnp.exp(m - m_next)
      o = alpha[:, None] * o + plgpu.dot(
        p.astype(v_ref.dtype), v_ref[keys, :], allow_tf32=False if f32 else None
      )
      return o, m_next, alpha * l + jnp.sum(p, axis=1)

    return body

  carry = (
    jnp.zeros((block_q, head_dim), jnp.float32),
    jnp.full((block_q,), _NEG, jnp.float32),
    jnp.zeros((block_q,), jnp.float32),
  )
  every, some = every_ref[...], some_ref[...]
  full_tiles = every // block_k
  carry = jax.lax.fori_loop(0, full_tiles, step(False), carry)
  o, m, l = jax.lax.fori_loop(full_tiles, pl.cdiv(some, block_k), step(True), carry)
  seen = l > 0.0
  o_ref[...] = jnp.where(seen[:, None], o / jnp.where(seen, l, 1.0)[:, None], 0.0).astype(
    o_ref.dtype
  )
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NO_KEY_LSE)


def _dq_kernel(
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  q_pos_ref,
  kv_pos_ref,
  every_ref,
  some_ref,
  dq_ref,
  *,
  block_k: int,
  f32: bool,
):
  q, do = q_ref[...], do_ref[...]
  lse, delta, q_pos = lse_ref[...], delta_ref[...], q_pos_ref[...]
  tf32 = False if f32 else None

  def step(masked: bool):
    def body(j, dq):
      keys = pl.ds(j * block_k, block_k)
      k = k_ref[keys, :]
      p = jnp.exp(_logits(q, k, f32) - lse[:, None])
      if masked:
        p = jnp.where(kv_pos_ref[keys][None, :] <= q_pos[:, None], p, 0.0)
      dp = plgpu.dot(do, v_ref[keys, :], trans_b=True, allow_tf32=tf32)
      ds = p * (dp - delta[:, None])
      return dq + plgpu.dot(ds.astype(k.dtype), k, allow_tf32=tf32)

    return body

  dq = jnp.zeros(q.shape, jnp.float32)
  every, some = every_ref[...], some_ref[...]
  full_tiles = every // block_k
  dq = jax.lax.fori_loop(0, full_tiles, step(False), dq)
  dq = jax.lax.fori_loop(full_tiles, pl.cdiv(some, block_k), step(True), dq)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  q_pos_ref,
  kv_pos_ref,
  start_ref,
  full_ref,
  n_queries_ref,
  dk_ref,
  dv_ref,
  *,
  block_q: int,
  f32: bool,
):
  k, v, kv_pos = k_ref[...], v_ref[...], kv_pos_ref[...]
  tf32 = False if f32 else None

  def step(masked: bool):
    def body(i, carry):
      dk, dv = carry
      queries = pl.ds(i * block_q, block_q)
      q, do = q_ref[queries, :], do_ref[queries, :]
      p = jnp.exp(_logits(q, k, f32) - lse_ref[queries][:, None])
      if masked:
        p = jnp.where(kv_pos[None, :] <= q_pos_ref[queries][:, None], p, 0.0)
      dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True, allow_tf32=tf32)
      dp = plgpu.dot(do, v, trans_b=True, allow_tf32=tf32)
      ds = p * (dp - delta_ref[queries][:, None])
      return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True, allow_tf32=tf32), dv

    return body

  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  n_queries = n_queries_ref[...]
  first = start_ref[...] // block_q
  unmasked_from = jnp.minimum(pl.cdiv(full_ref[...], block_q), pl.cdiv(n_queries, block_q))
  unmasked_to = jnp.maximum(unmasked_from, n_queries // block_q)
  carry = jax.lax.fori_loop(first, unmasked_from, step(True), carry)
  carry = jax.lax.fori_loop(unmasked_from, unmasked_to, step(False), carry)
  dk, dv = jax.lax.fori_loop(unmasked_to, pl.cdiv(n_queries, block_q), step(True), carry)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------ calls


def _params(blocks: FlashBlocks, head_dim: int):
  warps = blocks.num_warps or (4 if head_dim <= 64 else 8)
  return plgpu.CompilerParams(num_warps=warps, num_stages=blocks.num_stages)


def _forward(q, k, v, q_pos, kv_pos, blocks: FlashBlocks, interpret: bool):
  batch, q_len, n_heads, head_dim = q.shape
  k_len, kv_heads = k.shape[1], k.shape[2]
  group = n_heads // kv_heads
  bq, bk = blocks.block_q, blocks.block_k
  every, some = _query_tile_bounds(q_pos, kv_pos, bq)
  tile = lambda i, b, n: (b, i)
  out, lse = pl.pallas_call(
    functools.partial(_forward_kernel, block_k=bk, f32=q.dtype == jnp.float32),
    grid=(q_len // bq, batch, n_heads),
    in_specs=[
      pl.BlockSpec((None, bq, None, head_dim), lambda i, b, n: (b, i, n, 0)),
      pl.BlockSpec((None, k_len, None, head_dim), lambda i, b, n: (b, 0, n // group, 0)),
      pl.BlockSpec((None, k_len, None, head_dim), lambda i, b, n: (b, 0, n // group, 0)),
      pl.BlockSpec((None, bq), tile),
      pl.BlockSpec((None, k_len), lambda i, b, n: (b, 0)),
      pl.BlockSpec((None, None), tile),
      pl.BlockSpec((None, None), tile),
    ],
    out_specs=[
      pl.BlockSpec((None, bq, None, head_dim), lambda i, b, n: (b, i, n, 0)),
      pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((batch, n_heads, q_len), jnp.float32),
    ],
    compiler_params=_params(blocks, head_dim),
    interpret=interpret,
    name="tgn_flash_forward",
  )(q, k, v, q_pos, kv_pos, every, some)
  return out, lse


def _backward(
  q, k, v, q_pos, kv_pos, out, lse_BNQ, d_out, d_lse_BNQ, blocks: FlashBlocks, interpret: bool
):
  batch, q_len, n_heads, head_dim = q.shape
  k_len, kv_heads = k.shape[1], k.shape[2]
  group = n_heads // kv_heads
  bq, bk = blocks.block_q_bwd, blocks.block_k_bwd
  f32 = q.dtype == jnp.float32
  # With lse an output too: d(lse_i)/d(s_ij) = p_ij, which shifts delta by -d_lse.
  delta = jnp.einsum("bqnh,bqnh->bnq", out.astype(jnp.float32), d_out.astype(jnp.float32))
  delta = delta - d_lse_BNQ
  lse = jnp.where(jnp.isfinite(lse_BNQ), lse_BNQ, 0.0)  # no key: every p is masked to 0
  params = _params(blocks, head_dim)
  whole_q = pl.BlockSpec((None, q_len, None, head_dim), lambda j, b, n: (b, 0, n, 0))
  whole_kv = pl.BlockSpec((None, k_len, None, head_dim), lambda i, b, n: (b, 0, n // group, 0))

  every, some = _query_tile_bounds(q_pos, kv_pos, bq)
  tile = lambda i, b, n: (b, i)
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, block_k=bk, f32=f32),
    grid=(q_len // bq, batch, n_heads),
    in_specs=[
      pl.BlockSpec((None, bq, None, head_dim), lambda i, b, n: (b, i, n, 0)),
      whole_kv,
      whole_kv,
      pl.BlockSpec((None, bq, None, head_dim), lambda i, b, n: (b, i, n, 0)),
      pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i)),
      pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i)),
      pl.BlockSpec((None, bq), tile),
      pl.BlockSpec((None, k_len), lambda i, b, n: (b, 0)),
      pl.BlockSpec((None, None), tile),
      pl.BlockSpec((None, None), tile),
    ],
    out_specs=pl.BlockSpec((None, bq, None, head_dim), lambda i, b, n: (b, i, n, 0)),
    out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
    compiler_params=params,
    interpret=interpret,
    name="tgn_flash_dq",
  )(q, k, v, d_out, lse, delta, q_pos, kv_pos, every, some)

  starts, fulls, n_queries = _key_tile_bounds(q_pos, kv_pos, bk)
  key_tile = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, n: (b, j, n // group, 0))
  head_tile = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, n: (b, j, n, 0))
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, block_q=bq, f32=f32),
    grid=(k_len // bk, batch, n_heads),
    in_specs=[
      whole_q,
      key_tile,
      key_tile,
      whole_q,
      pl.BlockSpec((None, None, q_len), lambda j, b, n: (b, n, 0)),
      pl.BlockSpec((None, None, q_len), lambda j, b, n: (b, n, 0)),
      pl.BlockSpec((None, q_len), lambda j, b, n: (b, 0)),
      pl.BlockSpec((None, bk), lambda j, b, n: (b, j)),
      pl.BlockSpec((None, None), lambda j, b, n: (b, j)),
      pl.BlockSpec((None, None), lambda j, b, n: (b, j)),
      pl.BlockSpec((None,), lambda j, b, n: (b,)),
    ],
    out_specs=[head_tile, head_tile],
    out_shape=[jax.ShapeDtypeStruct((batch, k_len, n_heads, head_dim), jnp.float32)] * 2,
    compiler_params=params,
    interpret=interpret,
    name="tgn_flash_dkv",
  )(q, k, v, d_out, lse, delta, q_pos, kv_pos, starts, fulls, n_queries)
  # Per query head; the heads of a group share their key/value head.
  grouped = lambda x: x.reshape(batch, k_len, kv_heads, group, head_dim).sum(axis=3)
  return dq.astype(q.dtype), grouped(dk).astype(k.dtype), grouped(dv).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, q_pos, kv_pos, blocks, interpret):
  out, lse_BNQ = _forward(q, k, v, q_pos, kv_pos, blocks, interpret)
  return out, jnp.swapaxes(lse_BNQ, 1, 2)


def _flash_fwd(q, k, v, q_pos, kv_pos, blocks, interpret):
  out, lse_BNQ = _forward(q, k, v, q_pos, kv_pos, blocks, interpret)
  return (out, jnp.swapaxes(lse_BNQ, 1, 2)), (q, k, v, q_pos, kv_pos, out, lse_BNQ)


def _flash_bwd(blocks, interpret, residuals, cotangents):
  q, k, v, q_pos, kv_pos, out, lse_BNQ = residuals
  d_out, d_lse = cotangents
  dq, dk, dv = _backward(
    q,
    k,
    v,
    q_pos,
    kv_pos,
    out,
    lse_BNQ,
    d_out,
    jnp.swapaxes(d_lse, 1, 2).astype(jnp.float32),
    blocks,
    interpret,
  )
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _next_power_of_2(n: int) -> int:
  return 1 << (n - 1).bit_length()
