"""Huge pages for XLA:CPU's buffers: the command-line entry points restart once with them.

Each call of a compiled XLA:CPU program allocates its temporary buffer anew (1.1 GB
for the train step of `configs/bench_unet32.py`), and each Eigen convolution its
packed inputs (76 MB for a 3x3 convolution of 64 channels at 32x32, batch 32). Both
are too large for glibc's heaps, so glibc maps them fresh from the kernel and unmaps
them when they are freed: every call faults in ~283,000 4 KiB pages again, 0.6-0.7
CPU-seconds of kernel time per train step on a 2-core AMD EPYC (a quarter of the
step). With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` glibc asks the kernel for
transparent huge pages (2 MiB) on those mappings, and the same step takes ~1,400
page faults and 0.1-0.2 s of kernel time (benchmarks/README.md, "What was tried").

glibc reads GLIBC_TUNABLES once, when a process starts. So `import ldm_jax`, when it
is the package of `python -m ldm_jax.main` or `python -m ldm_jax.bench` being
started, re-executes that same command (same process id, arguments and
environment) with the tunable added, before JAX is imported. Nothing happens when:

  * GLIBC_TUNABLES already names `glibc.malloc.hugetlb` (the user's setting wins,
    `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` keeps 4 KiB pages);
  * `LDM_JAX_XLA_DEFAULTS=0` (as for ldm_jax's XLA flags, `ldm_jax/xla_flags.py`);
  * the kernel's transparent huge pages are not in `madvise` mode (with `always` the
    kernel already uses them, with `never` it will not), or the C library is not
    glibc 2.35 or newer;
  * Python runs anything else (a script, a notebook, pytest): a library import never
    restarts its host process.

Only how the memory is paged changes; what is computed does not.
"""
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence

from ldm_jax import xla_flags

TUNABLE = 'glibc.malloc.hugetlb'
# The modules whose `python -m` start restarts with the tunable.
ENTRY_POINTS = ('ldm_jax.main', 'ldm_jax.bench')
THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'
GLIBC_MIN_VERSION = (2, 35)  # The first glibc with `glibc.malloc.hugetlb`.


def transparent_huge_pages(path: str = THP_ENABLED) -> str | None:
  """The kernel's transparent huge page mode ('always', 'madvise', 'never'), or None."""
  try:
    with open(path) as f:
      match = re.search(r'\[(\w+)\]', f.read())
  except OSError:
    return None
  return match.group(1) if match else None


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the C library when it is glibc, else None."""
  try:
    version = os.confstr('CS_GNU_LIBC_VERSION') or ''  # 'glibc 2.36' (the running library).
  except (AttributeError, ValueError, OSError):  # Not a GNU system.
    return None
  match = re.fullmatch(r'glibc (\d+)\.(\d+).*', version)
  return (int(match.group(1)), int(match.group(2))) if match else None


def tunables_with_huge_pages(environ: Mapping[str, str], thp_mode: str | None,
                             glibc: tuple[int, int] | None) -> str | None:
  """GLIBC_TUNABLES with `glibc.malloc.hugetlb=1` added, or None where it does not apply.

  Args:
    environ: the process environment.
    thp_mode: `transparent_huge_pages()`.
    glibc: `glibc_version()`.

  Returns:
    The new GLIBC_TUNABLES value (the user's tunables first, colon-separated), or None
    when the tunable is already named, ldm_jax's defaults are turned off, the kernel is
    not in `madvise` mode or the C library is not a recent glibc.
  """
  current = environ.get('GLIBC_TUNABLES', '')
  if (TUNABLE in current or xla_flags.opted_out(environ) or thp_mode != 'madvise'
      or glibc is None or glibc < GLIBC_MIN_VERSION):
    return None
  return ':'.join(filter(None, [current.strip(':'), f'{TUNABLE}=1']))


# Interpreter options that take the next argument as their value.
_OPTIONS_WITH_VALUE = ('-W', '-X', '--check-hash-based-pycs')


def entry_point(orig_argv: Sequence[str]) -> str | None:
  """The module a `python [options] -m MODULE ...` command line runs, else None."""
  args = iter(orig_argv[1:])
  for arg in args:
    if arg == '-m':
      return next(args, None)
    if arg in _OPTIONS_WITH_VALUE:
      next(args, None)
    elif not arg.startswith('-') or arg == '-c':
      return None  # A script or `-c`: no module.
  return None


def describe(environ: Mapping[str, str] | None = None) -> str:
  """One line on how this process pages its large buffers (printed by the benchmarks)."""
  environ = os.environ if environ is None else environ
  tunables = environ.get('GLIBC_TUNABLES', '')
  if f'{TUNABLE}=1' in tunables:
    return f'huge pages for large buffers (GLIBC_TUNABLES={tunables})'
  mode = transparent_huge_pages()
  if mode == 'always':
    return 'huge pages for large buffers (transparent huge pages: always)'
  return f'4 KiB pages for large buffers (transparent huge pages: {mode or "unknown"})'


def restart_with_huge_pages(environ: dict[str, str] | None = None,
                            orig_argv: Sequence[str] | None = None,
                            argv0: str | None = None,
                            execve: Callable[..., None] = os.execve) -> bool:
  """Re-executes `python -m ldm_jax.main|bench ...` once with huge pages (see module doc).

  Called by `import ldm_jax`. Returns False when nothing is done; on a restart the
  call does not return (`execve` replaces the process).
  """
  environ = os.environ if environ is None else environ
  orig_argv = sys.orig_argv if orig_argv is None else orig_argv
  argv0 = sys.argv[0] if argv0 is None else argv0
  # While `python -m` imports the package of its module, sys.argv[0] is '-m'.
  if argv0 != '-m' or entry_point(orig_argv) not in ENTRY_POINTS:
    return False
  tunables = tunables_with_huge_pages(environ, transparent_huge_pages(), glibc_version())
  if tunables is None:
    return False
  sys.stdout.flush()
  sys.stderr.flush()
  execve(sys.executable, [sys.executable, *orig_argv[1:]],
         {**environ, 'GLIBC_TUNABLES': tunables})
  return True
