"""Training tasks: a uniform view of MQAR, modular addition and byte-level text.

Every training batch is a pure function of (seed, step), row by row, so a resumed run sees
exactly the batches an uninterrupted run would, and each process builds only its rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np

from tgn_jax.data import (
  Batch,
  ByteCorpus,
  modadd_splits,
  modadd_vocab_size,
  mqar_batch,
  mqar_eval_set,
)
from tgn_jax.training.config import TaskConfig, TrainConfig


@dataclasses.dataclass
class Task:
  """name; vocab_size; seq_len; batch_size: rows of a training batch; train_batch(step,
  rows=None) -> Batch, rows a range of them (default all); eval_sets: named lists of fixed
  batches of batch_size rows (the first is the held-out set); metric: 'accuracy' or 'bpb'."""

  name: str
  vocab_size: int
  seq_len: int
  batch_size: int
  train_batch: Callable[..., Batch]
  eval_sets: dict[str, list[Batch]]
  metric: str
  description: str


def make_task(config: TrainConfig, batch_multiple: int = 1) -> Task:
  """Builds the task; raises tgn_jax.data.DataError for bad data or task options.

  batch_multiple: the number of batch shards; a full-batch task (modadd) pads its batch
  with unscored rows to a multiple of it.
  """
  task, seed = config.task, config.run.seed
  if task.name == "modadd":
    return _modadd(task, seed, batch_multiple)
  return {"mqar": _mqar, "text": _text}[task.name](task, seed)


def _mqar(c: TaskConfig, seed: int) -> Task:
  kw = dict(
    seq_len=c.seq_len,
    num_kv=c.num_kv,
    vocab_size=c.vocab_size,
    power_a=c.power_a,
    fillers=c.fillers,
  )
  held_out = mqar_eval_set(seed, c.eval_examples, **kw)
  return Task(
    name="mqar",
    vocab_size=c.vocab_size,
    seq_len=c.seq_len,
    batch_size=c.batch_size,
    train_batch=lambda step, rows=None: mqar_batch(seed, step, c.batch_size, **kw, rows=rows),
    eval_sets={"eval": _batches(held_out, c.batch_size)},
    metric="accuracy",
    description=f"MQAR V={c.vocab_size} T={c.seq_len} kv={c.num_kv} fillers={c.fillers}",
  )


def _modadd(c: TaskConfig, seed: int, batch_multiple: int) -> Task:
  train, test = modadd_splits(c.p, c.train_fraction, seed)
  # Full batch, padded with unscored rows to a multiple of the batch shards.
  padded = lambda data: _batches(data, -(-len(data.inputs) // batch_multiple) * batch_multiple)[0]
  train, test = padded(train), padded(test)
  size = len(train.inputs)
  return Task(
    name="modadd",
    vocab_size=modadd_vocab_size(c.p),
    seq_len=3,
    batch_size=size,
    train_batch=lambda step, rows=None: _rows(train, rows),
    eval_sets={"eval": [test], "train": [train]},
    metric="accuracy",
    description=f"(a + b) mod {c.p}, {len(train.inputs)} training pairs",
  )


def _text(c: TaskConfig, seed: int) -> Task:
  cache = _cache_root() / "corpora"
  if c.data is None:
    corpus = ByteCorpus.default(cache / "stdlib", val_fraction=c.val_fraction)
    source = "Python standard library sources"
  else:
    key = hashlib.sha256(f"{Path(c.data).resolve()}|{c.val_fraction}".encode()).hexdigest()[:16]
    corpus = ByteCorpus.from_path(c.data, cache / key, val_fraction=c.val_fraction)
    source = str(c.data)
  corpus.check(c.seq_len)
  return Task(
    name="text",
    vocab_size=corpus.vocab_size,
    seq_len=c.seq_len,
    batch_size=c.batch_size,
    train_batch=lambda step, rows=None: corpus.train_batch(
      seed, step, c.batch_size, c.seq_len, rows=rows
    ),
    eval_sets={"eval": corpus.val_batches(c.batch_size, c.seq_len, c.eval_batches)},
    metric="bpb",
    description=f"bytes of {source}: {corpus.num_train_bytes:,} train / "
    f"{corpus.num_val_bytes:,} validation",
  )


def _cache_root() -> Path:
  root = os.environ.get("TGN_JAX_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tgn_jax"
  )
  return Path(root)


def _rows(batch: Batch, rows) -> Batch:
  return batch if rows is None else Batch(*(x[rows.start : rows.stop] for x in batch))


def _batches(data: Batch, batch_size: int) -> list[Batch]:
  """Fixed-shape batches; the last one padded with unscored rows."""
  n = len(data.inputs)
  out = []
  for start in range(0, n, batch_size):
    part = Batch(*(x[start : start + batch_size] for x in data))
    pad = batch_size - len(part.inputs)
    if pad:
      part = Batch(*(np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) for x in part))
    out.append(part)
  return out
