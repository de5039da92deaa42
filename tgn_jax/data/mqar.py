"""Multi-query associative recall (MQAR), after Zoology's `multiquery_ar` (Arora et al. 2023).

Layout of one example of length T with K key-value pairs (V = vocab_size):

    k1 v1 k2 v2 ... kK vK | ... ki ... kj ...
    keys in [1, V//2), values in [V//2, V), distinct within an example; each key is queried
    once at position 2K + 2*gap, gaps drawn without replacement with power-law weights
    p(gap) ~ (gap + 1) ** (power_a - 1); the target at a query is its value and only query
    positions are scored. Every other position, including the one after a query, holds
    the filler: fillers="random" (default) a uniformly random token from [0, V), as in
    Zoology's default (random_non_queries=True); fillers="zero" the token 0, as in
    Zoology's grid (random_non_queries=False). The two kinds draw the same keys, values and
    query positions from the same random stream.
"""

from __future__ import annotations

import numpy as np

from tgn_jax.data.batch import Batch, DataError, batch_rows, heldout_rng, row_rng

# Held-out sets are built in chunks to bound the [chunk, V/2] scratch arrays.
_EVAL_CHUNK = 256

FILLERS = ("random", "zero")


def _validate(
  count: int,
  seq_len: int,
  num_kv: int,
  vocab_size: int,
  power_a: float,
  fillers: str,
  count_name: str = "batch_size",
) -> None:
  if count < 1:
    raise DataError(f"mqar: {count_name} must be >= 1, got {count}")
  if num_kv < 1:
    raise DataError(f"mqar: num_kv must be >= 1, got {num_kv}")
  if seq_len % 2 != 0:
    raise DataError(f"mqar: seq_len must be even, got {seq_len}")
  if vocab_size <= seq_len:
    raise DataError(f"mqar: vocab_size ({vocab_size}) must be > seq_len ({seq_len})")
  if num_kv * 4 > seq_len:
    raise DataError(f"mqar: num_kv * 4 ({num_kv * 4}) must be <= seq_len ({seq_len})")
  if vocab_size // 2 - 1 < num_kv:
    raise DataError(
      f"mqar: vocab_size // 2 - 1 ({vocab_size // 2 - 1} possible keys) must be >= num_kv ({num_kv})"
    )
  if not (np.isfinite(power_a) and power_a > 0):
    raise DataError(f"mqar: power_a must be a finite number > 0, got {power_a}")
  if fillers not in FILLERS:
    raise DataError(f"mqar: fillers must be one of {', '.join(FILLERS)}, got {fillers!r}")


def _smallest_k_sorted(scores_BN: np.ndarray, k: int) -> np.ndarray:
  """Indices int64 [B, k] of the k smallest scores per row, in ascending score order."""
  if k < scores_BN.shape[1]:
    idx_Bk = np.argpartition(scores_BN, k - 1, axis=1)[:, :k]
  else:
    idx_Bk = np.broadcast_to(np.arange(scores_BN.shape[1]), scores_BN.shape)
  order_Bk = np.argsort(np.take_along_axis(scores_BN, idx_Bk, axis=1), axis=1)
  return np.take_along_axis(idx_Bk, order_Bk, axis=1)


def _distinct(rng: np.random.Generator, batch_size: int, n: int, k: int) -> np.ndarray:
  """int64 [B, k]: per row, k distinct draws from range(n) in uniformly random order."""
  # The ranks of iid uniforms form a uniform random permutation.
  return _smallest_k_sorted(rng.random((batch_size, n)), k)


def _power_law_gaps(
  rng: np.random.Generator, batch_size: int, space: int, k: int, power_a: float
) -> np.ndarray:
  """int64 [B, k]: k distinct gaps from range(space), weighted sampling without replacement.

  Gumbel-top-k: the order of argsort(-(log p + Gumbel)) is exactly the order of sequential
  weighted draws without replacement, i.e. what Zoology's np.random.choice(replace=False, p=p)
  samples; keys are paired with gaps in draw order, as there.
  """
  log_p_S = (power_a - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))
  perturbed_BS = log_p_S + rng.gumbel(size=(batch_size, space))
  return _smallest_k_sorted(-perturbed_BS, k)


def _generate(
  rng: np.random.Generator,
  batch_size: int,
  seq_len: int,
  num_kv: int,
  vocab_size: int,
  power_a: float,
  fillers: str,
) -> Batch:
  half = vocab_size // 2
  keys_BK = 1 + _distinct(rng, batch_size, half - 1, num_kv)
  values_BK = half + _distinct(rng, batch_size, vocab_size - half, num_kv)
  context = 2 * num_kv
  gaps_BK = _power_law_gaps(rng, batch_size, (seq_len - context) // 2, num_kv, power_a)
  query_pos_BK = context + 2 * gaps_BK

  # Drawn for both kinds, so that later draws (the next chunk of a held-out set) agree.
  inputs_BT = rng.integers(0, vocab_size, size=(batch_size, seq_len), dtype=np.int32)
  if fillers == "zero":
    inputs_BT[:] = 0
  inputs_BT[:, 0:context:2] = keys_BK
  inputs_BT[:, 1:context:2] = values_BK
  np.put_along_axis(inputs_BT, query_pos_BK, keys_BK.astype(np.int32), axis=1)

  targets_BT = np.zeros((batch_size, seq_len), dtype=np.int32)
  np.put_along_axis(targets_BT, query_pos_BK, values_BK.astype(np.int32), axis=1)
  mask_BT = np.zeros((batch_size, seq_len), dtype=np.float32)
  np.put_along_axis(mask_BT, query_pos_BK, np.float32(1.0), axis=1)
  return Batch(inputs_BT, targets_BT, mask_BT)


def mqar_batch(
  seed: int,
  step: int,
  batch_size: int,
  seq_len: int,
  num_kv: int,
  vocab_size: int,
  power_a: float = 0.01,
  rows: range | None = None,
  fillers: str = "random",
) -> Batch:
  """Rows `rows` (default: all) of training batch `step` of run `seed`: int32
  inputs/targets [R, T], float32 mask [R, T].

  Pure function of its arguments; row r is drawn from row_rng(seed, step, r) alone, so
  any split of the rows between processes builds the same batch. Exactly num_kv scored
  positions per row. fillers: "random" or "zero", the token at every position that is
  neither a key-value pair nor a query (see the module docstring).
  """
  _validate(batch_size, seq_len, num_kv, vocab_size, power_a, fillers)
  parts = [
    _generate(row_rng(seed, step, r), 1, seq_len, num_kv, vocab_size, power_a, fillers)
    for r in batch_rows(batch_size, rows)
  ]
  if not parts:
    empty = np.zeros((0, seq_len), np.int32)
    return Batch(empty, empty, np.zeros((0, seq_len), np.float32))
  return Batch(*(np.concatenate(arrays, axis=0) for arrays in zip(*parts)))


def mqar_eval_set(
  seed: int,
  num_examples: int,
  seq_len: int,
  num_kv: int,
  vocab_size: int,
  power_a: float = 0.01,
  fillers: str = "random",
) -> Batch:
  """Fixed held-out set [num_examples, T] from an RNG stream no training (seed, step) uses."""
  _validate(num_examples, seq_len, num_kv, vocab_size, power_a, fillers, count_name="num_examples")
  rng = heldout_rng(seed)
  chunks = [
    _generate(
      rng, min(_EVAL_CHUNK, num_examples - start), seq_len, num_kv, vocab_size, power_a, fillers
    )
    for start in range(0, num_examples, _EVAL_CHUNK)
  ]
  return Batch(*(np.concatenate(parts, axis=0) for parts in zip(*chunks)))
