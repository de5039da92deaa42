"""Command line of train.py: flags generated from TrainConfig, clear one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

from tgn_jax.data import DataError
from tgn_jax.training.config import TASK_PRESETS, ConfigError, TrainConfig, resolve

EXIT_USAGE = 2
EXIT_FAILED = 1


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, no usage dump
    self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _none_or(cast):
  def parse(text: str):
    return None if text.lower() in ("none", "null", "") else cast(text)
  parse.__name__ = getattr(cast, "__name__", "value")
  return parse


def build_parser() -> argparse.ArgumentParser:
  presets = "\n".join(
      f"  {task}: " + (", ".join(f"{k}={v}" for k, v in preset.items()) or "(the defaults)")
      for task, preset in TASK_PRESETS.items())
  parser = _Parser(
      prog="train.py", allow_abbrev=False, argument_default=argparse.SUPPRESS,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Train a Thermodynamic Gated Network (or a baseline) by minimising the free "
                  "energy  loss = cross-entropy + lam * mean gate.",
      epilog="Defaults shown are for --task mqar; each task first applies its preset:\n" + presets
             + "\nPrecedence: defaults < task preset < --config file < flags.")
  parser.add_argument("--config", metavar="FILE", help="JSON object of options (flags override it)")
  hints = typing.get_type_hints(TrainConfig)
  for field in dataclasses.fields(TrainConfig):
    kind = hints[field.name]
    help_text = f"{field.metadata['help']} (default: {field.default})"
    kwargs: dict[str, Any] = {"help": help_text}
    if kind is bool:
      kwargs["action"] = argparse.BooleanOptionalAction
    else:
      inner = [a for a in typing.get_args(kind) if a is not type(None)]
      base = inner[0] if inner else kind
      cast = {int: int, float: float, str: str}[base]
      kwargs["type"] = _none_or(cast) if inner else cast
      kwargs["metavar"] = base.__name__.upper()
      if "choices" in field.metadata:
        kwargs["choices"] = field.metadata["choices"]
        kwargs.pop("metavar")
    parser.add_argument(f"--{field.name}", **kwargs)
  return parser


def default_out(task: str) -> str:
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  path = Path("runs") / f"{task}-{stamp}"
  suffix = 1
  while path.exists():
    suffix += 1
    path = Path("runs") / f"{task}-{stamp}-{suffix}"
  return str(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
  from tgn_jax.training import sharding
  from tgn_jax.training.loop import (CheckpointError, NonFiniteError, RunDir,
                                     check_resume_changes, prepare, train)
  explicit = vars(build_parser().parse_args(argv))
  config_file = explicit.pop("config", None)
  try:
    if explicit.get("resume"):
      if "out" not in explicit:
        raise ConfigError("--resume needs --out: the run directory to continue")
      run_dir = RunDir(explicit["out"])
      if not run_dir.config.exists():
        raise ConfigError(f"--resume: no checkpoint to resume in {run_dir.path}")
      stored = run_dir.stored_config()
      check_resume_changes(stored, {**_file_values(config_file), **explicit})
      config = resolve(explicit, config_file, base=stored)
    else:
      config = resolve(explicit, config_file)
    sharding.initialize_distributed(config.coordinator, config.num_processes, config.process_id)
    if not config.resume and "out" not in explicit and "out" not in _file_values(config_file):
      if jax_process_count() > 1:  # each process would pick its own time-stamped directory
        raise ConfigError("--out is needed with several processes: the run directory they share")
      config = dataclasses.replace(config, out=default_out(config.task))
    run, task, mesh = prepare(config)
  except (ConfigError, DataError) as e:
    print(f"train.py: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  try:
    summary = train(config, run, task, mesh)
  except ConfigError as e:  # found once training set up: e.g. no readable checkpoint
    print(f"train.py: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except (NonFiniteError, CheckpointError) as e:
    print(f"train.py: error: {e}", file=sys.stderr)
    return EXIT_FAILED
  if jax_process_index() == 0:
    print(format_summary(summary))
  return 128 + summary["interrupted_by"] if summary["interrupted_by"] else 0


def jax_process_index() -> int:
  import jax
  return jax.process_index()


def jax_process_count() -> int:
  import jax
  return jax.process_count()


def _file_values(path: Optional[str]) -> dict[str, Any]:
  """The options a --config file sets (none without one; resolve reports a bad file)."""
  import json
  if path is None:
    return {}
  try:
    data = json.loads(Path(path).read_text())
  except (OSError, ValueError):
    return {}
  return data if isinstance(data, dict) else {}


def format_summary(s: dict[str, Any]) -> str:
  final = s["final"]
  parts = [f"{s['task']}: {s['steps_completed']}/{s['steps_requested']} steps"]
  if "eval_accuracy" in final:
    parts.append(f"eval accuracy {final['eval_accuracy']:.4f}")
  if "train_accuracy" in final:
    parts.append(f"train accuracy {final['train_accuracy']:.4f}")
  if "eval_bpb" in final:
    parts.append(f"eval {final['eval_bpb']:.4f} bits/byte")
  if s.get("open_rate") is not None:
    parts.append(f"open-gate rate {s['open_rate']:.3f}")
  parts.append(f"lambda {s['lam']:.4g}")
  parts.append(f"{s['wall_seconds']:.0f} s")
  if s.get("tokens_per_sec"):
    parts.append(f"{s['tokens_per_sec']:,.0f} tok/s")
  lines = [" | ".join(parts), f"run directory: {s['run_dir']}"]
  if s["interrupted_by"]:
    lines.append(f"interrupted; resume with: python train.py --resume --out {s['run_dir']}")
  return "\n".join(lines)
