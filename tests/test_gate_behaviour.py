"""The gate in the model and in training: the thermostat's step, exploration (no effect on
the forward pass, an unbiased straight-through gradient) and the saturated soft gate."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import SEQ, VOCAB, tiny_config

from tgn_jax import functional
from tgn_jax.training.steps import thermostat


def config(**overrides):
  return tiny_config(**overrides)


def tokens(seed, batch=3):
  return jax.random.randint(jax.random.key(seed), (batch, SEQ), 0, VOCAB)


def with_params(params, source=None, **values):
  """params with each leaf whose path holds a key of `values` (gate_head__out__bias for
  ['gate_head']['out']['bias']) set to that value, and with every other leaf taken from
  `source` (a pytree of another configuration, matched by path) where given."""
  given = (
    {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(source)}
    if source is not None
    else {}
  )

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    for key, value in values.items():
      if "".join(f"['{part}']" for part in key.split("__")) in name:
        return jnp.full_like(x, value)
    return given.get(name, x)

  return jax.tree_util.tree_map_with_path(leaf, params)


# --------------------------------------------------------------------------- thermostat


def test_thermostat_raises_lambda_above_target_and_lowers_it_below():
  """lam *= exp(gain * (rate - target)): too many open gates -> more penalty, too few ->
  less, on target -> unchanged."""
  f32 = jnp.float32
  gain, target, floor = f32(0.5), f32(0.25), f32(0.01)
  for lam in (0.05, 1.0, 7.0):
    up = float(thermostat(f32(lam), f32(0.75), target, gain, floor))
    down = float(thermostat(f32(lam), f32(0.0), target, gain, floor))
    same = float(thermostat(f32(lam), target, target, gain, floor))
    assert down < lam < up
    np.testing.assert_allclose(up, lam * np.exp(0.5 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(down, lam * np.exp(-0.5 * 0.25), rtol=1e-6)
    np.testing.assert_allclose(same, lam, rtol=1e-6)
  # Larger gain, larger step; the step grows with the distance from the target.
  assert (
    float(thermostat(f32(1.0), f32(0.5), target, f32(1.0), floor))
    > float(thermostat(f32(1.0), f32(0.5), target, gain, floor))
    > float(thermostat(f32(1.0), f32(0.3), target, gain, floor))
    > 1.0
  )


def test_thermostat_floor_keeps_lambda_alive():
  """Log-space steps alone would never lift a lambda at 0 and would let a long run below
  the target decay it to 0: the floor (lam_min) bounds it. The step starts from at least
  the floor (README: lam <- max(lam, lam_min) exp(lam_lr (rate - target))), so lambda
  settles no more than one step under it."""
  f32 = jnp.float32
  gain, target, floor = f32(0.5), f32(0.25), f32(0.01)
  lowest = float(floor) * np.exp(-0.5 * 0.25)  # one step down from the floor
  for lam in (0.0, 1e-6):
    assert float(thermostat(f32(lam), f32(1.0), target, gain, floor)) >= float(floor)  # lifted
    assert float(thermostat(f32(lam), f32(0.0), target, gain, floor)) >= lowest * (1 - 1e-6)
  lam, seen = f32(1.0), []
  for _ in range(200):  # unbounded, exp(-0.125 * 200) would take lambda to 1e-11
    lam = thermostat(lam, f32(0.0), target, gain, floor)
    seen.append(float(lam))
  assert all(b <= a for a, b in zip(seen, seen[1:]))  # falls monotonically ...
  assert min(seen) >= lowest * (1 - 1e-6)  # ... never more than one step under the floor
  np.testing.assert_allclose(seen[-1], seen[-2], rtol=1e-6)  # ... and settles there
  assert seen[-1] <= float(floor)
  # Back above the target, it climbs from there.
  assert float(thermostat(lam, f32(0.5), target, gain, floor)) > seen[-1]


# --------------------------------------------------------------------------- exploration


def test_exploration_leaves_the_forward_pass_unchanged():
  """Attention computed at explored closed tokens only feeds the gate's gradient: the
  logits, the gates (probabilities, decisions, values applied) and the observables of the
  open tokens equal those without exploration, dense and routed."""
  kw = dict(gate="hard", gate_bias_init=-0.5, gate_sampling=True, exploration_floor=0.2)
  explore_def, params = functional.init(config(exploration=0.3, **kw), jax.random.key(0))
  plain_def, _ = functional.init(config(exploration=0.0, **kw), jax.random.key(0))
  toks, rng = tokens(1), jax.random.key(2)
  run = lambda model_def, capacity, stats="mean": functional.apply(
    model_def, params, toks, rng=rng, stats=stats, capacity=capacity
  )
  logits_e, aux_e = run(explore_def, 1.0)
  logits_p, aux_p = run(plain_def, 1.0)
  open_rate = np.asarray(aux_p.open_rate)
  assert np.all((0.1 < open_rate) & (open_rate < 0.9)), open_rate
  np.testing.assert_array_equal(aux_p.compute_rate, aux_p.open_rate)
  assert np.all(np.asarray(aux_e.compute_rate) > open_rate + 0.05)  # exploration happened
  np.testing.assert_array_equal(aux_e.is_open, aux_p.is_open)
  np.testing.assert_array_equal(aux_e.gate, aux_p.gate)
  np.testing.assert_array_equal(aux_e.gate_prob, aux_p.gate_prob)
  scale = float(jnp.max(jnp.abs(logits_p)))
  np.testing.assert_allclose(logits_e, logits_p, rtol=1e-6, atol=1e-6 * scale)
  for a, b in zip(aux_e.stats, aux_p.stats):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Routed: the explored tokens take slots of their own, and still change nothing.
  capacity = max(float(aux_e.capacity_needed), 1 / 8)
  assert capacity < 1.0
  logits, aux = run(explore_def, capacity, stats=None)
  assert not bool(aux.overflow)
  np.testing.assert_array_equal(aux.compute_rate, aux_e.compute_rate)  # the same exploration
  np.testing.assert_array_equal(aux.gate, aux_p.gate)
  np.testing.assert_allclose(logits, logits_p, rtol=1e-5, atol=1e-5 * scale)


def test_exploration_gradient_is_unbiased():
  """The gate's straight-through gradient from a random fraction f of the closed tokens,
  weighted by 1/f, averages (over exploration keys) to the gradient with attention at
  every closed token: the same model exploring all of them (budget 1 with more open than
  closed tokens gives f = 1)."""
  num_keys = 256
  kw = dict(gate="hard", gate_bias_init=0.3, exploration_floor=0.0)
  exact_def, params = functional.init(config(exploration=1.0, **kw), jax.random.key(0))
  sampled_def, _ = functional.init(config(exploration=0.05, **kw), jax.random.key(0))
  toks = tokens(1, batch=4)
  weights = jax.random.normal(jax.random.key(3), (4, SEQ, VOCAB))

  def gate_grad(model_def, rng):
    def loss(params):
      logits, aux = functional.apply(model_def, params, toks, rng=rng, stats=None, capacity=1.0)
      return jnp.sum(logits * weights), aux

    grads, aux = jax.grad(loss, has_aux=True)(params)
    head = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads["blocks"]["gate_head"])])
    return head, aux

  @jax.jit
  def both(keys):
    return gate_grad(exact_def, keys[0]), jax.vmap(functools.partial(gate_grad, sampled_def))(keys)

  (exact, aux_x), (sampled_NP, aux_s) = both(jax.random.split(jax.random.key(4), num_keys))
  open_rate = np.asarray(aux_x.open_rate)
  assert np.all((0.5 < open_rate) & (open_rate < 1.0)), open_rate
  np.testing.assert_array_equal(aux_x.compute_rate, 1.0)  # the reference explores every token
  explored = np.asarray(aux_s.compute_rate)  # [N, L]
  assert np.all(explored.min(axis=0) < 1.0) and np.all(explored.mean(axis=0) > open_rate)
  exact, sampled_NP = np.asarray(exact), np.asarray(sampled_NP)
  mean, var = sampled_NP.mean(axis=0), sampled_NP.var(axis=0, ddof=1)
  # The squared error of the mean against its variance: about 1 when unbiased (~250 with
  # the 1/f weight dropped); a float32 rounding floor for components without variance.
  floor = 1e-5 * np.max(np.abs(exact))
  ratio = np.sum((mean - exact) ** 2) / np.sum(var / num_keys + floor**2)
  assert ratio < 5.0, ratio
  assert np.linalg.norm(mean - exact) < 0.15 * np.linalg.norm(exact)


def test_straight_through_gradient_is_the_soft_gates_near_saturation():
  """Near saturation (bias -12: every gate closed, +12: every gate open; the forward differs
  from the soft gate's by sigmoid(-12) = 6e-6) the gate head's gradient, with attention at
  every closed token (exploration floor ~1), is the soft gate's: an explored closed token
  carries the full derivative of the mix, as an open one does."""
  kw = dict(exploration=0.05, exploration_floor=0.999999)
  hard_def, params = functional.init(config(gate="hard", **kw), jax.random.key(0))
  soft_def, _ = functional.init(config(gate="soft", **kw), jax.random.key(0))
  toks = tokens(1)
  weights = jax.random.normal(jax.random.key(3), (3, SEQ, VOCAB))

  @functools.partial(jax.jit, static_argnums=0)
  def gate_grad(model_def, params, rng):
    def loss(params):
      logits, aux = functional.apply(model_def, params, toks, rng=rng, stats=None, capacity=1.0)
      return jnp.sum(logits * weights), aux

    grads, aux = jax.grad(loss, has_aux=True)(params)
    return grads["blocks"]["gate_head"], aux

  for bias in (-12.0, 12.0):
    saturated = with_params(params, gate_head__out__bias=bias)
    hard, aux = gate_grad(hard_def, saturated, jax.random.key(5))
    soft, _ = gate_grad(soft_def, saturated, None)
    np.testing.assert_array_equal(aux.is_open, bias > 0)
    np.testing.assert_array_equal(aux.compute_rate, 1.0)  # every closed token explored
    for (path, h), s in zip(jax.tree_util.tree_leaves_with_path(hard), jax.tree.leaves(soft)):
      if "offset" in jax.tree_util.keystr(path):  # set by training, no gradient by design
        np.testing.assert_array_equal(h, 0.0)
        np.testing.assert_array_equal(s, 0.0)
        continue
      scale = float(jnp.max(jnp.abs(s)))
      assert scale > 0.0
      np.testing.assert_allclose(
        h, s, rtol=1e-3, atol=1e-3 * scale, err_msg=f"{bias} {jax.tree_util.keystr(path)}"
      )


def test_spread_gradient_reaches_gates_far_from_the_threshold():
  """gate_gradient="spread" changes the straight-through derivative only: the forward is
  the same; with logits within a unit of each other it is the sigmoid's derivative
  exactly; with logits spread over hundreds (the scale the quantile threshold lets them
  reach) and all far below the threshold (every gate closed, every closed token explored),
  the sigmoid's derivative vanishes while the spread's still reaches the gate head."""
  kw = dict(gate="hard", exploration=0.05, exploration_floor=0.999999)
  sigmoid_def, params = functional.init(config(gate_gradient="sigmoid", **kw), jax.random.key(0))
  spread_def, _ = functional.init(config(gate_gradient="spread", **kw), jax.random.key(0))
  toks = tokens(1)
  weights = jax.random.normal(jax.random.key(3), (3, SEQ, VOCAB))

  @functools.partial(jax.jit, static_argnums=0)
  def run(model_def, params):
    def loss(params):
      logits, aux = functional.apply(
        model_def, params, toks, rng=jax.random.key(5), stats=None, capacity=1.0
      )
      return jnp.sum(logits * weights), (logits, aux)

    grads, out = jax.grad(loss, has_aux=True)(params)
    head = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads["blocks"]["gate_head"])])
    return head, out

  (g_sigmoid, (logits_s, aux)), (g_spread, (logits_p, _)) = (
    run(sigmoid_def, params),
    run(spread_def, params),
  )
  assert float(np.std(np.asarray(aux.gate_logit))) < 1.0
  np.testing.assert_array_equal(logits_s, logits_p)
  np.testing.assert_allclose(g_spread, g_sigmoid, rtol=1e-6, atol=1e-9)

  head = params["blocks"]["gate_head"]["out"]
  wide = jax.tree.map(lambda x: x, params)
  bias = jnp.full_like(head["bias"][...], -4000.0)
  wide["blocks"]["gate_head"]["out"]["kernel"].value = 2000.0 * head["kernel"][...]
  wide["blocks"]["gate_head"]["out"]["bias"].value = bias
  (g_sigmoid, (logits_s, aux)), (g_spread, (logits_p, _)) = (
    run(sigmoid_def, wide),
    run(spread_def, wide),
  )
  logit = np.asarray(aux.gate_logit)
  assert np.all(logit < -100.0) and np.std(logit) > 100.0
  np.testing.assert_array_equal(aux.compute_rate, 1.0)
  np.testing.assert_array_equal(logits_s, logits_p)
  assert float(jnp.linalg.norm(g_sigmoid)) < 1e-9 < float(jnp.linalg.norm(g_spread))


def test_centered_gradient_moves_which_gates_open_not_their_level():
  """center_gate_gradient: the forward pass is the same; each layer's gate logits get a
  gradient of zero mean, so the gate head's output bias (one per layer, shifting every
  logit of the layer alike) gets none while its kernels still learn; without it the
  bias's gradient is the sum of the logits' and is not zero."""
  kw = dict(gate="hard", exploration=0.05, exploration_floor=0.3)
  plain_def, params = functional.init(config(**kw), jax.random.key(0))
  centered_def, _ = functional.init(config(center_gate_gradient=True, **kw), jax.random.key(0))
  toks = tokens(1)
  weights = jax.random.normal(jax.random.key(3), (3, SEQ, VOCAB))

  @functools.partial(jax.jit, static_argnums=0)
  def run(model_def):
    def loss(params):
      logits, aux = functional.apply(
        model_def, params, toks, rng=jax.random.key(5), stats=None, capacity=1.0
      )
      return jnp.sum(logits * weights) + jnp.sum(aux.gate_prob), (logits, aux)

    grads, out = jax.grad(loss, has_aux=True)(params)
    return grads["blocks"]["gate_head"]["out"], out

  (g_plain, (logits_p, aux_p)), (g_centered, (logits_c, aux_c)) = run(plain_def), run(centered_def)
  np.testing.assert_array_equal(logits_p, logits_c)
  np.testing.assert_array_equal(aux_p.is_open, aux_c.is_open)
  assert 0.0 < float(np.mean(aux_p.is_open)) < 1.0
  bias_plain, bias_centered = g_plain["bias"][...], g_centered["bias"][...]
  assert bias_plain.shape[0] == 2 and np.all(np.abs(np.asarray(bias_plain)) > 1e-3)
  kernel = g_centered["kernel"][...]
  scale = float(np.max(np.abs(np.asarray(kernel))))
  assert scale > 1e-3
  np.testing.assert_allclose(bias_centered, 0.0, atol=1e-5 * scale)


# ------------------------------------------------------------------------------ saturation


@pytest.mark.parametrize("bias", [30.0, -30.0])
def test_saturated_soft_gate_equals_hard_gate(bias):
  """Driven to saturation by its bias, the soft gate mixes as the hard gate with the same
  parameters: every gate open (+30) gives the attention-only forward (gate="open"), every
  gate closed (-30) the recurrence-only one (gate="closed")."""
  hard_def, params = functional.init(config(gate="hard"), jax.random.key(0))
  soft_def, soft_params = functional.init(config(gate="soft"), jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, params, soft_params)  # one structure
  params = with_params(params, gate_head__out__bias=bias)
  forced = "open" if bias > 0 else "closed"
  forced_def, forced_params = functional.init(config(gate=forced), jax.random.key(1))
  forced_params = with_params(forced_params, source=params)
  toks = tokens(1)
  logits_h, aux_h = functional.apply(hard_def, params, toks, stats=None, capacity=1.0)
  logits_s, aux_s = functional.apply(soft_def, params, toks, stats=None)
  logits_f, _ = functional.apply(forced_def, forced_params, toks, stats=None)
  np.testing.assert_array_equal(aux_h.is_open, bias > 0)
  np.testing.assert_array_equal(aux_s.is_open, bias > 0)
  np.testing.assert_array_equal(aux_h.gate, 1.0 if bias > 0 else 0.0)
  np.testing.assert_allclose(aux_s.gate, 1.0 if bias > 0 else 0.0, atol=1e-12)
  scale = float(jnp.max(jnp.abs(logits_f)))
  np.testing.assert_allclose(logits_s, logits_h, rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(logits_h, logits_f, rtol=1e-5, atol=1e-5 * scale)
  # The two forced forwards differ, so matching one of them says which channel was mixed in.
  other_def, other_params = functional.init(
    config(gate="closed" if bias > 0 else "open"), jax.random.key(1)
  )
  logits_o, _ = functional.apply(
    other_def, with_params(other_params, source=params), toks, stats=None
  )
  assert not np.allclose(logits_o, logits_f, rtol=1e-3, atol=1e-3 * scale)
