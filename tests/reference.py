"""Float64 NumPy references for the tests, and the tiny model config they share."""

import numpy as np


def attention_reference_np(
  q,
  k,
  v,
  temperature,
  q_positions=None,
  is_causal=True,
  kv_positions=None,
  q_lengths=None,
  kv_lengths=None,
):
  """Float64 NumPy reference: (out [B,Tq,N,H], dict of observables [B,Tq,N]). For tests.

  Key j is visible to query i iff kv_positions[j] <= q_positions[i] (causal), both within
  their row's length. A query that sees no key has output 0 and NaN observables.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, q_len, n_heads, _ = q.shape
  k_len, kv_heads = k.shape[1], k.shape[2]
  rep = n_heads // kv_heads
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  temp = np.broadcast_to(np.asarray(temperature, np.float64), (n_heads,))
  energy = -np.einsum("bqnh,bsnh->bnqs", q, k)
  logits = -energy / temp[None, :, None, None]
  kv_pos = (
    np.arange(k_len)[None] + np.zeros((batch, 1), int)
    if kv_positions is None
    else np.asarray(kv_positions)
  )
  if q_positions is None:
    q_positions = kv_pos[:, k_len - q_len :]
  visible = np.ones((batch, q_len, k_len), bool)
  if is_causal:
    visible = kv_pos[:, None, :] <= np.asarray(q_positions)[:, :, None]
  if q_lengths is not None:
    visible &= (np.arange(q_len)[None, :] < np.asarray(q_lengths)[:, None])[:, :, None]
  if kv_lengths is not None:
    visible &= (np.arange(k_len)[None, :] < np.asarray(kv_lengths)[:, None])[:, None, :]
  visible = visible[:, None]
  logits = np.where(visible, logits, -np.inf)
  seen = visible.any(-1, keepdims=True)
  m = np.where(seen, logits.max(-1, keepdims=True), 0.0)
  w = np.where(visible, np.exp(logits - m), 0.0)
  z = w.sum(-1, keepdims=True)
  p = w / np.where(seen, z, 1.0)
  with np.errstate(divide="ignore"):
    log_z = (m + np.log(z))[..., 0]
  e0 = np.where(visible, energy, 0.0)
  u = (p * e0).sum(-1)
  s = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(-1)
  var = (p * (e0 - u[..., None]) ** 2).sum(-1)
  t = temp[None, :, None]
  out = np.einsum("bnqs,bsnh->bqnh", p, v)
  stats = dict(
    log_partition=log_z,
    free_energy=-t * log_z,
    internal_energy=u,
    entropy=s,
    specific_heat=var / t**2,
  )
  stats = {name: np.where(seen[..., 0], x, np.nan) for name, x in stats.items()}
  return out, {name: np.moveaxis(x, 1, 2) for name, x in stats.items()}


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def gru_reference_np(x_proj, w_hh, b_hh, h0=None):
  """torch.nn.GRU equations in float64: x_proj [B, T, 3D] = W_ih x + b_ih."""
  x_proj, w_hh, b_hh = (np.asarray(a, np.float64) for a in (x_proj, w_hh, b_hh))
  batch, seq_len, three_d = x_proj.shape
  d = three_d // 3
  h = np.zeros((batch, d)) if h0 is None else np.asarray(h0, np.float64)
  out = []
  for t in range(seq_len):
    x_r, x_z, x_n = np.split(x_proj[:, t], 3, axis=-1)
    h_r, h_z, h_n = np.split(h @ w_hh + b_hh, 3, axis=-1)
    r = sigmoid(x_r + h_r)
    z = sigmoid(x_z + h_z)
    n = np.tanh(x_n + r * h_n)
    h = (1 - z) * n + z * h
    out.append(h)
  return np.stack(out, axis=1)


VOCAB, SEQ = 23, 16


def tiny_config(**overrides):
  """A TGNConfig small enough for CPU tests: vocabulary 23, 2 layers of width 16, segments of
  8 tokens, capacities rounded to single tokens."""
  from tgn_jax import TGNConfig

  base = dict(
    vocab_size=VOCAB,
    d_model=16,
    n_layers=2,
    n_heads=2,
    max_seq_len=32,
    d_mlp=32,
    capacity_buckets=(0.25, 0.5, 1.0),
    segment_len=8,
    capacity_multiple=1,
  )
  return TGNConfig(**{**base, **overrides})
