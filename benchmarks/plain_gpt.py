"""A plain JAX GPT: the floor for the library's own Transformer baseline.

Pure jax + optax, no Flax: the shape of TGNLM with mixer="attention" (tied embedding,
pre-RMSNorm, RoPE, no biases, GELU MLP), bf16 compute with fp32 parameters cast once per
step, a lax.scan over stacked layers, cuDNN attention on GPU (XLA elsewhere), fp32
logits and optax's cross-entropy, AdamW after global-norm clipping. If the library's
Transformer trains slower than this, every TGN ratio measured against it is flattered.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def init(key, *, vocab: int, d_model: int, n_layers: int, n_heads: int, d_mlp: int) -> dict:
  """fp32 parameters; block weights stacked on a leading [n_layers] axis."""
  del n_heads
  k_embed, k_qkv, k_out, k_up, k_down = jax.random.split(key, 5)

  def dense(k, d_in, d_out):
    return jax.random.normal(k, (n_layers, d_in, d_out), jnp.float32) / math.sqrt(d_in)

  return {
    "embed": jax.random.normal(k_embed, (vocab, d_model), jnp.float32) / math.sqrt(d_model),
    "final_norm": jnp.ones((d_model,), jnp.float32),
    "blocks": {
      "norm_attn": jnp.ones((n_layers, d_model), jnp.float32),
      "qkv": dense(k_qkv, d_model, 3 * d_model),
      "out": dense(k_out, d_model, d_model),
      "norm_mlp": jnp.ones((n_layers, d_model), jnp.float32),
      "up": dense(k_up, d_model, d_mlp),
      "down": dense(k_down, d_mlp, d_model),
    },
  }


def _rms_norm(x, scale):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + 1e-6)
  return (x32 * scale).astype(x.dtype)


def _rope(x_BTNH):
  seq_len, head_dim = x_BTNH.shape[1], x_BTNH.shape[3]
  inv_freq = 10_000.0 ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]  # [T, H/2]
  sin, cos = jnp.sin(angles)[None, :, None], jnp.cos(angles)[None, :, None]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BTNH.dtype)


def loss_fn(
  params, inputs_BT, targets_BT, *, n_heads: int, dtype=jnp.bfloat16, remat: bool = False
):
  """Mean next-token cross-entropy (nats); remat recomputes each layer in the backward."""
  batch, seq_len = inputs_BT.shape
  d_model = params["embed"].shape[1]
  head_dim = d_model // n_heads
  cast = jax.tree.map(lambda p: p.astype(dtype), params)
  impl = "cudnn" if jax.default_backend() == "gpu" and dtype != jnp.float32 else None

  def layer(x, p):
    h = _rms_norm(x, p["norm_attn"])
    q, k, v = jnp.split((h @ p["qkv"]).reshape(batch, seq_len, 3 * n_heads, head_dim), 3, axis=2)
    a = jax.nn.dot_product_attention(_rope(q), _rope(k), v, is_causal=True, implementation=impl)
    x = x + a.reshape(batch, seq_len, d_model) @ p["out"]
    h = _rms_norm(x, p["norm_mlp"])
    return x + jax.nn.gelu(h @ p["up"]) @ p["down"], None

  if remat:
    layer = jax.checkpoint(layer, prevent_cse=False)
  x = cast["embed"][inputs_BT]
  x, _ = jax.lax.scan(layer, x, cast["blocks"])
  x = _rms_norm(x, cast["final_norm"])
  logits = jnp.einsum("btd,vd->btv", x, cast["embed"], preferred_element_type=jnp.float32)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets_BT))


def make_optimizer(
  lr: float, *, clip_norm: float = 1.0, b1: float = 0.9, b2: float = 0.99, weight_decay: float = 0.1
) -> optax.GradientTransformation:
  return optax.chain(
    optax.clip_by_global_norm(clip_norm), optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay)
  )


def make_step(
  optimizer: optax.GradientTransformation, *, n_heads: int, dtype=jnp.bfloat16, remat: bool = False
):
  """A jitted step(params, opt_state, inputs, targets) -> (params, opt_state, loss),
  donating params and optimizer state on accelerators."""

  def step(params, opt_state, inputs_BT, targets_BT):
    loss, grads = jax.value_and_grad(loss_fn)(
      params, inputs_BT, targets_BT, n_heads=n_heads, dtype=dtype, remat=remat
    )
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  donate = (0, 1) if jax.default_backend() != "cpu" else ()
  return jax.jit(step, donate_argnums=donate)
