"""Flax NNX modules that own parameters and call tgn_jax.ops."""

from tgn_jax.nn.attention import GibbsAttention
from tgn_jax.nn.block import Block, LayerAux, LayerCache
from tgn_jax.nn.layers import MLP, GateHead
from tgn_jax.nn.model import TGNLM, ModelAux, count_params
from tgn_jax.nn.recurrence import GRU, MinGRU

__all__ = [
  "GibbsAttention",
  "Block",
  "LayerAux",
  "LayerCache",
  "MLP",
  "GateHead",
  "ModelAux",
  "TGNLM",
  "count_params",
  "GRU",
  "MinGRU",
]
