"""Orbax checkpoints that cannot lie: finite saves, verified restores, no hangs.

Orbax writes each step to a temporary directory and renames it when complete, so
an interrupted save never replaces a good checkpoint. On top of that:

- `save` checks the state itself (parameters, EMA, optimizer state: one jitted
  reduction) and refuses a non-finite one, and records per-array checksums (and
  the run's config) in the step's metadata.
- `restore` recomputes the checksums of what it read; a checkpoint that is
  missing pieces, unreadable, truncated or fails its checksums is moved aside
  (`<step>.corrupt`) with one warning line and the next older one is tried.
- A failed write raises `CheckpointWriteError` (a `UserError`: one line) instead
  of leaving orbax threads waiting; `wait_all` awaits pending saves on exit.

Checksums are sums modulo 2**32 of the arrays' bits (one plain, one mixed), which
do not depend on the order of the reduction: every process computes them on the
global arrays and gets the same numbers, whatever the mesh that wrote or reads them.
"""
import json
import os
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from orbax.checkpoint._src.metadata import checkpoint as step_metadata

from ldm_jax import fileio
from ldm_jax.errors import UserError

State = TypeVar('State')

RECORD_KEY = 'ldm_jax'  # Our entry in orbax's per-step custom metadata.
CORRUPT_SUFFIX = '.corrupt'
_managers: 'weakref.WeakKeyDictionary[ocp.CheckpointManager, bool]' = (
    weakref.WeakKeyDictionary())  # Every manager made here -> whether it is read-only.


class CheckpointWriteError(UserError):
  """A checkpoint could not be written (permissions, full disk, I/O error)."""


class NonFiniteStateError(UserError):
  """The state to save holds NaN or Inf; nothing was saved."""


class _Unusable(Exception):
  """A checkpoint that is incomplete, unreadable or fails its checksums."""


def make_manager(directory: str, *, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
  """A manager over `directory` that keeps the `keep` most recent steps.

  Orbax deletes old steps only after a newer save has completed, so the newest
  complete (hence verified at write time) checkpoint is never garbage-collected.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only,
      # Directories made in the calling thread: a failure raises here instead of
      # leaving background threads waiting for a signal that never comes.
      async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False))
  # One unnamed item, fixed here rather than guessed from the newest step on disk
  # (a damaged one would make every step unreadable).
  manager = ocp.CheckpointManager(fileio.checkpoint_path(directory), options=options,
                                  item_handlers=ocp.StandardCheckpointHandler())
  _managers[manager] = read_only
  return manager


def abstract_like(state: Any, sharding: Any) -> Any:
  """Shape/dtype/sharding skeleton of `state` (a pytree of arrays or ShapeDtypeStructs).

  Args:
    state: the pytree to describe.
    sharding: one `jax.sharding.Sharding` for every leaf, or a pytree of them with
      the structure of `state` (e.g. `sharding.state_sharding`). Restoring into the
      skeleton lays the arrays out this way, whatever mesh wrote the checkpoint.
  """
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, state)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, sharding)


# ------------------------------------------------------------ integrity ----


def _as_words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words (16- and 8-bit values widened, 64-bit split)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = np.dtype(x.dtype).itemsize * 8
  unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint32}[bits]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _checksums(x: jax.Array) -> jax.Array:
  """[2] uint32: sum of words * (2i + 1) and sum of a mix of (word, i), mod 2**32."""
  words = _as_words(x)
  index = jnp.zeros(words.shape, jnp.uint32)  # Global position, without reshaping.
  stride = 1
  for axis in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride)
    stride *= words.shape[axis]
  weighted = words * (index * jnp.uint32(2) + jnp.uint32(1))
  mixed = words * jnp.uint32(0x9E3779B1) + index * jnp.uint32(0x85EBCA77)
  mixed = mixed ^ (mixed >> 15)
  mixed = mixed * jnp.uint32(0xC2B2AE3D)
  mixed = mixed ^ (mixed >> 13)
  return jnp.stack([jnp.sum(weighted, dtype=jnp.uint32), jnp.sum(mixed, dtype=jnp.uint32)])


@jax.jit
def _integrity(x: jax.Array) -> jax.Array:
  """[3] uint32: 1 if `x` is finite (or not floating) else 0, then its two checksums.

  One leaf at a time: a state's leaves share a few dozen shapes, so this compiles a few
  dozen small programs, reused by every state of those shapes, instead of one large
  program per state structure.
  """
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)
  return jnp.concatenate([finite.astype(jnp.uint32)[None], _checksums(x)])


def _to_host(x: jax.Array) -> np.ndarray:
  """A small replicated result as numpy on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def describe(state: Any) -> tuple[bool, list[list]]:
  """(whether every floating array of `state` is finite, per-leaf record).

  The record lists `[path, shape, dtype, checksum_a, checksum_b]` per leaf; every
  process gets the same one.
  """
  with_paths = jax.tree_util.tree_flatten_with_path(state)[0]
  record, finite = [], True
  for path, x in with_paths:
    # Each leaf's result is read before the next is dispatched: programs with collectives
    # in flight together can starve each other's rendezvous on a host's device threads.
    leaf_finite, a, b = _to_host(_integrity(x))
    finite &= bool(leaf_finite)
    record.append([jax.tree_util.keystr(path), list(x.shape), np.dtype(x.dtype).name,
                   int(a), int(b)])
  return finite, record


# ----------------------------------------------------------------- save ----


def _config_json(config: ml_collections.ConfigDict | dict | None) -> dict | None:
  if config is None:
    return None
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def _one_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return f'{type(e).__name__}: {lines[0][:300]}' if lines else type(e).__name__


def finish(manager: ocp.CheckpointManager) -> None:
  """Waits for the pending save; a failed one raises `CheckpointWriteError`."""
  try:
    manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as e:  # Whatever the storage raised: permissions, ENOSPC, EIO.
    raise CheckpointWriteError(f'cannot write a checkpoint in {manager.directory}: '
                               f'{_one_line(e)}') from e


def last_saved_step(manager: ocp.CheckpointManager) -> int | None:
  """The newest step complete on disk, after any pending save (whose failure is ignored)."""
  try:
    manager.wait_until_finished()
  except Exception:  # A failed save simply is not on disk.
    pass
  manager.reload()
  return manager.latest_step()


def save(manager: ocp.CheckpointManager, state: Any,
         config: ml_collections.ConfigDict | dict | None = None) -> None:
  """Saves a finite `state` at its own step (no-op if that step is already saved).

  Args:
    manager: from `make_manager`.
    state: the pytree to save; it has a `step` field.
    config: stored with the checkpoint (compared on resume, see `config_check`).

  Raises:
    NonFiniteStateError: a floating array of `state` holds NaN or Inf; the message
      names the newest checkpoint on disk (all of which are finite).
    CheckpointWriteError: the write failed, now or (found now) the previous one.
  """
  step = int(jax.device_get(state.step))
  if step in manager.all_steps():
    return
  finish(manager)  # The previous save's failure is reported as such, not as this one's.
  finite, record = describe(state)
  if not finite:
    kept = last_saved_step(manager)
    last = f'step {kept}' if kept is not None else 'none'
    raise NonFiniteStateError(f'{manager.directory}: the state at step {step} has NaN or Inf '
                              f'values; stopped without saving it (last finite checkpoint: '
                              f'{last})')
  metadata = {RECORD_KEY: {'arrays': record, 'config': _config_json(config)}}
  try:
    manager.save(step, args=ocp.args.StandardSave(state), force=True, custom_metadata=metadata)
  except Exception as e:
    raise CheckpointWriteError(f'cannot write checkpoint {manager.directory}/{step}: '
                               f'{_one_line(e)}') from e


def wait_all() -> None:
  """Awaits the pending saves of every manager; errors are dropped (the run already stops)."""
  for manager in list(_managers):
    try:
      manager.wait_until_finished()
    except Exception:  # The save failed; what is on disk is what `restore` checks.
      pass


# -------------------------------------------------------------- restore ----


def step_record(directory: str, step: int) -> dict:
  """Our metadata of `step` (arrays, config); raises `_Unusable` when it is missing."""
  directory = fileio.checkpoint_path(directory)  # As orbax names it (file:// URIs as paths).
  path = os.fspath(step_metadata.step_metadata_file_path(os.path.join(directory, str(step))))
  if not fileio.exists(path):
    raise _Unusable('no metadata')
  try:
    custom = fileio.read_json(path).get('custom_metadata') or {}
  except (*fileio.ERRORS, ValueError, AttributeError) as e:
    raise _Unusable(f'unreadable metadata ({_one_line(e)})') from e
  record = custom.get(RECORD_KEY) if isinstance(custom, dict) else None
  if not isinstance(record, dict) or not isinstance(record.get('arrays'), list):
    raise _Unusable('no checksums in its metadata')
  return record


def stored_config(directory: str) -> dict | None:
  """The config stored with the newest readable checkpoint in `directory`, if any."""
  if not fileio.isdir(directory):
    return None
  steps = [int(name) for name in fileio.listdir(directory)
           if name.isdigit() and fileio.isdir(os.path.join(directory, name))]
  for step in sorted(steps, reverse=True):
    try:
      config = step_record(directory, step).get('config')
    except _Unusable:
      continue
    if config is not None:
      return config
  return None


def _layout_differences(record: list[list], abstract: Any) -> list[str]:
  """Where the saved arrays' paths, shapes or dtypes differ from `abstract`'s."""
  saved = {path: (tuple(shape), dtype) for path, shape, dtype, *_ in record}
  wanted = {jax.tree_util.keystr(path): (tuple(x.shape), np.dtype(x.dtype).name)
            for path, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  differences = [f'{p}: missing from the checkpoint' for p in wanted if p not in saved]
  differences += [f'{p}: not in the configured model' for p in saved if p not in wanted]
  differences += [f'{p}: saved {saved[p][0]} {saved[p][1]}, configured {w[0]} {w[1]}'
                  for p, w in wanted.items() if p in saved and saved[p] != w]
  return differences


def _all_processes(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _read_verified(manager: ocp.CheckpointManager, step: int, abstract: State) -> State:
  """The state of `step`, checked against its checksums; `_Unusable` otherwise."""
  record = step_record(str(manager.directory), step)
  differences = _layout_differences(record['arrays'], abstract)
  if differences:
    more = f' (and {len(differences) - 1} more)' if len(differences) > 1 else ''
    raise UserError(f'checkpoint {manager.directory}/{step} does not match the configured '
                    f'model: {differences[0]}{more}')
  error = None
  try:
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # Truncated, missing or garbled files: tensorstore, JSON, OS errors.
    error, state = e, None
  if not _all_processes(error is None):
    raise _Unusable(f'unreadable ({_one_line(error) if error else "on another process"})')
  _, restored = describe(state)
  bad = [saved[0] for saved, now in zip(record['arrays'], restored) if saved[3:] != now[3:]]
  if bad:
    more = f' and {len(bad) - 1} more' if len(bad) > 1 else ''
    raise _Unusable(f'checksum mismatch in {bad[0]}{more}')
  return state


def move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Renames step `step` to `<step>.corrupt` (a free variant of it); returns the new path."""
  source = os.path.join(str(manager.directory), str(step))
  target = source + CORRUPT_SUFFIX
  if jax.process_index() == 0:
    n = 1
    while fileio.exists(target):
      n += 1
      target = f'{source}{CORRUPT_SUFFIX}{n}'
    fileio.rename(source, target)
  multihost_utils.sync_global_devices(f'checkpoint {source} moved aside')
  manager.reload()
  return target


def restore(manager: ocp.CheckpointManager, abstract_state: State,
            step: int | None = None) -> State:
  """Restores the newest verified checkpoint (or `step`) into `abstract_state`'s layout.

  A checkpoint that fails verification is moved aside with one warning line (left
  in place when `manager` is read-only) and the next older one is tried.

  Raises:
    UserError: no checkpoint verifies, or the checkpoints do not match the model.
  """
  steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
  if not steps:
    raise UserError(f'no checkpoint in {manager.directory}')
  for candidate in steps:
    try:
      return _read_verified(manager, candidate, abstract_state)
    except _Unusable as e:
      where = f'{manager.directory}/{candidate}'
      action = 'skipped'
      if not _managers.get(manager, False):
        action = f'moved to {os.path.basename(move_aside(manager, candidate))}'
      if jax.process_index() == 0:  # One line per run, not per process.
        logging.warning('checkpoint %s is unusable (%s); %s', where, e, action)
  raise UserError(f'no usable checkpoint in {manager.directory} (tried steps '
                  f'{", ".join(map(str, steps))})')


def restore_or_init(manager: ocp.CheckpointManager, init_fn: Callable[[], State],
                    abstract_state: State) -> tuple[State, bool]:
  """The newest verified checkpoint if there is one, else `init_fn()`; also says which."""
  if manager.latest_step() is None:
    return init_fn(), False
  try:
    return restore(manager, abstract_state), True
  except UserError:
    if manager.latest_step() is not None:  # A mismatch, not corruption.
      raise
  logging.warning('no usable checkpoint left in %s; starting from scratch', manager.directory)
  return init_fn(), False
