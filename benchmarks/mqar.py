"""MQAR quality: TGN (hard gate + thermostat) against a Transformer and a pure recurrence.

The Zoology grid: (seq_len, num_kv) pairs, vocabulary V, 2 layers, each d_model, best of a
learning-rate sweep per (model, grid point, width). Reported per row: held-out accuracy, the
measured hard open rate (vs_oracle: as a multiple of the oracle's), and where the gate opens
(query positions vs elsewhere, mean over layers). `--fillers zero` is the Zoology paper's
grid (token 0 between the queries); `random` fills with random tokens. For the TGN, `--gates`
adds the reference gates at the same grid point: `oracle` (open exactly at the queries of the
last layer) and `random` (Bernoulli at the learned gate's per-layer rates). `budget` is the
fraction of Zoology's training budget (100k examples x 64 epochs) that steps x batch_size
cover.

A sweep can be split between processes (each with a part of the grid, the same
--runs_dir) and its table and plot built afterwards from the finished runs alone:
`--collect` trains nothing and lists the runs it did not find.

  python benchmarks/mqar.py                                     # the full grid (GPU-sized)
  python benchmarks/mqar.py --grid 64:4 --d_models 64 --steps 3000
  python benchmarks/mqar.py --tiny                              # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common, models
from tgn_jax.training.config import OPTIONS

COLUMNS = (
  "model seq_len num_kv d_model lr target accuracy open_rate vs_oracle open_at_queries "
  "open_elsewhere gate budget steps"
).split()
ZOOLOGY_EXAMPLES = 100_000 * 64
N_LAYERS = 2  # the Zoology grid's depth


def grid_list(text: str) -> list[tuple[int, int]]:
  return [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item]


def main(argv=None):
  parser = common.base_parser(__doc__.splitlines()[0])
  parser.add_argument(
    "--grid",
    type=grid_list,
    default=grid_list("64:4,128:8,256:16,512:64"),
    help="seq_len:num_kv pairs",
  )
  parser.add_argument("--vocab_size", type=int, default=8192)
  parser.add_argument("--d_models", type=common.int_list, default=[64, 128])
  parser.add_argument("--lrs", type=common.float_list, default=[1e-4, 3e-4, 1e-3, 3e-3])
  parser.add_argument("--fillers", choices=("random", "zero"), default="random")
  parser.add_argument(
    "--gates",
    type=lambda text: text.split(","),
    default=["learned"],
    help="for the TGN: learned and the reference gates oracle, random (comma-separated)",
  )
  models.add_option(parser, models.TRAINED)
  parser.add_argument("--steps", type=int, default=4000)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument(
    "--target_rate",
    type=common.float_list,
    default=[0.15],
    help="TGN open-rate targets (comma-separated: one run each, and an accuracy against "
    "open rate panel)",
  )
  parser.add_argument(
    "--target_vs_oracle",
    type=float,
    default=None,
    help="TGN open-rate target as this multiple of the oracle's rate at each grid point "
    "(num_kv / (seq_len * 2 layers)); replaces --target_rate",
  )
  common.add_control_option(parser)
  parser.add_argument(
    "--learned_positions",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="every model adds learned absolute positions to its token embeddings (the mqar "
    "preset; off: RoPE alone, run names end in _rope)",
  )
  parser.add_argument(
    "--soft_warmup",
    type=int,
    default=None,
    help="TGN: steps trained with the soft gate before it hardens (default: train.py's, a "
    "third of the steps; given: run names end in _softN)",
  )
  parser.add_argument(
    "--lam_warmup",
    type=int,
    default=None,
    help="TGN: steps before the open-rate control begins (default: train.py's, a third of "
    "the steps; given: run names end in _lamwarmupN)",
  )
  parser.add_argument(
    "--quantile_scope",
    choices=OPTIONS["thermostat.quantile_scope"].choices,
    default=None,
    help="TGN, quantile control: where the open budget is held (train.py's "
    "--thermostat.quantile_scope; given: run names end in _scopeS)",
  )
  parser.add_argument(
    "--quantile_rate_end",
    type=float,
    default=None,
    help="TGN, quantile control: the threshold's step fraction at the last step (train.py's "
    "--thermostat.quantile_rate_end; given: run names end in _rateendR)",
  )
  parser.add_argument(
    "--center_gate_gradient",
    action="store_true",
    help="TGN, quantile control: the gate's gradient without its batch mean (train.py's "
    "--model.center_gate_gradient; run names end in _centered)",
  )
  parser.add_argument(
    "--seed",
    type=int,
    default=0,
    help="every run's seed (initialisation, data order, gate randomness; not 0: run names "
    "end in _seedS)",
  )
  parser.add_argument("--eval_examples", type=int, default=1000)
  parser.add_argument("--runs_dir", default=None, help="where the training runs go")
  parser.add_argument(
    "--collect",
    action="store_true",
    help="train nothing: the table and plot from the runs already finished in --runs_dir",
  )
  args = parser.parse_args(argv)
  if args.tiny:
    args.grid, args.vocab_size, args.d_models, args.lrs = [(32, 4)], 64, [32], [3e-3]
    args.steps, args.batch_size, args.eval_examples = 30, 16, 32
  runs_dir = common.runs_dir("mqar", args)

  from tgn_jax.training.config import ConfigError

  rows, missing = [], []
  for seq_len, num_kv in args.grid:
    targets = args.target_rate
    if args.target_vs_oracle is not None:
      targets = [round(args.target_vs_oracle * oracle_rate(seq_len, num_kv), 6)]
    for d_model in args.d_models:
      for model, target_rate, reference_gates in _runs(args.models, targets, args.gates):
        point = dict(model=model, seq_len=seq_len, num_kv=num_kv, d_model=d_model)
        learned = None
        for gate in reference_gates:
          best = None
          for lr in args.lrs:
            rates = learned and learned["open_per_layer"]
            options, name = _run(
              args, **point, lr=lr, target_rate=target_rate, gate=gate, rates=rates
            )
            if args.collect:
              try:
                summary = common.finished_run(options, runs_dir / name)
              except ConfigError:  # say, a random gate trained at other learned rates
                summary, name = None, name + " (other options)"
              if summary is None:
                missing.append(name)
                continue
            else:
              summary = common.train_run(options, runs_dir / name)
            row = _row(summary, model, seq_len, num_kv)
            row.update(
              d_model=d_model,
              lr=lr,
              target=None if gate == "oracle" else target_rate,
              gate=gate or "learned",
              run=name,
              budget=args.steps * args.batch_size / ZOOLOGY_EXAMPLES,
            )
            print(f"{name}: accuracy {row['accuracy']:.4f} open {row['open_rate']:.3f}", flush=True)
            if best is None or row["accuracy"] > best["accuracy"]:
              best = row
          if best is None:  # --collect: none of its learning rates finished
            if gate is None:  # the reference gates need the learned gate's rates
              missing += [
                _run(args, **point, lr=lr, target_rate=target_rate, gate=g, rates=None)[1]
                for g in reference_gates[1:]
                for lr in args.lrs
              ]
              break
            continue
          rows.append(best)
          learned = learned or best

  common.print_table(rows, COLUMNS)
  results = {"rows": rows}
  if missing:
    print(f"not finished in {runs_dir}: {', '.join(missing)}")
    results["missing_runs"] = missing
  curve = args.target_vs_oracle is None and len(args.target_rate) > 1
  return common.finish("mqar", args, results, lambda png: plot(rows, png, curve, runs_dir))


def _run(args, model, seq_len, num_kv, d_model, lr, target_rate, gate, rates):
  """train.py options and run name of one run. gate: None (learned), "oracle" or "random";
  rates: the learned gate's per-layer open rates (the random gate's; None: name only)."""
  options = dict(
    task="mqar",
    seq_len=seq_len,
    num_kv=num_kv,
    vocab_size=args.vocab_size,
    fillers=args.fillers,
    d_model=d_model,
    n_layers=N_LAYERS,
    n_heads=max(1, d_model // 64) * 2,
    steps=args.steps,
    batch_size=args.batch_size,
    lr=lr,
    eval_examples=args.eval_examples,
    eval_every=max(1, args.steps // 8),
    checkpoint_every=max(1, args.steps // 4),
    target_rate=target_rate,
  )
  options["model.learned_positions"] = args.learned_positions
  options.update(models.train_options(model))
  name = f"{model}_T{seq_len}_kv{num_kv}_d{d_model}_lr{lr:g}"
  if args.fillers != "random":
    name += f"_{args.fillers}"
  if not args.learned_positions:
    name += "_rope"
  if models.MODELS[model].thermostat:
    options["control"] = args.control
    if gate != "oracle":  # the oracle has no target: one run for them all
      name += f"_target{target_rate:g}"
    name += common.control_suffix(args.control)
    if args.soft_warmup is not None:
      options["soft_warmup"] = args.soft_warmup
      name += f"_soft{args.soft_warmup}"
    elif args.tiny:  # too few steps for a soft warm-up
      options["soft_warmup"] = 0
    for option, tag in (
      ("lam_warmup", "lamwarmup"),
      ("quantile_scope", "scope"),
      ("quantile_rate_end", "rateend"),
    ):
      value = getattr(args, option)
      if value is not None:
        options[option] = value
        name += f"_{tag}{value}"
    if args.center_gate_gradient and gate is None:  # the reference gates are not learnt
      options["model.center_gate_gradient"] = True
      name += "_centered"
  if gate is not None:
    options.update(reference_gate=gate, target_rate=None, lam=0.0)
    if gate == "random" and rates is not None:
      options["reference_rates"] = [round(r, 4) for r in rates]
    name += f"_{gate}"
  if args.seed:
    options["seed"] = args.seed
    name += f"_seed{args.seed}"
  return options, name


def oracle_rate(seq_len: int, num_kv: int) -> float:
  """The oracle gate's open rate, mean over layers: the num_kv queries of the last layer."""
  return num_kv / (seq_len * N_LAYERS)


def _runs(model_names, targets, gates):
  """(model, target rate, gates) in training order: the TGN once per target with the learned
  gate (None), then the reference gates asked for, the oracle at the first target only; the
  other models once, without a target."""
  for model in model_names:
    if not models.MODELS[model].thermostat:
      yield model, None, [None]
      continue
    for index, target in enumerate(targets):
      reference = [g for g in gates if g == "random" or (g == "oracle" and index == 0)]
      yield model, target, [None] + reference


def _row(summary, model, seq_len, num_kv):
  final = summary["final"]
  open_rate, oracle = final.get("eval_gate_hard"), final.get("oracle_open_rate")
  return dict(
    model=model,
    seq_len=seq_len,
    num_kv=num_kv,
    accuracy=final.get("eval_accuracy"),
    open_rate=open_rate,
    vs_oracle=open_rate / oracle if open_rate is not None and oracle else None,
    open_at_queries=_mean(final.get("open_rate_scored")),
    open_elsewhere=_mean(final.get("open_rate_unscored")),
    open_per_layer=final.get("open_rate"),
    oracle_open_rate=final.get("oracle_open_rate"),
    lam=summary["lam"],
    steps=summary["steps_completed"],
    seconds=summary["wall_seconds"],
    device=summary.get("env", {}).get("device"),  # where it trained (--collect runs anywhere)
  )


def _mean(values):
  return None if not values else float(np.mean(values))


def plot(rows, path, curve=False, runs_dir=None):
  """Accuracy and open rate against sequence length, and each row's training-batch accuracy
  against step (read from its run in runs_dir, the step where the gate hardened marked);
  curve (several targets): accuracy against open rate instead (a line per gate and grid
  point, the oracle a single point)."""
  if curve:
    return _plot_curve(rows, path)
  groups = [
    (model, d_model)
    for model in sorted({r["model"] for r in rows})
    for d_model in sorted({r["d_model"] for r in rows})
  ]

  def lines(key, keep=lambda model: True):
    return {
      f"{model} d={d_model}" + ("" if gate == "learned" else f" ({gate} gate)"): [
        (r["seq_len"], r[key])
        for r in rows
        if r["model"] == model and r["d_model"] == d_model and r.get("gate", "learned") == gate
      ]
      for model, d_model in groups
      for gate in sorted({r.get("gate", "learned") for r in rows})
      if keep(model)
    }

  accuracy = lines("accuracy")
  colors = {label: f"C{i % 10}" for i, label in enumerate(accuracy)}
  with common.figure(path, figsize=(13.5, 3.8)) as fig:
    ax_acc, ax_gate, ax_steps = fig.subplots(1, 3)
    common.plot_lines(
      ax_acc,
      accuracy,
      colors,
      xscale="log",
      xlabel="sequence length",
      ylabel="held-out accuracy",
      ylim=(0, 1.02),
      title="MQAR accuracy (best LR)",
    )
    common.plot_lines(
      ax_gate,
      lines("vs_oracle", lambda model: models.MODELS[model].thermostat),
      colors,
      xscale="log",
      xlabel="sequence length",
      ylabel="hard open rate / the oracle's",
      title="TGN open rate, in units of the oracle's",
    )
    _plot_training(ax_steps, rows, runs_dir)


def _plot_training(ax, rows, runs_dir):
  """Training-batch accuracy (scored positions) against step, a line per row; for the TGN,
  its training-batch open rate dashed and an x where its gate hardened."""
  for r in rows:
    records = common.read_records(Path(runs_dir) / r["run"], "train") if runs_dir else []
    if not records:
      continue
    gate = "" if r.get("gate", "learned") == "learned" else f", {r['gate']} gate"
    label = f"{r['model']} {r['seq_len']}:{r['num_kv']} d={r['d_model']}{gate}"
    (line,) = ax.plot([x["step"] for x in records], [x["accuracy"] for x in records], lw=1)
    line.set_label(label)
    if models.MODELS[r["model"]].thermostat:
      rate = [x["gate_hard"] for x in records]
      ax.plot(line.get_xdata(), rate, "--", lw=0.8, color=line.get_color())
    hardened = [x for x in records if x.get("gate_mode") == "hard"]
    if hardened and hardened[0] is not records[0]:
      ax.plot(hardened[0]["step"], hardened[0]["accuracy"], "x", color=line.get_color(), ms=8)
  ax.set(
    xlabel="step (x: the gate hardens)",
    ylabel="training-batch accuracy (dashed: open rate)",
    ylim=(0, 1.02),
  )
  ax.set_title("Learning curves")
  ax.legend(fontsize=7)


def _plot_curve(rows, path):
  points = {(r["seq_len"], r["num_kv"], r["d_model"]) for r in rows}
  several = len(points) > 1
  where = "".join(f" ({t}:{kv}, d={d})" for t, kv, d in points) if len(points) == 1 else ""
  lines = {}
  for r in rows:
    label = r["model"] if r["model"] != "tgn" else f"tgn, {r['gate']} gate"
    if several:
      label += f" ({r['seq_len']}:{r['num_kv']}, d={r['d_model']})"
    lines.setdefault(label, []).append((r["open_rate"], r["accuracy"]))
  with common.figure(path, figsize=(5.5, 4)) as fig:
    common.plot_lines(
      fig.subplots(),
      lines,
      xlabel="held-out open rate (mean over layers)",
      ylabel="held-out accuracy",
      ylim=(0, 1.02),
      title="MQAR: accuracy against open rate" + where,
    )


if __name__ == "__main__":
  main()
