"""Batch container, data error type and the (seed, step, row) -> RNG rule shared by all tasks.

Every row of a training batch has a random stream of its own, so a process can build just
the rows it trains on and the global batch is the same for any number of processes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

_U32 = 2**32
# Held-out streams put a nonzero word where every training stream has none, so their
# SeedSequence entropy can never equal a training one (training seeds/steps are < 2**32).
_HELDOUT_TAG = 0x65766C31  # "evl1"


class Batch(NamedTuple):
  """One batch. inputs/targets int32 [B, T]; mask float32 [B, T], 1.0 where scored."""

  inputs: np.ndarray
  targets: np.ndarray
  mask: np.ndarray


class DataError(ValueError):
  """Bad data input (missing/empty/unreadable file, invalid task option); one-line message."""


def _check_u32(name: str, value: int) -> None:
  if not 0 <= int(value) < _U32:
    raise DataError(f"{name} must be in [0, 2**32), got {value}")


def row_rng(seed: int, step: int, row: int) -> np.random.Generator:
  """The generator of row `row` of training batch `step` of run `seed`."""
  _check_u32("seed", seed)
  _check_u32("step", step)
  _check_u32("row", row)
  return np.random.default_rng([int(seed), int(step), int(row), 1])


def batch_rows(batch_size: int, rows: range | None) -> range:
  """The rows of a batch to build (all by default), checked against batch_size."""
  if rows is None:
    return range(batch_size)
  if rows.step != 1 or not 0 <= rows.start <= rows.stop <= batch_size:
    raise DataError(f"rows must be a contiguous range within [0, {batch_size}), got {rows}")
  return rows


def heldout_rng(seed: int) -> np.random.Generator:
  """A generator for held-out data, disjoint from every `row_rng(seed', step', row')` stream."""
  _check_u32("seed", seed)
  return np.random.default_rng([int(seed), 0, _HELDOUT_TAG])
