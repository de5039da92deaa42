"""Softmax attention as a Gibbs equilibrium, with its thermodynamic observables.

For query i with energies E_ij = -q_i.k_j and temperature T, the attention weights
p_ij = softmax_j(-E_ij / T) minimise F = U - T S. Per query this module reports

  log Z = logsumexp_j(q_i.k_j / T)     F = -T log Z
  U = sum_j p_ij E_ij                  S = -sum_j p_ij ln p_ij
  C = Var_p(E) / T^2  (= dU/dT)

so that F = U - T S holds identically. Shapes follow jax.nn.dot_product_attention:
q [B, Tq, N, H], k and v [B, Tk, K, H] with N a multiple of K (grouped KV heads).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np

from tgn_jax.ops import flash
from tgn_jax.ops.flash import FlashBlocks

Array = jax.Array

# Finite stand-in for -inf: keeps exp() at zero without producing inf - inf = nan.
_NEG = -1e30


class ThermoStats(NamedTuple):
  """Per-query observables of the attention Gibbs distribution, float32 [B, Tq, N].

  Energies are in units of q.k (E = -q.k), the entropy in nats; the specific
  heat is dimensionless (C = Var_p(E) / T^2).
  """

  log_partition: Array
  free_energy: Array
  internal_energy: Array
  entropy: Array
  specific_heat: Array


def default_positions(batch: int, q_len: int, k_len: int) -> Array:
  """The last q_len positions of a k_len sequence (bottom-right alignment), int32 [B, Tq]."""
  return jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32) + (k_len - q_len), (batch, q_len))


def gibbs_attention(
  q: Array,
  k: Array,
  v: Array,
  *,
  temperature: Union[None, float, Array] = None,
  is_causal: bool = True,
  q_positions: Optional[Array] = None,
  kv_positions: Optional[Array] = None,
  q_lengths: Optional[Array] = None,
  kv_lengths: Optional[Array] = None,
  return_stats: bool = False,
  implementation: Optional[str] = None,
  blocks: Optional[FlashBlocks] = None,
):
  """Causal softmax attention at temperature T, optionally with its observables.

  Args:
    q: queries [B, Tq, N, H].
    k, v: keys and values [B, Tk, K, H]; N must be a multiple of K.
    temperature: None for sqrt(H), a scalar, or a per-head [N] array; may be traced
      (gradients flow to it).
    is_causal: key j is visible to query i iff kv_positions[b, j] <= q_positions[b, i].
    q_positions: int [B, Tq] query positions (gathered queries, decoding). Default: the
      LAST Tq positions, kv_positions[:, Tk - Tq:] (bottom-right alignment): with the
      default keys, query i sees keys 0..Tk - Tq + i. If Tq > Tk the default is
      arange(Tk - Tq, Tk) and the first Tq - Tk queries see no key.
      jax.nn.dot_product_attention(is_causal=True) and torch's
      scaled_dot_product_attention(is_causal=True) align top-left instead (query i sees
      keys 0..i): the two agree only when Tq == Tk; q_positions=arange(Tq) gives theirs.
    kv_positions: int [B, Tk] key positions. Default: arange(Tk).
      Positions increase along each row (checked where the values are concrete).
    q_lengths: int [B], query slots held per row; slots i >= q_lengths[b] are padding:
      their outputs are zero (and cuDNN and the Pallas kernel skip them).
    kv_lengths: int [B], keys per row; keys j >= kv_lengths[b] are invisible and unread.
    return_stats: also return ThermoStats (float32 [B, Tq, N]; NaN at queries that see
      no key), computed by attention_stats in an extra pass.
    implementation: "xla", "cudnn", "pallas" (tgn_jax.ops.flash: skips the tiles no
      query sees, in the forward and both backward kernels; interpret mode off GPU) or
      None (cuDNN on GPU for 16-bit inputs, else XLA).
    blocks: tile sizes of the "pallas" implementation (default FlashBlocks()).

  Returns:
    out [B, Tq, N, H] in q's dtype, or (out, ThermoStats) if return_stats. A query that
    sees no key (padding, kv_lengths 0, or every key after it) has output zero.
  """
  batch, q_len, n_heads, head_dim = _check_qkv(q, k, v)
  k_len = k.shape[1]
  temperature_N = _check_temperature(temperature, n_heads, head_dim)
  q_positions, kv_positions, q_lengths, kv_lengths, q_pos, kv_pos = _visibility(
    batch, q_len, k_len, is_causal, q_positions, kv_positions, q_lengths, kv_lengths
  )
  impl = _resolve_implementation(implementation, q.dtype, head_dim)
  if blocks is not None and impl != "pallas":
    raise ValueError(f"blocks are for implementation='pallas', got {impl!r}")

  q_scaled = (q.astype(jnp.float32) / temperature_N[:, None]).astype(q.dtype)
  if impl == "pallas":
    out, _ = flash.flash_attention(
      q_scaled, k, v, q_pos, kv_pos, blocks=blocks or flash.FlashBlocks()
    )
  else:
    plain = is_causal and q_positions is None and kv_positions is None and q_len == k_len
    masked = not plain and (is_causal or q_positions is not None or kv_positions is not None)
    out = _masked_attention(
      q_scaled,
      k,
      v,
      q_pos,
      kv_pos,
      plain=plain,
      masked=masked,
      q_lengths=q_lengths,
      kv_lengths=kv_lengths,
      implementation=impl,
    )
    if masked or q_lengths is not None or kv_lengths is not None:
      answered = kv_pos[:, :1] <= q_pos  # the first key is the smallest: anything visible?
      out = jnp.where(answered[:, :, None, None], out, jnp.zeros((), out.dtype))
  if not return_stats:
    return out
  stats = _stats(q, k, temperature_N, q_pos, kv_pos)
  return out, stats


def _masked_attention(
  q, k, v, q_pos, kv_pos, *, plain: bool, masked: bool, q_lengths, kv_lengths, implementation: str
) -> Array:
  """jax.nn.dot_product_attention with the position mask as a [B, 1, Tq, Tk] mask (a
  bias in cuDNN) when `masked`, its plain causal mask when `plain`, and the lengths."""
  batch, q_len, k_len = q.shape[0], q.shape[1], k.shape[1]
  q_pad = q_len % 2 if implementation == "cudnn" and masked else 0
  k_pad = k_len % 2 if implementation == "cudnn" and masked else 0
  if q_pad or k_pad:  # cuDNN's backward with a bias needs even lengths: pad, never read
    pad = lambda x, n, fill=0: jnp.pad(
      x, ((0, 0), (0, n)) + ((0, 0),) * (x.ndim - 2), constant_values=fill
    )
    q, k, v = pad(q, q_pad), pad(k, k_pad), pad(v, k_pad)
    q_pos, kv_pos = pad(q_pos, q_pad, flash.PAD_QUERY), pad(kv_pos, k_pad, flash.PAD_KEY)
    q_lengths = jnp.full((batch,), q_len, jnp.int32) if q_lengths is None else q_lengths
    kv_lengths = jnp.full((batch,), k_len, jnp.int32) if kv_lengths is None else kv_lengths
  mask = (kv_pos[:, None, :] <= q_pos[:, :, None])[:, None] if masked else None
  out = jax.nn.dot_product_attention(
    q,
    k,
    v,
    mask=mask,
    scale=1.0,
    is_causal=plain,
    query_seq_lengths=q_lengths,
    key_value_seq_lengths=kv_lengths,
    implementation=implementation,
  )
  return out[:, :q_len]


def _visibility(
  batch: int,
  q_len: int,
  k_len: int,
  is_causal: bool,
  q_positions,
  kv_positions,
  q_lengths,
  kv_lengths,
):
  """The checked arguments (q_positions, kv_positions, q_lengths, kv_lengths) and their
  encoding (q_pos, kv_pos): see encode_positions."""
  q_positions = _check_positions("q_positions", q_positions, batch, q_len, q_lengths)
  kv_positions = _check_positions("kv_positions", kv_positions, batch, k_len, kv_lengths)
  q_lengths = _check_lengths("q_lengths", q_lengths, batch, q_len)
  kv_lengths = _check_lengths("kv_lengths", kv_lengths, batch, k_len)
  q_pos, kv_pos = encode_positions(
    batch,
    q_len,
    k_len,
    is_causal=is_causal,
    q_positions=q_positions,
    kv_positions=kv_positions,
    q_lengths=q_lengths,
    kv_lengths=kv_lengths,
  )
  return q_positions, kv_positions, q_lengths, kv_lengths, q_pos, kv_pos


def encode_positions(
  batch: int,
  q_len: int,
  k_len: int,
  *,
  is_causal: bool = True,
  q_positions=None,
  kv_positions=None,
  q_lengths=None,
  kv_lengths=None,
) -> tuple[Array, Array]:
  """The visibility of every key to every query as one rule, int32 [B, Tq] and [B, Tk]:
  key j is visible to query i iff kv_pos[j] <= q_pos[i]. Padding query slots are at
  flash.PAD_QUERY, unread keys at flash.PAD_KEY, non-causal queries at flash.ALL_KEYS."""
  if kv_positions is None:
    kv_positions = jnp.broadcast_to(jnp.arange(k_len, dtype=jnp.int32), (batch, k_len))
  if q_positions is None:
    q_positions = (
      kv_positions[:, k_len - q_len :] if q_len <= k_len else default_positions(batch, q_len, k_len)
    )
  q_pos = (
    q_positions.astype(jnp.int32)
    if is_causal
    else jnp.full((batch, q_len), flash.ALL_KEYS, jnp.int32)
  )
  kv_pos = kv_positions.astype(jnp.int32)
  if q_lengths is not None:
    q_pos = jnp.where(jnp.arange(q_len)[None, :] < q_lengths[:, None], q_pos, flash.PAD_QUERY)
  if kv_lengths is not None:
    kv_pos = jnp.where(jnp.arange(k_len)[None, :] < kv_lengths[:, None], kv_pos, flash.PAD_KEY)
  return q_pos, kv_pos


def attention_stats(
  q: Array,
  k: Array,
  *,
  temperature: Union[None, float, Array] = None,
  is_causal: bool = True,
  q_positions: Optional[Array] = None,
  kv_positions: Optional[Array] = None,
  q_lengths: Optional[Array] = None,
  kv_lengths: Optional[Array] = None,
  key_chunk: int = 1024,
  query_chunk: int = 1024,
) -> ThermoStats:
  """Thermodynamic observables of softmax(q.k / T), float32 [B, Tq, N].

  Streams over key blocks (online max, partition sum, mean and variance merged with
  Chan's parallel formula), so memory is O(query_chunk * key_chunk) per head and the
  variance is computed without cancellation. Masked keys are excluded exactly. The
  arguments mean what they mean in gibbs_attention; queries that see no key are NaN.
  """
  batch, q_len, n_heads, head_dim = _check_qkv(q, k, k)
  temperature_N = _check_temperature(temperature, n_heads, head_dim)
  *_, q_pos, kv_pos = _visibility(
    batch, q_len, k.shape[1], is_causal, q_positions, kv_positions, q_lengths, kv_lengths
  )
  return _stats(q, k, temperature_N, q_pos, kv_pos, key_chunk=key_chunk, query_chunk=query_chunk)


def _stats(
  q, k, temperature_N, q_pos, kv_pos, *, key_chunk: int = 1024, query_chunk: int = 1024
) -> ThermoStats:
  """attention_stats on encoded positions (see encode_positions)."""
  batch, q_len, n_heads, head_dim = q.shape
  k_len, kv_heads = k.shape[1], k.shape[2]
  group = n_heads // kv_heads
  q_block = min(query_chunk, q_len)
  k_block = min(key_chunk, k_len)
  q_pad = -q_len % q_block
  k_pad = -k_len % k_block
  # [B, Tq, K, G, H] queries scaled by 1/T in float32.
  q_BQKGH = (q.astype(jnp.float32) / temperature_N[:, None]).reshape(
    batch, q_len, kv_heads, group, head_dim
  )
  q_BQKGH = jnp.pad(q_BQKGH, ((0, 0), (0, q_pad), (0, 0), (0, 0), (0, 0)))
  pos_BQ = jnp.pad(q_pos, ((0, 0), (0, q_pad)), constant_values=flash.PAD_QUERY)
  k_BSKH = jnp.pad(k, ((0, 0), (0, k_pad), (0, 0), (0, 0)))
  kv_pos_BS = jnp.pad(kv_pos, ((0, 0), (0, k_pad)), constant_values=flash.PAD_KEY)
  n_q_blocks = (q_len + q_pad) // q_block
  n_k_blocks = (k_len + k_pad) // k_block
  # Blocks first, for lax.map / lax.scan.
  q_blocks = jnp.moveaxis(
    q_BQKGH.reshape(batch, n_q_blocks, q_block, kv_heads, group, head_dim), 1, 0
  )
  pos_blocks = jnp.moveaxis(pos_BQ.reshape(batch, n_q_blocks, q_block), 1, 0)
  k_blocks = jnp.moveaxis(k_BSKH.reshape(batch, n_k_blocks, k_block, kv_heads, head_dim), 1, 0)
  kv_pos_blocks = jnp.moveaxis(kv_pos_BS.reshape(batch, n_k_blocks, k_block), 1, 0)

  def one_query_block(args):
    q_bqkgh, pos_bq = args

    def merge_key_block(carry, block):
      k_bskh, kv_pos_bs = block
      s = jnp.einsum(
        "bqkgh,bskh->bkgqs", q_bqkgh, k_bskh.astype(jnp.float32), preferred_element_type=jnp.float32
      )
      visible = kv_pos_bs[:, None, :] <= pos_bq[:, :, None]  # [B, q, s]
      visible = jnp.broadcast_to(visible[:, None, None], s.shape)
      return _merge_moments(carry, _block_moments(s, visible)), None

    shape = (batch, kv_heads, group, q_block)
    init = (jnp.full(shape, _NEG), jnp.zeros(shape), jnp.zeros(shape), jnp.zeros(shape))
    (m, l, mean, m2), _ = jax.lax.scan(merge_key_block, init, (k_blocks, kv_pos_blocks))
    return m, l, mean, m2

  m, l, mean, m2 = jax.lax.map(one_query_block, (q_blocks, pos_blocks))

  def to_BQN(x):  # [nQ, B, K, G, q] -> [B, Tq, N]
    x = jnp.moveaxis(x, 0, 3).reshape(batch, kv_heads, group, n_q_blocks * q_block)
    return jnp.moveaxis(x.reshape(batch, n_heads, -1), 1, 2)[:, :q_len]

  m, l, mean, m2 = map(to_BQN, (m, l, mean, m2))
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  log_z = m + jnp.log(l_safe)
  t = temperature_N[None, None, :]
  stats = ThermoStats(
    log_partition=log_z,
    free_energy=-t * log_z,
    internal_energy=-t * mean,
    entropy=log_z - mean,
    specific_heat=m2 / l_safe,
  )
  return jax.tree.map(lambda x: jnp.where(seen, x, jnp.nan), stats)


def _block_moments(s: Array, visible: Array):
  """Max, partition sum, mean and sum of squared deviations of one key block."""
  m = jax.lax.stop_gradient(jnp.max(jnp.where(visible, s, _NEG), axis=-1))
  w = jnp.where(visible, jnp.exp(jnp.where(visible, s, m[..., None]) - m[..., None]), 0.0)
  l = jnp.sum(w, axis=-1)
  s0 = jnp.where(visible, s, 0.0)
  mean = jnp.sum(w * s0, axis=-1) / jnp.where(l > 0, l, 1.0)
  m2 = jnp.sum(w * jnp.square(s0 - mean[..., None]), axis=-1)
  return m, l, mean, m2


def _merge_moments(a, b):
  """Chan et al.'s merge of two weighted (mean, M2) summaries under a shared max."""
  m_a, l_a, mean_a, m2_a = a
  m_b, l_b, mean_b, m2_b = b
  m = jnp.maximum(m_a, m_b)
  scale_a, scale_b = jnp.exp(m_a - m), jnp.exp(m_b - m)
  w_a, w_b = l_a * scale_a, l_b * scale_b
  w = w_a + w_b
  w_safe = jnp.where(w > 0, w, 1.0)
  delta = mean_b - mean_a
  mean = mean_a + delta * (w_b / w_safe)
  m2 = m2_a * scale_a + m2_b * scale_b + jnp.square(delta) * (w_a * w_b / w_safe)
  return m, w, mean, m2


def _check_qkv(q, k, v):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or x.ndim != 4:  # by hand: chex would read a list as several inputs
      raise ValueError(
        f"{name} must be a 4-D array [B, T, heads, head_dim], got shape "
        f"{getattr(x, 'shape', type(x).__name__)}"
      )
    chex.assert_type(
      x, float, custom_message=f"{name} must be floating point", exception_type=TypeError
    )
  flash.check_qkv(q, k, v)
  return q.shape


def _check_temperature(temperature, n_heads: int, head_dim: int) -> Array:
  """Temperature as float32 [N]."""
  if temperature is None:
    return jnp.full((n_heads,), math.sqrt(head_dim), jnp.float32)
  if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
    if not temperature > 0:
      raise ValueError(f"temperature must be positive, got {temperature}")
    return jnp.full((n_heads,), temperature, jnp.float32)
  temperature = jnp.asarray(temperature, jnp.float32)
  if temperature.shape not in ((), (n_heads,)):
    raise ValueError(
      f"temperature must be a scalar or a per-head array of shape ({n_heads},), "
      f"got shape {temperature.shape}"
    )
  return jnp.broadcast_to(temperature, (n_heads,))


def _check_positions(name: str, positions, batch: int, length: int, lengths=None):
  """Positions as int32 [B, T]; concrete values must increase along each row (within
  the row's length when one is given)."""
  if positions is None:
    return None
  positions = jnp.asarray(positions)
  chex.assert_type(
    positions, int, custom_message=f"{name} must be integer", exception_type=TypeError
  )
  chex.assert_shape(
    positions,
    (batch, length),
    custom_message=f"{name} must have shape [B, T]",
    exception_type=ValueError,
  )
  if not isinstance(positions, jax.core.Tracer) and not isinstance(lengths, jax.core.Tracer):
    values = np.asarray(positions, np.int64)
    steps = np.diff(values, axis=1) < 0
    if lengths is not None:
      steps &= np.arange(1, length)[None, :] < np.asarray(lengths).reshape(-1, 1)
    if steps.any():
      row = int(np.argmax(steps.any(axis=1)))
      raise ValueError(f"{name} must increase along each row; row {row} does not")
  return positions.astype(jnp.int32)


def _check_lengths(name: str, lengths, batch: int, limit: int):
  """Per-row lengths as int32 [B]; values in [0, limit] are checked when concrete."""
  if lengths is None:
    return None
  lengths = jnp.asarray(lengths)
  chex.assert_type(lengths, int, custom_message=f"{name} must be integer", exception_type=TypeError)
  chex.assert_shape(
    lengths, (batch,), custom_message=f"{name} must have shape [B]", exception_type=ValueError
  )
  if not isinstance(lengths, jax.core.Tracer):
    values = np.asarray(lengths)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > limit:
      raise ValueError(f"{name} must lie in [0, {limit}], got values in [{low}, {high}]")
  return lengths.astype(jnp.int32)


def _resolve_implementation(implementation, dtype, head_dim: int):
  if implementation not in (None, "xla", "cudnn", "pallas"):
    raise ValueError(
      f"implementation must be 'xla', 'cudnn', 'pallas' or None, got {implementation!r}"
    )
  if implementation is not None:
    return implementation
  cudnn_ok = (
    jax.default_backend() == "gpu"
    and dtype in (jnp.bfloat16, jnp.float16)
    and head_dim % 8 == 0
    and head_dim <= 128
  )
  return "cudnn" if cudnn_ok else "xla"
