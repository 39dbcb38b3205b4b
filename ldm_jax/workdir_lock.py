"""One run per workdir: a lock file held by process 0 for the run's lifetime.

`WORKDIR/.lock` holds the holder's host and pid. A second run on the workdir stops
at once with one line naming them; a lock whose holder is dead (same host, pid gone)
is stale and taken over. A workdir this run created is removed again on exit when
it is left empty (a run that failed its checks writes nothing).
"""
import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator

import jax
from jax.experimental import multihost_utils

from ldm_jax import fileio
from ldm_jax.errors import UserError

LOCK_FILE = '.lock'


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Exists, owned by someone else.
    return True
  return True


def _holder(path: str) -> dict:
  try:
    return fileio.read_json(path)
  except (*fileio.ERRORS, ValueError):
    return {}


def _try_create(path: str) -> bool:
  return fileio.create_exclusive(path, json.dumps(
      {'host': socket.gethostname(), 'pid': os.getpid(), 'since': time.time()}))


def _reason(e: BaseException) -> str:
  return (e.strerror if isinstance(e, OSError) else getattr(e, 'message', '')) or str(e)


def acquire(workdir: str) -> str:
  """Creates the lock of `workdir` (making the directory) or raises `UserError`."""
  try:
    fileio.makedirs(workdir)
  except fileio.ERRORS as e:
    raise UserError(f'workdir {workdir!r} is not writable: {_reason(e)}') from e
  path = os.path.join(workdir, LOCK_FILE)
  for _ in range(2):
    try:
      if _try_create(path):
        return path
    except fileio.ERRORS as e:
      raise UserError(f'workdir {workdir!r} is not writable: {_reason(e)}') from e
    holder = _holder(path)
    host, pid = holder.get('host'), holder.get('pid')
    stale = host == socket.gethostname() and isinstance(pid, int) and not _alive(pid)
    if not stale:
      who = f'host {host}, pid {pid}' if host else 'an unreadable lock'
      raise UserError(f'workdir {workdir} is in use by another run ({who}); if that run is '
                      f'gone, delete {path}')
    fileio.remove(path)  # Its holder died (e.g. SIGKILL): take it over.
  raise UserError(f'could not take the lock {path}')


def release(path: str) -> None:
  """Removes the lock at `path` if this process still holds it."""
  if _holder(path).get('pid') == os.getpid() and _holder(path).get('host') == socket.gethostname():
    fileio.remove(path)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds the lock of `workdir` (on process 0; all processes agree) while active."""
  created = not fileio.exists(workdir)
  path, error = None, None
  if jax.process_index() == 0:
    try:
      path = acquire(workdir)
    except UserError as e:
      error = e
  if jax.process_count() > 1:
    ok = bool(multihost_utils.broadcast_one_to_all(error is None))
    if not ok and error is None:
      error = UserError(f'workdir {workdir} is in use by another run (see process 0)')
  if error is not None:
    raise error
  try:
    yield
  finally:
    if path is not None:
      release(path)
      if created:  # Only when empty: a run that failed its checks leaves nothing.
        fileio.remove_empty_dir(workdir)
