"""Training: configuration, tasks, the free-energy objective and thermostat, the loop."""

from tgn_jax.training.config import (
  ConfigError,
  OptimizerConfig,
  RunConfig,
  TaskConfig,
  ThermostatConfig,
  TrainConfig,
  resolve,
)
from tgn_jax.training.steps import (
  StepControls,
  TrainState,
  make_controls,
  make_eval_step,
  make_optimizer,
  make_train_step,
  routed_step,
)
from tgn_jax.training.tasks import Task, make_task

__all__ = [
  "ConfigError",
  "OptimizerConfig",
  "RunConfig",
  "TaskConfig",
  "ThermostatConfig",
  "TrainConfig",
  "resolve",
  "StepControls",
  "TrainState",
  "make_controls",
  "make_eval_step",
  "make_optimizer",
  "make_train_step",
  "routed_step",
  "Task",
  "make_task",
]
