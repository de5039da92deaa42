"""Data for the benchmarks: MQAR, modular addition and byte-level text. Pure numpy."""

from tgn_jax.data.batch import Batch, DataError, batch_rows, heldout_rng, row_rng
from tgn_jax.data.modadd import modadd_splits, modadd_vocab_size
from tgn_jax.data.mqar import FILLERS as MQAR_FILLERS
from tgn_jax.data.mqar import mqar_batch, mqar_eval_set
from tgn_jax.data.text import ByteCorpus, bits_per_byte

__all__ = [
  "Batch",
  "ByteCorpus",
  "DataError",
  "MQAR_FILLERS",
  "batch_rows",
  "bits_per_byte",
  "heldout_rng",
  "modadd_splits",
  "modadd_vocab_size",
  "mqar_batch",
  "mqar_eval_set",
  "row_rng",
]
