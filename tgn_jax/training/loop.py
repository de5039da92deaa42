"""The training loop: phases, steps, metrics, evaluation, timing, signals, progress.

The run directory and its checkpoints are tgn_jax.training.rundir's.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from tgn_jax import functional, jsonio
from tgn_jax.config import TGNConfig
from tgn_jax.nn.model import capacity_ladder, count_params
from tgn_jax.training import rundir, sharding
from tgn_jax.training import steps as train_steps
from tgn_jax.training.config import TrainConfig
from tgn_jax.training.rundir import CheckpointError, RunDir
from tgn_jax.training.tasks import Task, make_task

__all__ = ["CheckpointError", "NonFiniteError", "RunDir", "evaluate", "prepare", "train"]


class NonFiniteError(RuntimeError):
  """Training stopped on non-finite losses or gradients."""


def prepare(config: TrainConfig) -> tuple[RunDir, Task, Mesh]:
  """Validates the run directory, the mesh and the task before anything is written.

  Call after the processes of a multi-host run have joined
  (sharding.initialize_distributed): the mesh spans every process's devices.
  """
  run = RunDir(config.run.out)
  rundir.check_new_or_resumable(run, config.run.resume)
  mesh = sharding.MeshSpec.parse(config.run.mesh).build()
  task = make_task(config, batch_multiple=mesh.shape["data"] * mesh.shape["fsdp"])
  sharding.process_rows(mesh, task.batch_size)  # raises if the batch does not split
  return run, task, mesh


@dataclasses.dataclass(frozen=True)
class _Phases:
  """The compiled steps of a run: the model's own, and for a hard gate a first phase
  trained with the soft gate (same parameters, dense attention) so that both channels
  learn before the gate hardens."""

  soft_steps: int
  gate_mode: str
  step_fns: dict[str, Callable]
  eval_fns: dict[str, Callable]

  def name(self, step: int) -> str:
    return "soft" if step < self.soft_steps else self.gate_mode


def _build_phases(
  config: TrainConfig, model_config: TGNConfig, model_def, optimizer, mesh, shardings
) -> _Phases:
  gate_mode = model_config.gate if model_config.mixer == "tgn" else "none"
  reference = train_steps.reference_gate_fn(
    model_config, config.ablation.reference_gate, config.ablation.reference_rates
  )
  quantile = config.thermostat.quantile_scope if config.thermostat.control == "quantile" else None
  step_fns = {
    gate_mode: train_steps.make_train_step(
      model_def, model_config, optimizer, mesh, shardings, reference, quantile=quantile
    )
  }
  eval_fns = {
    gate_mode: train_steps.make_eval_step(
      model_def, model_config, mesh, shardings.params, reference
    )
  }
  soft_steps = config.soft_warmup_steps
  if soft_steps:
    soft_config = model_config.replace(gate="soft", attention_execution=None, kv="all")
    soft_def = functional.model_def(soft_config)
    step_fns["soft"] = train_steps.make_train_step(
      soft_def, soft_config, optimizer, mesh, shardings, quantile=quantile
    )
    eval_fns["soft"] = train_steps.make_eval_step(soft_def, soft_config, mesh, shardings.params)
  return _Phases(soft_steps, gate_mode, step_fns, eval_fns)


class _Timing:
  """Wall-clock bookkeeping: compilation (start to the end of the first step), training
  seconds between records (evaluation excluded) and tokens/s over each interval."""

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self.start = time.perf_counter()
    self.compile_seconds: Optional[float] = None
    self.train_seconds = 0.0
    self._interval_start = None
    self._interval_steps = 0

  def stepped(self, state) -> None:
    if self.compile_seconds is None:
      jax.block_until_ready(state)
      self.compile_seconds = time.perf_counter() - self.start
      self._interval_start, self._interval_steps = time.perf_counter(), 0
    else:
      self._interval_steps += 1

  def interval_rate(self) -> Optional[float]:
    """Tokens/s since the last call (None if no step was timed); starts a new interval."""
    now = time.perf_counter()
    rate = None
    if self._interval_steps:
      self.train_seconds += now - self._interval_start
      rate = self._interval_steps * self.tokens_per_step / (now - self._interval_start)
    self._interval_start, self._interval_steps = now, 0
    return rate

  def skip_interval(self) -> None:
    """Leaves the time since the last step out (evaluation, checkpointing)."""
    self._interval_start = time.perf_counter()

  @property
  def elapsed(self) -> float:
    return time.perf_counter() - self.start


class _Metrics:
  """Sums the step metrics on the device between records (no host sync per step)."""

  def __init__(self):
    self.sums, self.count, self.last = None, 0, None

  def add(self, metrics) -> None:
    self.sums = metrics if self.sums is None else train_steps.accumulate(self.sums, metrics)
    self.count += 1
    self.last = metrics

  def record(self, step: int) -> dict[str, Any]:
    """The 'train' record of the steps since the last one (means; lambda and lr at the last)."""
    host, last = jax.device_get((self.sums, self.last))
    count = self.count
    record = {"kind": "train", "step": step}
    for name in ("loss", "ce", "accuracy", "gate_soft", "gate_hard", "compute_rate", "grad_norm"):
      record[name] = float(host[name]) / count
    for name in ("lam", "lr"):
      record[name] = float(last[name])
    if "gate_offset" in last:  # per layer, after the last step
      record["gate_offset"] = np.asarray(last["gate_offset"]).tolist()
    record["nonfinite_steps"] = int(count - host["finite"])
    record["skipped_total"] = int(last["skipped_total"])
    record["skipped_in_a_row"] = int(last["skipped_in_a_row"])
    self.sums, self.count = None, 0
    return record


def train(
  config: TrainConfig, run: RunDir, task: Task, mesh: Optional[Mesh] = None
) -> dict[str, Any]:
  """Trains to config.run.steps (or until SIGINT/SIGTERM); returns the summary dict.

  mesh: from prepare (default: every device on the data axis). Every process of a
  multi-host run calls this; process 0 alone writes the logs, summary and plots.
  """
  mesh = mesh if mesh is not None else sharding.MeshSpec().build()
  settings = config.run
  primary = jax.process_index() == 0
  model_config = config.model_config(task.vocab_size, task.seq_len)
  optimizer = train_steps.make_optimizer(config)
  controls = train_steps.make_controls(config)
  model_def, state, shardings = train_steps.init_state(model_config, config, optimizer, mesh)
  n_params = count_params(state.params)
  rows = sharding.process_rows(mesh, task.batch_size)
  batch_at = lambda step: sharding.global_batch(mesh, task.train_batch(step, rows), task.batch_size)
  log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if primary else (lambda msg: None)
  if primary:
    run.path.mkdir(parents=True, exist_ok=True)
  sharding.barrier("run_directory")  # every process opens the checkpoints once the directory exists
  manager = rundir.checkpoint_manager(run, settings.keep_checkpoints)
  start = 0
  if settings.resume:
    state, start = rundir.restore(manager, run, state, shardings, log, primary)
    if primary:
      run.truncate_metrics(start)
  elif primary:
    jsonio.write_json(run.config, config.to_dict())

  phases = _build_phases(config, model_config, model_def, optimizer, mesh, shardings)
  ladder = capacity_ladder(
    model_config, task.seq_len, recent=np.asarray(state.routing_needs).tolist()
  )
  routed = train_steps.routes(model_config)
  retries = 0
  prefetched: dict[int, Any] = {}  # the next batch, built while a routed step runs
  stop = _SignalFlag()
  log(
    f"{task.description} | {model_config.mixer} mixer, gate {model_config.gate}, "
    f"{n_params:,} params | {jax.devices()[0].device_kind} x {mesh.size} "
    f"(mesh data:{mesh.shape['data']},fsdp:{mesh.shape['fsdp']}, {jax.process_count()} "
    f"process(es)) | run dir {run.path}"
  )

  bar = tqdm(
    total=settings.steps,
    initial=start,
    disable=not (settings.progress and primary),
    unit="step",
    dynamic_ncols=True,
    file=sys.stderr,
    mininterval=0.5 if sys.stderr.isatty() else 30.0,
  )
  timing = _Timing(task.batch_size * task.seq_len)
  metrics_sum = _Metrics()
  last_eval: dict[str, Any] = {}
  record: dict[str, Any] = {}
  last_saved = start if settings.resume else -1
  step = start
  stopping = 0  # the signal that stops the run, agreed by every process
  held_since: Optional[int] = None  # first step of the evaluations at >= stop_accuracy
  converged = False
  due = lambda every: step % every == 0 or step == settings.steps

  def run_eval() -> dict[str, Any]:
    last = controls(step - 1)
    result = evaluate(
      phases.eval_fns[phases.name(step - 1)],
      state.params,
      task,
      step,
      mesh,
      gate_temperature=last.gate_temperature,
    )
    result["elapsed"] = timing.elapsed
    if primary:
      run.append_metrics(result)
    return result

  try:
    while step < settings.steps and not stopping and not converged:
      batch = prefetched.pop(step) if step in prefetched else batch_at(step)
      phase = phases.name(step)
      if phase == "soft":
        state, metrics = phases.step_fns["soft"](state, controls(step), *batch, 1.0)
      else:
        prefetch = lambda step=step: prefetched.update(
          {step + 1: batch_at(step + 1)} if step + 1 < settings.steps else {}
        )
        state, metrics, redone = train_steps.routed_step(
          phases.step_fns[phase],
          state,
          controls(step),
          batch,
          ladder,
          routed,
          while_running=prefetch,
        )
        retries += redone
      step += 1
      metrics_sum.add(metrics)
      timing.stepped(state)
      bar.update(1)
      if due(settings.log_every):
        record = metrics_sum.record(step)
        record.update(
          gate_mode=phase,
          capacity=ladder.current if routed and phase != "soft" else 1.0,
          overflow_retries=retries,
          elapsed=timing.elapsed,
        )
        rate = timing.interval_rate()
        if rate is not None:
          record["tokens_per_sec"] = rate
        _check_finite(record, settings, log)
        if primary:
          run.append_metrics(record)
        bar.set_postfix(_postfix(record, last_eval, task), refresh=False)
      if due(settings.eval_every):
        last_eval = run_eval()
        bar.set_postfix(_postfix(record, last_eval, task), refresh=False)
        timing.skip_interval()
        held_since = _accuracy_held_since(held_since, last_eval, settings.stop_accuracy)
        converged = held_since is not None and step - held_since >= settings.stop_patience
      if due(settings.checkpoint_every) or converged:
        state = _with_routing_needs(state, ladder, shardings)
        rundir.save(manager, step, state)
        last_saved = step
      # A signal reaches each process on its own; with several, they stop together at a
      # logging step (one that did not would wait forever in the next step's collectives).
      if jax.process_count() == 1 or step % settings.log_every == 0:
        stopping = sharding.max_over_processes(stop.signum)
  except CheckpointError:
    last_saved = step  # do not try to save again on the way out
    raise
  finally:
    bar.close()
    try:
      if step != last_saved and (stopping or step == settings.steps):
        state = _with_routing_needs(state, ladder, shardings)
        rundir.save(manager, step, state, force=True)
      rundir.finish_saving(manager)
    finally:
      manager.close()
      stop.restore()

  if stopping and last_eval.get("step") != step:
    last_eval = run_eval()
  summary = _summary(
    config,
    model_config,
    task,
    run,
    step=step,
    n_params=n_params,
    last_eval=last_eval,
    lam=float(state.lam),
    timing=timing,
    interrupted=stopping,
    converged=converged,
  )
  summary["mesh"] = {
    "data": mesh.shape["data"],
    "fsdp": mesh.shape["fsdp"],
    "devices": mesh.size,
    "processes": jax.process_count(),
    "params_per_device": _params_per_device(state.params),
  }
  if primary:
    jsonio.write_json(run.summary, summary)
    if settings.plots:
      _plot(run, log)
  return summary


def _params_per_device(params) -> int:
  """Trained parameters held by this process's first device (all of them when nothing is
  sharded)."""
  device = jax.local_devices()[0]
  return int(
    sum(
      np.prod(shard.data.shape)
      for leaf in jax.tree.leaves(params.filter(nnx.Param))
      for shard in leaf.addressable_shards
      if shard.device == device
    )
  )


def _with_routing_needs(state, ladder, shardings):
  """The state with the ladder's memory in it (saved with the checkpoint)."""
  needs = train_steps.routing_needs(ladder.recent)
  return state._replace(routing_needs=jax.device_put(needs, shardings.routing_needs))


def evaluate(
  eval_fn, params, task: Task, step: int, mesh: Optional[Mesh] = None, gate_temperature: float = 1.0
) -> dict[str, Any]:
  """Aggregates sums over the task's fixed eval sets into one 'eval' record (on a mesh,
  each process contributes its rows of every batch); the soft gate at gate_temperature."""
  record: dict[str, Any] = {"kind": "eval", "step": step}
  for name, batches in task.eval_sets.items():
    total = None
    for batch in batches:
      if mesh is not None:
        size = len(batch.inputs)
        rows = sharding.process_rows(mesh, size)
        batch = sharding.global_batch(mesh, [x[rows.start : rows.stop] for x in batch], size)
      sums = eval_fn(params, *batch, np.float32(gate_temperature))
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
    # The oracle opens at the scored positions of the last layer only.
    record["oracle_open_rate"] = float(total["count"] / total["tokens"] / len(total["open"]))
    if unscored > 0:
      record["open_rate_unscored"] = (total["open_unscored"] / unscored).tolist()
    if "stats_count" in total:
      with np.errstate(invalid="ignore", divide="ignore"):
        for stat in ("specific_heat", "entropy", "free_energy", "internal_energy"):
          record[stat] = (total[stat] / total["stats_count"]).tolist()
        heads = total["specific_heat_heads"] / total["stats_count_heads"]
        record["specific_heat_per_head"] = heads.tolist()  # [L][N]
  return record


def _check_finite(record, settings, log) -> None:
  if record["nonfinite_steps"] == 0 and record["skipped_in_a_row"] == 0:
    return
  message = (
    f"non-finite loss or gradients in {record['nonfinite_steps']} of the steps up to "
    f"{record['step']} (updates skipped: {record['skipped_total']} in all)"
  )
  if settings.on_nonfinite == "stop":
    raise NonFiniteError(
      message + "; stopping (--on_nonfinite=stop); parameters were not updated with them"
    )
  if record["skipped_in_a_row"] >= settings.max_nonfinite:
    raise NonFiniteError(
      message + f"; {record['skipped_in_a_row']} in a row reached "
      f"--max_nonfinite={settings.max_nonfinite}, stopping"
    )
  log("warning: " + message)


def _postfix(record, last_eval, task: Task) -> dict[str, str]:
  post = {}
  if record:
    post = {
      "loss": f"{record['loss']:.3f}",
      "open": f"{record['gate_hard']:.3f}",
      "lam": f"{record['lam']:.3g}",
    }
  key = "eval_bpb" if task.metric == "bpb" else "eval_accuracy"
  if key in last_eval:
    post[key.replace("eval_", "eval ")] = f"{last_eval[key]:.3f}"
  return post


def _accuracy_held_since(
  held_since: Optional[int], result: dict[str, Any], threshold: Optional[float]
) -> Optional[int]:
  """The first step of the current unbroken run of evaluations at or above threshold
  (None: the last evaluation fell below it, or no threshold)."""
  accuracy = result.get("eval_accuracy")
  if threshold is None or accuracy is None or not accuracy >= threshold:
    return None
  return result["step"] if held_since is None else held_since


def _summary(
  config: TrainConfig,
  model_config: TGNConfig,
  task: Task,
  run: RunDir,
  *,
  step: int,
  n_params: int,
  last_eval: dict[str, Any],
  lam: float,
  timing: _Timing,
  interrupted: int,
  converged: bool,
) -> dict[str, Any]:
  train_records = run.records("train")
  last_train = train_records[-1] if train_records else {}
  rates = [r["tokens_per_sec"] for r in train_records if r.get("tokens_per_sec")]
  return {
    "task": task.name,
    "description": task.description,
    "steps_completed": step,
    "steps_requested": config.run.steps,
    "interrupted_by": int(interrupted),
    "stopped_at_accuracy": converged,
    "run_dir": str(run.path),
    "final": {k: v for k, v in last_eval.items() if k != "kind"},
    "train_loss": last_train.get("loss"),
    "train_ce": last_train.get("ce"),
    "open_rate": last_train.get("gate_hard"),
    "gate_soft": last_train.get("gate_soft"),
    "lam": lam,
    "gate_offset": last_train.get("gate_offset"),
    "params": n_params,
    "wall_seconds": timing.elapsed,
    "compile_seconds": timing.compile_seconds,
    "train_seconds": timing.train_seconds,
    "tokens_per_sec": float(np.median(rates)) if rates else None,
    "config": config.to_dict(),
    "model_config": model_config.to_dict(),
    "env": {
      "device": jax.devices()[0].device_kind,
      "backend": jax.default_backend(),
      "jax": jax.__version__,
    },
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
    tqdm.write(
      f"received {signal.Signals(signum).name}: saving a checkpoint and stopping (again to abort)",
      file=sys.stderr,
    )

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
