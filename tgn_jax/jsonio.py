"""JSON files the way the project writes them: atomic JSON documents (a reader never sees
half a file; NaN and inf become null) and JSONL records that survive a crash mid-line."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def read_jsonl(path: Path) -> list[dict[str, Any]]:
  """The records of a JSONL file (none if it does not exist); lines that do not parse (a
  record cut short by a crash) are skipped."""
  records = []
  if not Path(path).exists():
    return records
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.read().splitlines()
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict):
      records.append(record)
  return records


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(jsonable(record)) + "\n")


def write_json(path: Path, data: Any) -> None:
  """Writes JSON atomically (a reader never sees half a file); NaN/inf become null."""
  write_text_atomic(Path(path), json.dumps(jsonable(data), indent=1) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def jsonable(value):
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, (np.ndarray, np.floating, np.integer, np.bool_)):
    return jsonable(value.tolist())
  return value
