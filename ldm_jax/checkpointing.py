"""Orbax checkpoints: atomic saves every N steps, keep K, restore-or-init.

Orbax writes each step to a temporary directory and renames it when complete, so
an interrupted save never replaces a good checkpoint.
"""
import os
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

from ldm_jax.errors import UserError

State = TypeVar('State')


def make_manager(directory: str, *, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
  """A manager over `directory` that keeps the `keep` most recent steps."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         read_only=read_only)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


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


def save(manager: ocp.CheckpointManager, state: Any) -> None:
  """Saves `state` at its own step (no-op if that step is already saved)."""
  step = int(jax.device_get(state.step))
  if step not in manager.all_steps():
    manager.save(step, args=ocp.args.StandardSave(state), force=True)


def restore(manager: ocp.CheckpointManager, abstract_state: State,
            step: int | None = None) -> State:
  """Restores `step` (default: latest) into the structure and shardings of `abstract_state`."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise UserError(f'no checkpoint in {manager.directory}')
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except (ValueError, KeyError, TypeError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f'checkpoint {manager.directory}/{step} does not match the configured '
                    f'model: {first_line[:300]}') from e


def restore_or_init(manager: ocp.CheckpointManager, init_fn: Callable[[], State],
                    abstract_state: State) -> tuple[State, bool]:
  """The latest checkpoint if there is one, else `init_fn()`; also says which."""
  if manager.latest_step() is None:
    return init_fn(), False
  return restore(manager, abstract_state), True
