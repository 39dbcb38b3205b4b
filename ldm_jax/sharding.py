"""Device mesh, shardings and multi-process start-up: one code path from one CPU to a pod.

The mesh has two axes, `data` and `fsdp` (`config.mesh_shape`). The batch is split
over both (every device holds a different slice of it); parameters, EMA and
optimizer state are split along `fsdp` on their largest divisible dimension
(fully sharded data parallelism) and replicated over `data`. `jax.jit` with these
shardings compiles the same train step for 1 device, 8 devices or many hosts.
"""
import importlib.util
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax.errors import UserError

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
# The batch dimension is split over every device of the mesh.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


# ------------------------------------------------------------------ mesh ----


def mesh_shape_spec(mesh_shape: Any) -> tuple[int, ...]:
  """Checks `config.mesh_shape` and returns its sizes in `MESH_AXES` order (-1 kept).

  Args:
    mesh_shape: a mapping from axis name to size (missing axes are 1), or a
      sequence of sizes in `MESH_AXES` order; one size may be -1, "the rest".

  Raises:
    UserError: unknown axis names, sizes that are not positive integers or -1, or
      more than one -1.
  """
  accepted = (f'a dict over axes {MESH_AXES} or a tuple of {len(MESH_AXES)} sizes, '
              f'each a positive integer or -1 (the rest, at most once)')
  if isinstance(mesh_shape, Mapping) or hasattr(mesh_shape, 'items'):
    unknown = sorted(set(mesh_shape.keys()) - set(MESH_AXES))
    if unknown:
      raise UserError(f'config.mesh_shape has unknown axes {unknown}; accepted: {accepted}')
    sizes = tuple(mesh_shape.get(axis, 1) for axis in MESH_AXES)
  elif isinstance(mesh_shape, Sequence) and not isinstance(mesh_shape, str):
    sizes = tuple(mesh_shape)
  else:
    raise UserError(f'config.mesh_shape={mesh_shape!r} is not valid; accepted: {accepted}')
  valid = (len(sizes) == len(MESH_AXES)
           and all(isinstance(s, int) and not isinstance(s, bool) and (s > 0 or s == -1)
                   for s in sizes)
           and sizes.count(-1) <= 1)
  if not valid:
    raise UserError(f'config.mesh_shape={_show(mesh_shape)} is not valid; accepted: {accepted}')
  return sizes


def resolve_mesh_shape(mesh_shape: Any, num_devices: int) -> tuple[int, ...]:
  """Sizes of the mesh axes for `num_devices` devices, with -1 filled in.

  Raises:
    UserError: `mesh_shape` is malformed or does not multiply to `num_devices`.
  """
  sizes = mesh_shape_spec(mesh_shape)
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise UserError(f'config.mesh_shape={_show(mesh_shape)} cannot cover {num_devices} '
                      f'devices; accepted: fixed sizes whose product divides {num_devices}')
    sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
  elif known != num_devices:
    raise UserError(f'config.mesh_shape={_show(mesh_shape)} has {known} devices but the run '
                    f'has {num_devices}; accepted: sizes whose product is {num_devices}, '
                    f'or -1 for one axis')
  return sizes


def _show(mesh_shape: Any) -> str:
  if hasattr(mesh_shape, 'items'):
    return str(dict(mesh_shape.items()))
  return repr(mesh_shape)


def make_mesh(devices: Sequence[jax.Device] | None = None,
              mesh_shape: Any = (-1, 1)) -> Mesh:
  """A (`data`, `fsdp`) mesh over `devices` (default: all devices of all processes).

  Args:
    devices: the devices to use, in order; default `jax.devices()`.
    mesh_shape: `config.mesh_shape`, see `mesh_shape_spec`; the default is pure
      data parallelism.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  # Orders devices so that neighbours on the interconnect share an `fsdp` group.
  return Mesh(mesh_utils.create_device_mesh(shape, devices), MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over all devices (the `data` and `fsdp` axes)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def num_batch_shards(mesh: Mesh) -> int:
  """Into how many parts `data_sharding` splits a batch: the number of devices."""
  return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'data.batch_size') -> None:
  """Stops with one line when a global batch cannot be split evenly over the mesh."""
  num = num_batch_shards(mesh)
  if batch_size % num:
    raise UserError(f'{what}={batch_size} must be divisible by the number of devices '
                    f'({num}); accepted: a multiple of {num}')


def global_batch(local_batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's numpy batch into global arrays split over all devices."""
  sharding = data_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


# ----------------------------------------------------------------- state ----


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> P:
  """Splits the largest dimension divisible by `fsdp_size` over `fsdp` (P() if none)."""
  if fsdp_size <= 1:
    return P()
  candidates = [(size, axis) for axis, size in enumerate(shape)
                if size % fsdp_size == 0]
  if not candidates:
    return P()
  # Largest size first; on a tie the earlier dimension, so the choice is stable.
  _, axis = max(candidates, key=lambda c: (c[0], -c[1]))
  return P(*([None] * axis), FSDP_AXIS)


def state_sharding(abstract_state: Any, mesh: Mesh) -> Any:
  """The sharding of each leaf of a train state (or any pytree of arrays) on `mesh`.

  Floating-point leaves (parameters, EMA, optimizer moments) are split along the
  `fsdp` axis on their largest dimension divisible by its size and replicated over
  `data`; other leaves (step counters, rng keys) and leaves with no divisible
  dimension are replicated.

  Args:
    abstract_state: a pytree of arrays or `jax.ShapeDtypeStruct`s, e.g. from
      `jax.eval_shape` of the state's init function.
    mesh: a mesh from `make_mesh`.

  Returns:
    A pytree of `NamedSharding`s with the structure of `abstract_state`.
  """
  fsdp_size = mesh.shape[FSDP_AXIS]

  def leaf_sharding(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size))

  return jax.tree.map(leaf_sharding, abstract_state)


def gather(tree: Any, mesh: Mesh) -> Any:
  """`tree` replicated on every device of `mesh` (an all-gather of FSDP shards).

  One jitted program for the whole tree: every process runs the same collectives in
  the same order (leaf-by-leaf `device_put` reshards can deadlock across processes).
  """
  return jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)


# --------------------------------------------------------- multi-process ----


def detected_cluster() -> str | None:
  """The multi-process environment JAX can configure itself from, if any.

  SLURM (`srun` with several tasks) is recognized from its environment variables,
  Cloud TPU VMs (GCE or GKE, one host or a pod slice) from the TPU runtime being
  installed; JAX's own cluster detection then finds the coordinator, the number of
  processes and this process's id.
  """
  if all(v in os.environ for v in ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID',
                                   'SLURM_LOCALID')):
    if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
      return 'slurm'
  if importlib.util.find_spec('libtpu') is not None:
    return 'tpu'
  return None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Starts `jax.distributed` when the run has several processes; says whether it did.

  Must run before anything else touches JAX. With explicit arguments all three
  are needed; without them, a detected SLURM or TPU pod environment configures
  itself; otherwise the run is a single process and nothing happens.

  Raises:
    UserError: some but not all of the three arguments, or values out of range.
  """
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
           'process_id': process_id}
  if any(v is not None for v in given.values()):
    missing = [f'--{k}' for k, v in given.items() if v is None]
    if missing:
      raise UserError(f'{", ".join(missing)} missing; accepted: all of --coordinator_address, '
                      f'--num_processes and --process_id, or none of them')
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise UserError(f'--process_id={process_id} with --num_processes={num_processes}; '
                      f'accepted: num_processes >= 1 and 0 <= process_id < num_processes')
    if ':' not in coordinator_address:
      raise UserError(f'--coordinator_address={coordinator_address!r}; accepted: host:port '
                      f'of process 0, e.g. 10.0.0.1:1234')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True
  cluster = detected_cluster()
  if cluster is None:
    return False
  try:
    jax.distributed.initialize()
  except (ValueError, RuntimeError) as e:
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise UserError(f'{cluster} detected but jax.distributed could not start ({first_line}); '
                    f'accepted: --coordinator_address, --num_processes and --process_id') from e
  return True
