"""The TGN language model: sparse == dense execution, causality in every mode,
greedy generation == iterated forward passes, the functional facade, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import SEQ, VOCAB, tiny_config

from tgn_jax import TGNLM, TGNConfig, count_params, functional


def config(**overrides):
  return tiny_config(**{"capacity_multiple": 2, **overrides})


def tokens(seed, batch=3, seq_len=SEQ):
  return jax.random.randint(jax.random.key(seed), (batch, seq_len), 0, VOCAB)


MODES = [
  dict(mixer="tgn", gate=g, recurrence=r)
  for g in ("hard", "soft", "open", "closed")
  for r in ("mingru", "gru")
] + [dict(mixer="attention"), dict(mixer="recurrent"), dict(mixer="tgn", gate="hard", kv="open")]


def mode_id(mode):
  return "-".join(str(v) for v in mode.values())


# ---------------------------------------------------------------------------- execution


@pytest.mark.parametrize(
  "bias, training, kv",
  [
    (-0.5, False, "all"),
    (-0.5, True, "all"),
    (-3.0, False, "all"),
    (-3.0, True, "all"),
    (30.0, False, "all"),
    (-0.5, False, "open"),
    (-0.5, True, "open"),
    (30.0, False, "open"),
  ],
  ids=[
    "random",
    "random-train",
    "all_closed",
    "all_closed-train",
    "all_open",
    "kv_open-random",
    "kv_open-random-train",
    "kv_open-all_open",
  ],
)
def test_sparse_equals_dense_logits_and_gradients(bias, training, kv):
  """Routed at the smallest capacity that holds the busiest row (so that row's count is
  exactly the capacity), sparse execution equals dense; one slot less overflows and says so."""
  kw = dict(
    gate="hard",
    gate_input="recurrence",  # the open rates the cases below were chosen for
    gate_bias_init=bias,
    exploration=0.5 if training else 0.0,
    exploration_floor=0.25,
    gate_sampling=training and bias > -3,
    capacity_multiple=1,
    kv=kv,
  )
  sparse_def, params = functional.init(
    config(attention_execution="sparse", **kw), jax.random.key(0)
  )
  dense_def, dense_params = functional.init(
    config(attention_execution="dense", **kw), jax.random.key(0)
  )
  jax.tree.map(np.testing.assert_array_equal, params, dense_params)
  toks = tokens(1)
  rng = jax.random.key(2) if training else None
  weights = jax.random.normal(jax.random.key(3), (3, SEQ, VOCAB))
  penalty = 1.0 if bias > -3 else 0.0  # closed cases: only the mix's straight-through gradient

  def loss(params, model_def, capacity):
    logits, aux = functional.apply(model_def, params, toks, rng=rng, stats=None, capacity=capacity)
    return jnp.sum(logits * weights) + penalty * jnp.sum(aux.gate_prob), (logits, aux)

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 2))
  (_, (logits_d, aux_d)), grads_d = grad(params, dense_def, 1.0)
  needed = float(aux_d.capacity_needed)  # the busiest row of any segment, as a fraction
  segment = config().segment_len
  capacity = max(needed, 1 / segment)
  (_, (logits_s, aux_s)), grads_s = grad(params, sparse_def, capacity)
  assert not bool(aux_s.overflow)
  assert capacity == 1.0 if bias > 0 else capacity < 1.0  # all open: nothing to skip
  np.testing.assert_array_equal(aux_s.gate, aux_d.gate)
  np.testing.assert_array_equal(aux_s.capacity_needed, aux_d.capacity_needed)
  open_rate = float(jnp.mean(aux_s.open_rate))
  if bias <= -3:
    assert open_rate == 0.0
  elif bias > 0:
    assert open_rate == 1.0
  else:
    assert 0.1 < open_rate < 0.9
  scale = float(jnp.max(jnp.abs(logits_d)))
  np.testing.assert_allclose(logits_s, logits_d, rtol=1e-5, atol=1e-5 * scale)
  for (path, gs), gd in zip(jax.tree_util.tree_leaves_with_path(grads_s), jax.tree.leaves(grads_d)):
    tol = 1e-4 * max(1.0, float(jnp.max(jnp.abs(gd))))
    np.testing.assert_allclose(gs, gd, rtol=1e-4, atol=tol, err_msg=jax.tree_util.keystr(path))
  if bias <= -3:
    # Every gate is closed, but not saturated (sigmoid(-3) = 0.05): without exploration the
    # gate gets no gradient at all; explored tokens give it the straight-through signal.
    head_grad = float(jnp.max(jnp.abs(grads_s["blocks"]["gate_head"]["out"]["kernel"][...])))
    assert (head_grad > 0.0) == training, head_grad
  if needed >= 2 / segment:
    (_, (logits_o, aux_o)), grads_o = grad(params, sparse_def, needed - 1 / segment)
    assert bool(aux_o.overflow)
    # A token left out changes the logits (open) or the gate's gradient (explored).
    assert not (
      np.allclose(logits_o, logits_d, rtol=1e-5, atol=1e-5 * scale)
      and all(
        np.allclose(go, gd, rtol=1e-4, atol=1e-4)
        for go, gd in zip(jax.tree.leaves(grads_o), jax.tree.leaves(grads_d))
      )
    )


def test_pallas_kernel_in_the_model_equals_xla():
  """The model routed through the Pallas kernel (interpret mode here) gives the XLA path's
  logits and gradients, and decodes as its own forward pass does."""
  kw = dict(gate_bias_init=-0.5, capacity_multiple=1)
  model_def, params = functional.init(config(attention_impl="pallas", **kw), jax.random.key(0))
  xla_def, _ = functional.init(
    config(attention_impl="xla", attention_execution="dense", **kw), jax.random.key(0)
  )
  toks = tokens(1)
  weights = jax.random.normal(jax.random.key(3), (3, SEQ, VOCAB))

  def loss(params, model_def, capacity):
    logits, aux = functional.apply(model_def, params, toks, stats=None, capacity=capacity)
    return jnp.sum(logits * weights), aux

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 2))
  (value_x, aux), grads_x = grad(params, xla_def, 1.0)
  capacity = max(float(aux.capacity_needed), 1 / 8)
  (value_p, aux_p), grads_p = grad(params, model_def, capacity)
  assert capacity < 1.0 and not bool(aux_p.overflow)
  np.testing.assert_allclose(value_p, value_x, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_x)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(jnp.max(jnp.abs(b)))))
  model = nnx.merge(model_def, params)
  generated, logits = model.generate(tokens(2, seq_len=6), 6, return_logits=True)
  full, _ = model(generated, stats=None)
  np.testing.assert_allclose(logits, full[:, 5:-1], rtol=1e-5, atol=1e-5)


def test_eager_call_redoes_an_overflowing_capacity():
  """Called eagerly, the model routes at the smallest capacity bucket that holds the tokens:
  after a call that overflows it recomputes, so the result always equals dense execution."""
  from tgn_jax.nn import model as model_module

  cfg = config(
    gate_bias_init=0.0, capacity_buckets=(0.125, 0.25, 0.5, 0.75, 1.0), capacity_multiple=1
  )
  model = TGNLM(cfg, rngs=nnx.Rngs(5))
  dense_def = nnx.graphdef(TGNLM(cfg.replace(attention_execution="dense"), rngs=nnx.Rngs(0)))
  dense = lambda t: functional.apply(dense_def, nnx.state(model), t, stats=None)[0]
  few, many = tokens(21), tokens(22)
  model.blocks.gate_head.out.bias[...] = jnp.full((2, 1), -2.0)  # few open: a small bucket
  for _ in range(2):
    logits, aux = model(few, stats=None)
    assert not bool(aux.overflow)
    np.testing.assert_allclose(logits, dense(few), rtol=1e-5, atol=1e-5)
  ladder = next(
    v for k, v in model_module._LADDERS.items() if k[1] == few.shape and k[0] == nnx.graphdef(model)
  )
  small = ladder.current
  assert small < 1.0
  model.blocks.gate_head.out.bias[...] = jnp.full((2, 1), 3.0)  # now most gates open
  _, aux = model(many, stats=None, capacity=small)
  assert bool(aux.overflow)  # at the small capacity this batch overflows ...
  logits, aux = model(many, stats=None)  # ... so the eager call redoes it larger
  assert not bool(aux.overflow) and ladder.current > small
  np.testing.assert_allclose(logits, dense(many), rtol=1e-5, atol=1e-5)


def test_prefill_never_keeps_an_overflow():
  """A prefill at an explicit capacity too small for the prompt is redone (its cache is
  kept, so nothing may be left out); under a transformation such a capacity is refused."""
  model = TGNLM(
    config(gate_bias_init=3.0, capacity_multiple=1, max_seq_len=64, segment_len=64),
    rngs=nnx.Rngs(6),
  )
  prompt = tokens(41, batch=2, seq_len=48)
  exact, exact_cache = model.prefill(prompt, 50, capacity=1.0)
  small, small_cache = model.prefill(prompt, 50, capacity=0.125)
  np.testing.assert_allclose(small, exact, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(small_cache), jax.tree.leaves(exact_cache)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="cannot check for overflow"):
    jax.jit(lambda t: model.prefill(t, 50, capacity=0.5))(prompt)


def test_compiled_training_gradient_and_generate_hold_no_conditional():
  cfg = config(n_layers=3, max_seq_len=64, segment_len=16, capacity_multiple=4, gate_bias_init=0.0)
  model_def, params = functional.init(cfg, jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (2, 48), 0, VOCAB)  # three segments

  def loss(params):
    logits, aux = functional.apply(
      model_def, params, toks, rng=jax.random.key(2), stats=None, capacity=0.5
    )
    return jnp.mean(logits**2) + jnp.mean(aux.gate_prob)

  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  assert hlo.count(" conditional(") == 0
  generate = jax.jit(lambda p, t: nnx.merge(model_def, p).generate(t, 10))
  hlo = generate.lower(params, toks[:, :20]).compile().as_text()
  assert hlo.count(" conditional(") == 0
  from tgn_jax.nn import model as model_module  # a routed prefill, as eager calls run it

  graph_def, state = nnx.split(nnx.merge(model_def, params))
  hlo = model_module._prefill.lower(graph_def, state, toks, 60, 0.5).compile().as_text()
  assert hlo.count(" conditional(") == 0 and "gather" in hlo


# ---------------------------------------------------------------------------- causality


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_causality(mode):
  model = TGNLM(
    config(gate_bias_init=0.0, exploration=0.3, gate_sampling=True, **mode), rngs=nnx.Rngs(0)
  )
  forward = jax.jit(lambda t: model(t, rng=jax.random.key(7), stats=None)[0])
  base = tokens(6)
  logits = forward(base)
  for t in (0, 5, SEQ - 2):
    changed = base.at[:, t + 1 :].set((base[:, t + 1 :] + 1 + t) % VOCAB)
    other = forward(changed)
    np.testing.assert_allclose(other[:, : t + 1], logits[:, : t + 1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(other[:, t + 1 :], logits[:, t + 1 :])


# ---------------------------------------------------------------------------- generation


@pytest.mark.parametrize(
  "mode",
  [
    dict(mixer="tgn", gate="hard", recurrence="mingru"),
    dict(mixer="tgn", gate="hard", recurrence="gru"),
    dict(mixer="tgn", gate="hard", recurrence="mingru", kv="open"),
    dict(mixer="tgn", gate="soft", recurrence="mingru"),
    dict(mixer="attention"),
    dict(mixer="attention", rope=False, learned_positions=True, norm="none", mlp_activation="relu"),
    dict(mixer="recurrent"),
  ],
  ids=mode_id,
)
def test_greedy_generate_equals_iterated_forward(mode):
  """Each decoding step's logits equal the full forward pass's at that position, and the
  greedy tokens follow; with the hard gate, some steps mix open and closed rows."""
  model = TGNLM(config(gate_bias_init=0.0, **mode), rngs=nnx.Rngs(1))
  prompt_len, new, batch = 6, 10, 4
  prompt = tokens(8, batch=batch, seq_len=prompt_len)
  generated, logits = model.generate(prompt, new, return_logits=True)
  assert generated.shape == (batch, prompt_len + new) and generated.dtype == jnp.int32
  assert logits.shape == (batch, new, VOCAB) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(generated[:, :prompt_len], prompt)
  np.testing.assert_array_equal(generated[:, prompt_len:], jnp.argmax(logits, -1))
  # One forward pass over the generated sequence (causality makes the last token harmless).
  full, aux = model(generated, stats=None)
  scale = float(jnp.max(jnp.abs(full)))
  np.testing.assert_allclose(logits, full[:, prompt_len - 1 : -1], rtol=1e-5, atol=1e-5 * scale)
  if mode.get("gate") == "hard":
    logits_BV, cache = model.prefill(prompt, prompt_len + new)
    decoded = model.decode(cache, logits_BV, prompt_len, new)
    np.testing.assert_array_equal(decoded.tokens, generated[:, prompt_len:])
    is_open = np.asarray(decoded.is_open[:, :, 1:])  # [L, B, steps]: the decoding steps' own
    np.testing.assert_array_equal(is_open, np.asarray(aux.is_open[:, :, prompt_len + 1 :]))
    mixed = is_open.any(axis=1) & ~is_open.all(axis=1)
    assert mixed.any(), "no decoding step had open and closed rows together"


def test_kv_open_cache_holds_open_tokens_only():
  """With kv="open" a prefilled cache holds the prompt's open tokens (in the routing
  capacity) plus a slot per token to come; its positions are theirs."""
  model = TGNLM(
    config(kv="open", gate_bias_init=-0.5, max_seq_len=64, segment_len=64, capacity_multiple=1),
    rngs=nnx.Rngs(2),
  )
  prompt = tokens(40, batch=3, seq_len=48)
  _, aux = model(prompt, stats=None, capacity=1.0)
  capacity = float(aux.capacity_needed)  # the busiest row's open tokens, exactly
  assert capacity < 0.5
  _, cache = model.prefill(prompt, 56, capacity=capacity)
  is_open = np.asarray(aux.is_open)  # [L, B, T]
  for layer, c in enumerate(cache):
    counts = is_open[layer].sum(axis=1)
    np.testing.assert_array_equal(c.count, counts)
    assert c.k.shape[1] < 56 and c.k.shape[1] >= counts.max() + 8
    for row in range(3):
      np.testing.assert_array_equal(
        c.positions[row, : counts[row]], np.flatnonzero(is_open[layer, row])
      )


def test_decoding_advances_one_position_per_step():
  """Decoding from a one-token prompt to max_seq_len: every step's logits equal the
  forward pass's at its own position (RoPE and the cache slot depend on it), and the
  last step writes the cache's last slot."""
  model = TGNLM(config(mixer="attention"), rngs=nnx.Rngs(3))
  prompt = tokens(30, batch=2, seq_len=1)
  generated, logits = model.generate(prompt, 31, return_logits=True)
  assert generated.shape == (2, 32)
  full, _ = model(generated, stats=None)
  np.testing.assert_allclose(logits, full[:, :-1], rtol=1e-5, atol=1e-5)
  # Shifting the prompt's position by one would change every step's logits.
  shifted, _ = model(jnp.concatenate([prompt, generated[:, :-1]], axis=1), stats=None)
  assert not np.allclose(logits, shifted[:, 1:], rtol=1e-3, atol=1e-3)


def test_decoding_continues_from_the_returned_cache():
  """prefill, decode 4 tokens, decode 5 more from the returned cache and next logits:
  the same tokens and logits as decoding 9 at once."""
  model = TGNLM(config(gate_bias_init=0.0), rngs=nnx.Rngs(4))
  prompt = tokens(31, batch=3, seq_len=6)
  logits, cache = model.prefill(prompt, 15)
  whole = model.decode(cache, logits, 6, 9)
  logits, cache = model.prefill(prompt, 15)
  first = model.decode(cache, logits, 6, 4)
  second = model.decode(first.cache, first.next_logits, 10, 5)
  np.testing.assert_array_equal(jnp.concatenate([first.tokens, second.tokens], 1), whole.tokens)
  np.testing.assert_allclose(
    jnp.concatenate([first.logits, second.logits], 1), whole.logits, rtol=1e-5, atol=1e-5
  )
  assert whole.is_open.shape == (2, 3, 9)
  with pytest.raises(ValueError, match="exceeds the cache"):
    model.decode(second.cache, second.next_logits, 15, 1)


def test_generate_samples_with_temperature_and_checks_input():
  model = TGNLM(config(), rngs=nnx.Rngs(2))
  prompt = tokens(9, batch=2, seq_len=4)
  a = model.generate(prompt, 10, temperature=1.0, rng=jax.random.key(0))
  b = model.generate(prompt, 10, temperature=1.0, rng=jax.random.key(0))
  c = model.generate(prompt, 10, temperature=1.0, rng=jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  with pytest.raises(ValueError, match="needs an rng"):
    model.generate(prompt, 3, temperature=0.5)
  with pytest.raises(ValueError, match="exceeds max_seq_len"):
    model.generate(prompt, 40)
  with pytest.raises(ValueError, match="max_new_tokens"):
    model.generate(prompt, 0)


# ---------------------------------------------------------------------------- facade & dtypes


def test_functional_apply_under_jit_grad_vmap():
  model_def, params = functional.init(config(), jax.random.key(3))
  toks = tokens(10)
  eager, _ = functional.apply(model_def, params, toks, stats=None)
  model = nnx.merge(model_def, params)
  np.testing.assert_array_equal(eager, model(toks, stats=None)[0])  # the module, same numbers

  def loss(params, toks):
    logits, _ = functional.apply(model_def, params, toks, stats=None)
    return jnp.mean(
      jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, toks[..., None], -1)[..., 0]
    )

  grads = jax.jit(jax.grad(loss))(params, toks)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.max(jnp.abs(grads["embed"]["embedding"][...]))) > 0
  stacked = jnp.stack([toks, tokens(11)])
  vmapped = jax.vmap(lambda t: functional.apply(model_def, params, t, stats=None)[0])(stacked)
  np.testing.assert_allclose(vmapped[0], eager, rtol=1e-5, atol=1e-5)


def test_tree_mode_split_merge_round_trip():
  model = TGNLM(config(temperature="learned"), rngs=nnx.Rngs(4))
  graph_def, state = nnx.split(model, graph=False)
  clone = nnx.merge(graph_def, state)
  toks = tokens(12)
  np.testing.assert_array_equal(model(toks)[0], clone(toks)[0])


@pytest.mark.parametrize("mode", [dict(gate="hard"), dict(mixer="attention")], ids=mode_id)
def test_bfloat16_forward_and_grad_finite(mode):
  model_def, params = functional.init(config(dtype="bfloat16", **mode), jax.random.key(5))
  toks = tokens(13)

  def loss(params):
    logits, aux = functional.apply(model_def, params, toks, rng=jax.random.key(0))
    return jnp.mean(logits**2), (logits, aux)

  grads, (logits, aux) = jax.jit(jax.grad(loss, has_aux=True))(params)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert bool(jnp.all(jnp.isfinite(aux.stats.entropy)))


# ---------------------------------------------------------------------------- aux


def test_aux_shapes_and_stat_means():
  model = TGNLM(config(gate_bias_init=0.0), rngs=nnx.Rngs(6))
  logits, aux = model(tokens(14), stats="token")
  assert logits.shape == (3, SEQ, VOCAB)
  assert aux.gate_prob.shape == aux.gate.shape == (2, 3, SEQ)
  assert aux.open_rate.shape == aux.compute_rate.shape == (2,)
  assert aux.token_stats.entropy.shape == (2, 3, SEQ, 2)
  is_open = np.asarray(aux.is_open)
  np.testing.assert_allclose(aux.open_rate, is_open.mean(axis=(1, 2)))
  np.testing.assert_array_equal(is_open, np.asarray(aux.gate) == 1.0)
  np.testing.assert_array_equal(is_open, np.asarray(aux.gate_prob) > 0.5)
  token = np.asarray(aux.token_stats.specific_heat)
  assert np.all(np.isnan(token[~is_open]))  # not computed: no value pretends otherwise
  for layer in range(2):
    np.testing.assert_allclose(
      aux.stats.specific_heat[layer], token[layer][is_open[layer]].mean(), rtol=1e-5
    )
  _, aux_none = model(tokens(14), stats=None)
  assert aux_none.stats is None and aux_none.token_stats is None


def test_learned_temperature_is_trained():
  model_def, params = functional.init(
    config(temperature="learned", mixer="attention"), jax.random.key(7)
  )
  grads = jax.grad(lambda p: jnp.mean(functional.apply(model_def, p, tokens(15))[0] ** 2))(params)
  assert float(jnp.min(jnp.abs(grads["blocks"]["attention"]["log_temperature"][...]))) > 0


def test_count_params_matches_module_sizes():
  d, n_layers, mlp, vocab = 16, 2, 32, VOCAB
  attention = 4 * d * d
  block_common = 2 * d + 2 * d * mlp  # two norms + MLP (no biases)
  expected_transformer = vocab * d + d + n_layers * (block_common + attention)
  assert count_params(config(mixer="attention")) == expected_transformer
  gate = (  # gate_input="both": the block's input beside the recurrence's output, 2 * d
    2 * d * (d // 4 if d // 4 >= 8 else 8)
    + (d // 4 if d // 4 >= 8 else 8)
    + (8 if d // 4 < 8 else d // 4)
    + 1
  )
  mingru = d * 2 * d + 2 * d
  assert count_params(config()) == expected_transformer + n_layers * (mingru + gate)
  model = TGNLM(config(), rngs=nnx.Rngs(0))
  assert count_params(model) == count_params(config()) == count_params(nnx.state(model))


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
  "overrides, match",
  [
    (dict(d_model=30, n_heads=4), "d_model .* divisible by n_heads"),
    (dict(d_model=0), "d_model must be a positive integer"),
    (dict(n_layers=-1), "n_layers must be a positive integer"),
    (dict(vocab_size=2.5), "vocab_size must be a positive integer"),
    (dict(mixer="mamba"), "mixer must be one of"),
    (dict(gate="half"), "gate must be one of"),
    (dict(recurrence="lstm"), "recurrence must be one of"),
    (dict(attention_execution="sparse", gate="soft"), "needs gate='hard'"),
    (dict(kv="open", gate="soft"), "kv='open' needs mixer='tgn' and gate='hard'"),
    (dict(kv="some"), "kv must be one of"),
    (dict(exploration=1.5), "exploration must be in"),
    (dict(exploration_floor=-0.1), "exploration_floor must be in"),
    (dict(temperature=-1.0), "temperature must be a positive number"),
    (dict(temperature="hot"), "temperature must be None"),
    (dict(dtype="float8"), "dtype must be one of"),
    (dict(capacity_buckets=(0.5, 0.25, 1.0)), "capacity_buckets"),
    (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
  ],
)
def test_config_validation(overrides, match):
  with pytest.raises(ValueError, match=match):
    config(**overrides)


@pytest.mark.parametrize(
  "bad, error, match",
  [
    (jnp.zeros((3,), jnp.int32), ValueError, r"tokens must be an int array \[B, T\]"),
    (jnp.zeros((2, 4), jnp.float32), TypeError, "integer token ids"),
    (jnp.zeros((2, 40), jnp.int32), ValueError, "exceeds max_seq_len"),
    (jnp.full((2, 4), VOCAB), ValueError, r"must lie in \[0, vocab_size"),
  ],
)
def test_bad_tokens(bad, error, match):
  model = TGNLM(config(), rngs=nnx.Rngs(0))
  with pytest.raises(error, match=match):
    model(bad)
  with pytest.raises(ValueError, match="stats must be"):
    model(tokens(0), stats="all")


@pytest.mark.gpu
def test_sparse_equals_dense_bf16_cudnn_on_gpu():
  """Routed through cuDNN (per-row query lengths beside the position mask) at the capacity
  the ladder picks, and one that overflows: values and gradients as dense execution."""
  kw = dict(
    vocab_size=256,
    d_model=256,
    n_heads=4,
    n_layers=2,
    max_seq_len=1024,
    d_mlp=512,
    gate="hard",
    gate_bias_init=-0.5,
    dtype="bfloat16",
    attention_impl="cudnn",
    segment_len=512,
  )
  sparse_def, params = functional.init(
    TGNConfig(attention_execution="sparse", **kw), jax.random.key(0)
  )
  dense_def, _ = functional.init(TGNConfig(attention_execution="dense", **kw), jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (2, 1024), 0, 256)

  def loss(params, model_def, capacity):
    logits, aux = functional.apply(model_def, params, toks, capacity=capacity)
    return jnp.mean(logits.astype(jnp.float32) ** 2), (logits, aux)

  run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 2))
  (_, (dense, aux)), dense_grads = run(params, dense_def, 1.0)
  assert 0.05 < float(jnp.mean(aux.open_rate)) < 0.5
  capacity = max(float(aux.capacity_needed), 0.125)
  (_, (sparse, aux_s)), sparse_grads = run(params, sparse_def, capacity)
  assert not bool(aux_s.overflow) and capacity < 1.0
  err = float(jnp.linalg.norm(sparse - dense) / jnp.linalg.norm(dense))
  assert err < 2e-2, err
  for gs, gd in zip(jax.tree.leaves(sparse_grads), jax.tree.leaves(dense_grads)):
    gs, gd = gs.astype(jnp.float32), gd.astype(jnp.float32)
    assert float(jnp.linalg.norm(gs - gd)) <= 5e-2 * float(jnp.linalg.norm(gd)) + 1e-6
  (_, (_, aux_o)), _ = run(params, sparse_def, float(aux.capacity_needed) / 2)
  assert bool(aux_o.overflow)


def test_module_call_goes_through_functional_with_one_split(monkeypatch):
  config = TGNConfig(vocab_size=16, d_model=16, n_layers=2, n_heads=2, max_seq_len=8)
  model = TGNLM(config, rngs=nnx.Rngs(0))
  tokens = jnp.arange(8, dtype=jnp.int32)[None] % 16
  calls = {"split": 0, "apply": 0}
  real_split, real_apply = nnx.split, functional.apply

  def counting_split(*args, **kwargs):
    calls["split"] += 1
    return real_split(*args, **kwargs)

  def counting_apply(*args, **kwargs):
    calls["apply"] += 1
    return real_apply(*args, **kwargs)

  monkeypatch.setattr(nnx, "split", counting_split)
  monkeypatch.setattr(functional, "apply", counting_apply)
  logits, _ = model(tokens, capacity=1.0)
  assert calls == {"split": 1, "apply": 1}
  model_def, params = real_split(model)
  expected, _ = real_apply(model_def, params, tokens, capacity=1.0)
  np.testing.assert_array_equal(logits, expected)
  calls.update(split=0)
  jax.jit(lambda p: real_apply(model_def, p, tokens, capacity=1.0)[0]).lower(params)
  assert calls["split"] == 0  # the pure path traces without splitting the model


def test_given_gate_replaces_the_learned_decision():
  config = TGNConfig(
    vocab_size=16, d_model=16, n_layers=2, n_heads=2, max_seq_len=8, gate_bias_init=0.3
  )
  model_def, params = functional.init(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 16)
  logits, aux = functional.apply(model_def, params, tokens, capacity=1.0)
  # The learned decision, given back, reproduces the forward pass exactly.
  same, _ = functional.apply(model_def, params, tokens, capacity=1.0, open_LBT=aux.is_open)
  np.testing.assert_array_equal(logits, same)
  closed = jnp.zeros_like(aux.is_open)
  other, other_aux = functional.apply(model_def, params, tokens, capacity=1.0, open_LBT=closed)
  assert aux.is_open.any() and not other_aux.is_open.any()
  assert not np.allclose(logits, other)
  with pytest.raises(ValueError, match="open_LBT must be bool"):
    functional.apply(model_def, params, tokens, open_LBT=closed[0])


def test_gate_reading_the_block_input_is_causal():
  config = TGNConfig(
    vocab_size=16, d_model=16, n_layers=2, n_heads=2, max_seq_len=8, gate_input="both"
  )
  model_def, params = functional.init(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (1, 8), 0, 16)
  changed = tokens.at[0, 5].set((tokens[0, 5] + 1) % 16)
  _, aux = functional.apply(model_def, params, tokens, capacity=1.0)
  _, aux_changed = functional.apply(model_def, params, changed, capacity=1.0)
  np.testing.assert_array_equal(aux.gate_prob[:, :, :5], aux_changed.gate_prob[:, :, :5])
  assert not np.allclose(aux.gate_prob[:, :, 5], aux_changed.gate_prob[:, :, 5])
  with pytest.raises(ValueError, match="gate_input"):
    TGNConfig(vocab_size=16, gate_input="tokens")
