"""Generation throughput: decode tokens/s of TGNLM.decode (KV cache + recurrent state).

For a context length C and batch B, a random prompt of C - N tokens is prefilled once
(TGNLM.prefill, timed once after its compilation), then N tokens are decoded from its
cache (TGNLM.decode, compiled once per shape, median of repeats, each call decoding at the same
positions on the cache the previous call returned, donated so nothing is copied):
decode tokens/s = B N / t.

  tgn-hard-0.10    TGN, minGRU, hard gate with each layer's bias calibrated on one row of
                   the prompt so that 10% of its tokens open it; at a decoding step a row
                   whose gate is closed reads no key (per-row key lengths)
  tgn-kvopen-0.10  the same with kv="open": the cache holds the open tokens only
  transformer      attention only

Tokens are sampled at temperature 1 by default: an untrained model's greedy output quickly
repeats one token, which pins every gate open or shut and would not measure a 10% rate.
The decode-time open rate and the fraction of (layer, step) with every row closed come
from the decoding steps' own gates.

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
from benchmarks import common, gate_control, models
from tgn_jax import TGNConfig, count_params, functional

MODELS = ("tgn-hard-0.10", "tgn-kvopen-0.10", "transformer")
COLUMNS = (
  "model context B prefill_ms ms_per_step tokens_per_s vs_transformer "
  "decode_open_rate decode_skip_rate cache_gib peak_gib error"
).split()


def main(argv=None):
  parser = common.base_parser(__doc__.splitlines()[0])
  models.add_option(parser, MODELS)
  parser.add_argument(
    "--contexts", type=common.int_list, default=[4096, 32768], help="prompt + decoded tokens"
  )
  parser.add_argument("--batches", type=common.int_list, default=[1, 16])
  parser.add_argument("--steps", type=int, default=128, help="tokens decoded per call")
  parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  models.add_size_options(parser)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  if args.tiny:  # new defaults; options given explicitly still win
    parser.set_defaults(**models.TINY_SIZE, contexts=[48], batches=[1, 2], steps=16, repeats=5)
    args = parser.parse_args(argv)
  if not 2 <= args.steps < min(args.contexts):
    parser.error("need 2 <= steps < every context")

  rows = []
  for context in args.contexts:
    for batch in args.batches:
      for name in args.models:
        rows.append(measure(name, context, batch, args))
        print(_summary(rows[-1]), flush=True)
        common.save_partial("decode", args, rows)
  common.add_ratio(
    rows, "vs_transformer", "tokens_per_s", ("context", "B"), lambda r: r["model"] == "transformer"
  )

  common.print_table(rows, COLUMNS)
  config = {
    **models.size_config(args),
    "steps": args.steps,
    "temperature": args.temperature,
    "attention_impl": args.attention_impl,
    "measure": "median wall time of TGNLM.decode(cache of a prompt of context - steps "
    "tokens, steps); tokens/s = B steps / t; prefill_ms: one TGNLM.prefill after "
    "compilation; decode_open_rate: open gates over layers, rows and decoding "
    "steps; decode_skip_rate: fraction of (layer, step) with every row closed; "
    "cache_gib: the KV cache and recurrent states; peak_gib: process-wide peak so far",
  }
  return common.finish("decode", args, {"rows": rows}, lambda png: plot(rows, png), config)


def measure(name: str, context: int, batch: int, args) -> dict:
  """One row: decode throughput of model `name` at this context and batch (or its error)."""
  target = models.MODELS[name].open_rate
  prompt_len = context - args.steps
  row = dict(model=name, context=context, B=batch, prompt=prompt_len, target_rate=target)
  try:
    config = TGNConfig(
      vocab_size=args.vocab,
      d_model=args.d_model,
      n_layers=args.layers,
      n_heads=args.heads,
      max_seq_len=context,
      dtype=args.dtype,
      attention_impl=args.attention_impl,
      **models.architecture(name),
    )
    row["params"] = count_params(config)
    model_def, params = functional.init(config, jax.random.key(0))
    prompt = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, args.vocab)
    if target is not None:  # one row calibrates every row's bias
      params, open_LBT = gate_control.calibrate_open_rate(
        model_def, params, prompt[:1], target, config.gate_threshold
      )
      row["calibrated_open_rate"] = gate_control.layer_rates(open_LBT)
    model = nnx.merge(model_def, params)
    # Dense prefill (capacity 1.0): one compilation, and prefill is not what is measured.
    prefill = lambda: model.prefill(prompt, context, capacity=1.0)
    row["prefill_ms"] = common.time_fn(prefill, warmup=1, repeats=1)["median_ms"]
    logits, cache = prefill()
    row["cache_gib"] = sum(x.nbytes for x in jax.tree.leaves(cache)) / 2**30
    key = jax.random.key(2)
    holder, opened = [cache], []

    def decode():  # the same positions each call, on the cache the last call returned
      decoded = model.decode(
        holder[0], logits, prompt_len, args.steps, temperature=args.temperature, rng=key
      )
      holder[0] = decoded.cache
      opened.append(decoded.is_open)
      return decoded.tokens

    timing = common.time_fn(decode, warmup=1, repeats=args.repeats)
    row.update(
      ms=timing["median_ms"],
      ms_per_step=timing["median_ms"] / args.steps,
      tokens_per_s=batch * args.steps / (timing["median_ms"] / 1e3),
      first_call_s=timing["compile_ms"] / 1e3,
      peak_gib=common.peak_memory_gib(),
    )
    if config.has_gate and config.gate == "hard":
      is_open = opened[-1]  # [L, B, steps]
      row.update(
        decode_open_rate=float(jnp.mean(is_open)),
        decode_skip_rate=float(jnp.mean(~jnp.any(is_open, axis=1))),
      )
  except Exception as e:  # out of memory, compilation failure: keep the row, go on
    row["error"] = common.error_text(e)
  return row


def _summary(row: dict) -> str:
  where = f"{row['model']} context={row['context']} B={row['B']}"
  if "error" in row:
    return f"{where}: {row['error']}"
  return (
    f"{where}: prefill {row['prefill_ms']:.2f} ms, {row['ms_per_step']:.3f} ms per "
    f"decoded token, {row['tokens_per_s']:.4g} tokens/s"
  )


def plot(rows, path):
  lines = {
    f"{name}, B={batch}": [
      (r["context"], r["tokens_per_s"])
      for r in rows
      if r["model"] == name and r["B"] == batch and r.get("tokens_per_s")
    ]
    for name in dict.fromkeys(r["model"] for r in rows)
    for batch in sorted({r["B"] for r in rows})
  }
  common.loglog_plot(
    path,
    lines,
    xlabel="context (prompt + generated tokens)",
    ylabel="decode tokens / s",
    title="Generation throughput (prefill excluded)",
  )


if __name__ == "__main__":
  main()
