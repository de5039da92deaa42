"""The inertia channel: recurrences as pure functions, each with a one-step form.

All state is float32 whatever the input dtype. Shapes: B batch, T time, D width; a wrong
rank or shape raises ValueError naming the argument (chex assertions).
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

Array = jax.Array


def _check_sequences(
  op: str, names: str, x_BTD: Array, y_BTD: Array, h0_BD: Optional[Array]
) -> None:
  """x and y [B, T, D] of one shape, h0 [B, D] or None."""
  chex.assert_rank(
    [x_BTD, y_BTD], 3, custom_message=f"{op}: {names} must be [B, T, D]", exception_type=ValueError
  )
  chex.assert_equal_shape(
    [x_BTD, y_BTD], custom_message=f"{op}: {names} must have one shape", exception_type=ValueError
  )
  if h0_BD is not None:
    chex.assert_shape(
      h0_BD,
      (x_BTD.shape[0], x_BTD.shape[2]),
      custom_message=f"{op}: h0 must be [B, D]",
      exception_type=ValueError,
    )


def _check_gru_weights(op: str, w_hh_D3D: Array, b_hh_3D: Array) -> int:
  """The width D of w_hh [D, 3D] and b_hh [3D]."""
  chex.assert_rank(
    w_hh_D3D, 2, custom_message=f"{op}: w_hh must be [D, 3D]", exception_type=ValueError
  )
  d = w_hh_D3D.shape[0]
  chex.assert_shape(
    w_hh_D3D, (d, 3 * d), custom_message=f"{op}: w_hh must be [D, 3D]", exception_type=ValueError
  )
  chex.assert_shape(
    b_hh_3D, (3 * d,), custom_message=f"{op}: b_hh must be [3D]", exception_type=ValueError
  )
  return d


def linear_recurrence(
  a_BTD: Array, b_BTD: Array, h0_BD: Optional[Array] = None, *, parallel: bool = True
) -> Array:
  """h_t = a_t * h_{t-1} + b_t (elementwise), h_{-1} = h0 (zeros by default).

  parallel=True uses jax.lax.associative_scan (O(log T) depth); False is the
  sequential lax.scan form of the same recurrence. Returns float32 [B, T, D].
  """
  _check_sequences("linear_recurrence", "a and b", a_BTD, b_BTD, h0_BD)
  a = a_BTD.astype(jnp.float32)
  b = b_BTD.astype(jnp.float32)
  if h0_BD is not None:
    # Fold the initial state into the first input: b_0 <- a_0 h0 + b_0.
    b = b.at[:, 0].add(a[:, 0] * h0_BD.astype(jnp.float32))
  if parallel:

    def combine(left, right):
      a_l, b_l = left
      a_r, b_r = right
      return a_l * a_r, a_r * b_l + b_r

    _, h = jax.lax.associative_scan(combine, (a, b), axis=1)
    return h

  def step(h, ab):
    a_t, b_t = ab
    h = a_t * h + b_t
    return h, h

  h0 = jnp.zeros_like(a[:, 0])
  _, h_TBD = jax.lax.scan(step, h0, (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1)))
  return jnp.swapaxes(h_TBD, 0, 1)


def min_gru(
  gate_logits_BTD: Array,
  candidate_BTD: Array,
  h0_BD: Optional[Array] = None,
  *,
  parallel: bool = True,
) -> Array:
  """minGRU (Feng et al. 2024): z = sigmoid(gate), h_t = (1 - z) h_{t-1} + z * candidate.

  The paper's plain minGRU, scanned in linear space with the candidate used as given
  (unconstrained, any sign). Not its log-space variant, which passes the candidate through
  g(x) = x + 0.5 for x >= 0, sigmoid(x) otherwise (positive states) and which
  lucidrains/minGRU-pytorch implements. Inputs [B, T, D]; returns float32 states [B, T, D].
  """
  _check_sequences("min_gru", "gate_logits and candidate", gate_logits_BTD, candidate_BTD, h0_BD)
  logits = gate_logits_BTD.astype(jnp.float32)
  z = jax.nn.sigmoid(logits)
  keep = jax.nn.sigmoid(-logits)  # 1 - z without cancellation
  return linear_recurrence(keep, z * candidate_BTD.astype(jnp.float32), h0_BD, parallel=parallel)


def min_gru_step(gate_logits_BD: Array, candidate_BD: Array, h_BD: Array) -> Array:
  """One minGRU step from state h [B, D]; returns the new float32 state."""
  message = "min_gru_step: gate_logits, candidate and h must all be [B, D]"
  chex.assert_rank(
    [gate_logits_BD, candidate_BD, h_BD], 2, custom_message=message, exception_type=ValueError
  )
  chex.assert_equal_shape(
    [gate_logits_BD, candidate_BD, h_BD], custom_message=message, exception_type=ValueError
  )
  logits = gate_logits_BD.astype(jnp.float32)
  return jax.nn.sigmoid(-logits) * h_BD.astype(jnp.float32) + jax.nn.sigmoid(
    logits
  ) * candidate_BD.astype(jnp.float32)


def gru_step(x_proj_B3D: Array, w_hh_D3D: Array, b_hh_3D: Array, h_BD: Array) -> Array:
  """One step of torch.nn.GRU (gate order r, z, n) from state h [B, D].

  x_proj = W_ih x + b_ih [B, 3D] is precomputed for all tokens; w_hh [D, 3D], b_hh [3D].
    r = sigmoid(x_r + h W_hr + b_hr); z = sigmoid(x_z + h W_hz + b_hz)
    n = tanh(x_n + r * (h W_hn + b_hn)); h' = (1 - z) n + z h
  """
  d = _check_gru_weights("gru_step", w_hh_D3D, b_hh_3D)
  chex.assert_rank(h_BD, 2, custom_message="gru_step: h must be [B, D]", exception_type=ValueError)
  chex.assert_shape(
    h_BD, (None, d), custom_message="gru_step: h must be [B, D]", exception_type=ValueError
  )
  chex.assert_shape(
    x_proj_B3D,
    (h_BD.shape[0], 3 * d),
    custom_message="gru_step: x_proj must be [B, 3D]",
    exception_type=ValueError,
  )
  h = h_BD.astype(jnp.float32)
  h_proj = jnp.dot(
    h.astype(w_hh_D3D.dtype), w_hh_D3D, preferred_element_type=jnp.float32
  ) + b_hh_3D.astype(jnp.float32)
  x_r, x_z, x_n = jnp.split(x_proj_B3D.astype(jnp.float32), 3, axis=-1)
  h_r, h_z, h_n = jnp.split(h_proj, 3, axis=-1)
  r = jax.nn.sigmoid(x_r + h_r)
  z = jax.nn.sigmoid(x_z + h_z)
  n = jnp.tanh(x_n + r * h_n)
  return (1.0 - z) * n + z * h


def gru(
  x_proj_BT3D: Array, w_hh_D3D: Array, b_hh_3D: Array, h0_BD: Optional[Array] = None
) -> Array:
  """torch.nn.GRU over time with lax.scan; returns float32 hidden states [B, T, D].

  x_proj [B, T, 3D] (see gru_step), w_hh [D, 3D], b_hh [3D], h0 [B, D] or None (zeros).
  """
  d = _check_gru_weights("gru", w_hh_D3D, b_hh_3D)
  chex.assert_rank(
    x_proj_BT3D, 3, custom_message="gru: x_proj must be [B, T, 3D]", exception_type=ValueError
  )
  chex.assert_shape(
    x_proj_BT3D,
    (None, None, 3 * d),
    custom_message="gru: x_proj must be [B, T, 3D]",
    exception_type=ValueError,
  )
  batch, _, three_d = x_proj_BT3D.shape
  if h0_BD is not None:
    chex.assert_shape(
      h0_BD, (batch, d), custom_message="gru: h0 must be [B, D]", exception_type=ValueError
    )
  h0 = jnp.zeros((batch, three_d // 3), jnp.float32) if h0_BD is None else h0_BD

  def step(h, x_proj_B3D):
    h = gru_step(x_proj_B3D, w_hh_D3D, b_hh_3D, h)
    return h, h

  _, h_TBD = jax.lax.scan(step, h0.astype(jnp.float32), jnp.swapaxes(x_proj_BT3D, 0, 1))
  return jnp.swapaxes(h_TBD, 0, 1)
