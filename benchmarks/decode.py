"""Generation throughput: decode tokens/s of TGNLM.generate (KV cache + recurrent state).

For a context length C and batch B, a random prompt of C - n2 tokens is extended by n1 and
by n2 tokens; the prefill is the same in both, so (t2 - t1) is the time of n2 - n1 decode
steps and decode tokens/s = B (n2 - n1) / (t2 - t1) (None if timing noise makes t2 <= t1).
Compilation is excluded by warm-up calls (each n compiles its own program).

  tgn-hard-0.10  TGN, minGRU, hard gate with each layer's bias calibrated so that 10% of
                 the prompt's tokens open it; at a decode step only rows whose gate is open
                 attend, and a step where every row is closed skips attention
  transformer    attention only

Tokens are sampled at temperature 1 by default: an untrained model's greedy output quickly
repeats one token, which pins every gate open or shut and would not measure a 10% rate.
The decode-time open rate and the fraction of (layer, step) with every row closed are
measured from one forward pass over the generated tokens (gates as in decoding).

  python benchmarks/decode.py                       # GPU
  python benchmarks/decode.py --tiny                # CPU smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common, gate_control  # noqa: E402
from tgn_jax import TGNConfig, count_params, functional  # noqa: E402

MODELS = ("tgn-hard-0.10", "transformer")
COLUMNS = ["model", "context", "B", "ms_n1", "ms_n2", "ms_per_step", "tokens_per_s",
           "vs_transformer", "decode_open_rate", "decode_skip_rate", "peak_gib", "error"]


def main(argv=None):
  parser = common.base_parser(__doc__.splitlines()[0])
  parser.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS),
                      help=f"comma-separated subset of {', '.join(MODELS)}")
  parser.add_argument("--contexts", type=common.int_list, default=[4096, 32768],
                      help="prompt + n2 generated tokens")
  parser.add_argument("--batches", type=common.int_list, default=[1, 16])
  parser.add_argument("--n1", type=int, default=16, help="new tokens of the short run")
  parser.add_argument("--n2", type=int, default=144, help="new tokens of the long run")
  parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--d_model", type=int, default=768)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--vocab", type=int, default=50304)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  if args.tiny:  # new defaults; options given explicitly still win
    parser.set_defaults(layers=2, d_model=32, heads=2, vocab=64, contexts=[48], batches=[1, 2],
                        n1=2, n2=22, dtype="float32", repeats=20)
    args = parser.parse_args(argv)
  unknown = sorted(set(args.models) - set(MODELS))
  if unknown:
    parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
  if not 1 <= args.n1 < args.n2 < min(args.contexts):
    parser.error("need 1 <= n1 < n2 < every context")

  rows = []
  for context in args.contexts:
    for batch in args.batches:
      for name in args.models:
        rows.append(measure(name, context, batch, args))
        print(_summary(rows[-1]), flush=True)
  add_transformer_ratio(rows)

  common.print_table(rows, COLUMNS)
  config = {
      "layers": args.layers, "d_model": args.d_model, "heads": args.heads, "vocab": args.vocab,
      "dtype": args.dtype, "n1": args.n1, "n2": args.n2, "temperature": args.temperature,
      "measure": "median wall time of generate(prompt of context - n2 tokens, n) for n = n1, "
                 "n2; tokens/s = B (n2 - n1) / (t2 - t1); decode_open_rate: open gates over "
                 "layers, rows and decode steps; decode_skip_rate: fraction of (layer, step) "
                 "with every row closed; peak_gib: process-wide peak so far"}
  return common.finish("decode", args, {"rows": rows}, lambda png: plot(rows, png), config)


def measure(name: str, context: int, batch: int, args) -> dict:
  """One row: decode throughput of model `name` at this context and batch (or its error)."""
  target = gate_control.MODELS[name]["open_rate"]
  prompt_len = context - args.n2
  row = dict(model=name, context=context, B=batch, prompt=prompt_len, target_rate=target)
  try:
    config = TGNConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                       n_heads=args.heads, max_seq_len=context, dtype=args.dtype,
                       **gate_control.architecture(name))
    row["params"] = count_params(config)
    model_def, params = functional.init(config, jax.random.key(0))
    prompt = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, args.vocab)
    if target is not None:
      params, open_LBT = gate_control.calibrate_open_rate(
          model_def, params, prompt, target, config.gate_threshold)
      row["calibrated_open_rate"] = gate_control.layer_rates(open_LBT)
    model = nnx.merge(model_def, params)
    key = jax.random.key(2)
    generate = lambda n: model.generate(prompt, n, temperature=args.temperature, rng=key)
    short = common.time_fn(lambda: generate(args.n1), warmup=2, repeats=args.repeats)
    long = common.time_fn(lambda: generate(args.n2), warmup=2, repeats=args.repeats)
    decode_ms = long["median_ms"] - short["median_ms"]
    steps = args.n2 - args.n1
    row.update(ms_n1=short["median_ms"], ms_n2=long["median_ms"], ms_per_step=decode_ms / steps,
               tokens_per_s=batch * steps / (decode_ms / 1e3) if decode_ms > 0 else None,
               first_call_s=long["compile_ms"] / 1e3, peak_gib=common.peak_memory_gib())
    if config.gate == "hard" and config.has_gate:
      row.update(decode_rates(model_def, params, generate(args.n2), prompt_len,
                              config.gate_threshold))
  except Exception as e:  # out of memory, compilation failure: keep the row, go on
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
  return row


def decode_rates(model_def, params, generated_BS: jax.Array, prompt_len: int,
                 threshold: float) -> dict:
  """Open rate and all-closed fraction of the gates at the positions the decode steps fed.

  generate feeds positions prompt_len .. S-2 one step at a time (the last token is only
  emitted); greedy or sampled, decoding equals a forward pass over the generated tokens
  (up to rounding). Only the gates are returned, so the logits are never computed.
  """
  gates = jax.jit(lambda p, t: functional.apply(model_def, p, t, stats=None)[1].gate)(
      params, generated_BS[:, :-1])
  is_open = gates[:, :, prompt_len:] > threshold  # [L, B, steps]
  return dict(decode_open_rate=float(jnp.mean(is_open)),
              decode_skip_rate=float(jnp.mean(~jnp.any(is_open, axis=1))))


def add_transformer_ratio(rows: list[dict]) -> None:
  """Sets vs_transformer = tokens/s / the transformer's at the same context and batch."""
  reference = {(r["context"], r["B"]): r["tokens_per_s"] for r in rows
               if r["model"] == "transformer" and r.get("tokens_per_s")}
  for r in rows:
    if r.get("tokens_per_s") and (r["context"], r["B"]) in reference:
      r["vs_transformer"] = r["tokens_per_s"] / reference[(r["context"], r["B"])]


def _summary(row: dict) -> str:
  where = f"{row['model']} context={row['context']} B={row['B']}"
  if "error" in row:
    return f"{where}: {row['error']}"
  return (f"{where}: n1 {row['ms_n1']:.2f} ms, n2 {row['ms_n2']:.2f} ms, "
          f"{row['ms_per_step']:.3f} ms per decode step")


def plot(rows, path):
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  for name in dict.fromkeys(r["model"] for r in rows):
    for batch in sorted({r["B"] for r in rows}):
      pts = sorted((r["context"], r["tokens_per_s"]) for r in rows
                   if r["model"] == name and r["B"] == batch and r.get("tokens_per_s"))
      if pts:
        ax.plot(*zip(*pts), marker="o", label=f"{name}, B={batch}")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("context (prompt + generated tokens)")
  ax.set_ylabel("decode tokens / s")
  ax.set_title("Generation throughput (prefill excluded)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
