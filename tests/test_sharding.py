"""Training on a device mesh and across processes, and checkpoints that survive damage.

Multi-device runs use fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count)
in subprocesses; two processes join through jax.distributed on localhost.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgn_jax import TGNConfig, functional
from tgn_jax.data import mqar_batch
from tgn_jax.training import cli, loop, rundir, sharding
from tgn_jax.training.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
# d_model 64: the MLP and recurrence weights are large enough to be sharded.
RUN = (
  "--steps=8 --batch_size=16 --d_model=64 --eval_examples=64 --log_every=4 "
  "--eval_every=8 --checkpoint_every=4 --soft_warmup=4 --lam_warmup=4 --no-progress "
  "--no-plots"
).split()


def records(run_dir, kind="train"):
  return [
    r
    for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    if r.get("kind") == kind
  ]


def summary(run_dir):
  return json.loads((Path(run_dir) / "summary.json").read_text())


def train_py(args, devices=1, **popen):
  env = dict(
    os.environ,
    XLA_FLAGS=(
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ),
  )
  # A multi-device CPU executable loaded from the persistent compilation cache can hang in
  # its collectives (jax 0.10.2): these runs compile afresh.
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  return subprocess.Popen(
    [sys.executable, str(ROOT / "train.py"), *args],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    **popen,
  )


def finished(process, timeout=300):
  out, err = process.communicate(timeout=timeout)
  return process.returncode, out, err


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  out = tmp_path_factory.mktemp("one") / "run"
  assert cli.main(RUN + [f"--out={out}"]) == 0
  return out


def assert_same_losses(a, b, rtol=1e-4):
  la, lb = [r["loss"] for r in records(a)], [r["loss"] for r in records(b)]
  assert len(la) == len(lb) and len(la) > 1
  np.testing.assert_allclose(la, lb, rtol=rtol)
  ea, eb = records(a, "eval")[-1], records(b, "eval")[-1]
  np.testing.assert_allclose(ea["eval_ce"], eb["eval_ce"], rtol=rtol)


@pytest.mark.parametrize(
  "mesh, held", [("data:8,fsdp:1", 1.0), ("data:4,fsdp:2", 0.65), ("data:1,fsdp:8", 0.35)]
)
def test_meshes_train_as_one_device_does(tmp_path, one_device, mesh, held):
  code, _, err = finished(train_py(RUN + [f"--mesh={mesh}", f"--out={tmp_path / 'run'}"], 8))
  assert code == 0, err
  assert_same_losses(tmp_path / "run", one_device)
  got, alone = summary(tmp_path / "run")["mesh"], summary(one_device)["mesh"]
  data, fsdp = (int(part.split(":")[1]) for part in mesh.split(","))
  assert (got["data"], got["fsdp"], got["devices"]) == (data, fsdp, 8)
  # Sharded along fsdp, a device holds a fraction of the parameters (the small ones, under
  # sharding.MIN_SHARDED_SIZE elements, stay whole): 1, about 0.6 and 0.28 of them here.
  assert alone["params_per_device"] == summary(one_device)["params"]
  fraction = got["params_per_device"] / alone["params_per_device"]
  assert fraction == 1.0 if held == 1.0 else fraction <= held, fraction


def test_checkpoint_saved_on_8_devices_resumes_on_2(tmp_path, one_device):
  split = tmp_path / "split"
  code, _, err = finished(
    train_py(
      RUN[:0]
      + [a for a in RUN if a != "--steps=8"]
      + ["--steps=4", "--mesh=data:4,fsdp:2", f"--out={split}"],
      8,
    )
  )
  assert code == 0, err
  code, _, err = finished(
    train_py([f"--out={split}", "--resume", "--steps=8", "--mesh=data:1,fsdp:2"], 2)
  )
  assert code == 0, err
  assert summary(split)["mesh"]["devices"] == 2
  assert_same_losses(split, one_device)


def test_two_processes_train_as_one_does(tmp_path, one_device):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  out = tmp_path / "run"
  processes = [
    train_py(
      RUN
      + [
        f"--out={out}",
        f"--coordinator=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      2,
    )
    for i in range(2)
  ]
  results = [finished(p) for p in processes]
  for code, _, err in results:
    assert code == 0, err
  assert "run directory" in results[0][1] and "run directory" not in results[1][1]
  assert summary(out)["mesh"] == {**summary(out)["mesh"], "devices": 4, "processes": 2}
  assert_same_losses(out, one_device)


def test_each_process_builds_only_its_rows():
  """Rows of a batch split any way between processes make the same global batch."""
  whole = mqar_batch(0, 3, 16, seq_len=32, num_kv=4, vocab_size=64)
  halves = [
    mqar_batch(0, 3, 16, seq_len=32, num_kv=4, vocab_size=64, rows=r)
    for r in (range(0, 5), range(5, 16))
  ]
  for part, full in zip(zip(*halves), whole):
    np.testing.assert_array_equal(np.concatenate(part), full)
  mesh = sharding.MeshSpec().build()
  assert sharding.process_rows(mesh, 16) == range(16)


def test_mesh_flags_are_checked(tmp_path, capsys):
  for args, message in [
    (["--mesh=data:3"], "needs 3 devices, there are 1"),
    (["--mesh=model:2"], "--mesh must look like data:D,fsdp:F"),
    (["--coordinator=localhost:1"], "go together"),
    (["--num_processes=2", "--process_id=2"], "--process_id must be in"),
  ]:
    assert cli.main(args + [f"--out={tmp_path / 'x'}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
  assert not (tmp_path / "x").exists()


def test_param_spec_shards_the_largest_divisible_dimension():
  assert sharding.param_spec((12, 768, 3072), 8) == jax.sharding.PartitionSpec(None, None, "fsdp")
  assert sharding.param_spec((12, 1024, 3000), 16) == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert sharding.param_spec((768,), 8) == jax.sharding.PartitionSpec()  # small: replicated
  assert sharding.param_spec((50304, 768), 1) == jax.sharding.PartitionSpec()
  assert sharding.param_spec((4099, 4099), 2) == jax.sharding.PartitionSpec()  # nothing divides


# ------------------------------------------------------------------------------ checkpoints


@pytest.fixture
def saved_run(tmp_path):
  """A one-device run with checkpoints at steps 4 and 8."""
  out = tmp_path / "run"
  assert cli.main(RUN + [f"--out={out}"]) == 0
  return out


def truncate(step_dir: Path):
  for f in step_dir.rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_resume_passes_over_an_unreadable_latest_checkpoint(saved_run, capsys):
  truncate(saved_run / "checkpoints" / "8")
  capsys.readouterr()
  assert cli.main([f"--out={saved_run}", "--resume", "--steps=12"]) == 0
  err = capsys.readouterr().err
  warnings = [line for line in err.splitlines() if "unreadable" in line]
  assert len(warnings) == 1 and "step 8" in warnings[0], err
  assert (saved_run / "checkpoints" / "8.unreadable").is_dir()
  steps = [r["step"] for r in records(saved_run)]
  assert steps == [4, 8, 12]  # continued from step 4: the records after it were rewritten


def test_resume_with_no_readable_checkpoint_is_one_error_line(saved_run, capsys):
  for step in (4, 8):
    truncate(saved_run / "checkpoints" / str(step))
  capsys.readouterr()
  assert cli.main([f"--out={saved_run}", "--resume", "--steps=12"]) == 2
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("train.py: error")]
  assert len(errors) == 1 and "no readable checkpoint" in errors[0], err
  assert "Traceback" not in err


def test_failed_save_is_one_error_and_keeps_earlier_checkpoints(tmp_path, capsys, monkeypatch):
  out = tmp_path / "run"
  original = rundir.ocp.CheckpointManager.save

  def full_disk(self, step, *args, **kwargs):
    if step == 8:
      raise OSError(28, "No space left on device")
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(rundir.ocp.CheckpointManager, "save", full_disk)
  assert cli.main(RUN + [f"--out={out}"]) == 1
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("train.py: error")]
  assert len(errors) == 1 and "step 8" in errors[0] and "No space left" in errors[0], err
  assert "intact: [4]" in errors[0]
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4"]
  monkeypatch.undo()
  assert cli.main([f"--out={out}", "--resume"]) == 0  # and the run goes on from step 4


def test_parameters_of_another_configuration_are_named():
  config = TGNConfig(vocab_size=23, d_model=16, n_heads=2)
  model_def, _ = functional.init(config, jax.random.key(0))
  tokens = jnp.zeros((1, 8), jnp.int32)
  for other, match in [
    (config.replace(d_model=32), r"parameter .*kv_proj.*kernel.* has shape"),
    (config.replace(vocab_size=40), r"parameter .*embed.* has shape"),
    (config.replace(mixer="attention"), r"parameter .*gate_head.* is missing"),
  ]:
    _, params = functional.init(other, jax.random.key(0))
    with pytest.raises(ValueError, match=match):
      functional.apply(model_def, params, tokens)


def test_resume_with_other_model_options_keeps_the_checkpoints(saved_run, tmp_path, capsys):
  """Another model's options are an error (one line), never a reason to set checkpoints
  aside: through a --config file, and through the API, where the checkpoint's shapes say it."""
  other = tmp_path / "other.json"
  other.write_text(json.dumps({"d_model": 32}))
  capsys.readouterr()
  assert cli.main([f"--out={saved_run}", "--resume", f"--config={other}"]) == 2
  assert "--d_model cannot change on --resume" in capsys.readouterr().err
  from tgn_jax.training.config import resolve

  stored = json.loads((saved_run / "config.json").read_text())
  config = resolve({"resume": True, "d_model": 32}, base=stored)
  run, task, mesh = loop.prepare(config)
  with pytest.raises(ConfigError, match=r"holds .* of shape .* needs"):
    loop.train(config, run, task, mesh)
  assert sorted(p.name for p in (saved_run / "checkpoints").iterdir()) == ["4", "8"]


def test_a_signal_to_one_process_stops_both_at_the_same_step(tmp_path):
  """SIGTERM reaches process 0 only: both processes stop at the same step (agreed at a
  logging step), save one checkpoint and exit 128 + 15."""
  import signal
  import time

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  out = tmp_path / "run"
  args = [a for a in RUN if not a.startswith(("--steps", "--log_every", "--checkpoint_every"))]
  processes = [
    train_py(
      args
      + [
        "--steps=400",
        "--log_every=2",
        "--checkpoint_every=1000",
        f"--out={out}",
        f"--coordinator=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      2,
    )
    for i in range(2)
  ]
  deadline = time.time() + 240
  while not (out / "metrics.jsonl").exists() and time.time() < deadline:
    time.sleep(0.5)
  processes[0].send_signal(signal.SIGTERM)
  codes = [finished(p)[0] for p in processes]
  assert codes == [128 + signal.SIGTERM] * 2
  done = summary(out)["steps_completed"]
  assert done < 400 and done % 2 == 0
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [str(done)]
