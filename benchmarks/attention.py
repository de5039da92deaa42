"""Gated attention against dense causal attention, forward + backward.

For each sequence length T (batch B so that B*T is constant) and open rate r, a random
r-fraction of the tokens is open; the gated path computes attention only for them
(`route_causal_segments`: gather per segment into one static capacity, the one a
CapacityLadder picks for this selection, with each row's count as its query length, keys
up to the segment's end) and the dense path is causal attention over every token. Keys
and values are full-length in both. Reported: median time, fraction of dense, the ideal
(= r), the capacity and the query slots gathered per token.

  python benchmarks/attention.py                    # GPU, bf16, cuDNN
  python benchmarks/attention.py --tiny             # CPU smoke run
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common, gate_control
from tgn_jax.config import TGNConfig
from tgn_jax.ops.attention import gibbs_attention
from tgn_jax.ops.gate import CapacityLadder, count_report, distinct_fractions, route_causal_segments

COLUMNS = "T B path impl rate segment capacity gathered ms fraction ideal error".split()


def make_inputs(key, batch, seq_len, heads, head_dim, rate, dtype):
  kq, kk, kv, kg, kw = jax.random.split(key, 5)
  shape = (batch, seq_len, heads, head_dim)
  q, k, v, w = (jax.random.normal(x, shape, dtype) for x in (kq, kk, kv, kw))
  selected = jax.random.bernoulli(kg, rate, (batch, seq_len))
  return q, k, v, w, selected


def dense_loss(q, k, v, w, selected, *, impl):
  del selected
  return jnp.sum((gibbs_attention(q, k, v, implementation=impl) * w).astype(jnp.float32))


def gated_loss(q, k, v, w, selected, *, impl, segment_len, multiple, capacity):
  def attend(q_BC, pos_BC, lengths_B, end):
    return gibbs_attention(
      q_BC, k[:, :end], v[:, :end], q_positions=pos_BC, q_lengths=lengths_B, implementation=impl
    )

  out, _ = route_causal_segments(attend, selected, q, capacity, segment_len, multiple)
  return jnp.sum((out * w).astype(jnp.float32))


def ladder_capacity(selected, seq_len: int, segment_len: int, multiple: int) -> float:
  """The capacity a CapacityLadder settles on for this selection (library defaults)."""
  # The dataclass field's default, as a class attribute: no config is built.
  ladder = CapacityLadder(
    distinct_fractions(TGNConfig.capacity_buckets, seq_len, segment_len, multiple)
  )
  report = count_report(selected, 1.0, segment_len, multiple)
  ladder.observe(False, float(report.needed))
  return ladder.current


def main(argv=None):
  parser = common.base_parser(__doc__.splitlines()[0])
  parser.add_argument("--seq_lens", type=common.int_list, default=[2048, 8192, 32768])
  parser.add_argument("--rates", type=common.float_list, default=[0.05, 0.1, 0.25, 0.5, 1.0])
  parser.add_argument("--tokens_per_batch", type=int, default=65536, help="B*T")
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument(
    "--segment_lens",
    type=common.int_list,
    default=[1024, 2048, 0],
    help="gather segment lengths; 0 = one segment (the whole sequence)",
  )
  parser.add_argument(
    "--impls",
    type=lambda s: s.split(","),
    default=[None],
    help="comma-separated gathered-attention routes to compare side by side: "
    "cudnn (position mask as a dense bias), pallas (tgn_jax.ops.flash), "
    "xla; default: the library's choice (dense rows always use it)",
  )
  parser.add_argument(
    "--multiple",
    type=int,
    default=TGNConfig.capacity_multiple,
    help="capacities rounded up to this multiple",
  )
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args(argv)
  dtype = jnp.bfloat16
  if args.tiny:
    args.seq_lens, args.rates, args.tokens_per_batch = [64], [0.1], 128
    args.heads, args.head_dim, args.segment_lens, args.repeats = 2, 16, [16, 0], 2
    args.multiple = 8
    dtype = jnp.float32

  rows = []
  for seq_len in args.seq_lens:
    batch = max(1, args.tokens_per_batch // seq_len)
    grad = lambda loss: jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    dense_step = grad(functools.partial(dense_loss, impl=None))
    inputs = make_inputs(jax.random.key(0), batch, seq_len, args.heads, args.head_dim, 1.0, dtype)
    dense = common.time_fn(lambda: dense_step(*inputs), repeats=args.repeats)
    rows.append(
      dict(
        T=seq_len,
        B=batch,
        rate=1.0,
        path="dense",
        segment=None,
        ms=dense["median_ms"],
        ideal=1.0,
        **_extra(dense),
      )
    )
    _add_fraction(rows)
    print(f"T={seq_len} B={batch} dense {dense['median_ms']:.3f} ms", flush=True)
    for rate in args.rates:
      inputs = make_inputs(
        jax.random.key(1), batch, seq_len, args.heads, args.head_dim, rate, dtype
      )
      for segment_len in args.segment_lens:
        segment = segment_len or seq_len
        if segment > seq_len and segment_len:
          continue
        capacity = ladder_capacity(inputs[4], seq_len, segment, args.multiple)
        gathered = gate_control.gathered_fraction(seq_len, capacity, segment, args.multiple)
        for impl in args.impls:
          step = grad(
            functools.partial(
              gated_loss, impl=impl, segment_len=segment, multiple=args.multiple, capacity=capacity
            )
          )
          point = dict(T=seq_len, B=batch, rate=rate, path="gated", impl=impl, segment=segment)
          try:
            timing = common.time_fn(lambda: step(*inputs), repeats=args.repeats)
          except Exception as e:  # an unsupported shape for this route: keep going
            rows.append(dict(point, error=common.error_text(e)))
            print(f"  rate={rate} segment={segment} {impl}: {rows[-1]['error']}", flush=True)
            continue
          rows.append(
            dict(
              point,
              capacity=capacity,
              gathered=gathered,
              ms=timing["median_ms"],
              ideal=rate,
              **_extra(timing),
            )
          )
          _add_fraction(rows)
          print(
            f"  rate={rate} segment={segment} {impl or 'default'} capacity={capacity} "
            f"(gathered {gathered:.3f}): {timing['median_ms']:.3f} ms = "
            f"{rows[-1]['fraction']:.3f} x dense",
            flush=True,
          )
          common.save_partial("attention", args, rows)

  common.print_table(rows, COLUMNS)
  config = {
    "heads": args.heads,
    "head_dim": args.head_dim,
    "dtype": jnp.dtype(dtype).name,
    "impls": args.impls,
    "tokens_per_batch": args.tokens_per_batch,
    "measure": "forward+backward (grad wrt q, k, v), median",
  }
  return common.finish("attention", args, {"rows": rows}, lambda png: plot(rows, png), config)


def _add_fraction(rows):
  """Sets each row's fraction: its time over the dense row's at the same T."""
  common.add_ratio(rows, "fraction", "ms", ("T",), lambda r: r["path"] == "dense")


def _extra(timing):
  return {"min_ms": timing["min_ms"], "compile_ms": timing["compile_ms"]}


def plot(rows, path):
  gated = [r for r in rows if r["path"] == "gated" and "ms" in r]
  lines = {
    f"T={seq_len}, segment {segment}, {impl or 'default'}": [
      (r["rate"], r["fraction"])
      for r in gated
      if (r["T"], r["segment"], r["impl"] or "") == (seq_len, segment, impl)
    ]
    for seq_len, segment, impl in sorted({(r["T"], r["segment"], r["impl"] or "") for r in gated})
  }
  rates = sorted({r["rate"] for r in rows})
  with common.figure(path) as fig:
    ax = fig.add_subplot()
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.plot(rates, rates, "k--", label="ideal (= open rate)")
    common.plot_lines(
      ax,
      lines,
      xlabel="open rate",
      ylabel="time / dense causal attention",
      title="Gated attention, forward + backward",
    )


if __name__ == "__main__":
  main()
