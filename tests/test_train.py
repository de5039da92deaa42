"""train.py end to end: learning, exact resume, the thermostat, text data, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgn_jax.training import cli, loop
from tgn_jax.training.config import resolve

ROOT = Path(__file__).resolve().parent.parent
TINY = (
  "--batch_size=16 --d_model=32 --eval_examples=64 --log_every=5 --eval_every=25 "
  "--checkpoint_every=25 --soft_warmup=0 --no-progress --no-plots"
).split()


def records(run_dir, kind):
  lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def summary(run_dir):
  return json.loads((Path(run_dir) / "summary.json").read_text())


def run_main(args, capsys):
  try:
    code = cli.main(args)
  except SystemExit as e:  # argparse
    code = e.code
  captured = capsys.readouterr()
  return code, captured.out, captured.err


# ---------------------------------------------------------------------------- learning


@pytest.fixture(scope="session")  # session: kept even when the worker runs other modules between
def mqar_run(tmp_path_factory):
  """The default task and model (soft warm-up, then hard gate + thermostat), 400 steps.

  Run as a subprocess with XLA's default optimisation: this run is long enough that
  execution, not compilation, dominates.
  """
  out = tmp_path_factory.mktemp("mqar") / "run"
  env = dict(
    os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace("--xla_backend_optimization_level=0", "")
  )
  result = subprocess.run(
    [
      sys.executable,
      str(ROOT / "train.py"),
      "--steps=400",
      "--eval_every=100",
      "--no-progress",
      f"--out={out}",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr
  return out, result.stdout


@pytest.mark.xdist_group("mqar_run")
def test_mqar_accuracy_rises_far_above_chance(mqar_run):
  out, stdout = mqar_run
  s = summary(out)
  chance = 1 / 32  # 32 possible values
  assert s["final"]["eval_accuracy"] > 0.8 > 20 * chance, s["final"]
  assert "eval accuracy" in stdout and str(out) in stdout
  train = records(out, "train")
  for key in ("step", "loss", "ce", "lam", "gate_soft", "gate_hard", "lr", "tokens_per_sec"):
    assert key in train[-1]
  assert train[0]["gate_mode"] == "soft" and train[-1]["gate_mode"] == "hard"
  evals = records(out, "eval")
  assert [e["step"] for e in evals] == [100, 200, 300, 400]
  assert len(evals[-1]["specific_heat"]) == 2 and len(evals[-1]["open_rate_scored"]) == 2
  for name in ("loss.png", "gate.png", "lam.png", "specific_heat.png", "accuracy.png"):
    assert (out / "plots" / name).stat().st_size > 1000
  assert sorted(int(p.name) for p in (out / "checkpoints").iterdir())[-1] == 400


@pytest.mark.xdist_group("mqar_run")
def test_quantile_control_moves_open_rate_to_target(mqar_run):
  """The default control: the soft warm-up ends well above the target, the pooled quantile
  threshold brings the hard rate to it and holds it; lambda, pricing the offsets' drift,
  rises from 0 and keeps them bounded."""
  out, _ = mqar_run
  config = summary(out)["config"]["thermostat"]
  assert config["control"] == "quantile" and config["quantile_scope"] == "model"
  target = config["target_rate"]
  train = records(out, "train")
  soft = [r for r in train if r["gate_mode"] == "soft"]
  hard = [r for r in train if r["gate_mode"] == "hard"]
  assert soft[-1]["gate_hard"] > target + 0.2, soft[-1]
  assert hard[0]["gate_hard"] > target + 0.1, hard[0]  # the first steps still open wide
  for r in hard[-10:]:  # the last 100 steps
    assert abs(r["gate_hard"] - target) < 0.03, r
  offsets = hard[-1]["gate_offset"]
  assert len(offsets) == 2 and offsets[0] == offsets[1] > 0  # one pooled shift, upwards
  assert all(r["lam"] == 0.0 for r in soft) and hard[-1]["lam"] > 0.01


@pytest.mark.xdist_group("mqar_run")
def test_out_holding_a_run_is_not_overwritten(mqar_run, capsys):
  out, _ = mqar_run
  before = (out / "metrics.jsonl").read_text()
  code, _, err = run_main(["--steps=5", f"--out={out}"], capsys)
  assert code == 2 and "already holds a run" in err
  code, _, err = run_main([f"--out={out}", "--resume", "--d_model=16"], capsys)
  assert code == 2 and "--d_model cannot change on --resume" in err
  assert (out / "metrics.jsonl").read_text() == before


# ---------------------------------------------------------------------------- resume


def interrupt_at(monkeypatch, step):
  """Make the run receive SIGINT while fetching the batch of `step` (deterministic)."""
  original = loop.make_task

  def patched(config, **kwargs):
    task = original(config, **kwargs)
    fetch = task.train_batch

    def train_batch(s, rows=None):
      if s == step:
        os.kill(os.getpid(), signal.SIGINT)
      return fetch(s, rows)

    task.train_batch = train_batch
    return task

  monkeypatch.setattr(loop, "make_task", patched)


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, monkeypatch, capsys):
  # Interrupted in the soft-gate phase, resumed across the switch to the hard gate.
  args = TINY + ["--steps=60", "--checkpoint_every=1000", "--soft_warmup=30", "--lam_warmup=20"]
  whole, split = tmp_path / "whole", tmp_path / "split"
  assert run_main(args + [f"--out={whole}"], capsys)[0] == 0

  with monkeypatch.context() as m:
    interrupt_at(m, 25)
    code, stdout, err = run_main(args + [f"--out={split}"], capsys)
  assert code == 128 + signal.SIGINT
  assert "received SIGINT" in err and "--resume" in stdout
  first = summary(split)
  assert first["interrupted_by"] == signal.SIGINT and first["steps_completed"] < 60
  assert (split / "checkpoints" / str(first["steps_completed"])).is_dir()

  code, _, _ = run_main([f"--out={split}", "--resume"], capsys)
  assert code == 0
  a, b = records(whole, "train"), records(split, "train")
  assert [r["step"] for r in a] == [r["step"] for r in b]
  stopped = first["steps_completed"]
  for ra, rb in zip(a, b):
    # A record averages the steps since the previous one; the one right after the resume
    # point covers fewer steps, every other one must match exactly.
    if stopped < ra["step"] < stopped + 5:
      continue
    for key in ("loss", "ce", "lam", "gate_hard", "gate_soft", "lr", "grad_norm"):
      assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
  final_whole, final_split = records(whole, "eval")[-1], records(split, "eval")[-1]
  final_whole.pop("elapsed"), final_split.pop("elapsed")
  assert final_whole == final_split
  assert summary(whole)["lam"] == summary(split)["lam"]


def test_routed_run_resumes_exactly_and_matches_dense_execution(tmp_path, monkeypatch, capsys):
  """Sequences long enough to route (capacity below the segment): the run picks its
  capacities on the host, redoes any overflowing step, resumes exactly, and trains as
  dense execution does (up to rounding)."""
  args = TINY + [
    "--steps=40",
    "--seq_len=64",
    "--vocab_size=128",
    "--segment_len=32",
    "--capacity_multiple=4",
    "--checkpoint_every=1000",
    "--lam_warmup=10",
    "--target_rate=0.1",
    "--gate_bias_init=-1.5",
  ]
  whole, split, dense = tmp_path / "whole", tmp_path / "split", tmp_path / "dense"
  assert run_main(args + [f"--out={whole}"], capsys)[0] == 0
  with monkeypatch.context() as m:
    interrupt_at(m, 25)
    assert run_main(args + [f"--out={split}"], capsys)[0] == 128 + signal.SIGINT
  stopped = summary(split)["steps_completed"]
  assert run_main([f"--out={split}", "--resume"], capsys)[0] == 0
  assert run_main(args + [f"--out={dense}", "--attention_execution=dense"], capsys)[0] == 0
  a, b, d = records(whole, "train"), records(split, "train"), records(dense, "train")
  assert a[-1]["capacity"] < 1.0  # it did route
  for ra, rb, rd in zip(a, b, d):
    if not stopped < ra["step"] < stopped + 5:
      assert ra["loss"] == rb["loss"] and ra["capacity"] == rb["capacity"], ra["step"]
    np.testing.assert_allclose(ra["loss"], rd["loss"], rtol=1e-4, err_msg=str(ra["step"]))
    assert rd["capacity"] == 1.0


def test_kv_open_run_learns(tmp_path, capsys):
  """kv="open" (closed tokens write no key/value) trains on MQAR far above chance."""
  out = tmp_path / "run"
  args = [
    "--kv=open",
    # At 0.25 open (held by the default control) 250 steps are too few (0.15 accuracy); the
    # thermostat used to leave about half of the gates open here.
    "--target_rate=0.5",
    "--steps=250",
    "--eval_every=250",
    "--eval_examples=256",
    "--no-progress",
    "--no-plots",
    f"--out={out}",
  ]
  assert run_main(args, capsys)[0] == 0
  final = summary(out)["final"]
  assert final["eval_accuracy"] > 10 / 32, final  # chance: one of 32 values


def one_train_step(flags, seq_len):
  """The compiled train step of a d_model 32 model over V = 64 with its initial state, one
  random batch of 4 rows and the controls of step 0, for train.py's `flags` (a string)."""
  from tgn_jax.training import steps

  argv = f"--seq_len={seq_len} --d_model=32 --batch_size=4 {flags}".split()
  config = resolve(vars(cli.build_parser().parse_args(argv)))
  model_config = config.model_config(vocab_size=64, max_seq_len=seq_len)
  optimizer = steps.make_optimizer(config)
  model_def, state, _ = steps.init_state(model_config, config, optimizer)
  step = steps.make_train_step(model_def, model_config, optimizer)
  tokens = jax.random.randint(jax.random.key(0), (4, seq_len + 1), 0, 64)
  batch = (tokens[:, :-1], tokens[:, 1:], np.ones((4, seq_len), np.float32))
  return model_config, state, step, batch, steps.make_controls(config)(0)


def test_overflowing_step_changes_nothing_and_is_redone():
  import jax

  from tgn_jax.ops.gate import CapacityLadder
  from tgn_jax.training import steps

  flags = "--segment_len=64 --capacity_multiple=1 --gate_bias_init=2.0 --warmup_steps=0"
  model_config, state, step, batch, controls = one_train_step(flags, seq_len=64)
  after, metrics = step(state, controls, *batch, 0.25)  # gate bias +2: most tokens open
  assert metrics["overflow"] == 1.0 and float(metrics["capacity_needed"]) > 0.25
  for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(after)):
    np.testing.assert_array_equal(old, new)
  dense_state, dense_metrics = step(state, controls, *batch, 1.0)
  ladder = CapacityLadder(model_config.capacity_buckets, recent=[0.2])
  assert ladder.current == 0.25
  redone_state, redone_metrics, redone = steps.routed_step(step, state, controls, batch, ladder)
  assert redone == 1 and redone_metrics["overflow"] == 0.0 and int(redone_state.step) == 1
  np.testing.assert_allclose(redone_metrics["loss"], dense_metrics["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(redone_state.params), jax.tree.leaves(dense_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_non_finite_step_is_skipped_by_a_select_and_counted():
  """A step with a NaN loss leaves the parameters and the optimizer's state as they were and
  is counted; a finite step after it resets the count in a row. The compiled step holds no
  XLA conditional (on a GPU each one is a host round trip)."""
  _, state, step, batch, controls = one_train_step("--warmup_steps=0 --soft_warmup=0", seq_len=32)
  hlo = step.lower(state, controls, *batch, 1.0).compile().as_text()
  assert hlo.count(" conditional(") == 0

  poisoned = state._replace(
    params=jax.tree_util.tree_map_with_path(
      lambda path, x: x * jnp.nan if "embed" in jax.tree_util.keystr(path) else x, state.params
    )
  )
  after, metrics = step(poisoned, controls, *batch, 1.0)
  after, metrics = step(after, controls, *batch, 1.0)
  assert metrics["finite"] == 0.0 and int(after.step) == 2
  assert (int(after.skipped_in_a_row), int(after.skipped_total)) == (2, 2)
  for old, new in zip(
    jax.tree.leaves((poisoned.params, poisoned.opt_state)),
    jax.tree.leaves((after.params, after.opt_state)),
  ):
    np.testing.assert_array_equal(old, new)

  healed, metrics = step(after._replace(params=state.params), controls, *batch, 1.0)
  assert metrics["finite"] == 1.0
  assert (int(healed.skipped_in_a_row), int(healed.skipped_total)) == (0, 2)
  moved = [
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(healed.params))
  ]
  assert any(moved)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  out = tmp_path / "run"
  proc = subprocess.Popen(
    [sys.executable, str(ROOT / "train.py"), *TINY, "--steps=100000", f"--out={out}"],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=tmp_path,
  )
  metrics = out / "metrics.jsonl"
  deadline = time.time() + 120
  while not (metrics.exists() and metrics.stat().st_size > 0):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, stderr
  assert "Traceback" not in stderr and "received SIGTERM" in stderr
  s = summary(out)
  assert s["interrupted_by"] == signal.SIGTERM
  assert (out / "checkpoints" / str(s["steps_completed"]) / "_CHECKPOINT_METADATA").exists()


# ---------------------------------------------------------------------------- other tasks


TEXT = (
  "--task=text --steps=40 --seq_len=32 --batch_size=8 --d_model=32 --eval_every=20 "
  "--eval_batches=2 --no-progress --no-plots"
).split()


def test_text_task_on_a_small_file(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("TGN_JAX_CACHE", str(tmp_path / "cache"))
  data = tmp_path / "corpus.txt"
  data.write_text("the quick brown fox jumps over the lazy dog. " * 400)
  out = tmp_path / "run"
  code, stdout, _ = run_main(TEXT + [f"--data={data}", f"--out={out}"], capsys)
  assert code == 0
  bpb = [r["eval_bpb"] for r in records(out, "eval")]
  assert bpb[-1] < bpb[0] and bpb[-1] < 6.0  # learning; a uniform byte costs 8 bits
  assert "bits/byte" in stdout


def test_text_task_embedded_default_corpus(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("TGN_JAX_CACHE", str(tmp_path / "cache"))
  out = tmp_path / "run"
  code, _, _ = run_main(TEXT + [f"--out={out}"], capsys)
  assert code == 0
  s = summary(out)
  assert "standard library" in s["description"] and 0 < s["final"]["eval_bpb"] < 9


def test_modadd_logs_specific_heat_and_train_accuracy(tmp_path, capsys):
  out = tmp_path / "run"
  code, _, _ = run_main(
    [
      "--task=modadd",
      "--p=13",
      "--steps=20",
      "--eval_every=10",
      "--d_model=32",
      "--d_mlp=64",
      "--no-progress",
      f"--out={out}",
    ],
    capsys,
  )
  assert code == 0
  evals = records(out, "eval")
  assert [r["step"] for r in evals] == [10, 20]
  for r in evals:
    assert 0 <= r["train_accuracy"] <= 1 and 0 <= r["eval_accuracy"] <= 1
    assert len(r["specific_heat"]) == 1 and r["specific_heat"][0] >= 0
  assert summary(out)["config"]["optimizer"]["weight_decay"] == 1.0  # the Nanda preset


def test_run_stops_once_held_out_accuracy_holds_for_the_patience(tmp_path, capsys):
  out = tmp_path / "run"
  args = "--task=modadd --p=13 --d_model=32 --d_mlp=64 --steps=200 --eval_every=10 --no-plots"
  code, stdout, _ = run_main(
    args.split() + ["--stop_accuracy=0.05", "--stop_patience=20", "--no-progress", f"--out={out}"],
    capsys,
  )
  assert code == 0
  evals = records(out, "eval")
  held, expected = None, None
  for r in evals:  # the rule, restated: 20 steps of evaluations all at >= 0.05
    held = (held if held is not None else r["step"]) if r["eval_accuracy"] >= 0.05 else None
    if held is not None and r["step"] - held >= 20:
      expected = r["step"]
      break
  s = summary(out)
  assert expected is not None and s["steps_completed"] == expected == evals[-1]["step"] < 200
  assert s["stopped_at_accuracy"] and s["interrupted_by"] == 0
  assert f"{expected}/200 steps (stopped: held-out accuracy >= 0.05 for 20 steps)" in stdout
  assert (out / "checkpoints" / str(expected)).exists()


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
  "args, message",
  [
    (["--task=poetry"], "--task"),
    (["--no_such_flag=1"], "unrecognized arguments: --no_such_flag"),
    (["--d_model=30", "--n_heads=4"], "d_model (30) must be divisible by n_heads"),
    (["--steps=0"], "--steps must be a positive integer"),
    (["--steps=many"], "--steps: invalid int value"),
    (["--lr=-1"], "--lr must be a positive number"),
    (["--mixer=mamba"], "mixer must be one of"),
    (["--num_kv=100"], "num_kv"),
    (["--task=text", "--data=/no/such/corpus"], "/no/such/corpus"),
    (["--resume"], "--resume needs --out"),
    (["--stop_accuracy=1.5"], "--stop_accuracy must be in (0, 1]"),
    (["--task=text", "--stop_accuracy=0.9"], "needs a task scored by accuracy"),
  ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, args, message):
  monkeypatch.chdir(tmp_path)
  code, _, err = run_main(args + ["--no-progress"], capsys)
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
  assert not (tmp_path / "runs").exists()


def test_bad_data_and_out_paths(tmp_path, capsys):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  not_dir = tmp_path / "file"
  not_dir.write_text("x")
  cases = [
    (["--task=text", f"--data={empty}", f"--out={tmp_path / 'r1'}"], "empty"),
    (["--task=text", f"--data={tmp_path / 'emptydir'}", f"--out={tmp_path / 'r2'}"], "emptydir"),
    ([f"--out={not_dir / 'run'}"], "not a directory"),
    ([f"--out={tmp_path / 'never'}", "--resume"], "no checkpoint to resume"),
  ]
  (tmp_path / "emptydir").mkdir()
  for args, message in cases:
    code, _, err = run_main(args + ["--no-progress"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
  assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
  assert not (tmp_path / "never").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_non_writable_out(tmp_path, capsys):
  locked = tmp_path / "locked"
  locked.mkdir(mode=0o500)
  code, _, err = run_main([f"--out={locked / 'run'}", "--no-progress"], capsys)
  assert code == 2 and "not writable" in err


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_non_finite_loss_stops_the_run(tmp_path, capsys, mode):
  out = tmp_path / "run"
  code, _, err = run_main(
    TINY
    + [
      "--steps=200",
      "--lr=1e30",
      "--warmup_steps=0",
      f"--on_nonfinite={mode}",
      "--max_nonfinite=3",
      f"--out={out}",
    ],
    capsys,
  )
  assert code == 1 and "non-finite" in err and "Traceback" not in err
  # nothing non-finite was written as if it were a good result
  assert not (out / "summary.json").exists()


def test_config_file_and_flag_precedence(tmp_path):
  path = tmp_path / "c.json"
  path.write_text(json.dumps({"task": "modadd", "d_model": 48, "steps": 7}))
  c = resolve({"steps": 9}, str(path))
  assert (c.task.name, c.model["d_model"], c.run.steps, c.optimizer.weight_decay) == (
    "modadd",
    48,
    9,
    1.0,
  )
  path.write_text(json.dumps({"bogus": 1}))
  with pytest.raises(ValueError, match="unknown option 'bogus'"):
    resolve({}, str(path))


def test_help_lists_options_with_defaults():
  result = subprocess.run(
    [sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0
  for option in (
    "--task",
    "--steps",
    "--out",
    "--seed",
    "--data",
    "--lam",
    "--target_rate",
    "--resume",
    "--d_model",
    "--n_layers",
    "--n_heads",
    "--mixer",
    "--gate",
  ):
    assert option in result.stdout
  assert "(default: 1200)" in result.stdout and "modadd:" in result.stdout


def test_every_model_field_has_a_flag_and_reaches_the_model(tmp_path):
  from tgn_jax.config import TGNConfig
  from tgn_jax.training.cli import build_parser

  parser = build_parser()
  values = {
    "n_kv_heads": "1",
    "gate_threshold": "0.4",
    "capacity_buckets": "0.5,1",
    "rope": None,
    "param_dtype": "bfloat16",
    "gate_hidden": "12",
    "rope_base": "500",
    "attention_impl": "xla",
    "temperature": "learned",
  }
  argv = []
  for name, value in values.items():
    argv += [f"--model.{name}"] + ([value] if value is not None else [])
  argv[argv.index("--model.rope")] = "--no-model.rope"
  explicit = vars(parser.parse_args(argv))
  model = resolve(explicit).model_config(vocab_size=64, max_seq_len=32)
  assert (
    model.n_kv_heads,
    model.gate_threshold,
    model.capacity_buckets,
    model.rope,
    model.param_dtype,
    model.gate_hidden,
    model.rope_base,
    model.attention_impl,
    model.temperature,
  ) == (1, 0.4, (0.5, 1.0), False, "bfloat16", 12, 500.0, "xla", "learned")
  flagged = {a.dest for a in parser._actions}
  missing = [
    f
    for f in TGNConfig.__dataclass_fields__
    if f not in ("vocab_size", "max_seq_len") and f"model.{f}" not in flagged
  ]
  assert not missing, missing


def test_flat_and_dotted_spellings_and_nested_file_agree(tmp_path):
  from tgn_jax.training.cli import build_parser

  parser = build_parser()
  flat = resolve(vars(parser.parse_args(["--d_model=48", "--lr=0.01", "--steps=7"])))
  dotted = resolve(
    vars(parser.parse_args(["--model.d_model=48", "--optimizer.lr=0.01", "--run.steps=7"]))
  )
  path = tmp_path / "c.json"
  path.write_text(
    json.dumps({"model": {"d_model": 48}, "optimizer": {"lr": 0.01}, "run": {"steps": 7}})
  )
  from_file = resolve({}, str(path))
  assert flat == dotted == from_file
  assert flat.to_dict() == json.loads(json.dumps(flat.to_dict()))  # JSON round trip
  assert resolve({}, base=flat.to_dict()) == flat


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--model.gate_threshold=1.5"], "--model.gate_threshold: gate_threshold must be in (0, 1)"),
    (["--model.capacity_buckets=0.5"], "--model.capacity_buckets: capacity_buckets must"),
    (["--n_heads=3"], "--d_model: d_model (64) must be divisible by n_heads (3)"),
    (["--optimizer.b2=1"], "--b2 must be in [0, 1)"),
  ],
)
def test_errors_name_the_flag(argv, message, capsys):
  code, _, err = run_main(argv, capsys)
  assert code == 2 and message in err, err


def test_help_shows_true_defaults():
  from tgn_jax.config import TGNConfig
  from tgn_jax.training.cli import build_parser

  text = build_parser().format_help()
  assert "runs/latest" not in text and "default: runs/TASK-DATE-TIME" in text
  assert f"(default: {TGNConfig(vocab_size=2).gate_threshold})" in text
  assert "--model.gate_threshold" in text and "--d_model" in text


def test_oracle_reference_gate_opens_only_at_queries_of_the_last_layer(tmp_path, capsys):
  out = tmp_path / "oracle"
  code, stdout, _ = run_main(
    TINY
    + [
      "--steps=4",
      "--eval_every=4",
      "--reference_gate=oracle",
      "--target_rate=none",
      "--fillers=zero",
      "--eval_examples=40",  # the last eval batch is padded with 8 unscored rows
      f"--out={out}",
    ],
    capsys,
  )
  assert code == 0
  final = summary(out)["final"]
  assert final["open_rate_scored"][:-1] == [0.0] and final["open_rate_scored"][-1] == 1.0
  assert final["open_rate_unscored"] == [0.0, 0.0]
  assert abs(np.mean(final["open_rate"]) - final["oracle_open_rate"]) < 1e-6
  config = json.loads((out / "config.json").read_text())["task"]
  # The padding rows count nowhere: the oracle opens at the num_kv queries of each real row.
  expected = config["num_kv"] / config["seq_len"] / 2
  assert final["oracle_open_rate"] == pytest.approx(expected, rel=1e-6)
  assert "oracle overall" in stdout


def test_random_reference_gate_needs_a_rate_per_layer(capsys):
  code, _, err = run_main(["--reference_gate=random", "--reference_rates=0.1,0.2,0.3"], capsys)
  assert code == 2 and "--reference_rates must give a rate" in err


def test_mqar_preset_gives_the_model_absolute_positions():
  c = resolve({})
  assert c.task.name == "mqar" and c.model_config(64, 32).learned_positions
  assert not resolve({"model.learned_positions": False}).model_config(64, 32).learned_positions


def test_modadd_preset_is_the_nanda_recipe():
  c = resolve({"task": "modadd"})
  model = c.model_config(vocab_size=114, max_seq_len=3)
  assert (c.task.p, c.task.train_fraction) == (113, 0.3)
  assert (model.n_layers, model.d_model, model.n_heads, model.mlp_dim) == (1, 128, 4, 512)
  assert (model.mixer, model.mlp_activation, model.norm) == ("attention", "relu", "none")
  assert (model.rope, model.learned_positions) == (False, True)
  o = c.optimizer
  assert (o.lr, o.weight_decay, o.b1, o.b2, o.clip_norm) == (1e-3, 1.0, 0.9, 0.98, None)
  assert c.thermostat.target_rate is None
  from tgn_jax.training import steps
  from tgn_jax.training.tasks import make_task

  task = make_task(c.replace(**{"task.p": 13}))
  assert task.batch_size == len(task.train_batch(0).inputs)  # full batch
  assert (task.train_batch(0).mask[:, :2] == 0).all()  # loss on the last position only
  # No clipping: a huge gradient reaches Adam's moments unscaled (clipped to norm 1 it would not).
  params = {"w": jnp.zeros(3)}
  huge = {"w": jnp.full(3, 1e6)}

  def largest_moment(config):
    optimizer = steps.make_optimizer(config)
    _, state = optimizer.update(huge, optimizer.init(params), params)
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(state) if jnp.ndim(x) >= 1)

  assert largest_moment(c) > 1e4
  assert largest_moment(resolve({"task": "modadd", "optimizer.clip_norm": 1.0})) < 1.0


def test_resume_refuses_a_checkpoint_without_a_leaf_the_model_needs():
  """A checkpoint saved by another version of the model (here: without the gate offsets)
  is refused with a message, not set aside as unreadable."""
  from tgn_jax.training import rundir
  from tgn_jax.training.config import ConfigError

  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  saved = {"params": {"kernel": shape(4, 2)}}
  needed = {"params": {"kernel": shape(4, 2), "offset": shape(2)}}
  rundir._check_shapes(saved, {"params": {"kernel": shape(4, 2)}}, 7)  # matches: no error
  with pytest.raises(ConfigError, match="step 7 holds no params.offset"):
    rundir._check_shapes(saved, needed, 7)
  with pytest.raises(ConfigError, match="shape"):
    rundir._check_shapes(saved, {"params": {"kernel": shape(4, 3)}}, 7)
