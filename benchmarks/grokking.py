"""Grokking and specific heat: does the attention specific heat C peak before the test
accuracy jumps?

Modular addition (a + b) mod p, the Nanda et al. recipe (train.py --task modadd preset:
1 layer, d_model 128, 4 heads, d_mlp 512, ReLU, no normalisation, learned positions, no
clipping, AdamW lr 1e-3, weight decay 1, betas (0.9, 0.98), full batch, 30% train split,
loss on the last position), several seeds. Per seed: the step where C (mean over heads and
queries) peaks, its height over the median and in units of the curve's noise (median
absolute change between evaluations), each head's peak step, the steps where train and test accuracy
first reach 0.9 (memorisation, generalisation), and the lead of the peak; a plot of C and
accuracies against step. A peak that only marks memorisation says nothing about grokking.

Two things move C besides the circuit forming: the train loss's sudden spikes once it is near
zero (Adam's "slingshot"; evaluations where the train cross-entropy jumps 30-fold, listed per
seed), which lift C for one evaluation, and the broad hump of the transition itself. The hump
is C with one-evaluation spikes removed (running median of 3) and averaged over 5 evaluations;
its peak and lead are reported beside the raw ones.

A seed's run ends at --steps or once test accuracy has held --stop_accuracy for
--stop_patience steps, whichever comes first.

  python benchmarks/grokking.py                      # 5 seeds, p = 113
  python benchmarks/grokking.py --tiny               # CPU smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common

COLUMNS = (
  "seed peak_step peak_over_median peak_in_noise peak_at_loss_spike hump_step head_peak_steps "
  "memorised_step grok_step lead hump_lead loss_spike_steps final_test_accuracy"
).split()
HUMP_WINDOW = 5  # evaluations
LOSS_SPIKE = 30.0  # train cross-entropy ratio to the previous evaluation
LOSS_SPIKE_FLOOR = 1e-4  # nats; jumps below it are float noise near zero loss


def analyse(evals: list[dict], threshold: float) -> dict:
  """Where the specific heat C peaks, how far it stands out, and when the model memorises
  (train accuracy reaches threshold) and generalises (test accuracy reaches threshold)."""
  steps = np.array([e["step"] for e in evals])
  heat = np.array([np.nanmean(np.asarray(e["specific_heat"], float)) for e in evals])
  test = np.array([e["eval_accuracy"] for e in evals])
  train = np.array([e["train_accuracy"] for e in evals])
  peak_index = int(np.nanargmax(heat))
  peak = int(steps[peak_index])
  hump = _hump(heat)
  hump_step = int(steps[int(np.nanargmax(hump))]) if np.isfinite(hump).any() else None
  train_ce = np.array([e.get("train_ce", np.nan) for e in evals], float)
  spikes = [
    i
    for i in range(1, len(evals))
    if train_ce[i] > LOSS_SPIKE_FLOOR and train_ce[i] > LOSS_SPIKE * train_ce[i - 1]
  ]

  def first(reached):
    index = np.nonzero(reached)[0]
    return int(steps[index[0]]) if index.size else None

  grok = first(test >= threshold)
  # The curve's noise: the median absolute step-to-step change (robust to the peak itself).
  noise = float(np.nanmedian(np.abs(np.diff(heat)))) if len(heat) > 2 else float("nan")
  heads = [e.get("specific_heat_per_head") for e in evals]
  head_peaks = None
  if all(h is not None for h in heads):
    per_head = np.asarray(heads, float).reshape(len(evals), -1)  # [evals, L * N]
    head_peaks = [int(steps[int(np.nanargmax(per_head[:, h]))]) for h in range(per_head.shape[1])]
  return dict(
    peak_step=peak,
    peak_heat=float(np.nanmax(heat)),
    peak_over_median=float(np.nanmax(heat) / np.nanmedian(heat)),
    peak_in_noise=float((np.nanmax(heat) - np.nanmedian(heat)) / noise) if noise > 0 else None,
    peak_at_loss_spike=any(abs(peak_index - i) <= 1 for i in spikes),
    hump_step=hump_step,
    head_peak_steps=head_peaks,
    memorised_step=first(train >= threshold),
    grok_step=grok,
    lead=None if grok is None else grok - peak,
    hump_lead=None if grok is None or hump_step is None else grok - hump_step,
    loss_spike_steps=[int(steps[i]) for i in spikes],
    final_test_accuracy=float(test[-1]),
    final_train_accuracy=float(train[-1]),
  )


def _hump(heat):
  """C without one-evaluation spikes (centred running median of 3), averaged over
  HUMP_WINDOW evaluations (centred); NaN where a window leaves the curve."""
  heat = np.asarray(heat, float)
  out = np.full(len(heat), np.nan)
  if len(heat) < HUMP_WINDOW:
    return out
  despiked = heat.copy()
  despiked[1:-1] = np.median(np.stack([heat[:-2], heat[1:-1], heat[2:]]), axis=0)
  half = HUMP_WINDOW // 2
  window = np.ones(HUMP_WINDOW) / HUMP_WINDOW
  out[half : len(heat) - half] = np.convolve(despiked, window, mode="valid")
  return out


def main(argv=None):
  parser = common.base_parser(__doc__.splitlines()[0])
  parser.add_argument("--p", type=int, default=113)
  parser.add_argument("--seeds", type=common.int_list, default=[0, 1, 2, 3, 4])
  parser.add_argument("--steps", type=int, default=20000)
  parser.add_argument("--eval_every", type=int, default=100)
  parser.add_argument("--mixer", default="attention", help="attention (Nanda) or tgn")
  parser.add_argument("--threshold", type=float, default=0.9, help="test accuracy of 'grokked'")
  parser.add_argument(
    "--stop_accuracy",
    type=float,
    default=0.99,
    help="end a seed's run once test accuracy has held this for --stop_patience steps",
  )
  parser.add_argument("--stop_patience", type=int, default=2000)
  parser.add_argument("--runs_dir", default=None)
  args = parser.parse_args(argv)
  extra = {}
  if args.tiny:
    args.p, args.seeds, args.steps, args.eval_every = 13, [0], 40, 10
    extra = dict(d_model=32, d_mlp=64)
  runs_dir = common.runs_dir("grokking", args)

  rows, curves = [], {}
  for seed in args.seeds:
    options = dict(
      task="modadd",
      p=args.p,
      seed=seed,
      steps=args.steps,
      mixer=args.mixer,
      eval_every=args.eval_every,
      checkpoint_every=max(args.eval_every, args.steps // 4),
      stop_accuracy=args.stop_accuracy,
      stop_patience=args.stop_patience,
      **extra,
    )
    name = f"{args.mixer}_p{args.p}_seed{seed}"
    summary = common.train_run(options, runs_dir / name)
    evals = common.read_records(runs_dir / name, "eval")
    rows.append(
      dict(seed=seed, **analyse(evals, args.threshold), run=name, seconds=summary["wall_seconds"])
    )
    curves[seed] = evals
    print(rows[-1], flush=True)

  leads = [r["lead"] for r in rows if r["lead"] is not None]
  hump_leads = [r["hump_lead"] for r in rows if r["hump_lead"] is not None]
  at_memorisation = sum(
    r["memorised_step"] is not None and r["peak_step"] <= r["memorised_step"] for r in rows
  )
  prominence = [r["peak_over_median"] for r in rows]
  verdict = (
    f"C peaks before test accuracy reaches {args.threshold} in "
    f"{sum(lead > 0 for lead in leads)} of {len(rows)} seeds"
    + (f" (median lead {np.median(leads):.0f} steps)" if leads else "; no seed grokked")
    + f"; the peak is at or before memorisation in {at_memorisation} of {len(rows)}"
    + f"; peak / median C: {min(prominence):.2f} to {max(prominence):.2f}"
    + f"; the peak sits at a train-loss spike in {sum(r['peak_at_loss_spike'] for r in rows)}"
    + f" of {len(rows)}"
    + (
      f"; C's {HUMP_WINDOW}-evaluation hump peaks {min(hump_leads)} to {max(hump_leads)} steps"
      " before test accuracy reaches the threshold (negative: after)"
      if hump_leads
      else ""
    )
  )
  common.print_table(rows, COLUMNS)
  print(verdict)
  return common.finish(
    "grokking", args, {"rows": rows, "verdict": verdict}, lambda png: plot(curves, rows, png)
  )


def plot(curves, rows, path):
  with common.figure(path, figsize=(7, 2.4 * len(curves)), dpi=110) as fig:
    _draw(fig.subplots(len(curves), 1, squeeze=False)[:, 0], curves, rows)


def _draw(axes, curves, rows):
  for ax, row in zip(axes, rows):
    evals = curves[row["seed"]]
    steps = [e["step"] for e in evals]
    ax.plot(
      steps,
      [np.nanmean(np.asarray(e["specific_heat"], float)) for e in evals],
      color="tab:red",
      label="specific heat C",
    )
    heads = [e.get("specific_heat_per_head") for e in evals]
    if all(h is not None for h in heads):
      per_head = np.asarray(heads, float).reshape(len(evals), -1)
      for h in range(per_head.shape[1]):
        ax.plot(steps, per_head[:, h], color="tab:red", lw=0.6, alpha=0.35)
    mean_heat = np.array([np.nanmean(np.asarray(e["specific_heat"], float)) for e in evals])
    ax.plot(steps, _hump(mean_heat), color="darkred", ls="--", lw=1)
    for spike in row.get("loss_spike_steps") or []:
      ax.axvline(spike, color="grey", ls=":", lw=0.8)
    ax.set_ylabel("C (mean; heads thin;\nhump dashed)", color="tab:red")
    twin = ax.twinx()
    twin.plot(steps, [e["eval_accuracy"] for e in evals], color="tab:blue", label="test acc")
    twin.plot(
      steps, [e["train_accuracy"] for e in evals], color="tab:blue", ls=":", label="train acc"
    )
    twin.set(ylim=(0, 1.02), ylabel="accuracy")
    ax.axvline(row["peak_step"], color="tab:red", ls="--", lw=0.8)
    if row["grok_step"] is not None:
      ax.axvline(row["grok_step"], color="tab:blue", ls="--", lw=0.8)
    ax.set_title(
      f"seed {row['seed']}: C peak {row['peak_step']}, hump {row['hump_step']}, "
      f"grok {row['grok_step']} (grey: train-loss spikes)",
      fontsize=9,
    )
    twin.legend(fontsize=7, loc="center right")
  axes[-1].set_xlabel("step")


if __name__ == "__main__":
  main()
