"""Command line of train.py: flags generated from the TrainConfig sections, one-line errors."""

from __future__ import annotations

import argparse
import datetime
import sys
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

from tgn_jax.data import DataError
from tgn_jax.training.config import OPTIONS, PRESETS, ConfigError, Option, flatten, nest, resolve

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


def _temperature(text: str):
  if text.lower() in ("none", "null", ""):
    return None
  return "learned" if text == "learned" else float(text)


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(x) for x in text.split(",") if x)


def _parse_kwargs(option: Option) -> dict[str, Any]:
  """argparse keywords for one option, from its type annotation."""
  kind = option.kind
  if kind is bool:
    return {"action": argparse.BooleanOptionalAction}
  if option.path == "model.temperature":
    return {"type": _temperature, "metavar": "T"}
  if option.path in ("model.capacity_buckets", "ablation.reference_rates"):
    return {"type": _none_or(_floats), "metavar": "F,F,..."}
  if option.choices is not None:  # checked by the config, whose message lists the choices
    optional = type(None) in typing.get_args(kind)
    return {
      "type": _none_or(str) if optional else str,
      "metavar": "{" + ",".join(map(str, option.choices)) + "}",
    }
  inner = [a for a in typing.get_args(kind) if a is not type(None)]
  base = inner[0] if inner else kind
  if base is bool:
    return {"action": argparse.BooleanOptionalAction}
  cast = {int: int, float: float, str: str}[base]
  return {"type": _none_or(cast) if inner else cast, "metavar": base.__name__.upper()}


def build_parser() -> argparse.ArgumentParser:
  presets = "\n".join(
    f"  {task}: " + ", ".join(f"{path}={v}" for path, v in flatten(preset).items())
    for task, preset in PRESETS.items()
  )
  parser = _Parser(
    prog="train.py",
    allow_abbrev=False,
    argument_default=argparse.SUPPRESS,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    description="Train a Thermodynamic Gated Network (or a baseline) by minimising the free "
    "energy  loss = cross-entropy + lam * mean gate.\n\nEvery setting is "
    "--SECTION.FIELD (sections: task, model, optimizer, thermostat, run); "
    "the model section is tgn_jax.TGNConfig. Most also have a short flat "
    "spelling (--d_model for --model.d_model).",
    epilog="Defaults shown are the dataclasses'; each task first applies its preset:\n"
    + presets
    + "\nPrecedence: defaults < task preset < --config file < flags.",
  )
  parser.add_argument(
    "--config",
    metavar="FILE",
    help="JSON object of options, nested by section like the run's config.json (flags override it)",
  )
  groups = {}
  for option in OPTIONS.values():
    section = option.path.split(".", 1)[0]
    if section not in groups:
      groups[section] = parser.add_argument_group(section)
    names = [f"--{option.path}"]
    if option.alias and option.alias != option.path:
      names.append(f"--{option.alias}")
    default = "" if option.default is None else f" (default: {_shown(option.default)})"
    groups[section].add_argument(
      *names, dest=option.path, help=option.help + default, **_parse_kwargs(option)
    )
  return parser


def _shown(value) -> str:
  return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def default_out(task: str) -> str:
  """runs/TASK-YYYYmmdd-HHMMSS, with a suffix if that exists already."""
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  path = Path("runs") / f"{task}-{stamp}"
  suffix = 1
  while path.exists():
    suffix += 1
    path = Path("runs") / f"{task}-{stamp}-{suffix}"
  return str(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
  from tgn_jax.training import sharding
  from tgn_jax.training.loop import CheckpointError, NonFiniteError, prepare, train
  from tgn_jax.training.rundir import RunDir, check_new_or_resumable, check_resume_changes

  explicit = vars(build_parser().parse_args(argv))
  config_file = explicit.pop("config", None)
  try:
    from_file = flatten(_file_values(config_file))
    if explicit.get("run.resume"):
      if "run.out" not in explicit:
        raise ConfigError("--resume needs --out: the run directory to continue")
      run_dir = RunDir(explicit["run.out"])
      check_new_or_resumable(run_dir, resume=True)
      stored = run_dir.stored_config()
      check_resume_changes(stored, {**from_file, **explicit})
      config = resolve(explicit, config_file, base=stored)
    else:
      config = resolve(explicit, config_file)
    run = config.run
    sharding.initialize_distributed(run.coordinator, run.num_processes, run.process_id)
    if not run.resume and run.out is None:
      if jax_process_count() > 1:  # each process would pick its own time-stamped directory
        raise ConfigError("--out is needed with several processes: the run directory they share")
      config = config.replace(**{"run.out": default_out(config.task.name)})
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
  """The options a --config file sets, nested (none without one; resolve reports a bad
  file)."""
  import json

  if path is None:
    return {}
  try:
    data = json.loads(Path(path).read_text())
    return nest(data) if isinstance(data, dict) else {}
  except (OSError, ValueError):
    return {}


def format_summary(s: dict[str, Any]) -> str:
  final = s["final"]
  parts = [f"{s['task']}: {s['steps_completed']}/{s['steps_requested']} steps"]
  if s.get("stopped_at_accuracy"):
    run = s["config"]["run"]
    parts[0] += (
      f" (stopped: held-out accuracy >= {run['stop_accuracy']} for {run['stop_patience']} steps)"
    )
  if "eval_accuracy" in final:
    parts.append(f"eval accuracy {final['eval_accuracy']:.4f}")
  if "train_accuracy" in final:
    parts.append(f"train accuracy {final['train_accuracy']:.4f}")
  if "eval_bpb" in final:
    parts.append(f"eval {final['eval_bpb']:.4f} bits/byte")
  if s.get("open_rate") is not None:
    parts.append(f"open-gate rate {s['open_rate']:.3f}")
  gated = s["model_config"]["mixer"] == "tgn" and s["task"] == "mqar"
  if gated and final.get("open_rate_scored") and final.get("open_rate_unscored") is not None:
    scored, unscored = final["open_rate_scored"], final["open_rate_unscored"]
    layers = len(scored)
    parts.append(
      f"open at queries {sum(scored) / layers:.3f}, elsewhere "
      f"{sum(unscored) / layers:.3f} (oracle overall {final['oracle_open_rate']:.3f})"
    )
  parts.append(f"lambda {s['lam']:.4g}")
  if s.get("gate_offset") and s["config"]["thermostat"]["control"] == "quantile":
    offsets = ", ".join(f"{x:.3g}" for x in s["gate_offset"])
    parts.append(f"gate threshold offsets {offsets}")
  parts.append(f"{s['wall_seconds']:.0f} s")
  if s.get("tokens_per_sec"):
    parts.append(f"{s['tokens_per_sec']:,.0f} tok/s")
  lines = [" | ".join(parts), f"run directory: {s['run_dir']}"]
  if s["interrupted_by"]:
    lines.append(f"interrupted; resume with: python train.py --resume --out {s['run_dir']}")
  return "\n".join(lines)
