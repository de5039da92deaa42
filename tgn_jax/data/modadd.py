"""Modular addition `a + b mod p` as in the grokking study of Nanda et al. (2023).

Each example is `[a, b, =]` with `=` the token id p (vocab p + 1, T = 3); only the last
position is scored, with target (a + b) % p.
"""

from __future__ import annotations

import numpy as np

from tgn_jax.data.batch import Batch, DataError


def modadd_vocab_size(p: int) -> int:
  """Vocabulary size for modulus p: the p residues plus the `=` token."""
  return p + 1


def modadd_splits(p: int, train_fraction: float, seed: int) -> tuple[Batch, Batch]:
  """(train, test) over all p*p pairs; int32 inputs/targets [N, 3], float32 mask [N, 3].

  Pairs are shuffled by `seed`; the first round(train_fraction * p * p) form the train split.
  """
  if p < 2:
    raise DataError(f"modadd: p must be >= 2, got {p}")
  if seed < 0:
    raise DataError(f"modadd: seed must be >= 0, got {seed}")
  if not 0.0 < train_fraction < 1.0:
    raise DataError(f"modadd: train_fraction must be in (0, 1), got {train_fraction}")
  num_pairs = p * p
  num_train = int(round(train_fraction * num_pairs))
  if not 0 < num_train < num_pairs:
    raise DataError(
      f"modadd: train_fraction {train_fraction} with p={p} leaves an empty split "
      f"({num_train} of {num_pairs} pairs in train)"
    )

  a_N, b_N = np.divmod(np.arange(num_pairs, dtype=np.int32), np.int32(p))
  inputs_N3 = np.stack([a_N, b_N, np.full_like(a_N, p)], axis=1)
  targets_N3 = np.zeros((num_pairs, 3), dtype=np.int32)
  targets_N3[:, 2] = (a_N + b_N) % p
  mask_N3 = np.zeros((num_pairs, 3), dtype=np.float32)
  mask_N3[:, 2] = 1.0

  order_N = np.random.default_rng(seed).permutation(num_pairs)
  train_idx, test_idx = order_N[:num_train], order_N[num_train:]
  train = Batch(inputs_N3[train_idx], targets_N3[train_idx], mask_N3[train_idx])
  test = Batch(inputs_N3[test_idx], targets_N3[test_idx], mask_N3[test_idx])
  return train, test
