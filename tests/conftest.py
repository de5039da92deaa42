import os

# Tests compile many small programs and run them once: trade XLA's backend
# optimisation for compile time (about 2x faster on CPU).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
  ).strip()
# Many tests compile identical programs (in different processes, or via fresh jit wrappers):
# a compilation cache shared by the pytest workers and the train.py subprocesses.
_CACHE = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  ".pytest_cache",
  "jax_compilation_cache",
)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import pytest

# On GPUs XLA multiplies float32 matrices in TF32 by default (about 1e-3 relative error):
# references computed by XLA must be true float32 for the tests' tolerances to mean anything.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns "auto" into a count
def pytest_cmdline_main(config):
  """With pytest-xdist loaded, `pytest` runs on every core: -n auto --dist loadgroup (tests
  marked xdist_group share a worker) unless -n, --tx or --dist say otherwise; -n 0 or
  -p no:xdist run in one process."""
  if not config.pluginmanager.hasplugin("xdist"):
    return
  option = config.option
  if hasattr(config, "workerinput"):
    # A worker parses the command line again, without the settings made here: it must know
    # that the run groups tests (xdist reads option.loadgroup when it collects).
    option.loadgroup = option.loadgroup or config.workerinput.get("dist") == "loadgroup"
    return
  if option.numprocesses is None and not option.tx:
    option.numprocesses = "auto"
  if option.dist == "no" and not option.distload:
    option.dist = "loadgroup"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
  """(pytest-xdist, controller) Tell each worker the distribution mode."""
  node.workerinput["dist"] = node.config.option.dist


@pytest.hookimpl(trylast=True)  # after xdist's worker hook, which names each test's group
def pytest_collection_modifyitems(config, items):
  if getattr(config.option, "loadgroup", False):
    # pytest-xdist (3.8) appends "@group" to item._nodeid, which pytest >= 9.2 no longer reads
    # (the id is item._id): without this the xdist_group marks are ignored.
    for item in items:
      grouped = item.__dict__.get("_nodeid")
      if grouped and grouped != item.nodeid and hasattr(item, "_id"):
        item._id = type(item._id).parse(grouped)
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
