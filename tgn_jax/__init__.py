"""tgn_jax: Thermodynamic Gated Networks in JAX/Flax.

Shape notation, used in docstrings (`[B, T, D]`) and as name suffixes (`x_BTD`):

  B  batch rows                     L  layers
  T  sequence positions (Tq, Tk:    N  query heads
     query and key lengths)         K  key-value heads (N a multiple of K; G = N / K)
  Q  query positions (= Tq)         H  head dimension
  S  key positions, cache slots     D  model width
  C  routing capacity (gathered     V  vocabulary
     tokens per row and segment)    F  rotary frequencies (H / 2)
  P  prompt positions               R  routing segments
  E  decoded steps
"""

from tgn_jax import functional, ops
from tgn_jax.config import TGNConfig
from tgn_jax.nn.model import TGNLM, ModelAux, count_params
from tgn_jax.ops.attention import ThermoStats, gibbs_attention

__version__ = "0.1.0"

__all__ = [
  "TGNConfig",
  "TGNLM",
  "ModelAux",
  "ThermoStats",
  "count_params",
  "functional",
  "gibbs_attention",
  "ops",
]
