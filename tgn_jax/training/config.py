"""Training configuration: nested sections, named presets, one-line errors naming the flag.

A TrainConfig has five sections: `task` (what to learn), `model` (TGNConfig fields: the model
is `TGNConfig(vocab_size=<task's>, max_seq_len=<task's>, **model)`), `optimizer`, `thermostat`
(the free energy's temperature) and `run` (length, logging, checkpoints, devices). Every field
has a flag `--section.field`; the flat spellings of earlier versions (`--d_model`, `--lr`,
`--steps`) are aliases of the same flags.

Resolution order for every field: dataclass default < the task's preset < config file <
command line. Only the fields a source actually sets override the ones before it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

from tgn_jax.config import ConfigFieldError, TGNConfig

TASKS = ("mqar", "modadd", "text")


class ConfigError(ValueError):
  """A usage or configuration error; the message is one line naming the problem."""


def _field(default, help: str, **kw):
  return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  name: str = _field("mqar", "task: mqar | modadd | text", choices=TASKS)
  batch_size: int = _field(64, "sequences per step (modadd: full batch, ignored)")
  seq_len: int = _field(32, "sequence length (mqar, text)")
  vocab_size: int = _field(64, "mqar vocabulary size (keys: first half, values: second)")
  num_kv: int = _field(4, "mqar key-value pairs per sequence")
  power_a: float = _field(0.01, "mqar power-law exponent of query spacing")
  fillers: str = _field(
    "random",
    "mqar tokens between the queries: random (any token) | zero "
    "(token 0, as in the Zoology paper's grid)",
    choices=("random", "zero"),
  )
  eval_examples: int = _field(1000, "mqar held-out sequences")
  p: int = _field(113, "modadd modulus")
  train_fraction: float = _field(0.3, "modadd fraction of the p*p pairs used for training")
  data: Optional[str] = _field(None, "text file or directory (default: Python's stdlib sources)")
  val_fraction: float = _field(0.1, "text validation fraction (by file)")
  eval_batches: int = _field(8, "text validation batches per eval")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  lr: float = _field(3e-3, "peak learning rate")
  warmup_steps: int = _field(100, "linear learning-rate warm-up steps")
  min_lr_ratio: float = _field(0.1, "final learning rate / peak (cosine decay)")
  weight_decay: float = _field(0.1, "AdamW weight decay")
  b1: float = _field(0.9, "Adam beta1")
  b2: float = _field(0.99, "Adam beta2")
  clip_norm: Optional[float] = _field(1.0, "global gradient-norm clip (none: no clipping)")


@dataclasses.dataclass(frozen=True)
class ThermostatConfig:
  lam: float = _field(
    0.0,
    "temperature lambda of the free energy (fixed, or the thermostat's initial value with "
    "--control lambda)",
  )
  target_rate: Optional[float] = _field(
    0.25, "hard open-rate target that --control holds (none: no control, fixed lambda)"
  )
  lam_lr: float = _field(0.05, "thermostat gain: lambda *= exp(lam_lr * (rate - target))")
  lam_min: float = _field(0.01, "thermostat floor for lambda while it is being adjusted")
  lam_warmup: Optional[int] = _field(
    None,
    "steps before lambda and the rate control act, then lambda ramps in linearly over as many "
    "again (default: steps // 3)",
  )
  soft_warmup: Optional[int] = _field(
    None,
    "hard gate: steps trained first with the soft gate (dense attention) so that both "
    "channels learn before the gate hardens (default: the lambda warm-up)",
  )
  control: str = _field(
    "quantile",
    "what holds the open rate at target_rate (none: nothing, lambda fixed): lambda (the "
    "thermostat adjusts lambda) | quantile (the gate thresholds follow a moving quantile of "
    "the gate logits over past batches; the thermostat's lambda prices their drift)",
    choices=("lambda", "quantile"),
  )
  quantile_rate: float = _field(
    0.5, "quantile control: each step moves a layer's threshold this fraction of the way"
  )
  quantile_rate_end: Optional[float] = _field(
    None,
    "quantile control: the fraction at the last step, reached from quantile_rate by a cosine "
    "decay from the step the control begins, so that the thresholds average over more batches "
    "as training settles (none: quantile_rate throughout)",
  )
  quantile_scope: str = _field(
    "model",
    "quantile control: layer (each layer holds the target rate) | model (one quantile over "
    "all layers' gates: the mean rate is held, layers may differ) | last (the last layer "
    "holds the whole budget, target * n_layers of its tokens; the layers before it are shut) "
    "| sticky (as model, but a layer that opens none of a batch's tokens has its threshold "
    "drawn towards shut, see hold_steps)",
    choices=("layer", "model", "last", "sticky"),
  )
  hold_steps: int = _field(
    100,
    "quantile scope sticky: a layer that opens no token of a batch has its threshold drawn "
    "1/hold_steps of the way from the pooled one towards shut (as under last: the widest "
    "range of any layer's logits in the batch above its largest), so that a layer left "
    "empty for many steps is held shut and one empty for a few is not",
  )
  harden: int = _field(
    0,
    "hard gate: steps after the soft warm-up over which the soft gate's sigmoid "
    "temperature is annealed from 1 to harden_temperature before the gate hardens",
  )
  harden_temperature: float = _field(
    0.05, "the soft gate's sigmoid temperature at the end of the hardening anneal"
  )


@dataclasses.dataclass(frozen=True)
class AblationConfig:
  reference_gate: Optional[str] = _field(
    None,
    "replace the learned hard gate: oracle (open at the scored positions in the last "
    "layer, closed elsewhere) | random (Bernoulli at --reference_rates)",
    choices=(None, "oracle", "random"),
  )
  reference_rates: Optional[tuple[float, ...]] = _field(
    None, "random reference gate: open rate per layer (comma-separated; one value: every layer)"
  )


@dataclasses.dataclass(frozen=True)
class RunConfig:
  steps: int = _field(1200, "optimizer steps")
  out: Optional[str] = _field(
    None, "run directory (metrics, summary, plots, checkpoints; default: runs/TASK-DATE-TIME)"
  )
  seed: int = _field(0, "seed for initialisation, data order and gate randomness")
  resume: bool = _field(False, "continue the run in --out from its latest checkpoint")
  on_nonfinite: str = _field(
    "skip", "non-finite gradients: skip the update | stop the run", choices=("skip", "stop")
  )
  max_nonfinite: int = _field(20, "consecutive skipped updates after which the run stops")
  log_every: int = _field(10, "steps between metric records")
  eval_every: int = _field(250, "steps between evaluations")
  stop_accuracy: Optional[float] = _field(
    None,
    "stop once the held-out accuracy has stayed at or above this for --run.stop_patience "
    "steps (checked at each evaluation; mqar, modadd)",
  )
  stop_patience: int = _field(
    0, "steps the held-out accuracy must hold --run.stop_accuracy before the run stops"
  )
  checkpoint_every: int = _field(250, "steps between checkpoints")
  keep_checkpoints: int = _field(3, "checkpoints kept")
  progress: bool = _field(True, "show a progress bar")
  plots: bool = _field(True, "write plots/*.png at the end of the run")
  mesh: Optional[str] = _field(
    None,
    "device mesh data:D,fsdp:F: the batch over both axes, parameters and optimiser "
    "state sharded over fsdp (default: every device on data)",
  )
  coordinator: Optional[str] = _field(
    None,
    "several hosts: HOST:PORT of process 0 (with --num_processes and --process_id; "
    "without the three, jax's own detection on a known cluster)",
  )
  num_processes: Optional[int] = _field(None, "several hosts: how many processes")
  process_id: Optional[int] = _field(None, "several hosts: this process's index, 0 .. N-1")


# One line of help per TGNConfig field that a training run sets (vocab_size and max_seq_len
# come from the task); tgn_jax.config.TGNConfig documents them in full.
MODEL_HELP = {
  "d_model": "model width",
  "n_layers": "layers",
  "n_heads": "attention heads",
  "n_kv_heads": "key-value heads (grouped-query attention; default: n_heads)",
  "d_mlp": "MLP width (default 4 * d_model)",
  "mixer": "tgn | attention | recurrent",
  "recurrence": "mingru | gru",
  "gate": "soft | hard | open | closed",
  "gate_threshold": "hard gate: open where the gate probability exceeds this",
  "gate_sampling": "Bernoulli-sample the hard gate in training",
  "gate_hidden": "gate MLP width (default max(8, d_model // 4))",
  "gate_input": "what the gate reads: recurrence (its output) | both (also the block input)",
  "gate_gradient": "hard gate's straight-through derivative: sigmoid | spread (of "
  "sigmoid(logit / the batch's logit std), so a saturated gate still learns)",
  "center_gate_gradient": "remove the batch mean of the hard gate's logit gradient, per "
  "layer (quantile control only: its threshold sets the logits' level)",
  "gate_bias_init": "initial gate logit bias (0: open probability 1/2)",
  "attention_execution": "sparse | dense (default: sparse for the hard gate)",
  "kv": "keys and values: all (every token) | open (open tokens only)",
  "capacity_buckets": "routing capacities, comma-separated increasing fractions ending in 1",
  "segment_len": "sparse attention gather segment length",
  "capacity_multiple": "routing capacities are rounded up to a multiple of this",
  "temperature": "attention temperature: a number, 'learned' or none (sqrt(head_dim))",
  "exploration": "closed-gate attention computed for the gate gradient, as a fraction of "
  "the open tokens' attention work",
  "exploration_floor": "fraction of closed-gate tokens explored at least",
  "rope": "rotary position embeddings",
  "rope_base": "rotary embedding base",
  "learned_positions": "add learned position embeddings to the token embeddings",
  "norm": "rms (RMSNorm before each sub-layer and the head) | none",
  "mlp_activation": "gelu | relu",
  "attention_impl": "xla | cudnn | pallas (default: cuDNN on GPU in 16 bits, else XLA)",
  "dtype": "compute dtype: float32 | bfloat16 | float16",
  "param_dtype": "parameter dtype: float32 | bfloat16 | float16",
  "remat": "rematerialise each layer in the backward pass",
}
MODEL_FROM_TASK = ("vocab_size", "max_seq_len")
MODEL_FIELDS = {f.name: f for f in dataclasses.fields(TGNConfig) if f.name not in MODEL_FROM_TASK}

SECTIONS: dict[str, type] = {
  "task": TaskConfig,
  "optimizer": OptimizerConfig,
  "thermostat": ThermostatConfig,
  "ablation": AblationConfig,
  "run": RunConfig,
}


@dataclasses.dataclass(frozen=True)
class Option:
  """One setting: its dotted path, type, default, help, choices and flat alias (if any)."""

  path: str
  kind: Any
  default: Any
  help: str
  choices: Optional[tuple] = None
  alias: Optional[str] = None

  @property
  def flag(self) -> str:
    """The spelling errors name: the flat alias where one exists (the one users know)."""
    return f"--{self.alias or self.path}"


def _options() -> dict[str, Option]:
  options: dict[str, Option] = {}
  flat_model = {
    "d_model",
    "n_layers",
    "n_heads",
    "d_mlp",
    "mixer",
    "recurrence",
    "gate",
    "attention_execution",
    "kv",
    "temperature",
    "exploration",
    "exploration_floor",
    "gate_bias_init",
    "gate_sampling",
    "segment_len",
    "capacity_multiple",
    "dtype",
    "remat",
  }
  for section in ("task", "model", "optimizer", "thermostat", "ablation", "run"):
    if section == "model":
      hints = typing.get_type_hints(TGNConfig)
      for name, f in MODEL_FIELDS.items():
        options[f"model.{name}"] = Option(
          f"model.{name}",
          hints[name],
          f.default,
          MODEL_HELP[name],
          _literal_choices(hints[name]),
          name if name in flat_model else None,
        )
      continue
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
      alias = "task" if (section, f.name) == ("task", "name") else f.name
      options[f"{section}.{f.name}"] = Option(
        f"{section}.{f.name}",
        hints[f.name],
        f.default,
        f.metadata["help"],
        f.metadata.get("choices"),
        alias,
      )
  return options


def _literal_choices(kind) -> Optional[tuple]:
  args = [a for a in typing.get_args(kind) if a is not type(None)]
  if typing.get_origin(kind) is Literal:
    return tuple(typing.get_args(kind))
  if len(args) == 1 and typing.get_origin(args[0]) is Literal:
    return typing.get_args(args[0])
  return None


OPTIONS: dict[str, Option] = _options()
ALIASES: dict[str, str] = {o.alias: o.path for o in OPTIONS.values() if o.alias}


def flag(path: str) -> str:
  return OPTIONS[path].flag


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  task: TaskConfig = TaskConfig()
  model: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # TGNConfig overrides
  optimizer: OptimizerConfig = OptimizerConfig()
  thermostat: ThermostatConfig = ThermostatConfig()
  ablation: AblationConfig = AblationConfig()
  run: RunConfig = RunConfig()

  def model_config(self, vocab_size: int, max_seq_len: int) -> TGNConfig:
    """The model this run trains, for a task of `vocab_size` tokens and `max_seq_len`."""
    return TGNConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, **self.model)

  def model_value(self, name: str) -> Any:
    """A model field as the run sets it (its override, else TGNConfig's default)."""
    return self.model.get(name, MODEL_FIELDS[name].default)

  @property
  def lam_warmup_steps(self) -> int:
    warmup = self.thermostat.lam_warmup
    return self.run.steps // 3 if warmup is None else warmup

  @property
  def soft_warmup_steps(self) -> int:
    """Steps trained with the soft gate before it hardens (the anneal included)."""
    if self.model_value("mixer") != "tgn" or self.model_value("gate") != "hard":
      return 0
    warmup = self.thermostat.soft_warmup
    return (self.lam_warmup_steps if warmup is None else warmup) + self.thermostat.harden

  def replace(self, **dotted: Any) -> "TrainConfig":
    """A copy with fields changed, named by dotted path or flat alias: replace(**{"run.out": x})."""
    return from_dict(_merge(self.to_dict(), nest(dotted)))

  def to_dict(self) -> dict[str, Any]:
    """Nested plain values (JSON-ready): the shape of a --config file and of config.json."""
    out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
    out["model"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.model.items()}
    return out


# Settings that make each task train sensibly out of the box (nested, like a --config file).
PRESETS: dict[str, dict[str, Any]] = {
  # Absolute positions let the gate tell a query that directly follows the key-value context
  # from a key of the context (both are a key token after a value token).
  "mqar": {"model": dict(d_model=64, n_layers=2, n_heads=2, learned_positions=True)},
  # Nanda et al. 2023, "Progress measures for grokking": p = 113, one layer, d_model 128, 4
  # heads, d_mlp 512, ReLU, no normalisation, learned positions, no gradient clipping, AdamW
  # lr 1e-3, weight decay 1, betas (0.9, 0.98), full batch, 30% of the pairs for training,
  # loss on the last position (the task's mask).
  "modadd": {
    "task": dict(name="modadd", p=113, train_fraction=0.3),
    "model": dict(
      d_model=128,
      n_layers=1,
      n_heads=4,
      d_mlp=512,
      mixer="attention",
      mlp_activation="relu",
      norm="none",
      rope=False,
      learned_positions=True,
    ),
    "optimizer": dict(
      lr=1e-3, weight_decay=1.0, b1=0.9, b2=0.98, clip_norm=None, warmup_steps=10, min_lr_ratio=1.0
    ),
    "thermostat": dict(target_rate=None),
    "run": dict(steps=20000, eval_every=100, checkpoint_every=1000, log_every=50),
  },
  "text": {
    "task": dict(name="text", seq_len=256, batch_size=16),
    "model": dict(d_model=128, n_layers=2, n_heads=4),
    "optimizer": dict(lr=2e-3),
    "thermostat": dict(target_rate=0.1),
    "run": dict(steps=2000, eval_every=250),
  },
}


def nest(values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """{dotted path or flat alias or section: value} -> {section: {field: value}}.

  Raises ConfigError naming the first unknown key.
  """
  out: dict[str, dict[str, Any]] = {}
  for key, value in values.items():
    if key in ("model",) + tuple(SECTIONS) and isinstance(value, Mapping):
      for name, inner in value.items():
        path = f"{key}.{name}"
        if path not in OPTIONS:
          raise ConfigError(f"unknown option {path!r}")
        out.setdefault(key, {})[name] = inner
      continue
    path = ALIASES.get(key, key)
    if path not in OPTIONS:
      raise ConfigError(f"unknown option {key!r}")
    section, name = path.split(".", 1)
    out.setdefault(section, {})[name] = value
  return out


def flatten(nested: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """{section: {field: value}} -> {dotted path: value}."""
  return {
    f"{section}.{name}": value
    for section, fields in nested.items()
    for name, value in fields.items()
  }


def _merge(
  base: dict[str, dict[str, Any]], changes: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
  out = {section: dict(fields) for section, fields in base.items()}
  for section, fields in changes.items():
    out.setdefault(section, {}).update(fields)
  return out


def from_dict(nested: Mapping[str, Mapping[str, Any]]) -> TrainConfig:
  """A validated TrainConfig from nested values (missing fields take their defaults)."""
  nested = nest(nested)  # checks the names
  model = dict(nested.get("model", {}))
  if isinstance(model.get("capacity_buckets"), list):
    model["capacity_buckets"] = tuple(model["capacity_buckets"])
  ablation = dict(nested.get("ablation", {}))
  if isinstance(ablation.get("reference_rates"), (list, int, float)):
    rates = ablation["reference_rates"]
    ablation["reference_rates"] = tuple(rates) if isinstance(rates, list) else (float(rates),)
  nested = {**nested, "ablation": ablation}
  config = TrainConfig(
    model=model, **{name: cls(**nested.get(name, {})) for name, cls in SECTIONS.items()}
  )
  validate(config)
  return config


def resolve(
  explicit: Mapping[str, Any],
  config_file: Optional[str] = None,
  base: Optional[Mapping[str, Any]] = None,
) -> TrainConfig:
  """Builds a validated TrainConfig.

  explicit: values set on the command line, by dotted path (`model.d_model`), flat alias
  (`d_model`) or section (`{"model": {...}}`). config_file: a JSON object of the same shape.
  base: a stored run's config (for --resume), which replaces defaults and presets.
  """
  explicit = nest(explicit)
  from_file = _load_config_file(config_file) if config_file else {}
  if base is not None:
    values = nest(base)
  else:
    task = explicit.get("task", {}).get(
      "name", from_file.get("task", {}).get("name", TaskConfig.name)
    )
    if task not in TASKS:
      raise ConfigError(f"--task must be one of {', '.join(TASKS)}; got {task!r}")
    values = nest(PRESETS[task])
  return from_dict(_merge(_merge(values, from_file), explicit))


def _load_config_file(path: str) -> dict[str, dict[str, Any]]:
  try:
    data = json.loads(Path(path).read_text())
  except FileNotFoundError:
    raise ConfigError(f"--config file not found: {path}") from None
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"--config file {path} is not readable JSON: {e}") from None
  if not isinstance(data, dict):
    raise ConfigError(f"--config file {path} must hold a JSON object of options")
  try:
    return nest(data)
  except ConfigError as e:
    raise ConfigError(f"--config file {path}: {e}") from None


def validate(c: TrainConfig) -> None:
  """Checks every field; raises ConfigError naming the first bad one by its flag."""
  values = flatten({name: dataclasses.asdict(getattr(c, name)) for name in SECTIONS})

  def fail(path: str, message: str):
    raise ConfigError(f"{flag(path)} {message}")

  if values["task.fillers"] not in ("random", "zero"):
    fail("task.fillers", f"must be random or zero, got {values['task.fillers']!r}")
  if values["task.name"] not in TASKS:
    fail("task.name", f"must be one of {', '.join(TASKS)}; got {values['task.name']!r}")
  for path in (
    "run.steps",
    "task.batch_size",
    "task.seq_len",
    "task.vocab_size",
    "task.num_kv",
    "task.eval_examples",
    "task.p",
    "task.eval_batches",
    "run.log_every",
    "run.eval_every",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.max_nonfinite",
    "thermostat.hold_steps",
  ):
    value = values[path]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      fail(path, f"must be a positive integer, got {value!r}")
  for path in (
    "run.seed",
    "run.stop_patience",
    "optimizer.warmup_steps",
    "thermostat.lam_warmup",
    "thermostat.soft_warmup",
    "thermostat.harden",
  ):
    value = values[path]
    if value is None and path.startswith("thermostat."):
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      fail(path, f"must be a non-negative integer, got {value!r}")
  for path in ("optimizer.lr", "optimizer.clip_norm", "thermostat.lam_lr", "thermostat.lam_min"):
    if path == "optimizer.clip_norm" and values[path] is None:
      continue
    if not _finite(values[path]) or values[path] <= 0:
      fail(path, f"must be a positive number, got {values[path]!r}")
  for path in ("thermostat.lam", "optimizer.weight_decay"):
    if not _finite(values[path]) or values[path] < 0:
      fail(path, f"must be a non-negative number, got {values[path]!r}")
  for path in ("optimizer.b1", "optimizer.b2"):
    if not _finite(values[path]) or not 0 <= values[path] < 1:
      fail(path, f"must be in [0, 1), got {values[path]!r}")
  if not _finite(c.optimizer.min_lr_ratio) or not 0 <= c.optimizer.min_lr_ratio <= 1:
    fail("optimizer.min_lr_ratio", f"must be in [0, 1], got {c.optimizer.min_lr_ratio!r}")
  target = c.thermostat.target_rate
  if target is not None and (not _finite(target) or not 0 <= target <= 1):
    fail("thermostat.target_rate", f"must be in [0, 1] or none, got {target!r}")
  if c.thermostat.control not in ("lambda", "quantile"):
    fail("thermostat.control", f"must be lambda or quantile, got {c.thermostat.control!r}")
  scope = c.thermostat.quantile_scope
  scopes = OPTIONS["thermostat.quantile_scope"].choices
  if scope not in scopes:
    fail("thermostat.quantile_scope", f"must be one of {', '.join(scopes)}, got {scope!r}")
  quantile = c.thermostat.control == "quantile"
  if quantile and scope == "last" and target is not None and target * c.model_value("n_layers") > 1:
    fail(
      "thermostat.quantile_scope",
      f"last: the last layer would have to open target_rate * n_layers = "
      f"{target * c.model_value('n_layers'):g} of its tokens (more than all of them)",
    )
  if c.model_value("center_gate_gradient") and not quantile:
    fail(
      "model.center_gate_gradient",
      "needs --thermostat.control quantile (under lambda the logits' level holds the rate)",
    )
  if c.thermostat.harden and (c.model_value("mixer") != "tgn" or c.model_value("gate") != "hard"):
    fail("thermostat.harden", "needs the hard gate (--mixer tgn --gate hard)")
  for path in ("thermostat.quantile_rate", "thermostat.harden_temperature"):
    if not _finite(values[path]) or not 0 < values[path] <= 1:
      fail(path, f"must be in (0, 1], got {values[path]!r}")
  rate_end = c.thermostat.quantile_rate_end
  if rate_end is not None and (not _finite(rate_end) or not 0 < rate_end <= 1):
    fail("thermostat.quantile_rate_end", f"must be in (0, 1] or none, got {rate_end!r}")
  for path in ("task.train_fraction", "task.val_fraction"):
    if not _finite(values[path]) or not 0 < values[path] < 1:
      fail(path, f"must be in (0, 1), got {values[path]!r}")
  run = c.run
  if run.stop_accuracy is not None:
    if not _finite(run.stop_accuracy) or not 0 < run.stop_accuracy <= 1:
      fail("run.stop_accuracy", f"must be in (0, 1] or none, got {run.stop_accuracy!r}")
    if c.task.name == "text":
      fail("run.stop_accuracy", "needs a task scored by accuracy (mqar, modadd), not text")
  if run.num_processes is not None and (
    isinstance(run.num_processes, bool) or run.num_processes < 1
  ):
    fail("run.num_processes", f"must be a positive integer, got {run.num_processes!r}")
  if (
    run.process_id is not None
    and run.num_processes is not None
    and not (0 <= run.process_id < run.num_processes)
  ):
    fail("run.process_id", f"must be in [0, {run.num_processes}), got {run.process_id!r}")
  ablation = c.ablation
  if ablation.reference_gate not in (None, "oracle", "random"):
    fail(
      "ablation.reference_gate", f"must be oracle, random or none, got {ablation.reference_gate!r}"
    )
  if ablation.reference_gate is not None and (
    c.model_value("mixer") != "tgn" or c.model_value("gate") != "hard"
  ):
    fail("ablation.reference_gate", "needs the hard gate (--mixer tgn --gate hard)")
  rates = ablation.reference_rates
  if ablation.reference_gate == "random" and (
    not rates
    or any(not _finite(r) or not 0 <= r <= 1 for r in rates)
    or len(rates) not in (1, c.model_value("n_layers"))
  ):
    fail(
      "ablation.reference_rates",
      "must give a rate in [0, 1] for every layer (or one for "
      f"all) with --reference_gate random, got {rates!r}",
    )
  if run.on_nonfinite not in ("skip", "stop"):
    fail("run.on_nonfinite", f"must be skip or stop, got {run.on_nonfinite!r}")
  # The model's fields are checked by TGNConfig itself, which names the field at fault.
  try:
    c.model_config(vocab_size=max(c.task.vocab_size, 2), max_seq_len=c.task.seq_len)
  except ConfigFieldError as e:
    raise ConfigError(f"{flag('model.' + e.field)}: {e}") from None
  except TypeError as e:  # a value of the wrong kind where TGNConfig computes with it
    raise ConfigError(f"model: {e}") from None


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


__all__ = [
  "AblationConfig",
  "ConfigError",
  "OPTIONS",
  "Option",
  "PRESETS",
  "TASKS",
  "TaskConfig",
  "OptimizerConfig",
  "ThermostatConfig",
  "RunConfig",
  "TrainConfig",
  "flag",
  "from_dict",
  "nest",
  "resolve",
  "validate",
]
