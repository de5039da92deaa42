"""Data-parallel and fully sharded (FSDP) training on a jax.sharding.Mesh.

The mesh has two axes, `data` and `fsdp`. The batch is split over both; parameters and
optimiser state are split along `fsdp` (each array on its largest dimension that the axis
size divides; small arrays replicated), so data parallelism is fsdp = 1 and full sharding
data = 1. XLA inserts the collectives; every reduction in the train step (loss, open rate,
the routing report, the thermostat) is over the global batch.

Several hosts: each process runs the same program (`jax.distributed.initialize`), builds
only its rows of each batch, and the global batch is assembled from them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tgn_jax.training.config import ConfigError

AXES = ("data", "fsdp")
BATCH = P(AXES)
# Arrays smaller than this stay replicated: splitting them costs more than it saves.
MIN_SHARDED_SIZE = 2**14


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """Sizes of the mesh axes; None = all devices on that axis (at most one None)."""

  data: Optional[int] = None
  fsdp: int = 1

  @classmethod
  def parse(cls, text: Optional[str]) -> "MeshSpec":
    """'data:D,fsdp:F' (either may be left out; a missing data takes the other devices)."""
    if text is None or not text.strip():
      return cls()
    sizes: dict[str, int] = {}
    for part in text.split(","):
      name, sep, value = part.strip().partition(":")
      if not sep or name not in AXES or name in sizes:
        raise ConfigError(
          f"--mesh must look like data:D,fsdp:F (axes {', '.join(AXES)}), got {text!r}"
        )
      try:
        sizes[name] = int(value)
      except ValueError:
        raise ConfigError(f"--mesh: size of {name} must be an integer, got {value!r}") from None
      if sizes[name] < 1:
        raise ConfigError(f"--mesh: size of {name} must be positive, got {sizes[name]}")
    return cls(data=sizes.get("data"), fsdp=sizes.get("fsdp", 1))

  def build(self, devices: Optional[list] = None) -> Mesh:
    """The mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    fsdp = self.fsdp
    data = len(devices) // fsdp if self.data is None else self.data
    if data * fsdp != len(devices):
      raise ConfigError(
        f"--mesh data:{data},fsdp:{fsdp} needs {data * fsdp} devices, there are {len(devices)}"
      )
    return Mesh(np.asarray(devices).reshape(data, fsdp), AXES)


def initialize_distributed(
  coordinator: Optional[str], num_processes: Optional[int], process_id: Optional[int]
) -> None:
  """Joins the processes of a multi-host run: with the three flags, or, with none of them,
  by jax's own detection on a cluster it knows (SLURM, Open MPI, TPU pods...). A single
  process without flags does nothing."""
  given = [x is not None for x in (coordinator, num_processes, process_id)]
  if any(given) and not all(given):
    raise ConfigError("--coordinator, --num_processes and --process_id go together")
  # Cross-process collectives between CPU devices (no effect on accelerators). Nothing here
  # may touch a device before initialize().
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if all(given):
    jax.distributed.initialize(
      coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
  elif _on_a_cluster():
    jax.distributed.initialize()


def _on_a_cluster() -> bool:
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
    if int(os.environ.get(name, "1") or 1) > 1:
      return True
  return "JAX_COORDINATOR_ADDRESS" in os.environ


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Split along `fsdp` on the largest dimension it divides; replicated when small or
  when no dimension divides."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree of arrays (parameters, optimiser state, scalars)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(
    lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)), abstract_state
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over data x fsdp."""
  return NamedSharding(mesh, BATCH)


def process_rows(mesh: Mesh, batch_size: int) -> range:
  """The rows of a global batch this process's devices hold (contiguous)."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % shards:
    raise ConfigError(
      f"--batch_size ({batch_size}) must be a multiple of the batch shards, data x fsdp = {shards}"
    )
  indices = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
  starts = sorted({(i[0].start or 0, i[0].stop or batch_size) for i in indices.values()})
  lo, hi = starts[0][0], starts[-1][1]
  if sum(b - a for a, b in starts) != hi - lo:
    raise ConfigError(
      "this process's devices do not hold a contiguous part of the batch; "
      "order the mesh's devices by process"
    )
  return range(lo, hi)


def global_batch(mesh: Mesh, local_rows: Any, batch_size: int) -> Any:
  """A pytree of global arrays [batch_size, ...] from this process's rows."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(
      sharding, np.asarray(x), (batch_size,) + tuple(np.shape(x)[1:])
    ),
    local_rows,
  )


def any_process(flag: bool) -> bool:
  """True if `flag` is true on any process (every process gets the same answer)."""
  return max_over_processes(int(bool(flag))) > 0


def max_over_processes(value: int) -> int:
  """The largest of every process's `value` (collective: every process must call it)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier of this name."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
