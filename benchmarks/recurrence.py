"""The inertia channel's cost: minGRU (parallel scan) against a plain diagonal linear
recurrence under associative_scan, the GRU under lax.scan, and minGRU's sequential form.

Forward + backward at B=8, T=4096, D=1024 (float32 state), medians.

  python benchmarks/recurrence.py
  python benchmarks/recurrence.py --tiny
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common
from tgn_jax.ops import recurrence as rec

COLUMNS = ["recurrence", "fwd_ms", "fwd_bwd_ms", "fwd_bwd_vs_reference", "mtok_per_s_fwd"]
REFERENCE = "diagonal associative_scan (reference)"


def diagonal_scan(a, b):
  """The reference: h_t = a_t h_{t-1} + b_t with jax.lax.associative_scan, nothing else."""

  def combine(left, right):
    return left[0] * right[0], right[0] * left[1] + right[1]

  return jax.lax.associative_scan(combine, (a, b), axis=1)[1]


def main(argv=None):
  parser = common.base_parser(__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=4096)
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args(argv)
  if args.tiny:
    args.batch, args.seq_len, args.width, args.repeats = 2, 64, 16, 2
  b, t, d = args.batch, args.seq_len, args.width
  keys = jax.random.split(jax.random.key(0), 4)
  x1, x2 = (jax.random.normal(k, (b, t, d), jnp.float32) for k in keys[:2])
  w_hh = jax.random.normal(keys[2], (d, 3 * d), jnp.float32) / d**0.5
  x3 = jax.random.normal(keys[3], (b, t, 3 * d), jnp.float32)
  a = jax.nn.sigmoid(x1)

  cases = {
    REFERENCE: (lambda a, b: diagonal_scan(a, b), (a, x2)),
    "minGRU parallel (tgn_jax default)": (lambda g, c: rec.min_gru(g, c), (x1, x2)),
    "minGRU sequential (lax.scan)": (lambda g, c: rec.min_gru(g, c, parallel=False), (x1, x2)),
    "GRU lax.scan": (lambda xp, w: rec.gru(xp, w, jnp.zeros(3 * d)), (x3, w_hh)),
  }
  rows = []
  for name, (fn, inputs) in cases.items():
    fwd = jax.jit(fn)
    fwd_bwd = jax.jit(
      jax.grad(lambda *xs: jnp.sum(fn(*xs) ** 2), argnums=tuple(range(len(inputs))))
    )
    f = common.time_fn(lambda: fwd(*inputs), repeats=args.repeats)
    fb = common.time_fn(lambda: fwd_bwd(*inputs), repeats=args.repeats)
    rows.append(
      dict(
        recurrence=name,
        fwd_ms=f["median_ms"],
        fwd_bwd_ms=fb["median_ms"],
        mtok_per_s_fwd=b * t / f["median_ms"] / 1e3,
      )
    )
    print(rows[-1], flush=True)
  common.add_ratio(
    rows, "fwd_bwd_vs_reference", "fwd_bwd_ms", (), lambda r: r["recurrence"] == REFERENCE
  )
  common.print_table(rows, COLUMNS)
  return common.finish(
    "recurrence", args, {"rows": rows}, config={"B": b, "T": t, "D": d, "dtype": "float32"}
  )


if __name__ == "__main__":
  main()
