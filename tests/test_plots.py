"""Tests for tgn_jax.training.plots."""

from __future__ import annotations

import json
from pathlib import Path

from tgn_jax.training.plots import plot_run, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _train(step: int, **overrides: object) -> dict:
  record = dict(
    step=step,
    loss=3.0 / (step + 1) + 0.1,
    ce=2.5 / (step + 1) + 0.1,
    lam=0.01 * step,
    gate_soft=0.5 - 0.001 * step,
    gate_hard=0.4,
    lr=1e-3,
    tokens_per_sec=1e5,
  )
  return {**record, **overrides}


def _write_metrics(run_dir: Path, lines: list[str]) -> None:
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / "metrics.jsonl").write_text("\n".join(lines))


def _assert_pngs(paths: list[Path], run_dir: Path, names: set[str]) -> None:
  assert {p.name for p in paths} == names
  assert {p.name for p in (run_dir / "plots").glob("*.png")} == names
  for path in paths:
    assert path.parent == run_dir / "plots"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, path.name


def test_plot_run_writes_all_plots(tmp_path: Path) -> None:
  lines = [json.dumps({"kind": "train", **_train(s)}) for s in range(0, 200, 10)]
  lines[3] = json.dumps(_train(30, loss=None))  # NaN written as null, no "kind" field
  for s in (50, 100, 150):
    lines.append(
      json.dumps(
        dict(
          kind="eval",
          step=s,
          eval_ce=1.0 / s,
          eval_accuracy=s / 200,
          train_accuracy=s / 180,
          specific_heat=[0.1 * s, None, 0.3],
        )
      )
    )
  lines.append(
    json.dumps(dict(step=190, eval_ce=0.004, specific_heat=[1.0, 2.0, None]))
  )  # eval by key
  lines.append('{"step": 200, "loss": 0.1, "c')  # truncated last line
  _write_metrics(tmp_path, lines)

  train, evals = read_metrics(tmp_path / "metrics.jsonl")
  assert len(train) == 20 and len(evals) == 4

  paths = plot_run(tmp_path)
  _assert_pngs(
    paths, tmp_path, {"loss.png", "gate.png", "lam.png", "specific_heat.png", "accuracy.png"}
  )


def test_plot_run_skips_absent_data(tmp_path: Path) -> None:
  lines = [json.dumps(_train(s, lam=None)) for s in range(5)]
  lines.append(json.dumps(dict(kind="eval", step=4, eval_ce=0.5, specific_heat=None)))
  lines.append("")  # empty last line
  _write_metrics(tmp_path, lines)
  paths = plot_run(str(tmp_path))
  _assert_pngs(paths, tmp_path, {"loss.png", "gate.png"})


def test_plot_run_empty_metrics(tmp_path: Path) -> None:
  _write_metrics(tmp_path, [""])
  assert plot_run(tmp_path) == []
