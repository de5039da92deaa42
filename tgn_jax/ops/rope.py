"""Rotary position embeddings (RoFormer), applied to queries and keys."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

Array = jax.Array


def apply_rope(x_BTNH: Array, positions_BT: Array, base: float = 10_000.0) -> Array:
  """Rotates pairs (x[..., i], x[..., i + H/2]) by angle position * base^(-2i/H).

  x [B, T, N, H] (H even), positions int [B, T]; computed in float32, returned in x's dtype.
  Wrong shapes raise ValueError (chex assertions).
  """
  chex.assert_rank(
    x_BTNH, 4, custom_message="apply_rope: x must be [B, T, N, H]", exception_type=ValueError
  )
  chex.assert_shape(
    positions_BT,
    x_BTNH.shape[:2],
    exception_type=ValueError,
    custom_message="apply_rope: positions must be [B, T], x's first two axes",
  )
  chex.assert_is_divisible(
    x_BTNH.shape[-1],
    2,
    exception_type=ValueError,
    custom_message="apply_rope: the head dimension H must be even",
  )
  head_dim = x_BTNH.shape[-1]
  half = head_dim // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  sin = jnp.sin(angle_BTF)[:, :, None, :]
  cos = jnp.cos(angle_BTF)[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BTNH.dtype)
