"""Preemption: on SIGTERM the train loop saves a checkpoint and the program exits 0.

Schedulers (Cloud TPU maintenance, SLURM, Kubernetes) send SIGTERM some time before
they kill a job. Training polls `reached()` after every step; when it is True
the loop saves the state at that step and raises `Preempted`, which `main` turns
into exit status 0. Rerunning the same command resumes from that checkpoint.

With one process a Python SIGTERM handler sets a flag. Under `jax.distributed`
(several processes) JAX's preemption service receives the signal instead and agrees with all processes on one step at which to stop, so
that every process saves the same step.
"""
import contextlib
import signal
import threading
from collections.abc import Iterator

import jax
from jax.experimental import multihost_utils

_signalled = threading.Event()
_num_calls = 0  # Calls of `reached` in this process: the same on every process.


class Preempted(Exception):
  """Training stopped for preemption after saving a checkpoint; not an error."""

  def __init__(self, stage: str, step: int):
    super().__init__(f'{stage}: preempted; saved a checkpoint at step {step}. '
                     f'Rerun the same command to resume.')
    self.stage, self.step = stage, step


@contextlib.contextmanager
def handle_sigterm() -> Iterator[None]:
  """While active, SIGTERM asks the train loop to save and stop instead of killing it.

  A no-op under `jax.distributed` (JAX's preemption service handles the signal)
  and outside the main thread (where Python cannot install signal handlers).
  """
  if jax.distributed.is_initialized() or threading.current_thread() is not threading.main_thread():
    yield
    return
  _signalled.clear()
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: _signalled.set())
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
    _signalled.clear()


def reached() -> bool:
  """Whether training should save now and stop. Every process must call it every step."""
  global _num_calls
  _num_calls += 1
  if jax.distributed.is_initialized():
    # The sync point needs ids that only grow; stage steps restart at each stage.
    return multihost_utils.reached_preemption_sync_point(_num_calls)
  return _signalled.is_set()
