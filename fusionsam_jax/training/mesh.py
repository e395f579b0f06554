"""Device mesh and data-parallel sharding helpers.

Data parallelism is `jax.jit` over a 1-D `Mesh` with `NamedSharding`: the batch is split
along the mesh axis ``"data"``, params and optimizer state are replicated. This replaces
the design card's `pmap` (maintenance mode since JAX 0.8) and behaves the same on every
local GPU; on one CPU the mesh has one device and nothing changes.

Multi-host: call `maybe_initialize_distributed()` before any other JAX call; every process
then feeds its host-local slice of the global batch to `shard_batch`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

log = logging.getLogger(__name__)


def maybe_initialize_distributed(**kwargs: Any) -> bool:
  """Calls `jax.distributed.initialize()` only in a multi-process launch.

  Detected launches: ``JAX_COORDINATOR_ADDRESS`` set (with ``JAX_NUM_PROCESSES`` /
  ``JAX_PROCESS_ID`` or keyword arguments), Slurm with more than one task
  (``SLURM_NTASKS`` > 1), Open MPI with more than one rank (``OMPI_COMM_WORLD_SIZE`` > 1).
  JAX itself reads the cluster details from those variables. Keyword arguments are passed
  on to `jax.distributed.initialize`. Returns True when it initialised.

  Must run before any other JAX computation; a no-op on a single host.
  """
  env = os.environ
  reason = None
  if env.get("JAX_COORDINATOR_ADDRESS"):
    reason = "JAX_COORDINATOR_ADDRESS"
    if "num_processes" not in kwargs and env.get("JAX_NUM_PROCESSES"):
      kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if "process_id" not in kwargs and env.get("JAX_PROCESS_ID"):
      kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
  elif int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    reason = "Slurm (SLURM_NTASKS=%s)" % env["SLURM_NTASKS"]
  elif int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    reason = "Open MPI (OMPI_COMM_WORLD_SIZE=%s)" % env["OMPI_COMM_WORLD_SIZE"]
  elif kwargs.get("coordinator_address"):
    reason = "coordinator_address argument"
  if reason is None:
    return False
  log.info("Multi-process launch detected via %s: jax.distributed.initialize()", reason)
  jax.distributed.initialize(**kwargs)
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all (global) devices with axis name ``"data"``.

  The axis type is `Auto` (classic GSPMD propagation), so model code needs no sharding
  annotations.
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ``"data"``, other dimensions replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated on every device of `mesh`."""
  return NamedSharding(mesh, P())


def _local_data_devices(mesh: Mesh) -> int:
  """Number of this process's devices along the data axis."""
  return sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())


def check_global_batch(global_batch_size: int, mesh: Mesh) -> None:
  """Raises ValueError unless the global batch splits evenly over the data axis."""
  n = mesh.shape[DATA_AXIS]
  if global_batch_size % n:
    raise ValueError(
        f"global batch size {global_batch_size} is not divisible by the {n} devices of "
        f"the '{DATA_AXIS}' mesh axis; choose a batch size that is a multiple of {n}")


def shard_batch(batch: Mapping[str, Any] | Any, mesh: Mesh) -> Any:
  """Places a host-local numpy batch (pytree, every leaf batch-major) on the mesh.

  Each process passes its own slice of the global batch (on one host: the whole batch);
  the result is one global `jax.Array` per leaf, sharded along ``"data"``
  (`jax.make_array_from_process_local_data`). Every leaf must have the same leading
  dimension, divisible by this process's number of devices.
  """
  sharding = data_sharding(mesh)
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("shard_batch got an empty batch")
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if None in sizes:
    raise ValueError("every batch leaf needs a leading batch dimension; got a scalar leaf")
  if len(sizes) != 1:
    paths = {jax.tree_util.keystr(p): np.shape(x)
             for p, x in jax.tree_util.tree_flatten_with_path(batch)[0]}
    raise ValueError(f"batch leaves disagree on the batch dimension: {paths}")
  local = sizes.pop()
  n_local = _local_data_devices(mesh)
  if n_local == 0:
    raise ValueError("this process owns no device of the mesh")
  if local % n_local:
    raise ValueError(
        f"host-local batch size {local} is not divisible by this process's {n_local} "
        f"devices (global batch {local * jax.process_count()} over "
        f"{mesh.shape[DATA_AXIS]} devices); choose a batch size that is a multiple of the "
        "device count")
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
