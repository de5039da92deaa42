"""TGNLM: the TGN language model (and, by config, its Transformer and recurrent baselines)."""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tgn_jax.config import TGNConfig
from tgn_jax.nn.block import Block, LayerAux
from tgn_jax.nn.layers import rms_norm
from tgn_jax.ops.attention import ThermoStats

StatsMode = Literal[None, "mean", "token"]


class ModelAux(NamedTuple):
  """Per-layer gate and attention observables of one forward pass.

  gate_prob, gate: float32 [L, B, T]; open_rate, compute_rate: float32 [L] (fraction
  of tokens whose gate is open / whose attention was computed, exploration included);
  stats: ThermoStats of float32 [L] means over heads and the tokens whose attention
  was mixed in (NaN for a layer with none), or None; token_stats: ThermoStats
  [L, B, T, N] (NaN where attention was not computed) when requested.
  """

  gate_prob: jax.Array
  gate: jax.Array
  open_rate: jax.Array
  compute_rate: jax.Array
  stats: Optional[ThermoStats]
  token_stats: Optional[ThermoStats]


class TGNLM(nnx.Module):
  """Embedding, n_layers blocks (parameters stacked on a leading layer axis and run
  with lax.scan), final RMSNorm and a tied output head.

  `logits, aux = model(tokens)` with tokens int [B, T]; logits float32 [B, T, V].
  """

  def __init__(self, config: TGNConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, TGNConfig):
      raise TypeError(f"config must be a TGNConfig, got {type(config).__name__}")
    self.config = config
    self.embed = nnx.Embed(
        config.vocab_size, config.d_model, dtype=config.compute_dtype,
        param_dtype=config.weight_dtype, rngs=rngs,
        embedding_init=nnx.initializers.normal(stddev=1.0 / math.sqrt(config.d_model)))
    self.blocks = _stacked_blocks(config, rngs.params())
    self.final_norm = rms_norm(config, rngs=rngs)

  def __call__(self, tokens_BT: jax.Array, *, rng: Optional[jax.Array] = None,
               stats: StatsMode = "mean") -> tuple[jax.Array, ModelAux]:
    """Logits float32 [B, T, V] and ModelAux.

    rng: training randomness (Bernoulli gate sampling, exploration of closed gates);
      None runs deterministically (threshold gate, no exploration).
    stats: "mean" (per-layer means of the attention observables), "token" (also
      the per-token values) or None (skip their extra pass).
    """
    _check_tokens(tokens_BT, self.config)
    if stats not in (None, "mean", "token"):
      raise ValueError(f"stats must be None, 'mean' or 'token', got {stats!r}")
    graph_def, state = nnx.split(self)
    return _apply(graph_def, state, tokens_BT, rng, stats)

  def _forward(self, tokens_BT, *, rng, stats: StatsMode, cache_len: Optional[int] = None,
               last_logits_only: bool = False):
    cfg = self.config
    batch, seq_len = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    block_def, block_state = nnx.split(self.blocks)
    layer_keys = jax.random.split(rng, cfg.n_layers) if rng is not None else None

    def layer(x, inputs):
      state, key = inputs
      x, aux, cache = nnx.merge(block_def, state)(
          x, positions_BT, key=key, return_stats=stats is not None,
          cache_len=cache_len)
      return x, (aux, cache)

    if cfg.remat:
      layer = jax.checkpoint(layer, prevent_cse=False)
    x = self.embed(tokens_BT)
    x, (layer_aux, caches) = jax.lax.scan(layer, x, (block_state, layer_keys))
    if last_logits_only:  # prefill: [B, 1, V], not the full [B, T, V]
      x = x[:, -1:]
    return self._logits(x), _summarize(layer_aux, stats, cfg), caches

  def _logits(self, x_BTD: jax.Array) -> jax.Array:
    x = self.final_norm(x_BTD)
    table = self.embed.embedding[...].astype(x.dtype)
    return jnp.einsum("btd,vd->btv", x, table, preferred_element_type=jnp.float32)

  def generate(self, prompt_BP: jax.Array, max_new_tokens: int, *, temperature: float = 0.0,
               rng: Optional[jax.Array] = None) -> jax.Array:
    """Autoregressive generation with a KV cache and recurrent state.

    Greedy at temperature 0 (equal to repeated full forward passes); otherwise samples
    from softmax(logits / temperature) with `rng`. Returns int32 [B, P + max_new_tokens].
    """
    cfg = self.config
    _check_tokens(prompt_BP, cfg, name="prompt")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    total = prompt_BP.shape[1] + max_new_tokens
    if total > cfg.max_seq_len:
      raise ValueError(f"prompt length + max_new_tokens = {total} exceeds max_seq_len "
                       f"({cfg.max_seq_len})")
    if not temperature >= 0:
      raise ValueError(f"temperature must be >= 0, got {temperature}")
    sample = temperature > 0
    if sample and rng is None:
      raise ValueError("sampling (temperature > 0) needs an rng key")
    key = rng if rng is not None else jax.random.key(0)
    graph_def, state = nnx.split(self)
    return _generate(graph_def, state, jnp.asarray(prompt_BP, jnp.int32), key,
                     jnp.float32(max(temperature, 1e-6)), max_new_tokens, sample)


# Jitted entry points: eager calls then hit the compilation cache (keyed on the static
# model structure); inside a user's jit they are simply inlined.
@functools.partial(jax.jit, static_argnums=(0, 4))
def _apply(graph_def, state, tokens_BT, rng, stats):
  logits, aux, _ = nnx.merge(graph_def, state)._forward(tokens_BT, rng=rng, stats=stats)
  return logits, aux


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _generate(graph_def, state, prompt_BP, key, temperature, max_new_tokens: int, sample: bool):
  model: TGNLM = nnx.merge(graph_def, state)
  cfg = model.config
  prompt_len = prompt_BP.shape[1]
  logits, _, stacked = model._forward(prompt_BP, rng=None, stats=None,
                                      cache_len=prompt_len + max_new_tokens,
                                      last_logits_only=True)
  # Unstack once, outside the decode loop, so each step updates its caches in place.
  caches = tuple(jax.tree.map(lambda c: c[i], stacked) for i in range(cfg.n_layers))
  block_def, block_state = nnx.split(model.blocks)
  blocks = [nnx.merge(block_def, jax.tree.map(lambda p: p[i], block_state))
            for i in range(cfg.n_layers)]

  def pick(logits_BV, key):
    if sample:
      return jax.random.categorical(key, logits_BV / temperature).astype(jnp.int32)
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

  key, first_key = jax.random.split(key)
  first = pick(logits[:, -1], first_key)

  def decode(carry, step):
    token_B, caches, key = carry
    x = model.embed(token_B[:, None])
    new_caches = []
    for block, cache in zip(blocks, caches):
      x, cache = block.step(x, prompt_len + step, cache)
      new_caches.append(cache)
    key, sub = jax.random.split(key)
    return (pick(model._logits(x)[:, 0], sub), tuple(new_caches), key), token_B

  (last, _, _), tokens_NB = jax.lax.scan(
      decode, (first, caches, key), jnp.arange(max_new_tokens - 1, dtype=jnp.int32))
  return jnp.concatenate([prompt_BP, tokens_NB.T, last[:, None]], axis=1)


def _stacked_blocks(config: TGNConfig, key: jax.Array) -> Block:
  """A Block whose parameters carry a leading [n_layers] axis (one init per layer)."""
  keys = jax.random.split(key, config.n_layers)
  # One compiled initialisation instead of many small eager ops.
  state = jax.jit(jax.vmap(lambda k: nnx.state(Block(config, rngs=nnx.Rngs(k)))))(keys)
  block_def = nnx.graphdef(nnx.eval_shape(lambda: Block(config, rngs=nnx.Rngs(0))))
  return nnx.merge(block_def, state)


def _summarize(layer_aux: LayerAux, stats: StatsMode, cfg: TGNConfig) -> ModelAux:
  open_rate = jnp.mean(layer_aux.gate > cfg.gate_threshold, axis=(1, 2), dtype=jnp.float32)
  compute_rate = jnp.mean(layer_aux.computed, axis=(1, 2), dtype=jnp.float32)
  mean_stats = token_stats = None
  if stats is not None and layer_aux.stats is not None:
    mask = layer_aux.stats_mask[..., None]
    count = jnp.sum(mask, axis=(1, 2, 3)) * layer_aux.stats.entropy.shape[-1]
    mean_stats = jax.tree.map(
        lambda s: jnp.sum(jnp.where(mask, s, 0.0), axis=(1, 2, 3)) / count, layer_aux.stats)
    if stats == "token":
      token_stats = layer_aux.stats
  return ModelAux(gate_prob=layer_aux.gate_prob, gate=layer_aux.gate, open_rate=open_rate,
                  compute_rate=compute_rate, stats=mean_stats, token_stats=token_stats)


def _check_tokens(tokens, cfg: TGNConfig, name: str = "tokens") -> None:
  shape = getattr(tokens, "shape", None)
  if shape is None or len(shape) != 2:
    raise ValueError(f"{name} must be an int array [B, T], got shape {shape}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise TypeError(f"{name} must be integer token ids, got dtype {tokens.dtype}")
  if shape[0] < 1 or shape[1] < 1:
    raise ValueError(f"{name} must be non-empty, got shape {shape}")
  if shape[1] > cfg.max_seq_len:
    raise ValueError(f"{name} length {shape[1]} exceeds max_seq_len ({cfg.max_seq_len})")
  if not isinstance(tokens, jax.core.Tracer):
    values = np.asarray(tokens)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= cfg.vocab_size:
      raise ValueError(f"{name} must lie in [0, vocab_size={cfg.vocab_size}), "
                       f"got values in [{low}, {high}]")


def count_params(obj) -> int:
  """Number of parameters of a TGNConfig, a module, or a parameter pytree."""
  if isinstance(obj, TGNConfig):
    obj = nnx.eval_shape(lambda: TGNLM(obj, rngs=nnx.Rngs(0)))
  if isinstance(obj, nnx.Module):
    obj = nnx.state(obj, nnx.Param)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(obj)))
