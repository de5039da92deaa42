"""One configuration object for the whole model, validated at construction."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional, Union

import jax.numpy as jnp

Mixer = Literal["tgn", "attention", "recurrent"]
Recurrence = Literal["mingru", "gru"]
GateMode = Literal["soft", "hard", "open", "closed"]
Execution = Literal["sparse", "dense"]
KeyValues = Literal["all", "open"]
GateInput = Literal["recurrence", "both"]
GateGradient = Literal["sigmoid", "spread"]
Norm = Literal["rms", "none"]
Activation = Literal["gelu", "relu"]

MIXERS = ("tgn", "attention", "recurrent")
RECURRENCES = ("mingru", "gru")
GATE_MODES = ("soft", "hard", "open", "closed")
EXECUTIONS = ("sparse", "dense")
KEY_VALUES = ("all", "open")
GATE_INPUTS = ("recurrence", "both")
GATE_GRADIENTS = ("sigmoid", "spread")
NORMS = ("rms", "none")
ACTIVATIONS = ("gelu", "relu")
IMPLEMENTATIONS = (None, "xla", "cudnn", "pallas")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigFieldError(ValueError):
  """A bad TGNConfig value; `field` names the field the message is about."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field


@dataclasses.dataclass(frozen=True)
class TGNConfig:
  """Hyper-parameters of a TGN language model and of its baselines.

  mixer: "tgn" (recurrence + gate + attention), "attention" (a standard
    Transformer: no recurrence, no gate) or "recurrent" (no attention, no gate).
  recurrence: the inertia channel, "mingru" (parallel scan, the default) or
    "gru" (sequential, the equations of torch.nn.GRU).
  gate: "soft" (dense attention, mix by the gate probability: the reference design's
    behaviour), "hard" (0/1 gate, straight-through gradient, attention computed
    only where open), "open" / "closed" (forced, for ablations).
  attention_execution: for the hard gate, "sparse" (gather the open tokens and
    compute attention for them only) or "dense" (attention everywhere, same
    mix). None picks "sparse" for the hard gate, "dense" otherwise.
  learned_positions: add a learned position embedding [max_seq_len, D] to the tokens'
    (with or without rope).
  norm: "rms" (RMSNorm before each sub-layer and the output head) or "none".
  mlp_activation: "gelu" or "relu".
  gate_input: what the gate reads: "recurrence" (the recurrence's output r_t) or "both"
    (the block's normalised input and r_t).
  gate_gradient: the hard gate's straight-through derivative: "sigmoid" (of
    sigmoid(logit)) or "spread" (of sigmoid(logit / s), s the layer's logit standard
    deviation over the batch, at least 1: a gate far from its threshold, where
    sigmoid(logit) is flat, still learns; the forward pass is the same).
  center_gate_gradient: the hard gate's logits get their gradient with its mean over the
    batch removed, per layer (ops.gate.level_free): training moves which tokens open, not
    the logits' common level. For the quantile control, whose threshold sets the level
    (under the lambda thermostat the level is what holds the rate).
  kv: "all" (every token writes a key and value) or "open" (only tokens whose hard gate
    is open do: attention runs among open tokens, its cost scales with the square of the
    open rate, and the decoding cache holds open tokens only). "open" needs gate="hard".
  temperature: softmax temperature of every head. None = sqrt(head_dim), a
    positive float = fixed, "learned" = one learned temperature per head
    (initialised at sqrt(head_dim)).
  exploration: in training, the attention of some closed-gate tokens is computed (not
    mixed) to give closed gates a straight-through gradient, weighted by 1/fraction
    (unbiased). This is that extra work as a fraction of the open tokens' attention:
    each layer explores exploration * open / closed of its closed tokens. 0 disables it.
  exploration_floor: the fraction explored at least (while exploration > 0), so that a
    layer with every gate closed can reopen.
  capacity_buckets: the routing capacities, fractions of a segment's length, each a
    static shape compiled when first used. The hard gate gathers the computed tokens of
    each row into one capacity; a CapacityLadder picks it on the host and a call that
    overflows is redone larger. The last bucket must be 1.0 (every token), which holds
    any count, so that no open token is ever dropped.
  segment_len: sparse execution gathers per segment of this many tokens, and each
    segment's queries read only the keys up to its end (causal work saved, at a fixed
    cost per segment; one segment was faster up to T=8192 at open rates <= 0.25 on an
    H200, see benchmarks/RESULTS.md).
  attention_impl: None (cuDNN on GPU for 16-bit compute, else XLA), "xla", "cudnn", or
    "pallas" (tgn_jax.ops.flash: positions on both sides, skips the tiles no query sees;
    interpret mode off GPU, slow there).
  capacity_multiple: capacities are rounded up to a multiple of this (a GPU tile);
    short sequences then have few distinct capacities (few compilations), and a
    capacity that rounds up to the whole segment computes attention densely.
  """

  vocab_size: int
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: Optional[int] = None
  d_mlp: Optional[int] = None
  max_seq_len: int = 1024
  mixer: Mixer = "tgn"
  recurrence: Recurrence = "mingru"
  gate: GateMode = "hard"
  gate_threshold: float = 0.5
  gate_sampling: bool = False
  gate_hidden: Optional[int] = None
  gate_input: GateInput = "both"
  gate_gradient: GateGradient = "spread"
  center_gate_gradient: bool = False
  gate_bias_init: float = 0.0
  attention_execution: Optional[Execution] = None
  kv: KeyValues = "all"
  capacity_buckets: tuple[float, ...] = (
    0.0625,
    0.125,
    0.15625,
    0.1875,
    0.25,
    0.375,
    0.5,
    0.75,
    1.0,
  )
  segment_len: int = 8192
  capacity_multiple: int = 64
  temperature: Union[None, float, str] = None
  exploration: float = 0.05
  exploration_floor: float = 0.002
  rope: bool = True
  rope_base: float = 10_000.0
  learned_positions: bool = False
  norm: Norm = "rms"
  mlp_activation: Activation = "gelu"
  attention_impl: Optional[str] = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    for name in (
      "vocab_size",
      "d_model",
      "n_layers",
      "n_heads",
      "max_seq_len",
      "segment_len",
      "capacity_multiple",
    ):
      _require_positive_int(name, getattr(self, name))
    for name in ("n_kv_heads", "d_mlp", "gate_hidden"):
      value = getattr(self, name)
      if value is not None:
        _require_positive_int(name, value)
    if self.d_model % self.n_heads:
      raise ConfigFieldError(
        "d_model", f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
      )
    if self.n_heads % self.kv_heads:
      raise ConfigFieldError(
        "n_heads", f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})"
      )
    if self.rope and self.head_dim % 2:
      raise ConfigFieldError(
        "rope", f"rope needs an even head dimension, got d_model/n_heads = {self.head_dim}"
      )
    _require_choice("mixer", self.mixer, MIXERS)
    _require_choice("recurrence", self.recurrence, RECURRENCES)
    _require_choice("gate", self.gate, GATE_MODES)
    _require_choice("attention_execution", self.attention_execution, (None,) + EXECUTIONS)
    _require_choice("attention_impl", self.attention_impl, IMPLEMENTATIONS)
    _require_choice("dtype", self.dtype, tuple(DTYPES))
    _require_choice("param_dtype", self.param_dtype, tuple(DTYPES))
    _require_choice("kv", self.kv, KEY_VALUES)
    _require_choice("gate_input", self.gate_input, GATE_INPUTS)
    _require_choice("gate_gradient", self.gate_gradient, GATE_GRADIENTS)
    _require_choice("norm", self.norm, NORMS)
    _require_choice("mlp_activation", self.mlp_activation, ACTIVATIONS)
    if self.kv == "open" and not (self.mixer == "tgn" and self.gate == "hard"):
      raise ConfigFieldError(
        "kv",
        f"kv='open' needs mixer='tgn' and gate='hard', got mixer={self.mixer!r}, "
        f"gate={self.gate!r}",
      )
    if self.attention_execution == "sparse" and self.gate != "hard":
      raise ConfigFieldError(
        "attention_execution",
        f"attention_execution='sparse' needs gate='hard', got gate={self.gate!r}",
      )
    if not 0.0 < self.gate_threshold < 1.0:
      raise ConfigFieldError(
        "gate_threshold", f"gate_threshold must be in (0, 1), got {self.gate_threshold}"
      )
    if not 0.0 <= self.exploration <= 1.0:
      raise ConfigFieldError(
        "exploration", f"exploration must be in [0, 1], got {self.exploration}"
      )
    if not 0.0 <= self.exploration_floor < 1.0:
      raise ConfigFieldError(
        "exploration_floor", f"exploration_floor must be in [0, 1), got {self.exploration_floor}"
      )
    buckets = tuple(self.capacity_buckets)
    if (
      not buckets
      or any(not 0.0 < f <= 1.0 for f in buckets)
      or list(buckets) != sorted(buckets)
      or buckets[-1] != 1.0
    ):
      raise ConfigFieldError(
        "capacity_buckets",
        "capacity_buckets must be increasing fractions in (0, 1] ending with 1.0 (the "
        "capacity that holds every token, so that no open token is ever dropped), "
        f"got {self.capacity_buckets}",
      )
    object.__setattr__(self, "capacity_buckets", buckets)
    temperature = self.temperature
    if isinstance(temperature, str):
      if temperature != "learned":
        raise ConfigFieldError(
          "temperature",
          f"temperature must be None, a positive number or 'learned', got {temperature!r}",
        )
    elif temperature is not None:
      if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (math.isfinite(temperature) and temperature > 0)
      ):
        raise ConfigFieldError(
          "temperature", f"temperature must be a positive number, got {temperature!r}"
        )
      object.__setattr__(self, "temperature", float(temperature))
    if not self.rope_base > 0:
      raise ConfigFieldError("rope_base", f"rope_base must be positive, got {self.rope_base}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def mlp_dim(self) -> int:
    return self.d_mlp or 4 * self.d_model

  @property
  def gate_dim(self) -> int:
    return self.gate_hidden or max(8, self.d_model // 4)

  @property
  def execution(self) -> str:
    """The resolved attention execution: 'sparse' or 'dense'."""
    if self.attention_execution is not None:
      return self.attention_execution
    return "sparse" if self.mixer == "tgn" and self.gate == "hard" else "dense"

  @property
  def has_recurrence(self) -> bool:
    return self.mixer in ("tgn", "recurrent")

  @property
  def has_attention(self) -> bool:
    return self.mixer == "attention" or (self.mixer == "tgn" and self.gate != "closed")

  @property
  def has_gate(self) -> bool:
    return self.mixer == "tgn" and self.gate in ("soft", "hard")

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  def replace(self, **changes) -> "TGNConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _require_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ConfigFieldError(name, f"{name} must be a positive integer, got {value!r}")


def _require_choice(name: str, value, choices) -> None:
  if value not in choices:
    shown = ", ".join(repr(c) for c in choices)
    raise ConfigFieldError(name, f"{name} must be one of {shown}; got {value!r}")
