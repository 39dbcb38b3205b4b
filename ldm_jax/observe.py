"""Watching a run: progress bars, metric writers, profiler traces, the compilation cache.

Fields of `config.train` read here:
  report_to: 'tensorboard' (always written) or 'wandb' (TensorBoard and Weights &
    Biases; needs `pip install wandb`).
  profile_steps: > 0 traces that many train steps of each stage with the JAX
    profiler, starting after the first (compiling) step; the trace lands in the
    stage's TensorBoard directory (TensorBoard's Profile tab).
  compilation_cache_dir: where compiled programs persist between runs:
    'default' = $JAX_COMPILATION_CACHE_DIR if set, else the user cache directory
    (~/.cache/ldm_jax/jax, or under $XDG_CACHE_HOME); 'workdir' = WORKDIR/jax_cache
    (one cache shared by every host of a pod through a gs:// workdir); '' = off;
    anything else is a directory.
"""
from __future__ import annotations

from collections.abc import Iterable
import hashlib
import importlib
import os
import threading
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging
from flax.metrics import tensorboard

from ldm_jax.errors import UserError

REPORT_TO = ('tensorboard', 'wandb')
COMPILATION_CACHE_DEFAULT, COMPILATION_CACHE_WORKDIR = 'default', 'workdir'


# ---------------------------------------------------------------- progress ----


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str,
             unit: str = 'batch', min_total: int = 2) -> tqdm.tqdm:
  """A tqdm bar with rate and ETA, on process 0 only, for loops of `min_total`+ items."""
  if total is None and iterable is not None and hasattr(iterable, '__len__'):
    total = len(iterable)
  quiet = jax.process_index() != 0 or (total is not None and total < min_total)
  return tqdm.tqdm(iterable, total=total, desc=desc, unit=unit, disable=quiet,
                   dynamic_ncols=True, mininterval=1.0, leave=False)


class StepProgress:
  """A per-step bar for a sampling loop that runs inside one jitted call.

  `tick(t)` is called from the compiled loop (through `jax.debug.callback`) with each
  model evaluation's timestep; distinct timesteps count as steps, so guidance, several
  evaluations per step and repeated calls do not overcount.
  """

  def __init__(self, total: int, desc: str = 'sampling steps'):
    self.total, self.desc = total, desc
    self._bar, self._seen = None, set()
    self._lock = threading.Lock()

  def start(self) -> None:
    self.close()
    self._seen = set()
    self._bar = progress(total=self.total, desc=self.desc, unit='step')

  def tick(self, timestep) -> None:
    with self._lock:
      value = float(np.asarray(timestep))
      if self._bar is not None and value not in self._seen:
        self._seen.add(value)
        self._bar.update(1)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def known_length(dataset) -> int | None:
  """The number of elements of a tf.data dataset, or None when TensorFlow cannot tell."""
  count = int(dataset.cardinality())
  return count if count >= 0 else None


# ----------------------------------------------------------------- writers ----


class Writer:
  """TensorBoard summaries, mirrored to Weights & Biases with `report_to='wandb'`.

  W&B gets one run per workdir (resumed when the workdir is), with each stage's
  metrics under its name (`autoencoder/train/loss`) against its own step.
  """

  def __init__(self, log_dir: str, *, report_to: str = 'tensorboard', workdir: str = '',
               run_config: dict[str, Any] | None = None):
    self.log_dir = log_dir
    self._tensorboard = tensorboard.SummaryWriter(log_dir)
    self._wandb, self._prefix = None, os.path.basename(os.path.dirname(log_dir.rstrip('/')))
    if report_to == 'wandb':
      self._wandb = _wandb_run(workdir or os.path.dirname(log_dir), run_config)
      self._wandb.define_metric(f'{self._prefix}/step')
      self._wandb.define_metric(f'{self._prefix}/*', step_metric=f'{self._prefix}/step')

  def scalar(self, tag: str, value: float, step: int) -> None:
    self._tensorboard.scalar(tag, value, step)
    if self._wandb is not None:
      self._wandb.log({f'{self._prefix}/step': step, f'{self._prefix}/{tag}': float(value)})

  def image(self, tag: str, image: np.ndarray, step: int) -> None:
    self._tensorboard.image(tag, image, step)
    if self._wandb is not None:
      import wandb  # pylint: disable=g-import-not-at-top  # Present: checked in _wandb_run.

      self._wandb.log({f'{self._prefix}/step': step,
                       f'{self._prefix}/{tag}': wandb.Image(np.asarray(image))})

  def flush(self) -> None:
    self._tensorboard.flush()

  def close(self) -> None:
    self._tensorboard.close()


def check_report_to(report_to: str) -> None:
  """Raises the one-line error `summary_writer` would, before any work starts."""
  if report_to not in REPORT_TO:
    raise UserError(f'config.train.report_to={report_to!r} is not valid; accepted: '
                    f'{", ".join(REPORT_TO)}')
  if report_to == 'wandb':
    try:
      importlib.import_module('wandb')
    except ImportError:
      raise UserError(_WANDB_MISSING) from None


_WANDB_MISSING = ("config.train.report_to='wandb' needs the wandb package; accepted: "
                  "pip install wandb (or pip install -e '.[wandb]'), or "
                  "report_to='tensorboard'")


def _wandb_run(workdir: str, run_config: dict[str, Any] | None):
  """The W&B run of `workdir` (started, or resumed by an id derived from the workdir)."""
  try:
    import wandb  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(_WANDB_MISSING) from None
  if wandb.run is not None:
    return wandb.run
  run_id = hashlib.sha256(os.path.abspath(workdir).encode() if '://' not in workdir
                          else workdir.encode()).hexdigest()[:16]
  return wandb.init(id=run_id, resume='allow', name=os.path.basename(workdir.rstrip('/')),
                    config=run_config)


def summary_writer(log_dir: str, config: ml_collections.ConfigDict | None = None,
                   workdir: str = '') -> Writer | None:
  """Process 0's writer for `log_dir` (None on the other processes)."""
  if jax.process_index() != 0:
    return None
  report_to = config.train.get('report_to', 'tensorboard') if config is not None else 'tensorboard'
  check_report_to(report_to)
  return Writer(log_dir, report_to=report_to, workdir=workdir,
                run_config=config.to_dict() if config is not None else None)


# ---------------------------------------------------------------- profiler ----


class StepProfiler:
  """Traces train steps (start_step, start_step + num_steps] with the JAX profiler.

  Call `before(step)` before running `step`; the trace starts before the first
  traced step and stops (blocking on its results) after the last.
  """

  def __init__(self, num_steps: int, start_step: int, log_dir: str):
    # The first step of a (re)started stage compiles; trace the ones after it.
    self.first, self.last = start_step + 2, start_step + 1 + num_steps
    self._log_dir, self._active = log_dir, False
    self.enabled = num_steps > 0

  def before(self, step: int) -> None:
    if self.enabled and step == self.first:
      jax.profiler.start_trace(self._log_dir)
      self._active = True
      logging.info('profiler: tracing steps %d..%d into %s', self.first, self.last,
                   self._log_dir)

  def after(self, step: int, outputs: Any) -> None:
    if self._active and step >= self.last:
      jax.block_until_ready(outputs)
      self.stop()

  def stop(self) -> None:
    if self._active:
      jax.profiler.stop_trace()
      self._active = False


def op_times(trace_dir: str) -> tuple[list[tuple[str, float, int, str]], str]:
  """Time spent in each XLA op of the newest profiler trace under `trace_dir`.

  On GPUs and TPUs, the kernels on the device's streams, each counted under the HLO op
  that launched it (its `hlo_op` stat; the kernel's own name where it has none). On the
  CPU, the XLA thunks on the host's threads: with several cores they overlap, and a
  thunk's time includes waits for the other threads (benchmarks/README.md).

  Returns:
    (op, seconds, calls, first kernel name) per op, most time first, and what was
    measured ('device kernels' or 'CPU thunks').
  """
  paths = [os.path.join(root, name) for root, _, names in os.walk(trace_dir)
           for name in names if name.endswith('.xplane.pb')]
  if not paths:
    raise UserError(f'no profiler trace (*.xplane.pb) under {trace_dir}')
  profile = jax.profiler.ProfileData.from_file(max(paths, key=os.path.getmtime))
  device_planes = [plane for plane in profile.planes if plane.name.startswith('/device:')]
  if device_planes:
    lines = [line for plane in device_planes for line in plane.lines]
    # Derived lines ('XLA Ops', 'XLA Modules', ...) repeat the streams' time.
    lines = [line for line in lines if line.name.startswith('Stream')] or lines
    measured = 'device kernels'
  else:
    lines = [line for plane in profile.planes if plane.name == '/host:CPU'
             for line in plane.lines]
    measured = 'CPU thunks'
  totals: dict[str, list] = {}
  for line in lines:
    for event in line.events:
      op = dict(event.stats).get('hlo_op')
      if op is None and not device_planes:
        continue  # Host events that are not XLA thunks (Python, thread pools).
      row = totals.setdefault(str(op or event.name), [0.0, 0, event.name])
      row[0] += event.duration_ns * 1e-9
      row[1] += 1
  rows = sorted(((op, seconds, calls, kernel) for op, (seconds, calls, kernel) in totals.items()),
                key=lambda row: -row[1])
  return rows, measured


def op_kind(op: str) -> str:
  """An HLO op's name without its instance number: 'loop_add_fusion.12' -> 'loop_add_fusion'."""
  base, _, number = op.rpartition('.')
  return base if base and number.isdigit() else op


def op_time_report(trace_dir: str, num_steps: int, top: int = 25) -> str:
  """Per-step op times of a trace of `num_steps` steps: the largest ops, then by kind."""
  rows, measured = op_times(trace_dir)
  total = sum(seconds for _, seconds, _, _ in rows) or float('nan')
  kinds: dict[str, list] = {}
  for op, seconds, calls, _ in rows:
    kind = kinds.setdefault(op_kind(op), [0.0, 0])
    kind[0] += seconds
    kind[1] += calls
  def line(seconds: float, calls: int, name: str) -> str:
    return (f'{seconds / num_steps * 1e3:9.2f} {seconds / total:6.1%} '
            f'{calls / num_steps:6.0f}  {name}')
  lines = [f'profile: {total / num_steps * 1e3:.1f} ms of {measured} per step '
           f'({num_steps} steps, {len(rows)} ops); the {top} largest:',
           f'{"ms/step":>9} {"share":>6} {"calls":>6}  op  [kernel]']
  lines += [line(seconds, calls, op + (f'  [{kernel[:80]}]' if kernel != op else ''))
            for op, seconds, calls, kernel in rows[:top]]
  lines.append('by kind:')
  lines += [line(seconds, calls, kind) for kind, (seconds, calls)
            in sorted(kinds.items(), key=lambda item: -item[1][0])[:top]]
  return '\n'.join(lines)


# ------------------------------------------------------- compilation cache ----


def compilation_cache_dir(setting: str, workdir: str) -> str:
  """The directory `setting` (config.train.compilation_cache_dir) names; '' = off."""
  if setting == COMPILATION_CACHE_DEFAULT:
    if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
      return os.environ['JAX_COMPILATION_CACHE_DIR']
    cache_home = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'),
                                                                  '.cache')
    return os.path.join(cache_home, 'ldm_jax', 'jax')
  if setting == COMPILATION_CACHE_WORKDIR:
    return os.path.join(workdir, 'jax_cache')
  return os.path.expanduser(setting)


def enable_compilation_cache(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Points JAX's persistent compilation cache at the configured directory; returns it."""
  directory = compilation_cache_dir(config.train.get('compilation_cache_dir', ''), workdir)
  if directory:
    jax.config.update('jax_compilation_cache_dir', directory)
    logging.info('compilation cache: %s', directory)
  return directory
