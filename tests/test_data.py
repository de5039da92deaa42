"""Tests for tgn_jax.data: MQAR, modular addition and the byte-level text corpus."""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

import tgn_jax.data.text as text_module
from tgn_jax.data import (
  MQAR_FILLERS,
  Batch,
  ByteCorpus,
  DataError,
  bits_per_byte,
  modadd_splits,
  modadd_vocab_size,
  mqar_batch,
  mqar_eval_set,
)

# ---------------------------------------------------------------------------------------- MQAR

MQAR = dict(batch_size=64, seq_len=128, num_kv=8, vocab_size=512)


def _check_mqar_rows(batch: Batch, seq_len: int, num_kv: int, vocab_size: int) -> None:
  half = vocab_size // 2
  context = 2 * num_kv
  for inputs_T, targets_T, mask_T in zip(*batch):
    keys, values = inputs_T[0:context:2], inputs_T[1:context:2]
    assert len(set(keys.tolist())) == num_kv and len(set(values.tolist())) == num_kv
    assert keys.min() >= 1 and keys.max() < half
    assert values.min() >= half and values.max() < vocab_size
    value_of = dict(zip(keys.tolist(), values.tolist()))

    (scored,) = np.nonzero(mask_T)
    assert len(scored) == num_kv
    assert set(np.unique(mask_T).tolist()) <= {0.0, 1.0}
    assert (scored >= context).all() and ((scored - context) % 2 == 0).all()
    queried = inputs_T[scored].tolist()
    assert sorted(queried) == sorted(keys.tolist())  # every key queried exactly once
    for t, key in zip(scored, queried):
      assert targets_T[t] == value_of[key]


def test_mqar_shapes_dtypes_and_structure() -> None:
  batch = mqar_batch(seed=0, step=0, **MQAR)
  assert isinstance(batch, Batch)
  for array, dtype in zip(batch, (np.int32, np.int32, np.float32)):
    assert array.shape == (64, 128) and array.dtype == dtype
  assert batch.inputs.min() >= 0 and batch.inputs.max() < 512
  _check_mqar_rows(batch, 128, 8, 512)


@pytest.mark.parametrize("seq_len,num_kv", [(64, 4), (128, 8), (256, 16), (512, 64), (16, 4)])
def test_mqar_structure_across_grid(seq_len: int, num_kv: int) -> None:
  batch = mqar_batch(
    seed=3, step=11, batch_size=16, seq_len=seq_len, num_kv=num_kv, vocab_size=8192
  )
  _check_mqar_rows(batch, seq_len, num_kv, 8192)


def test_mqar_leaves_random_token_after_query_as_zoology() -> None:
  batch = mqar_batch(seed=0, step=0, batch_size=64, seq_len=128, num_kv=8, vocab_size=8192)
  rows, cols = np.nonzero(batch.mask)
  follows = batch.inputs[rows, cols + 1] == batch.targets[rows, cols]
  assert follows.mean() < 0.05


def test_mqar_non_query_positions_are_random_tokens() -> None:
  batch = mqar_batch(seed=1, step=2, batch_size=64, seq_len=512, num_kv=8, vocab_size=8192)
  filler = batch.inputs[:, 16:][batch.mask[:, 16:] == 0]
  # Uniform over the whole vocabulary, not zeros: both halves appear in roughly equal measure.
  assert np.unique(filler).size > 4000
  assert 0.45 < (filler < 4096).mean() < 0.55


def test_mqar_deterministic_in_seed_and_step() -> None:
  a = mqar_batch(seed=5, step=7, **MQAR)
  b = mqar_batch(seed=5, step=7, **MQAR)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.inputs, mqar_batch(seed=5, step=8, **MQAR).inputs)
  assert not np.array_equal(a.inputs, mqar_batch(seed=6, step=7, **MQAR).inputs)


def test_mqar_eval_set_is_fixed_and_disjoint_from_training_stream() -> None:
  kw = dict(seq_len=64, num_kv=4, vocab_size=8192)
  eval_a = mqar_eval_set(seed=0, num_examples=300, **kw)  # > one internal chunk
  eval_b = mqar_eval_set(seed=0, num_examples=300, **kw)
  assert eval_a.inputs.shape == (300, 64)
  np.testing.assert_array_equal(eval_a.inputs, eval_b.inputs)
  _check_mqar_rows(eval_a, 64, 4, 8192)
  eval_rows = {row.tobytes() for row in eval_a.inputs}
  for step in range(50):
    train = mqar_batch(seed=0, step=step, batch_size=64, **kw)
    assert not eval_rows & {row.tobytes() for row in train.inputs}


@pytest.mark.parametrize(
  "overrides,option",
  [
    (dict(seq_len=127), "seq_len"),
    (dict(vocab_size=128), "vocab_size"),
    (dict(num_kv=33), "num_kv"),
    (dict(num_kv=0), "num_kv"),
    (dict(batch_size=0), "batch_size"),
    (dict(power_a=0.0), "power_a"),
  ],
)
def test_mqar_invalid_options(overrides: dict, option: str) -> None:
  kw = {**MQAR, **overrides}
  with pytest.raises(DataError, match=option):
    mqar_batch(seed=0, step=0, **kw)


def test_mqar_power_law_prefers_short_gaps() -> None:
  batch = mqar_batch(seed=0, step=0, batch_size=2000, seq_len=128, num_kv=4, vocab_size=512)
  _, cols = np.nonzero(batch.mask)
  gaps = (cols - 8) // 2
  counts = np.bincount(gaps, minlength=60)
  assert counts[:10].sum() > 2 * counts[-10:].sum()
  assert counts[0] > counts[-1]


def _zoology_reference_gaps(
  rng_seed: int, n: int, space: int, k: int, power_a: float
) -> np.ndarray:
  """Zoology's gap sampler: np.random.choice(arange(space), k, replace=False, p) per example."""
  rng = np.random.RandomState(rng_seed)
  p = power_a * np.arange(1, space + 1) ** (power_a - 1)
  p = p / p.sum()
  return np.stack([rng.choice(space, size=k, replace=False, p=p) for _ in range(n)])


def test_mqar_gap_distribution_matches_zoology_sampler() -> None:
  n, seq_len, k = 20000, 32, 4
  space = (seq_len - 2 * k) // 2
  batch = mqar_batch(seed=1, step=0, batch_size=n, seq_len=seq_len, num_kv=k, vocab_size=64)
  # Gap of the i-th key (in prefix order), as Zoology pairs keys with gaps in draw order.
  keys_NK = batch.inputs[:, 0 : 2 * k : 2]
  pos_of = np.full((n, 64), -1)
  rows, cols = np.nonzero(batch.mask)
  pos_of[rows, batch.inputs[rows, cols]] = cols
  ours_NK = (np.take_along_axis(pos_of, keys_NK, axis=1) - 2 * k) // 2
  ref_NK = _zoology_reference_gaps(0, n, space, k, 0.01)
  for i in range(k):
    ours = np.bincount(ours_NK[:, i], minlength=space) / n
    ref = np.bincount(ref_NK[:, i], minlength=space) / n
    assert np.abs(ours - ref).max() < 0.02, i


def _filler_positions(batch: Batch, num_kv: int) -> np.ndarray:
  """bool [B, T]: the positions that are neither a key-value pair nor a query."""
  filler_BT = batch.mask == 0
  filler_BT[:, : 2 * num_kv] = False
  return filler_BT


@pytest.mark.parametrize("seq_len,num_kv", [(64, 4), (128, 8), (256, 16), (16, 4)])
def test_mqar_zero_fillers_follow_zoology_grid(seq_len: int, num_kv: int) -> None:
  """fillers="zero" (Zoology's random_non_queries=False): key-value pairs first, keys in
  [1, V/2) and values in [V/2, V) distinct within a row, each key queried once later, the
  query's target its value, only queries scored, and token 0 everywhere else."""
  vocab_size = 8192
  kw = dict(seq_len=seq_len, num_kv=num_kv, vocab_size=vocab_size)
  batch = mqar_batch(seed=3, step=11, batch_size=32, fillers="zero", **kw)
  for array, dtype in zip(batch, (np.int32, np.int32, np.float32)):
    assert array.shape == (32, seq_len) and array.dtype == dtype
  _check_mqar_rows(batch, seq_len, num_kv, vocab_size)
  filler_BT = _filler_positions(batch, num_kv)
  assert (batch.inputs[filler_BT] == 0).all()
  assert (batch.inputs[~filler_BT] != 0).all()  # keys >= 1, values >= V/2: only fillers are 0
  assert (batch.mask.sum(axis=1) == num_kv).all()
  assert (batch.targets[batch.mask == 0] == 0).all()


def test_mqar_zero_fillers_change_only_the_fillers() -> None:
  """The two filler kinds draw the same pairs and query positions, in training batches and
  in a held-out set of several chunks; only the filler tokens differ."""
  kw = dict(seq_len=128, num_kv=8, vocab_size=512)
  pairs = [
    tuple(mqar_batch(seed=2, step=5, batch_size=16, fillers=f, **kw) for f in ("random", "zero")),
    # 300 examples: two chunks drawn from one stream
    tuple(mqar_eval_set(seed=2, num_examples=300, fillers=f, **kw) for f in ("random", "zero")),
  ]
  for rand, zero in pairs:
    np.testing.assert_array_equal(zero.targets, rand.targets)
    np.testing.assert_array_equal(zero.mask, rand.mask)
    filler_BT = _filler_positions(rand, 8)
    np.testing.assert_array_equal(zero.inputs, np.where(filler_BT, 0, rand.inputs))
    assert (rand.inputs[filler_BT] != 0).mean() > 0.99  # the random kind is not zero-filled
  _check_mqar_rows(pairs[1][1], 128, 8, 512)


@pytest.mark.parametrize("fillers", MQAR_FILLERS)
def test_mqar_value_not_in_input_before_its_query(fillers: str) -> None:
  """Before its query, a value is in the input only in its own key-value pair: otherwise
  a model could copy it from nearby without recalling it. Random fillers hit a given value
  by chance (1/V per filler position), so for them the count is held to the chance level;
  zero fillers never hit a value."""
  num_kv, vocab_size = 16, 8192
  kw = dict(seq_len=256, num_kv=num_kv, vocab_size=vocab_size)
  batch = mqar_batch(seed=4, step=1, batch_size=256, fillers=fillers, **kw)
  filler_BT = _filler_positions(batch, num_kv)
  hits = chance = 0.0
  queries_after_gap = 0
  for inputs_T, targets_T, mask_T, filler_T in zip(*batch, filler_BT):
    for q in np.nonzero(mask_T)[0]:
      value = targets_T[q]
      pair = 2 * int(np.nonzero(inputs_T[0 : 2 * num_kv : 2] == inputs_T[q])[0][0])
      assert inputs_T[pair + 1] == value  # its own pair holds it ...
      before_T = np.delete(inputs_T[:q], pair + 1)
      hits += np.count_nonzero(before_T == value)  # ... and nothing else before the query
      chance += np.count_nonzero(filler_T[:q]) / vocab_size
      queries_after_gap += q > 2 * num_kv
  assert queries_after_gap > 2000  # most queries leave room for a leak
  if fillers == "zero":
    assert hits == 0
  else:
    assert 0 < chance < 100
    assert hits <= chance + 5 * np.sqrt(chance), (hits, chance)


@pytest.mark.parametrize("fillers", ["zeros", "", None, "Random"])
def test_mqar_invalid_fillers(fillers) -> None:
  assert MQAR_FILLERS == ("random", "zero")
  for make in (
    lambda: mqar_batch(seed=0, step=0, fillers=fillers, **MQAR),
    lambda: mqar_eval_set(
      seed=0, num_examples=4, seq_len=128, num_kv=8, vocab_size=512, fillers=fillers
    ),
  ):
    with pytest.raises(ValueError, match="fillers"):
      make()


def test_mqar_is_fast() -> None:
  mqar_batch(seed=0, step=0, batch_size=256, seq_len=512, num_kv=64, vocab_size=8192)
  start = time.perf_counter()
  mqar_batch(seed=0, step=1, batch_size=256, seq_len=512, num_kv=64, vocab_size=8192)
  # Target is well under 100 ms; the bound is loose for slow CI machines.
  assert time.perf_counter() - start < 0.5


# ------------------------------------------------------------------------------- modular addition


def test_modadd_splits() -> None:
  p = 13
  train, test = modadd_splits(p, 0.3, seed=0)
  assert modadd_vocab_size(p) == 14
  assert len(train.inputs) == round(0.3 * p * p) and len(train.inputs) + len(test.inputs) == p * p
  train_pairs = {tuple(r) for r in train.inputs[:, :2].tolist()}
  test_pairs = {tuple(r) for r in test.inputs[:, :2].tolist()}
  assert not train_pairs & test_pairs and len(train_pairs | test_pairs) == p * p
  for split in (train, test):
    assert (
      split.inputs.dtype == np.int32
      and split.targets.dtype == np.int32
      and split.mask.dtype == np.float32
    )
    assert split.inputs.shape[1] == 3
    assert (split.inputs[:, 2] == p).all()
    np.testing.assert_array_equal(
      split.targets[:, 2], (split.inputs[:, 0] + split.inputs[:, 1]) % p
    )
    np.testing.assert_array_equal(split.mask, np.tile([0.0, 0.0, 1.0], (len(split.mask), 1)))


def test_modadd_deterministic_by_seed() -> None:
  a, _ = modadd_splits(113, 0.3, seed=4)
  b, _ = modadd_splits(113, 0.3, seed=4)
  c, _ = modadd_splits(113, 0.3, seed=5)
  np.testing.assert_array_equal(a.inputs, b.inputs)
  assert not np.array_equal(a.inputs, c.inputs)


@pytest.mark.parametrize(
  "p,fraction,option",
  [
    (1, 0.3, "p"),
    (13, 0.0, "train_fraction"),
    (13, 1.0, "train_fraction"),
    (13, 1.5, "train_fraction"),
    (2, 0.05, "empty split"),
  ],
)
def test_modadd_invalid(p: int, fraction: float, option: str) -> None:
  with pytest.raises(DataError, match=option):
    modadd_splits(p, fraction, seed=0)


# ------------------------------------------------------------------------------------ byte corpus


def _make_tree(root: Path, num_files: int = 40) -> dict[str, bytes]:
  """Text files in nested dirs, plus hidden, binary and empty ones that must be ignored."""
  texts = {}
  for i in range(num_files):
    rel = f"{'sub/' if i % 3 == 0 else ''}{'deep/x/' if i % 7 == 0 else ''}file_{i:02d}.txt"
    data = (f"file {i} ünïcode " * (10 + i)).encode("utf-8")
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)
    texts[rel] = data
  (root / ".hidden.txt").write_bytes(b"HIDDEN FILE")
  (root / ".git").mkdir()
  (root / ".git" / "config").write_bytes(b"HIDDEN DIR")
  (root / "blob.bin").write_bytes(b"abc\x00def" * 100)
  (root / "empty.txt").write_bytes(b"")
  return texts


def _expected_split(texts: dict[str, bytes], val_fraction: float) -> tuple[bytes, bytes]:
  train = [r for r in sorted(texts) if zlib.crc32(r.encode()) % 1000 >= val_fraction * 1000]
  val = [r for r in sorted(texts) if zlib.crc32(r.encode()) % 1000 < val_fraction * 1000]
  assert train and val  # the fixture must exercise the by-file split
  return b"\n".join(texts[r] for r in train), b"\n".join(texts[r] for r in val)


def test_corpus_splits_by_file(tmp_path: Path) -> None:
  texts = _make_tree(tmp_path / "src")
  corpus = ByteCorpus.from_path(tmp_path / "src", tmp_path / "cache", val_fraction=0.25)
  train_bytes, val_bytes = _expected_split(texts, 0.25)
  assert corpus.vocab_size == 256
  assert corpus.train_tokens.dtype == np.uint8 and isinstance(corpus.train_tokens, np.memmap)
  assert corpus.train_tokens.tobytes() == train_bytes
  assert corpus.val_tokens.tobytes() == val_bytes
  assert (corpus.num_train_bytes, corpus.num_val_bytes) == (len(train_bytes), len(val_bytes))
  assert (tmp_path / "cache" / "train.u8").read_bytes() == train_bytes
  manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
  assert manifest["num_bytes"] == {"train": len(train_bytes), "val": len(val_bytes)}
  assert manifest["num_files"]["train"] + manifest["num_files"]["val"] == len(texts)
  assert manifest["num_files"]["skipped_binary"] == 1
  assert sorted(manifest["files"]["train"] + manifest["files"]["val"]) == sorted(texts)
  assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]

  again = ByteCorpus.from_path(tmp_path / "src", tmp_path / "other_cache", val_fraction=0.25)
  assert again.train_tokens.tobytes() == train_bytes and again.val_tokens.tobytes() == val_bytes


def test_corpus_cache_reused_then_rebuilt_on_change(tmp_path: Path) -> None:
  texts = _make_tree(tmp_path / "src")
  cache = tmp_path / "cache"
  ByteCorpus.from_path(tmp_path / "src", cache, val_fraction=0.25)
  mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
  time.sleep(0.01)
  ByteCorpus.from_path(tmp_path / "src", cache, val_fraction=0.25)
  assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes

  (tmp_path / "src" / "file_01.txt").write_bytes(b"changed content")
  texts["file_01.txt"] = b"changed content"
  corpus = ByteCorpus.from_path(tmp_path / "src", cache, val_fraction=0.25)
  assert (corpus.train_tokens.tobytes(), corpus.val_tokens.tobytes()) == _expected_split(
    texts, 0.25
  )


def test_corpus_incomplete_cache_is_rebuilt(tmp_path: Path) -> None:
  texts = _make_tree(tmp_path / "src")
  cache = tmp_path / "cache"
  ByteCorpus.from_path(tmp_path / "src", cache, val_fraction=0.25)
  with open(cache / "train.u8", "r+b") as f:  # as if a copy had been cut short
    f.truncate(10)
  corpus = ByteCorpus.from_path(tmp_path / "src", cache, val_fraction=0.25)
  assert corpus.train_tokens.tobytes() == _expected_split(texts, 0.25)[0]


def test_corpus_train_batch_windows(tmp_path: Path) -> None:
  _make_tree(tmp_path / "src")
  corpus = ByteCorpus.from_path(tmp_path / "src", tmp_path / "cache", val_fraction=0.25)
  train_bytes = corpus.train_tokens.tobytes()
  batch = corpus.train_batch(seed=0, step=3, batch_size=16, seq_len=32)
  assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (16, 32)
  assert (
    batch.inputs.dtype == np.int32
    and batch.targets.dtype == np.int32
    and batch.mask.dtype == np.float32
  )
  assert (batch.mask == 1.0).all()
  np.testing.assert_array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])
  for inputs_T, targets_T in zip(batch.inputs, batch.targets):
    window = bytes(inputs_T.astype(np.uint8)) + bytes([targets_T[-1]])
    assert window in train_bytes
  same = corpus.train_batch(seed=0, step=3, batch_size=16, seq_len=32)
  np.testing.assert_array_equal(batch.inputs, same.inputs)
  assert not np.array_equal(
    batch.inputs, corpus.train_batch(seed=0, step=4, batch_size=16, seq_len=32).inputs
  )


def test_corpus_val_batches_fixed_non_overlapping(tmp_path: Path) -> None:
  _make_tree(tmp_path / "src")
  corpus = ByteCorpus.from_path(tmp_path / "src", tmp_path / "cache", val_fraction=0.25)
  val = corpus.val_tokens.tobytes()
  seq_len = 16
  num_grid = (len(val) - 1) // seq_len
  batches = corpus.val_batches(batch_size=7, seq_len=seq_len, max_batches=1000)
  assert batches and all(b.inputs.shape == (7, seq_len) for b in batches)
  mask_rows = np.concatenate([b.mask for b in batches])
  assert mask_rows.sum() == num_grid * seq_len  # every grid window once, padding masked out
  windows = [
    bytes(i.astype(np.uint8)) + bytes([t[-1]]) for b in batches for i, t, m in zip(*b) if m.all()
  ]
  assert windows == [val[s * seq_len : s * seq_len + seq_len + 1] for s in range(num_grid)]

  few = corpus.val_batches(batch_size=4, seq_len=seq_len, max_batches=2)
  assert len(few) == 2 and all(b.mask.all() for b in few)
  starts = [val.index(bytes(i.astype(np.uint8))) for b in few for i in b.inputs]
  assert np.all(np.diff(starts) >= seq_len)  # evenly spread, non-overlapping targets
  again = corpus.val_batches(batch_size=4, seq_len=seq_len, max_batches=2)
  for a, b in zip(few, again):
    np.testing.assert_array_equal(a.inputs, b.inputs)


def test_corpus_single_file_splits_by_bytes(tmp_path: Path) -> None:
  data = bytes(range(32, 127)) * 20  # 1900 bytes
  (tmp_path / "one.txt").write_bytes(data)
  corpus = ByteCorpus.from_path(tmp_path / "one.txt", tmp_path / "cache", val_fraction=0.1)
  assert corpus.num_val_bytes == 190
  assert corpus.train_tokens.tobytes() == data[:-190]
  assert corpus.val_tokens.tobytes() == data[-190:]
  assert corpus.manifest["split"] == "tail_bytes"


def test_corpus_few_files_all_same_side_falls_back_to_byte_split(tmp_path: Path) -> None:
  (tmp_path / "src").mkdir()
  names = [n for n in (f"f{i}.txt" for i in range(100)) if zlib.crc32(n.encode()) % 1000 >= 100][:2]
  for n in names:
    (tmp_path / "src" / n).write_bytes(n.encode() * 100)
  corpus = ByteCorpus.from_path(tmp_path / "src", tmp_path / "cache", val_fraction=0.1)
  joined = b"\n".join(n.encode() * 100 for n in names)
  assert corpus.train_tokens.tobytes() + corpus.val_tokens.tobytes() == joined
  assert corpus.num_val_bytes == round(0.1 * len(joined))
  assert corpus.manifest["files"]["val"] == [names[-1]]


def test_corpus_errors(tmp_path: Path) -> None:
  cache = tmp_path / "cache"
  with pytest.raises(DataError, match="does not exist"):
    ByteCorpus.from_path(tmp_path / "missing", cache)
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(DataError, match="empty_dir"):
    ByteCorpus.from_path(tmp_path / "empty_dir", cache)
  (tmp_path / "only_binary").mkdir()
  (tmp_path / "only_binary" / "x.bin").write_bytes(b"\x00\x01")
  with pytest.raises(DataError, match="no non-empty text files"):
    ByteCorpus.from_path(tmp_path / "only_binary", cache)
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(DataError, match="empty"):
    ByteCorpus.from_path(tmp_path / "empty.txt", cache)
  (tmp_path / "bin.dat").write_bytes(b"ab\x00cd")
  with pytest.raises(DataError, match="binary"):
    ByteCorpus.from_path(tmp_path / "bin.dat", cache)
  (tmp_path / "ok.txt").write_bytes(b"hello world " * 10)
  with pytest.raises(DataError, match="val_fraction"):
    ByteCorpus.from_path(tmp_path / "ok.txt", cache, val_fraction=0.0)
  if Path("/dev/null").exists():
    with pytest.raises(DataError, match="neither a file nor a directory"):
      ByteCorpus.from_path("/dev/null", cache)


def test_corpus_too_short_split(tmp_path: Path) -> None:
  (tmp_path / "small.txt").write_bytes(b"x" * 200)
  corpus = ByteCorpus.from_path(tmp_path / "small.txt", tmp_path / "cache")  # val: 20 bytes
  corpus.check(seq_len=19)
  with pytest.raises(DataError, match="validation split has 20 bytes"):
    corpus.check(seq_len=20)
  with pytest.raises(DataError, match="seq_len"):
    corpus.val_batches(batch_size=2, seq_len=64, max_batches=1)
  with pytest.raises(DataError, match="training split"):
    corpus.train_batch(seed=0, step=0, batch_size=2, seq_len=500)


def test_corpus_unreadable_file_chmod(tmp_path: Path) -> None:
  (tmp_path / "src").mkdir()
  (tmp_path / "src" / "a.txt").write_bytes(b"fine " * 100)
  secret = tmp_path / "src" / "b.txt"
  secret.write_bytes(b"secret " * 100)
  secret.chmod(0)
  try:
    if os.access(secret, os.R_OK):
      pytest.skip("running with privileges that ignore file permissions")
    with pytest.raises(DataError, match="b.txt.*permission denied"):
      ByteCorpus.from_path(tmp_path / "src", tmp_path / "cache")
  finally:
    secret.chmod(0o644)


def test_corpus_unreadable_file_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
  """Same error path as the chmod test, but also exercised when running as root."""
  (tmp_path / "a.txt").write_bytes(b"fine " * 100)
  real_open = open

  def deny(path, *args, **kwargs):  # noqa: ANN001, ANN202
    if Path(path).name == "a.txt":
      raise PermissionError(13, "Permission denied", str(path))
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(text_module, "open", deny, raising=False)
  with pytest.raises(DataError, match=r"a\.txt: permission denied"):
    ByteCorpus.from_path(tmp_path / "a.txt", tmp_path / "cache")


def test_default_corpus_is_stdlib_without_tests(tmp_path: Path) -> None:
  corpus = ByteCorpus.default(tmp_path / "cache")
  assert corpus.num_train_bytes > 1_000_000 and corpus.num_val_bytes > 0
  manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
  files = manifest["files"]["train"] + manifest["files"]["val"]
  assert "os.py" in files and manifest["files"]["val"]
  excluded = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}
  for rel in files:
    parts = rel.split("/")
    assert rel.endswith(".py") and not parts[-1].startswith("test_"), rel
    assert not excluded & set(parts[:-1]), rel
  batch = corpus.train_batch(seed=0, step=0, batch_size=4, seq_len=128)
  assert batch.inputs.shape == (4, 128) and batch.inputs.max() < 256


def test_bits_per_byte() -> None:
  assert bits_per_byte(math.log(2.0)) == pytest.approx(1.0)
  assert bits_per_byte(0.0) == 0.0
  assert bits_per_byte(2.0) == pytest.approx(2.0 / math.log(2.0))
