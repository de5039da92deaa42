"""The benchmark scripts at --tiny sizes, run in-process: result files, rows, plots."""

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks import (
  attention,
  common,
  decode,
  gate_control,
  grokking,
  lm,
  models,
  mqar,
  phase,
  recurrence,
  report,
  throughput,
)
from tgn_jax import TGNConfig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(script, tmp_path, *options):
  """Runs script.main with --tiny; returns the result JSON and its path, after the checks
  every result file must pass (environment recorded, returned == written)."""
  out = tmp_path / "x.json"
  returned = script.main(["--tiny", "--out", str(out), *options])
  results = json.loads(out.read_text())
  assert results["rows"] == json.loads(json.dumps(returned["rows"], default=float))
  for key in ("device", "jax", "date", "command"):
    assert results["env"][key], key
  return results, out


def positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def assert_png(path: Path) -> None:
  data = path.read_bytes()
  assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, path


# ---- the model registry and the shared helpers ----


def test_registry_resolves_each_name_to_its_config_fields():
  from tgn_jax.training.config import resolve

  expected = {  # mixer, recurrence, gate, kv, open rate held, thermostat
    "tgn": ("tgn", "mingru", "hard", "all", None, True),
    "tgn-hard-0.10": ("tgn", "mingru", "hard", "all", 0.10, False),
    "tgn-hard-0.25": ("tgn", "mingru", "hard", "all", 0.25, False),
    "tgn-kvopen-0.10": ("tgn", "mingru", "hard", "open", 0.10, False),
    "tgn-soft-gru": ("tgn", "gru", "soft", "all", None, False),
    "transformer": ("attention", "mingru", "hard", "all", None, False),
    "recurrent": ("recurrent", "mingru", "hard", "all", None, False),
  }
  assert set(models.MODELS) == set(expected) | {models.PLAIN_GPT}
  for name, (*fields, open_rate, thermostat) in expected.items():
    config = TGNConfig(vocab_size=8, **models.architecture(name))  # the library accepts it
    assert [config.mixer, config.recurrence, config.gate, config.kv] == fields
    assert models.MODELS[name].open_rate == open_rate
    options = models.train_options(name)
    trained = resolve(options).model_config(vocab_size=8, max_seq_len=8)
    assert [trained.mixer, trained.recurrence, trained.gate, trained.kv] == fields
    # Only the thermostat model keeps the benchmark's target; the others train without one.
    assert ("target_rate" not in options) == thermostat
    assert thermostat or resolve(options).thermostat.target_rate is None
  # Result files record a model's fields with its held open rate, as they always did.
  assert models.describe("tgn-kvopen-0.10") == dict(
    mixer="tgn", recurrence="mingru", gate="hard", kv="open", open_rate=0.10
  )
  assert models.describe("transformer") == dict(mixer="attention", open_rate=None)
  assert models.describe(models.PLAIN_GPT) == "pure jax + optax"
  with pytest.raises(ValueError, match="not a library model"):
    models.architecture(models.PLAIN_GPT)
  # Every benchmark offers registry names only; callers get copies, never the table.
  assert set(models.TIMED) | set(models.TRAINED) | set(decode.MODELS) == set(models.MODELS)
  models.architecture("tgn")["gate"] = "soft"
  assert models.architecture("tgn") == dict(mixer="tgn", gate="hard")


def test_models_option_takes_a_subset_of_the_benchmark_models():
  parser = common.base_parser("x")
  models.add_option(parser, decode.MODELS)
  assert parser.parse_args([]).models == list(decode.MODELS)
  assert parser.parse_args(["--models", "transformer,tgn-hard-0.10"]).models == [
    "transformer",
    "tgn-hard-0.10",
  ]
  for other in ("recurrent", "nope"):  # in the registry but not this benchmark's, or unknown
    with pytest.raises(SystemExit):
      parser.parse_args(["--models", f"transformer,{other}"])


def test_add_ratio_against_a_hand_computed_table():
  rows = [
    dict(model="transformer", T=8, tokens_per_s=100.0),
    dict(model="plain-gpt", T=8, tokens_per_s=125.0),
    dict(model="tgn-hard-0.10", T=8, tokens_per_s=80.0),
    dict(model="tgn-hard-0.10", T=8, mesh="data:1", tokens_per_s=60.0),
    dict(model="transformer", T=8, mesh="data:1", tokens_per_s=1000.0),  # not a baseline
    dict(model="transformer", T=16, tokens_per_s=40.0),
    dict(model="tgn-hard-0.10", T=16, tokens_per_s=50.0),
    dict(model="tgn-hard-0.10", T=32, tokens_per_s=30.0),  # no baseline at T=32
    dict(model="plain-gpt", T=16, error="OOM"),
  ]
  throughput.add_ratios(rows)
  columns = ("vs_transformer", "vs_plain_gpt", "vs_unsharded")
  assert [tuple(r.get(c) for c in columns) for r in rows] == [
    (1.0, 0.8, None),
    (1.25, 1.0, None),
    (0.8, 0.64, None),
    (0.6, 0.48, 0.75),
    (10.0, 8.0, 10.0),
    (1.0, None, None),
    (1.25, None, None),
    (None, None, None),
    (None, None, None),
  ]
  # Several keys; the rows `where` leaves out get no ratio.
  rows = [
    dict(model=m, context=c, B=b, ms=ms)
    for m, c, b, ms in [
      ("transformer", 4, 1, 2.0),
      ("transformer", 4, 2, 4.0),
      ("tgn", 4, 1, 1.0),
      ("tgn", 4, 2, 1.0),
    ]
  ]
  common.add_ratio(
    rows,
    "fraction",
    "ms",
    ("context", "B"),
    lambda r: r["model"] == "transformer",
    where=lambda r: r["model"] == "tgn",
  )
  assert [r.get("fraction") for r in rows] == [None, None, 0.5, 0.25]


def test_tables(capsys):
  rows = [
    dict(model="tgn", bpb=1.234567, params=1000, open_rate=None),
    dict(model="transformer", bpb=2.0, params=20),
  ]
  assert common.markdown_table(rows, ["model", "bpb", "open_rate", "absent", "params"]) == (
    "| model | bpb | open_rate | params |\n"
    "|---|---|---|---|\n"
    "| tgn | 1.235 | – | 1000 |\n"
    "| transformer | 2 | – | 20 |"
  )
  common.print_table(rows, ["model", "bpb", "open_rate"])
  assert capsys.readouterr().out.splitlines() == [
    "      model    bpb  open_rate",
    "        tgn  1.235          -",
    "transformer      2          -",
  ]


def test_error_text_keeps_the_type_and_first_line():
  assert common.error_text(ValueError("shape mismatch\nfull trace")) == "ValueError: shape mismatch"
  assert common.error_text(MemoryError()) == "MemoryError: "
  assert common.error_text(RuntimeError("x" * 400)) == "RuntimeError: " + "x" * 286


def test_plot_lines_skips_empty_lines_and_saves(tmp_path):
  path = tmp_path / "p.png"
  with common.figure(path) as fig:
    ax = fig.add_subplot()
    common.plot_lines(ax, {"a": [(2, 4.0), (1, 1.0), (3, 9.0)], "empty": []}, xlabel="x")
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == [1.0, 4.0, 9.0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a"]
    assert ax.get_xlabel() == "x"
  assert_png(path)


def test_gathered_fraction_is_what_routing_gathers():
  """The slots per token the benchmarks report equal the slots route_causal_segments
  hands to its function, segment by segment."""
  import jax.numpy as jnp

  from tgn_jax.ops.gate import route_causal_segments

  # 40 tokens in segments of 16, 16, 8; capacity 0.25 in tiles of 8: 8 + 8 + 8 slots.
  def routed_slots(seq_len, fraction, segment_len, multiple):
    slots = []

    def record(x_BCD, positions_BC, lengths_B, end):
      slots.append(x_BCD.shape[1])
      return x_BCD

    route_causal_segments(
      record,
      jnp.ones((1, seq_len), bool),
      jnp.ones((1, seq_len, 1)),
      fraction,
      segment_len,
      multiple,
    )
    return sum(slots)

  for seq_len, fraction, segment_len, multiple, expected in [
    (40, 0.25, 16, 8, 24 / 40),
    (40, 0.25, 16, 1, (4 + 4 + 2) / 40),
    (64, 0.125, 32, 8, 16 / 64),
    (32, 0.25, 8192, 64, 1.0),
  ]:
    assert gate_control.gathered_fraction(seq_len, fraction, segment_len, multiple) == expected
    if expected < 1.0:  # dense computes every query without routing
      assert routed_slots(seq_len, fraction, segment_len, multiple) / seq_len == expected


# ---- speed benchmarks (attention, recurrence, throughput, decode) ----


def test_attention(tmp_path):
  results, out = run(attention, tmp_path, "--impls", "xla,pallas")
  rows = results["rows"]
  assert [(r["path"], r.get("impl"), r["rate"], r["segment"]) for r in rows] == [
    ("dense", None, 1.0, None),
    ("gated", "xla", 0.1, 16),
    ("gated", "pallas", 0.1, 16),
    ("gated", "xla", 0.1, 64),
    ("gated", "pallas", 0.1, 64),
  ]
  for r in rows:
    assert r["T"] == 64 and r["B"] == 2
    assert positive(r["ms"]) and positive(r["fraction"]) and positive(r["compile_ms"])
  for r in rows[1:]:  # the ladder's capacity holds the open tokens; slots follow from it
    assert 0.1 <= r["capacity"] <= 1.0 and r["capacity"] <= r["gathered"] <= 1.0
  assert rows[3]["gathered"] < 1.0  # one segment of 64 in tiles of 8: routed, not dense
  assert_png(out.with_suffix(".png"))


def test_recurrence(tmp_path):
  results, _ = run(recurrence, tmp_path)
  rows = results["rows"]
  assert len(rows) == 4 and rows[0]["fwd_bwd_vs_reference"] == 1.0
  for r in rows:
    assert positive(r["fwd_ms"]) and positive(r["fwd_bwd_ms"]) and positive(r["mtok_per_s_fwd"])


def test_throughput(tmp_path):
  # Three models at one length: each hard-gate step takes seconds to compile on CPU.
  results, out = run(
    throughput, tmp_path, "--models", "tgn-hard-0.10,transformer,plain-gpt", "--seq_lens", "32"
  )
  assert results["config"]["exploration"] == TGNConfig(vocab_size=1).exploration
  assert results["config"]["dtype"] == "float32"
  rows = {r["model"]: r for r in results["rows"]}
  assert list(rows) == ["tgn-hard-0.10", "transformer", "plain-gpt"]
  for r in rows.values():
    assert "error" not in r, r["error"]
    assert (r["T"], r["B"]) == (32, 16)
    for key in ("ms", "min_ms", "tokens_per_s", "compile_s", "params", "xla_gib"):
      assert positive(r[key]), key
    assert r["tokens_per_s"] == pytest.approx(r["B"] * r["T"] / (r["ms"] / 1e3))
    assert math.isfinite(r["loss"])
  hard, transformer, plain = rows["tgn-hard-0.10"], rows["transformer"], rows["plain-gpt"]
  assert hard["steps_run"] == transformer["steps_run"] == 3 + 2  # warm-up + repeats
  assert plain["params"] == transformer["params"]  # the same network, written twice
  assert len(hard["calibrated_open_rate"]) == 2
  for rate in hard["calibrated_open_rate"] + [hard["open_rate"]]:
    assert abs(rate - hard["target_rate"]) <= 0.1
  # Explored tokens are computed too: open <= computed <= open + exploration (up to noise).
  assert hard["open_rate"] <= hard["compute_rate"] <= hard["open_rate"] + 0.1
  # T = 32 in tiles of 64: every capacity holds the whole sequence, computed densely.
  assert hard["gathered_fraction"] == 1.0 and hard["redone"] == 0
  assert transformer["open_rate"] == transformer["compute_rate"] == 1.0
  assert transformer["vs_transformer"] == 1.0 and plain["vs_plain_gpt"] == 1.0
  assert hard["vs_transformer"] == pytest.approx(hard["tokens_per_s"] / transformer["tokens_per_s"])
  assert transformer["vs_plain_gpt"] == pytest.approx(
    transformer["tokens_per_s"] / plain["tokens_per_s"]
  )
  assert_png(out.with_suffix(".png"))


def test_plain_gpt_matches_the_library_transformer():
  """The plain GPT computes the library Transformer's function: the same loss from the
  same weights (so its speed is a fair floor)."""
  import jax
  import jax.numpy as jnp
  import optax

  from benchmarks import plain_gpt
  from tgn_jax import functional

  cfg = TGNConfig(
    vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, mixer="attention"
  )
  _, params = functional.init(cfg, jax.random.key(0))
  model_def = functional.init(cfg, jax.random.key(0))[0]
  blocks = params["blocks"]
  attn = blocks["attention"]
  d = cfg.d_model
  q = attn["q_proj"]["kernel"][...]
  k, v = jnp.split(attn["kv_proj"]["kernel"][...], 2, axis=-1)
  heads = lambda w: w.reshape(2, d, cfg.n_heads, cfg.head_dim)
  qkv = jnp.concatenate([heads(q), heads(k), heads(v)], axis=2).reshape(2, d, 3 * d)
  plain = {
    "embed": params["embed"]["embedding"][...],
    "final_norm": params["final_norm"]["scale"][...],
    "blocks": {
      "norm_attn": blocks["norm_mix"]["scale"][...],
      "qkv": qkv,
      "out": attn["o_proj"]["kernel"][...],
      "norm_mlp": blocks["norm_mlp"]["scale"][...],
      "up": blocks["mlp"]["up"]["kernel"][...],
      "down": blocks["mlp"]["down"]["kernel"][...],
    },
  }
  tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, 50)
  logits, _ = functional.apply(model_def, params, tokens[:, :-1], stats=None)
  expected = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))
  got = plain_gpt.loss_fn(
    plain, tokens[:, :-1], tokens[:, 1:], n_heads=cfg.n_heads, dtype=jnp.float32
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_decode(tmp_path):
  results, out = run(decode, tmp_path, "--batches", "2")
  steps = results["config"]["steps"]
  rows = {r["model"]: r for r in results["rows"]}
  assert list(rows) == ["tgn-hard-0.10", "tgn-kvopen-0.10", "transformer"]
  for r in rows.values():
    assert "error" not in r, r["error"]
    assert (r["context"], r["B"], r["prompt"]) == (48, 2, 48 - steps)
    for key in (
      "prefill_ms",
      "ms",
      "ms_per_step",
      "tokens_per_s",
      "first_call_s",
      "params",
      "cache_gib",
    ):
      assert positive(r[key]), key
    assert r["tokens_per_s"] == pytest.approx(2 * steps / (r["ms"] / 1e3))
  hard = rows["tgn-hard-0.10"]
  for rate in hard["calibrated_open_rate"]:
    assert abs(rate - 0.1) <= 0.1
  assert 0.0 <= hard["decode_open_rate"] <= 1.0 and 0.0 <= hard["decode_skip_rate"] <= 1.0
  assert "decode_open_rate" not in rows["transformer"]
  assert rows["transformer"]["vs_transformer"] == 1.0
  assert_png(out.with_suffix(".png"))


# ---- quality benchmarks (mqar, grokking, phase, lm) ----


def test_mqar(tmp_path):
  results, out = run(mqar, tmp_path, "--models", "tgn", "--runs_dir", str(tmp_path / "runs"))
  (row,) = results["rows"]
  assert (row["model"], row["seq_len"], row["num_kv"]) == ("tgn", 32, 4)
  assert 0 <= row["accuracy"] <= 1 and 0 <= row["open_rate"] <= 1
  assert 0 <= row["open_at_queries"] <= 1 and 0 <= row["open_elsewhere"] <= 1
  assert len(row["open_per_layer"]) == 2
  assert_png(out.with_suffix(".png"))
  # A second call reuses the finished run instead of training again.
  again = mqar.main(
    [
      "--tiny",
      "--models",
      "tgn",
      "--runs_dir",
      str(tmp_path / "runs"),
      "--out",
      str(tmp_path / "y.json"),
    ]
  )
  assert again["rows"][0]["seconds"] == row["seconds"]
  assert models.train_options("tgn") == dict(mixer="tgn", gate="hard")  # --tiny changed nothing
  # A run directory trained with other options is never reused as if it matched.
  (run_dir,) = (tmp_path / "runs").iterdir()
  with pytest.raises(ValueError, match="other options"):
    common.train_run({"lr": 0.123}, run_dir)
  text = report.render(out)  # the RESULTS.md table, with the provenance line above it
  assert "| model | seq_len |" in text and "| tgn | 32 | 4 |" in text
  assert results["env"]["command"] in text


def test_a_signal_stops_the_sweep_not_just_its_run(tmp_path, monkeypatch):
  """A run that a signal stopped ends the benchmark (the next run would otherwise start)."""
  from tgn_jax.training import loop

  stopped = {"interrupted_by": 2, "steps_completed": 7}
  monkeypatch.setattr(loop, "prepare", lambda config: (None, None, None))
  monkeypatch.setattr(loop, "train", lambda config, *rest: stopped)
  with pytest.raises(SystemExit, match="interrupted by signal 2 at step 7"):
    common.train_run({"steps": 10}, tmp_path / "run")
  finished = {"interrupted_by": 0, "steps_completed": 10}
  monkeypatch.setattr(loop, "train", lambda config, *rest: finished)
  assert common.train_run({"steps": 10}, tmp_path / "run") is finished


def test_a_run_stopped_before_its_first_checkpoint_starts_again(tmp_path):
  options = dict(
    task="mqar",
    seq_len=32,
    num_kv=4,
    vocab_size=64,
    d_model=32,
    n_layers=1,
    steps=6,
    batch_size=8,
    eval_examples=16,
    eval_every=6,
    checkpoint_every=6,
    target_rate=None,
    mixer="recurrent",
  )
  run_dir = tmp_path / "run"
  common.train_run(options, run_dir)
  # As if killed at step 3: its config and first metrics written, no checkpoint, no summary.
  shutil.rmtree(run_dir / "checkpoints")
  (run_dir / "summary.json").unlink()
  again = common.train_run(options, run_dir)
  assert again["steps_completed"] == 6
  assert [r["step"] for r in common.read_records(run_dir, "eval")] == [6]  # one run, not two
  # A finished run of other length is not the run asked for.
  assert common.finished_run(options, run_dir)["wall_seconds"] == again["wall_seconds"]
  assert common.finished_run({**options, "steps": 12}, run_dir) is None
  # A run trained under other defaults is never taken for the run these options train now.
  changes = (
    ("summary.json", "model_config", "gate_gradient", "sigmoid", "model.gate_gradient"),
    ("config.json", "optimizer", "b2", 0.5, "optimizer.b2"),
  )
  for file, section, field, old_default, path in changes:
    text = (run_dir / file).read_text()
    stored = json.loads(text)
    stored[section][field] = old_default
    (run_dir / file).write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=f"{path} = .* a default changed"):
      common.finished_run(options, run_dir)
    (run_dir / file).write_text(text)
  assert common.finished_run(options, run_dir) is not None


def test_grokking(tmp_path):
  results, out = run(grokking, tmp_path, "--runs_dir", str(tmp_path / "runs"))
  (row,) = results["rows"]
  assert row["peak_step"] in range(10, 41, 10) and row["peak_heat"] >= 0
  assert row["grok_step"] is None or row["lead"] == row["grok_step"] - row["peak_step"]
  assert "seeds" in results["verdict"]
  assert_png(out.with_suffix(".png"))


def test_grokking_analysis_finds_peak_and_jump():
  evals = [
    dict(step=s, specific_heat=[h], eval_accuracy=a, train_accuracy=t)
    for s, h, a, t in [
      (100, 0.1, 0.0, 0.5),
      (200, 0.9, 0.1, 0.95),
      (300, 0.3, 0.5, 1.0),
      (400, 0.2, 0.95, 1.0),
    ]
  ]
  result = grokking.analyse(evals, 0.9)
  assert (result["peak_step"], result["grok_step"], result["lead"]) == (200, 400, 200)
  assert result["memorised_step"] == 200
  assert result["peak_over_median"] == pytest.approx(0.9 / 0.25)
  assert result["hump_step"] is None and result["loss_spike_steps"] == []


def test_grokking_analysis_tells_a_loss_spike_from_the_hump():
  # C: a broad hump centred at step 800 and a one-evaluation spike at 300, where the train
  # loss jumps 100-fold; test accuracy passes 0.9 at 900.
  heat = [0.10, 0.10, 0.30, 0.10, 0.12, 0.14, 0.17, 0.20, 0.17, 0.14, 0.12, 0.10, 0.10]
  train_ce = [1e-1, 1e-5, 1e-3, 1e-5, 1e-6, 1e-6, 1e-6, 1e-6, 2e-6, 1e-6, 1e-6, 1e-6, 1e-6]
  test = [0.0, 0.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.95, 1.0, 1.0, 1.0, 1.0]
  evals = [
    dict(step=100 * (i + 1), specific_heat=[h], eval_accuracy=a, train_accuracy=1.0, train_ce=c)
    for i, (h, c, a) in enumerate(zip(heat, train_ce, test))
  ]
  result = grokking.analyse(evals, 0.9)
  assert result["peak_step"] == 300 and result["peak_at_loss_spike"]
  assert result["loss_spike_steps"] == [300]  # the 2x wobble at 900 is not a spike
  assert result["hump_step"] == 800 and result["hump_lead"] == 100
  assert result["lead"] == 600


def test_phase(tmp_path):
  results, out = run(phase, tmp_path, "--runs_dir", str(tmp_path / "runs"))
  rows = results["rows"]
  assert [r["lam"] for r in rows] == [0.01, 100.0]
  assert rows[-1]["open_rate"] <= rows[0]["open_rate"]  # hotter -> more attention
  assert results["critical_lam"] in (0.01, 100.0)
  assert results["thermostat"]["thermostat"] and results["thermostat"]["lam"] > 0
  assert_png(out.with_suffix(".png"))


def test_lm(tmp_path, monkeypatch):
  monkeypatch.setenv("TGN_JAX_CACHE", str(tmp_path / "cache"))
  data = tmp_path / "text.txt"
  data.write_text("a small corpus for a tiny language model. " * 200)
  results, out = run(
    lm,
    tmp_path,
    "--models",
    "transformer,recurrent",
    "--data",
    str(data),
    "--runs_dir",
    str(tmp_path / "runs"),
  )
  rows = {r["model"]: r for r in results["rows"]}
  assert list(rows) == ["transformer", "recurrent"]
  for r in rows.values():
    assert 0 < r["bpb"] < 9 and positive(r["seconds"])
  assert rows["transformer"]["seconds_to_reach"] is not None  # it defines the threshold
  assert_png(out.with_suffix(".png"))


def test_mqar_collect_reads_finished_runs_and_trains_nothing(tmp_path):
  """A sweep split between processes: each trains its part, --collect builds the table."""
  runs = tmp_path / "runs"
  part = ["--models", "tgn", "--target_vs_oracle", "2", "--runs_dir", str(runs)]
  trained, _ = run(mqar, tmp_path, *part)
  (row,) = trained["rows"]
  stored = json.loads((runs / row["run"] / "config.json").read_text())
  assert stored["thermostat"]["target_rate"] == pytest.approx(2 * 4 / (32 * 2))  # (32, 4)
  everything = ["--models", "tgn,recurrent", "--gates", "learned,random", "--collect"]
  collect = ["--tiny", *everything, "--runs_dir", str(runs), "--out", str(tmp_path / "c.json")]
  collected = mqar.main([*collect, "--target_vs_oracle", "2"])
  assert [r["run"] for r in collected["rows"]] == [row["run"]]
  assert collected["rows"][0]["seconds"] == row["seconds"]
  assert collected["missing_runs"] == [row["run"] + "_random", "recurrent_T32_kv4_d32_lr0.003"]
  assert sorted(p.name for p in runs.iterdir()) == [row["run"]]
  # Without the learned run, the reference gates it sets are listed as missing too.
  other = mqar.main([*collect, "--target_vs_oracle", "3"])["missing_runs"]
  assert other[:2] == [
    f"tgn_T32_kv4_d32_lr0.003_target{3 * 4 / 64:g}_quantile" + s for s in ("", "_random")
  ]


def test_mqar_curve_over_targets_trains_the_oracle_once(tmp_path):
  options = ["--models", "tgn", "--target_rate", "0.2,0.4", "--gates", "learned,oracle,random"]
  results, out = run(mqar, tmp_path, *options, "--runs_dir", str(tmp_path / "runs"))
  pairs = [(r["gate"], r["target"]) for r in results["rows"]]
  assert pairs == [("learned", 0.2), ("oracle", None), ("random", 0.2)] + [
    ("learned", 0.4),
    ("random", 0.4),
  ]
  learned_04, random_04 = results["rows"][3:]
  stored = json.loads((tmp_path / "runs" / random_04["run"] / "config.json").read_text())
  assert stored["ablation"]["reference_rates"] == pytest.approx(
    learned_04["open_per_layer"], abs=1e-4
  )
  assert len(list((tmp_path / "runs").iterdir())) == 5
  assert_png(out.with_suffix(".png"))


def test_mqar_without_learned_positions_is_a_run_of_its_own(tmp_path):
  runs = tmp_path / "runs"
  results, _ = run(
    mqar, tmp_path, "--models", "recurrent", "--no-learned_positions", "--runs_dir", str(runs)
  )
  (row,) = results["rows"]
  assert row["run"] == "recurrent_T32_kv4_d32_lr0.003_rope"
  stored = json.loads((runs / row["run"] / "config.json").read_text())
  assert stored["model"]["learned_positions"] is False


def test_mqar_reference_gates_at_the_learned_rates(tmp_path):
  results, _ = run(
    mqar,
    tmp_path,
    "--models",
    "tgn",
    "--gates",
    "learned,oracle,random",
    "--fillers",
    "zero",
    "--runs_dir",
    str(tmp_path / "runs"),
  )
  learned, oracle, random = results["rows"]
  assert [r["gate"] for r in results["rows"]] == ["learned", "oracle", "random"]
  assert oracle["open_elsewhere"] == 0.0 and oracle["open_at_queries"] == 0.5  # last layer only
  assert abs(oracle["open_rate"] - oracle["oracle_open_rate"]) < 1e-6
  stored = json.loads((tmp_path / "runs" / random["run"] / "config.json").read_text())
  assert stored["ablation"]["reference_rates"] == pytest.approx(learned["open_per_layer"], abs=1e-4)
  assert stored["task"]["fillers"] == "zero"
  assert 0 < learned["budget"] < 1e-3


def test_mqar_schedules_are_runs_of_their_own_and_the_hardening_is_plotted(tmp_path):
  from matplotlib.figure import Figure

  runs = tmp_path / "runs"
  options = ["--soft_warmup", "15", "--lam_warmup", "5", "--quantile_scope", "last", "--seed", "3"]
  results, _ = run(mqar, tmp_path, "--models", "tgn", *options, "--runs_dir", str(runs))
  (row,) = results["rows"]
  assert row["run"] == (
    f"tgn_T32_kv4_d32_lr0.003_target{0.15:g}_quantile_soft15_lamwarmup5_scopelast_seed3"
  )
  stored = json.loads((runs / row["run"] / "config.json").read_text())
  assert (stored["thermostat"]["soft_warmup"], stored["thermostat"]["lam_warmup"]) == (15, 5)
  assert stored["thermostat"]["quantile_scope"] == "last" and stored["run"]["seed"] == 3
  assert row["open_per_layer"][0] == 0.0 and row["open_per_layer"][1] > 0.2  # target 0.15 x 2
  records = common.read_records(runs / row["run"], "train")  # one every 10 steps
  assert {r["step"]: r["gate_mode"] for r in records} == {10: "soft", 20: "hard", 30: "hard"}
  ax = Figure().add_subplot()
  mqar._plot_training(ax, results["rows"], runs)
  curve, rate, mark = ax.lines
  assert list(curve.get_xdata()) == [r["step"] for r in records]
  assert list(rate.get_ydata()) == [r["gate_hard"] for r in records]
  assert list(mark.get_xdata()) == [20]
