"""The free-energy objective, the lambda thermostat, the optimizer and the jitted steps.

  loss = U + lam * W,   U = cross-entropy on scored positions (nats),
                        W = mean gate probability over tokens and layers (the L1 norm of g).

The thermostat treats lam as the Lagrange multiplier of the constraint open_rate = target
and adjusts it by dual ascent in log space (lam *= exp(lam_lr * (rate - target))), so it
finds the right scale of lam whatever the task's units of U. The quantile control holds
the rate with the gate thresholds instead: each layer's logit offset moves a fraction
quantile_rate (falling to quantile_rate_end, if given) of the way to the batch's
(1 - target) quantile after every step (pooled over the layers, per layer, or the whole
budget in the last layer), so a step uses the threshold of the batches before it, as
decoding does. lam then prices the offsets' drift: the same
dual-ascent step with tanh(mean offset change) in place of (rate - target), so it rises
while the logits near the threshold climb (and the offsets chase them) and falls while
they drop.

The compiled step depends only on the model and the optimizer's structure; the learning
rate, lambda's ramp, the thermostat's settings and the seed arrive as StepControls.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from tgn_jax import functional
from tgn_jax.config import TGNConfig
from tgn_jax.ops import gate as gate_ops
from tgn_jax.ops.gate import CapacityLadder
from tgn_jax.training import sharding
from tgn_jax.training.config import TrainConfig


class TrainState(NamedTuple):
  params: Any  # nnx.State of the model
  opt_state: Any  # optax state
  lam: jax.Array  # float32 scalar: the thermostat's multiplier (before the warm-up ramp)
  step: jax.Array  # int32 scalar: optimizer steps taken
  routing_needs: jax.Array  # float32 [CapacityLadder.WINDOW]: the routing capacity the last
  # steps needed, -1-padded; the ladder's memory, checkpointed so
  # that a resumed run picks the capacities it would have
  skipped_in_a_row: jax.Array  # int32 scalar: non-finite steps since the last finite one
  skipped_total: jax.Array  # int32 scalar: non-finite steps of the run


class StepControls(NamedTuple):
  """The per-step hyper-parameters, fed to the compiled step as float32 scalars (and a key),
  so that one compilation serves any learning-rate schedule, lambda setting or seed."""

  lr: jax.Array  # learning rate of this step
  lam_scale: jax.Array  # lambda warm-up ramp, in [0, 1]
  thermostat: jax.Array  # 1 when the thermostat adjusts lambda after this step, else 0
  target_rate: jax.Array  # the thermostat's open-rate target
  lam_lr: jax.Array  # the thermostat's gain
  lam_min: jax.Array  # the thermostat's floor for lambda
  quantile_rate: jax.Array  # the quantile control's step after this step (0: it rests)
  quantile_hold: jax.Array  # scope sticky: 1 / thermostat.hold_steps
  gate_temperature: jax.Array  # the soft gate's sigmoid temperature (the hardening anneal)
  key: jax.Array  # the run's key data (uint32); the step's key is fold_in(key, step)


def make_optimizer(c: TrainConfig) -> optax.GradientTransformation:
  """optax's AdamW without its learning-rate scaling (applied by the step from its controls),
  after global-norm clipping (none with clip_norm None). The step skips non-finite updates
  itself, with a select: optax.apply_if_finite's lax.cond would be an XLA conditional, a
  host round trip on a GPU, in every step."""
  clip = c.optimizer.clip_norm
  return optax.chain(
    optax.identity() if clip is None else optax.clip_by_global_norm(clip),
    optax.scale_by_adam(b1=c.optimizer.b1, b2=c.optimizer.b2),
    optax.add_decayed_weights(c.optimizer.weight_decay),
  )


def learning_rate_schedule(c: TrainConfig) -> optax.Schedule:
  """Linear warm-up to the peak rate, then cosine decay to peak * min_lr_ratio at the last step."""
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=c.optimizer.lr,
    warmup_steps=c.optimizer.warmup_steps,
    decay_steps=max(c.run.steps, c.optimizer.warmup_steps + 1),
    end_value=c.optimizer.lr * c.optimizer.min_lr_ratio,
  )


def make_controls(c: TrainConfig) -> Callable[[int], StepControls]:
  """Host-side: the controls of step `step` (0-based) of a run with config c."""
  # Each schedule as a host table over steps 0..steps (the rate's counted from the control's start).
  table = lambda schedule: np.asarray(jax.vmap(schedule)(jnp.arange(c.run.steps + 1)), np.float32)
  lr_table = table(learning_rate_schedule(c))
  warmup = c.lam_warmup_steps
  harden, hard_from = c.thermostat.harden, c.soft_warmup_steps
  quantile = c.thermostat.control == "quantile"
  rate = c.thermostat.quantile_rate
  rate_end = rate if c.thermostat.quantile_rate_end is None else c.thermostat.quantile_rate_end
  decay_steps = max(c.run.steps - 1 - warmup, 1)
  rate_table = table(optax.cosine_decay_schedule(rate, decay_steps, alpha=rate_end / rate))
  # Raw key data: a host value every process passes alike (a typed key lives on a device).
  key = np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(c.run.seed), 1)))
  f32 = np.float32

  def controls(step: int) -> StepControls:
    ramp = 1.0 if warmup == 0 else min(max((step - warmup) / warmup, 0.0), 1.0)
    controlled = c.thermostat.target_rate is not None and step >= warmup
    annealed = min(max(step - (hard_from - harden) + 1, 0), harden) / max(harden, 1)
    return StepControls(
      lr=f32(lr_table[min(step, c.run.steps)]),
      lam_scale=f32(ramp),
      thermostat=f32(controlled),
      target_rate=f32(c.thermostat.target_rate or 0.0),
      lam_lr=f32(c.thermostat.lam_lr),
      lam_min=f32(c.thermostat.lam_min),
      quantile_rate=f32(
        rate_table[min(max(step - warmup, 0), c.run.steps)] if controlled and quantile else 0.0
      ),
      quantile_hold=f32(1.0 / c.thermostat.hold_steps),
      # Geometric from 1 to harden_temperature over the anneal's steps, 1 before it.
      gate_temperature=f32(c.thermostat.harden_temperature**annealed),
      key=key,
    )

  return controls


def thermostat(
  lam: jax.Array, rate: jax.Array, target: jax.Array, gain: jax.Array, floor: jax.Array
) -> jax.Array:
  """One dual-ascent step (in log space) of lam towards open rate == target."""
  return (jnp.maximum(lam, floor) * jnp.exp(gain * (rate - target))).astype(jnp.float32)


def shut_layers(
  logit_LBT: jax.Array, threshold: float, temperature: jax.Array, scope: str
) -> jax.Array:
  """bool [L]: the layers kept out of the quantile control's budget in this scope
  (quantile_offsets), whose offsets' drift lambda does not price.

  last: every layer before the last. sticky: the layers that opened no token of this batch
  (logit_LBT is net of the offsets), unless that is every layer. layer, model: none.
  """
  n_layers = logit_LBT.shape[0]
  if scope == "last":
    return jnp.arange(n_layers) < n_layers - 1
  if scope == "sticky":
    open_logit = temperature * jax.scipy.special.logit(threshold)
    shut = jnp.max(logit_LBT.reshape(n_layers, -1), axis=1) <= open_logit
    return shut & ~jnp.all(shut)
  return jnp.zeros((n_layers,), bool)


def quantile_offsets(
  offsets_L: jax.Array,
  logit_LBT: jax.Array,
  target: jax.Array,
  rate: jax.Array,
  threshold: float,
  temperature: jax.Array,
  scope: str = "layer",
  hold: jax.Array = 1.0,
) -> jax.Array:
  """One step of the moving-quantile control: float32 [L] offsets moved `rate` of the way
  to those that would have opened, of this batch's tokens, a fraction `target`

    layer:  in each layer;
    model:  of the tokens of all layers together (one shift for every layer, so that layers
      may differ);
    last:   target * L in the last layer (the whole budget), none in the layers before it,
      whose thresholds sit one range above their largest logit (held shut), the range
      being the widest any layer's logits span in the batch;
    sticky: as model, over the layers that opened a token of this batch; a layer that
      opened none has its threshold drawn `hold` of the way from the pooled one to the held
      shut one, so that a layer left empty for many batches is held shut (it opens again
      only if its logits jump by more than that range) and one empty for a few is not.

  logit_LBT is net of the offsets; a gate opens where sigmoid(logit / temperature) >
  threshold, i.e. logit > temperature * logit(threshold), so the offset that puts the
  batch's (1 - target) quantile q of the logits on it is
  offset + q - temperature * logit(threshold).
  """
  n_layers = logit_LBT.shape[0]
  logits = logit_LBT.reshape(n_layers, -1).astype(jnp.float32)
  open_logit = temperature * jax.scipy.special.logit(threshold)
  shut = shut_layers(logit_LBT, threshold, temperature, scope)
  if scope == "layer":
    q = jnp.quantile(logits, 1.0 - target, axis=1)
  else:
    # One quantile over the layers not shut, the budget (target * L of a layer's tokens)
    # theirs alone: the shut layers' logits are put at the bottom.
    pooled = jnp.quantile(jnp.where(shut[:, None], jnp.min(logits), logits), 1.0 - target)
    top = jnp.max(logits, axis=1)
    # The widest range, not the layer's own: a shut layer's logits get almost no gradient
    # and can sit in a narrow band that one step of its gate head moves past.
    held = top + jnp.max(top - jnp.min(logits, axis=1))
    if scope == "sticky":
      held = pooled + hold * (held - pooled)
    q = jnp.where(shut, held, pooled)
  return (offsets_L + rate * (q - open_logit)).astype(jnp.float32)


def masked_cross_entropy(logits_BTV, targets_BT, mask_BT):
  """Mean cross-entropy (nats) and accuracy over the positions where mask is 1."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
  correct = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
  count = jnp.maximum(jnp.sum(mask_BT), 1.0)
  return jnp.sum(ce * mask_BT) / count, jnp.sum(correct * mask_BT) / count


def init_state(
  model_config: TGNConfig, c: TrainConfig, optimizer, mesh: Optional[Mesh] = None
) -> tuple[Any, TrainState, Any]:
  """(model_def, the initial TrainState, its shardings or None without a mesh).

  On a mesh the state is created sharded (sharding.state_shardings): no device ever
  holds all of the parameters.
  """
  model_def = functional.model_def(model_config)

  def create() -> TrainState:
    _, params = functional.init(model_config, jax.random.key(c.run.seed))
    return TrainState(
      params=params,
      opt_state=optimizer.init(params),
      lam=jnp.float32(c.thermostat.lam),
      step=jnp.int32(0),
      routing_needs=routing_needs(()),
      skipped_in_a_row=jnp.int32(0),
      skipped_total=jnp.int32(0),
    )

  shardings = None
  if mesh is not None:
    shardings = sharding.state_shardings(jax.eval_shape(create), mesh)
  return model_def, jax.jit(create, out_shardings=shardings)(), shardings


@jax.jit
def accumulate(total, value):
  """Elementwise sum of two pytrees of metrics (compiled once, not op by op)."""
  return jax.tree.map(jnp.add, total, value)


def routing_needs(recent) -> jax.Array:
  """A CapacityLadder's recent needs as TrainState.routing_needs (-1-padded: every process
  must pass equal values, and NaN is not equal to itself)."""
  needs = np.full((CapacityLadder.WINDOW,), -1.0, np.float32)
  recent = list(recent)[-CapacityLadder.WINDOW :]
  needs[: len(recent)] = recent
  return needs


def routes(model_config: TGNConfig) -> bool:
  """Whether the model's forward routes tokens (hard gate, sparse execution): its steps
  take a capacity below 1 and may overflow."""
  return (
    model_config.has_gate and model_config.gate == "hard" and model_config.execution == "sparse"
  )


def reference_gate_fn(
  model_config: TGNConfig, reference: Optional[str], rates: Optional[Sequence[float]]
) -> Callable:
  """open_LBT(mask_BT, key) of a reference gate (None: the learned gate decides).

  oracle: open exactly at the scored positions in the last layer. random: Bernoulli at
  `rates` (one per layer, or one for all) at every token.
  """
  if reference is None:
    return lambda mask, key: None
  if reference == "oracle":
    return lambda mask, key: gate_ops.oracle_gate(mask, model_config.n_layers)
  per_layer = np.broadcast_to(np.asarray(rates, np.float32), (model_config.n_layers,))
  return lambda mask, key: gate_ops.random_gate(
    jax.random.fold_in(key, 0x6A7E), per_layer, mask.shape
  )


def make_train_step(
  model_def,
  model_config: TGNConfig,
  optimizer,
  mesh: Optional[Mesh] = None,
  state_shardings: Any = None,
  reference_gate: Callable = None,
  quantile: Optional[str] = None,
):
  """Returns a jitted step(state, controls, inputs, targets, mask, capacity) -> (state, metrics).

  On a mesh: the state in and out with state_shardings (donated), the batch split over
  (data, fsdp), controls and metrics replicated.

  capacity (static): the hard gate's routing capacity, a fraction of each segment. If
  routing at it left tokens out (metrics["overflow"] = 1), the step changes nothing (the
  returned state is the input state): redo the batch at a larger capacity (the training
  loop's CapacityLadder does). metrics["capacity_needed"] is the capacity that fits.
  reference_gate: from reference_gate_fn, a given gate in place of the learned one.
  quantile: "layer", "model", "last" or "sticky": the step also moves the gate offsets by the
  quantile control in that scope (quantile_offsets; at controls.quantile_rate, 0 leaves them).
  """
  reference_gate = reference_gate or reference_gate_fn(model_config, None, None)
  gated = model_config.has_gate
  routed = routes(model_config)
  soft = model_config.gate == "soft"

  def step_fn(state: TrainState, controls: StepControls, inputs, targets, mask, capacity):
    key = jax.random.fold_in(jax.random.wrap_key_data(controls.key), state.step)
    lam = state.lam * controls.lam_scale

    def loss_fn(params):
      logits, aux = functional.apply(
        model_def,
        params,
        inputs,
        rng=key,
        stats=None,
        capacity=capacity,
        open_LBT=reference_gate(mask, key),
        gate_temperature=controls.gate_temperature,
      )
      ce, accuracy = masked_cross_entropy(logits, targets, mask)
      gate = jnp.mean(aux.gate_prob)
      loss = ce + lam * gate if gated else ce
      return loss, dict(
        ce=ce,
        accuracy=accuracy,
        gate_soft=gate,
        gate_hard=jnp.mean(aux.open_rate),
        compute_rate=jnp.mean(aux.compute_rate),
        overflow=aux.overflow.astype(jnp.float32),
        capacity_needed=aux.capacity_needed,
        gate_logit=aux.gate_logit,
      )

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    gate_logit = metrics.pop("gate_logit")
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: -controls.lr * u, updates)  # AdamW's learning-rate step
    params = optax.apply_updates(state.params, updates)
    # A non-finite step is skipped: a select, fused into the update.
    params, opt_state = jax.tree.map(
      lambda new, old: jnp.where(finite, new, old),
      (params, opt_state),
      (state.params, state.opt_state),
    )
    skipped_in_a_row = jnp.where(finite, 0, state.skipped_in_a_row + 1).astype(jnp.int32)
    skipped_total = state.skipped_total + (~finite).astype(jnp.int32)
    new_lam = state.lam
    if gated:
      # The offsets are not the optimizer's (no gradient; any update it made is replaced).
      offsets = before = functional.gate_offsets(state.params)
      rate = metrics["gate_hard"]  # what lambda answers for
      if quantile:
        temperature = controls.gate_temperature if soft else jnp.float32(1.0)
        threshold = model_config.gate_threshold
        offsets = quantile_offsets(
          offsets,
          gate_logit,
          controls.target_rate,
          controls.quantile_rate,
          threshold,
          temperature,
          scope=quantile,
          hold=controls.quantile_hold,
        )
        # A non-finite step (its update skipped) must not move them either.
        offsets = jnp.where(finite & jnp.all(jnp.isfinite(offsets)), offsets, before)
        # Unpriced, the logits near the threshold climb and the offsets chase them without
        # end; lambda rises while the offsets climb and falls while they drop, so its price
        # holds the gates' logits still.
        # (A shut layer's offset follows its largest logit, not the threshold: not priced.)
        priced = ~shut_layers(gate_logit, threshold, temperature, quantile)
        moved = jnp.sum(jnp.where(priced, offsets - before, 0.0)) / jnp.sum(priced)
        rate = controls.target_rate + jnp.tanh(moved)
      params = functional.with_gate_offsets(params, offsets)
      metrics["gate_offset"] = offsets
      new_lam = jnp.where(
        controls.thermostat > 0,
        thermostat(state.lam, rate, controls.target_rate, controls.lam_lr, controls.lam_min),
        state.lam,
      )
    metrics.update(
      loss=loss,
      lam=lam,
      lr=controls.lr,
      grad_norm=grad_norm,
      finite=finite.astype(jnp.float32),
      skipped_total=skipped_total,
      skipped_in_a_row=skipped_in_a_row,
    )
    new_state = TrainState(
      params,
      opt_state,
      new_lam,
      state.step + 1,
      state.routing_needs,
      skipped_in_a_row,
      skipped_total,
    )
    if routed:  # an overflowing step is void: a select, fused into the update
      keep = metrics["overflow"] > 0
      new_state = jax.tree.map(lambda new, old: jnp.where(keep, old, new), new_state, state)
    return new_state, metrics

  donate = (0,) if jax.default_backend() != "cpu" else ()
  if mesh is None:
    return jax.jit(step_fn, donate_argnums=donate, static_argnums=(5,))
  batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  return jax.jit(
    step_fn,
    donate_argnums=donate,
    static_argnums=(5,),
    in_shardings=(state_shardings, replicated, batch, batch, batch),
    out_shardings=(state_shardings, replicated),
  )


def routed_step(
  step_fn,
  state: TrainState,
  controls: StepControls,
  batch,
  ladder: CapacityLadder,
  routed: bool = True,
  while_running: Optional[Callable[[], None]] = None,
) -> tuple[TrainState, dict, int]:
  """One optimizer step at the ladder's capacity, redone at a larger one whenever routing
  overflowed (an overflowing step leaves the state untouched), so that no token is ever
  left out. Reads two scalars from the device per routed step; `while_running` (e.g.
  preparing the next batch) runs on the host before that read, while the step runs.

  Returns (state, metrics, how many times the batch was redone).
  """
  redone = 0
  while True:
    state, metrics = step_fn(state, controls, *batch, ladder.current)
    if while_running is not None and redone == 0:
      while_running()
    if not routed or not ladder.observe(
      *jax.device_get((metrics["overflow"] > 0, metrics["capacity_needed"]))
    ):
      return state, metrics, redone
    redone += 1


def make_eval_step(
  model_def,
  model_config: TGNConfig,
  mesh: Optional[Mesh] = None,
  params_shardings: Any = None,
  reference_gate: Callable = None,
):
  """Returns a jitted eval(params, inputs, targets, mask, gate_temperature) -> dict of sums
  over the batch (on a mesh: the batch split over (data, fsdp), the sums replicated);
  gate_temperature is the soft gate's (1.0 outside the hardening anneal).

  Sums (not means) so batches aggregate exactly: ce, correct, count; per layer the open
  gates at scored / unscored positions and the attention observables over open tokens.
  """

  def eval_fn(params, inputs, targets, mask, gate_temperature):
    open_LBT = (reference_gate or reference_gate_fn(model_config, None, None))(
      mask, jax.random.key(0)
    )
    logits, aux = functional.apply(
      model_def,
      params,
      inputs,
      stats="token",
      capacity=1.0,
      open_LBT=open_LBT,
      gate_temperature=gate_temperature,
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    is_open = aux.is_open.astype(jnp.float32)  # [L, B, T]
    # A row with no scored position pads the last eval batch: it counts nowhere.
    real_row_B = jnp.any(mask > 0, axis=1)
    real_BT = jnp.broadcast_to(real_row_B[:, None], mask.shape).astype(jnp.float32)
    sums = dict(
      ce=jnp.sum(ce * mask),
      correct=jnp.sum(correct * mask),
      count=jnp.sum(mask),
      tokens=jnp.sum(real_BT),
      open=jnp.sum(is_open * real_BT, axis=(1, 2)),
      open_scored=jnp.sum(is_open * mask, axis=(1, 2)),
      open_unscored=jnp.sum(is_open * (real_BT - mask), axis=(1, 2)),
    )
    if aux.token_stats is not None:
      # Observables exist (are not NaN) where attention was computed.
      real_row = real_row_B[None, :, None, None]
      stat_mask = jnp.isfinite(aux.token_stats.entropy) & real_row  # [L, B, T, N]
      sums["stats_count"] = jnp.sum(stat_mask, axis=(1, 2, 3)).astype(jnp.float32)
      for name in ("specific_heat", "entropy", "free_energy", "internal_energy"):
        value = getattr(aux.token_stats, name)
        sums[name] = jnp.sum(jnp.where(stat_mask, value, 0.0), axis=(1, 2, 3))
      # Per head [L, N]: grokking's specific heat is read head by head.
      sums["stats_count_heads"] = jnp.sum(stat_mask, axis=(1, 2)).astype(jnp.float32)
      sums["specific_heat_heads"] = jnp.sum(
        jnp.where(stat_mask, aux.token_stats.specific_heat, 0.0), axis=(1, 2)
      )
    return sums

  if mesh is None:
    return jax.jit(eval_fn)
  batch = sharding.batch_sharding(mesh)
  return jax.jit(
    eval_fn,
    in_shardings=(params_shardings, batch, batch, batch, sharding.replicated(mesh)),
    out_shardings=sharding.replicated(mesh),
  )
