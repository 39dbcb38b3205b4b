"""Peak resident memory of a stretch of a process, with the standard library alone.

Used by `ldm_jax.bench` and by the PyTorch side of `benchmarks/side_by_side.py`
(which loads this file by path, without JAX), so that both frameworks' memory per
training image is measured the same way:

    window = rss.PeakWindow()      # frees what the allocator holds, resets the peak
    ...build the model and optimizer state, run the train steps...
    window.peak_mib()              # highest RSS since, minus RSS at the start

The peak is Linux's per-process high-water mark (`VmHWM`), reset by writing 5 to
`/proc/self/clear_refs`. Memory the allocator kept from before the window (e.g.
from compiling) can be reused inside it without raising the RSS, so the window
starts with `malloc_trim`; running with `MALLOC_MMAP_THRESHOLD_=131072` in the
environment also makes every large buffer a fresh mapping. Where the reset is
unavailable (not Linux), the window reports the growth of `ru_maxrss` instead,
which underestimates when an earlier peak was higher.
"""
import ctypes
import ctypes.util
import gc
import resource
import sys

_STATUS = '/proc/self/status'
_CLEAR_REFS = '/proc/self/clear_refs'


def _status_kib(field: str) -> int | None:
  try:
    with open(_STATUS) as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def _maxrss_kib() -> int:
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return maxrss // 1024 if sys.platform == 'darwin' else maxrss  # Bytes on macOS.


def release_free_memory() -> None:
  """Returns freed heap memory to the system (glibc's `malloc_trim`), after a GC."""
  gc.collect()
  name = ctypes.util.find_library('c')
  if name:
    try:
      ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # Not glibc.
      pass


def reset_peak() -> bool:
  """Sets the high-water mark to the current RSS; False where the system cannot."""
  try:
    with open(_CLEAR_REFS, 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


class PeakWindow:
  """The peak RSS above the RSS at construction, in MiB (see the module docstring)."""

  def __init__(self):
    release_free_memory()
    self.exact = reset_peak() and _status_kib('VmHWM') is not None
    self._start_kib = (_status_kib('VmRSS') if self.exact else _maxrss_kib()) or 0
    self.method = ('peak RSS above the start (VmHWM reset)' if self.exact
                   else 'growth of the max RSS')

  def peak_mib(self) -> float:
    peak = _status_kib('VmHWM') if self.exact else _maxrss_kib()
    return max((peak or 0) - self._start_kib, 0) / 1024
