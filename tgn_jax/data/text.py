"""Byte-level text corpus: one token per byte (vocab 256), cached as raw uint8 memmaps.

A corpus is a UTF-8 text file or a directory of them. Files are split into train and
validation by a hash of their relative path, so adding a file never moves another one across
the split. Each split is streamed once into `cache_dir/{train,val}.u8` (files joined by b"\\n")
and a `manifest.json` is written last; a cache whose manifest matches the source's current
file list (names, sizes, mtimes) is reused as is.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import sysconfig
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tgn_jax.data.batch import Batch, DataError, batch_rows, row_rng
from tgn_jax.jsonio import write_json

_FORMAT = 1
_CHUNK_BYTES = 1 << 20
_SNIFF_BYTES = 8192
_SEPARATOR = b"\n"
_MANIFEST = "manifest.json"
_SPLITS = ("train", "val")
_STDLIB_SKIP_DIRS = frozenset(
  {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)

# (absolute path, relative posix path used for the split hash and the manifest)
_Source = tuple[Path, str]


def bits_per_byte(mean_ce_nats: float) -> float:
  """Mean cross-entropy in nats per byte-token -> bits per byte."""
  return float(mean_ce_nats) / math.log(2.0)


def _read_error(path: Path, exc: OSError) -> DataError:
  if isinstance(exc, PermissionError):
    return DataError(f"cannot read corpus file {path}: permission denied")
  return DataError(f"cannot read corpus file {path}: {exc.strerror or exc}")


def _read_head(path: Path) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read(_SNIFF_BYTES)
  except OSError as exc:
    raise _read_error(path, exc) from None


def _walk(root: Path, keep_file: Callable[[str], bool], skip_dirs: frozenset[str]) -> list[_Source]:
  """Regular files under root (recursively, hidden entries skipped), sorted by relative path."""

  def on_error(exc: OSError) -> None:
    raise _read_error(Path(exc.filename or root), exc)

  found: list[_Source] = []
  for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
    dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
    for name in filenames:
      path = Path(dirpath) / name
      if name.startswith(".") or not keep_file(name) or not path.is_file():
        continue
      found.append((path, path.relative_to(root).as_posix()))
  return sorted(found, key=lambda source: source[1])


def _fingerprint(source: str, val_fraction: float, files: list[_Source]) -> str:
  digest = hashlib.sha256(json.dumps([_FORMAT, source, val_fraction]).encode())
  for path, rel in files:
    try:
      st = path.stat()
    except OSError as exc:
      raise _read_error(path, exc) from None
    digest.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
  return digest.hexdigest()


def _is_validation(rel: str, val_fraction: float) -> bool:
  return zlib.crc32(rel.encode("utf-8")) % 1000 < val_fraction * 1000


def _copy_into(out: BinaryIO, path: Path) -> int:
  """Stream one file's bytes into out; returns the number of bytes written."""
  written = 0
  try:
    with open(path, "rb") as f:
      while chunk := f.read(_CHUNK_BYTES):
        out.write(chunk)
        written += len(chunk)
  except OSError as exc:
    raise _read_error(path, exc) from None
  return written


def _write_joined(out: BinaryIO, files: list[_Source]) -> list[int]:
  """Write files joined by the separator; returns each file's start offset in out."""
  starts = []
  for i, (path, _) in enumerate(files):
    if i:
      out.write(_SEPARATOR)
    starts.append(out.tell())
    _copy_into(out, path)
  return starts


def _move_tail(src: BinaryIO, dst: BinaryIO, start: int) -> None:
  src.seek(start)
  while chunk := src.read(_CHUNK_BYTES):
    dst.write(chunk)
  src.truncate(start)


def _build_cache(
  source: str,
  texts: list[_Source],
  cache_dir: Path,
  val_fraction: float,
  fingerprint: str,
  num_binary: int,
) -> dict[str, Any]:
  """Write train.u8 / val.u8 atomically, then the manifest; returns the manifest."""
  is_val = [_is_validation(rel, val_fraction) for _, rel in texts]
  by_file = any(is_val) and not all(is_val)
  cache_dir.mkdir(parents=True, exist_ok=True)
  # Drop the old commit marker first: a crash mid-rebuild must not look like a complete cache.
  (cache_dir / _MANIFEST).unlink(missing_ok=True)

  tmp_paths: dict[str, str] = {}
  try:
    for split in _SPLITS:
      fd, tmp_paths[split] = tempfile.mkstemp(dir=cache_dir, prefix=f".{split}.", suffix=".tmp")
      os.close(fd)
    with open(tmp_paths["train"], "w+b") as train_f, open(tmp_paths["val"], "w+b") as val_f:
      if by_file:
        train_files = [s for s, v in zip(texts, is_val) if not v]
        val_files = [s for s, v in zip(texts, is_val) if v]
        _write_joined(train_f, train_files)
        _write_joined(val_f, val_files)
      else:
        # Too few files to split by name: the last val_fraction of all bytes is validation.
        starts = _write_joined(train_f, texts)
        total = train_f.tell()
        num_val = min(max(1, round(val_fraction * total)), total - 1)
        if num_val < 1:
          raise DataError(f"corpus {source} has only {total} byte(s); too small to split")
        boundary = total - num_val
        _move_tail(train_f, val_f, boundary)
        ends = [*(s - len(_SEPARATOR) for s in starts[1:]), total]
        train_files = [src for src, s in zip(texts, starts) if s < boundary]
        val_files = [src for src, e in zip(texts, ends) if e > boundary]
      sizes = {}
      for split, f in (("train", train_f), ("val", val_f)):
        f.flush()
        os.fsync(f.fileno())
        sizes[split] = f.seek(0, os.SEEK_END)
    for split in _SPLITS:
      os.replace(tmp_paths.pop(split), cache_dir / f"{split}.u8")
  finally:
    for tmp in tmp_paths.values():
      Path(tmp).unlink(missing_ok=True)

  manifest = {
    "format": _FORMAT,
    "source": source,
    "val_fraction": val_fraction,
    "fingerprint": fingerprint,
    "split": "by_file" if by_file else "tail_bytes",
    "num_bytes": sizes,
    "num_files": {"train": len(train_files), "val": len(val_files), "skipped_binary": num_binary},
    "files": {"train": [rel for _, rel in train_files], "val": [rel for _, rel in val_files]},
  }
  write_json(cache_dir / _MANIFEST, manifest)
  return manifest


def _load_cache(cache_dir: Path, fingerprint: str) -> dict[str, Any] | None:
  """The manifest of a complete cache built from the same sources, else None."""
  try:
    manifest = json.loads((cache_dir / _MANIFEST).read_text())
    if manifest.get("format") != _FORMAT or manifest.get("fingerprint") != fingerprint:
      return None
    for split in _SPLITS:
      if (cache_dir / f"{split}.u8").stat().st_size != manifest["num_bytes"][split]:
        return None
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return manifest


class ByteCorpus:
  """Train / validation byte streams of a text corpus, memory-mapped from a cache directory.

  Tokens are bytes (vocab_size 256). Batches are int32 [B, T] with float32 mask [B, T].
  """

  vocab_size: int = 256

  def __init__(self, cache_dir: Path, manifest: dict[str, Any]) -> None:
    self.cache_dir = Path(cache_dir)
    self.manifest = manifest
    self._train = np.memmap(self.cache_dir / "train.u8", dtype=np.uint8, mode="r")
    self._val = np.memmap(self.cache_dir / "val.u8", dtype=np.uint8, mode="r")

  @classmethod
  def from_path(
    cls, path: str | os.PathLike, cache_dir: str | os.PathLike, val_fraction: float = 0.1
  ) -> ByteCorpus:
    """Corpus from a UTF-8 text file or a directory of text files (binary files skipped)."""
    root = Path(path).expanduser().absolute()
    if not root.exists():
      raise DataError(f"corpus path does not exist: {path}")
    if root.is_dir():
      files = _walk(root, keep_file=lambda name: True, skip_dirs=frozenset())
    elif root.is_file():
      files = [(root, root.name)]
    else:
      raise DataError(f"corpus path is neither a file nor a directory: {path}")
    return cls._from_files(
      str(root), files, Path(cache_dir), val_fraction, single_file=root.is_file()
    )

  @classmethod
  def default(cls, cache_dir: str | os.PathLike, val_fraction: float = 0.1) -> ByteCorpus:
    """The running Python's standard-library `.py` sources (no tests, no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"]).absolute()
    if not root.is_dir():
      raise DataError(f"python standard library not found at {root}")

    def keep(name: str) -> bool:
      return name.endswith(".py") and not name.startswith("test_")

    files = _walk(root, keep_file=keep, skip_dirs=_STDLIB_SKIP_DIRS)
    source = f"python-stdlib {sys.version_info.major}.{sys.version_info.minor}: {root}"
    return cls._from_files(source, files, Path(cache_dir), val_fraction, single_file=False)

  @classmethod
  def _from_files(
    cls, source: str, files: list[_Source], cache_dir: Path, val_fraction: float, single_file: bool
  ) -> ByteCorpus:
    if not 0.0 < val_fraction < 1.0:
      raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    fingerprint = _fingerprint(source, val_fraction, files)
    manifest = _load_cache(cache_dir, fingerprint)
    if manifest is None:
      texts, num_binary = [], 0
      for path, rel in files:
        head = _read_head(path)
        if single_file and not head:
          raise DataError(f"corpus file is empty: {path}")
        if single_file and b"\0" in head:
          raise DataError(f"corpus file is binary (NUL byte in its first 8 KiB): {path}")
        if b"\0" in head:
          num_binary += 1
        elif head:
          texts.append((path, rel))
      if not texts:
        raise DataError(f"no non-empty text files in corpus directory {source}")
      manifest = _build_cache(source, texts, cache_dir, val_fraction, fingerprint, num_binary)
    return cls(cache_dir, manifest)

  @property
  def train_tokens(self) -> np.ndarray:
    """uint8 [num_train_bytes] memmap."""
    return self._train

  @property
  def val_tokens(self) -> np.ndarray:
    """uint8 [num_val_bytes] memmap."""
    return self._val

  @property
  def num_train_bytes(self) -> int:
    return int(self._train.shape[0])

  @property
  def num_val_bytes(self) -> int:
    return int(self._val.shape[0])

  def check(self, seq_len: int) -> None:
    """DataError unless both splits hold at least one window of seq_len + 1 bytes."""
    if seq_len < 1:
      raise DataError(f"seq_len must be >= 1, got {seq_len}")
    for name, size in (("training", self.num_train_bytes), ("validation", self.num_val_bytes)):
      if size < seq_len + 1:
        raise DataError(
          f"corpus {self.manifest['source']}: {name} split has {size} bytes, "
          f"needs at least seq_len + 1 = {seq_len + 1}"
        )

  def train_batch(
    self, seed: int, step: int, batch_size: int, seq_len: int, rows: range | None = None
  ) -> Batch:
    """Rows `rows` (default: all) of a batch of random windows from the train split;
    int32 [R, T] inputs/targets, all-ones mask. Row r's window comes from
    row_rng(seed, step, r): a process reads only the windows of its rows."""
    self.check(seq_len)
    if batch_size < 1:
      raise DataError(f"batch_size must be >= 1, got {batch_size}")
    rows = batch_rows(batch_size, rows)
    starts_R = np.array(
      [row_rng(seed, step, r).integers(0, self.num_train_bytes - seq_len) for r in rows],
      dtype=np.int64,
    )
    return _windows(self._train, starts_R, seq_len, num_real=len(rows))

  def val_batches(self, batch_size: int, seq_len: int, max_batches: int) -> list[Batch]:
    """Fixed evaluation windows from the validation split, evenly spaced and non-overlapping.

    Consecutive windows of the underlying grid share one byte, so each byte is predicted at
    most once. Every batch has batch_size rows; rows past the last window are zero with mask 0.
    """
    self.check(seq_len)
    if batch_size < 1 or max_batches < 1:
      raise DataError(
        f"batch_size and max_batches must be >= 1, got {batch_size} and {max_batches}"
      )
    num_grid = (self.num_val_bytes - 1) // seq_len
    num_windows = min(num_grid, batch_size * max_batches)
    grid_idx = np.round(np.linspace(0, num_grid - 1, num_windows)).astype(np.int64)
    starts = grid_idx * seq_len
    batches = []
    for lo in range(0, num_windows, batch_size):
      chunk = starts[lo : lo + batch_size]
      padded = np.zeros(batch_size, dtype=np.int64)
      padded[: len(chunk)] = chunk
      batches.append(_windows(self._val, padded, seq_len, num_real=len(chunk)))
    return batches

  def __repr__(self) -> str:
    return (
      f"ByteCorpus(source={self.manifest['source']!r}, train={self.num_train_bytes} B, "
      f"val={self.num_val_bytes} B)"
    )


def _windows(tokens: np.ndarray, starts_B: np.ndarray, seq_len: int, num_real: int) -> Batch:
  """Windows tokens[s : s + seq_len + 1] -> Batch; rows >= num_real are zeroed and masked out."""
  window_BT = np.asarray(tokens[starts_B[:, None] + np.arange(seq_len + 1)]).astype(np.int32)
  window_BT[num_real:] = 0
  mask_BT = np.zeros((len(starts_B), seq_len), dtype=np.float32)
  mask_BT[:num_real] = 1.0
  return Batch(
    np.ascontiguousarray(window_BT[:, :-1]), np.ascontiguousarray(window_BT[:, 1:]), mask_BT
  )
