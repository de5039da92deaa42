"""Byte-level language modelling: TGN against a Transformer and a pure recurrence of the
same width, depth and steps, on the embedded corpus (Python's standard library sources)
or --data. Reported: validation bits per byte, the TGN open rate, and the wall-clock time
each model needs to reach a given bits-per-byte.

  python benchmarks/lm.py
  python benchmarks/lm.py --tiny
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common, models

COLUMNS = ["model", "bpb", "open_rate", "params", "tokens_per_sec", "seconds", "seconds_to_reach"]


def time_to_reach(evals: list[dict], bpb: float):
  """Seconds (since the run started) of the first eval at or below `bpb`, else None."""
  for e in evals:
    if e["eval_bpb"] <= bpb:
      return e["elapsed"]
  return None


def main(argv=None):
  parser = common.base_parser(__doc__.splitlines()[0])
  parser.add_argument("--data", default=None, help="text file or directory (default: stdlib)")
  models.add_option(parser, models.TRAINED)
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--d_model", type=int, default=128)
  parser.add_argument("--n_layers", type=int, default=2)
  parser.add_argument("--target_rate", type=float, default=0.1, help="TGN open-rate target")
  common.add_control_option(parser)
  parser.add_argument(
    "--reach_bpb",
    type=float,
    default=None,
    help="bits/byte for the time-to-reach column (default: the worst "
    "final bpb among the attention models)",
  )
  parser.add_argument("--runs_dir", default=None)
  args = parser.parse_args(argv)
  if args.tiny:
    args.steps, args.seq_len, args.batch_size, args.d_model = 20, 32, 4, 32
  runs_dir = common.runs_dir("lm", args)

  rows, evals = [], {}
  for model in args.models:
    options = dict(
      task="text",
      data=args.data,
      steps=args.steps,
      seq_len=args.seq_len,
      batch_size=args.batch_size,
      d_model=args.d_model,
      n_layers=args.n_layers,
      target_rate=args.target_rate,
      eval_every=max(1, args.steps // 10),
      eval_batches=2 if args.tiny else 16,
      checkpoint_every=max(1, args.steps // 4),
    )
    options.update(models.train_options(model))
    name = model
    if models.MODELS[model].thermostat:
      options["control"] = args.control
      name += common.control_suffix(args.control)
    summary = common.train_run(options, runs_dir / name)
    evals[model] = common.read_records(runs_dir / name, "eval")
    rows.append(
      dict(
        model=model,
        bpb=summary["final"]["eval_bpb"],
        open_rate=summary["final"].get("eval_gate_hard"),
        params=summary["params"],
        seconds=summary["wall_seconds"],
        tokens_per_sec=summary["tokens_per_sec"],
      )
    )
    print(rows[-1], flush=True)
  reach = args.reach_bpb
  if reach is None:
    attention = [r["bpb"] for r in rows if models.architecture(r["model"])["mixer"] != "recurrent"]
    reach = max(attention) if len(rows) > 1 else rows[0]["bpb"]
  for r in rows:
    r["seconds_to_reach"] = time_to_reach(evals[r["model"]], reach)
  common.print_table(rows, COLUMNS)
  print(f"time to reach {reach:.4f} bits/byte in the last column")
  return common.finish(
    "lm", args, {"rows": rows, "reach_bpb": reach}, lambda png: plot(evals, reach, png)
  )


def plot(evals, reach, path):
  lines = {
    model: [(e["elapsed"], e["eval_bpb"]) for e in records] for model, records in evals.items()
  }
  with common.figure(path) as fig:
    ax = fig.add_subplot()
    ax.axhline(reach, color="gray", lw=0.8, ls="--")
    common.plot_lines(
      ax,
      lines,
      xlabel="wall-clock seconds",
      ylabel="validation bits per byte",
      title="Byte-level LM, equal width/depth/steps",
    )


if __name__ == "__main__":
  main()
