"""The training loop: run directory, checkpoints, metrics, evaluation, signals, progress."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from jax.sharding import Mesh

from tgn_jax.nn.model import capacity_ladder, count_params
from tgn_jax.training import sharding
from tgn_jax.training import steps as train_steps
from tgn_jax.training.config import ConfigError, TrainConfig
from tgn_jax.training.tasks import Task, make_task

# Options that may differ when a run is resumed; anything else would change the run itself.
RESUMABLE_CHANGES = frozenset({"steps", "resume", "out", "log_every", "eval_every",
                               "checkpoint_every", "keep_checkpoints", "progress", "plots",
                               "on_nonfinite", "max_nonfinite", "mesh", "coordinator",
                               "num_processes", "process_id"})


class NonFiniteError(RuntimeError):
  """Training stopped on non-finite losses or gradients."""


class CheckpointError(RuntimeError):
  """A checkpoint could not be saved; the message says which and what is intact."""


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
      return json.loads(self.config.read_text())
    except (OSError, json.JSONDecodeError) as e:
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

  def write_json(self, path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=1) + "\n")
    os.replace(tmp, path)

  def append_metrics(self, record: dict[str, Any]) -> None:
    with open(self.metrics, "a") as f:
      f.write(json.dumps(_jsonable(record)) + "\n")

  def truncate_metrics(self, last_step: int) -> None:
    """Drops records after `last_step` (written after the checkpoint a resume starts from)."""
    if not self.metrics.exists():
      return
    kept = []
    for line in self.metrics.read_text().splitlines():
      try:
        if json.loads(line).get("step", 0) <= last_step:
          kept.append(line)
      except json.JSONDecodeError:
        continue
    tmp = self.metrics.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, self.metrics)


def prepare(config: TrainConfig) -> tuple[RunDir, Task, Mesh]:
  """Validates the run directory, the mesh and the task before anything is written.

  Call after the processes of a multi-host run have joined
  (sharding.initialize_distributed): the mesh spans every process's devices.
  """
  run = RunDir(config.out)
  if config.resume:
    if not run.config.exists() or not checkpoint_steps(run.checkpoints):
      raise ConfigError(f"--resume: no checkpoint to resume in {run.path}")
  elif run.holds_run():
    raise ConfigError(f"--out {run.path} already holds a run; pass --resume to continue it "
                      "or choose another --out")
  run.check_writable()
  mesh = sharding.MeshSpec.parse(config.mesh).build()
  task = make_task(config, batch_multiple=mesh.shape["data"] * mesh.shape["fsdp"])
  sharding.process_rows(mesh, task.batch_size)  # raises if the batch does not split
  return run, task, mesh


def checkpoint_steps(directory: Path) -> list[int]:
  """The steps orbax lists in a checkpoint directory (none if it does not exist)."""
  if not directory.is_dir():
    return []
  manager = ocp.CheckpointManager(directory.resolve(),
                                  options=ocp.CheckpointManagerOptions(create=False))
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def check_resume_changes(stored: dict[str, Any], explicit: dict[str, Any]) -> None:
  for name, value in explicit.items():
    if name not in RESUMABLE_CHANGES and name in stored and stored[name] != value:
      raise ConfigError(f"--{name} cannot change on --resume (the run has {stored[name]!r})")


def train(config: TrainConfig, run: RunDir, task: Task, mesh: Optional[Mesh] = None
          ) -> dict[str, Any]:
  """Trains to config.steps (or until SIGINT/SIGTERM); returns the summary dict.

  mesh: from prepare (default: every device on the data axis). Every process of a
  multi-host run calls this; process 0 alone writes the logs, summary and plots.
  """
  mesh = mesh if mesh is not None else sharding.MeshSpec().build()
  primary = jax.process_index() == 0
  model_config = config.model_config(task.vocab_size, task.seq_len)
  optimizer = train_steps.make_optimizer(config)
  controls = train_steps.make_controls(config)
  model_def, state, shardings = train_steps.init_state(model_config, config, optimizer, mesh)
  n_params = count_params(state.params)
  rows = sharding.process_rows(mesh, task.batch_size)
  batch_at = lambda step: sharding.global_batch(mesh, task.train_batch(step, rows),
                                                task.batch_size)
  log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if primary else (lambda msg: None)
  if primary:
    run.path.mkdir(parents=True, exist_ok=True)
  _barrier("run_directory")  # every process opens the checkpoints once process 0 made the directory
  manager = ocp.CheckpointManager(
      run.checkpoints.resolve(), item_handlers=ocp.StandardCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))
  start = 0
  if config.resume:
    state, start = _restore(manager, run, state, shardings, log, primary)
    if primary:
      run.truncate_metrics(start)
  elif primary:
    run.write_json(run.config, config.to_dict())

  hard_step = train_steps.make_train_step(model_def, model_config, optimizer, mesh, shardings)
  hard_eval = train_steps.make_eval_step(model_def, model_config, mesh, shardings.params)
  soft_steps = config.soft_warmup_steps
  if soft_steps:  # same parameters, soft-gate forward: both channels learn everywhere
    soft_config = model_config.replace(gate="soft", attention_execution=None, kv="all")
    soft_def = train_steps.model_def_for(soft_config)
    soft_step = train_steps.make_train_step(soft_def, soft_config, optimizer, mesh, shardings)
    soft_eval = train_steps.make_eval_step(soft_def, soft_config, mesh, shardings.params)
  gate_mode = model_config.gate if model_config.mixer == "tgn" else "none"
  phase = lambda step: "soft" if step < soft_steps else gate_mode
  ladder = capacity_ladder(model_config, task.seq_len,
                           recent=np.asarray(state.routing_needs).tolist())
  routed = train_steps.routes(model_config)
  retries = 0
  prefetched: dict[int, Any] = {}  # the next batch, built while a routed step runs
  stop = _SignalFlag()
  log(f"{task.description} | {model_config.mixer} mixer, gate {model_config.gate}, "
      f"{n_params:,} params | {jax.devices()[0].device_kind} x {mesh.size} "
      f"(mesh data:{mesh.shape['data']},fsdp:{mesh.shape['fsdp']}, {jax.process_count()} "
      f"process(es)) | run dir {run.path}")

  interactive = sys.stderr.isatty()
  bar = tqdm(total=config.steps, initial=start, disable=not (config.progress and primary),
             unit="step", dynamic_ncols=True, file=sys.stderr,
             mininterval=0.5 if interactive else 30.0)
  tokens_per_step = task.batch_size * task.seq_len
  sums, count = None, 0
  last_eval: dict[str, Any] = {}
  record: dict[str, Any] = {}
  last_saved = start if config.resume else -1
  wall_start = time.perf_counter()
  interval_start, interval_steps = None, 0
  train_seconds, compile_seconds = 0.0, None
  step = start
  stopping = 0  # the signal that stops the run, agreed by every process
  try:
    while step < config.steps and not stopping:
      batch = prefetched.pop(step) if step in prefetched else batch_at(step)
      if phase(step) == "soft":
        state, metrics = soft_step(state, controls(step), *batch, 1.0)
      else:
        prefetch = lambda step=step: prefetched.update(
            {step + 1: batch_at(step + 1)} if step + 1 < config.steps else {})
        state, metrics, redone = train_steps.routed_step(
            hard_step, state, controls(step), batch, ladder, routed, while_running=prefetch)
        retries += redone
      step += 1
      sums = metrics if sums is None else train_steps.accumulate(sums, metrics)
      count += 1
      if compile_seconds is None:
        jax.block_until_ready(state)
        compile_seconds = time.perf_counter() - wall_start
        interval_start, interval_steps = time.perf_counter(), 0
      else:
        interval_steps += 1
      bar.update(1)
      if step % config.log_every == 0 or step == config.steps:
        record, sums, count = _train_record(step, sums, count, metrics)
        record["gate_mode"] = phase(step - 1)
        record["capacity"] = ladder.current if routed and phase(step - 1) != "soft" else 1.0
        record["overflow_retries"] = retries
        record["elapsed"] = time.perf_counter() - wall_start
        now = time.perf_counter()
        if interval_steps:
          train_seconds += now - interval_start
          record["tokens_per_sec"] = interval_steps * tokens_per_step / (now - interval_start)
        interval_start, interval_steps = now, 0
        _check_finite(record, config, log)
        if primary:
          run.append_metrics(record)
        bar.set_postfix(_postfix(record, last_eval, task), refresh=False)
      if step % config.eval_every == 0 or step == config.steps:
        last_eval = evaluate(soft_eval if phase(step - 1) == "soft" else hard_eval,
                             state.params, task, step, mesh)
        last_eval["elapsed"] = time.perf_counter() - wall_start
        if primary:
          run.append_metrics(last_eval)
        bar.set_postfix(_postfix(record, last_eval, task), refresh=False)
        interval_start = time.perf_counter()
      if step % config.checkpoint_every == 0 or step == config.steps:
        state = _with_routing_needs(state, ladder, shardings)
        _save(manager, step, state)
        last_saved = step
      # A signal reaches each process on its own; with several, they stop together at a
      # logging step (one that did not would wait forever in the next step's collectives).
      if jax.process_count() == 1 or step % config.log_every == 0:
        stopping = _max_over_processes(stop.signum)
  except CheckpointError:
    last_saved = step  # do not try to save again on the way out
    raise
  finally:
    bar.close()
    try:
      if step != last_saved and (stopping or step == config.steps):
        state = _with_routing_needs(state, ladder, shardings)
        _save(manager, step, state, force=True)
      _finish_saving(manager)
    finally:
      manager.close()
      stop.restore()

  if stopping and last_eval.get("step") != step:
    last_eval = evaluate(soft_eval if phase(step - 1) == "soft" else hard_eval,
                         state.params, task, step, mesh)
    if primary:
      run.append_metrics(last_eval)
  summary = _summary(config, model_config, task, run, step, n_params, last_eval, state,
                     time.perf_counter() - wall_start, train_seconds, compile_seconds,
                     interrupted=stopping)
  summary["mesh"] = {"data": mesh.shape["data"], "fsdp": mesh.shape["fsdp"],
                     "devices": mesh.size, "processes": jax.process_count(),
                     "params_per_device": _params_per_device(state.params)}
  if primary:
    run.write_json(run.summary, summary)
    if config.plots:
      _plot(run, log)
  return summary


def _params_per_device(params) -> int:
  """Parameters held by this process's first device (all of them when nothing is sharded)."""
  device = jax.local_devices()[0]
  return int(sum(np.prod(shard.data.shape) for leaf in jax.tree.leaves(params)
                 for shard in leaf.addressable_shards if shard.device == device))


def _with_routing_needs(state, ladder, shardings):
  """The state with the ladder's memory in it (saved with the checkpoint)."""
  needs = train_steps.routing_needs(ladder.recent)
  return state._replace(routing_needs=jax.device_put(needs, shardings.routing_needs))


def _restore(manager, run: RunDir, state, shardings, log, primary: bool):
  """The newest readable checkpoint, restored onto this run's mesh (whatever mesh it was
  saved from): (state, step).

  A checkpoint of another model (its shapes differ from this run's) is a ConfigError. One
  that cannot be read (truncated or corrupted files) is set aside (renamed
  STEP.unreadable), said in one line, and the next older one is tried; ConfigError if none
  is readable. Every process takes the same decisions.
  """
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
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
    if not _any_process(error is not None):
      return restored, step
    reason = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}" if error else \
        "unreadable on another process"
    aside = _unused_name(run.checkpoints / f"{step}.unreadable")
    log(f"warning: the checkpoint of step {step} is unreadable ({reason}); setting it aside "
        f"as {aside.name} and trying an older one")
    _barrier(f"unreadable_{step}")
    if primary:
      (run.checkpoints / str(step)).rename(aside)
    _barrier(f"set_aside_{step}")
    manager.reload()
  raise ConfigError(f"--resume: no readable checkpoint in {run.checkpoints}")


def _check_shapes(metadata, target, step: int) -> None:
  """ConfigError if the checkpoint's arrays do not have the shapes this run's model needs
  (e.g. resumed with other model options)."""
  names = lambda path: tuple(re.findall(r"\w+", jax.tree_util.keystr(path)))
  saved = {names(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(metadata)
           if hasattr(x, "shape")}
  for path, x in jax.tree_util.tree_leaves_with_path(target):
    name = names(path)
    if name in saved and saved[name] != tuple(x.shape):
      raise ConfigError(f"--resume: the checkpoint of step {step} holds {'.'.join(name)} of shape "
                        f"{saved[name]}, this run's model needs {tuple(x.shape)}: resume with "
                        "the run's own model options")


def _unused_name(path: Path) -> Path:
  candidate, n = path, 1
  while candidate.exists():
    n += 1
    candidate = path.with_name(f"{path.name}-{n}")
  return candidate


def _any_process(flag: bool) -> bool:
  """True if `flag` is true on any process (every process gets the same answer)."""
  return _max_over_processes(int(bool(flag))) > 0


def _max_over_processes(value: int) -> int:
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.int32(value))))


@contextlib.contextmanager
def _quiet_absl():
  from absl import logging as absl_logging
  before = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.FATAL)
  try:
    yield
  finally:
    absl_logging.set_verbosity(before)


def _save(manager, step: int, state, force: bool = False) -> None:
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


def _finish_saving(manager) -> None:
  error = None
  try:
    manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as e:
    error = e
  _raise_if_any(manager, None, error)


def _raise_if_any(manager, step: Optional[int], error: Optional[Exception]) -> None:
  if _any_process(error is not None):
    raise CheckpointError(_save_failure(manager, step, error or RuntimeError(
        "another process could not save")))


def _save_failure(manager, step: Optional[int], error: Exception) -> str:
  intact = [s for s in manager.all_steps() if step is None or s != step]
  what = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
  reason = str(error).splitlines()[0][:200] if str(error) else ""
  return (f"could not save {what} in {manager.directory}: {type(error).__name__}: {reason}; "
          f"checkpoints intact: {intact or 'none'}")


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def evaluate(eval_fn, params, task: Task, step: int, mesh: Optional[Mesh] = None
             ) -> dict[str, Any]:
  """Aggregates sums over the task's fixed eval sets into one 'eval' record (on a mesh,
  each process contributes its rows of every batch)."""
  record: dict[str, Any] = {"kind": "eval", "step": step}
  for name, batches in task.eval_sets.items():
    total = None
    for batch in batches:
      if mesh is not None:
        size = len(batch.inputs)
        rows = sharding.process_rows(mesh, size)
        batch = sharding.global_batch(mesh, [x[rows.start:rows.stop] for x in batch], size)
      sums = eval_fn(params, *batch)
      total = sums if total is None else train_steps.accumulate(total, sums)
    total = {k: np.asarray(v, np.float64) for k, v in jax.device_get(total).items()}
    prefix = "eval" if name == "eval" else name
    ce = float(total["ce"] / max(total["count"], 1))
    record[f"{prefix}_ce"] = ce
    if task.metric == "bpb":
      record[f"{prefix}_bpb"] = ce / math.log(2)
    else:
      record[f"{prefix}_accuracy"] = float(total["correct"] / max(total["count"], 1))
    if name != "eval":
      continue
    unscored = total["tokens"] - total["count"]
    record["eval_gate_hard"] = float(np.mean(total["open"]) / total["tokens"])
    record["open_rate"] = (total["open"] / total["tokens"]).tolist()
    record["open_rate_scored"] = (total["open_scored"] / max(total["count"], 1)).tolist()
    if unscored > 0:
      record["open_rate_unscored"] = (total["open_unscored"] / unscored).tolist()
    if "stats_count" in total:
      with np.errstate(invalid="ignore", divide="ignore"):
        for stat in ("specific_heat", "entropy", "free_energy", "internal_energy"):
          record[stat] = (total[stat] / total["stats_count"]).tolist()
  return record


def _train_record(step, sums, count, last):
  host = jax.device_get(sums)
  last = jax.device_get(last)
  record = {"kind": "train", "step": step}
  for name in ("loss", "ce", "accuracy", "gate_soft", "gate_hard", "compute_rate", "grad_norm"):
    record[name] = float(host[name]) / count
  for name in ("lam", "lr"):
    record[name] = float(last[name])
  record["nonfinite_steps"] = int(count - host["finite"])
  record["skipped_total"] = int(last["skipped_total"])
  record["skipped_in_a_row"] = int(last["skipped_in_a_row"])
  return record, None, 0


def _check_finite(record, config: TrainConfig, log) -> None:
  if record["nonfinite_steps"] == 0 and record["skipped_in_a_row"] == 0:
    return
  message = (f"non-finite loss or gradients in {record['nonfinite_steps']} of the steps up to "
             f"{record['step']} (updates skipped: {record['skipped_total']} in all)")
  if config.on_nonfinite == "stop":
    raise NonFiniteError(message + "; stopping (--on_nonfinite=stop); parameters were not "
                         "updated with them")
  if record["skipped_in_a_row"] >= config.max_nonfinite:
    raise NonFiniteError(message + f"; {record['skipped_in_a_row']} in a row reached "
                         f"--max_nonfinite={config.max_nonfinite}, stopping")
  log("warning: " + message)


def _postfix(record, last_eval, task: Task) -> dict[str, str]:
  post = {}
  if record:
    post = {"loss": f"{record['loss']:.3f}", "open": f"{record['gate_hard']:.3f}",
            "lam": f"{record['lam']:.3g}"}
  key = "eval_bpb" if task.metric == "bpb" else "eval_accuracy"
  if key in last_eval:
    post[key.replace("eval_", "eval ")] = f"{last_eval[key]:.3f}"
  return post


def _summary(config, model_config, task, run, step, n_params, last_eval, state, wall, train_s,
             compile_s, interrupted) -> dict[str, Any]:
  records = []
  if run.metrics.exists():
    for line in run.metrics.read_text().splitlines():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  train_records = [r for r in records if r.get("kind") == "train"]
  last_train = train_records[-1] if train_records else {}
  rates = [r["tokens_per_sec"] for r in train_records if r.get("tokens_per_sec")]
  return {
      "task": task.name, "description": task.description, "steps_completed": step,
      "steps_requested": config.steps, "interrupted_by": int(interrupted),
      "run_dir": str(run.path),
      "final": {k: v for k, v in last_eval.items() if k != "kind"},
      "train_loss": last_train.get("loss"), "train_ce": last_train.get("ce"),
      "open_rate": last_train.get("gate_hard"), "gate_soft": last_train.get("gate_soft"),
      "lam": float(state.lam), "params": n_params,
      "wall_seconds": wall, "compile_seconds": compile_s,
      "tokens_per_sec": float(np.median(rates)) if rates else None,
      "config": config.to_dict(), "model_config": model_config.to_dict(),
      "env": {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "jax": jax.__version__},
  }


def _plot(run: RunDir, log) -> None:
  try:
    from tgn_jax.training.plots import plot_run
    plot_run(run.path)
  except Exception as e:  # plots are a convenience: never lose a finished run over them
    log(f"warning: could not write plots: {e}")


class _SignalFlag:
  """SIGINT/SIGTERM request a clean stop (checkpoint, summary); a second one aborts."""

  def __init__(self):
    self.signum = 0
    self._previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass

  def _handle(self, signum, frame):
    if self.signum:
      self.restore()
      raise KeyboardInterrupt
    self.signum = signum
    tqdm.write(f"received {signal.Signals(signum).name}: saving a checkpoint and stopping "
               "(again to abort)", file=sys.stderr)

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def _jsonable(value):
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.floating, np.integer)):
    return _jsonable(value.item())
  return value
