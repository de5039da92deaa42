"""Training configuration: one flat dataclass, task presets, validation.

Resolution order for every field: dataclass default < task preset < config file < command
line. Only the fields a source actually sets override the ones before it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Optional, Union

from tgn_jax.config import TGNConfig

TASKS = ("mqar", "modadd", "text")


class ConfigError(ValueError):
  """A usage or configuration error; the message is one line naming the problem."""


def _field(default, help: str, **kw):
  return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  # run
  task: str = _field("mqar", "task: mqar | modadd | text", choices=TASKS)
  steps: int = _field(1500, "optimizer steps")
  out: str = _field("runs/latest", "run directory (metrics, summary, plots, checkpoints)")
  seed: int = _field(0, "seed for initialisation, data order and gate randomness")
  resume: bool = _field(False, "continue the run in --out from its latest checkpoint")
  batch_size: int = _field(64, "sequences per step (modadd: full batch, ignored)")
  seq_len: int = _field(32, "sequence length (mqar, text)")
  # mqar
  vocab_size: int = _field(64, "mqar vocabulary size (keys: first half, values: second)")
  num_kv: int = _field(4, "mqar key-value pairs per sequence")
  power_a: float = _field(0.01, "mqar power-law exponent of query spacing")
  eval_examples: int = _field(1000, "mqar held-out sequences")
  # modadd
  p: int = _field(113, "modadd modulus")
  train_fraction: float = _field(0.3, "modadd fraction of the p*p pairs used for training")
  # text
  data: Optional[str] = _field(None, "text file or directory (default: Python's stdlib sources)")
  val_fraction: float = _field(0.1, "text validation fraction (by file)")
  eval_batches: int = _field(8, "text validation batches per eval")
  # model
  d_model: int = _field(64, "model width")
  n_layers: int = _field(2, "layers")
  n_heads: int = _field(2, "attention heads")
  d_mlp: Optional[int] = _field(None, "MLP width (default 4 * d_model)")
  mixer: str = _field("tgn", "tgn | attention | recurrent")
  recurrence: str = _field("mingru", "mingru | gru")
  gate: str = _field("hard", "soft | hard | open | closed")
  attention_execution: Optional[str] = _field(None, "sparse | dense (default: sparse for hard)")
  kv: str = _field("all", "keys and values: all (every token) | open (open tokens only)")
  temperature: Optional[str] = _field(None, "attention temperature: a number, 'learned' or none (sqrt(head_dim))")
  exploration: float = _field(0.05, "closed-gate attention computed for the gate gradient, as a "
                              "fraction of the open tokens' attention work")
  exploration_floor: float = _field(0.002, "fraction of closed-gate tokens explored at least")
  gate_bias_init: float = _field(0.0, "initial gate logit bias (0: open probability 1/2)")
  gate_sampling: bool = _field(False, "Bernoulli-sample the hard gate in training")
  segment_len: int = _field(8192, "sparse attention gather segment length")
  capacity_multiple: int = _field(64, "routing capacities are rounded up to a multiple of this")
  dtype: str = _field("float32", "compute dtype: float32 | bfloat16")
  remat: bool = _field(False, "rematerialise each layer in the backward pass")
  # free energy and thermostat
  lam: float = _field(0.0, "temperature lambda of the free energy (initial value with --target_rate)")
  target_rate: Optional[float] = _field(0.25, "hard open-rate target of the thermostat (none: fixed lambda)")
  lam_lr: float = _field(0.05, "thermostat gain: lambda *= exp(lam_lr * (rate - target))")
  lam_min: float = _field(0.01, "thermostat floor for lambda while it is being adjusted")
  lam_warmup: Optional[int] = _field(
      None, "steps before lambda acts, then a linear ramp over as many again (default: steps // 3)")
  soft_warmup: Optional[int] = _field(
      None, "hard gate: steps trained first with the soft gate (dense attention) so that both "
      "channels learn before the gate hardens (default: the lambda warm-up)")
  # optimizer
  lr: float = _field(3e-3, "peak learning rate")
  warmup_steps: int = _field(100, "linear learning-rate warm-up steps")
  min_lr_ratio: float = _field(0.1, "final learning rate / peak (cosine decay)")
  weight_decay: float = _field(0.1, "AdamW weight decay")
  b1: float = _field(0.9, "Adam beta1")
  b2: float = _field(0.99, "Adam beta2")
  clip_norm: float = _field(1.0, "global gradient-norm clip")
  on_nonfinite: str = _field("skip", "non-finite gradients: skip the update | stop the run",
                             choices=("skip", "stop"))
  max_nonfinite: int = _field(20, "consecutive skipped updates after which the run stops")
  # logging
  log_every: int = _field(10, "steps between metric records")
  eval_every: int = _field(250, "steps between evaluations")
  checkpoint_every: int = _field(250, "steps between checkpoints")
  keep_checkpoints: int = _field(3, "checkpoints kept")
  progress: bool = _field(True, "show a progress bar")
  plots: bool = _field(True, "write plots/*.png at the end of the run")
  # devices and hosts
  mesh: Optional[str] = _field(
      None, "device mesh data:D,fsdp:F: the batch over both axes, parameters and optimiser "
      "state sharded over fsdp (default: every device on data)")
  coordinator: Optional[str] = _field(
      None, "several hosts: HOST:PORT of process 0 (with --num_processes and --process_id; "
      "without the three, jax's own detection on a known cluster)")
  num_processes: Optional[int] = _field(None, "several hosts: how many processes")
  process_id: Optional[int] = _field(None, "several hosts: this process's index, 0 .. N-1")

  def model_config(self, vocab_size: int, max_seq_len: int) -> TGNConfig:
    temperature: Union[None, float, str] = self.temperature
    if temperature is not None and temperature != "learned":
      temperature = float(temperature)
    return TGNConfig(
        vocab_size=vocab_size, d_model=self.d_model, n_layers=self.n_layers,
        n_heads=self.n_heads, d_mlp=self.d_mlp, max_seq_len=max_seq_len, mixer=self.mixer,
        recurrence=self.recurrence, gate=self.gate,
        attention_execution=self.attention_execution, kv=self.kv, temperature=temperature,
        exploration=self.exploration, exploration_floor=self.exploration_floor,
        gate_bias_init=self.gate_bias_init,
        gate_sampling=self.gate_sampling, segment_len=self.segment_len,
        capacity_multiple=self.capacity_multiple, dtype=self.dtype,
        remat=self.remat)

  @property
  def lam_warmup_steps(self) -> int:
    return self.steps // 3 if self.lam_warmup is None else self.lam_warmup

  @property
  def soft_warmup_steps(self) -> int:
    if self.mixer != "tgn" or self.gate != "hard":
      return 0
    return self.lam_warmup_steps if self.soft_warmup is None else self.soft_warmup

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# Settings that make each task train sensibly out of the box.
TASK_PRESETS: dict[str, dict[str, Any]] = {
    "mqar": {},
    # Nanda et al. 2023: 1 layer, d 128, 4 heads, d_mlp 512, AdamW lr 1e-3, wd 1, betas (0.9, 0.98).
    "modadd": dict(steps=20000, d_model=128, n_layers=1, n_heads=4, d_mlp=512, mixer="attention",
                   lr=1e-3, weight_decay=1.0, b2=0.98, warmup_steps=10, min_lr_ratio=1.0,
                   target_rate=None, eval_every=100, checkpoint_every=1000, log_every=50),
    "text": dict(steps=2000, seq_len=256, batch_size=16, d_model=128, n_layers=2, n_heads=4,
                 lr=2e-3, target_rate=0.1, eval_every=250),
}

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def resolve(explicit: dict[str, Any], config_file: Optional[str] = None,
            base: Optional[dict[str, Any]] = None) -> TrainConfig:
  """Builds a validated TrainConfig.

  explicit: fields set on the command line. config_file: a JSON object of fields.
  base: a stored run's config (for --resume), which replaces defaults and presets.
  """
  from_file = _load_config_file(config_file) if config_file else {}
  unknown = sorted(set(explicit) - set(FIELDS))
  if unknown:
    raise ConfigError(f"unknown option: {unknown[0]}")
  if base is not None:
    values = dict(base)
  else:
    task = explicit.get("task", from_file.get("task", FIELDS["task"].default))
    if task not in TASKS:
      raise ConfigError(f"--task must be one of {', '.join(TASKS)}; got {task!r}")
    values = {**TASK_PRESETS[task]}
  values.update(from_file)
  values.update(explicit)
  try:
    config = TrainConfig(**values)
  except TypeError as e:
    raise ConfigError(str(e)) from None
  validate(config)
  return config


def _load_config_file(path: str) -> dict[str, Any]:
  try:
    data = json.loads(Path(path).read_text())
  except FileNotFoundError:
    raise ConfigError(f"--config file not found: {path}") from None
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"--config file {path} is not readable JSON: {e}") from None
  if not isinstance(data, dict):
    raise ConfigError(f"--config file {path} must hold a JSON object of options")
  unknown = sorted(set(data) - set(FIELDS))
  if unknown:
    raise ConfigError(f"--config file {path}: unknown option {unknown[0]!r}")
  return data


def validate(c: TrainConfig) -> None:
  """Checks every field; raises ConfigError naming the first bad one."""
  if c.task not in TASKS:
    raise ConfigError(f"--task must be one of {', '.join(TASKS)}; got {c.task!r}")
  for name in ("steps", "batch_size", "seq_len", "vocab_size", "num_kv", "eval_examples", "p",
               "eval_batches", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
               "max_nonfinite"):
    value = getattr(c, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"--{name} must be a positive integer, got {value!r}")
  for name in ("seed", "warmup_steps", "lam_warmup", "soft_warmup"):
    value = getattr(c, name)
    if value is None and name in ("lam_warmup", "soft_warmup"):
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ConfigError(f"--{name} must be a non-negative integer, got {value!r}")
  for name in ("lr", "clip_norm", "lam_lr", "lam_min"):
    if not _finite(getattr(c, name)) or getattr(c, name) <= 0:
      raise ConfigError(f"--{name} must be a positive number, got {getattr(c, name)!r}")
  for name in ("lam", "weight_decay"):
    if not _finite(getattr(c, name)) or getattr(c, name) < 0:
      raise ConfigError(f"--{name} must be a non-negative number, got {getattr(c, name)!r}")
  for name in ("b1", "b2"):
    if not _finite(getattr(c, name)) or not 0 <= getattr(c, name) < 1:
      raise ConfigError(f"--{name} must be in [0, 1), got {getattr(c, name)!r}")
  if not _finite(c.min_lr_ratio) or not 0 <= c.min_lr_ratio <= 1:
    raise ConfigError(f"--min_lr_ratio must be in [0, 1], got {c.min_lr_ratio!r}")
  if c.target_rate is not None and (not _finite(c.target_rate) or not 0 <= c.target_rate <= 1):
    raise ConfigError(f"--target_rate must be in [0, 1] or none, got {c.target_rate!r}")
  if not _finite(c.train_fraction) or not 0 < c.train_fraction < 1:
    raise ConfigError(f"--train_fraction must be in (0, 1), got {c.train_fraction!r}")
  if not _finite(c.val_fraction) or not 0 < c.val_fraction < 1:
    raise ConfigError(f"--val_fraction must be in (0, 1), got {c.val_fraction!r}")
  if c.num_processes is not None and (isinstance(c.num_processes, bool) or c.num_processes < 1):
    raise ConfigError(f"--num_processes must be a positive integer, got {c.num_processes!r}")
  if c.process_id is not None and c.num_processes is not None and not (
      0 <= c.process_id < c.num_processes):
    raise ConfigError(f"--process_id must be in [0, {c.num_processes}), got {c.process_id!r}")
  if c.on_nonfinite not in ("skip", "stop"):
    raise ConfigError(f"--on_nonfinite must be skip or stop, got {c.on_nonfinite!r}")
  if c.temperature not in (None, "learned"):
    try:
      float(c.temperature)
    except (TypeError, ValueError):
      raise ConfigError(
          f"--temperature must be a number, 'learned' or none; got {c.temperature!r}") from None
  # The model fields are validated by TGNConfig itself.
  try:
    c.model_config(vocab_size=max(c.vocab_size, 2), max_seq_len=c.seq_len)
  except ValueError as e:
    raise ConfigError(f"--{_option_in(str(e))}: {e}" if _option_in(str(e)) else str(e)) from None


def _option_in(message: str) -> str:
  first = message.split(" ", 1)[0]
  return first if first in FIELDS else ""


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
