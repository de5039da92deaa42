"""Phase diagram of the gate: open rate and cross-entropy against the temperature lambda.

A sweep of fixed lambda on MQAR (no thermostat), then one thermostat run: the open rate,
the held-out cross-entropy (U) and accuracy against lambda, the susceptibility
-d(open rate)/d(ln lambda), its peak (the critical lambda), and where the thermostat
settles for its target.

  python benchmarks/phase.py
  python benchmarks/phase.py --tiny
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common

COLUMNS = ["lam", "thermostat", "open_rate", "eval_ce", "eval_accuracy", "susceptibility"]


def main(argv=None):
  parser = common.base_parser(__doc__.splitlines()[0])
  parser.add_argument(
    "--lams", type=common.float_list, default=[0.001, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
  )
  parser.add_argument("--target_rate", type=float, default=0.25)
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument(
    "--task_options",
    default="",
    help="extra train.py options as key=value,... (e.g. seq_len=64,num_kv=8)",
  )
  parser.add_argument("--runs_dir", default=None)
  args = parser.parse_args(argv)
  base = dict(
    task="mqar",
    steps=args.steps,
    eval_every=max(1, args.steps // 6),
    checkpoint_every=max(1, args.steps // 3),
  )
  if args.tiny:
    args.lams, args.steps = [0.01, 100.0], 30
    base.update(steps=30, batch_size=16, d_model=32, eval_examples=32, eval_every=15, soft_warmup=0)
  for item in filter(None, args.task_options.split(",")):
    key, value = item.split("=")
    base[key] = type(base.get(key, value))(value) if key in base else _parse(value)
  runs_dir = common.runs_dir("phase", args)

  rows = []
  for lam in args.lams:
    summary = common.train_run({**base, "lam": lam, "target_rate": None}, runs_dir / f"lam{lam:g}")
    rows.append(_row(lam, summary, thermostat=False))
    print(rows[-1], flush=True)
  thermo = common.train_run(
    {**base, "target_rate": args.target_rate, "control": "lambda"},
    runs_dir / f"thermostat{args.target_rate:g}",
  )
  thermo_row = _row(thermo["lam"], thermo, thermostat=True)
  print(thermo_row, flush=True)

  lams = np.array([r["lam"] for r in rows])
  rates = np.array([r["open_rate"] for r in rows])
  susceptibility = -np.gradient(rates, np.log(lams)) if len(rows) > 1 else np.zeros(1)
  for r, chi in zip(rows, susceptibility):
    r["susceptibility"] = float(chi)
  critical = float(lams[int(np.argmax(susceptibility))])
  common.print_table(rows + [thermo_row], COLUMNS)
  print(
    f"critical lambda (peak susceptibility) {critical:g}; thermostat for target "
    f"{args.target_rate} settles at lambda {thermo_row['lam']:.4g}, open rate "
    f"{thermo_row['open_rate']:.3f}"
  )
  return common.finish(
    "phase",
    args,
    {"rows": rows, "thermostat": thermo_row, "critical_lam": critical},
    lambda png: plot(rows, thermo_row, critical, png),
  )


def _parse(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def _row(lam: float, summary: dict, thermostat: bool) -> dict:
  final = summary["final"]
  return dict(
    lam=float(lam),
    thermostat=thermostat,
    open_rate=final.get("eval_gate_hard"),
    eval_ce=final.get("eval_ce"),
    eval_accuracy=final.get("eval_accuracy"),
    open_per_layer=final.get("open_rate"),
  )


def plot(rows, thermo, critical, path):
  with common.figure(path) as fig:
    _draw(fig.add_subplot(), rows, thermo, critical)


def _draw(ax, rows, thermo, critical):
  lams = [r["lam"] for r in rows]
  ax.plot(lams, [r["open_rate"] for r in rows], "o-", color="tab:blue", label="open rate")
  ax.plot(
    lams,
    [r["susceptibility"] for r in rows],
    "s--",
    color="tab:green",
    label="susceptibility -d rate / d ln lambda",
  )
  ax.axvline(critical, color="tab:green", lw=0.8)
  ax.plot(
    [thermo["lam"]], [thermo["open_rate"]], "*", ms=14, color="tab:orange", label="thermostat"
  )
  ax.set(
    xscale="log",
    xlabel="lambda (temperature)",
    ylabel="open rate / susceptibility",
    title="Gate phase diagram (MQAR)",
  )
  twin = ax.twinx()
  twin.plot(lams, [r["eval_ce"] for r in rows], "^-", color="tab:red", label="held-out CE (U)")
  twin.set_ylabel("cross-entropy (nats)", color="tab:red")
  ax.legend(fontsize=7, loc="upper right")
  twin.legend(fontsize=7, loc="center right")


if __name__ == "__main__":
  main()
