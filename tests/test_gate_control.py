"""Holding the open rate and hardening the gate: the moving-quantile threshold (per-layer
gate offsets that training sets and decoding reads alike) and the anneal of the soft gate's
sigmoid temperature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import SEQ, VOCAB, tiny_config

from tgn_jax import TGNLM, functional
from tgn_jax.training import steps as train_steps
from tgn_jax.training.config import ConfigError, from_dict
from tgn_jax.training.steps import quantile_offsets


def tokens(seed, batch=3, seq_len=SEQ):
  return jax.random.randint(jax.random.key(seed), (batch, seq_len), 0, VOCAB)


def opened(logit_LBT, shift_L, threshold=0.5, temperature=1.0):
  """The open rate per layer once the offsets move by shift_L."""
  prob = jax.nn.sigmoid((logit_LBT - shift_L[:, None, None]) / temperature)
  return np.asarray(jnp.mean(prob > threshold, axis=(1, 2)))


# ------------------------------------------------------------------------ quantile offsets


@pytest.mark.parametrize("threshold, temperature", [(0.5, 1.0), (0.7, 1.0), (0.3, 0.1)])
def test_quantile_offsets_open_the_target_fraction_of_the_batch(threshold, temperature):
  """At rate 1 the new offsets open exactly `target` of the batch's tokens in every layer
  (each layer at its own scale); rate r moves them r of the way; rate 0 leaves them."""
  key = jax.random.key(0)
  scale = jnp.array([1.0, 5.0, 0.2])[:, None, None]
  logit = jax.random.normal(key, (3, 8, 128)) * scale + jnp.array([0.0, 3.0, -2.0])[:, None, None]
  offsets = jnp.array([0.5, -1.0, 2.0])
  f32 = jnp.float32
  for target in (0.1, 0.25, 0.6):
    new = quantile_offsets(offsets, logit, f32(target), f32(1.0), threshold, f32(temperature))
    np.testing.assert_allclose(
      opened(logit, new - offsets, threshold, temperature), target, atol=1.5 / 1024
    )
    half = quantile_offsets(offsets, logit, f32(target), f32(0.5), threshold, f32(temperature))
    np.testing.assert_allclose(half - offsets, (new - offsets) / 2, rtol=1e-5, atol=1e-6)
    rest = quantile_offsets(offsets, logit, f32(target), f32(0.0), threshold, f32(temperature))
    np.testing.assert_array_equal(rest, offsets)


def test_pooled_quantile_holds_the_mean_rate_and_lets_layers_differ():
  """Pooled over the layers: one shift for all, the mean open rate is the target while a
  layer whose logits sit higher stays more open."""
  logit = jax.random.normal(jax.random.key(1), (2, 8, 128)) + jnp.array([-1.0, 1.0])[:, None, None]
  f32 = jnp.float32
  offsets = jnp.zeros(2)
  new = quantile_offsets(offsets, logit, f32(0.25), f32(1.0), 0.5, f32(1.0), scope="model")
  assert float(new[0]) == float(new[1])
  rates = opened(logit, new)
  np.testing.assert_allclose(rates.mean(), 0.25, atol=1.5 / 1024)
  assert rates[1] > 0.4 > 0.1 > rates[0]


def test_last_scope_gives_the_budget_to_the_last_layer_and_shuts_the_others():
  """Scope last: the last layer opens target * L of the batch's tokens, the layers before it
  none, even where their logits sit far above the last layer's; the shut layers' threshold
  holds a later batch shut unless its logits jump by more than the widest range of the
  batch's layers."""
  logit = (
    jax.random.normal(jax.random.key(2), (3, 8, 128)) + jnp.array([4.0, 2.0, -1.0])[:, None, None]
  )
  f32 = jnp.float32
  offsets = jnp.array([0.3, -0.7, 1.1])
  new = quantile_offsets(offsets, logit, f32(0.1), f32(1.0), 0.5, f32(1.0), scope="last")
  rates = opened(logit, new - offsets)
  np.testing.assert_array_equal(rates[:2], 0.0)
  np.testing.assert_allclose(rates[2], 0.3, atol=1.5 / 1024)
  spread = jnp.max(jnp.max(logit, axis=(1, 2)) - jnp.min(logit, axis=(1, 2)))  # the widest
  np.testing.assert_array_equal(opened(logit + 0.9 * spread, new - offsets)[:2], 0.0)
  assert float(opened(logit + 1.1 * spread, new - offsets)[:2].min()) > 0.0
  half = quantile_offsets(offsets, logit, f32(0.1), f32(0.5), 0.5, f32(1.0), scope="last")
  np.testing.assert_allclose(half - offsets, (new - offsets) / 2, rtol=1e-5, atol=1e-6)


def test_sticky_scope_draws_an_empty_layer_shut_and_pools_the_rest():
  """Scope sticky: a layer none of whose tokens is open at the current offsets gets none of
  the budget (scope model would give it much of it) and its threshold is drawn `hold` of the
  way from the pooled one to the held-shut one (above its largest logit by the widest
  range of the batch's layers);
  the layers still open share the whole budget, one shift for them all."""
  key0, key1 = jax.random.split(jax.random.key(3))
  below = -0.01 - 0.02 * jnp.abs(jax.random.normal(key0, (1, 8, 128)))  # nowhere open
  rest = jax.random.normal(key1, (2, 8, 128)) - 1.5  # 0.067 open in each
  logit = jnp.concatenate([below, rest])
  f32 = jnp.float32
  offsets = jnp.array([0.3, -0.7, 1.1])
  shut = train_steps.shut_layers(logit, 0.5, f32(1.0), "sticky")
  np.testing.assert_array_equal(shut, [True, False, False])

  def step(scope, hold=1.0, target=0.08):
    return quantile_offsets(offsets, logit, f32(target), f32(1.0), 0.5, f32(1.0), scope, hold)

  assert opened(logit, step("model") - offsets)[0] > 0.05
  shift = step("sticky") - offsets
  rates = opened(logit, shift)
  assert rates[0] == 0.0
  np.testing.assert_allclose(rates[1:].mean(), 0.12, atol=1.5 / 1024)
  np.testing.assert_allclose(shift[1], shift[2], rtol=1e-6)
  spread = float(jnp.max(rest) - jnp.min(rest))  # the widest range, far wider than its own
  assert opened(logit.at[0].add(0.9 * spread), shift)[0] == 0.0
  assert opened(logit.at[0].add(1.1 * spread), shift)[0] > 0.0
  part = step("sticky", hold=0.1) - offsets
  np.testing.assert_allclose(part[1:], shift[1:], rtol=1e-6)
  np.testing.assert_allclose(part[0], 0.9 * shift[1] + 0.1 * shift[0], rtol=1e-5)
  # No layer open at all: nothing is held shut, the quantile pools every layer.
  closed = logit - 10.0
  np.testing.assert_array_equal(
    quantile_offsets(offsets, closed, f32(0.08), f32(1.0), 0.5, f32(1.0), "sticky"),
    quantile_offsets(offsets, closed, f32(0.08), f32(1.0), 0.5, f32(1.0), "model"),
  )
  # A budget the open layers cannot hold opens all of their tokens, and no more.
  logit = logit.at[1:].add(2.5)
  full = step("sticky", target=0.8)
  assert np.all(np.isfinite(full))
  np.testing.assert_array_equal(opened(logit, full - offsets - 1e-4), [0.0, 1.0, 1.0])


@pytest.mark.parametrize("scope", ["model", "sticky"])
def test_a_shut_layer_whose_logits_drift_up_reopens_under_model_not_sticky(scope):
  """Batch after batch, layer 1's logits climb by 0.5 (less than a batch's range) from far
  below layer 2's: under scope model (one shift for all) layer 1 opens once it has climbed
  past layer 2; under sticky (its threshold drawn a fifth of the way to shut per batch) the
  threshold keeps ahead of it and it never opens."""
  f32 = jnp.float32
  offsets = jnp.zeros(2)
  opened_in_layer_1 = []
  for batch in range(24):
    raw = jax.random.normal(jax.random.key(batch), (2, 8, 128))
    raw = raw + jnp.array([-8.0 + 0.5 * batch, 0.0])[:, None, None]
    net = raw - offsets[:, None, None]
    opened_in_layer_1.append(float(opened(net, jnp.zeros(2))[0]))
    offsets = quantile_offsets(offsets, net, f32(0.1), f32(1.0), 0.5, f32(1.0), scope, 0.2)
  assert opened_in_layer_1[0] == 0.0
  assert (max(opened_in_layer_1) > 0.1) == (scope == "model")
  if scope == "sticky":
    assert max(opened_in_layer_1) == 0.0


def test_sticky_hold_accumulates_over_the_batches_a_layer_stays_empty():
  """The draw is of the layer's own threshold: over the batches an empty layer stays empty,
  small draws add up to the whole hold (the offset a single full draw would set)."""
  key0, key1 = jax.random.split(jax.random.key(4))
  raw = jnp.concatenate(
    [0.1 * jax.random.normal(key0, (1, 8, 128)) - 6.0, jax.random.normal(key1, (1, 8, 128))]
  )
  f32 = jnp.float32
  offsets = jnp.zeros(2)
  for _ in range(400):
    net = raw - offsets[:, None, None]
    offsets = quantile_offsets(offsets, net, f32(0.1), f32(0.5), 0.5, f32(1.0), "sticky", 0.05)
  net = raw - offsets[:, None, None]
  full = quantile_offsets(offsets, net, f32(0.1), f32(1.0), 0.5, f32(1.0), "sticky", 1.0)
  np.testing.assert_allclose(full, offsets, atol=1e-3)
  held = jnp.max(raw[0]) + jnp.max(raw[1]) - jnp.min(raw[1])  # layer 2's range is the wider
  np.testing.assert_allclose(offsets[0], held, atol=1e-2)


def test_offsets_shift_the_decision_and_carry_no_gradient():
  """A layer's offset is subtracted from its gate logits (a large one closes the layer, a
  very negative one opens it), and the loss has no gradient in it."""
  model_def, params = functional.init(tiny_config(gate="hard"), jax.random.key(0))
  toks = tokens(1)
  _, aux = functional.apply(model_def, params, toks, stats=None, capacity=1.0)
  shifted = functional.with_gate_offsets(params, jnp.array([100.0, -100.0]))
  np.testing.assert_array_equal(functional.gate_offsets(shifted), [100.0, -100.0])
  np.testing.assert_array_equal(functional.gate_offsets(params), [0.0, 0.0])  # pure
  _, aux_s = functional.apply(model_def, shifted, toks, stats=None, capacity=1.0)
  # Layer 1 sees the same input (layer 2's differs: layer 1 now mixes no attention).
  np.testing.assert_allclose(aux_s.gate_logit[0], aux.gate_logit[0] - 100.0, rtol=1e-6, atol=1e-4)
  np.testing.assert_array_equal(aux_s.open_rate, [0.0, 1.0])

  def loss(p):
    logits, aux = functional.apply(
      model_def, p, toks, stats=None, capacity=1.0, rng=jax.random.key(2)
    )
    return jnp.mean(logits**2) + jnp.mean(aux.gate_prob)

  grads = jax.grad(loss)(params)
  np.testing.assert_array_equal(functional.gate_offsets(grads), 0.0)
  assert float(jnp.max(jnp.abs(grads["blocks"]["gate_head"]["out"]["bias"][...]))) > 0


def train_config(**dotted):
  base = {"run.steps": 40, "thermostat.lam_warmup": 0, "optimizer.warmup_steps": 0}
  return from_dict({}).replace(**{**base, **dotted})


def run_steps(c, steps, lr=None, start=None, temperature=None, poison=False, **model):
  """`steps` train steps of a tiny hard-gate model (or `model` overrides) on random
  batches, from gate offsets `start`; with `poison` the embedding is NaN (every step
  non-finite). Returns the gate offsets after each step, the last state and the model
  def."""
  model_config = tiny_config(**{"gate": "hard", **model})
  optimizer = train_steps.make_optimizer(c)
  model_def, state, _ = train_steps.init_state(model_config, c, optimizer)
  params = state.params
  if start is not None:
    params = functional.with_gate_offsets(params, jnp.asarray(start, jnp.float32))
  if poison:
    params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * jnp.nan if "embed" in jax.tree_util.keystr(path) else x, params
    )
  state = state._replace(params=params)
  quantile = c.thermostat.quantile_scope if c.thermostat.control == "quantile" else None
  step = train_steps.make_train_step(model_def, model_config, optimizer, quantile=quantile)
  controls = train_steps.make_controls(c)
  rng = np.random.default_rng(0)
  offsets = []
  for i in range(steps):
    batch = jnp.asarray(rng.integers(0, VOCAB, (16, SEQ)), jnp.int32)
    control = controls(i)
    if lr is not None:
      control = control._replace(lr=np.float32(lr))
    if temperature is not None:
      control = control._replace(gate_temperature=np.float32(temperature))
    state, metrics = step(state, control, batch, batch, jnp.ones((16, SEQ)), 1.0)
    offsets.append(np.asarray(functional.gate_offsets(state.params)))
  return offsets, state, model_def


def test_quantile_control_holds_each_layer_at_the_target_on_the_next_batch():
  """With the weights frozen (learning rate 0) the threshold set from one batch opens the
  target fraction of the next batch's tokens in every layer: a causal, per-layer control."""
  target = 0.3
  c = train_config(
    **{
      "thermostat.control": "quantile",
      "thermostat.quantile_rate": 1.0,
      "thermostat.quantile_scope": "layer",
      "thermostat.target_rate": target,
    }
  )
  offsets, state, model_def = run_steps(c, 3, lr=0.0)
  assert not np.allclose(offsets[0], 0.0)
  fresh = tokens(5, batch=64)
  _, aux = functional.apply(model_def, state.params, fresh, stats=None, capacity=1.0)
  np.testing.assert_allclose(aux.open_rate, target, atol=0.05)


def test_pooled_control_holds_the_mean_rate_with_one_shift():
  c = train_config(**{"thermostat.quantile_rate": 1.0, "thermostat.target_rate": 0.3})
  assert (c.thermostat.control, c.thermostat.quantile_scope) == ("quantile", "model")
  offsets, state, model_def = run_steps(c, 3, lr=0.0, start=[0.4, -0.2])
  shift = offsets[-1] - np.array([0.4, -0.2], np.float32)
  np.testing.assert_allclose(shift[0], shift[1], rtol=1e-5)  # one shift for every layer
  _, aux = functional.apply(model_def, state.params, tokens(5, batch=64), stats=None, capacity=1.0)
  np.testing.assert_allclose(np.mean(aux.open_rate), 0.3, atol=0.05)


def test_last_scope_control_holds_the_budget_in_the_last_layer():
  """Trained with scope last (weights frozen), the next batch opens nothing in layer 1 and
  target * 2 of layer 2's tokens."""
  c = train_config(
    **{
      "thermostat.quantile_rate": 1.0,
      "thermostat.quantile_scope": "last",
      "thermostat.target_rate": 0.15,
    }
  )
  offsets, state, model_def = run_steps(c, 3, lr=0.0)
  _, aux = functional.apply(model_def, state.params, tokens(5, batch=64), stats=None, capacity=1.0)
  assert float(aux.open_rate[0]) == 0.0
  np.testing.assert_allclose(aux.open_rate[1], 0.3, atol=0.05)


def test_sticky_scope_control_keeps_a_shut_layer_shut():
  """Trained with scope sticky, hold_steps 1, from layer 1 shut (offset 50; weights frozen):
  layer 1's threshold comes down to the batch's widest range above its own logits (scope model would
  keep the gap of 50) and the next batch opens nothing there and target * 2 of layer 2's
  tokens."""
  c = train_config(
    **{
      "thermostat.quantile_rate": 1.0,
      "thermostat.quantile_scope": "sticky",
      "thermostat.hold_steps": 1,
      "thermostat.target_rate": 0.15,
    }
  )
  offsets, state, model_def = run_steps(c, 3, lr=0.0, start=[50.0, 0.0])
  assert offsets[-1][0] < 25.0
  _, aux = functional.apply(model_def, state.params, tokens(5, batch=64), stats=None, capacity=1.0)
  assert float(aux.open_rate[0]) == 0.0
  np.testing.assert_allclose(aux.open_rate[1], 0.3, atol=0.05)


@pytest.mark.parametrize("scope", ["layer", "model", "last", "sticky"])
def test_the_compiled_training_step_holds_no_conditional_in_any_scope(scope):
  """The quantile control's choices (which layers are held shut, by how much) are selects:
  no XLA conditional, which on a GPU would be a round trip to the host."""
  c = train_config(**{"thermostat.quantile_scope": scope, "thermostat.target_rate": 0.15})
  model_config = tiny_config(gate="hard")
  optimizer = train_steps.make_optimizer(c)
  model_def, state, _ = train_steps.init_state(model_config, c, optimizer)
  step = train_steps.make_train_step(model_def, model_config, optimizer, quantile=scope)
  batch = tokens(0, batch=4)
  lowered = step.lower(
    state, train_steps.make_controls(c)(0), batch, batch, jnp.ones(batch.shape), 1.0
  )
  assert lowered.compile().as_text().count(" conditional(") == 0


def test_soft_steps_place_the_threshold_at_the_annealed_temperature():
  """In the soft phase a gate opens where sigmoid(logit / T) > threshold: with threshold
  0.7 and T = 0.1 the step's offsets open the target fraction at that temperature."""
  c = train_config(**{"thermostat.quantile_rate": 1.0, "thermostat.target_rate": 0.3})
  soft = dict(gate="soft", gate_threshold=0.7)
  offsets, state, model_def = run_steps(c, 3, lr=0.0, temperature=0.1, **soft)
  fresh = tokens(5, batch=64)
  _, aux = functional.apply(model_def, state.params, fresh, stats=None, gate_temperature=0.1)
  np.testing.assert_allclose(np.mean(aux.open_rate), 0.3, atol=0.05)
  _, aux_1 = functional.apply(model_def, state.params, fresh, stats=None)  # at T = 1: far off
  assert abs(float(np.mean(aux_1.open_rate)) - 0.3) > 0.1


@pytest.mark.parametrize("start, rises", [(-50.0, True), (50.0, False)])
def test_quantile_control_prices_the_offsets_drift_with_lambda(start, rises):
  """Offsets that must climb (every gate open) raise lambda; offsets that must drop lower
  it: lam *= exp(lam_lr * tanh(mean offset change))."""
  c = train_config(**{"thermostat.lam": 0.5, "thermostat.lam_lr": 0.2})
  offsets, state, _ = run_steps(c, 1, lr=0.0, start=[start, start])
  drift = float(np.mean(offsets[-1] - start))
  assert (drift > 0) == rises
  np.testing.assert_allclose(float(state.lam), 0.5 * np.exp(0.2 * np.tanh(drift)), rtol=1e-5)


def test_a_non_finite_step_leaves_the_offsets():
  """A step whose loss is NaN skips its update: the offsets stay where they were, and
  lambda, which prices their drift, stays finite."""
  offsets, state, _ = run_steps(train_config(), 2, start=[0.4, -0.2], poison=True)
  np.testing.assert_array_equal(offsets[-1], np.array([0.4, -0.2], np.float32))
  assert np.isfinite(float(state.lam))


def test_lambda_control_never_moves_the_offsets_and_quantile_waits_for_its_warmup():
  """Under the thermostat the optimizer (Adam, weight decay) never moves the offsets; the
  quantile control does not act before lambda's warm-up ends."""
  c = train_config(
    **{
      "optimizer.weight_decay": 1.0,
      "thermostat.control": "lambda",
      "thermostat.target_rate": 0.0,
      "thermostat.lam_lr": 0.5,
    }
  )
  offsets, state, _ = run_steps(c, 4, start=[0.4, -0.2])
  np.testing.assert_array_equal(offsets[-1], np.array([0.4, -0.2], np.float32))
  # Every gate it sees is too many: the state's lambda climbs from its floor each step.
  assert float(state.lam) > 0.01 * np.exp(0.5 * 0.1) ** 3
  c = train_config(**{"thermostat.control": "quantile", "thermostat.lam_warmup": 3})
  offsets, _, _ = run_steps(c, 4)
  np.testing.assert_array_equal(offsets[2], 0.0)  # steps 0, 1, 2: warm-up
  assert not np.allclose(offsets[3], 0.0)


def test_controls_of_quantile_and_of_the_hardening_anneal():
  """Quantile control: the offsets and lambda (on their drift) move after the warm-up.
  Anneal: temperature 1 through the soft warm-up, then geometric down to
  harden_temperature over `harden` steps (still soft), which the hard phase keeps."""
  c = train_config(
    **{
      "run.steps": 100,
      "thermostat.lam_warmup": 30,
      "thermostat.harden": 20,
      "thermostat.harden_temperature": 0.01,
      "thermostat.control": "quantile",
      "thermostat.quantile_rate": 0.3,
    }
  )
  assert c.soft_warmup_steps == 50
  controls = train_steps.make_controls(c)
  temps = np.array([float(controls(s).gate_temperature) for s in range(100)])
  np.testing.assert_array_equal(temps[:30], 1.0)
  np.testing.assert_allclose(temps[30:50], 0.01 ** (np.arange(1, 21) / 20), rtol=1e-5)
  np.testing.assert_allclose(temps[50:], 0.01, rtol=1e-6)
  assert [float(controls(s).thermostat) for s in (29, 30, 99)] == [0.0, 1.0, 1.0]
  np.testing.assert_array_equal([float(controls(s).quantile_rate) for s in (0, 29)], 0.0)
  np.testing.assert_allclose([float(controls(s).quantile_rate) for s in (30, 99)], 0.3)
  plain = train_steps.make_controls(
    train_config(**{"run.steps": 100, "thermostat.control": "lambda"})
  )
  assert float(plain(50).thermostat) == 1.0 and float(plain(50).quantile_rate) == 0.0
  assert float(plain(50).gate_temperature) == 1.0
  fixed = train_steps.make_controls(
    train_config(**{"thermostat.control": "quantile", "thermostat.target_rate": None})
  )
  assert float(fixed(50).thermostat) == 0.0 and float(fixed(50).quantile_rate) == 0.0


def test_quantile_rate_decays_to_its_end_from_the_control_start():
  """quantile_rate_end: quantile_rate at the step the control begins, the end value at the
  last step, a cosine between them (never rising, half way at the middle), 0 before."""
  c = train_config(
    **{
      "run.steps": 101,
      "thermostat.lam_warmup": 30,
      "thermostat.control": "quantile",
      "thermostat.quantile_rate": 0.5,
      "thermostat.quantile_rate_end": 0.1,
    }
  )
  controls = train_steps.make_controls(c)
  rates = np.array([float(controls(s).quantile_rate) for s in range(101)])
  np.testing.assert_array_equal(rates[:30], 0.0)
  np.testing.assert_allclose(rates[[30, 65, 100]], [0.5, 0.3, 0.1], rtol=1e-5)
  assert np.all(np.diff(rates[30:]) < 0)


# ------------------------------------------------------------------------------- anneal


def test_soft_gate_at_a_small_temperature_mixes_as_the_hard_gate():
  """sigmoid(logit / T): temperature 1 is the plain soft gate, and as T falls the soft
  mix becomes the hard gate's with the same parameters (what the anneal relies on)."""
  soft_def, params = functional.init(tiny_config(gate="soft"), jax.random.key(3))
  hard_def, _ = functional.init(tiny_config(gate="hard"), jax.random.key(3))
  toks = tokens(2)
  plain, aux_plain = functional.apply(soft_def, params, toks, stats=None)
  one, _ = functional.apply(soft_def, params, toks, stats=None, gate_temperature=1.0)
  np.testing.assert_array_equal(plain, one)
  hard, aux_h = functional.apply(hard_def, params, toks, stats=None, capacity=1.0)
  scale = float(jnp.max(jnp.abs(hard)))
  errors = []
  for temperature in (1.0, 0.1, 1e-5):
    soft, aux_s = functional.apply(soft_def, params, toks, stats=None, gate_temperature=temperature)
    # Threshold 0.5 is logit > 0 at any temperature; layer 2's inputs differ until the mixes
    # agree.
    np.testing.assert_array_equal(aux_s.is_open[0], aux_h.is_open[0])
    np.testing.assert_allclose(
      aux_s.gate_prob, jax.nn.sigmoid(aux_s.gate_logit / temperature), rtol=1e-5, atol=1e-7
    )
    errors.append(float(jnp.max(jnp.abs(soft - hard))))
  np.testing.assert_array_equal(aux_s.is_open, aux_h.is_open)
  assert errors[0] > errors[1] > errors[2]
  assert errors[2] < 1e-4 * scale
  with pytest.raises(ValueError, match="gate_temperature must be positive"):
    functional.apply(soft_def, params, toks, gate_temperature=0.0)


# -------------------------------------------------------------------------------- decoding


def test_gate_head_stays_float32_under_a_16_bit_compute_dtype():
  """The block weights are cast to the compute dtype once per call, the gate head's not:
  the decision compares float32 logits."""
  from tgn_jax.nn.model import _cast_matrices

  model = TGNLM(tiny_config(gate="hard", dtype="bfloat16"), rngs=nnx.Rngs(0))
  cast = _cast_matrices(nnx.state(model.blocks), jnp.bfloat16)
  for path, leaf in jax.tree_util.tree_leaves_with_path(cast):
    name = jax.tree_util.keystr(path)
    if "gate_head" in name:
      assert leaf.dtype == jnp.float32, name
    elif leaf.ndim >= 3:
      assert leaf.dtype == jnp.bfloat16, name
  _, aux = model(tokens(1), stats=None, capacity=1.0)
  assert aux.gate_logit.dtype == jnp.float32


def test_decoding_reads_the_offsets_as_the_forward_pass_does():
  """Offsets that close some tokens in each layer: each decoding step's gate and logits
  equal the full forward pass's at that position."""
  model = TGNLM(tiny_config(gate="hard"), rngs=nnx.Rngs(4))
  prompt_len, new = 6, 10
  prompt = tokens(7, batch=4, seq_len=prompt_len)
  _, aux = model(tokens(8, batch=8), stats=None, capacity=1.0)
  median = jnp.median(aux.gate_logit.reshape(2, -1), axis=1)  # half of the gates closed
  model.blocks.gate_head.offset[...] = median
  generated, logits = model.generate(prompt, new, return_logits=True)
  full, aux = model(generated, stats=None)
  scale = float(jnp.max(jnp.abs(full)))
  np.testing.assert_allclose(logits, full[:, prompt_len - 1 : -1], rtol=1e-5, atol=1e-5 * scale)
  logits_BV, cache = model.prefill(prompt, prompt_len + new)
  decoded = model.decode(cache, logits_BV, prompt_len, new)
  is_open = np.asarray(decoded.is_open[:, :, 1:])
  np.testing.assert_array_equal(is_open, np.asarray(aux.is_open[:, :, prompt_len + 1 :]))
  assert 0.1 < is_open.mean() < 0.9


# ---------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
  "dotted, field",
  [
    ({"thermostat.control": "median"}, "thermostat.control"),
    ({"thermostat.quantile_scope": "head"}, "thermostat.quantile_scope"),
    (
      {"thermostat.quantile_scope": "last", "thermostat.target_rate": 0.6},
      "thermostat.quantile_scope",
    ),
    ({"thermostat.quantile_rate": 0.0}, "thermostat.quantile_rate"),
    ({"thermostat.hold_steps": 0}, "thermostat.hold_steps"),
    ({"thermostat.quantile_rate_end": 0.0}, "thermostat.quantile_rate_end"),
    ({"thermostat.quantile_rate_end": 1.5}, "thermostat.quantile_rate_end"),
    ({"thermostat.harden_temperature": 1.5}, "thermostat.harden_temperature"),
    ({"thermostat.harden": -1}, "thermostat.harden"),
    (
      {"thermostat.control": "lambda", "model.center_gate_gradient": True},
      "model.center_gate_gradient",
    ),
    ({"thermostat.harden": 10, "model.gate": "soft"}, "thermostat.harden"),
  ],
)
def test_bad_control_settings_name_their_field(dotted, field):
  with pytest.raises(ConfigError, match=field.split(".")[1]):
    from_dict({}).replace(**dotted)
