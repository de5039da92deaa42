"""The training loop: run directory, checkpoints, metrics, evaluation, signals, progress."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from tgn_jax.nn.model import capacity_ladder, count_params
from tgn_jax.training import steps as train_steps
from tgn_jax.training.config import ConfigError, TrainConfig
from tgn_jax.training.tasks import Task, make_task

# Options that may differ when a run is resumed; anything else would change the run itself.
RESUMABLE_CHANGES = frozenset({"steps", "resume", "out", "log_every", "eval_every",
                               "checkpoint_every", "keep_checkpoints", "progress", "plots",
                               "on_nonfinite", "max_nonfinite"})


class NonFiniteError(RuntimeError):
  """Training stopped on non-finite losses or gradients."""


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


def prepare(config: TrainConfig) -> tuple[RunDir, Task]:
  """Validates the run directory and builds the task before anything is written."""
  run = RunDir(config.out)
  if config.resume:
    if not run.config.exists() or not _latest_step(run.checkpoints):
      raise ConfigError(f"--resume: no checkpoint to resume in {run.path}")
  elif run.holds_run():
    raise ConfigError(f"--out {run.path} already holds a run; pass --resume to continue it "
                      "or choose another --out")
  run.check_writable()
  task = make_task(config)  # raises DataError on bad data
  return run, task


def check_resume_changes(stored: dict[str, Any], explicit: dict[str, Any]) -> None:
  for name, value in explicit.items():
    if name not in RESUMABLE_CHANGES and name in stored and stored[name] != value:
      raise ConfigError(f"--{name} cannot change on --resume (the run has {stored[name]!r})")


def train(config: TrainConfig, run: RunDir, task: Task) -> dict[str, Any]:
  """Trains to config.steps (or until SIGINT/SIGTERM); returns the summary dict."""
  model_config = config.model_config(task.vocab_size, task.seq_len)
  optimizer = train_steps.make_optimizer(config)
  controls = train_steps.make_controls(config)
  model_def, state = train_steps.init_state(model_config, config, optimizer)
  n_params = count_params(state.params)
  run.path.mkdir(parents=True, exist_ok=True)
  manager = ocp.CheckpointManager(
      run.checkpoints.resolve(),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))
  start = 0
  if config.resume:
    start = manager.latest_step()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
    run.truncate_metrics(start)
  else:
    run.write_json(run.config, config.to_dict())

  hard_step = train_steps.make_train_step(model_def, model_config, optimizer)
  hard_eval = train_steps.make_eval_step(model_def, model_config)
  soft_steps = config.soft_warmup_steps
  if soft_steps:  # same parameters, soft-gate forward: both channels learn everywhere
    soft_config = model_config.replace(gate="soft", attention_execution=None, kv="all")
    soft_def = train_steps.model_def_for(soft_config)
    soft_step = train_steps.make_train_step(soft_def, soft_config, optimizer)
    soft_eval = train_steps.make_eval_step(soft_def, soft_config)
  gate_mode = model_config.gate if model_config.mixer == "tgn" else "none"
  phase = lambda step: "soft" if step < soft_steps else gate_mode
  ladder = capacity_ladder(model_config, task.seq_len,
                           recent=np.asarray(state.routing_needs).tolist())
  routed = train_steps.routes(model_config)
  retries = 0
  prefetched: dict[int, Any] = {}  # the next batch, built while a routed step runs
  stop = _SignalFlag()
  log = lambda msg: tqdm.write(msg, file=sys.stderr)
  log(f"{task.description} | {model_config.mixer} mixer, gate {model_config.gate}, "
      f"{n_params:,} params | {jax.devices()[0].device_kind} | run dir {run.path}")

  interactive = sys.stderr.isatty()
  bar = tqdm(total=config.steps, initial=start, disable=not config.progress, unit="step",
             dynamic_ncols=True, file=sys.stderr, mininterval=0.5 if interactive else 30.0)
  tokens_per_step = int(np.prod(task.train_batch(0).inputs.shape))
  sums, count = None, 0
  last_eval: dict[str, Any] = {}
  record: dict[str, Any] = {}
  last_saved = start if config.resume else -1
  wall_start = time.perf_counter()
  interval_start, interval_steps = None, 0
  train_seconds, compile_seconds = 0.0, None
  step = start
  try:
    while step < config.steps and not stop.signum:
      batch = prefetched.pop(step) if step in prefetched else task.train_batch(step)
      if phase(step) == "soft":
        state, metrics = soft_step(state, controls(step), *batch, 1.0)
      else:
        prefetch = lambda step=step: prefetched.update(
            {step + 1: task.train_batch(step + 1)} if step + 1 < config.steps else {})
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
        run.append_metrics(record)
        bar.set_postfix(_postfix(record, last_eval, task), refresh=False)
      if step % config.eval_every == 0 or step == config.steps:
        last_eval = evaluate(soft_eval if phase(step - 1) == "soft" else hard_eval,
                             state.params, task, step)
        last_eval["elapsed"] = time.perf_counter() - wall_start
        run.append_metrics(last_eval)
        bar.set_postfix(_postfix(record, last_eval, task), refresh=False)
        interval_start = time.perf_counter()
      if step % config.checkpoint_every == 0 or step == config.steps:
        state = state._replace(routing_needs=train_steps.routing_needs(ladder.recent))
        manager.save(step, args=ocp.args.StandardSave(state))
        last_saved = step
  finally:
    bar.close()
    if step != last_saved and (stop.signum or step == config.steps):
      state = state._replace(routing_needs=train_steps.routing_needs(ladder.recent))
      manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
    manager.close()
    stop.restore()

  if stop.signum and last_eval.get("step") != step:
    last_eval = evaluate(soft_eval if phase(step - 1) == "soft" else hard_eval,
                         state.params, task, step)
    run.append_metrics(last_eval)
  summary = _summary(config, model_config, task, run, step, n_params, last_eval, state,
                     time.perf_counter() - wall_start, train_seconds, compile_seconds,
                     interrupted=stop.signum)
  run.write_json(run.summary, summary)
  if config.plots:
    _plot(run, log)
  return summary


def evaluate(eval_fn, params, task: Task, step: int) -> dict[str, Any]:
  """Aggregates sums over the task's fixed eval sets into one 'eval' record."""
  record: dict[str, Any] = {"kind": "eval", "step": step}
  for name, batches in task.eval_sets.items():
    total = None
    for batch in batches:
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


def _latest_step(checkpoints: Path) -> Optional[int]:
  if not checkpoints.is_dir():
    return None
  steps = [int(p.name) for p in checkpoints.iterdir()
           if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists()]
  return max(steps) if steps else None


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
