"""Small building blocks: the MLP and the gate head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tgn_jax.config import TGNConfig


def linear(
  config: TGNConfig,
  d_in: int,
  d_out: int,
  *,
  rngs: nnx.Rngs,
  use_bias: bool = False,
  dtype=None,
  **kwargs,
) -> nnx.Linear:
  """nnx.Linear in the config's compute dtype (or `dtype`) and parameter dtype."""
  return nnx.Linear(
    d_in,
    d_out,
    use_bias=use_bias,
    dtype=dtype or config.compute_dtype,
    param_dtype=config.weight_dtype,
    rngs=rngs,
    **kwargs,
  )


class Identity(nnx.Module):
  """x -> x (the norm of config.norm="none")."""

  def __call__(self, x):
    return x


def rms_norm(config: TGNConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """RMSNorm over D, or the identity with config.norm="none"."""
  if config.norm == "none":
    return Identity()
  return nnx.RMSNorm(
    config.d_model,
    epsilon=1e-6,
    dtype=config.compute_dtype,
    param_dtype=config.weight_dtype,
    rngs=rngs,
  )


class MLP(nnx.Module):
  """Position-wise MLP (GELU or ReLU: config.mlp_activation), [B, T, D] -> [B, T, D]."""

  def __init__(self, config: TGNConfig, *, rngs: nnx.Rngs):
    self.up = linear(config, config.d_model, config.mlp_dim, rngs=rngs)
    self.down = linear(config, config.mlp_dim, config.d_model, rngs=rngs)
    self.activation = jax.nn.relu if config.mlp_activation == "relu" else jax.nn.gelu

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    return self.down(self.activation(self.up(x_BTD)))


class GateOffset(nnx.Variable):
  """A shift of the gate logit that training sets, not the optimizer: the moving-quantile
  control's threshold (float32 scalar per layer; 0 under the lambda thermostat)."""


class GateHead(nnx.Module):
  """The gate logit MLP(input_t) - offset of each token, float32 [B, T]; g_t = sigmoid(logit).

  Its input is the recurrence's output r_t (gate_input="recurrence") or [norm(x_t), r_t]
  ("both"): both are causal, so the gate is. The offset (GateOffset) carries no gradient;
  it is the same in training and decoding. Computed in float32 whatever the compute dtype:
  the decision compares logits that can grow large under the quantile control.
  """

  def __init__(self, config: TGNConfig, *, rngs: nnx.Rngs):
    width = config.d_model * (2 if config.gate_input == "both" else 1)
    self.hidden = linear(
      config, width, config.gate_dim, rngs=rngs, use_bias=True, dtype=jnp.float32
    )
    self.out = linear(
      config,
      config.gate_dim,
      1,
      rngs=rngs,
      use_bias=True,
      dtype=jnp.float32,
      bias_init=nnx.initializers.constant(config.gate_bias_init),
    )
    self.offset = GateOffset(jnp.zeros((), jnp.float32))

  def __call__(self, input_BTD: jax.Array) -> jax.Array:
    logit = self.out(jax.nn.gelu(self.hidden(input_BTD)))[..., 0]
    return logit - jax.lax.stop_gradient(self.offset[...])
