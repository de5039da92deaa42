"""Shared helpers for the benchmark scripts: timing, environment facts, result files."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
  """Device, library versions, date and the exact command, for every result file."""
  import flax
  import optax

  device = jax.devices()[0]
  return {
    "device": getattr(device, "device_kind", str(device)),
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "python": platform.python_version(),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
  }


def time_fn(
  fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 20, min_seconds: float = 0.0
) -> dict[str, float]:
  """Median wall time (ms) of fn() with its outputs blocked on, after warm-up calls.

  The first call (compilation) is timed separately as compile_ms.
  """
  start = time.perf_counter()
  jax.block_until_ready(fn())
  compile_ms = 1e3 * (time.perf_counter() - start)
  for _ in range(warmup - 1):
    jax.block_until_ready(fn())
  samples = []
  begin = time.perf_counter()
  while len(samples) < repeats or time.perf_counter() - begin < min_seconds:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    samples.append(1e3 * (time.perf_counter() - start))
  return {
    "median_ms": statistics.median(samples),
    "min_ms": min(samples),
    "max_ms": max(samples),
    "repeats": len(samples),
    "compile_ms": compile_ms,
  }


def peak_memory_gib() -> float | None:
  """Peak device memory in GiB since process start (None where not reported)."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def int_list(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def float_list(text: str) -> list[float]:
  return [float(x) for x in text.split(",") if x]


def base_parser(description: str) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  parser.add_argument("--tiny", action="store_true", help="CPU-sized smoke run (used by the tests)")
  parser.add_argument(
    "--out", default=None, help="result JSON path (default benchmarks/results/<script>.json)"
  )
  return parser


def add_control_option(parser: argparse.ArgumentParser) -> None:
  """--control: what holds the TGN's open rate (train.py's --thermostat.control)."""
  from tgn_jax.training.config import ThermostatConfig

  parser.add_argument(
    "--control",
    choices=("quantile", "lambda"),
    default=ThermostatConfig.control,
    help="TGN: the rate held by the gate threshold (quantile) or by lambda's thermostat",
  )


def control_suffix(control: str) -> str:
  """The run-name suffix of a rate control (runs saved before the choice existed, which
  held the rate by lambda and name none, are never taken for either)."""
  return f"_{control}"


def write_results(name: str, results: dict[str, Any], out: str | None) -> Path:
  from tgn_jax.jsonio import write_json

  path = Path(out) if out else RESULTS_DIR / f"{name}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  write_json(path, results)
  return path


def format_value(value, missing: str = "-") -> str:
  """A table cell: floats to 4 significant digits, None as `missing`."""
  if isinstance(value, float):
    return f"{value:.4g}"
  return missing if value is None else str(value)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
  """The rows' columns, right-aligned, on the terminal."""
  widths = [max([len(c)] + [len(format_value(r.get(c))) for r in rows]) for c in columns]
  print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
  for r in rows:
    print("  ".join(format_value(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
  """The rows as a Markdown table of the columns some row has (for RESULTS.md)."""
  columns = [c for c in columns if any(c in r for r in rows)]
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for r in rows:
    lines.append("| " + " | ".join(format_value(r.get(c), "–") for c in columns) + " |")
  return "\n".join(lines)


def add_ratio(
  rows: list[dict[str, Any]],
  column: str,
  value: str,
  keys: Sequence[str],
  baseline: Callable[[dict[str, Any]], bool],
  where: Callable[[dict[str, Any]], bool] = lambda row: True,
) -> None:
  """Sets row[column] = row[value] / the `baseline` row's value with the same `keys`, on
  the rows `where` selects that have the value and such a baseline row."""
  reference = {tuple(r[k] for k in keys): r[value] for r in rows if baseline(r) and r.get(value)}
  for r in rows:
    key = tuple(r[k] for k in keys)
    if r.get(value) and key in reference and where(r):
      r[column] = r[value] / reference[key]


def error_text(error: Exception) -> str:
  """A row's error: the exception's type and first line, at most 300 characters."""
  text = str(error)
  return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


@contextlib.contextmanager
def figure(path: Path, figsize: tuple[float, float] = (6, 4), dpi: int = 120):
  """A matplotlib Figure, laid out and saved as `path` when the block ends."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=figsize)
  yield fig
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)


def plot_lines(
  ax, lines: dict[str, list[tuple[float, float]]], colors: dict[str, str] | None = None, **settings
) -> None:
  """One marked line per label through its (x, y) points in x order (labels without
  points left out; `colors` keeps a label's colour across panels), then ax.set(**settings)
  and a legend."""
  for label, points in lines.items():
    if points:
      ax.plot(*zip(*sorted(points)), marker="o", label=label, color=(colors or {}).get(label))
  ax.set(**settings)
  ax.legend(fontsize=7)


def loglog_plot(path: Path, lines: dict[str, list[tuple[float, float]]], **settings) -> None:
  """plot_lines on axes log2 in x (lengths) and log10 in y, saved as `path`."""
  with figure(path) as fig:
    ax = fig.add_subplot()
    ax.set_xscale("log", base=2)
    plot_lines(ax, lines, yscale="log", **settings)


def train_run(options: dict[str, Any], out: Path) -> dict[str, Any]:
  """Trains with tgn_jax's own loop (train.py's options, flat or dotted) into `out`; returns
  its summary.

  A finished run already in `out` is reused, an interrupted one resumed from its last
  checkpoint (the run directory's policy: options other than the run section's must
  match) or, stopped before its first, started again, so a long sweep can be stopped and
  started again. A run stopped by a signal (Ctrl-C, SIGTERM) stops the
  sweep: SystemExit, after its checkpoint is saved.
  """
  from tgn_jax.training import rundir
  from tgn_jax.training.config import resolve
  from tgn_jax.training.loop import prepare, train

  summary = finished_run(options, out)
  if summary is not None:
    return summary
  run = rundir.RunDir(out)
  quiet = {"run.out": str(out), "run.progress": False, "run.plots": False}
  resume = run.config.exists() and bool(rundir.checkpoint_steps(run.checkpoints))
  if run.holds_run() and not resume:  # stopped before its first checkpoint: nothing to keep
    print(f"{out}: stopped before its first checkpoint; starting it again", flush=True)
    shutil.rmtree(out)
  config = resolve(
    {**options, **quiet, "run.resume": resume}, base=run.stored_config() if resume else None
  )
  summary = train(config, *prepare(config))
  if summary["interrupted_by"]:
    raise SystemExit(
      f"{out}: interrupted by signal {summary['interrupted_by']} at step "
      f"{summary['steps_completed']}; the same command resumes the sweep"
    )
  return summary


def finished_run(options: dict[str, Any], out: Path) -> dict[str, Any] | None:
  """The summary of the finished run in `out`, None where there is none yet (or it ran to
  another number of steps: resuming it goes on to the steps asked for); ConfigError if
  `out` holds a run with other options, or one these options would no longer train (a
  default changed since)."""
  from tgn_jax.training import rundir
  from tgn_jax.training.config import ConfigError

  run = rundir.RunDir(out)
  if not run.config.exists():
    return None
  stored = run.stored_config()
  try:
    rundir.check_resume_changes(stored, options)
  except ConfigError as e:
    raise ConfigError(f"{out} holds a run with other options: {e}") from None
  summary = run.read_summary() if run.finished() else None
  changed = _default_changed(stored, summary, options)
  if changed:
    raise ConfigError(
      f"{out} was trained with {changed}: a default changed since; move the directory away "
      "to train the run again"
    )
  steps = options.get("steps", options.get("run.steps"))
  if summary is not None and steps is not None and summary["steps_requested"] != steps:
    return None
  return summary


def _default_changed(stored: dict[str, Any], summary: dict[str, Any] | None, options) -> str:
  """'path = old (now new)' for the first setting, outside the run section, in which the
  stored run differs from what `options` train today (with the model's resolved fields from
  the summary, where the run finished); '' where none does."""
  import dataclasses

  from tgn_jax.training.config import flatten, resolve

  now = resolve(options)
  pairs = [(flatten(stored), flatten(now.to_dict()))]
  if summary is not None and "model_config" in summary:
    trained = summary["model_config"]
    model = dataclasses.asdict(now.model_config(trained["vocab_size"], trained["max_seq_len"]))
    pairs.append(tuple({f"model.{k}": v for k, v in c.items()} for c in (trained, model)))
  for old, new in pairs:
    for path, value in new.items():
      if path.startswith("run.") or path not in old:
        continue
      if json.loads(json.dumps(old[path])) != json.loads(json.dumps(value)):
        return f"{path} = {old[path]!r} (now {value!r})"
  return ""


def read_records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
  """The train or eval records of a run's metrics.jsonl."""
  from tgn_jax.training.rundir import RunDir

  return RunDir(run_dir).records(kind)


def runs_dir(name: str, args) -> Path:
  """Where a quality benchmark's training runs go: --runs_dir, else
  results/NAME_runs (NAME_runs_tiny for --tiny)."""
  return Path(args.runs_dir or RESULTS_DIR / (f"{name}_runs" + ("_tiny" if args.tiny else "")))


def save_partial(name: str, args, rows: list[dict[str, Any]]) -> None:
  """Writes the rows measured so far (marked partial), so that a run stopped by its time
  limit keeps them; `finish` overwrites the file with the complete results."""
  results = {"benchmark": name, "env": environment(), "partial": True, "rows": rows}
  write_results(name + ("_tiny" if args.tiny else ""), results, args.out)


def finish(
  name: str,
  args,
  results: dict[str, Any],
  plot: Callable[[Path], None] | None = None,
  config: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Adds the environment and the config (default: the script's options) to `results`,
  writes the JSON (and the plot beside it, given a function of the PNG path) and returns
  the results."""
  if config is None:
    config = {k: v for k, v in vars(args).items() if k not in ("out", "runs_dir")}
  results = {"benchmark": name, "env": environment(), "config": config, **results}
  path = write_results(name + ("_tiny" if args.tiny else ""), results, args.out)
  if plot is not None:
    plot(path.with_suffix(".png"))
  print(f"wrote {path}")
  return results
