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
from tgn_jax.nn.block import Block, LayerAux, LayerCache
from tgn_jax.nn.layers import rms_norm
from tgn_jax.ops.attention import ThermoStats
from tgn_jax.ops.gate import CapacityLadder, distinct_fractions

StatsMode = Literal[None, "mean", "token"]


class ModelAux(NamedTuple):
  """Per-layer gate and attention observables of one forward pass.

  gate_logit, gate_prob, gate: float32 [L, B, T] (the logit net of the layer's GateOffset;
  the soft gate's prob is sigmoid(logit / gate_temperature)); is_open: bool [L, B, T], the hard gate's decision
  (soft gate: what hardening would decide); open_rate, compute_rate: float32 [L] (fraction
  of tokens whose gate is open / whose attention was computed, exploration included);
  stats: ThermoStats of float32 [L] means over heads and the tokens whose attention
  was mixed in (NaN for a layer with none), or None; token_stats: ThermoStats
  [L, B, T, N] (NaN where attention was not computed) when requested.
  overflow: bool scalar, True if routing at the requested capacity had to leave out
  tokens; the outputs are then not the model's and must be recomputed at a larger
  capacity (see functional.apply). capacity_needed: float32 scalar, the smallest capacity
  fraction that would have held every routed row (0 without a hard gate).
  """

  gate_logit: jax.Array
  gate_prob: jax.Array
  gate: jax.Array
  is_open: jax.Array
  open_rate: jax.Array
  compute_rate: jax.Array
  stats: Optional[ThermoStats]
  token_stats: Optional[ThermoStats]
  overflow: jax.Array
  capacity_needed: jax.Array


class TGNLM(nnx.Module):
  """Embedding, n_layers blocks (parameters stacked on a leading layer axis and run
  with lax.scan), final RMSNorm and a tied output head.

  `logits, aux = model(tokens)` with tokens int [B, T]; logits float32 [B, T, V].
  """

  def __init__(self, config: TGNConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, TGNConfig):
      raise TypeError(f"config must be a TGNConfig, got {type(config).__name__}")
    self.config = config
    self.embed = _embedding(config, config.vocab_size, rngs)
    self.positions = nnx.data(None)
    if config.learned_positions:
      self.positions = _embedding(config, config.max_seq_len, rngs)
    self.blocks = _stacked_blocks(config, rngs.params())
    self.final_norm = rms_norm(config, rngs=rngs)

  def __call__(self, tokens_BT: jax.Array, **options) -> tuple[jax.Array, ModelAux]:
    """Logits float32 [B, T, V] and ModelAux: `functional.apply` on this module's
    parameters, with its options (rng, stats, capacity, open_LBT)."""
    from tgn_jax import functional  # the one pure entry point (it is built on this module)

    return functional.apply(*nnx.split(self), tokens_BT, **options)

  def _forward(
    self,
    tokens_BT,
    *,
    rng,
    stats: StatsMode,
    capacity: float,
    cache: Optional[LayerCache] = None,
    last_logits_only: bool = False,
    open_LBT: Optional[jax.Array] = None,
    gate_temperature=1.0,
  ):
    """Logits, ModelAux and the stacked caches ([L, ...]; None without `cache`)."""
    cfg = self.config
    batch, seq_len = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    block_def = _block_def(cfg)
    block_state = _cast_matrices(nnx.state(self.blocks), cfg.compute_dtype)
    layer_keys = jax.random.split(rng, cfg.n_layers) if rng is not None else None

    def layer(x, inputs):
      state, key, layer_cache, open_BT = inputs
      x, aux, layer_cache = nnx.merge(block_def, state)(
        x,
        positions_BT,
        cache=layer_cache,
        key=key,
        return_stats=stats is not None,
        capacity=capacity,
        open_BT=open_BT,
        gate_temperature=gate_temperature,
      )
      return x, (aux, layer_cache)

    if cfg.remat:
      layer = jax.checkpoint(layer, prevent_cse=False)
    x = self._embed(tokens_BT, positions_BT)
    x, (layer_aux, caches) = jax.lax.scan(layer, x, (block_state, layer_keys, cache, open_LBT))
    if last_logits_only:  # prefill: [B, 1, V], not the full [B, T, V]
      x = x[:, -1:]
    return self._logits(x), _summarize(layer_aux, stats), caches

  def _embed(self, tokens_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
    """Token embeddings [B, T, D], plus learned position embeddings if configured."""
    x = self.embed(tokens_BT)
    if self.positions is not None:
      x = x + self.positions(positions_BT)
    return x

  def _logits(self, x_BTD: jax.Array) -> jax.Array:
    x = self.final_norm(x_BTD)
    table = self.embed.embedding[...].astype(x.dtype)
    return jnp.einsum("btd,vd->btv", x, table, preferred_element_type=jnp.float32)

  def _empty_cache(self, batch: int, length: int) -> LayerCache:
    """An empty cache for `length` positions, stacked over layers: keys and values
    [L, B, S, K, H] in the compute dtype, recurrent states float32 [L, B, D]."""
    cfg = self.config
    kv = (cfg.n_layers, batch, length, cfg.kv_heads, cfg.head_dim)
    keys = cfg.has_attention and cfg.kv == "all"  # kv="open": prefill gathers them
    return LayerCache(
      k=jnp.zeros(kv, cfg.compute_dtype) if keys else None,
      v=jnp.zeros(kv, cfg.compute_dtype) if keys else None,
      state=(
        jnp.zeros((cfg.n_layers, batch, cfg.d_model), jnp.float32) if cfg.has_recurrence else None
      ),
    )

  def generate(
    self,
    prompt_BP: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    rng: Optional[jax.Array] = None,
    return_logits: bool = False,
  ):
    """Autoregressive generation with a KV cache and recurrent state: `prefill`, then
    `decode`.

    Greedy at temperature 0 (equal to repeated full forward passes); otherwise samples
    from softmax(logits / temperature) with `rng`. Returns int32 [B, P + max_new_tokens],
    and with return_logits also the float32 logits [B, max_new_tokens, V] each new token
    was chosen from.
    """
    _check_tokens(prompt_BP, self.config, name="prompt")
    _check_positive_int("max_new_tokens", max_new_tokens)
    prompt_len = prompt_BP.shape[1]
    if prompt_len + max_new_tokens > self.config.max_seq_len:
      raise ValueError(
        f"prompt length + max_new_tokens = {prompt_len + max_new_tokens} exceeds "
        f"max_seq_len ({self.config.max_seq_len})"
      )
    logits_BV, cache = self.prefill(prompt_BP, prompt_len + max_new_tokens)
    decoded = self.decode(
      cache, logits_BV, prompt_len, max_new_tokens, temperature=temperature, rng=rng
    )
    tokens = jnp.concatenate([jnp.asarray(prompt_BP, jnp.int32), decoded.tokens], axis=1)
    return (tokens, decoded.logits) if return_logits else tokens

  def prefill(
    self, prompt_BP: jax.Array, cache_len: int, *, capacity: Optional[float] = None
  ) -> tuple[jax.Array, tuple[LayerCache, ...]]:
    """Runs the prompt through the training forward and keeps its keys, values and
    recurrent states.

    capacity: the routing capacity (None: the capacity ladder eagerly, 1.0 under a
      transformation). Called eagerly, a prefill that overflows an explicit capacity is
      redone at 1.0; under a transformation, where that cannot be checked, a capacity
      below 1 is refused.
    Returns the logits at the last prompt position, float32 [B, V], and the cache: one
    LayerCache per layer (kv="all": keys and values [B, cache_len, K, H], filled up to
    the prompt length; kv="open": the prompt's open tokens and a slot for each of the
    cache_len - P tokens to come), recurrent state float32 [B, D].
    """
    cfg = self.config
    _check_tokens(prompt_BP, cfg, name="prompt")
    _check_positive_int("cache_len", cache_len)
    if not prompt_BP.shape[1] <= cache_len <= cfg.max_seq_len:
      raise ValueError(
        f"cache_len must lie in [prompt length {prompt_BP.shape[1]}, max_seq_len "
        f"{cfg.max_seq_len}], got {cache_len}"
      )
    graph_def, state = nnx.split(self)
    prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
    run = lambda c: _prefill(graph_def, state, prompt_BP, cache_len, c)
    traced = _is_traced((prompt_BP, state))
    if capacity is not None and capacity < 1.0:  # the cache is kept: nothing may be left out
      if traced:
        raise ValueError(
          "prefill under a transformation cannot check for overflow: pass capacity=None or 1.0"
        )
      logits_BV, aux, cache = _run_exact(run, capacity, cfg, None, traced=False)
      if bool(aux.overflow):
        logits_BV, _, cache = run(1.0)
      return logits_BV, cache
    logits_BV, _, cache = _run_exact(
      run, capacity, cfg, (graph_def, prompt_BP.shape, "prefill"), traced=traced
    )
    return logits_BV, cache

  def decode(
    self,
    cache: tuple[LayerCache, ...],
    logits_BV: jax.Array,
    position: int,
    steps: int,
    *,
    temperature: float = 0.0,
    rng: Optional[jax.Array] = None,
  ) -> "Decoded":
    """`steps` new tokens, fed at positions position, position + 1, ...

    Each step chooses a token from the logits the previous one gave (the first from
    logits_BV, e.g. prefill's) and runs it through the same blocks as training: each row
    reads its keys up to the position, and a row whose hard gate is closed reads none.
    The loop holds no conditional. On accelerators `cache` is donated (updated in place,
    unusable afterwards): continue from Decoded.cache and Decoded.next_logits at
    position + steps.
    """
    _check_positive_int("steps", steps)
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
      raise ValueError(f"position must be a non-negative integer, got {position!r}")
    first = cache[0]
    if first.k is not None and first.count is None and position + steps > first.k.shape[1]:
      raise ValueError(
        f"position + steps = {position + steps} exceeds the cache's {first.k.shape[1]} positions"
      )
    if first.count is not None and not _is_traced(first.count):
      used = max(int(jnp.max(c.count)) for c in cache)
      if used + steps > first.k.shape[1]:
        raise ValueError(
          f"{used} cached open tokens + steps = {used + steps} exceeds the "
          f"cache's {first.k.shape[1]} slots"
        )
    if not temperature >= 0:
      raise ValueError(f"temperature must be >= 0, got {temperature}")
    sample = temperature > 0
    if sample and rng is None:
      raise ValueError("sampling (temperature > 0) needs an rng key")
    key = rng if rng is not None else jax.random.key(0)
    graph_def, state = nnx.split(self)
    decode = _decode_donating if jax.default_backend() != "cpu" else _decode
    return decode(
      graph_def,
      state,
      tuple(cache),
      logits_BV,
      jnp.int32(position),
      key,
      jnp.float32(max(temperature, 1e-6)),
      steps,
      sample,
    )


class Decoded(NamedTuple):
  """What TGNLM.decode returns: tokens int32 [B, N]; logits float32 [B, N, V], those each
  token was chosen from; is_open bool [L, B, N], the gate of each layer at each token;
  next_logits float32 [B, V] after the last token; cache, filled up to the last token's
  position."""

  tokens: jax.Array
  logits: jax.Array
  is_open: jax.Array
  next_logits: jax.Array
  cache: tuple[LayerCache, ...]


def capacity_ladder(config: TGNConfig, seq_len: int, **options) -> CapacityLadder:
  """A CapacityLadder over the config's capacity_buckets that differ at this length
  (options: headroom, window, recent)."""
  return CapacityLadder(
    distinct_fractions(
      config.capacity_buckets, seq_len, config.segment_len, config.capacity_multiple
    ),
    **options,
  )


def _is_traced(tree) -> bool:
  """True inside a transformation (jit, grad, vmap, ...) of any of the tree's arrays."""
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


# Capacity ladders of eager calls, per (model structure, input shape, mode).
_LADDERS: dict = {}


def _run_exact(run, capacity: Optional[float], cfg: TGNConfig, ladder_key, *, traced: bool):
  """run(capacity) -> (..., aux, ...) with aux the second output; returns run's outputs
  at a capacity that left no token out (see functional.apply)."""
  if capacity is not None:
    if (
      isinstance(capacity, bool)
      or not isinstance(capacity, (int, float))
      or not (0.0 < capacity <= 1.0)
    ):
      raise ValueError(f"capacity must be a fraction in (0, 1], got {capacity!r}")
    return run(float(capacity))
  if traced or not (cfg.has_gate and cfg.gate == "hard" and cfg.execution == "sparse"):
    return run(1.0)
  ladder = _LADDERS.get(ladder_key)
  if ladder is None:
    ladder = _LADDERS[ladder_key] = capacity_ladder(cfg, ladder_key[1][1])
  while True:
    outputs = run(ladder.current)
    aux = outputs[1]
    if not ladder.observe(*jax.device_get((aux.overflow, aux.capacity_needed))):
      return outputs


# Jitted entry points: eager calls then hit the compilation cache (keyed on the static
# model structure); inside a user's jit they are simply inlined.
@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _apply(graph_def, state, tokens_BT, rng, stats, capacity, open_LBT=None, gate_temperature=1.0):
  logits, aux, _ = nnx.merge(graph_def, state)._forward(
    tokens_BT,
    rng=rng,
    stats=stats,
    capacity=capacity,
    open_LBT=open_LBT,
    gate_temperature=gate_temperature,
  )
  return logits, aux


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _prefill(graph_def, state, prompt_BP, cache_len: int, capacity: float):
  """(last logits float32 [B, V], ModelAux, per-layer caches of cache_len positions)."""
  model: TGNLM = nnx.merge(graph_def, state)
  empty = model._empty_cache(prompt_BP.shape[0], cache_len)
  logits, aux, stacked = model._forward(
    prompt_BP, rng=None, stats=None, capacity=capacity, cache=empty, last_logits_only=True
  )
  # One LayerCache per layer, so that decoding updates each in place.
  caches = tuple(jax.tree.map(lambda c: c[i], stacked) for i in range(model.config.n_layers))
  if model.config.kv == "open":
    # The prompt's open tokens, in a capacity that held them all, plus a slot for every
    # token still to come: decoding can never overflow it.
    extra = cache_len - prompt_BP.shape[1]
    grow = lambda x, fill: jnp.pad(
      x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2), constant_values=fill
    )
    caches = tuple(
      c._replace(k=grow(c.k, 0), v=grow(c.v, 0), positions=grow(c.positions, 0)) for c in caches
    )
  return logits[:, -1], aux, caches


def _decode_steps(
  graph_def, state, caches, logits_BV, position, key, temperature, steps: int, sample: bool
) -> Decoded:
  model: TGNLM = nnx.merge(graph_def, state)
  cfg = model.config
  block_def = _block_def(cfg)
  block_state = _cast_matrices(nnx.state(model.blocks), cfg.compute_dtype)
  blocks = [
    nnx.merge(block_def, jax.tree.map(lambda p: p[i], block_state)) for i in range(cfg.n_layers)
  ]

  def pick(logits_BV, key):
    if sample:
      return jax.random.categorical(key, logits_BV / temperature).astype(jnp.int32)
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

  def decode(carry, step):
    logits_BV, caches, key = carry
    key, sub = jax.random.split(key)
    token_B = pick(logits_BV, sub)
    positions_B1 = jnp.full((token_B.shape[0], 1), position + step, jnp.int32)
    x = model._embed(token_B[:, None], positions_B1)
    new_caches, is_open = [], []
    for block, cache in zip(blocks, caches):
      x, aux, cache = block(x, positions_B1, cache=cache)
      new_caches.append(cache)
      is_open.append(aux.is_open[:, 0])
    return (model._logits(x)[:, 0], tuple(new_caches), key), (
      token_B,
      logits_BV,
      jnp.stack(is_open),
    )

  (next_logits, caches, _), (tokens_EB, logits_EBV, open_ELB) = jax.lax.scan(
    decode, (logits_BV, caches, key), jnp.arange(steps, dtype=jnp.int32)
  )
  return Decoded(
    tokens=tokens_EB.T,
    logits=jnp.moveaxis(logits_EBV, 0, 1),
    is_open=jnp.transpose(open_ELB, (1, 2, 0)),
    next_logits=next_logits,
    cache=caches,
  )


_decode = jax.jit(_decode_steps, static_argnums=(0, 7, 8))
_decode_donating = jax.jit(_decode_steps, static_argnums=(0, 7, 8), donate_argnums=(2,))


def _cast_matrices(block_state, dtype):
  """The stacked block weights ([L, in, out] and larger) in the compute dtype, cast once
  per call instead of once per use in every layer; vectors (norms, biases, temperatures)
  and the gate head (it decides in float32) stay as stored."""

  def cast(path, p):
    matrix = p.ndim >= 3 and jnp.issubdtype(p.dtype, jnp.floating)
    in_gate = any(getattr(k, "key", None) == "gate_head" for k in path)
    return p.astype(dtype) if matrix and not in_gate else p

  return jax.tree_util.tree_map_with_path(cast, block_state)


def _embedding(config: TGNConfig, rows: int, rngs: nnx.Rngs) -> nnx.Embed:
  """A [rows, D] embedding table, initialised at 1/sqrt(D)."""
  init = nnx.initializers.normal(stddev=1.0 / math.sqrt(config.d_model))
  return nnx.Embed(
    rows,
    config.d_model,
    dtype=config.compute_dtype,
    param_dtype=config.weight_dtype,
    rngs=rngs,
    embedding_init=init,
  )


def _stacked_blocks(config: TGNConfig, key: jax.Array) -> Block:
  """A Block whose parameters carry a leading [n_layers] axis (one init per layer)."""
  keys = jax.random.split(key, config.n_layers)
  # One compiled initialisation instead of many small eager ops.
  state = jax.jit(jax.vmap(lambda k: nnx.state(Block(config, rngs=nnx.Rngs(k)))))(keys)
  return nnx.merge(_block_def(config), state)


@functools.lru_cache(maxsize=64)
def _block_def(config: TGNConfig) -> nnx.GraphDef:
  """The static structure of one block (its parameters come from the stacked state)."""
  return nnx.graphdef(nnx.eval_shape(lambda: Block(config, rngs=nnx.Rngs(0))))


def _summarize(layer_aux: LayerAux, stats: StatsMode) -> ModelAux:
  open_rate = jnp.mean(layer_aux.is_open, axis=(1, 2), dtype=jnp.float32)
  compute_rate = jnp.mean(layer_aux.computed, axis=(1, 2), dtype=jnp.float32)
  mean_stats = token_stats = None
  if stats is not None and layer_aux.stats is not None:
    mask = layer_aux.stats_mask[..., None]
    count = jnp.sum(mask, axis=(1, 2, 3)) * layer_aux.stats.entropy.shape[-1]
    mean_stats = jax.tree.map(
      lambda s: jnp.sum(jnp.where(mask, s, 0.0), axis=(1, 2, 3)) / count, layer_aux.stats
    )
    if stats == "token":
      token_stats = layer_aux.stats
  return ModelAux(
    gate_logit=layer_aux.gate_logit,
    gate_prob=layer_aux.gate_prob,
    gate=layer_aux.gate,
    is_open=layer_aux.is_open,
    open_rate=open_rate,
    compute_rate=compute_rate,
    stats=mean_stats,
    token_stats=token_stats,
    overflow=jnp.any(layer_aux.overflow),
    capacity_needed=jnp.max(layer_aux.needed),
  )


def _check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


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
      raise ValueError(
        f"{name} must lie in [0, vocab_size={cfg.vocab_size}), got values in [{low}, {high}]"
      )


def count_params(obj) -> int:
  """Number of trained parameters (nnx.Param: not the gate offsets) of a TGNConfig, a
  module, or a parameter pytree."""
  if isinstance(obj, TGNConfig):
    obj = nnx.eval_shape(lambda: TGNLM(obj, rngs=nnx.Rngs(0)))
  if isinstance(obj, nnx.Module):
    obj = nnx.state(obj, nnx.Param)
  elif isinstance(obj, nnx.State):
    obj = obj.filter(nnx.Param)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(obj)))
