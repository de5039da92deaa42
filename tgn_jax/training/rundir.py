"""The run directory: its layout, the create / resume / refuse-a-mismatch policy, checkpoints
through orbax's public CheckpointManager API, and the one JSON and JSONL reader and writers
that train.py, the benchmarks and the plots use.

Layout: config.json (the nested TrainConfig), metrics.jsonl (one record per line: "train" and
"eval" kinds), summary.json, plots/, checkpoints/STEP (orbax).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from tgn_jax.jsonio import append_jsonl, read_jsonl, write_text_atomic
from tgn_jax.training.config import OPTIONS, ConfigError, flatten, nest
from tgn_jax.training.sharding import any_process, barrier


class CheckpointError(RuntimeError):
  """A checkpoint could not be saved; the message says which and what is intact."""


# Settings that may differ when a run is resumed; anything else would change the run itself.
RESUMABLE_CHANGES = frozenset(
  path for path in OPTIONS if path.startswith("run.") and path != "run.seed"
)


class RunDir:
  """Layout: config.json, metrics.jsonl, summary.json, plots/, checkpoints/."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    self.config = self.path / "config.json"
    self.metrics = self.path / "metrics.jsonl"
    self.summary = self.path / "summary.json"
    self.checkpoints = self.path / "checkpoints"

  def holds_run(self) -> bool:
    return self.config.exists() or self.metrics.exists() or self.checkpoints.exists()

  def stored_config(self) -> dict[str, Any]:
    try:
      return nest(json.loads(self.config.read_text()))
    except (OSError, json.JSONDecodeError, ConfigError) as e:
      raise ConfigError(f"--resume: cannot read the run's config {self.config}: {e}") from None

  def check_writable(self) -> None:
    """Raises ConfigError if the directory cannot be created or written."""
    existing = self.path
    while not existing.exists():
      existing = existing.parent
    if not existing.is_dir():
      raise ConfigError(f"--out {self.path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
      raise ConfigError(f"--out {self.path} is not writable (no write permission on {existing})")

  def append_metrics(self, record: dict[str, Any]) -> None:
    append_jsonl(self.metrics, record)

  def records(self, kind: Optional[str] = None) -> list[dict[str, Any]]:
    """The metrics.jsonl records (of one kind: "train" or "eval"), in order."""
    return [r for r in read_jsonl(self.metrics) if kind is None or r.get("kind") == kind]

  def read_summary(self) -> Optional[dict[str, Any]]:
    try:
      return json.loads(self.summary.read_text())
    except (OSError, json.JSONDecodeError):
      return None

  def finished(self) -> bool:
    """Whether summary.json records a run that reached its steps (or its stop accuracy)
    uninterrupted."""
    s = self.read_summary()
    done = s and (s["steps_completed"] >= s["steps_requested"] or s.get("stopped_at_accuracy"))
    return bool(done) and not s.get("interrupted_by")

  def truncate_metrics(self, last_step: int) -> None:
    """Drops records after `last_step` (written after the checkpoint a resume starts from)."""
    if not self.metrics.exists():
      return
    kept = [r for r in read_jsonl(self.metrics) if r.get("step", 0) <= last_step]
    write_text_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))


def check_resume_changes(stored: dict[str, Any], requested: dict[str, Any]) -> None:
  """ConfigError naming the first requested value (dotted path, flat alias or nested) that
  differs from the stored run's config where a resumed run cannot change."""
  stored_values = flatten(nest(stored))
  for path, value in flatten(nest(requested)).items():
    if path in RESUMABLE_CHANGES or path not in stored_values:
      continue
    if _comparable(stored_values[path]) != _comparable(value):
      raise ConfigError(
        f"{OPTIONS[path].flag} cannot change on --resume (the run has {stored_values[path]!r})"
      )


def _comparable(value):
  return list(value) if isinstance(value, tuple) else value


def check_new_or_resumable(run: RunDir, resume: bool) -> None:
  """The policy: a new run needs an empty --out, a resumed one a checkpoint in it."""
  if resume:
    if not run.config.exists() or not checkpoint_steps(run.checkpoints):
      raise ConfigError(f"--resume: no checkpoint to resume in {run.path}")
  elif run.holds_run():
    raise ConfigError(
      f"--out {run.path} already holds a run; pass --resume to continue it or choose another --out"
    )
  run.check_writable()


def checkpoint_steps(directory: Path) -> list[int]:
  """The steps orbax lists in a checkpoint directory (none if it does not exist)."""
  if not directory.is_dir():
    return []
  manager = ocp.CheckpointManager(
    directory.resolve(), options=ocp.CheckpointManagerOptions(create=False)
  )
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def checkpoint_manager(run: RunDir, keep: int) -> ocp.CheckpointManager:
  """The run's CheckpointManager (keeps the newest `keep`; creates the directory)."""
  return ocp.CheckpointManager(
    run.checkpoints.resolve(),
    item_handlers=ocp.StandardCheckpointHandler(),
    options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
  )


def restore(manager, run: RunDir, state, shardings, log, primary: bool):
  """The newest readable checkpoint, restored onto this run's mesh (whatever mesh it was
  saved from): (state, step).

  A checkpoint of another model (its shapes differ from this run's) is a ConfigError. One
  that cannot be read (truncated or corrupted files) is set aside (renamed
  STEP.unreadable), said in one line, and the next older one is tried; ConfigError if none
  is readable. Every process takes the same decisions.
  """
  target = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )
  for step in sorted(manager.all_steps(), reverse=True):
    error = None
    try:
      with _quiet_absl():  # orbax logs its own error for a bad file; ours is the one line
        _check_shapes(manager.item_metadata(step), target, step)
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    except ConfigError:
      raise
    except Exception as e:  # truncated or corrupted files: any reader may fail
      error = e
    if not any_process(error is not None):
      return restored, step
    reason = (
      f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
      if error
      else "unreadable on another process"
    )
    aside = _unused_name(run.checkpoints / f"{step}.unreadable")
    log(
      f"warning: the checkpoint of step {step} is unreadable ({reason}); setting it aside "
      f"as {aside.name} and trying an older one"
    )
    barrier(f"unreadable_{step}")
    if primary:
      (run.checkpoints / str(step)).rename(aside)
    barrier(f"set_aside_{step}")
    manager.reload()
  raise ConfigError(f"--resume: no readable checkpoint in {run.checkpoints}")


def _check_shapes(metadata, target, step: int) -> None:
  """ConfigError if the checkpoint's arrays do not have the shapes this run's model needs
  (e.g. resumed with other model options), or lack one it needs (saved by another version
  of the model)."""
  names = lambda path: tuple(re.findall(r"\w+", jax.tree_util.keystr(path)))
  saved = {
    names(p): tuple(x.shape)
    for p, x in jax.tree_util.tree_leaves_with_path(metadata)
    if hasattr(x, "shape")
  }
  for path, x in jax.tree_util.tree_leaves_with_path(target):
    name = names(path)
    if saved and name not in saved:
      raise ConfigError(
        f"--resume: the checkpoint of step {step} holds no {'.'.join(name)}, which this "
        "run's model needs: it was saved by another version of the model or other options"
      )
    if name in saved and saved[name] != tuple(x.shape):
      raise ConfigError(
        f"--resume: the checkpoint of step {step} holds {'.'.join(name)} of shape "
        f"{saved[name]}, this run's model needs {tuple(x.shape)}: resume with "
        "the run's own model options"
      )


def _unused_name(path: Path) -> Path:
  candidate, n = path, 1
  while candidate.exists():
    n += 1
    candidate = path.with_name(f"{path.name}-{n}")
  return candidate


@contextlib.contextmanager
def _quiet_absl():
  from absl import logging as absl_logging

  before = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.FATAL)
  try:
    yield
  finally:
    absl_logging.set_verbosity(before)


def save(manager, step: int, state, force: bool = False) -> None:
  """Saves asynchronously; an error of this save or of an earlier one in flight, on any
  process, becomes a CheckpointError on every process (orbax writes to a temporary
  directory first, so the checkpoints already finished stay intact)."""
  error = None
  try:
    manager.check_for_errors()
    manager.save(step, args=ocp.args.StandardSave(state), force=force)
  except Exception as e:
    error = e
  _raise_if_any(manager, step, error)


def finish_saving(manager) -> None:
  error = None
  try:
    manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as e:
    error = e
  _raise_if_any(manager, None, error)


def _raise_if_any(manager, step: Optional[int], error: Optional[Exception]) -> None:
  if any_process(error is not None):
    raise CheckpointError(
      _save_failure(manager, step, error or RuntimeError("another process could not save"))
    )


def _save_failure(manager, step: Optional[int], error: Exception) -> str:
  intact = [s for s in manager.all_steps() if step is None or s != step]
  what = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
  reason = str(error).splitlines()[0][:200] if str(error) else ""
  return (
    f"could not save {what} in {manager.directory}: {type(error).__name__}: {reason}; "
    f"checkpoints intact: {intact or 'none'}"
  )
