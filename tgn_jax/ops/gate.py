"""The gate between the inertia and geometry channels, and token routing.

A hard gate is 0/1 in the forward pass with a straight-through gradient. The
expensive channel is evaluated only at the tokens that need it: `route` gathers them
into one static capacity per row (padding slots at position 0, the row's count passed
on so that attention skips them), runs the channel there and scatters the result back,
as one straight-line program (no conditional). A row holding more tokens than the
capacity overflows: `route` reports it, and the caller redoes the work at a larger
capacity (`CapacityLadder`), so no selected token is ever dropped from a result that is
used. Capacity 1 (every token) cannot overflow.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any


def hard_gate(prob_BT: Array, *, threshold: float = 0.5, key: Optional[Array] = None) -> Array:
  """The open/closed decision, bool [B, T]: prob > threshold, or Bernoulli(prob) given a key."""
  if key is not None:
    return jax.random.bernoulli(key, prob_BT.astype(jnp.float32))
  return prob_BT > threshold


def exploration_fraction(open_BT: Array, budget: float, floor: float) -> Array:
  """The fraction of closed tokens to explore, float32 scalar: `budget` extra attention
  work relative to the open tokens' (budget * open / closed), at least `floor` of the
  closed tokens (so that a layer with every gate closed can still reopen), at most 1."""
  n_open = jnp.sum(open_BT, dtype=jnp.float32)
  n_closed = jnp.maximum(open_BT.size - n_open, 1.0)
  return jnp.clip(budget * n_open / n_closed, floor, 1.0)


def exploration_mask(closed_BT: Array, fraction, key: Optional[Array]) -> Array:
  """A random `fraction` (a float or a traced scalar) of the closed tokens, bool [B, T];
  none without a key."""
  if key is None or (isinstance(fraction, (int, float)) and fraction <= 0.0):
    return jnp.zeros_like(closed_BT, dtype=bool)
  return closed_BT & jax.random.bernoulli(key, fraction, closed_BT.shape)


def straight_through(prob_BT: Array, open_BT: Array, grad_weight_BT: Array) -> Array:
  """A gate whose value is open_BT (0/1) and whose derivative in prob is grad_weight_BT.

  float32 [B, T]. With weight 1 this is the usual straight-through estimator.
  """
  prob = prob_BT.astype(jnp.float32)
  return open_BT.astype(jnp.float32) + grad_weight_BT * (prob - jax.lax.stop_gradient(prob))


@jax.custom_vjp
def level_free(logit_BT: Array) -> Array:
  """logit_BT unchanged, with its cotangent's mean over the array removed: the gradient
  moves the logits' ranking, not their common level (which a quantile threshold sets)."""
  return logit_BT


def _level_free_fwd(logit_BT):
  return logit_BT, None


def _level_free_bwd(_, cotangent_BT):
  return (cotangent_BT - jnp.mean(cotangent_BT, dtype=jnp.float32).astype(cotangent_BT.dtype),)


level_free.defvjp(_level_free_fwd, _level_free_bwd)


def logit_spread(logit_BT: Array) -> Array:
  """The scale of a layer's gate logits for its straight-through derivative, float32
  scalar without gradient: their standard deviation over the batch, at least 1."""
  spread = jnp.std(logit_BT.astype(jnp.float32))
  return jax.lax.stop_gradient(jnp.maximum(spread, 1.0))


def capacity_tokens(length: int, fraction: float, multiple: int = 1) -> int:
  """Static capacity for `length` tokens: fraction * length rounded up to a multiple of
  `multiple`, at least one multiple, at most `length`."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"capacity fraction must be in (0, 1], got {fraction}")
  return min(length, multiple * max(1, math.ceil(fraction * length / multiple)))


class Slots(NamedTuple):
  """Where the selected tokens of each row sit in a capacity of C slots.

  positions_BC: int32, the selected positions in increasing order; 0 in padding slots.
  lengths_B: int32, slots in use per row (min(count, C)).
  counts_B: int32, tokens selected per row; count > C means the row overflowed and its
    selected tokens after the first C are missing.
  scatter_BC: int32, the positions to scatter slot outputs back to: unique and sorted,
    T + slot in padding slots (out of range, dropped).
  """

  positions_BC: Array
  lengths_B: Array
  counts_B: Array
  scatter_BC: Array


def token_slots(selected_BT: Array, capacity: int) -> Slots:
  """The slots of the selected tokens, by a running count (no sort, no conditional)."""
  batch, seq_len = selected_BT.shape
  rank_BT = jnp.cumsum(selected_BT, axis=1, dtype=jnp.int32) - 1
  counts = rank_BT[:, -1] + 1
  # Unselected and overflowing tokens write to a spare slot C that is cut off.
  slot_BT = jnp.where(selected_BT & (rank_BT < capacity), rank_BT, capacity)
  rows = jnp.arange(batch)[:, None]
  held = (
    jnp.zeros((batch, capacity + 1), jnp.int32)
    .at[rows, slot_BT]
    .set(jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len)))[:, :capacity]
  )
  lengths = jnp.minimum(counts, capacity)
  in_use = jnp.arange(capacity, dtype=jnp.int32)[None, :] < lengths[:, None]
  positions = jnp.where(in_use, held, 0)
  scatter = jnp.where(in_use, held, seq_len + jnp.arange(capacity, dtype=jnp.int32)[None, :])
  return Slots(positions, lengths, counts, scatter)


def route(
  fn: Callable[..., PyTree], selected_BT: Array, operands: PyTree, capacity: int
) -> tuple[PyTree, Array]:
  """Evaluates fn at the selected tokens only; zeros elsewhere.

  Args:
    fn: fn(gathered, positions_BC, lengths_B) -> pytree of [B, C, ...] arrays, where
      `gathered` is `operands` gathered at the selected tokens in increasing position
      order, positions_BC their int32 positions (0 in padding slots) and lengths_B the
      slots in use per row; outputs in padding slots are discarded. fn may close over
      arrays (weights, keys).
    selected_BT: bool [B, T].
    operands: pytree of [B, T, ...] arrays.
    capacity: static number of slots per row, 1 <= C <= T.

  Returns:
    (fn's outputs scattered to [B, T, ...], zero at tokens not computed; counts_B int32,
    the selected tokens per row: a row with count > C overflowed).
  """
  batch, seq_len = selected_BT.shape
  if not 1 <= capacity <= seq_len:
    raise ValueError(f"capacity must be in [1, T={seq_len}], got {capacity}")
  slots = token_slots(selected_BT, capacity)
  rows = jnp.arange(batch)[:, None]
  gathered = jax.tree.map(lambda x: x[rows, slots.positions_BC], operands)
  outputs = fn(gathered, slots.positions_BC, slots.lengths_B)
  scattered = jax.tree.map(
    lambda y: (
      jnp.zeros((batch, seq_len) + y.shape[2:], y.dtype)
      .at[rows, slots.scatter_BC]
      .set(y, mode="drop", indices_are_sorted=True, unique_indices=True)
    ),
    outputs,
  )
  return scattered, slots.counts_B


class RouteReport(NamedTuple):
  """What routing saw: overflow (bool scalar: some row of some segment held more tokens
  than its capacity) and needed (float32 scalar: the largest count of a row in a segment
  as a fraction of the segment's length, i.e. the smallest capacity fraction that fits)."""

  overflow: Array
  needed: Array


def segment_bounds(seq_len: int, segment_len: int) -> list[tuple[int, int]]:
  """[(start, end)] of consecutive segments of at most segment_len tokens."""
  if segment_len < 1:
    raise ValueError(f"segment_len must be positive, got {segment_len}")
  return [(start, min(start + segment_len, seq_len)) for start in range(0, seq_len, segment_len)]


def segment_capacities(
  seq_len: int, fraction: float, segment_len: int, multiple: int = 1
) -> list[tuple[int, int, int]]:
  """[(start, end, capacity)] of the segments routing gathers: each segment's capacity is
  `fraction` of its length rounded up to `multiple` (capacity_tokens)."""
  return [
    (start, end, capacity_tokens(end - start, fraction, multiple))
    for start, end in segment_bounds(seq_len, segment_len)
  ]


def count_report(
  selected_BT: Array, fraction: float, segment_len: int, multiple: int = 1
) -> RouteReport:
  """The RouteReport of routing selected_BT at this capacity fraction, without routing."""
  overflow, needed = jnp.bool_(False), jnp.float32(0.0)
  for start, end, capacity in segment_capacities(
    selected_BT.shape[1], fraction, segment_len, multiple
  ):
    counts = jnp.sum(selected_BT[:, start:end], axis=1, dtype=jnp.int32)
    overflow = overflow | jnp.any(counts > capacity)
    needed = jnp.maximum(needed, jnp.max(counts).astype(jnp.float32) / (end - start))
  return RouteReport(overflow, needed)


def computes_densely(seq_len: int, fraction: float, segment_len: int, multiple: int = 1) -> bool:
  """True when routing at this capacity would hold every token of a (full) segment:
  attention is then cheaper computed densely, and cannot overflow."""
  segment = min(segment_len, seq_len)
  return capacity_tokens(segment, fraction, multiple) >= segment


def gathered_slots(seq_len: int, fraction: float, segment_len: int, multiple: int = 1) -> int:
  """Query slots per row that attention computes at this capacity (seq_len when dense)."""
  if computes_densely(seq_len, fraction, segment_len, multiple):
    return seq_len
  return sum(
    capacity for _, _, capacity in segment_capacities(seq_len, fraction, segment_len, multiple)
  )


def route_causal_segments(
  fn: Callable[..., PyTree],
  selected_BT: Array,
  operands: PyTree,
  fraction: float,
  segment_len: int,
  multiple: int = 1,
) -> tuple[PyTree, RouteReport]:
  """`route` run separately on consecutive segments of the sequence.

  fn(gathered, positions_BC, lengths_B, segment_end) also gets the static end of the
  segment (positions are absolute), so a causal consumer such as attention reads only
  the key prefix [0, segment_end). Each segment's capacity is `fraction` of its length
  rounded up to `multiple` (capacity_tokens). Returns the outputs [B, T, ...] and a
  RouteReport; with overflow set, some selected tokens were not computed.
  """
  outputs = []
  for start, end, capacity in segment_capacities(
    selected_BT.shape[1], fraction, segment_len, multiple
  ):
    # Padding slots sit at the segment's first position: harmless, and never read back.
    segment_fn = lambda x, pos, lengths, start=start, end=end: fn(x, pos + start, lengths, end)
    out, _ = route(
      segment_fn,
      selected_BT[:, start:end],
      jax.tree.map(lambda x: x[:, start:end], operands),
      capacity,
    )
    outputs.append(out)
  outputs = jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=1), *outputs)
  return outputs, count_report(selected_BT, fraction, segment_len, multiple)


def distinct_fractions(
  fractions: Sequence[float], seq_len: int, segment_len: int, multiple: int = 1
) -> tuple[float, ...]:
  """The capacity fractions that give different programs at this length: of fractions
  with equal slot counts the largest (it holds the most), and 1.0 for every fraction
  that computes densely."""
  by_slots: dict[int, float] = {}
  for f in sorted(fractions):
    if not computes_densely(seq_len, f, segment_len, multiple):
      by_slots[gathered_slots(seq_len, f, segment_len, multiple)] = f
  return tuple(sorted(by_slots.values())) + (1.0,)


class CapacityLadder:
  """Host-side choice of the static routing capacity, so that no token is ever dropped.

  The capacities are `fractions` (increasing, ending with 1.0: every token, which never
  overflows), each compiled once when first used. After each call, `observe(overflow,
  needed)` sets `current` to the smallest fraction holding (1 + headroom) times the
  largest need of the last `window` calls: it moves up at once and down only after a
  window of calls that fit lower, so it rarely changes. It returns True if the call
  overflowed: its result must be discarded and the call redone at `current`. After an
  overflow `current` is always larger than before (a need reported by an overflowing
  call can be off for what came after the overflow, e.g. later layers), so redoing ends,
  at 1.0 at the latest.
  """

  WINDOW = 50

  def __init__(
    self,
    fractions: Sequence[float],
    *,
    headroom: float = 0.1,
    window: int = WINDOW,
    recent: Sequence[float] = (),
  ):
    """recent: needs of earlier calls, oldest first (a ladder's `recent`, to resume it;
    negative or non-finite values are padding and skipped)."""
    fractions = tuple(float(f) for f in fractions)
    if (
      not fractions
      or fractions[-1] != 1.0
      or list(fractions) != sorted(set(fractions))
      or (fractions[0] <= 0.0)
    ):
      raise ValueError(f"fractions must increase in (0, 1] and end with 1.0, got {fractions}")
    if not headroom >= 0.0:
      raise ValueError(f"headroom must be >= 0, got {headroom}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
      raise ValueError(f"window must be a positive integer, got {window!r}")
    self.fractions = fractions
    self.headroom = headroom
    self._recent: collections.deque = collections.deque(
      (float(x) for x in recent if math.isfinite(x) and x >= 0), maxlen=window
    )
    self.current = self._choose()

  @property
  def recent(self) -> tuple[float, ...]:
    """The needs the ladder remembers, oldest first."""
    return tuple(self._recent)

  def _choose(self) -> float:
    """1.0 until a need is known, then the fraction holding the window's largest."""
    if not self._recent:
      return 1.0
    return self.fit(max(self._recent) * (1.0 + self.headroom))

  def fit(self, needed: float) -> float:
    """The smallest fraction >= needed (1.0 if none is smaller)."""
    return next((f for f in self.fractions if f >= needed), 1.0)

  def observe(self, overflow, needed) -> bool:
    """Updates `current` from a call's overflow flag and needed fraction; True if the
    call overflowed (redo it)."""
    before = self.current
    self._recent.append(float(needed))
    self.current = self._choose()
    if bool(overflow) and self.current <= before:
      self.current = next((f for f in self.fractions if f > before), 1.0)
    return bool(overflow)


def oracle_gate(scored_BT: Array, n_layers: int) -> Array:
  """The least attention that solves a recall task: open exactly at the scored positions
  (the queries) in the last layer, closed everywhere else. bool [L, B, T]."""
  scored = jnp.asarray(scored_BT) > 0
  closed = jnp.zeros((n_layers - 1,) + scored.shape, bool)
  return jnp.concatenate([closed, scored[None]], axis=0)


def random_gate(key: Array, rates_L: Array, shape_BT: tuple[int, int]) -> Array:
  """Bernoulli(rate of each layer) at every token, independently: bool [L, B, T]."""
  rates_L = jnp.asarray(rates_L, jnp.float32)
  return jax.random.uniform(key, (rates_L.shape[0],) + tuple(shape_BT)) < rates_L[:, None, None]
