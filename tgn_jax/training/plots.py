"""PNG plots of a run's `metrics.jsonl` (train and eval records) into `run_dir/plots/`."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_TRAIN_KEYS = ("loss", "ce", "lam", "gate_soft", "gate_hard", "lr", "tokens_per_sec")


def _as_float(value: Any) -> float:
  """Number -> float; null, bools and anything non-numeric -> NaN."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return math.nan
  return float(value)


def read_metrics(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """(train records, eval records) from a jsonl file; lines that do not parse are skipped."""
  from tgn_jax.jsonio import read_jsonl

  train: list[dict[str, Any]] = []
  evals: list[dict[str, Any]] = []
  for record in read_jsonl(Path(path)):
    if not math.isfinite(_as_float(record.get("step"))):
      continue
    kind = record.get("kind")
    if kind is None:
      kind = "eval" if "eval_ce" in record else "train"
    if kind == "eval":
      evals.append(record)
    elif kind == "train":
      train.append(record)
  return train, evals


def _series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray] | None:
  """(steps, values) float64 [N], sorted by step, for records carrying key; None if none finite."""
  rows = [(_as_float(r["step"]), _as_float(r.get(key))) for r in records if key in r]
  rows.sort(key=lambda row: row[0])
  if not rows:
    return None
  steps, values = np.asarray(rows, dtype=np.float64).T
  if not np.isfinite(values).any():
    return None
  return steps, values


def _save(fig: Figure, path: Path) -> Path:
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=100)
  fig.clear()
  return path


def _line_plot(
  lines: list[tuple[str, tuple[np.ndarray, np.ndarray]]],
  title: str,
  ylabel: str,
  path: Path,
  log_if_positive: bool,
) -> Path:
  fig = Figure(figsize=(7, 4.5), layout="constrained")
  ax = fig.add_subplot()
  all_values = []
  for label, (steps, values) in lines:
    finite = np.isfinite(values)
    # Sparse series (eval) get markers so a single point is still visible.
    marker = "o" if finite.sum() <= 50 else None
    ax.plot(steps[finite], values[finite], label=label, marker=marker, markersize=3)
    all_values.append(values[finite])
  values = np.concatenate(all_values)
  if log_if_positive and values.size and (values > 0).all():
    ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  if len(lines) > 1:
    ax.legend()
  return _save(fig, path)


def _specific_heat_series(
  evals: list[dict[str, Any]],
) -> list[tuple[str, tuple[np.ndarray, np.ndarray]]]:
  rows = [
    (r["step"], r["specific_heat"]) for r in evals if isinstance(r.get("specific_heat"), list)
  ]
  if not rows:
    return []
  steps = np.asarray([_as_float(s) for s, _ in rows])
  num_layers = max(len(heats) for _, heats in rows)
  heat_NL = np.full((len(rows), num_layers), np.nan)
  for i, (_, heats) in enumerate(rows):
    heat_NL[i, : len(heats)] = [_as_float(h) for h in heats]
  return [
    (f"layer {layer}", (steps, heat_NL[:, layer]))
    for layer in range(num_layers)
    if np.isfinite(heat_NL[:, layer]).any()
  ]


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
  """Plot `run_dir/metrics.jsonl` into `run_dir/plots/*.png`; returns the written paths.

  loss.png, gate.png, lam.png, specific_heat.png and accuracy.png, each only when the run
  logged finite values for it.
  """
  run_dir = Path(run_dir)
  train, evals = read_metrics(run_dir / "metrics.jsonl")
  out_dir = run_dir / "plots"
  out_dir.mkdir(parents=True, exist_ok=True)

  def present(
    *specs: tuple[str, list[dict[str, Any]], str],
  ) -> list[tuple[str, tuple[np.ndarray, np.ndarray]]]:
    found = [(label, _series(records, key)) for label, records, key in specs]
    return [(label, series) for label, series in found if series is not None]

  plots = [
    (
      "loss.png",
      present(
        ("train loss", train, "loss"), ("train ce", train, "ce"), ("eval ce", evals, "eval_ce")
      ),
      "Loss",
      "nats / token",
      True,
    ),
    (
      "gate.png",
      present(("gate_soft", train, "gate_soft"), ("gate_hard", train, "gate_hard")),
      "Gate (mean over tokens and layers)",
      "gate value",
      False,
    ),
    (
      "lam.png",
      present(("λ", train, "lam")),
      "λ (gate sparsity coefficient, temperature)",
      "λ",
      False,
    ),
    (
      "specific_heat.png",
      _specific_heat_series(evals),
      "Specific heat per layer",
      "specific heat",
      False,
    ),
    (
      "accuracy.png",
      present(
        ("eval accuracy", evals, "eval_accuracy"),
        ("train accuracy", evals + train, "train_accuracy"),
      ),
      "Accuracy",
      "accuracy",
      False,
    ),
  ]
  return [
    _line_plot(lines, title, ylabel, out_dir / name, log_if_positive)
    for name, lines, title, ylabel, log_if_positive in plots
    if lines
  ]
