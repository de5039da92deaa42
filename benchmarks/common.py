"""Shared helpers for the benchmark scripts: timing, environment facts, result files."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

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


def time_fn(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 20,
            min_seconds: float = 0.0) -> dict[str, float]:
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
  return {"median_ms": statistics.median(samples), "min_ms": min(samples),
          "max_ms": max(samples), "repeats": len(samples), "compile_ms": compile_ms}


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
  parser = argparse.ArgumentParser(description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--tiny", action="store_true",
                      help="CPU-sized smoke run (used by the tests)")
  parser.add_argument("--out", default=None,
                      help="result JSON path (default benchmarks/results/<script>.json)")
  return parser


def write_results(name: str, results: dict[str, Any], out: str | None) -> Path:
  from tgn_jax.training.rundir import write_json
  path = Path(out) if out else RESULTS_DIR / f"{name}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  write_json(path, results)
  return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
  widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
  print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
  for r in rows:
    print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return "-" if value is None else str(value)


def train_run(options: dict[str, Any], out: Path) -> dict[str, Any]:
  """Trains with tgn_jax's own loop (train.py's options, flat or dotted) into `out`; returns
  its summary.

  A finished run already in `out` is reused, an interrupted one resumed (the run
  directory's policy: options other than the run section's must match), so a long sweep
  can be stopped and started again.
  """
  from tgn_jax.training import rundir
  from tgn_jax.training.config import ConfigError, resolve
  from tgn_jax.training.loop import prepare, train
  run = rundir.RunDir(out)
  quiet = {"run.out": str(out), "run.progress": False, "run.plots": False}
  if run.config.exists():
    try:
      rundir.check_resume_changes(run.stored_config(), options)
    except ConfigError as e:
      raise ConfigError(f"{out} holds a run with other options: {e}") from None
    if run.finished():
      return run.read_summary()
  resume = run.config.exists() and bool(rundir.checkpoint_steps(run.checkpoints))
  config = resolve({**options, **quiet, "run.resume": resume},
                   base=run.stored_config() if resume else None)
  return train(config, *prepare(config))


def read_records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
  """The train or eval records of a run's metrics.jsonl."""
  from tgn_jax.training.rundir import RunDir
  return RunDir(run_dir).records(kind)


def save_partial(name: str, args, rows: list[dict[str, Any]]) -> None:
  """Writes the rows measured so far (marked partial), so that a run stopped by its time
  limit keeps them; `finish` overwrites the file with the complete results."""
  results = {"benchmark": name, "env": environment(), "partial": True, "rows": rows}
  write_results(name + ("_tiny" if args.tiny else ""), results, args.out)


def finish(name: str, args, results: dict[str, Any],
           plot: Callable[[Path], None] | None = None,
           config: dict[str, Any] | None = None) -> dict[str, Any]:
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
