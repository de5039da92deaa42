"""Training throughput: tokens/s, step time and memory of a full optimizer step.

Models of one width and depth (default 12 layers, d_model 768, 12 heads, vocab 50304, bf16
compute), each trained by the library's own jitted step (forward, backward, AdamW with
clipping) on random tokens, for sequence lengths T at constant B*T (B = max(1, 16384 // T),
so T = 32768 runs one sequence); the models are benchmarks/models.py's TIMED.

The hard gate's open rate is held by calibrating each layer's gate bias on the batch
(benchmarks/gate_control.py), with lambda = 0, no thermostat and a learning rate of 1e-5 so
that it does not drift; the open and compute rates (exploration included) are measured from
the step's own metrics during timing. Routed models step as the training loop steps them
(tgn_jax.training.routed_step): the routing capacity comes from a CapacityLadder, each step
reads its overflow flag back to the host, and an overflowing step is redone (counted).

  python benchmarks/throughput.py                   # GPU
  python benchmarks/throughput.py --remat --seq_lens 32768
  python benchmarks/throughput.py --tiny            # CPU smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common, gate_control, models, plain_gpt
from tgn_jax import TGNConfig, count_params, functional
from tgn_jax.nn.model import capacity_ladder
from tgn_jax.training import sharding, steps
from tgn_jax.training.config import resolve

LEARNING_RATE = 1e-5
COLUMNS = (
  "model mesh T B ms tokens_per_s vs_transformer vs_plain_gpt vs_unsharded "
  "open_rate compute_rate capacity gathered_fraction redone peak_gib xla_gib "
  "compile_s error"
).split()


def main(argv=None):
  parser = common.base_parser(__doc__.splitlines()[0])
  models.add_option(parser, models.TIMED)
  parser.add_argument("--seq_lens", type=common.int_list, default=[1024, 4096, 8192, 32768])
  parser.add_argument(
    "--tokens_per_batch", type=int, default=16384, help="B*T (B = max(1, this // T))"
  )
  models.add_size_options(parser)
  parser.add_argument(
    "--exploration",
    type=float,
    default=TGNConfig.exploration,
    help="closed-gate attention computed in training, as a fraction of the "
    "open tokens' attention work (TGNConfig.exploration)",
  )
  parser.add_argument("--remat", action="store_true", help="rematerialise each layer")
  parser.add_argument(
    "--mesh",
    default=None,
    help="also measure each library model with train.py's sharded step on "
    "this mesh (data:D,fsdp:F), side by side with the unsharded one",
  )
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args(argv)
  if args.tiny:  # new defaults; options given explicitly still win
    parser.set_defaults(**models.TINY_SIZE, seq_lens=[32, 64], tokens_per_batch=512, repeats=2)
    args = parser.parse_args(argv)

  rows = []
  for seq_len in args.seq_lens:
    for name in args.models:
      rows.append(
        measure_plain_gpt(seq_len, args)
        if name == models.PLAIN_GPT
        else measure(name, seq_len, args)
      )
      print(_summary(rows[-1]), flush=True)
      common.save_partial("throughput", args, rows)
      if args.mesh and name != models.PLAIN_GPT:
        rows.append(measure(name, seq_len, args, mesh=sharding.MeshSpec.parse(args.mesh).build()))
        print(_summary(rows[-1]), flush=True)
        common.save_partial("throughput", args, rows)
  add_ratios(rows)

  common.print_table(rows, COLUMNS)
  config = {
    **models.size_config(args),
    "tokens_per_batch": args.tokens_per_batch,
    "remat": args.remat,
    "attention_impl": args.attention_impl,
    "exploration": args.exploration,
    "learning_rate": LEARNING_RATE,
    "models": {name: models.describe(name) for name in args.models},
    "measure": "full train step (forward, backward, AdamW), median; tokens/s = B*T / step; "
    "open_rate, compute_rate: mean over layers and all steps run; capacity: the "
    "routing capacity (fraction of a segment) the ladder held at the end; "
    "gathered_fraction: query slots attention computed per token at it (1 = "
    "dense); redone: overflowing steps redone during the timed steps; peak_gib: "
    "process-wide peak so far (monotone over rows); xla_gib: the compiled step's "
    "arguments + outputs + temporaries (at the final capacity)",
  }
  return common.finish("throughput", args, {"rows": rows}, lambda png: plot(rows, png), config)


def measure(name: str, seq_len: int, args, mesh=None) -> dict:
  """One row: timing, rates and memory of model `name` at length seq_len (or its error);
  with a mesh, through the sharded step the training loop runs."""
  batch = max(1, args.tokens_per_batch // seq_len)
  target = models.MODELS[name].open_rate
  row = dict(
    model=name, T=seq_len, B=batch, target_rate=target, mesh=None if mesh is None else args.mesh
  )
  try:
    train_config = resolve(
      dict(
        **models.architecture(name),
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        exploration=args.exploration,
        dtype=args.dtype,
        remat=args.remat,
        seq_len=seq_len,
        batch_size=batch,
        lam=0.0,
        target_rate=None,
        lr=LEARNING_RATE,
        warmup_steps=0,
        # the library's architecture (RoPE), not the mqar preset's learned positions
        **{"model.learned_positions": False},
      )
    )
    model_config = train_config.model_config(vocab_size=args.vocab, max_seq_len=seq_len).replace(
      attention_impl=args.attention_impl
    )
    row["params"] = count_params(model_config)
    optimizer = steps.make_optimizer(train_config)
    controls = steps.make_controls(train_config)(0)
    model_def, state, shardings = steps.init_state(model_config, train_config, optimizer, mesh)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq_len + 1), 0, args.vocab)
    batch_arrays = (tokens[:, :-1], tokens[:, 1:], jnp.ones((batch, seq_len), jnp.float32))
    if mesh is not None:
      batch_arrays = sharding.global_batch(mesh, batch_arrays, batch)
    if target is not None:
      params, open_LBT = gate_control.calibrate_open_rate(
        model_def, state.params, batch_arrays[0], target, model_config.gate_threshold
      )
      state = state._replace(params=params)
      row["calibrated_open_rate"] = gate_control.layer_rates(open_LBT)

    step_fn = steps.make_train_step(model_def, model_config, optimizer, mesh, shardings)
    routed = steps.routes(model_config)
    recent = []
    if routed:  # what the first step will need: its ladder starts there, not at 1.0
      _, aux = jax.jit(
        lambda p, t: functional.apply(
          model_def,
          p,
          t,
          rng=jax.random.fold_in(jax.random.wrap_key_data(controls.key), 0),
          stats=None,
        )
      )(state.params, batch_arrays[0])
      recent = [float(aux.capacity_needed)]
    ladder = capacity_ladder(model_config, seq_len, recent=recent)
    holder, history, redone = [state], [], []

    def train_step():
      holder[0], metrics, count = steps.routed_step(
        step_fn, holder[0], controls, batch_arrays, ladder, routed
      )
      history.append(metrics)
      redone.append(count)
      return holder[0], metrics

    # Warm-up steps settle the ladder (each capacity it visits compiles once).
    timing = common.time_fn(train_step, warmup=3, repeats=args.repeats)
    redone_in_timing = sum(redone[-timing["repeats"] :])
    row.update(
      _timed(timing, batch * seq_len),
      capacity=ladder.current,
      redone=redone_in_timing,
      gathered_fraction=gate_control.gathered_fraction(
        seq_len, ladder.current, model_config.segment_len, model_config.capacity_multiple
      )
      if routed
      else None,
      xla_gib=_compiled_gib(
        step_fn.lower(holder[0], controls, *batch_arrays, ladder.current).compile()
      ),
    )
    open_rates = np.array([float(m["gate_hard"]) for m in history])
    row.update(
      open_rate=float(open_rates.mean()),
      open_rate_drift=float(open_rates[-1] - open_rates[0]),
      compute_rate=float(np.mean([float(m["compute_rate"]) for m in history])),
      loss=float(history[-1]["loss"]),
      steps_run=len(history),
    )
  except Exception as e:  # out of memory, compilation failure: keep the row, go on
    row["error"] = common.error_text(e)
  return row


def _timed(timing: dict, tokens_per_step: int) -> dict:
  """A row's timing columns from common.time_fn's result."""
  return dict(
    ms=timing["median_ms"],
    min_ms=timing["min_ms"],
    tokens_per_s=tokens_per_step / (timing["median_ms"] / 1e3),
    peak_gib=common.peak_memory_gib(),
    compile_s=timing["compile_ms"] / 1e3,
  )


def _compiled_gib(compiled) -> float | None:
  """Arguments + outputs (less donated aliases) + temporaries of a compiled step, GiB."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  total = (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    - stats.alias_size_in_bytes
    + stats.temp_size_in_bytes
  )
  return total / 2**30


def measure_plain_gpt(seq_len: int, args) -> dict:
  """The plain JAX GPT's row (or its error)."""
  batch = max(1, args.tokens_per_batch // seq_len)
  row = dict(model=models.PLAIN_GPT, T=seq_len, B=batch, open_rate=1.0, compute_rate=1.0)
  try:
    dtype = jnp.dtype(args.dtype)
    params = plain_gpt.init(
      jax.random.key(0),
      vocab=args.vocab,
      d_model=args.d_model,
      n_layers=args.layers,
      n_heads=args.heads,
      d_mlp=4 * args.d_model,
    )
    row["params"] = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    optimizer = plain_gpt.make_optimizer(LEARNING_RATE)
    step_fn = plain_gpt.make_step(optimizer, n_heads=args.heads, dtype=dtype, remat=args.remat)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq_len + 1), 0, args.vocab)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    holder = [params, optimizer.init(params)]
    xla_gib = _compiled_gib(step_fn.lower(*holder, inputs, targets).compile())

    def train_step():
      holder[0], holder[1], loss = step_fn(*holder, inputs, targets)
      return loss

    timing = common.time_fn(train_step, warmup=2, repeats=args.repeats)
    row.update(_timed(timing, batch * seq_len), xla_gib=xla_gib, loss=float(train_step()))
  except Exception as e:  # out of memory, compilation failure: keep the row, go on
    row["error"] = common.error_text(e)
  return row


def add_ratios(rows: list[dict]) -> None:
  """Sets each row's vs_transformer and vs_plain_gpt: tokens/s over theirs at the same T
  (the unsharded rows'); and a sharded row's vs_unsharded: over its own unsharded row."""
  for column, model in (("vs_transformer", "transformer"), ("vs_plain_gpt", models.PLAIN_GPT)):
    common.add_ratio(
      rows,
      column,
      "tokens_per_s",
      ("T",),
      lambda r, model=model: r["model"] == model and not r.get("mesh"),
    )
  common.add_ratio(
    rows,
    "vs_unsharded",
    "tokens_per_s",
    ("model", "T"),
    lambda r: not r.get("mesh"),
    where=lambda r: r.get("mesh"),
  )


def _summary(row: dict) -> str:
  if "error" in row:
    return f"{row['model']} T={row['T']} B={row['B']}: {row['error']}"
  return (
    f"{row['model']} T={row['T']} B={row['B']}: {row['ms']:.2f} ms, "
    f"{row['tokens_per_s']:.4g} tokens/s, open {row['open_rate']:.3f}, "
    f"compute {row['compute_rate']:.3f}, compile {row['compile_s']:.1f} s"
  )


def plot(rows, path):
  lines = {
    name: [(r["T"], r["tokens_per_s"]) for r in rows if r["model"] == name and "tokens_per_s" in r]
    for name in dict.fromkeys(r["model"] for r in rows)
  }
  common.loglog_plot(
    path,
    lines,
    xlabel="sequence length T (B*T constant)",
    ylabel="training tokens / s",
    title="Training throughput (full optimizer step)",
  )


if __name__ == "__main__":
  main()
