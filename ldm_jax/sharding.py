"""Device mesh and shardings: one code path from one CPU to a pod.

The batch is sharded along the `data` axis of a mesh over all devices; parameters
and optimizer state are replicated. `jax.jit` with these shardings compiles the same
train step for 1 device or many, so there is no single-device special case.
"""
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax.errors import UserError

DATA_AXIS = 'data'


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh over `devices` (default: all devices of all hosts)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the `data` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'data.batch_size') -> None:
  """Stops with one line when a global batch cannot be split evenly over the mesh."""
  num = mesh.shape[DATA_AXIS]
  if batch_size % num:
    raise UserError(f'{what}={batch_size} must be divisible by the number of devices '
                    f'({num}); accepted: a multiple of {num}')


def global_batch(local_batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's numpy batch into global arrays sharded along `data`."""
  sharding = data_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
