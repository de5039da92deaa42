"""tgn_jax: Thermodynamic Gated Networks in JAX/Flax."""

from tgn_jax import functional, ops
from tgn_jax.config import TGNConfig
from tgn_jax.nn.model import ModelAux, TGNLM, count_params
from tgn_jax.ops.attention import ThermoStats, gibbs_attention

__version__ = "0.1.0"

__all__ = ["TGNConfig", "TGNLM", "ModelAux", "ThermoStats", "count_params", "functional",
           "gibbs_attention", "ops"]
