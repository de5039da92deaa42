"""The benchmarked models, each name defined once.

tgn              TGN, hard gate, its open rate set in training by the thermostat
tgn-hard-0.10    TGN, minGRU, hard gate with its open rate held at 0.10 (gate_control)
tgn-hard-0.25    the same at 0.25
tgn-kvopen-0.10  tgn-hard-0.10 with kv="open" (closed tokens write no key/value)
tgn-soft-gru     TGN, GRU, soft gate (reference-style: attention everywhere; see README)
transformer      attention only
recurrent        minGRU only
plain-gpt        the Transformer's shape in pure jax + optax (benchmarks/plain_gpt.py)
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Model:
  """fields: TGNConfig / TrainConfig fields (None: not a library model). open_rate: the
  hard gate's open rate held by calibrating its bias. thermostat: trained with the
  thermostat at the benchmark's target rate (the others train without one)."""

  fields: dict[str, Any] | None
  open_rate: float | None = None
  thermostat: bool = False


PLAIN_GPT = "plain-gpt"
MODELS: dict[str, Model] = {
  "tgn": Model(dict(mixer="tgn", gate="hard"), thermostat=True),
  "tgn-hard-0.10": Model(dict(mixer="tgn", recurrence="mingru", gate="hard"), open_rate=0.10),
  "tgn-hard-0.25": Model(dict(mixer="tgn", recurrence="mingru", gate="hard"), open_rate=0.25),
  "tgn-kvopen-0.10": Model(
    dict(mixer="tgn", recurrence="mingru", gate="hard", kv="open"), open_rate=0.10
  ),
  "tgn-soft-gru": Model(dict(mixer="tgn", recurrence="gru", gate="soft")),
  "transformer": Model(dict(mixer="attention")),
  "recurrent": Model(dict(mixer="recurrent", recurrence="mingru")),
  PLAIN_GPT: Model(None),
}
# What the speed benchmarks time (open rates held) and the quality benchmarks train.
TIMED = (
  "tgn-hard-0.10",
  "tgn-hard-0.25",
  "tgn-kvopen-0.10",
  "tgn-soft-gru",
  "transformer",
  "recurrent",
  PLAIN_GPT,
)
TRAINED = ("tgn", "transformer", "recurrent")


def architecture(name: str) -> dict[str, Any]:
  """The config fields of library model `name`."""
  fields = MODELS[name].fields
  if fields is None:
    raise ValueError(f"{name} is not a library model")
  return dict(fields)


def train_options(name: str) -> dict[str, Any]:
  """train.py options of model `name`: its fields, and no thermostat unless it has one."""
  return architecture(name) | ({} if MODELS[name].thermostat else {"target_rate": None})


def describe(name: str) -> dict[str, Any] | str:
  """Model `name` as result files record it: its fields and held open rate."""
  model = MODELS[name]
  if model.fields is None:
    return "pure jax + optax"
  return {**model.fields, "open_rate": model.open_rate}


def add_option(parser: argparse.ArgumentParser, choices: Sequence[str]) -> None:
  """--models: a comma-separated subset of `choices` (all by default)."""

  def subset(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in choices]
    if unknown:
      raise argparse.ArgumentTypeError(
        f"unknown model {unknown[0]!r}; choose from {', '.join(choices)}"
      )
    return names

  parser.add_argument(
    "--models",
    type=subset,
    default=list(choices),
    help=f"comma-separated subset of {', '.join(choices)}",
  )


# The size options' values for a --tiny run (CPU).
TINY_SIZE = dict(layers=2, d_model=32, heads=2, vocab=64, dtype="float32")


def size_config(args) -> dict:
  """The size options as a result file's config records them."""
  names = ("layers", "d_model", "heads", "vocab", "dtype")
  return {name: getattr(args, name) for name in names}


def add_size_options(parser: argparse.ArgumentParser) -> None:
  """--layers, --d_model, --heads, --vocab, --dtype and --attention_impl of the timed
  library models (default: GPT-2 small's shape, bf16 compute)."""
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--d_model", type=int, default=768)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--vocab", type=int, default=50304)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument(
    "--attention_impl",
    default=None,
    choices=["xla", "cudnn", "pallas"],
    help="attention implementation of the library's models (default: TGNConfig's, cuDNN on GPU)",
  )
